//! Watches the cluster while the benchmark runs: every
//! [`POLL_INTERVAL_MS`] each live replica's status (through a session with
//! that replica alone) and its process's resident memory (`VmRSS` and
//! `VmHWM` from `/proc/<pid>/status`).
//!
//! A leader change is a change of the `(leader, ballot)` pair that a
//! majority of the members report in fresh statuses; one replica's passing
//! view (a restarted replica that has not heard the leader yet) does not
//! count. Changes and memory peaks are counted per [`Phase`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use synod_client::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::report::{LeaderChange, Phase};
use crate::cluster::{self, NODE_IDS};
use crate::connect::{self, ClientConfig};

/// How often each replica is polled.
pub const POLL_INTERVAL_MS: u64 = 250;

/// Longest one status call (or one connection attempt) may take.
const STATUS_TIMEOUT_MS: u64 = 1_000;

/// A status older than this does not count towards the majority view.
const STATUS_FRESH_MS: u64 = 1_500;

/// Leader changes remembered one by one (all are counted).
const CHANGES_KEPT_MAX: usize = 1_000;

/// Failed status calls in a row after which the session is opened again.
const FAILURES_BEFORE_RECONNECT: u32 = 3;

/// What one replica said about the leader, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// When it answered.
    pub at: Instant,
    /// The leader it believes in.
    pub leader: Option<u64>,
    /// Its promised ballot.
    pub ballot: String,
}

/// A process's memory, in kB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// Resident now (`VmRSS`).
    pub rss_kb: u64,
    /// Highest resident since the process started (`VmHWM`).
    pub hwm_kb: u64,
}

/// Reads a process's memory from `/proc/<pid>/status`.
pub fn read_memory(pid: u32) -> Option<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
    };
    Some(Memory {
        rss_kb: field("VmRSS:")?,
        hwm_kb: field("VmHWM:")?,
    })
}

/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`, 100 on every
/// Linux architecture the benchmark runs on).
const PROC_TICKS_PER_SEC: u64 = 100;

/// The CPU time (user and system) a process has used so far, from
/// `/proc/<pid>/stat`.
pub fn read_cpu_time(pid: u32) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields start after its ')'.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 1000 / PROC_TICKS_PER_SEC))
}

/// One replica's memory in one phase.
#[derive(Debug, Clone, Default)]
struct PhaseMemory {
    /// The peak so far, in kB.
    peak_kb: u64,
    /// Per process, its `VmHWM` when first seen in this phase: a rise
    /// above it happened in this phase.
    hwm_at_entry_kb: BTreeMap<u32, u64>,
}

/// What the monitor knows.
#[derive(Debug)]
struct State {
    phase: Phase,
    started: Instant,
    /// The replicas to poll, with their process ids.
    live: BTreeMap<u64, u32>,
    latest: BTreeMap<u64, Sample>,
    view: Option<(u64, String)>,
    changes: BTreeMap<Phase, u64>,
    events: Vec<LeaderChange>,
    memory: BTreeMap<(u64, Phase), PhaseMemory>,
    /// Each process id and the phase it was first seen in.
    first_seen: BTreeMap<u32, Phase>,
}

impl State {
    fn record_status(&mut self, id: u64, sample: Sample) {
        self.latest.insert(id, sample);
        let now = Instant::now();
        let fresh = Duration::from_millis(STATUS_FRESH_MS);
        let mut votes: BTreeMap<(u64, &str), usize> = BTreeMap::new();
        for (replica, sample) in &self.latest {
            if !self.live.contains_key(replica) || now.duration_since(sample.at) > fresh {
                continue;
            }
            if let Some(leader) = sample.leader {
                *votes.entry((leader, sample.ballot.as_str())).or_default() += 1;
            }
        }
        let majority = NODE_IDS.len() / 2 + 1;
        let Some(((leader, ballot), _)) = votes.into_iter().find(|(_, count)| *count >= majority)
        else {
            return;
        };
        let view = (leader, ballot.to_string());
        if self.view.as_ref() == Some(&view) {
            return;
        }
        if let Some((old_leader, old_ballot)) = self.view.replace(view.clone()) {
            *self.changes.entry(self.phase).or_default() += 1;
            if self.events.len() < CHANGES_KEPT_MAX {
                self.events.push(LeaderChange {
                    phase: self.phase,
                    at_secs: now.duration_since(self.started).as_secs_f64(),
                    from: format!("{old_leader}@{old_ballot}"),
                    to: format!("{}@{}", view.0, view.1),
                });
            }
        }
    }

    fn record_memory(&mut self, id: u64, pid: u32, memory: Memory) {
        let phase = self.phase;
        let born_here = *self.first_seen.entry(pid).or_insert(phase) == phase;
        let entry = self.memory.entry((id, phase)).or_default();
        entry.peak_kb = entry.peak_kb.max(memory.rss_kb);
        let at_entry = *entry.hwm_at_entry_kb.entry(pid).or_insert(memory.hwm_kb);
        // The process's high-water mark counts for this phase when the
        // process started in it, or when the mark rose during it.
        if born_here || memory.hwm_kb > at_entry {
            entry.peak_kb = entry.peak_kb.max(memory.hwm_kb);
        }
    }
}

/// Polls the replicas until stopped; the tasks end when it is dropped.
pub struct Monitor {
    state: Arc<Mutex<State>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl State {
    /// Nothing seen yet, in `phase` from now, with `live` replicas running.
    fn new(phase: Phase, live: BTreeMap<u64, u32>) -> State {
        State {
            phase,
            started: Instant::now(),
            live,
            latest: BTreeMap::new(),
            view: None,
            changes: BTreeMap::new(),
            events: Vec::new(),
            memory: BTreeMap::new(),
            first_seen: BTreeMap::new(),
        }
    }
}

impl Monitor {
    /// Starts polling: `replicas` are each replica's id with the config of
    /// a session with it alone; `live` those running now, with their pids.
    pub fn start(replicas: Vec<(u64, ClientConfig)>, live: BTreeMap<u64, u32>) -> Monitor {
        let state = Arc::new(Mutex::new(State::new(Phase::Start, live)));
        let (stop, stopped) = watch::channel(false);
        let tasks = replicas
            .into_iter()
            .map(|(id, config)| tokio::spawn(poll(id, config, state.clone(), stopped.clone())))
            .collect();
        Monitor { state, stop, tasks }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Counts what follows towards `phase`.
    pub fn enter(&self, phase: Phase) {
        self.state().phase = phase;
    }

    /// Polls replica `id` (process `pid`) from now on, or no longer.
    pub fn set_live(&self, id: u64, pid: Option<u32>) {
        let mut state = self.state();
        match pid {
            Some(pid) => {
                state.live.insert(id, pid);
            }
            None => {
                state.live.remove(&id);
                state.latest.remove(&id);
            }
        }
    }

    /// The leader a majority agrees on, if any.
    pub fn leader(&self) -> Option<u64> {
        self.state().view.as_ref().map(|(leader, _)| *leader)
    }

    /// Leader changes so far in `phase`.
    pub fn leader_changes_in(&self, phase: Phase) -> u64 {
        self.state().changes.get(&phase).copied().unwrap_or(0)
    }

    /// Leader changes per phase, and each change.
    pub fn leader_changes(&self) -> (BTreeMap<Phase, u64>, Vec<LeaderChange>) {
        let state = self.state();
        (state.changes.clone(), state.events.clone())
    }

    /// Replica `id`'s peak resident memory per phase, in kB.
    pub fn peaks_kb(&self, id: u64) -> BTreeMap<Phase, u64> {
        self.state()
            .memory
            .iter()
            .filter(|((replica, _), _)| *replica == id)
            .map(|((_, phase), memory)| (*phase, memory.peak_kb))
            .collect()
    }

    /// Samples replica `id`'s memory now (also counted in the phase).
    pub fn sample_memory(&self, id: u64) -> Option<Memory> {
        let pid = *self.state().live.get(&id)?;
        let memory = read_memory(pid)?;
        self.state().record_memory(id, pid, memory);
        Some(memory)
    }

    /// Stops polling and closes the monitor's sessions (within a bound).
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut self.tasks);
        let joined = async {
            for task in tasks {
                let _ = task.await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(2 * STATUS_TIMEOUT_MS), joined).await;
    }
}

/// Locks the state. A poisoned lock only means a poll task panicked
/// mid-update; the figures are still the best there are.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn poll(
    id: u64,
    config: ClientConfig,
    state: Arc<Mutex<State>>,
    mut stopped: watch::Receiver<bool>,
) {
    let port: Option<u16> = config
        .endpoints
        .first()
        .and_then(|endpoint| endpoint.rsplit_once(':'))
        .and_then(|(_, port)| port.parse().ok());
    let mut client: Option<Client> = None;
    let mut failures = 0u32;
    let mut ticker = tokio::time::interval(Duration::from_millis(POLL_INTERVAL_MS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = Duration::from_millis(STATUS_TIMEOUT_MS);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stopped.changed() => break,
        }
        let pid = lock(&state).live.get(&id).copied();
        let Some(pid) = pid else {
            if let Some(client) = client.take() {
                let _ = tokio::time::timeout(timeout, client.close()).await;
            }
            continue;
        };
        if let Some(memory) = read_memory(pid) {
            lock(&state).record_memory(id, pid, memory);
        }
        // Connecting before a starting replica has bound its port loses the
        // first handshake packet and waits a retransmission out: look first.
        if client.is_none() && port.is_none_or(cluster::udp_port_bound) {
            client = connect::connect_within(&config, STATUS_TIMEOUT_MS)
                .await
                .ok();
            failures = 0;
        }
        let Some(session) = &client else {
            continue;
        };
        match tokio::time::timeout(timeout, session.status()).await {
            Ok(Ok(status)) => {
                failures = 0;
                let sample = Sample {
                    at: Instant::now(),
                    leader: status.replica.leader,
                    ballot: status.replica.ballot,
                };
                let mut state = lock(&state);
                // The replica may have been stopped while it answered.
                if state.live.get(&id) == Some(&pid) {
                    state.record_status(id, sample);
                }
            }
            _ => {
                failures += 1;
                if failures >= FAILURES_BEFORE_RECONNECT {
                    if let Some(client) = client.take() {
                        let _ = tokio::time::timeout(timeout, client.close()).await;
                    }
                }
            }
        }
    }
    if let Some(client) = client {
        let _ = tokio::time::timeout(timeout, client.close()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(live: &[u64]) -> State {
        State::new(
            Phase::Baseline,
            live.iter().map(|&id| (id, id as u32 + 1000)).collect(),
        )
    }

    fn sample(leader: Option<u64>, ballot: &str) -> Sample {
        Sample {
            at: Instant::now(),
            leader,
            ballot: ballot.into(),
        }
    }

    #[test]
    fn only_a_change_a_majority_agrees_on_counts() {
        let mut state = state(&[1, 2, 3]);
        state.record_status(1, sample(Some(1), "1.1"));
        assert_eq!(state.view, None, "one replica is no majority");
        state.record_status(2, sample(Some(1), "1.1"));
        assert_eq!(state.view, Some((1, "1.1".into())));
        assert!(state.changes.is_empty(), "the first leader is no change");
        // A restarted replica that has not heard the leader yet.
        state.record_status(3, sample(None, "0.0"));
        state.record_status(3, sample(Some(2), "2.2"));
        assert!(state.changes.is_empty());
        state.phase = Phase::Fill;
        state.record_status(2, sample(Some(2), "2.2"));
        assert_eq!(state.changes.get(&Phase::Fill), Some(&1));
        assert_eq!(state.events[0].from, "1@1.1");
        assert_eq!(state.events[0].to, "2@2.2");
        // Stopped replicas do not vote.
        state.live.remove(&3);
        state.record_status(1, sample(Some(1), "3.1"));
        state.record_status(2, sample(Some(1), "3.1"));
        assert_eq!(state.changes.get(&Phase::Fill), Some(&2));
    }

    #[test]
    fn a_phase_peak_counts_the_high_water_mark_only_when_it_rose_in_the_phase() {
        let mut state = state(&[1]);
        state.phase = Phase::Start;
        let memory = |rss_kb, hwm_kb| Memory { rss_kb, hwm_kb };
        state.record_memory(1, 10, memory(100, 100));
        state.record_memory(1, 10, memory(90, 300));
        state.phase = Phase::Baseline;
        state.record_memory(1, 10, memory(120, 300));
        assert_eq!(state.memory[&(1, Phase::Start)].peak_kb, 300);
        assert_eq!(state.memory[&(1, Phase::Baseline)].peak_kb, 120);
        state.record_memory(1, 10, memory(150, 350));
        assert_eq!(state.memory[&(1, Phase::Baseline)].peak_kb, 350);
        // A process started in this phase: its whole mark is this phase's.
        state.phase = Phase::Restart;
        state.record_memory(1, 11, memory(50, 80));
        assert_eq!(state.memory[&(1, Phase::Restart)].peak_kb, 80);
    }

    #[test]
    fn cpu_time_is_read_from_proc() {
        let before = read_cpu_time(std::process::id()).expect("this process has a stat");
        let busy_until = Instant::now() + Duration::from_millis(300);
        let mut spins = 0u64;
        while Instant::now() < busy_until {
            spins = std::hint::black_box(spins + 1);
        }
        let after = read_cpu_time(std::process::id()).expect("this process has a stat");
        assert!(
            after >= before + Duration::from_millis(30),
            "300 ms of spinning shows as {:?} of CPU time",
            after - before
        );
    }

    #[test]
    fn memory_is_read_from_proc() {
        let memory = read_memory(std::process::id()).expect("this process has a status");
        assert!(memory.rss_kb > 0 && memory.hwm_kb >= memory.rss_kb);
        assert!(read_memory(u32::MAX).is_none());
    }
}
