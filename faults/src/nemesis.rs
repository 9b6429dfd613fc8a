//! The nemesis: injects one fault at a time into the running cluster,
//! holds it, heals it, and lets the cluster settle before the next. The
//! schedule (which fault, which replica, how long) comes from the run's
//! seed, so a run can be repeated with the same schedule.
//!
//! Faults are held longer than the timeouts they test: a pause outlasts
//! the lease (1 s), the election timeout (1-1.6 s) and the session timeout
//! of the clients (3 s).

use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::cluster::{Cluster, Skew};
use crate::net::Firewall;
use crate::recorder::Recorder;
use crate::workload::Attachments;

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// `SIGKILL` a random replica, restart it after a while.
    KillRandom,
    /// `SIGKILL` the leader, restart it after a while.
    KillLeader,
    /// `SIGKILL` every replica at once, restart them all.
    KillAll,
    /// `SIGSTOP` the leader past the lease, election and session timeouts.
    PauseLeader,
    /// `SIGSTOP` a random replica.
    PauseRandom,
    /// Cut the leader off from every other replica (clients still reach it).
    IsolateLeader,
    /// Split the replicas into a majority and a minority.
    MajorityMinority,
    /// Two groups that cannot talk, joined by one replica that talks to both.
    Bridge,
    /// Lose everything the leader sends to the other replicas, one way.
    LeaderSendsNothing,
    /// Lose everything the other replicas send to the leader, one way.
    LeaderHearsNothing,
    /// Cut a lock client off from the replica its session is attached to.
    ClientCutOff,
    /// A follower loses its disk and rejoins with `--join`.
    DiskLost,
    /// Restart a replica with its clock skewed within the drift margin.
    ClockSkew,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 13] = [
        FaultKind::KillRandom,
        FaultKind::KillLeader,
        FaultKind::KillAll,
        FaultKind::PauseLeader,
        FaultKind::PauseRandom,
        FaultKind::IsolateLeader,
        FaultKind::MajorityMinority,
        FaultKind::Bridge,
        FaultKind::LeaderSendsNothing,
        FaultKind::LeaderHearsNothing,
        FaultKind::ClientCutOff,
        FaultKind::DiskLost,
        FaultKind::ClockSkew,
    ];

    /// The kind's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillRandom => "kill-random",
            FaultKind::KillLeader => "kill-leader",
            FaultKind::KillAll => "kill-all",
            FaultKind::PauseLeader => "pause-leader",
            FaultKind::PauseRandom => "pause-random",
            FaultKind::IsolateLeader => "isolate-leader",
            FaultKind::MajorityMinority => "majority-minority",
            FaultKind::Bridge => "bridge",
            FaultKind::LeaderSendsNothing => "leader-sends-nothing",
            FaultKind::LeaderHearsNothing => "leader-hears-nothing",
            FaultKind::ClientCutOff => "client-cut-off",
            FaultKind::DiskLost => "disk-lost",
            FaultKind::ClockSkew => "clock-skew",
        }
    }

    /// Whether the kind needs the firewall.
    pub fn needs_firewall(self) -> bool {
        matches!(
            self,
            FaultKind::IsolateLeader
                | FaultKind::MajorityMinority
                | FaultKind::Bridge
                | FaultKind::LeaderSendsNothing
                | FaultKind::LeaderHearsNothing
                | FaultKind::ClientCutOff
        )
    }
}

impl FromStr for FaultKind {
    type Err = String;

    fn from_str(name: &str) -> Result<FaultKind, String> {
        FaultKind::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = FaultKind::ALL.iter().map(|kind| kind.name()).collect();
                format!("no fault kind {name:?} (kinds: {})", names.join(", "))
            })
    }
}

/// What the nemesis acts on.
pub struct Nemesis<'a> {
    /// The cluster.
    pub cluster: &'a mut Cluster,
    /// The firewall, when the run may use it.
    pub firewall: Option<&'a mut Firewall>,
    /// Where faults are recorded.
    pub recorder: Arc<Recorder>,
    /// The lock clients' sessions, by worker.
    pub lock_clients: Vec<u32>,
    /// The workers' clients.
    pub attachments: Attachments,
    /// The schedule's randomness.
    pub rng: ChaCha8Rng,
    /// The clock-rate error a skewed replica gets at most, in ppm.
    pub skew_ppm_max: i64,
}

impl Nemesis<'_> {
    fn random_replica(&mut self) -> u64 {
        let ids = self.cluster.ids();
        ids[self.rng.random_range(0..ids.len())]
    }

    async fn leader_or_random(&mut self) -> u64 {
        match self.cluster.leader().await {
            Some(leader) => leader,
            None => self.random_replica(),
        }
    }

    fn hold(&mut self, low_ms: u64, high_ms: u64) -> Duration {
        Duration::from_millis(self.rng.random_range(low_ms..=high_ms))
    }

    /// Injects one fault of `kind`, holds it and heals it.
    ///
    /// # Errors
    /// A process or firewall operation failed.
    pub async fn inject(&mut self, kind: FaultKind) -> Result<()> {
        let name = kind.name();
        match kind {
            FaultKind::KillRandom | FaultKind::KillLeader => {
                let id = if kind == FaultKind::KillLeader {
                    self.leader_or_random().await
                } else {
                    self.random_replica()
                };
                let down = self.hold(500, 4000);
                self.recorder.fault(name, format!("kill -9 replica {id}"));
                self.cluster.kill(id)?;
                tokio::time::sleep(down).await;
                self.cluster.restart(id)?;
                self.recorder
                    .fault(name, format!("heal: restart replica {id}"));
            }
            FaultKind::KillAll => {
                let down = self.hold(200, 2000);
                self.recorder.fault(name, "kill -9 every replica".into());
                for id in self.cluster.ids() {
                    self.cluster.kill(id)?;
                }
                tokio::time::sleep(down).await;
                for id in self.cluster.ids() {
                    self.cluster.restart(id)?;
                }
                self.recorder
                    .fault(name, "heal: restart every replica".into());
            }
            FaultKind::PauseLeader | FaultKind::PauseRandom => {
                let id = if kind == FaultKind::PauseLeader {
                    self.leader_or_random().await
                } else {
                    self.random_replica()
                };
                let paused = self.hold(3500, 8000);
                self.recorder.fault(
                    name,
                    format!("SIGSTOP replica {id} for {} ms", paused.as_millis()),
                );
                self.cluster.pause(id)?;
                tokio::time::sleep(paused).await;
                self.cluster.resume(id)?;
                self.recorder
                    .fault(name, format!("heal: SIGCONT replica {id}"));
            }
            FaultKind::IsolateLeader
            | FaultKind::MajorityMinority
            | FaultKind::Bridge
            | FaultKind::LeaderSendsNothing
            | FaultKind::LeaderHearsNothing => {
                let leader = self.leader_or_random().await;
                let mut ids = self.cluster.ids();
                ids.shuffle(&mut self.rng);
                let others: Vec<u64> = ids.iter().copied().filter(|&id| id != leader).collect();
                let held = self.hold(2500, 6000);
                let Some(firewall) = self.firewall.as_deref_mut() else {
                    return Ok(());
                };
                let plan = self.cluster.plan();
                let description = match kind {
                    FaultKind::IsolateLeader => {
                        let others_ips: Vec<Ipv4Addr> =
                            others.iter().map(|&id| plan.replica(id)).collect();
                        firewall.separate(&[plan.replica(leader)], &others_ips)?;
                        format!("isolate leader {leader} from {others:?}")
                    }
                    FaultKind::MajorityMinority => {
                        let minority_size = ids.len().saturating_sub(1) / 2;
                        let (minority, majority) = ids.split_at(minority_size.max(1));
                        let (minority, majority) = (minority.to_vec(), majority.to_vec());
                        let (a, b) = (
                            minority
                                .iter()
                                .map(|&id| plan.replica(id))
                                .collect::<Vec<_>>(),
                            majority
                                .iter()
                                .map(|&id| plan.replica(id))
                                .collect::<Vec<_>>(),
                        );
                        firewall.separate(&a, &b)?;
                        format!("partition minority {minority:?} from majority {majority:?}")
                    }
                    FaultKind::Bridge => {
                        let bridge = ids[0];
                        let rest = &ids[1..];
                        let (one, other) = rest.split_at(rest.len() / 2);
                        let (a, b) = (
                            one.iter().map(|&id| plan.replica(id)).collect::<Vec<_>>(),
                            other.iter().map(|&id| plan.replica(id)).collect::<Vec<_>>(),
                        );
                        firewall.separate(&a, &b)?;
                        format!("bridge {bridge} between {one:?} and {other:?}")
                    }
                    FaultKind::LeaderSendsNothing => {
                        for &other in &others {
                            firewall.cut(plan.replica(leader), plan.replica(other))?;
                        }
                        format!("lose everything leader {leader} sends to {others:?}")
                    }
                    _ => {
                        for &other in &others {
                            firewall.cut(plan.replica(other), plan.replica(leader))?;
                        }
                        format!("lose everything {others:?} send to leader {leader}")
                    }
                };
                self.recorder.fault(name, description);
                tokio::time::sleep(held).await;
                firewall.heal()?;
                self.recorder.fault(name, "heal: restore every link".into());
            }
            FaultKind::ClientCutOff => {
                let Some(&worker) = self.lock_clients.choose(&mut self.rng) else {
                    return Ok(());
                };
                let client = self
                    .attachments
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .get(&worker)
                    .cloned();
                let Some(client) = client else {
                    return Ok(());
                };
                let attached =
                    match tokio::time::timeout(Duration::from_secs(2), client.status()).await {
                        Ok(Ok(status)) => status.replica.node_id,
                        _ => return Ok(()),
                    };
                let held = self.hold(3000, 8000);
                let plan = self.cluster.plan();
                let Some(firewall) = self.firewall.as_deref_mut() else {
                    return Ok(());
                };
                firewall.cut_both(plan.client(worker), plan.replica(attached))?;
                self.recorder.fault(
                    name,
                    format!(
                        "cut client {worker} off from replica {attached} for {} ms",
                        held.as_millis()
                    ),
                );
                tokio::time::sleep(held).await;
                firewall.heal()?;
                self.recorder.fault(name, "heal: restore every link".into());
            }
            FaultKind::DiskLost => {
                let leader = self.cluster.leader().await;
                let followers: Vec<u64> = self
                    .cluster
                    .ids()
                    .into_iter()
                    .filter(|&id| Some(id) != leader)
                    .collect();
                let Some(&id) = followers.choose(&mut self.rng) else {
                    return Ok(());
                };
                self.recorder.fault(
                    name,
                    format!("replica {id} loses its disk, restarts with --join"),
                );
                self.cluster.wipe_and_join(id)?;
                // A second disk lost before this one has rejoined leaves no
                // majority that remembers every promise: the cluster would
                // stop for good (safely). The nemesis waits for the rejoin.
                let rejoined = self
                    .cluster
                    .wait_caught_up(id, Duration::from_secs(60))
                    .await;
                self.recorder.fault(
                    name,
                    format!(
                        "heal: replica {id} {}",
                        if rejoined {
                            "rejoined"
                        } else {
                            "has NOT rejoined within 60 s"
                        }
                    ),
                );
            }
            FaultKind::ClockSkew => {
                let id = self.random_replica();
                let rate_ppm = self
                    .rng
                    .random_range(-self.skew_ppm_max..=self.skew_ppm_max);
                let offset_ms = self.rng.random_range(-50..=50);
                let skew = Skew {
                    offset_ms,
                    rate_ppm,
                };
                self.recorder.fault(
                    name,
                    format!("restart replica {id} with its clock {rate_ppm} ppm fast, {offset_ms} ms ahead"),
                );
                self.cluster.restart_skewed(id, skew)?;
                let settle = self.hold(2000, 4000);
                tokio::time::sleep(settle).await;
                self.recorder
                    .fault(name, format!("heal: replica {id} runs skewed"));
            }
        }
        Ok(())
    }

    /// Heals everything the nemesis may have left: every link restored,
    /// every paused replica resumed, every stopped one restarted.
    ///
    /// # Errors
    /// A process or firewall operation failed.
    pub fn heal_all(&mut self) -> Result<()> {
        if let Some(firewall) = self.firewall.as_deref_mut() {
            firewall.heal()?;
        }
        for id in self.cluster.ids() {
            if self.cluster.is_paused(id) {
                self.cluster.resume(id)?;
            }
            if !self.cluster.is_running(id) {
                self.cluster.restart(id)?;
            }
        }
        Ok(())
    }
}
