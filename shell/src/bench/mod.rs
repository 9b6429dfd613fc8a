//! `synod bench`: benchmarks that start their own local cluster, measure,
//! and print figures (with `--json`, one JSON document).
//!
//! Every benchmark starts three replicas on free loopback ports (never
//! those of `synod dev`) with the default server settings and data on disk
//! ([`own_cluster`]), with a client certificate per benchmark client so
//! that the per-identity bounds of the default settings hold.
//!
//! - `write`, `read`, `mixed`, `lock`, `election`: a closed-loop load
//!   ([`workload`]) of `--clients` sessions with `--in-flight` requests
//!   each, `--warmup-secs` and then `--duration-secs` (or `--ops`); ops/s
//!   and latency percentiles per kind of operation ([`measure`]).
//! - `failover`: steady writers while the leader is killed or paused; the
//!   time to the first successful write and until every writer has
//!   succeeded again ([`failover`]).
//! - `suite`: the standard rows, each on `--repeat` fresh clusters, as a
//!   markdown table of medians ([`suite`]).
//! - `fill`: phases of a large fill, against targets (see `fill.rs`): baseline
//!   steady writes, a fill of many nodes while one replica is stopped,
//!   steady writes at full size, that replica catching up, a follower's
//!   restart; a monitor counts leader changes and samples each replica's
//!   memory throughout.
//!
//! Each exits 0 whatever the figures: it is a measurement. It fails only
//! when the benchmark itself cannot run.
//!
//! Every process it starts is stopped when it ends, on error and on Ctrl-C
//! (or SIGTERM, SIGHUP) too: the cluster is a [`LocalCluster`] guard, and
//! the temporary data directory is removed after the replicas are stopped.
//!
//! [`LocalCluster`]: crate::cluster::LocalCluster

mod failover;
mod fill;
mod load;
mod measure;
mod monitor;
mod own_cluster;
mod report;
mod suite;
mod workload;

use std::path::PathBuf;

use anyhow::{bail, Context};
use tokio::runtime::Runtime;

pub use failover::Fault;
pub use measure::ReadMode;
pub use own_cluster::Target;

/// Largest number of nodes a fill may create.
const NODES_MAX: u64 = 100_000_000;
/// Largest number of sessions or clients.
const SESSIONS_MAX: u64 = 4_096;
/// Largest number of creates in flight per session.
const IN_FLIGHT_MAX: u64 = 1_024;
/// Largest value written.
const DATA_BYTES_MAX: u64 = 1 << 20;
/// Longest steady-write phase, measured load or warm-up.
const STEADY_SECS_MAX: u64 = 3_600;
/// Largest key space of a workload.
const KEYS_MAX: u64 = 10_000_000;
/// Longest per-request timeout.
const REQUEST_TIMEOUT_MS_MAX: u64 = 600_000;
/// Most repetitions of the suite.
const REPEAT_MAX: u64 = 100;

/// Where the search for free ports starts: below Linux's ephemeral range
/// (32768 up), away from `synod dev`'s 7000.
const PORT_SEARCH_FIRST: u16 = 10_000;
/// How far apart the port bases tried are.
const PORT_SEARCH_STEP: u16 = 200;
/// How many port bases are tried from a start spread by the process id.
const PORT_SEARCH_SPREAD: u16 = 50;
/// How many port bases are tried from the first one when those are taken.
const PORT_SEARCH_ATTEMPTS: u16 = 100;

/// `synod bench` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The benchmark to run.
    #[command(subcommand)]
    pub command: BenchCommand,
}

/// The benchmarks.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchCommand {
    /// Writes: sets of existing nodes (or, with --create, creates of new
    /// ones), each client with its requests in flight.
    Write(WriteArgs),
    /// Reads of existing nodes: linearizable, at least a revision, or
    /// sequential.
    Read(ReadArgs),
    /// Reads and writes of the same nodes, in a proportion.
    Mixed(MixedArgs),
    /// Clients contending on a lock: each acquires it, then releases it.
    Lock(LockArgs),
    /// Clients running in an election: each campaigns until elected, then
    /// resigns.
    Election(ElectionArgs),
    /// Steady writes while the leader's process is killed (SIGKILL) or
    /// paused (SIGSTOP): the time to the first successful write and until
    /// every writer has succeeded again.
    Failover(FailoverArgs),
    /// The standard suite (one writer, writes, reads, lock hand-offs and
    /// failovers), each repeated on fresh clusters, as a markdown table of
    /// medians.
    Suite(SuiteArgs),
    /// Fill a fresh 3-replica cluster with many nodes and measure
    /// throughput, latency, memory, catch-up and restart against targets.
    Fill(FillArgs),
}

/// Where a benchmark's own cluster lives and what it runs.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// Where the cluster's certificates, configs, databases and logs live:
    /// an empty or new directory, kept afterwards (default: a new temporary
    /// directory, removed afterwards unless --keep). A benchmark that
    /// starts several clusters puts each in a subdirectory.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Keep the temporary data directory (and say where it is).
    #[arg(long)]
    pub keep: bool,
    /// Peer ports are BASE+1..BASE+3, client ports BASE+101..BASE+103,
    /// HTTP ports (metrics, health) BASE+201..BASE+203 (default: the first
    /// free range from 10000 up).
    #[arg(long, value_name = "BASE")]
    pub port_base: Option<u16>,
    /// The synod-server binary (default: beside this binary; in a source
    /// checkout, built with cargo when missing or older than its sources).
    #[arg(long, env = "SYNOD_SERVER_BIN", value_name = "FILE")]
    pub server: Option<PathBuf>,
}

/// How a workload's load runs: its clients, its time, its values.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Clients, each a session of its own (on a connection of its own, with
    /// a certificate of its own).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=SESSIONS_MAX))]
    pub clients: u64,
    /// Requests each client keeps in flight.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=IN_FLIGHT_MAX))]
    pub in_flight: u64,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=STEADY_SECS_MAX))]
    pub duration_secs: u64,
    /// Stop after this many measured operations (or at --duration-secs,
    /// whichever comes first).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub ops: Option<u64>,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=STEADY_SECS_MAX))]
    pub warmup_secs: u64,
    /// Bytes of each value written (and of each node read).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=DATA_BYTES_MAX))]
    pub value_bytes: u64,
    /// Nodes the reads and writes pick from at random (created first).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=KEYS_MAX))]
    pub keys: u64,
    /// Where the sessions attach (default: the leader for writes, locks
    /// and elections; every replica in turn for reads and mixed).
    #[arg(long, value_enum)]
    pub connect: Option<Target>,
    /// How long one request may wait for its answer.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=REQUEST_TIMEOUT_MS_MAX))]
    pub request_timeout_ms: u64,
    /// Seeds the random choice of nodes (the same seed, the same choices).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// `synod bench write` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct WriteArgs {
    /// Create a new node per write instead of setting existing ones.
    #[arg(long)]
    pub create: bool,
    /// The load.
    #[command(flatten)]
    pub load: LoadArgs,
    /// The benchmark's own cluster.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// `synod bench read` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ReadArgs {
    /// How reads are served.
    #[arg(long, value_enum, default_value_t = ReadMode::Linearizable)]
    pub consistency: ReadMode,
    /// The load.
    #[command(flatten)]
    pub load: LoadArgs,
    /// The benchmark's own cluster.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// `synod bench mixed` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct MixedArgs {
    /// Percentage of the operations that are reads; the rest are sets.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u64).range(0..=100))]
    pub read_percent: u64,
    /// How reads are served.
    #[arg(long, value_enum, default_value_t = ReadMode::Linearizable)]
    pub consistency: ReadMode,
    /// The load.
    #[command(flatten)]
    pub load: LoadArgs,
    /// The benchmark's own cluster.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// `synod bench lock` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LockArgs {
    /// Locks the clients contend on (client i on lock i mod N).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=SESSIONS_MAX))]
    pub locks: u64,
    /// The load.
    #[command(flatten)]
    pub load: LoadArgs,
    /// The benchmark's own cluster.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// `synod bench election` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ElectionArgs {
    /// Elections the clients run in (client i in election i mod N).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=SESSIONS_MAX))]
    pub elections: u64,
    /// The load.
    #[command(flatten)]
    pub load: LoadArgs,
    /// The benchmark's own cluster.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// `synod bench failover` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct FailoverArgs {
    /// How the leader fails: kill (SIGKILL) or stop (SIGSTOP, a hung
    /// process).
    #[arg(long, value_enum, default_value_t = Fault::Kill)]
    pub fault: Fault,
    /// Writers, each setting a node of its own, one request in flight,
    /// each session on the leader.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=SESSIONS_MAX))]
    pub clients: u64,
    /// Seconds of steady writes before the fault.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=STEADY_SECS_MAX))]
    pub warmup_secs: u64,
    /// The longest wait, in seconds, for every writer to succeed again.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=STEADY_SECS_MAX))]
    pub recovery_secs_max: u64,
    /// Bytes of each value written.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=DATA_BYTES_MAX))]
    pub value_bytes: u64,
    /// The writers' session timeout (the client library's default).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=REQUEST_TIMEOUT_MS_MAX))]
    pub session_timeout_ms: u64,
    /// How long one request may wait for its answer.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=REQUEST_TIMEOUT_MS_MAX))]
    pub request_timeout_ms: u64,
    /// The benchmark's own cluster.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// `synod bench suite` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SuiteArgs {
    /// Fresh clusters each row is measured on; the table shows medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=REPEAT_MAX))]
    pub repeat: u64,
    /// Seconds each load row is measured, after its warm-up.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=STEADY_SECS_MAX))]
    pub duration_secs: u64,
    /// Seconds of load before each row is measured (and of writes before
    /// each failover).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=STEADY_SECS_MAX))]
    pub warmup_secs: u64,
    /// Largest client count: rows for more clients are left out (for a
    /// quick run).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=SESSIONS_MAX))]
    pub clients_max: u64,
    /// The benchmark's own clusters.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// `synod bench fill` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct FillArgs {
    /// Nodes to create in the fill.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=NODES_MAX))]
    pub nodes: u64,
    /// Bytes of data per created node and per steady write.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=DATA_BYTES_MAX))]
    pub data_bytes: u64,
    /// Sessions creating nodes in the fill.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=SESSIONS_MAX))]
    pub sessions: u64,
    /// Creates in flight per fill session.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=IN_FLIGHT_MAX))]
    pub in_flight: u64,
    /// Parent nodes the fill's nodes are spread under (created first).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=NODES_MAX))]
    pub parents: u64,
    /// Clients doing steady writes (one request in flight each).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=SESSIONS_MAX))]
    pub clients: u64,
    /// Seconds of each steady-write phase (baseline and full size).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=STEADY_SECS_MAX))]
    pub steady_secs: u64,
    /// Stop a replica before the fill and measure its catch-up after it
    /// (the default).
    #[arg(long, overrides_with = "no_catch_up")]
    pub catch_up: bool,
    /// Keep every replica running through the fill; no catch-up phase.
    #[arg(long, overrides_with = "catch_up")]
    pub no_catch_up: bool,
    /// How long one request may wait for its answer.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub request_timeout_ms: u64,
    /// The fill sends no create after this many seconds.
    #[arg(long, default_value_t = 1_800, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub fill_secs_max: u64,
    /// The catch-up phase gives up after this many seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub catch_up_secs_max: u64,
    /// The benchmark's own cluster.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

impl FillArgs {
    /// Whether the catch-up phase runs.
    pub fn catch_up_enabled(&self) -> bool {
        !self.no_catch_up
    }
}

/// Runs `synod bench`; `json` prints the report as one JSON document.
///
/// # Errors
/// The benchmark could not run: the cluster could not be set up, started
/// or reached, a phase could not complete its setup, or it was interrupted
/// ([`crate::commands::Interrupted`]).
pub fn run(runtime: &Runtime, args: &BenchArgs, json: bool) -> anyhow::Result<()> {
    match &args.command {
        BenchCommand::Write(write) => {
            let spec = measure::Spec::Write {
                create: write.create,
            };
            print(
                &measure::run(runtime, &spec, &write.load, &write.cluster)?,
                json,
            )
        }
        BenchCommand::Read(read) => {
            let spec = measure::Spec::Read {
                consistency: read.consistency,
            };
            print(
                &measure::run(runtime, &spec, &read.load, &read.cluster)?,
                json,
            )
        }
        BenchCommand::Mixed(mixed) => {
            let spec = measure::Spec::Mixed {
                read_percent: mixed.read_percent,
                consistency: mixed.consistency,
            };
            print(
                &measure::run(runtime, &spec, &mixed.load, &mixed.cluster)?,
                json,
            )
        }
        BenchCommand::Lock(lock) => {
            let spec = measure::Spec::Lock { locks: lock.locks };
            print(
                &measure::run(runtime, &spec, &lock.load, &lock.cluster)?,
                json,
            )
        }
        BenchCommand::Election(election) => {
            let spec = measure::Spec::Election {
                elections: election.elections,
            };
            let report = measure::run(runtime, &spec, &election.load, &election.cluster)?;
            print(&report, json)
        }
        BenchCommand::Failover(failover) => print(&measure::run_failover(runtime, failover)?, json),
        BenchCommand::Suite(suite_args) => print(&suite::run(runtime, suite_args)?, json),
        BenchCommand::Fill(fill_args) => run_fill(runtime, fill_args, json),
    }
}

/// A report printed as text for people or as one JSON document.
trait Report: serde::Serialize {
    /// The report as text.
    fn to_text(&self) -> String;
}

fn print(report: &impl Report, json: bool) -> anyhow::Result<()> {
    if json {
        let text = serde_json::to_string(report).context("cannot write the report as JSON")?;
        say!("{text}");
    } else {
        for line in report.to_text().lines() {
            say!("{line}");
        }
    }
    Ok(())
}

fn run_fill(runtime: &Runtime, args: &FillArgs, json: bool) -> anyhow::Result<()> {
    if args.parents > args.nodes {
        bail!(
            "--parents {} is more than --nodes {}",
            args.parents,
            args.nodes
        );
    }
    let report =
        own_cluster::on_fresh_cluster(runtime, &args.cluster, None, async |cluster, kept| {
            fill::run(cluster, args, kept).await
        })?;
    print(&report, json)
}
