//! `synod bench`: benchmarks that start their own local cluster, measure,
//! and print figures against targets.
//!
//! `synod bench fill` starts three replicas on free loopback ports (never
//! those of `synod dev`) with the default server settings and data on disk,
//! then runs its phases (see `fill.rs`): baseline steady writes, a fill of
//! many nodes while one replica is stopped, steady writes at full size, that
//! replica catching up, a follower's restart; a monitor counts leader
//! changes and samples each replica's memory throughout. It prints a report
//! (or, with `--json`, one JSON document) and exits 0 even when targets are
//! missed: it is a measurement. It fails only when the benchmark itself
//! cannot run.
//!
//! Every process it starts is stopped when it ends, on error and on Ctrl-C
//! (or SIGTERM, SIGHUP) too: the cluster is a [`LocalCluster`] guard, and
//! the temporary data directory is removed after the replicas are stopped.

mod fill;
mod load;
mod monitor;
mod report;

use std::path::PathBuf;

use anyhow::{bail, Context};
use tokio::runtime::Runtime;

use crate::cluster::{self, LocalCluster, Notices};
use crate::commands::Interrupted;

/// Largest number of nodes a fill may create.
const NODES_MAX: u64 = 100_000_000;
/// Largest number of sessions or clients.
const SESSIONS_MAX: u64 = 4_096;
/// Largest number of creates in flight per session.
const IN_FLIGHT_MAX: u64 = 1_024;
/// Largest value written.
const DATA_BYTES_MAX: u64 = 1 << 20;
/// Longest steady-write phase.
const STEADY_SECS_MAX: u64 = 3_600;

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
    /// Fill a fresh 3-replica cluster with many nodes and measure
    /// throughput, latency, memory, catch-up and restart against targets.
    Fill(FillArgs),
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
    /// Where the cluster's certificates, configs, databases and logs live:
    /// an empty or new directory, kept afterwards (default: a new temporary
    /// directory, removed afterwards unless --keep).
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
/// ([`Interrupted`]).
pub fn run(runtime: &Runtime, args: &BenchArgs, json: bool) -> anyhow::Result<()> {
    match &args.command {
        BenchCommand::Fill(fill_args) => run_fill(runtime, fill_args, json),
    }
}

fn run_fill(runtime: &Runtime, args: &FillArgs, json: bool) -> anyhow::Result<()> {
    if args.parents > args.nodes {
        bail!(
            "--parents {} is more than --nodes {}",
            args.parents,
            args.nodes
        );
    }
    let (data, temporary) = match &args.data {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let empty = std::fs::read_dir(dir)
                .with_context(|| format!("cannot read {}", dir.display()))?
                .next()
                .is_none();
            if !empty {
                bail!(
                    "{} is not empty: the benchmark needs a fresh cluster; give a new or empty \
                     --data directory",
                    dir.display()
                );
            }
            let data = dir
                .canonicalize()
                .with_context(|| format!("cannot resolve {}", dir.display()))?;
            (data, None)
        }
        None => {
            let temporary = tempfile::Builder::new()
                .prefix("synod-bench-")
                .tempdir()
                .context("cannot make a temporary data directory")?;
            let data = temporary
                .path()
                .canonicalize()
                .context("cannot resolve the temporary data directory")?;
            (data, Some(temporary))
        }
    };
    let kept = temporary.is_none() || args.keep;
    let port_base = match args.port_base {
        Some(base) if cluster::port_base_fits(base) => base,
        Some(base) => bail!("--port-base {base} leaves no room for the HTTP ports (base + 203)"),
        None => {
            // Start where this process's id says, so that benchmarks started
            // together look at different ranges first.
            let spread = (std::process::id() % u32::from(PORT_SEARCH_SPREAD)) as u16;
            let first = PORT_SEARCH_FIRST + spread * PORT_SEARCH_STEP;
            cluster::free_port_base(first, PORT_SEARCH_STEP, PORT_SEARCH_SPREAD).or_else(|_| {
                cluster::free_port_base(PORT_SEARCH_FIRST, PORT_SEARCH_STEP, PORT_SEARCH_ATTEMPTS)
            })?
        }
    };
    let outcome = {
        let mut cluster = LocalCluster::new(&data, port_base, "synod-bench", Notices::Stderr);
        cluster.set_data_kept(kept);
        let outcome = runtime.block_on(async {
            tokio::select! {
                report = fill::run(&mut cluster, args, kept) => report,
                signal = terminated() => {
                    eprintln!("bench: {signal}; stopping the replicas");
                    Err(Interrupted.into())
                }
            }
        });
        // Stops every replica still running before the directory goes.
        drop(cluster);
        outcome
    };
    match temporary {
        Some(temporary) if args.keep => {
            let path = temporary.keep();
            eprintln!("bench: data kept in {}", path.display());
        }
        Some(temporary) => {
            if let Err(error) = temporary.close() {
                eprintln!("bench: cannot remove {}: {error}", data.display());
            }
        }
        None => {}
    }
    let report = outcome?;
    if json {
        let text = serde_json::to_string(&report).context("cannot write the report as JSON")?;
        say!("{text}");
    } else {
        for line in report.to_text().lines() {
            say!("{line}");
        }
    }
    Ok(())
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
