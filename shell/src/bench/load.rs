//! The load: a pool of sessions, steady writes (one `set` in flight per
//! client, each on its own node) and the fill (creates from many sessions,
//! many in flight per session), with latencies in histograms and every
//! outcome counted: successes, failures by kind, and timeouts apart.
//!
//! Every loop is bounded in count (the nodes to create) and in time (a
//! deadline), and every request by the request timeout.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use synod_client::{Client, ClientError, CreateMode, ErrorKind};
use tokio::task::JoinSet;

use super::report::{Latency, Slice, SteadyResult};
use crate::connect::ClientConfig;

/// Highest latency a histogram records, in microseconds (longer ones are
/// recorded as this).
const LATENCY_MAX_US: u64 = 600_000_000;

/// Sessions opened at once when the pool connects.
const CONNECTS_IN_FLIGHT_MAX: usize = 16;

/// Longest a pool session may take to open.
const CONNECT_TIMEOUT_MS: u64 = 20_000;

/// A load session's timeout: long enough that a loaded machine's delayed
/// keep-alives never expire it.
pub const SESSION_TIMEOUT_MS: u64 = 30_000;

/// Beyond the request timeout, how long the bench itself waits for an
/// answer before counting the request as timed out (the client's own
/// timeout should fire first).
const TIMEOUT_MARGIN_MS: u64 = 2_000;

/// A refused request comes back at once: a load waits this long before its
/// next, so a refusing cluster is not spun on.
pub const REFUSAL_PAUSE_MS: u64 = 10;

/// A new latency histogram, in microseconds.
///
/// # Errors
/// Never for these bounds; kept as an error rather than a panic.
pub fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).context("cannot make a latency histogram")
}

/// Records `elapsed` in a histogram of microseconds, clamped to its bounds.
pub fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(micros.clamp(1, LATENCY_MAX_US));
}

/// The outcome of one request.
pub enum Outcome {
    /// It succeeded.
    Ok,
    /// No answer came in time.
    TimedOut,
    /// It failed, or was refused.
    Failed(ErrorKind),
}

/// Runs `request` within `timeout` (plus a margin) and sorts its outcome.
pub async fn bounded<T>(
    timeout: Duration,
    request: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Outcome {
    match tokio::time::timeout(timeout + Duration::from_millis(TIMEOUT_MARGIN_MS), request).await {
        Ok(Ok(_)) => Outcome::Ok,
        Ok(Err(error)) if error.kind() == ErrorKind::Timeout => Outcome::TimedOut,
        Ok(Err(error)) => Outcome::Failed(error.kind()),
        Err(_) => Outcome::TimedOut,
    }
}

/// An error kind's name, as counted in the reports.
pub fn kind_name(kind: ErrorKind) -> String {
    format!("{kind:?}")
}

/// Opens one session per config, [`CONNECTS_IN_FLIGHT_MAX`] at a time, in
/// the configs' order.
///
/// # Errors
/// A session could not be opened in time.
pub async fn connect_pool(
    configs: Vec<ClientConfig>,
    session_timeout_ms: u64,
    request_timeout_ms: u64,
) -> anyhow::Result<Vec<Client>> {
    let mut clients: Vec<Option<Client>> = vec![None; configs.len()];
    let mut pending = configs.into_iter().enumerate();
    let mut connecting = JoinSet::new();
    loop {
        while connecting.len() < CONNECTS_IN_FLIGHT_MAX {
            let Some((index, config)) = pending.next() else {
                break;
            };
            connecting.spawn(async move {
                let builder = Client::builder()
                    .endpoints(config.endpoints.clone())
                    .tls(config.tls())
                    .session_timeout_ms(session_timeout_ms)
                    .request_timeout_ms(request_timeout_ms);
                let connected = tokio::time::timeout(
                    Duration::from_millis(CONNECT_TIMEOUT_MS),
                    builder.connect(),
                )
                .await;
                (index, config, connected)
            });
        }
        let Some(joined) = connecting.join_next().await else {
            break;
        };
        let (index, config, connected) = joined.context("a connecting task failed")?;
        let client = match connected {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => {
                return Err(error).with_context(|| {
                    format!("cannot open a session with {}", config.endpoints.join(", "))
                })
            }
            Err(_) => bail!(
                "no session with {} within {CONNECT_TIMEOUT_MS} ms",
                config.endpoints.join(", ")
            ),
        };
        if let Some(slot) = clients.get_mut(index) {
            *slot = Some(client);
        }
    }
    clients
        .into_iter()
        .map(|client| client.context("a pool session is missing"))
        .collect()
}

/// Closes every client, at most [`CONNECTS_IN_FLIGHT_MAX`] at a time and
/// within `timeout` in all.
pub async fn close_all(clients: Vec<Client>, timeout: Duration) {
    let closing = async {
        let mut set = JoinSet::new();
        for client in clients {
            while set.len() >= CONNECTS_IN_FLIGHT_MAX {
                let _ = set.join_next().await;
            }
            set.spawn(async move { client.close().await });
        }
        while set.join_next().await.is_some() {}
    };
    let _ = tokio::time::timeout(timeout, closing).await;
}

/// Steady writes: each client sets its own path to `data`, one request in
/// flight, until `duration` has passed or `stop` is raised.
pub struct SteadyWrites {
    /// One client per writer.
    pub clients: Vec<Client>,
    /// Each writer's node, as many as clients.
    pub paths: Vec<String>,
    /// The value written.
    pub data: Arc<Vec<u8>>,
    /// The per-request timeout.
    pub request_timeout: Duration,
}

impl SteadyWrites {
    /// Runs the writers until `duration` has passed or `stop` is raised,
    /// and sums up what they did.
    ///
    /// # Errors
    /// A writer task failed (panicked), or a histogram could not be made.
    pub async fn run(
        &self,
        duration: Duration,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<SteadyResult> {
        assert_eq!(
            self.clients.len(),
            self.paths.len(),
            "one node per steady writer"
        );
        let start = Instant::now();
        let deadline = start + duration;
        let mut writers = JoinSet::new();
        for (client, path) in self.clients.iter().zip(&self.paths) {
            let client = client.clone();
            let path = path.clone();
            let data = self.data.clone();
            let stop = stop.clone();
            let timeout = self.request_timeout;
            let mut latencies = histogram()?;
            writers.spawn(async move {
                let mut ok = 0u64;
                let mut timeouts = 0u64;
                let mut errors: BTreeMap<String, u64> = BTreeMap::new();
                while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    match bounded(timeout, client.set(&path, &data, None)).await {
                        Outcome::Ok => {
                            ok += 1;
                            record(&mut latencies, sent.elapsed());
                        }
                        Outcome::TimedOut => timeouts += 1,
                        Outcome::Failed(kind) => {
                            *errors.entry(kind_name(kind)).or_default() += 1;
                            // A refusal comes back at once; do not spin on it.
                            tokio::time::sleep(Duration::from_millis(REFUSAL_PAUSE_MS)).await;
                        }
                    }
                }
                (ok, timeouts, errors, latencies)
            });
        }
        let mut result = SteadyResult {
            clients: self.clients.len() as u64,
            ..SteadyResult::default()
        };
        let mut latencies = histogram()?;
        while let Some(joined) = writers.join_next().await {
            let (ok, timeouts, errors, writer_latencies) =
                joined.context("a steady writer failed")?;
            result.ops += ok;
            result.timeouts += timeouts;
            for (kind, count) in errors {
                *result.errors.entry(kind).or_default() += count;
            }
            latencies
                .add(&writer_latencies)
                .context("cannot merge latency histograms")?;
        }
        result.secs = start.elapsed().as_secs_f64();
        result.ops_per_sec = super::report::ratio(result.ops as f64, result.secs);
        result.latency = Latency::of(&latencies);
        Ok(result)
    }
}

/// Names the fill's nodes: `/bench/d<parent>/k<index>`, the parent being
/// `index % parents`, both zero-padded (keys to the width of the last
/// index, parents to at least three digits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Naming {
    /// Nodes to create.
    pub nodes: u64,
    /// Parents they are spread under.
    pub parents: u64,
}

/// The root every fill node is under.
pub const FILL_ROOT: &str = "/bench";

fn digits(value: u64) -> usize {
    value.checked_ilog10().map_or(1, |log| log as usize + 1)
}

impl Naming {
    /// Parent `parent`'s path.
    pub fn parent_path(&self, parent: u64) -> String {
        let width = digits(self.parents.saturating_sub(1)).max(3);
        format!("{FILL_ROOT}/d{parent:0width$}")
    }

    /// Node `index`'s path.
    pub fn node_path(&self, index: u64) -> String {
        let width = digits(self.nodes.saturating_sub(1));
        format!(
            "{}/k{index:0width$}",
            self.parent_path(index % self.parents.max(1))
        )
    }
}

/// The fill: creates numbered `0..nodes` from every session, `in_flight`
/// at a time per session.
pub struct Fill {
    /// One client per session.
    pub sessions: Vec<Client>,
    /// How the nodes are named.
    pub naming: Naming,
    /// Creates in flight per session.
    pub in_flight: u64,
    /// Each node's data.
    pub data: Arc<Vec<u8>>,
    /// The per-request timeout.
    pub request_timeout: Duration,
    /// No create is sent after this long.
    pub time_bound: Duration,
    /// Creates per slice of the rate table.
    pub slice_creates: u64,
    /// The CPU time the cluster's replicas have used so far, when they are
    /// local processes: each slice then says what a create cost them.
    pub cpu_clock: Option<CpuClock>,
}

/// Reads the CPU time a cluster's processes have used so far.
pub type CpuClock = Arc<dyn Fn() -> Option<Duration> + Send + Sync>;

/// What the fill did.
pub struct FillOutcome {
    /// Creates answered, whatever the answer.
    pub creates_done: u64,
    /// Creates that succeeded.
    pub created: u64,
    /// Creates without an answer in time.
    pub timed_out: u64,
    /// Failed creates by kind.
    pub errors: BTreeMap<String, u64>,
    /// The rate table.
    pub slices: Vec<Slice>,
    /// From the first create to the last answer.
    pub elapsed: Duration,
    /// Whether the time bound stopped it before every create was sent.
    pub stopped_at_time_bound: bool,
    /// Latency of the successful creates.
    pub latency: Latency,
}

/// State shared by the fill's tasks.
struct FillShared {
    /// The next node index to create.
    next: AtomicU64,
    /// Creates answered.
    done: AtomicU64,
    created: AtomicU64,
    timed_out: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    /// `(creates done, since start, replicas' CPU time)` at each slice's
    /// end.
    boundaries: Mutex<Vec<(u64, Duration, Option<Duration>)>>,
    /// One histogram per session, so that tasks rarely share a lock.
    latencies: Vec<Mutex<Histogram<u64>>>,
    stopped_at_time_bound: AtomicBool,
}

impl Fill {
    /// Creates the nodes, updating `progress` as they are answered.
    ///
    /// # Errors
    /// A task failed (panicked), or a histogram could not be made.
    pub async fn run(&self, progress: &ProgressBar) -> anyhow::Result<FillOutcome> {
        let nodes = self.naming.nodes;
        let slice = self.slice_creates.max(1);
        let shared = Arc::new(FillShared {
            next: AtomicU64::new(0),
            done: AtomicU64::new(0),
            created: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            boundaries: Mutex::new(Vec::new()),
            latencies: (0..self.sessions.len())
                .map(|_| histogram().map(Mutex::new))
                .collect::<anyhow::Result<_>>()?,
            stopped_at_time_bound: AtomicBool::new(false),
        });
        let cpu_clock = self.cpu_clock.clone();
        let cpu_at_start = cpu_clock.as_ref().and_then(|clock| clock());
        let start = Instant::now();
        let deadline = start + self.time_bound;
        let mut tasks = JoinSet::new();
        for (session, client) in self.sessions.iter().enumerate() {
            for _ in 0..self.in_flight {
                let client = client.clone();
                let shared = shared.clone();
                let data = self.data.clone();
                let naming = self.naming;
                let timeout = self.request_timeout;
                let cpu_clock = cpu_clock.clone();
                tasks.spawn(async move {
                    loop {
                        if Instant::now() >= deadline {
                            shared.stopped_at_time_bound.store(true, Ordering::Relaxed);
                            return;
                        }
                        let index = shared.next.fetch_add(1, Ordering::Relaxed);
                        if index >= nodes {
                            return;
                        }
                        let path = naming.node_path(index);
                        let sent = Instant::now();
                        let outcome =
                            bounded(timeout, client.create(&path, &data, CreateMode::Persistent))
                                .await;
                        let answered = Instant::now();
                        match outcome {
                            Outcome::Ok => {
                                shared.created.fetch_add(1, Ordering::Relaxed);
                                if let Some(latencies) = shared.latencies.get(session) {
                                    if let Ok(mut latencies) = latencies.lock() {
                                        record(&mut latencies, answered - sent);
                                    }
                                }
                            }
                            Outcome::TimedOut => {
                                shared.timed_out.fetch_add(1, Ordering::Relaxed);
                            }
                            Outcome::Failed(kind) => {
                                if let Ok(mut errors) = shared.errors.lock() {
                                    *errors.entry(kind_name(kind)).or_default() += 1;
                                }
                            }
                        }
                        let done = shared.done.fetch_add(1, Ordering::Relaxed) + 1;
                        if done.is_multiple_of(slice) || done == nodes {
                            let cpu = cpu_clock.as_ref().and_then(|clock| clock());
                            if let Ok(mut boundaries) = shared.boundaries.lock() {
                                boundaries.push((done, answered - start, cpu));
                            }
                        }
                    }
                });
            }
        }
        let mut ticker = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                joined = tasks.join_next() => match joined {
                    Some(joined) => joined.context("a fill task failed")?,
                    None => break,
                },
                _ = ticker.tick() => progress.set_position(shared.done.load(Ordering::Relaxed)),
            }
        }
        let elapsed = start.elapsed();
        let creates_done = shared.done.load(Ordering::Relaxed);
        progress.set_position(creates_done);
        let mut boundaries = shared
            .boundaries
            .lock()
            .map(|boundaries| boundaries.clone())
            .unwrap_or_default();
        boundaries.sort_unstable();
        if boundaries
            .last()
            .is_none_or(|&(done, _, _)| done < creates_done)
        {
            // Stopped at the time bound: the last, partial slice.
            let cpu = cpu_clock.as_ref().and_then(|clock| clock());
            boundaries.push((creates_done, elapsed, cpu));
        }
        let mut slices = Vec::with_capacity(boundaries.len());
        let mut previous = (0u64, Duration::ZERO, cpu_at_start);
        for (done, at, cpu) in boundaries {
            let secs = (at.saturating_sub(previous.1)).as_secs_f64();
            let creates = done - previous.0;
            let cpu_us_per_create = match (previous.2, cpu) {
                (Some(before), Some(after)) if creates > 0 => {
                    Some(after.saturating_sub(before).as_secs_f64() * 1e6 / creates as f64)
                }
                _ => None,
            };
            slices.push(Slice {
                creates_done: done,
                rate_per_sec: super::report::ratio(creates as f64, secs),
                elapsed_secs: at.as_secs_f64(),
                cpu_us_per_create,
            });
            previous = (done, at, cpu);
        }
        let mut latencies = histogram()?;
        for session in &shared.latencies {
            if let Ok(session) = session.lock() {
                latencies
                    .add(&*session)
                    .context("cannot merge latency histograms")?;
            }
        }
        let errors = shared
            .errors
            .lock()
            .map(|errors| errors.clone())
            .unwrap_or_default();
        Ok(FillOutcome {
            creates_done,
            created: shared.created.load(Ordering::Relaxed),
            timed_out: shared.timed_out.load(Ordering::Relaxed),
            errors,
            slices,
            elapsed,
            stopped_at_time_bound: shared.stopped_at_time_bound.load(Ordering::Relaxed)
                && creates_done < nodes,
            latency: Latency::of(&latencies),
        })
    }
}

/// Creates `paths` with `data` in order of depth (each after its
/// parent), up to `in_flight` at a time spread over `clients`; a node that
/// exists counts as created.
///
/// # Errors
/// A create failed or timed out (the fill needs every parent).
pub async fn create_all(
    clients: &[Client],
    paths: Vec<String>,
    data: Arc<Vec<u8>>,
    in_flight: usize,
    request_timeout: Duration,
) -> anyhow::Result<()> {
    if clients.is_empty() {
        bail!("no client to create nodes with");
    }
    let mut by_depth: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for path in paths {
        by_depth
            .entry(path.matches('/').count())
            .or_default()
            .push(path);
    }
    for (_, level) in by_depth {
        let mut pending = level.into_iter().enumerate();
        let mut creating = JoinSet::new();
        loop {
            while creating.len() < in_flight.max(1) {
                let Some((index, path)) = pending.next() else {
                    break;
                };
                let client = clients[index % clients.len()].clone();
                let data = data.clone();
                creating.spawn(async move {
                    let answer = tokio::time::timeout(
                        request_timeout + Duration::from_millis(TIMEOUT_MARGIN_MS),
                        client.create(&path, &data, CreateMode::Persistent),
                    )
                    .await;
                    (path, answer)
                });
            }
            let Some(joined) = creating.join_next().await else {
                break;
            };
            match joined.context("a create task failed")? {
                (_, Ok(Ok(_))) => {}
                (_, Ok(Err(error))) if error.kind() == ErrorKind::NodeExists => {}
                (path, Ok(Err(error))) => {
                    return Err(error).with_context(|| format!("cannot create {path}"))
                }
                (path, Err(_)) => bail!("creating {path} timed out"),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_zero_padded_and_spread_over_the_parents() {
        let naming = Naming {
            nodes: 1_000_000,
            parents: 1000,
        };
        assert_eq!(naming.node_path(1), "/bench/d001/k000001");
        assert_eq!(naming.node_path(123_123), "/bench/d123/k123123");
        assert_eq!(naming.node_path(999_999), "/bench/d999/k999999");
        let small = Naming {
            nodes: 2000,
            parents: 10,
        };
        assert_eq!(small.node_path(15), "/bench/d005/k0015");
        assert_eq!(small.parent_path(9), "/bench/d009");
        let wide = Naming {
            nodes: 10,
            parents: 5000,
        };
        assert_eq!(wide.node_path(7), "/bench/d0007/k7");
        assert_eq!(digits(0), 1);
        assert_eq!(digits(9), 1);
        assert_eq!(digits(10), 2);
    }

    #[test]
    fn latencies_beyond_the_bound_are_recorded_at_the_bound() {
        let mut latencies = histogram().expect("histogram");
        record(&mut latencies, Duration::from_secs(7200));
        record(&mut latencies, Duration::ZERO);
        assert_eq!(latencies.len(), 2);
        assert!(latencies.max() >= LATENCY_MAX_US / 2);
        assert_eq!(latencies.min(), 1);
    }
}
