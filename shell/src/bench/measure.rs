//! One workload measured on a cluster: its nodes set up, its sessions
//! opened where it asks, the load run ([`workload::run`]), the sessions
//! closed; and the report, as a table for people or one JSON document.
//!
//! `synod bench write|read|mixed|lock|election|failover` each run one on a
//! fresh cluster of their own; the suite runs many on each of its
//! clusters ([`measure_on`]).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use synod_client::{Client, Consistency, Op};
use tokio::runtime::Runtime;

use super::failover::{self, FailoverFigures, FailoverPlan};
use super::load::{self, SESSION_TIMEOUT_MS};
use super::own_cluster::{self, Target};
use super::workload::{self, LoadFigures, LoadPlan, Operation};
use super::{ClusterArgs, FailoverArgs, LoadArgs, Report};
use crate::cluster::LocalCluster;

/// Where the workloads' key space lives.
const KEYS_ROOT: &str = "/bench-keys";
/// Where creates go, under a directory per run.
const CREATE_ROOT: &str = "/bench-new";
/// Where the locks are.
const LOCKS_ROOT: &str = "/bench-locks";
/// Where the elections are.
const ELECTIONS_ROOT: &str = "/bench-elections";
/// Where the failover writers' nodes are.
const FAILOVER_ROOT: &str = "/bench-failover";

/// Nodes of the key space created at once.
const SETUP_CREATES_IN_FLIGHT: usize = 64;

/// Longest the sessions may take to close after a run.
const CLOSE_TIMEOUT_MS: u64 = 5_000;

/// How reads are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadMode {
    /// Reflects every write acknowledged before it (the default).
    Linearizable,
    /// Reflects at least the revision after the nodes were written.
    AtLeast,
    /// Whatever the replica has applied.
    Sequential,
}

impl ReadMode {
    fn name(self) -> &'static str {
        match self {
            ReadMode::Linearizable => "linearizable",
            ReadMode::AtLeast => "at-least",
            ReadMode::Sequential => "sequential",
        }
    }
}

/// What a workload does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spec {
    /// Sets of existing nodes, or creates of new ones.
    Write {
        /// Creates rather than sets.
        create: bool,
    },
    /// Reads of existing nodes.
    Read {
        /// How they are served.
        consistency: ReadMode,
    },
    /// Reads and sets of the same nodes.
    Mixed {
        /// Percentage of reads.
        read_percent: u64,
        /// How reads are served.
        consistency: ReadMode,
    },
    /// Lock hand-offs.
    Lock {
        /// Locks contended on.
        locks: u64,
    },
    /// Election terms.
    Election {
        /// Elections run in.
        elections: u64,
    },
}

impl Spec {
    /// The workload's name and what kind of it, as in the report.
    fn names(self) -> (&'static str, String) {
        match self {
            Spec::Write { create: false } => ("write", "set".into()),
            Spec::Write { create: true } => ("write", "create".into()),
            Spec::Read { consistency } => ("read", consistency.name().into()),
            Spec::Mixed {
                read_percent,
                consistency,
            } => (
                "mixed",
                format!("{read_percent}% {} reads", consistency.name()),
            ),
            Spec::Lock { locks } => ("lock", format!("{locks} lock(s)")),
            Spec::Election { elections } => ("election", format!("{elections} election(s)")),
        }
    }

    /// Where its sessions attach unless told.
    fn default_target(self) -> Target {
        match self {
            Spec::Read { .. } | Spec::Mixed { .. } => Target::All,
            Spec::Write { .. } | Spec::Lock { .. } | Spec::Election { .. } => Target::Leader,
        }
    }

    /// Whether it reads or writes the key space.
    fn uses_keys(self) -> bool {
        matches!(
            self,
            Spec::Write { create: false } | Spec::Read { .. } | Spec::Mixed { .. }
        )
    }
}

/// What one workload measured, and how it ran.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadReport {
    /// `write`, `read`, `mixed`, `lock` or `election`.
    pub workload: String,
    /// Which kind of it (`set`, `linearizable`, ...).
    pub detail: String,
    /// Clients (sessions).
    pub clients: u64,
    /// Requests in flight per client.
    pub in_flight: u64,
    /// Where the sessions attached.
    pub connect: Target,
    /// Bytes per value.
    pub value_bytes: u64,
    /// Nodes of the key space, when it uses one.
    pub keys: Option<u64>,
    /// Seconds of warm-up.
    pub warmup_secs: u64,
    /// Seconds asked to be measured.
    pub duration_secs: u64,
    /// The leader when it started.
    pub leader: u64,
    /// The figures.
    pub figures: LoadFigures,
}

impl Report for WorkloadReport {
    fn to_text(&self) -> String {
        let mut out = String::new();
        let keys = self
            .keys
            .map(|keys| format!(" over {keys} nodes"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "synod bench {} ({}): {} clients x {} in flight on {} (leader {}), {}-byte values{keys}, \
             {:.1} s measured after {} s of warm-up",
            self.workload,
            self.detail,
            self.clients,
            self.in_flight,
            self.connect.name(),
            self.leader,
            self.value_bytes,
            self.figures.secs,
            self.warmup_secs,
        );
        let _ = write!(out, "{}", figures_table(&self.figures));
        out
    }
}

/// The figures as a table: a row per kind of operation.
pub fn figures_table(figures: &LoadFigures) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<9} {:>10} {:>11} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7}",
        "", "ops", "ops/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "failed"
    );
    for (kind, op) in &figures.by_kind {
        let failed = op.errors.values().sum::<u64>() + op.timeouts;
        let _ = writeln!(
            out,
            "{:<9} {:>10} {:>11.0} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>9.2} {:>7}",
            kind.name(),
            op.ops,
            op.ops_per_sec,
            op.latency.p50_ms,
            op.latency.p90_ms,
            op.latency.p99_ms,
            op.latency.p999_ms,
            op.latency.max_ms,
            failed
        );
        for (error, count) in &op.errors {
            let _ = writeln!(out, "          {count} failed with {error}");
        }
        if op.timeouts > 0 {
            let _ = writeln!(out, "          {} timed out", op.timeouts);
        }
    }
    if figures.by_kind.is_empty() {
        let _ = writeln!(out, "(no operation was measured)");
    }
    out
}

/// Runs `spec` on a fresh cluster of its own.
///
/// # Errors
/// The cluster or the workload's setup failed, or it was interrupted.
pub fn run(
    runtime: &Runtime,
    spec: &Spec,
    load: &LoadArgs,
    cluster_args: &ClusterArgs,
) -> anyhow::Result<WorkloadReport> {
    let clients = usize::try_from(load.clients).context("--clients")?;
    own_cluster::on_fresh_cluster(runtime, cluster_args, None, async |cluster, _kept| {
        let names = own_cluster::client_names(clients);
        let leader = own_cluster::start(cluster, cluster_args.server.as_deref(), &names)
            .await?
            .leader;
        measure_on(cluster, leader, *spec, load).await
    })
}

/// A progress bar on standard error when it is a terminal: the seconds of
/// the run, with what was measured so far as its message.
fn progress_bar(label: &str, seconds: u64) -> ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(seconds), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template(&format!("{label} {{bar:30}} {{pos}}/{{len}} s, {{msg}}"))
    {
        bar.set_style(style);
    }
    bar
}

/// The value each workload writes: `bytes` letters.
fn value(bytes: u64) -> Arc<Vec<u8>> {
    Arc::new((0..bytes).map(|index| b'a' + (index % 26) as u8).collect())
}

/// Runs `spec` on `cluster` (already started, `leader` leading), with
/// sessions of its own, closed afterwards.
///
/// # Errors
/// Its sessions could not be opened, its nodes not created, or a load
/// task failed.
pub async fn measure_on(
    cluster: &LocalCluster,
    leader: u64,
    spec: Spec,
    load: &LoadArgs,
) -> anyhow::Result<WorkloadReport> {
    let clients_count = usize::try_from(load.clients).context("--clients")?;
    let target = load.connect.unwrap_or(spec.default_target());
    let clients = own_cluster::connect_clients(
        cluster,
        clients_count,
        target,
        leader,
        SESSION_TIMEOUT_MS,
        load.request_timeout_ms,
    )
    .await?;
    let outcome = measure_with(&clients, leader, spec, load, target).await;
    load::close_all(clients, Duration::from_millis(CLOSE_TIMEOUT_MS)).await;
    outcome
}

async fn measure_with(
    clients: &[Client],
    leader: u64,
    spec: Spec,
    load: &LoadArgs,
    target: Target,
) -> anyhow::Result<WorkloadReport> {
    let request_timeout = Duration::from_millis(load.request_timeout_ms);
    let data = value(load.value_bytes);
    let (workload, detail) = spec.names();
    eprintln!(
        "bench: {workload} ({detail}): {} clients on {}",
        clients.len(),
        target.name()
    );
    let keys = if spec.uses_keys() {
        let keys: Vec<String> = (0..load.keys)
            .map(|index| format!("{KEYS_ROOT}/k{index:07}"))
            .collect();
        let mut paths = vec![KEYS_ROOT.to_string()];
        paths.extend(keys.iter().cloned());
        load::create_all(
            clients,
            paths,
            data.clone(),
            SETUP_CREATES_IN_FLIGHT,
            request_timeout,
        )
        .await?;
        Arc::new(keys)
    } else {
        Arc::new(Vec::new())
    };
    let operation = match spec {
        Spec::Write { create: false } => Operation::Set {
            keys: keys.clone(),
            data: data.clone(),
        },
        Spec::Write { create: true } => {
            let root = format!("{CREATE_ROOT}/run-{}", run_nonce());
            load::create_all(
                clients,
                vec![CREATE_ROOT.to_string(), root.clone()],
                Arc::new(Vec::new()),
                SETUP_CREATES_IN_FLIGHT,
                request_timeout,
            )
            .await?;
            Operation::Create {
                root: root.into(),
                data: data.clone(),
            }
        }
        Spec::Read { consistency } => Operation::Get {
            keys: keys.clone(),
            consistency: consistency_of(clients, consistency).await?,
        },
        Spec::Mixed {
            read_percent,
            consistency,
        } => Operation::Mixed {
            keys: keys.clone(),
            data: data.clone(),
            read_per_mille: u32::try_from(read_percent * 10).unwrap_or(1000),
            consistency: consistency_of(clients, consistency).await?,
        },
        Spec::Lock { locks } => Operation::Lock {
            paths: Arc::new(
                (0..locks)
                    .map(|index| format!("{LOCKS_ROOT}/lock-{index}"))
                    .collect(),
            ),
        },
        Spec::Election { elections } => Operation::Campaign {
            names: Arc::new(
                (0..elections)
                    .map(|index| format!("{ELECTIONS_ROOT}/election-{index}"))
                    .collect(),
            ),
            value: data.clone(),
        },
    };
    let plan = LoadPlan {
        warmup: Duration::from_secs(load.warmup_secs),
        duration: Duration::from_secs(load.duration_secs),
        ops_max: load.ops,
        in_flight: usize::try_from(load.in_flight).context("--in-flight")?,
        request_timeout,
        seed: load.seed,
    };
    let progress = progress_bar(workload, load.warmup_secs + load.duration_secs);
    let figures = workload::run(clients, Arc::new(operation), &plan, &progress).await;
    progress.finish_and_clear();
    let figures = figures?;
    Ok(WorkloadReport {
        workload: workload.to_string(),
        detail,
        clients: clients.len() as u64,
        in_flight: load.in_flight,
        connect: target,
        value_bytes: load.value_bytes,
        keys: spec.uses_keys().then_some(load.keys),
        warmup_secs: load.warmup_secs,
        duration_secs: load.duration_secs,
        leader,
        figures,
    })
}

/// A name for this run's creates that no earlier run on the cluster used.
fn run_nonce() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos())
}

/// The consistency asked for; `at-least` names the revision the cluster
/// has reached now, after the setup's writes.
async fn consistency_of(clients: &[Client], mode: ReadMode) -> anyhow::Result<Consistency> {
    Ok(match mode {
        ReadMode::Linearizable => Consistency::Linearizable,
        ReadMode::Sequential => Consistency::Sequential,
        ReadMode::AtLeast => {
            let client = clients.first().context("no client")?;
            let response = client
                .request(Op::Sync, None, None)
                .await
                .context("cannot sync for the revision to read at")?;
            Consistency::AtLeast(response.revision)
        }
    })
}

/// What `synod bench failover` measured, and how it ran.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    /// Bytes per value.
    pub value_bytes: u64,
    /// Seconds of writes before the fault.
    pub warmup_secs: u64,
    /// The writers' session timeout.
    pub session_timeout_ms: u64,
    /// The figures.
    pub figures: FailoverFigures,
}

fn shown_ms(value: Option<f64>) -> String {
    value.map_or_else(|| "never".to_string(), |ms| format!("{ms:.0} ms"))
}

impl Report for FailoverReport {
    fn to_text(&self) -> String {
        let figures = &self.figures;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "synod bench failover: {} of the leader (replica {}) under {} writers on it, {} ms \
             session timeout; new leader {}",
            match figures.fault.as_str() {
                "kill" => "SIGKILL",
                _ => "SIGSTOP",
            },
            figures.old_leader,
            figures.writers,
            self.session_timeout_ms,
            figures
                .new_leader
                .map_or_else(|| "unknown".to_string(), |leader| leader.to_string()),
        );
        let _ = writeln!(
            out,
            "first write ok after {}; every writer ok after {} ({} of {} writers)",
            shown_ms(figures.first_write_ok_ms),
            shown_ms(figures.every_writer_ok_ms),
            figures.writers_recovered,
            figures.writers
        );
        let latency = &figures.latency_after;
        let _ = writeln!(
            out,
            "writes sent after the fault: {} ok (p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms), {} \
             failed, {} timed out; {} ok before it",
            figures.writes_after,
            latency.p50_ms,
            latency.p99_ms,
            latency.max_ms,
            figures.errors_after.values().sum::<u64>(),
            figures.timeouts_after,
            figures.writes_before
        );
        for (error, count) in &figures.errors_after {
            let _ = writeln!(out, "  {count} failed with {error}");
        }
        out
    }
}

/// Runs `synod bench failover` on a fresh cluster of its own.
///
/// # Errors
/// The cluster or the writers' setup failed, or it was interrupted.
pub fn run_failover(runtime: &Runtime, args: &FailoverArgs) -> anyhow::Result<FailoverReport> {
    let clients = usize::try_from(args.clients).context("--clients")?;
    own_cluster::on_fresh_cluster(runtime, &args.cluster, None, async |cluster, _kept| {
        let names = own_cluster::client_names(clients);
        let leader = own_cluster::start(cluster, args.cluster.server.as_deref(), &names)
            .await?
            .leader;
        failover_on(cluster, leader, args).await
    })
}

/// Runs the failover benchmark on `cluster` (started, `leader` leading).
///
/// # Errors
/// The writers' sessions or nodes could not be set up, or the leader could
/// not be signalled.
pub async fn failover_on(
    cluster: &mut LocalCluster,
    leader: u64,
    args: &FailoverArgs,
) -> anyhow::Result<FailoverReport> {
    let count = usize::try_from(args.clients).context("--clients")?;
    let clients = own_cluster::connect_clients(
        cluster,
        count,
        Target::Leader,
        leader,
        args.session_timeout_ms,
        args.request_timeout_ms,
    )
    .await?;
    let request_timeout = Duration::from_millis(args.request_timeout_ms);
    let data = value(args.value_bytes);
    let paths: Vec<String> = (0..count)
        .map(|index| format!("{FAILOVER_ROOT}/w{index:04}"))
        .collect();
    let mut setup = vec![FAILOVER_ROOT.to_string()];
    setup.extend(paths.iter().cloned());
    let outcome = async {
        load::create_all(
            &clients,
            setup,
            data.clone(),
            SETUP_CREATES_IN_FLIGHT,
            request_timeout,
        )
        .await?;
        let plan = FailoverPlan {
            fault: args.fault,
            warmup: Duration::from_secs(args.warmup_secs),
            recovery_bound: Duration::from_secs(args.recovery_secs_max),
            request_timeout,
        };
        failover::run(cluster, &clients, &paths, data, leader, &plan).await
    }
    .await;
    load::close_all(clients, Duration::from_millis(CLOSE_TIMEOUT_MS)).await;
    Ok(FailoverReport {
        value_bytes: args.value_bytes,
        warmup_secs: args.warmup_secs,
        session_timeout_ms: args.session_timeout_ms,
        figures: outcome?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workload::{OpFigures, OpKind};

    #[test]
    fn the_table_has_a_row_per_kind_and_names_failures() {
        let mut figures = LoadFigures {
            secs: 2.0,
            ops: 30,
            ops_per_sec: 15.0,
            failed: 3,
            ..LoadFigures::default()
        };
        let mut read = OpFigures {
            ops: 20,
            ops_per_sec: 10.0,
            timeouts: 1,
            ..OpFigures::default()
        };
        read.errors.insert("Unavailable".into(), 2);
        figures.by_kind.insert(OpKind::Read, read);
        figures.by_kind.insert(
            OpKind::Write,
            OpFigures {
                ops: 10,
                ops_per_sec: 5.0,
                ..OpFigures::default()
            },
        );
        let table = figures_table(&figures);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("p99.9 ms"), "{table}");
        assert!(
            lines[1].starts_with("write") || lines[1].starts_with("read"),
            "{table}"
        );
        assert!(table.contains("2 failed with Unavailable"), "{table}");
        assert!(table.contains("1 timed out"), "{table}");
        let read_row = lines
            .iter()
            .find(|line| line.starts_with("read"))
            .expect("read row");
        assert!(read_row.ends_with(" 3"), "{read_row}");
        assert!(figures_table(&LoadFigures::default()).contains("no operation"));
    }

    #[test]
    fn reads_attach_everywhere_and_writes_to_the_leader_by_default() {
        assert_eq!(
            Spec::Read {
                consistency: ReadMode::Sequential
            }
            .default_target(),
            Target::All
        );
        assert_eq!(
            Spec::Write { create: true }.default_target(),
            Target::Leader
        );
        assert!(!Spec::Write { create: true }.uses_keys());
        assert!(Spec::Write { create: false }.uses_keys());
        assert!(!Spec::Lock { locks: 1 }.uses_keys());
    }
}
