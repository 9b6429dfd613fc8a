//! `synod bench failover`: steady writers on a local cluster, then the
//! leader's process is killed (SIGKILL, a crash) or paused (SIGSTOP, a hung
//! process whose sockets stay open), and the benchmark times how long the
//! cluster takes to take writes again.
//!
//! Each writer sets a node of its own, one request in flight. The clock
//! starts once the signal has been delivered. A writer has recovered when
//! a write it sent after that instant succeeds; "first write" is the
//! earliest such answer among the writers, "every writer" the latest (a
//! writer with a write stuck on the old leader sends its next one only
//! when the client library has resolved that one, by resending it to the
//! new leader or failing it, which is what an application sees). Writes
//! sent before the signal and answered after it are not counted: their
//! answers may have been on the way already.
//!
//! A paused leader is let run again once every writer has recovered (or
//! the time bound passed), and rejoins as a follower.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use synod_client::Client;
use tokio::task::JoinSet;

use super::load::{bounded, histogram, kind_name, record, Outcome, REFUSAL_PAUSE_MS};
use super::own_cluster::current_leader;
use super::report::{millis, Latency};
use crate::cluster::LocalCluster;

/// How often the benchmark looks whether every writer has recovered.
const RECOVERY_POLL_MS: u64 = 10;

/// How the leader fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// SIGKILL: the process dies at once; its connections close.
    Kill,
    /// SIGSTOP: the process hangs with its connections open.
    Stop,
}

impl Fault {
    /// The fault's name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Stop => "stop",
        }
    }
}

/// How the failover benchmark runs.
#[derive(Debug, Clone)]
pub struct FailoverPlan {
    /// How the leader fails.
    pub fault: Fault,
    /// Steady writes before the fault.
    pub warmup: Duration,
    /// The longest the benchmark waits for every writer after the fault.
    pub recovery_bound: Duration,
    /// The per-request timeout.
    pub request_timeout: Duration,
}

/// What the failover benchmark measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FailoverFigures {
    /// How the leader failed (`kill` or `stop`).
    pub fault: String,
    /// The leader that failed.
    pub old_leader: u64,
    /// The leader afterwards, as a recovered writer's replica names it.
    pub new_leader: Option<u64>,
    /// Writers.
    pub writers: u64,
    /// Writes that succeeded before the fault (in the warm-up).
    pub writes_before: u64,
    /// Milliseconds from the fault to the first successful write sent
    /// after it.
    pub first_write_ok_ms: Option<f64>,
    /// Milliseconds from the fault until every writer had a write sent
    /// after it succeed.
    pub every_writer_ok_ms: Option<f64>,
    /// Writers that had, within the bound.
    pub writers_recovered: u64,
    /// Successful writes sent after the fault.
    pub writes_after: u64,
    /// Latency of the writes sent after the fault.
    pub latency_after: Latency,
    /// Failed writes sent after the fault, by error kind.
    pub errors_after: BTreeMap<String, u64>,
    /// Writes sent after the fault without an answer in time.
    pub timeouts_after: u64,
}

/// State the writers share.
struct Shared {
    /// When the fault was delivered.
    fault_at: OnceLock<Instant>,
    /// Writers that have had a write sent after the fault succeed.
    recovered: AtomicU64,
    stop: AtomicBool,
}

/// One writer's counts.
struct WriterTally {
    before: u64,
    recovered_at: Option<Instant>,
    after: u64,
    timeouts_after: u64,
    errors_after: BTreeMap<String, u64>,
    latencies_after: hdrhistogram::Histogram<u64>,
}

/// Runs the writers (`clients[i]` sets `paths[i]` to `data`), fails the
/// leader `leader` of `cluster` after the warm-up, and measures the
/// recovery.
///
/// # Errors
/// The leader could not be signalled, or a writer task failed.
pub async fn run(
    cluster: &mut LocalCluster,
    clients: &[Client],
    paths: &[String],
    data: Arc<Vec<u8>>,
    leader: u64,
    plan: &FailoverPlan,
) -> anyhow::Result<FailoverFigures> {
    let shared = Arc::new(Shared {
        fault_at: OnceLock::new(),
        recovered: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let mut writers = JoinSet::new();
    for (client, path) in clients.iter().zip(paths) {
        let client = client.clone();
        let path = path.clone();
        let data = data.clone();
        let shared = shared.clone();
        let timeout = plan.request_timeout;
        let mut tally = WriterTally {
            before: 0,
            recovered_at: None,
            after: 0,
            timeouts_after: 0,
            errors_after: BTreeMap::new(),
            latencies_after: histogram()?,
        };
        writers.spawn(async move {
            while !shared.stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let after_fault = shared.fault_at.get().is_some_and(|&at| sent >= at);
                let outcome = bounded(timeout, client.set(&path, &data, None)).await;
                let answered = Instant::now();
                match (outcome, after_fault) {
                    (Outcome::Ok, false) => tally.before += 1,
                    (Outcome::Ok, true) => {
                        tally.after += 1;
                        if tally.recovered_at.is_none() {
                            tally.recovered_at = Some(answered);
                            shared.recovered.fetch_add(1, Ordering::Relaxed);
                        }
                        record(&mut tally.latencies_after, answered - sent);
                    }
                    (Outcome::TimedOut, true) => tally.timeouts_after += 1,
                    (Outcome::Failed(kind), true) => {
                        *tally.errors_after.entry(kind_name(kind)).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(REFUSAL_PAUSE_MS)).await;
                    }
                    (Outcome::Failed(_), false) => {
                        tokio::time::sleep(Duration::from_millis(REFUSAL_PAUSE_MS)).await;
                    }
                    (Outcome::TimedOut, false) => {}
                }
            }
            tally
        });
    }
    tokio::time::sleep(plan.warmup).await;
    eprintln!(
        "bench: failover: {} the leader, replica {leader}",
        match plan.fault {
            Fault::Kill => "killing (SIGKILL)",
            Fault::Stop => "pausing (SIGSTOP)",
        }
    );
    match plan.fault {
        Fault::Kill => tokio::task::block_in_place(|| cluster.kill_replica(leader))?,
        Fault::Stop => cluster.set_paused(leader, true)?,
    }
    let fault_at = Instant::now();
    let _ = shared.fault_at.set(fault_at);
    let outcome = wait_for_recovery(
        &mut writers,
        &shared,
        clients.len() as u64,
        fault_at + plan.recovery_bound,
    )
    .await;
    if plan.fault == Fault::Stop {
        cluster.set_paused(leader, false)?;
    }
    let tallies = outcome?;
    let mut figures = FailoverFigures {
        fault: plan.fault.name().to_string(),
        old_leader: leader,
        writers: clients.len() as u64,
        ..FailoverFigures::default()
    };
    let mut latencies = histogram()?;
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    for tally in &tallies {
        figures.writes_before += tally.before;
        figures.writes_after += tally.after;
        figures.timeouts_after += tally.timeouts_after;
        for (kind, count) in &tally.errors_after {
            *figures.errors_after.entry(kind.clone()).or_default() += count;
        }
        latencies
            .add(&tally.latencies_after)
            .context("cannot merge latency histograms")?;
        if let Some(at) = tally.recovered_at {
            figures.writers_recovered += 1;
            first = Some(first.map_or(at, |first| first.min(at)));
            last = Some(last.map_or(at, |last| last.max(at)));
        }
    }
    figures.latency_after = Latency::of(&latencies);
    figures.first_write_ok_ms = first.map(|at| millis(at - fault_at));
    if figures.writers_recovered == figures.writers {
        figures.every_writer_ok_ms = last.map(|at| millis(at - fault_at));
    }
    for client in clients {
        if let Ok(new_leader) = current_leader(client).await {
            figures.new_leader = Some(new_leader);
            break;
        }
    }
    Ok(figures)
}

/// Waits until all `writers_count` writers have recovered or `deadline`
/// has passed, then stops the writers and collects their tallies (each
/// ends once its request in flight is answered or times out).
async fn wait_for_recovery(
    writers: &mut JoinSet<WriterTally>,
    shared: &Shared,
    writers_count: u64,
    deadline: Instant,
) -> anyhow::Result<Vec<WriterTally>> {
    while shared.recovered.load(Ordering::Relaxed) < writers_count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(RECOVERY_POLL_MS)).await;
    }
    shared.stop.store(true, Ordering::Relaxed);
    let mut tallies = Vec::with_capacity(writers.len());
    while let Some(joined) = writers.join_next().await {
        tallies.push(joined.context("a writer failed")?);
    }
    Ok(tallies)
}
