//! The closed-loop load behind `synod bench write|read|mixed|lock|election`
//! and the suite: clients, each running `in_flight` tasks that send one
//! operation after another, for a warm-up and then a measured time (or a
//! measured number of operations, whichever comes first).
//!
//! Only operations sent after the warm-up are counted; each is timed from
//! the call to its answer, into a histogram per kind of operation (a
//! `mixed` run reports its reads and writes apart). Refusals and failures
//! are counted by kind, timeouts apart; nothing is retried by the load
//! itself (the client library resends across failovers as it always does).
//! Every task stops at the deadline; an operation still in flight then is
//! bounded by the request timeout.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use synod_client::{Client, ClientError, Consistency, CreateMode};
use tokio::task::JoinSet;

use super::load::{bounded, histogram, kind_name, record, Outcome, REFUSAL_PAUSE_MS};
use super::report::{ratio, Latency};

/// How often the progress bar is brought up to date.
const PROGRESS_INTERVAL_MS: u64 = 200;

/// What one operation of the load does.
#[derive(Debug, Clone)]
pub enum Operation {
    /// Sets a node picked at random from `keys` to `data`.
    Set {
        /// The nodes (they exist).
        keys: Arc<Vec<String>>,
        /// The value.
        data: Arc<Vec<u8>>,
    },
    /// Creates a new persistent node under `root` with `data`.
    Create {
        /// The parent (it exists), unique to this run.
        root: Arc<str>,
        /// The value.
        data: Arc<Vec<u8>>,
    },
    /// Reads a node picked at random from `keys`.
    Get {
        /// The nodes (they exist).
        keys: Arc<Vec<String>>,
        /// How the read is served.
        consistency: Consistency,
    },
    /// Reads (`read_per_mille` of the operations) or sets a node picked at
    /// random from `keys`.
    Mixed {
        /// The nodes (they exist).
        keys: Arc<Vec<String>>,
        /// The value set.
        data: Arc<Vec<u8>>,
        /// Reads among a thousand operations.
        read_per_mille: u32,
        /// How reads are served.
        consistency: Consistency,
    },
    /// Acquires and releases an exclusive lock: client `i` contends on
    /// `paths[i % paths.len()]`. One operation is one hand-off.
    Lock {
        /// The locks.
        paths: Arc<Vec<String>>,
    },
    /// Campaigns in an election until elected, then resigns: client `i`
    /// runs in `names[i % names.len()]`. One operation is one term.
    Campaign {
        /// The elections.
        names: Arc<Vec<String>>,
        /// Each candidate's value.
        value: Arc<Vec<u8>>,
    },
}

/// The kind of an operation, measured apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// A set of an existing node.
    Write,
    /// A create of a new node.
    Create,
    /// A read.
    Read,
    /// A lock acquired and released.
    Lock,
    /// A term won and resigned.
    Election,
}

impl OpKind {
    /// The kind's name, as in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Write => "write",
            OpKind::Create => "create",
            OpKind::Read => "read",
            OpKind::Lock => "lock",
            OpKind::Election => "election",
        }
    }
}

/// One load task's own state.
struct Worker {
    client_index: usize,
    task_index: usize,
    rng: StdRng,
    created: u64,
}

fn pick<'a>(keys: &'a [String], rng: &mut StdRng) -> &'a str {
    match keys.len() {
        0 => "/",
        len => &keys[rng.random_range(0..len)],
    }
}

async fn set(
    client: &Client,
    keys: &[String],
    data: &[u8],
    worker: &mut Worker,
) -> Result<(), ClientError> {
    let key = pick(keys, &mut worker.rng);
    client.set(key, data, None).await.map(drop)
}

async fn get(
    client: &Client,
    keys: &[String],
    consistency: Consistency,
    worker: &mut Worker,
) -> Result<(), ClientError> {
    let key = pick(keys, &mut worker.rng);
    client.get_with(key, Some(consistency)).await.map(drop)
}

fn of_index(names: &[String], index: usize) -> &str {
    match names.len() {
        0 => "/",
        len => &names[index % len],
    }
}

impl Operation {
    /// The kind of the next operation (a `mixed` load draws it).
    fn next_kind(&self, worker: &mut Worker) -> OpKind {
        match self {
            Operation::Set { .. } => OpKind::Write,
            Operation::Create { .. } => OpKind::Create,
            Operation::Get { .. } => OpKind::Read,
            Operation::Mixed { read_per_mille, .. } => {
                if worker.rng.random_range(0..1000) < *read_per_mille {
                    OpKind::Read
                } else {
                    OpKind::Write
                }
            }
            Operation::Lock { .. } => OpKind::Lock,
            Operation::Campaign { .. } => OpKind::Election,
        }
    }

    /// Runs one operation of `kind` (from [`Operation::next_kind`])
    /// through `client`.
    async fn once(
        &self,
        kind: OpKind,
        client: &Client,
        worker: &mut Worker,
    ) -> Result<(), ClientError> {
        match self {
            Operation::Set { keys, data } => set(client, keys, data, worker).await,
            Operation::Get { keys, consistency } => get(client, keys, *consistency, worker).await,
            Operation::Mixed {
                keys,
                data,
                consistency,
                ..
            } => match kind {
                OpKind::Read => get(client, keys, *consistency, worker).await,
                _ => set(client, keys, data, worker).await,
            },
            Operation::Create { root, data } => {
                let path = format!(
                    "{root}/c{:04}-{:03}-{}",
                    worker.client_index, worker.task_index, worker.created
                );
                worker.created += 1;
                client
                    .create(&path, data, CreateMode::Persistent)
                    .await
                    .map(drop)
            }
            Operation::Lock { paths } => {
                let path = of_index(paths, worker.client_index);
                client.lock(path).await?.release().await
            }
            Operation::Campaign { names, value } => {
                let name = of_index(names, worker.client_index);
                client.campaign(name, value).await?.resign().await
            }
        }
    }
}

/// How long a load runs and how each request is bounded.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    /// Load before measuring.
    pub warmup: Duration,
    /// The measured time.
    pub duration: Duration,
    /// At most this many operations are measured, when given.
    pub ops_max: Option<u64>,
    /// Requests each client keeps in flight.
    pub in_flight: usize,
    /// The per-request timeout.
    pub request_timeout: Duration,
    /// Seeds the random choices; task `t` of client `c` uses its own
    /// stream derived from it, so a run can be repeated.
    pub seed: u64,
}

/// Figures of one kind of operation.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OpFigures {
    /// Operations that succeeded.
    pub ops: u64,
    /// Successful operations per measured second.
    pub ops_per_sec: f64,
    /// Latency of the successful operations.
    pub latency: Latency,
    /// Failed operations by error kind (timeouts apart).
    pub errors: BTreeMap<String, u64>,
    /// Operations without an answer within the request timeout.
    pub timeouts: u64,
}

/// What a load measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LoadFigures {
    /// Seconds measured: from the warm-up's end until the last task ended.
    pub secs: f64,
    /// Successful operations of every kind.
    pub ops: u64,
    /// Those per measured second.
    pub ops_per_sec: f64,
    /// Failed operations of every kind, timeouts included.
    pub failed: u64,
    /// Each kind of operation.
    pub by_kind: BTreeMap<OpKind, OpFigures>,
}

/// One task's counts of one kind of operation.
struct Tally {
    ok: u64,
    timeouts: u64,
    errors: BTreeMap<String, u64>,
    latencies: Histogram<u64>,
}

impl Tally {
    fn new() -> anyhow::Result<Tally> {
        Ok(Tally {
            ok: 0,
            timeouts: 0,
            errors: BTreeMap::new(),
            latencies: histogram()?,
        })
    }

    fn merge(&mut self, other: Tally) -> anyhow::Result<()> {
        self.ok += other.ok;
        self.timeouts += other.timeouts;
        for (kind, count) in other.errors {
            *self.errors.entry(kind).or_default() += count;
        }
        self.latencies
            .add(&other.latencies)
            .context("cannot merge latency histograms")
    }
}

/// State the load's tasks share.
struct Shared {
    /// Measured operations answered so far, for the progress bar.
    answered: AtomicU64,
    /// Measured operations sent so far, against [`LoadPlan::ops_max`].
    claimed: AtomicU64,
}

/// Runs `operation` from every client as `plan` says, showing progress on
/// `progress` (its length the warm-up and measured seconds), and sums up
/// what was measured.
///
/// # Errors
/// A task failed (panicked), or a histogram could not be made.
pub async fn run(
    clients: &[Client],
    operation: Arc<Operation>,
    plan: &LoadPlan,
    progress: &ProgressBar,
) -> anyhow::Result<LoadFigures> {
    let shared = Arc::new(Shared {
        answered: AtomicU64::new(0),
        claimed: AtomicU64::new(0),
    });
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let deadline = measure_from + plan.duration;
    let mut tasks = JoinSet::new();
    for (client_index, client) in clients.iter().enumerate() {
        for task_index in 0..plan.in_flight.max(1) {
            let client = client.clone();
            let operation = operation.clone();
            let shared = shared.clone();
            let timeout = plan.request_timeout;
            let ops_max = plan.ops_max;
            let stream = (client_index as u64) << 20 | task_index as u64;
            let mut worker = Worker {
                client_index,
                task_index,
                rng: StdRng::seed_from_u64(plan.seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                created: 0,
            };
            tasks.spawn(async move {
                let mut tallies: BTreeMap<OpKind, Tally> = BTreeMap::new();
                loop {
                    let sent = Instant::now();
                    if sent >= deadline {
                        break;
                    }
                    let measured = sent >= measure_from;
                    if measured
                        && ops_max.is_some_and(|max| {
                            shared.claimed.fetch_add(1, Ordering::Relaxed) >= max
                        })
                    {
                        break;
                    }
                    let kind = operation.next_kind(&mut worker);
                    let outcome =
                        bounded(timeout, operation.once(kind, &client, &mut worker)).await;
                    let refused = matches!(outcome, Outcome::Failed(_));
                    if measured {
                        let tally = match tallies.entry(kind) {
                            std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
                            std::collections::btree_map::Entry::Vacant(entry) => {
                                entry.insert(Tally::new()?)
                            }
                        };
                        match outcome {
                            Outcome::Ok => {
                                tally.ok += 1;
                                record(&mut tally.latencies, sent.elapsed());
                            }
                            Outcome::TimedOut => tally.timeouts += 1,
                            Outcome::Failed(error) => {
                                *tally.errors.entry(kind_name(error)).or_default() += 1;
                            }
                        }
                        shared.answered.fetch_add(1, Ordering::Relaxed);
                    }
                    if refused {
                        tokio::time::sleep(Duration::from_millis(REFUSAL_PAUSE_MS)).await;
                    }
                }
                anyhow::Ok(tallies)
            });
        }
    }
    let mut tallies: BTreeMap<OpKind, Tally> = BTreeMap::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(PROGRESS_INTERVAL_MS));
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(joined) => {
                    for (kind, tally) in joined.context("a load task failed")?? {
                        match tallies.entry(kind) {
                            std::collections::btree_map::Entry::Occupied(mut entry) => {
                                entry.get_mut().merge(tally)?;
                            }
                            std::collections::btree_map::Entry::Vacant(entry) => {
                                entry.insert(tally);
                            }
                        }
                    }
                }
                None => break,
            },
            _ = ticker.tick() => {
                let now = Instant::now();
                progress.set_position(now.duration_since(start).as_secs());
                let answered = shared.answered.load(Ordering::Relaxed);
                let measured_secs = now.saturating_duration_since(measure_from).as_secs_f64();
                if measured_secs > 0.0 {
                    progress.set_message(format!(
                        "{answered} ops measured, {:.0}/s",
                        answered as f64 / measured_secs
                    ));
                } else {
                    progress.set_message("warming up");
                }
            }
        }
    }
    let secs = Instant::now()
        .saturating_duration_since(measure_from)
        .as_secs_f64();
    let mut figures = LoadFigures {
        secs,
        ..LoadFigures::default()
    };
    for (kind, tally) in tallies {
        let failed = tally.errors.values().sum::<u64>() + tally.timeouts;
        figures.ops += tally.ok;
        figures.failed += failed;
        figures.by_kind.insert(
            kind,
            OpFigures {
                ops: tally.ok,
                ops_per_sec: ratio(tally.ok as f64, secs),
                latency: Latency::of(&tally.latencies),
                errors: tally.errors,
                timeouts: tally.timeouts,
            },
        );
    }
    figures.ops_per_sec = ratio(figures.ops as f64, secs);
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_stay_in_the_key_space_and_cover_it() {
        let keys: Vec<String> = (0..4).map(|index| format!("/k{index}")).collect();
        let mut rng = StdRng::seed_from_u64(7);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            seen.insert(pick(&keys, &mut rng).to_string());
        }
        assert_eq!(seen.len(), 4);
        assert_eq!(pick(&[], &mut rng), "/");
        assert_eq!(of_index(&keys, 5), "/k1");
    }

    #[test]
    fn tallies_merge_counts_errors_and_latencies() {
        let mut first = Tally::new().expect("tally");
        first.ok = 2;
        first.timeouts = 1;
        first.errors.insert("NoNode".into(), 1);
        record(&mut first.latencies, Duration::from_millis(1));
        let mut second = Tally::new().expect("tally");
        second.ok = 3;
        second.errors.insert("NoNode".into(), 2);
        second.errors.insert("Unavailable".into(), 1);
        record(&mut second.latencies, Duration::from_millis(3));
        first.merge(second).expect("merge");
        assert_eq!(first.ok, 5);
        assert_eq!(first.timeouts, 1);
        assert_eq!(first.errors["NoNode"], 3);
        assert_eq!(first.errors["Unavailable"], 1);
        assert_eq!(first.latencies.len(), 2);
    }
}
