//! The cluster a benchmark starts for itself: its data directory (new, and
//! removed afterwards unless kept), its ports (the first free range), its
//! three replicas with a client certificate per benchmark client, and a
//! pool of sessions attached where the workload asks.
//!
//! [`on_fresh_cluster`] runs a benchmark body on such a cluster and stops
//! every replica when the body ends, fails or is interrupted (Ctrl-C,
//! SIGTERM, SIGHUP), before the directory goes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use synod_client::Client;
use tokio::runtime::Runtime;

use super::load;
use super::{
    ClusterArgs, PORT_SEARCH_ATTEMPTS, PORT_SEARCH_FIRST, PORT_SEARCH_SPREAD, PORT_SEARCH_STEP,
};
use crate::cluster::{self, LocalCluster, Notices, NODE_IDS};
use crate::commands::Interrupted;

/// Which replicas a benchmark's sessions attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Every session on the leader (the others as its fallbacks).
    Leader,
    /// Sessions spread over the followers, in turn.
    Followers,
    /// Sessions spread over every replica, in turn, starting at the leader.
    All,
}

impl Target {
    /// The target's name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Target::Leader => "leader",
            Target::Followers => "followers",
            Target::All => "all",
        }
    }

    /// The replicas session `index` tries, first its home: the home by
    /// the target, then the others in id order.
    pub fn order(self, leader: u64, index: usize) -> Vec<u64> {
        let followers: Vec<u64> = NODE_IDS
            .iter()
            .copied()
            .filter(|&id| id != leader)
            .collect();
        let home = match self {
            Target::Leader => leader,
            Target::Followers => followers[index % followers.len()],
            Target::All => {
                let mut all = vec![leader];
                all.extend(&followers);
                all[index % all.len()]
            }
        };
        let mut order = vec![home];
        order.extend(NODE_IDS.iter().copied().filter(|&id| id != home));
        order
    }
}

/// The names of the client certificates for `count` benchmark clients.
pub fn client_names(count: usize) -> Vec<String> {
    (0..count)
        .map(|index| format!("bench-{index:04}"))
        .collect()
}

/// A benchmark's data directory: one given on the command line (kept), or
/// a new temporary one (removed afterwards unless `--keep`).
pub struct BenchData {
    path: PathBuf,
    temporary: Option<tempfile::TempDir>,
    keep: bool,
}

impl BenchData {
    /// Makes the directory: `--data DIR` (or `DIR/label`, when one
    /// benchmark starts several clusters), which must be new or empty, or a
    /// temporary one.
    ///
    /// # Errors
    /// The directory cannot be made or read, or is not empty.
    pub fn prepare(args: &ClusterArgs, label: Option<&str>) -> anyhow::Result<BenchData> {
        match &args.data {
            Some(dir) => {
                let dir = match label {
                    Some(label) => dir.join(label),
                    None => dir.clone(),
                };
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let empty = std::fs::read_dir(&dir)
                    .with_context(|| format!("cannot read {}", dir.display()))?
                    .next()
                    .is_none();
                if !empty {
                    bail!(
                        "{} is not empty: the benchmark needs a fresh cluster; give a new or \
                         empty --data directory",
                        dir.display()
                    );
                }
                let path = dir
                    .canonicalize()
                    .with_context(|| format!("cannot resolve {}", dir.display()))?;
                Ok(BenchData {
                    path,
                    temporary: None,
                    keep: true,
                })
            }
            None => {
                let temporary = tempfile::Builder::new()
                    .prefix("synod-bench-")
                    .tempdir()
                    .context("cannot make a temporary data directory")?;
                let path = temporary
                    .path()
                    .canonicalize()
                    .context("cannot resolve the temporary data directory")?;
                Ok(BenchData {
                    path,
                    temporary: Some(temporary),
                    keep: args.keep,
                })
            }
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the directory stays afterwards.
    pub fn kept(&self) -> bool {
        self.keep
    }

    /// Removes a temporary directory, or says where the kept one is. Call
    /// only once no replica runs in it.
    pub fn finish(self) {
        match self.temporary {
            Some(temporary) if self.keep => {
                let path = temporary.keep();
                eprintln!("bench: data kept in {}", path.display());
            }
            Some(temporary) => {
                if let Err(error) = temporary.close() {
                    eprintln!("bench: cannot remove {}: {error}", self.path.display());
                }
            }
            None => {}
        }
    }
}

/// The port base: `--port-base`, or the first free range from 10000 up,
/// starting where this process's id says so that benchmarks started
/// together look at different ranges first.
///
/// # Errors
/// The given base leaves no room, or no range is free.
pub fn port_base(args: &ClusterArgs) -> anyhow::Result<u16> {
    match args.port_base {
        Some(base) if cluster::port_base_fits(base) => Ok(base),
        Some(base) => bail!("--port-base {base} leaves no room for the HTTP ports (base + 203)"),
        None => {
            let spread = (std::process::id() % u32::from(PORT_SEARCH_SPREAD)) as u16;
            let first = PORT_SEARCH_FIRST + spread * PORT_SEARCH_STEP;
            cluster::free_port_base(first, PORT_SEARCH_STEP, PORT_SEARCH_SPREAD).or_else(|_| {
                cluster::free_port_base(PORT_SEARCH_FIRST, PORT_SEARCH_STEP, PORT_SEARCH_ATTEMPTS)
            })
        }
    }
}

/// Runs `body` on a new local cluster (not started yet: the body starts
/// it, see [`start`]) in a new data directory, with Ctrl-C, SIGTERM and
/// SIGHUP stopping it; the replicas are stopped and the directory removed
/// (unless kept) whatever the body's outcome. `label` names the cluster's
/// subdirectory of `--data` when a benchmark starts several.
///
/// # Errors
/// The directory or ports could not be had, the body failed, or it was
/// interrupted ([`Interrupted`]).
pub fn on_fresh_cluster<T>(
    runtime: &Runtime,
    args: &ClusterArgs,
    label: Option<&str>,
    body: impl AsyncFnOnce(&mut LocalCluster, bool) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let data = BenchData::prepare(args, label)?;
    let outcome = port_base(args).and_then(|base| {
        let mut cluster = LocalCluster::new(data.path(), base, "synod-bench", Notices::Stderr);
        cluster.set_data_kept(data.kept());
        let kept = data.kept();
        let outcome = runtime.block_on(async {
            tokio::select! {
                outcome = body(&mut cluster, kept) => outcome,
                signal = terminated() => {
                    eprintln!("bench: {signal}; stopping the replicas");
                    Err(Interrupted.into())
                }
            }
        });
        // Stops every replica still running before the directory goes.
        drop(cluster);
        outcome
    });
    data.finish();
    outcome
}

/// A cluster just started.
pub struct Started {
    /// The leader it has.
    pub leader: u64,
    /// The `synod-server` binary its replicas run.
    pub server: PathBuf,
}

/// Writes certificates (one per name in `clients`) and configs, starts
/// the three replicas with `server` (or the binary [`LocalCluster::server_binary`]
/// finds), and waits for a leader.
///
/// # Errors
/// A file cannot be written, a port is taken, a replica cannot start or
/// exited, or no leader came in time.
pub async fn start(
    cluster: &mut LocalCluster,
    server: Option<&Path>,
    clients: &[String],
) -> anyhow::Result<Started> {
    eprintln!("bench: starting 3 replicas in {}", cluster.data().display());
    cluster.generate_certs(clients)?;
    cluster.write_configs()?;
    cluster.check_ports_free(&NODE_IDS)?;
    let server = tokio::task::block_in_place(|| cluster.server_binary(server))?;
    cluster.start(&server, &NODE_IDS, &[])?;
    let admin = cluster.wait_ready(&cluster.client_config()).await?;
    let leader = current_leader(&admin).await;
    admin.close().await;
    Ok(Started {
        leader: leader?,
        server,
    })
}

/// The leader as the replica behind `client` names it.
///
/// # Errors
/// The status could not be read, or it names no leader.
pub async fn current_leader(client: &Client) -> anyhow::Result<u64> {
    let status = client.status().await.context("cannot read the status")?;
    status.replica.leader.context("the cluster has no leader")
}

/// Opens `count` sessions, session `index` with certificate `bench-index`
/// attached by `target` (see [`Target::order`]).
///
/// # Errors
/// A session could not be opened in time.
pub async fn connect_clients(
    cluster: &LocalCluster,
    count: usize,
    target: Target,
    leader: u64,
    session_timeout_ms: u64,
    request_timeout_ms: u64,
) -> anyhow::Result<Vec<Client>> {
    let configs = client_names(count)
        .iter()
        .enumerate()
        .map(|(index, name)| cluster.client_config_for(&target.order(leader, index), name))
        .collect();
    load::connect_pool(configs, session_timeout_ms, request_timeout_ms).await
}

/// Waits for Ctrl-C, SIGTERM or SIGHUP; names the one that came.
async fn terminated() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut interrupt), Ok(mut terminate), Ok(mut hangup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        // Without signal handlers the default actions stay; nothing to wait for.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => "interrupted",
        _ = terminate.recv() => "terminated",
        _ = hangup.recv() => "hung up",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_target_puts_the_home_replica_first_and_every_replica_in_the_order() {
        assert_eq!(Target::Leader.order(2, 0), vec![2, 1, 3]);
        assert_eq!(Target::Leader.order(2, 5), vec![2, 1, 3]);
        assert_eq!(Target::Followers.order(2, 0), vec![1, 2, 3]);
        assert_eq!(Target::Followers.order(2, 1), vec![3, 1, 2]);
        assert_eq!(Target::Followers.order(2, 2), vec![1, 2, 3]);
        assert_eq!(Target::All.order(2, 0), vec![2, 1, 3]);
        assert_eq!(Target::All.order(2, 1), vec![1, 2, 3]);
        assert_eq!(Target::All.order(2, 2), vec![3, 1, 2]);
        assert_eq!(Target::All.order(2, 3), vec![2, 1, 3]);
    }

    #[test]
    fn client_names_are_numbered_and_zero_padded() {
        assert_eq!(client_names(2), vec!["bench-0000", "bench-0001"]);
        assert!(client_names(0).is_empty());
    }
}
