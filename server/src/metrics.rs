//! The replica's metrics, in Prometheus' text format.
//!
//! One [`Metrics`] per replica, with its own registry (prometheus-client),
//! so that replicas sharing a process (the cluster tests) keep theirs
//! apart. The event loop updates them with atomic operations only: the
//! gauges of its status on every status refresh (every 50 ms), counters and
//! histograms as things happen. Request counters and histograms are looked
//! up once per operation and result, then cached by the caller
//! ([`RequestMetrics`]), so a request costs no lock. [`crate::http`]
//! serves them.
//!
//! What is measured, by name (all prefixed `synod_`):
//! - status: `role{role}`, `leader`, `ballot_round`, `chosen_slot`,
//!   `known_chosen_slot`, `applied_slot`, `revision`, `nodes`, `sessions`,
//!   `watches`, `locks`, `lock_waiters`, `client_connections`, `peer_chosen_slot{peer}` and
//!   `peer_lag_slots{peer}` (on the leader), `peer_connected{peer}`,
//!   `peer_messages_dropped`, `database_bytes` (when scraped);
//! - events: `leader_changes_total`, `elections_started_total`,
//!   `proposals_total`;
//! - certificates: `tls_certificate_expiry_seconds` (when the certificate
//!   in use expires), `tls_reloads_total` and `tls_reload_failures_total`
//!   (rotations without a restart, see `replica::tls_watch`);
//! - latencies: `client_request_seconds{op}` with
//!   `client_requests_total{op,result}`, `storage_commit_seconds` (a group
//!   commit of the log: its journal record and fsync) with
//!   `storage_commit_writes` (jobs per commit), `storage_checkpoint_seconds`
//!   (a durable commit of the log database, after which its journal starts
//!   over), `state_commit_seconds` (a commit of the state database:
//!   a flush of applied changes, or a piece of a snapshot being installed),
//!   `apply_seconds` (applying one chosen batch), `slot_commands`
//!   (commands per chosen slot: how proposals are batched),
//!   `snapshot_fetch_seconds`
//!   with `snapshot_fetch_failures_total` (a lagging replica catching up
//!   from a peer's snapshot), `snapshot_serve_seconds` with
//!   `snapshot_serve_failures_total` (streaming one to a lagging peer),
//!   `backup_seconds` with `backup_failures_total` (a backup streamed to
//!   a client);
//! - refusals: `refused_total{limit}`, a connection or request turned
//!   away because it met the named bound of `[limits]`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use synod_proto::{Error, Op};

/// Latency buckets in seconds: 50 µs to about 26 s, doubling.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_05, 2.0, 20)
}

/// Builds the latency histograms of a family.
#[derive(Clone, Copy)]
struct LatencyHistogram;

impl MetricConstructor<Histogram> for LatencyHistogram {
    fn new_metric(&self) -> Histogram {
        Histogram::new(latency_buckets())
    }
}

/// The labels of a role gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    role: &'static str,
}

/// The labels of a per-peer gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: u64,
}

/// The labels of a request latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

/// The labels of a request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    op: &'static str,
    result: &'static str,
}

/// The labels of a refusal counter: the `[limits]` field that was met.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

/// The roles the `role` gauge reports, one series each.
pub const ROLES: [&str; 4] = ["leader", "follower", "candidate", "joining"];

/// A replica's metrics and the registry that exports them.
pub struct Metrics {
    registry: Registry,
    role: Family<RoleLabels, Gauge>,
    /// The leader it believes in (0: none).
    pub leader: Gauge,
    /// The round of its promised ballot.
    pub ballot_round: Gauge,
    /// Its chosen prefix.
    pub chosen_slot: Gauge,
    /// The highest chosen prefix it has heard of.
    pub known_chosen_slot: Gauge,
    /// The last slot applied to its state machine.
    pub applied_slot: Gauge,
    /// Its state machine's revision.
    pub revision: Gauge,
    /// Nodes in its namespace, the root included.
    pub nodes: Gauge,
    /// Open sessions.
    pub sessions: Gauge,
    /// Watches registered on it.
    pub watches: Gauge,
    /// Locks held or waited for.
    pub locks: Gauge,
    /// Sessions queued for a lock, over all locks.
    pub lock_waiters: Gauge,
    /// Client connections it serves.
    pub client_connections: Gauge,
    peer_chosen_slot: Family<PeerLabels, Gauge>,
    peer_lag_slots: Family<PeerLabels, Gauge>,
    peer_connected: Family<PeerLabels, Gauge>,
    /// Messages to peers dropped so far (full queue, oversize).
    pub peer_messages_dropped: Gauge,
    /// Bytes of its database file, set when scraped.
    pub database_bytes: Gauge,
    /// Times the leader it believes in changed to another replica.
    pub leader_changes: Counter,
    /// Elections it started (as a candidate).
    pub elections_started: Counter,
    /// Proposals it handed to the core (client writes, session opens and
    /// the like).
    pub proposals: Counter,
    request_seconds: Family<OpLabels, Histogram, LatencyHistogram>,
    requests: Family<RequestLabels, Counter>,
    /// Group commits: the time of each, its fsync included.
    pub storage_commit_seconds: Histogram,
    /// Group commits: the jobs each took.
    pub storage_commit_writes: Histogram,
    /// Checkpoints of the log database: the write-back and durable commit
    /// after which the journal starts over.
    pub storage_checkpoint_seconds: Histogram,
    /// Commits of the state database, fsync included.
    pub state_commit_seconds: Histogram,
    /// Applying one chosen batch to the state machine.
    pub apply_seconds: Histogram,
    /// Commands per chosen slot (how well proposals are batched).
    pub slot_commands: Histogram,
    /// Fetching and rebuilding a snapshot from a peer (a lagging replica).
    pub snapshot_fetch_seconds: Histogram,
    /// Snapshot fetches that failed.
    pub snapshot_fetch_failures: Counter,
    /// Streaming a snapshot to a lagging peer, from the read transaction
    /// to the last chunk handed to the transport.
    pub snapshot_serve_seconds: Histogram,
    /// Snapshot streams to peers that did not finish.
    pub snapshot_serve_failures: Counter,
    /// Streaming a backup to a client.
    pub backup_seconds: Histogram,
    /// Backups to clients that did not finish.
    pub backup_failures: Counter,
    refused: Family<LimitLabels, Counter>,
    /// TLS files reloaded and put in place.
    pub tls_reloads: Counter,
    /// TLS files looked at and refused (the old ones stayed in use).
    pub tls_reload_failures: Counter,
    /// When the certificate in use expires, in seconds since the epoch.
    pub tls_certificate_expiry_seconds: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered under the `synod` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("synod");
        let metrics = Metrics {
            role: Family::default(),
            leader: Gauge::default(),
            ballot_round: Gauge::default(),
            chosen_slot: Gauge::default(),
            known_chosen_slot: Gauge::default(),
            applied_slot: Gauge::default(),
            revision: Gauge::default(),
            nodes: Gauge::default(),
            sessions: Gauge::default(),
            watches: Gauge::default(),
            locks: Gauge::default(),
            lock_waiters: Gauge::default(),
            client_connections: Gauge::default(),
            peer_chosen_slot: Family::default(),
            peer_lag_slots: Family::default(),
            peer_connected: Family::default(),
            peer_messages_dropped: Gauge::default(),
            database_bytes: Gauge::default(),
            leader_changes: Counter::default(),
            elections_started: Counter::default(),
            proposals: Counter::default(),
            request_seconds: Family::new_with_constructor(LatencyHistogram),
            requests: Family::default(),
            storage_commit_seconds: Histogram::new(latency_buckets()),
            storage_commit_writes: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            storage_checkpoint_seconds: Histogram::new(latency_buckets()),
            state_commit_seconds: Histogram::new(latency_buckets()),
            apply_seconds: Histogram::new(latency_buckets()),
            slot_commands: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            snapshot_fetch_seconds: Histogram::new(latency_buckets()),
            snapshot_fetch_failures: Counter::default(),
            snapshot_serve_seconds: Histogram::new(latency_buckets()),
            snapshot_serve_failures: Counter::default(),
            backup_seconds: Histogram::new(latency_buckets()),
            backup_failures: Counter::default(),
            refused: Family::default(),
            tls_reloads: Counter::default(),
            tls_reload_failures: Counter::default(),
            tls_certificate_expiry_seconds: Gauge::default(),
            registry: Registry::default(),
        };
        for role in ROLES {
            metrics.role.get_or_create(&RoleLabels { role }).set(0);
        }
        let r = &mut registry;
        r.register(
            "role",
            "1 for the replica's current role, 0 for the others",
            metrics.role.clone(),
        );
        r.register(
            "leader",
            "The leader this replica believes in (0: none)",
            metrics.leader.clone(),
        );
        r.register(
            "ballot_round",
            "The round of the promised ballot",
            metrics.ballot_round.clone(),
        );
        r.register(
            "chosen_slot",
            "The chosen prefix of the log",
            metrics.chosen_slot.clone(),
        );
        r.register(
            "known_chosen_slot",
            "The highest chosen prefix this replica has heard of",
            metrics.known_chosen_slot.clone(),
        );
        r.register(
            "applied_slot",
            "The last slot applied to the state machine",
            metrics.applied_slot.clone(),
        );
        r.register(
            "revision",
            "The state machine's revision",
            metrics.revision.clone(),
        );
        r.register(
            "nodes",
            "Nodes in the namespace, the root included",
            metrics.nodes.clone(),
        );
        r.register("sessions", "Open sessions", metrics.sessions.clone());
        r.register(
            "watches",
            "Watches registered on this replica",
            metrics.watches.clone(),
        );
        r.register("locks", "Locks held or waited for", metrics.locks.clone());
        r.register(
            "lock_waiters",
            "Sessions queued for a lock, over all locks",
            metrics.lock_waiters.clone(),
        );
        r.register(
            "client_connections",
            "Client connections served",
            metrics.client_connections.clone(),
        );
        r.register(
            "peer_chosen_slot",
            "Each member's chosen prefix, as the leader sees it",
            metrics.peer_chosen_slot.clone(),
        );
        r.register(
            "peer_lag_slots",
            "How many slots each member's chosen prefix trails the leader's",
            metrics.peer_lag_slots.clone(),
        );
        r.register(
            "peer_connected",
            "1 while this replica's connection to the member is up, 0 otherwise",
            metrics.peer_connected.clone(),
        );
        r.register(
            "peer_messages_dropped",
            "Messages to peers dropped so far (full queue, oversize)",
            metrics.peer_messages_dropped.clone(),
        );
        r.register(
            "database_bytes",
            "Bytes of the database file",
            metrics.database_bytes.clone(),
        );
        r.register(
            "tls_reloads",
            "Times the TLS files were reloaded and put in place without a restart",
            metrics.tls_reloads.clone(),
        );
        r.register(
            "tls_reload_failures",
            "Times changed TLS files were refused (the certificate in use stayed)",
            metrics.tls_reload_failures.clone(),
        );
        r.register(
            "tls_certificate_expiry_seconds",
            "When this replica's certificate in use expires, in seconds since the Unix epoch",
            metrics.tls_certificate_expiry_seconds.clone(),
        );
        r.register(
            "leader_changes",
            "Times the leader this replica believes in changed to another",
            metrics.leader_changes.clone(),
        );
        r.register(
            "elections_started",
            "Elections this replica started",
            metrics.elections_started.clone(),
        );
        r.register(
            "proposals",
            "Proposals handed to the consensus core",
            metrics.proposals.clone(),
        );
        r.register(
            "client_request_seconds",
            "Time from a client request's arrival to its answer, by operation",
            metrics.request_seconds.clone(),
        );
        r.register(
            "client_requests",
            "Client requests answered, by operation and result",
            metrics.requests.clone(),
        );
        r.register(
            "storage_commit_seconds",
            "Time of a group commit of the log (a journal record), fsync included",
            metrics.storage_commit_seconds.clone(),
        );
        r.register(
            "storage_commit_writes",
            "Jobs written by one group commit",
            metrics.storage_commit_writes.clone(),
        );
        r.register(
            "storage_checkpoint_seconds",
            "Time of a checkpoint of the log database (its journaled batches written back and committed durably), fsync included",
            metrics.storage_checkpoint_seconds.clone(),
        );
        r.register(
            "state_commit_seconds",
            "Time of a commit of the state database (a flush or a staged snapshot piece), fsync included",
            metrics.state_commit_seconds.clone(),
        );
        r.register(
            "apply_seconds",
            "Time to apply one chosen batch to the state machine",
            metrics.apply_seconds.clone(),
        );
        r.register(
            "slot_commands",
            "Commands in each chosen slot applied (proposals batched per slot)",
            metrics.slot_commands.clone(),
        );
        r.register(
            "snapshot_fetch_seconds",
            "Time to fetch and rebuild a snapshot from a peer, for a lagging replica",
            metrics.snapshot_fetch_seconds.clone(),
        );
        r.register(
            "snapshot_fetch_failures",
            "Snapshot fetches from a peer that failed",
            metrics.snapshot_fetch_failures.clone(),
        );
        r.register(
            "snapshot_serve_seconds",
            "Time to stream a snapshot to a lagging peer",
            metrics.snapshot_serve_seconds.clone(),
        );
        r.register(
            "snapshot_serve_failures",
            "Snapshot streams to peers that did not finish",
            metrics.snapshot_serve_failures.clone(),
        );
        r.register(
            "backup_seconds",
            "Time to stream a backup to a client",
            metrics.backup_seconds.clone(),
        );
        r.register(
            "backup_failures",
            "Backups to clients that did not finish",
            metrics.backup_failures.clone(),
        );
        r.register(
            "refused",
            "Connections and requests refused, by the limit they met",
            metrics.refused.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// The counter of refusals at `limit` (a field of `[limits]`); clones
    /// share the count, so a component may keep one.
    pub fn refused(&self, limit: &'static str) -> Counter {
        self.refused.get_or_create(&LimitLabels { limit }).clone()
    }

    /// Sets the role gauge: 1 for `role`, 0 for the others.
    pub fn set_role(&self, role: &str) {
        for known in ROLES {
            self.role
                .get_or_create(&RoleLabels { role: known })
                .set(i64::from(known == role));
        }
    }

    /// The role whose gauge is set; `starting` before the first status.
    pub fn role(&self) -> &'static str {
        ROLES
            .into_iter()
            .find(|&role| self.role.get_or_create(&RoleLabels { role }).get() == 1)
            .unwrap_or("starting")
    }

    /// Sets a member's progress, as the leader sees it; `None` clears it
    /// (this replica is no longer the leader).
    pub fn set_peer(&self, peer: u64, progress: Option<(u64, u64)>) {
        let labels = PeerLabels { peer };
        match progress {
            Some((chosen, lag)) => {
                self.peer_chosen_slot
                    .get_or_create(&labels)
                    .set(gauge_value(chosen));
                self.peer_lag_slots
                    .get_or_create(&labels)
                    .set(gauge_value(lag));
            }
            None => {
                self.peer_chosen_slot.remove(&labels);
                self.peer_lag_slots.remove(&labels);
            }
        }
    }

    /// Sets whether the connection to `peer` is up.
    pub fn set_peer_connected(&self, peer: u64, connected: bool) {
        self.peer_connected
            .get_or_create(&PeerLabels { peer })
            .set(i64::from(connected));
    }

    /// The metrics in Prometheus' text format (OpenMetrics).
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// A gauge's value for a count or slot (saturating at `i64::MAX`).
pub fn gauge_value(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The operations a request counter names.
const OPS: [&str; 15] = [
    "create",
    "delete",
    "set_data",
    "get_data",
    "exists",
    "get_children",
    "multi",
    "sync",
    "close_session",
    "acquire_lock",
    "release_lock",
    "check_sequencer",
    "campaign",
    "resign",
    "get_leader",
];

/// The results a request counter names: `ok`, then each error (`other`
/// for one added to the protocol since).
const RESULTS: [&str; 18] = [
    "ok",
    "no_node",
    "node_exists",
    "bad_version",
    "not_empty",
    "no_children_for_ephemerals",
    "session_expired",
    "stale_request_sequence",
    "bad_argument",
    "data_too_large",
    "lock_not_held",
    "lock_busy",
    "lock_already_requested",
    "stale_sequencer",
    "unavailable",
    "limit_exceeded",
    "multi_op_failed",
    "other",
];

fn op_index(op: &Op) -> usize {
    match op {
        Op::Create { .. } => 0,
        Op::Delete { .. } => 1,
        Op::SetData { .. } => 2,
        Op::GetData { .. } => 3,
        Op::Exists { .. } => 4,
        Op::GetChildren { .. } => 5,
        Op::Multi { .. } => 6,
        Op::Sync => 7,
        Op::CloseSession => 8,
        Op::AcquireLock { .. } => 9,
        Op::ReleaseLock { .. } => 10,
        Op::CheckSequencer { .. } => 11,
        Op::Campaign { .. } => 12,
        Op::Resign { .. } => 13,
        Op::GetLeader { .. } => 14,
    }
}

fn result_index<T>(result: &Result<T, Error>) -> usize {
    match result {
        Ok(_) => 0,
        Err(error) => match error {
            Error::NoNode { .. } => 1,
            Error::NodeExists { .. } => 2,
            Error::BadVersion { .. } => 3,
            Error::NotEmpty { .. } => 4,
            Error::NoChildrenForEphemerals { .. } => 5,
            Error::SessionExpired { .. } => 6,
            Error::StaleRequestSequence { .. } => 7,
            Error::BadArgument { .. } => 8,
            Error::DataTooLarge { .. } => 9,
            Error::LockNotHeld { .. } => 10,
            Error::LockBusy { .. } => 11,
            Error::LockAlreadyRequested { .. } => 12,
            Error::StaleSequencer { .. } => 13,
            Error::Unavailable { .. } => 14,
            Error::LimitExceeded { .. } => 15,
            Error::MultiOpFailed { .. } => 16,
            _ => 17,
        },
    }
}

/// The request counters and histograms, each looked up in its family the
/// first time it is used and then kept: counting a request is an array
/// index and an atomic add.
pub struct RequestMetrics {
    counters: Vec<Option<Counter>>,
    histograms: Vec<Option<Histogram>>,
}

impl RequestMetrics {
    /// None looked up yet.
    pub fn new() -> RequestMetrics {
        RequestMetrics {
            counters: vec![None; OPS.len() * RESULTS.len()],
            histograms: vec![None; OPS.len()],
        }
    }

    /// Counts a request answered with `result`, `seconds` after it arrived.
    pub fn record<T>(
        &mut self,
        metrics: &Metrics,
        op: &Op,
        result: &Result<T, Error>,
        seconds: f64,
    ) {
        let op = op_index(op);
        let outcome = result_index(result);
        let counter = self.counters[op * RESULTS.len() + outcome].get_or_insert_with(|| {
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    op: OPS[op],
                    result: RESULTS[outcome],
                })
                .clone()
        });
        counter.inc();
        let histogram = self.histograms[op].get_or_insert_with(|| {
            metrics
                .request_seconds
                .get_or_create(&OpLabels { op: OPS[op] })
                .clone()
        });
        histogram.observe(seconds);
    }
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self::new()
    }
}
