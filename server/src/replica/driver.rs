//! The replica's single owner of the Paxos core and the state machine.
//!
//! [`Driver`] is synchronous: the async runner ([`super::run`]) feeds it
//! [`Input`]s with the current time and carries out its [`Outbox`] (peer
//! messages, storage jobs, snapshot fetches). Everything that arrives while
//! the disk is busy is batched into the next persist round, because the core
//! accumulates changes until the runner asks for them again.
//!
//! How a request is served:
//! - **Writes** (and `Sync`, sessions, locks, elections) become a
//!   [`Proposal`] in the log. At a follower the core forwards it to the
//!   leader; the replica that received it answers once it has applied the
//!   entry itself, so the client reads its own writes there. With no leader,
//!   the proposal waits (bounded) and is retried: a client never sees "not
//!   leader".
//! - **Linearizable reads** ask the core for a read index (a lease read at
//!   the leader, a read-index round otherwise) and are served once that slot
//!   is applied; `at-least(revision)` reads wait for the revision;
//!   `sequential` reads are served at once.
//! - **Watches** are registered here with the read that sets them, fired by
//!   the events of applied entries, and delivered on the same ordered stream
//!   as responses.
//! - **Sessions**: keep-alives are collected here and passed to the leader,
//!   whose [`SessionTracker`] commits expiries and checkpoints.
//! - **The cluster identity**: a leader whose state holds none proposes one
//!   drawn from the operating system, and every replica that holds it and
//!   is not rejoining confirms once that it does (see
//!   [`crate::transport::identity`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use synod_paxos::{
    ChosenEntry, Envelope, Node, ProposeError, ReadOutcome, Ready, Role, Slot, Value,
};
use synod_proto::wire::{
    ClientFrame, ClusterStatus, ReadConsistency, ReplicaStatus, ServerFrame, WatchRegistration,
};
use synod_proto::{Error, Op, Request, Response, Revision, SessionId, SessionSecret, WatchKind};

use super::proposal::{Origin, Proposal};
use super::sessions::SessionTracker;
use super::snapshot::{FetchedState, StreamHolds};
use super::waiting::Waiting;
use crate::config::ReplicaConfig;
use crate::metrics::{gauge_value, Metrics, RequestMetrics};
use crate::state::watch::{EventHistory, WatchRegistry};
use crate::state::{Applied, StateMachine};
use crate::storage::{SavedStateHeader, StateDelta};
use crate::transport::identity::{identity_hex, IdentityView};
use crate::transport::{InboundFrame, ReplySender};

/// Identifies one client connection on this replica.
pub type ConnectionId = u64;

/// Messages between replicas: the Paxos core's, and the keep-alives that
/// followers pass to the leader.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PeerMessage {
    /// A message of the Paxos core.
    Paxos(Envelope),
    /// Sessions whose clients were heard from at the sender.
    KeepAlives {
        /// The sender.
        from: u64,
        /// The leader it is for.
        to: u64,
        /// The sessions.
        sessions: Vec<SessionId>,
    },
}

impl crate::transport::PeerPayload for PeerMessage {
    fn sender(&self) -> u64 {
        match self {
            PeerMessage::Paxos(envelope) => envelope.from,
            PeerMessage::KeepAlives { from, .. } => *from,
        }
    }

    fn recipient(&self) -> u64 {
        match self {
            PeerMessage::Paxos(envelope) => envelope.to,
            PeerMessage::KeepAlives { to, .. } => *to,
        }
    }
}

/// Everything the driver reacts to.
#[derive(Debug)]
pub enum Input {
    /// A message from another replica.
    Peer(PeerMessage),
    /// A client connected; frames for it go to `replies`.
    ClientConnected {
        /// The connection.
        id: ConnectionId,
        /// The client's identity (its certificate's subject): the owner of
        /// the sessions it opens, and the only one that may use them.
        identity: String,
        /// Where its frames go, in order, charged to its reply budget.
        replies: ReplySender,
    },
    /// A frame from a client, charged to its connection's pending budget
    /// until the driver settles it.
    ClientFrame {
        /// The connection.
        id: ConnectionId,
        /// The frame and its charge.
        frame: InboundFrame,
    },
    /// A client's connection closed.
    ClientDisconnected {
        /// The connection.
        id: ConnectionId,
    },
    /// Every persist batch up to this id is durable.
    Persisted(u64),
    /// The state machine's tables are durable through this slot: the log
    /// below it (less the retained tail) may go.
    StateSaved(Slot),
    /// A snapshot fetched from another replica, staged on disk and rebuilt
    /// in memory, or why it failed.
    SnapshotFetched(Result<FetchedState, String>),
    /// Time passed.
    Tick,
}

/// A write for the storage thread, in order.
#[derive(Debug)]
pub enum StorageJob {
    /// Make the Paxos core's batch durable (group commit merges many).
    Persist(synod_paxos::Persist),
    /// What applying entries changed in the state machine, through a slot
    /// (the writer folds these together and writes them now and then; see
    /// [`super::storage_thread`]).
    SaveState(StateDelta),
    /// Make the staged snapshot fetched from a peer the saved state, before
    /// the core hears of it (later jobs cannot overtake it).
    ActivateState(SavedStateHeader),
}

/// What the runner must carry out after each input.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Messages to other replicas.
    pub peer: Vec<(u64, PeerMessage)>,
    /// Writes, in order.
    pub storage: Vec<StorageJob>,
    /// Fetch a snapshot from this replica.
    pub fetch_snapshot: Option<u64>,
    /// A replaced state to drop off the event loop (dropping a large one
    /// takes a while).
    pub discarded_state: Option<Box<StateMachine>>,
    /// The replica must stop (a fatal storage error, or a corrupt log).
    pub fatal: Option<String>,
}

struct Client {
    replies: ReplySender,
    identity: String,
    session: Option<SessionId>,
    /// Reads ready to serve, held back while the client's replies are
    /// backed up; served in order as they drain.
    parked: VecDeque<PendingRead>,
}

#[derive(Debug, Clone)]
enum ReadKind {
    Op {
        request: Request,
        watch: Option<WatchKind>,
    },
    Resume {
        session: SessionId,
        secret: SessionSecret,
        last_revision: Revision,
        watches: Vec<WatchRegistration>,
    },
}

#[derive(Debug, Clone)]
struct PendingRead {
    connection: ConnectionId,
    kind: ReadKind,
    deadline_ms: u64,
    /// When the driver took the request (for its latency).
    received: Instant,
    /// Bytes charged to the connection's pending budget.
    cost: u64,
}

/// A client's write proposed from this replica, waiting to be applied here.
struct WaitingWrite {
    connection: ConnectionId,
    deadline_ms: u64,
    /// When the driver took the request (for its latency).
    received: Instant,
    request: Request,
    /// Bytes charged to the connection's pending budget.
    cost: u64,
}

/// A session open proposed from this replica, waiting to be applied.
struct WaitingOpen {
    connection: ConnectionId,
    deadline_ms: u64,
    /// Bytes charged to the connection's pending budget.
    cost: u64,
}

struct WaitingProposal {
    proposal: Proposal,
    deadline_ms: u64,
}

/// Bound on proposals waiting for a leader at one replica.
const WAITING_PROPOSALS_MAX: usize = 100_000;

/// How long a replica waits for the same thing before it logs it.
const WAITING_LOG_AFTER_MS: u64 = 3_000;

/// The replica's event loop state. See the module docs.
pub struct Driver {
    config: ReplicaConfig,
    node: Node,
    state: StateMachine,
    now_ms: u64,
    clients: HashMap<ConnectionId, Client>,
    session_connection: HashMap<SessionId, ConnectionId>,
    watches: WatchRegistry,
    history: EventHistory,
    tracker: Option<SessionTracker>,
    keep_alives: BTreeSet<SessionId>,
    last_keep_alive_flush_ms: u64,
    next_origin_token: u64,
    opening: BTreeMap<u64, WaitingOpen>,
    /// Connections with parked reads.
    parked_connections: BTreeSet<ConnectionId>,
    waiting_writes: BTreeMap<(SessionId, u64), WaitingWrite>,
    /// The last leader seen, to notice a change of leader.
    last_leader: Option<u64>,
    unproposed: VecDeque<WaitingProposal>,
    next_read_id: u64,
    reads_at_core: HashMap<u64, PendingRead>,
    reads_retry: Vec<PendingRead>,
    reads_at_slot: BTreeMap<(Slot, u64), PendingRead>,
    reads_at_revision: BTreeMap<(Revision, u64), PendingRead>,
    fetching_snapshot: bool,
    /// Snapshots being streamed to peers, whose log must stay.
    holds: Arc<StreamHolds>,
    last_tick_proposal_ms: u64,
    outbox: Outbox,
    /// When this replica last proposed a cluster identity, if ever.
    last_mint_proposal_ms: Option<u64>,
    /// When this replica last confirmed it holds the identity, if ever.
    last_confirm_proposal_ms: Option<u64>,
    /// When this replica first saw it holds the cluster identity.
    identity_seen_ms: Option<u64>,
    metrics: Arc<Metrics>,
    request_metrics: RequestMetrics,
    /// The core's role at the last tick, to count elections started.
    last_role: Role,
    /// Whether the core was rejoining at the last tick.
    was_joining: bool,
    /// When the snapshot being fetched was asked for.
    snapshot_fetch_started: Option<Instant>,
    /// The other members its connection to is up, as last published.
    connected_peers: BTreeSet<u64>,
    /// What it waits for, since when (ms), and whether that was logged.
    waiting_seen: Option<(Waiting, u64, bool)>,
}

impl Driver {
    /// A driver over a started core and a restored state machine, which has
    /// applied every slot below `node.apply_next()`.
    pub fn new(
        config: ReplicaConfig,
        node: Node,
        state: StateMachine,
        holds: Arc<StreamHolds>,
        now_ms: u64,
    ) -> Driver {
        let limits = &config.limits;
        let watches = WatchRegistry::new(
            limits.watches_per_session_max,
            limits.watch_path_bytes_per_session_max,
            limits.path_bytes_max,
        );
        let history = EventHistory::new(limits.event_history_max);
        Driver {
            config,
            node,
            state,
            now_ms,
            clients: HashMap::new(),
            session_connection: HashMap::new(),
            watches,
            history,
            tracker: None,
            keep_alives: BTreeSet::new(),
            connected_peers: BTreeSet::new(),
            waiting_seen: None,
            last_keep_alive_flush_ms: now_ms,
            next_origin_token: 1,
            opening: BTreeMap::new(),
            parked_connections: BTreeSet::new(),
            waiting_writes: BTreeMap::new(),
            last_leader: None,
            unproposed: VecDeque::new(),
            next_read_id: 1,
            reads_at_core: HashMap::new(),
            reads_retry: Vec::new(),
            reads_at_slot: BTreeMap::new(),
            reads_at_revision: BTreeMap::new(),
            fetching_snapshot: false,
            holds,
            last_tick_proposal_ms: now_ms,
            outbox: Outbox::default(),
            last_mint_proposal_ms: None,
            last_confirm_proposal_ms: None,
            identity_seen_ms: None,
            metrics: Arc::new(Metrics::new()),
            request_metrics: RequestMetrics::new(),
            last_role: Role::Follower,
            was_joining: false,
            snapshot_fetch_started: None,
        }
    }

    /// The Paxos core, for status.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The state machine, and the last slot applied to it.
    pub fn into_state(self) -> (StateMachine, u64) {
        let applied = self.node.status().apply_next.saturating_sub(1);
        (self.state, applied)
    }

    /// The state machine, for status and tests.
    pub fn state(&self) -> &StateMachine {
        &self.state
    }

    /// Takes what the runner must carry out.
    pub fn take_outbox(&mut self) -> Outbox {
        std::mem::take(&mut self.outbox)
    }

    /// Handles one input at `now_ms` (ms since the Unix epoch, never
    /// decreasing), then drains the core.
    pub fn handle(&mut self, input: Input, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        let now = self.now_ms;
        match input {
            Input::Peer(PeerMessage::Paxos(envelope)) => self.node.step(now, envelope),
            Input::Peer(PeerMessage::KeepAlives { sessions, .. }) => {
                for session in sessions {
                    self.note_keep_alive(session);
                }
            }
            Input::ClientConnected {
                id,
                identity,
                replies,
            } => {
                self.clients.insert(
                    id,
                    Client {
                        replies,
                        identity,
                        session: None,
                        parked: VecDeque::new(),
                    },
                );
            }
            Input::ClientFrame { id, frame } => self.on_client_frame(id, frame),
            Input::ClientDisconnected { id } => self.on_disconnected(id),
            Input::Persisted(batch) => self.node.persisted(now, batch),
            Input::StateSaved(through) => self.compact(through),
            Input::SnapshotFetched(result) => self.on_snapshot_fetched(result),
            Input::Tick => self.on_tick(),
        }
        self.drain_core();
    }

    fn send_to(&mut self, connection: ConnectionId, frame: ServerFrame) {
        let Some(client) = self.clients.get(&connection) else {
            return;
        };
        if client.replies.send(&frame).is_err() {
            // A client that does not read its frames is cut off rather than
            // allowed to grow the replica's memory.
            let budget = client.replies.budget();
            budget.close(format!(
                "the client does not read its replies (limit \
                 `limits.reply_queue_bytes_per_connection_max` is {} bytes)",
                budget.bounds().reply_bytes_max
            ));
            tracing::info!(
                node = self.config.id,
                connection,
                "client does not read its replies; disconnected"
            );
            self.on_disconnected(connection);
        }
    }

    /// Gives back what a frame of the connection was charged.
    fn settle(&self, connection: ConnectionId, cost: u64, request: bool) {
        if let Some(client) = self.clients.get(&connection) {
            client.replies.budget().settle(cost, request);
        }
    }

    /// Answers a request and settles its charge, counting it (by `op` and
    /// result, with its latency since `received`).
    fn respond(
        &mut self,
        connection: ConnectionId,
        (op, received): (&Op, Instant),
        sequence: u64,
        cost: u64,
        response: Response,
    ) {
        self.request_metrics.record(
            &self.metrics,
            op,
            &response.result,
            received.elapsed().as_secs_f64(),
        );
        self.answer(
            connection,
            cost,
            ServerFrame::Response { sequence, response },
        );
    }

    /// Answers a request, session open or resume with `frame` and settles
    /// its charge.
    fn answer(&mut self, connection: ConnectionId, cost: u64, frame: ServerFrame) {
        self.settle(connection, cost, true);
        self.send_to(connection, frame);
    }

    fn unavailable(&self, reason: &str) -> Response {
        Response {
            revision: self.state.revision(),
            result: Err(Error::Unavailable {
                reason: reason.into(),
            }),
        }
    }

    fn on_disconnected(&mut self, connection: ConnectionId) {
        self.parked_connections.remove(&connection);
        if let Some(client) = self.clients.remove(&connection) {
            if let Some(session) = client.session {
                if self.session_connection.get(&session) == Some(&connection) {
                    self.session_connection.remove(&session);
                    self.watches.remove_session(session);
                }
            }
        }
    }

    fn note_keep_alive(&mut self, session: SessionId) {
        match &mut self.tracker {
            Some(tracker) => {
                if let Some(timeout) = self.state.session_timeout_ms(session) {
                    tracker.keep_alive(session, timeout, self.now_ms);
                }
            }
            None => {
                self.keep_alives.insert(session);
            }
        }
    }

    fn on_client_frame(&mut self, connection: ConnectionId, inbound: InboundFrame) {
        let deadline = self.now_ms + self.config.timeouts.request_timeout_ms;
        let Some(client) = self.clients.get(&connection) else {
            return;
        };
        let session = client.session;
        let cost = inbound.cost;
        if !inbound.is_request() {
            // Handled at once below, so its charge is settled now.
            client.replies.budget().settle(cost, false);
        }
        match inbound.frame {
            ClientFrame::OpenSession { timeout_ms } => {
                let owner = client.identity.clone();
                let token = self.next_origin_token;
                self.next_origin_token += 1;
                self.opening.insert(
                    token,
                    WaitingOpen {
                        connection,
                        deadline_ms: deadline,
                        cost,
                    },
                );
                let origin = Origin {
                    node: self.config.id,
                    token,
                };
                let proposal = Proposal::OpenSession {
                    timeout_ms,
                    origin,
                    owner,
                    secret: rand::random(),
                };
                self.propose(proposal, deadline);
            }
            ClientFrame::ResumeSession {
                session,
                secret,
                last_revision,
                watches,
            } => {
                let read = PendingRead {
                    connection,
                    kind: ReadKind::Resume {
                        session,
                        secret,
                        last_revision,
                        watches,
                    },
                    deadline_ms: deadline,
                    received: Instant::now(),
                    cost,
                };
                self.start_linearizable_read(read);
            }
            ClientFrame::Request {
                request,
                consistency,
                watch,
            } => {
                let received = Instant::now();
                if session != Some(request.session) {
                    let response = Response {
                        revision: self.state.revision(),
                        result: Err(Error::SessionExpired {
                            session: request.session,
                        }),
                    };
                    self.respond(
                        connection,
                        (&request.op, received),
                        request.sequence,
                        cost,
                        response,
                    );
                    return;
                }
                self.note_keep_alive(request.session);
                if request.op.is_read() {
                    let read = PendingRead {
                        connection,
                        kind: ReadKind::Op { request, watch },
                        deadline_ms: deadline,
                        received,
                        cost,
                    };
                    match consistency {
                        ReadConsistency::Sequential => self.serve_read(read),
                        ReadConsistency::AtLeast(revision) => {
                            if self.state.revision() >= revision {
                                self.serve_read(read);
                            } else {
                                let id = self.next_read_id;
                                self.next_read_id += 1;
                                self.reads_at_revision.insert((revision, id), read);
                            }
                        }
                        ReadConsistency::Linearizable => self.start_linearizable_read(read),
                    }
                } else {
                    let key = (request.session, request.sequence);
                    let waiting = WaitingWrite {
                        connection,
                        deadline_ms: deadline,
                        received,
                        request: request.clone(),
                        cost,
                    };
                    if let Some(earlier) = self.waiting_writes.insert(key, waiting) {
                        // The same request sent twice while the first waits:
                        // the newer copy gets the answer.
                        let response = self.unavailable("superseded by a retry of the request");
                        self.respond(
                            earlier.connection,
                            (&earlier.request.op, earlier.received),
                            key.1,
                            earlier.cost,
                            response,
                        );
                    }
                    self.propose(Proposal::Client(request), deadline);
                }
            }
            ClientFrame::AddWatch(registration) => match session {
                Some(session) => self.add_watch(connection, session, registration),
                None => {
                    let error = Error::bad_argument(
                        "this connection has no session; open or resume one before adding watches",
                    );
                    let frame = self.watch_refused(registration, error);
                    self.send_to(connection, frame);
                }
            },
            ClientFrame::RemoveWatch(WatchRegistration { path, kind }) => {
                if let Some(session) = session {
                    self.watches.remove(session, &path, kind);
                }
            }
            ClientFrame::KeepAlive => {
                if let Some(session) = session {
                    self.note_keep_alive(session);
                }
            }
            ClientFrame::Status => {
                let status = self.status();
                self.send_to(connection, ServerFrame::Status(status));
            }
        }
    }

    /// Registers a watch given without a read; a refused one is reported
    /// to the client.
    fn add_watch(
        &mut self,
        connection: ConnectionId,
        session: SessionId,
        registration: WatchRegistration,
    ) {
        let added = self
            .watches
            .add(session, &registration.path, registration.kind);
        if let Err(error) = added {
            let frame = self.watch_refused(registration, error);
            self.send_to(connection, frame);
        }
    }

    /// The refusal of a watch, naming its path cut to the path bound (a
    /// client that sent a 1 MiB path does not get it back).
    fn watch_refused(&self, mut watch: WatchRegistration, error: Error) -> ServerFrame {
        let max = usize::try_from(self.config.limits.path_bytes_max).unwrap_or(usize::MAX);
        if watch.path.len() > max {
            let mut end = max;
            while !watch.path.is_char_boundary(end) {
                end -= 1;
            }
            watch.path.truncate(end);
        }
        ServerFrame::WatchRefused { watch, error }
    }

    /// The role `status` and the metrics name: `joining` while the core
    /// rejoins, else its role.
    fn role_name(&self, role: Role) -> &'static str {
        if self.node.is_joining() {
            return "joining";
        }
        match role {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::PreCandidate | Role::Candidate => "candidate",
        }
    }

    /// The replica's metrics, which the driver keeps up to date.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Sets the status gauges of the metrics (the event loop calls it with
    /// every status refresh). Costs no more than the status itself.
    pub fn publish_metrics(&self) {
        let metrics = &self.metrics;
        let core = self.node.status();
        metrics.set_role(self.role_name(core.role));
        metrics.leader.set(gauge_value(core.leader.unwrap_or(0)));
        metrics.ballot_round.set(gauge_value(core.promised.round));
        metrics.chosen_slot.set(gauge_value(core.chosen_through));
        metrics
            .known_chosen_slot
            .set(gauge_value(core.known_chosen_through));
        metrics
            .applied_slot
            .set(gauge_value(core.apply_next.saturating_sub(1)));
        metrics.revision.set(gauge_value(self.state.revision()));
        metrics.nodes.set(gauge_value(self.state.node_count()));
        metrics
            .sessions
            .set(gauge_value(self.state.session_count()));
        metrics.watches.set(gauge_value(self.watches.len()));
        metrics.locks.set(gauge_value(self.state.lock_count()));
        metrics
            .lock_waiters
            .set(gauge_value(self.state.lock_waiter_count()));
        metrics
            .client_connections
            .set(gauge_value(self.clients.len() as u64));
        let leading = core.role == Role::Leader;
        for member in self.node.membership().members() {
            let progress = core
                .peers
                .iter()
                .find(|peer| peer.id == *member)
                .filter(|_| leading)
                .map(|peer| {
                    let lag = core.chosen_through.saturating_sub(peer.chosen_through);
                    (peer.chosen_through, lag)
                });
            metrics.set_peer(*member, progress);
        }
    }

    /// Publishes whether the connection to each other member is up
    /// (`connected`), and the messages to peers dropped so far; logs what
    /// the replica waits for when that starts, changes or ends.
    pub fn publish_peer_links(&mut self, connected: impl Fn(u64) -> bool, dropped_messages: u64) {
        self.connected_peers.clear();
        for &member in self.node.membership().members() {
            if member != self.config.id {
                let up = connected(member);
                self.metrics.set_peer_connected(member, up);
                if up {
                    self.connected_peers.insert(member);
                }
            }
        }
        self.metrics
            .peer_messages_dropped
            .set(gauge_value(dropped_messages));
        self.log_waiting();
    }

    /// Logs what the replica waits for once it has waited for it
    /// [`WAITING_LOG_AFTER_MS`] (a start or a leader change waits briefly,
    /// which is not worth a warning), and when the wait ends.
    fn log_waiting(&mut self) {
        let now = self.now_ms;
        let waiting = self.waiting();
        match (waiting, &mut self.waiting_seen) {
            (None, seen) => {
                if let Some((_, _, true)) = seen.take() {
                    tracing::info!(node = self.config.id, "part of a working quorum again");
                }
            }
            (Some(reason), Some((before, since, logged))) if reason.same_kind(before) => {
                if !*logged && now.saturating_sub(*since) >= WAITING_LOG_AFTER_MS {
                    tracing::warn!(node = self.config.id, %reason, "waiting");
                    *logged = true;
                }
                *before = reason;
            }
            (Some(reason), seen) => {
                let logged = seen.as_ref().is_some_and(|(_, _, logged)| *logged);
                if logged {
                    tracing::warn!(node = self.config.id, %reason, "waiting");
                }
                *seen = Some((reason, now, logged));
            }
        }
    }

    /// What the replica waits for, if it is not part of a working quorum.
    fn waiting(&self) -> Option<Waiting> {
        let members: BTreeSet<u64> = self.node.membership().members().iter().copied().collect();
        Waiting::of(
            self.config.id,
            &self.node.status(),
            self.node.join_progress(),
            &members,
            &self.connected_peers,
        )
    }

    /// This replica's status for `status` commands.
    pub fn status(&self) -> ClusterStatus {
        let core = self.node.status();
        ClusterStatus {
            replica: ReplicaStatus {
                node_id: self.config.id,
                role: self.role_name(core.role).into(),
                leader: core.leader,
                ballot: core.promised.to_string(),
                chosen_through: core.chosen_through,
                applied_through: core.apply_next.saturating_sub(1),
                revision: self.state.revision(),
                sessions: self.state.session_count(),
                watches: self.watches.len(),
                peers: core
                    .peers
                    .iter()
                    .map(|peer| (peer.id, peer.chosen_through))
                    .collect(),
                cluster_identity: self.state.cluster_identity().map(identity_hex),
                confirmed_members: self.state.confirmed_members().iter().copied().collect(),
                waiting: self.waiting().map(|reason| reason.to_string()),
            },
            members: self
                .config
                .members
                .iter()
                .map(|m| (m.id, m.client_address.to_string()))
                .collect(),
        }
    }

    fn propose(&mut self, proposal: Proposal, deadline_ms: u64) {
        self.metrics.proposals.inc();
        let bytes = proposal.encode();
        match self.node.propose(self.now_ms, vec![bytes]) {
            Ok(()) => {}
            Err(ProposeError::NoLeader(_)) | Err(ProposeError::Overloaded(_)) => {
                if self.unproposed.len() < WAITING_PROPOSALS_MAX {
                    self.unproposed.push_back(WaitingProposal {
                        proposal,
                        deadline_ms,
                    });
                }
            }
            Err(_) => {}
        }
    }

    fn start_linearizable_read(&mut self, read: PendingRead) {
        let id = self.next_read_id;
        self.next_read_id += 1;
        self.reads_at_core.insert(id, read);
        self.node.read(self.now_ms, id);
    }

    /// Serves a read whose consistency is met, or parks it while its
    /// client's replies are backed up (a read reply may be large; nothing
    /// else is held back, so events still precede any newer data).
    fn serve_read(&mut self, read: PendingRead) {
        if let ReadKind::Op { .. } = read.kind {
            let Some(client) = self.clients.get_mut(&read.connection) else {
                return;
            };
            if !client.parked.is_empty() || client.replies.budget().replies_backlogged() {
                let connection = read.connection;
                client.parked.push_back(read);
                self.parked_connections.insert(connection);
                return;
            }
        }
        self.serve_read_now(read);
    }

    /// Serves parked reads of clients whose replies have drained, in
    /// order; fails those past their deadline.
    fn serve_parked(&mut self) {
        let now = self.now_ms;
        for connection in std::mem::take(&mut self.parked_connections) {
            let Some(client) = self.clients.get_mut(&connection) else {
                continue;
            };
            let (late, kept): (VecDeque<PendingRead>, VecDeque<PendingRead>) =
                std::mem::take(&mut client.parked)
                    .into_iter()
                    .partition(|read| read.deadline_ms <= now);
            client.parked = kept;
            for read in late {
                self.fail_read(read, "the client did not read its replies in time");
            }
            while let Some(read) = self.next_unparked(connection) {
                self.serve_read_now(read);
            }
            if self
                .clients
                .get(&connection)
                .is_some_and(|client| !client.parked.is_empty())
            {
                self.parked_connections.insert(connection);
            }
        }
    }

    /// The next parked read of `connection`, unless its replies are still
    /// backed up.
    fn next_unparked(&mut self, connection: ConnectionId) -> Option<PendingRead> {
        let client = self.clients.get_mut(&connection)?;
        if client.replies.budget().replies_backlogged() {
            return None;
        }
        client.parked.pop_front()
    }

    fn serve_read_now(&mut self, read: PendingRead) {
        let cost = read.cost;
        match read.kind {
            ReadKind::Op { request, watch } => {
                let mut result = self.state.read(&request.op);
                if let (Some(kind), Some(path)) = (watch, request.op.read_path()) {
                    let registers = result.is_ok() || kind == WatchKind::Exists;
                    if registers {
                        if let Err(error) = self.watches.add(request.session, path, kind) {
                            // The watch was asked with the read: refused, it
                            // fails the read.
                            result = Err(error);
                        }
                    }
                }
                let response = Response {
                    revision: self.state.revision(),
                    result,
                };
                self.respond(
                    read.connection,
                    (&request.op, read.received),
                    request.sequence,
                    cost,
                    response,
                );
            }
            ReadKind::Resume {
                session,
                secret,
                last_revision,
                watches,
            } => self.resume(
                read.connection,
                cost,
                session,
                secret,
                last_revision,
                watches,
            ),
        }
    }

    /// Attaches a session to the connection, if the connection's identity
    /// owns it and shows its secret; re-registers its watches and replays
    /// the events they missed. A refused resume changes nothing.
    fn resume(
        &mut self,
        connection: ConnectionId,
        cost: u64,
        session: SessionId,
        secret: SessionSecret,
        last_revision: Revision,
        watches: Vec<WatchRegistration>,
    ) {
        let Some(identity) = self.clients.get(&connection).map(|c| c.identity.clone()) else {
            return;
        };
        let timeout_ms = match self.state.check_session_owner(session, &identity, secret) {
            Ok(timeout_ms) => timeout_ms,
            Err(Error::SessionExpired { .. }) => {
                self.answer(connection, cost, ServerFrame::SessionExpired { session });
                return;
            }
            Err(error) => {
                tracing::warn!(
                    node = self.config.id,
                    session,
                    %identity,
                    %error,
                    "resume refused"
                );
                let reason = error.to_string();
                self.answer(
                    connection,
                    cost,
                    ServerFrame::SessionRefused { session, reason },
                );
                return;
            }
        };
        if let Some(previous) = self.session_connection.insert(session, connection) {
            if previous != connection {
                if let Some(client) = self.clients.get_mut(&previous) {
                    client.session = None;
                }
            }
        }
        if let Some(client) = self.clients.get_mut(&connection) {
            client.session = Some(session);
        }
        self.watches.remove_session(session);
        // Registering a watch twice is one watch; duplicates would only
        // make the replay below dearer.
        let mut registered: Vec<(String, WatchKind)> =
            watches.into_iter().map(|w| (w.path, w.kind)).collect();
        registered.sort_unstable();
        registered.dedup();
        let missed = self.history.missed(&registered, last_revision);
        let mut refused = Vec::new();
        for (path, kind) in &missed.watches {
            if let Err(error) = self.watches.add(session, path, *kind) {
                let watch = WatchRegistration {
                    path: path.clone(),
                    kind: *kind,
                };
                refused.push(self.watch_refused(watch, error));
            }
        }
        self.note_keep_alive(session);
        let ready = ServerFrame::SessionReady {
            session,
            secret,
            timeout_ms,
            revision: self.state.revision(),
        };
        self.answer(connection, cost, ready);
        for frame in refused {
            self.send_to(connection, frame);
        }
        for event in missed.events {
            self.send_to(connection, ServerFrame::Event(event));
        }
    }

    fn on_tick(&mut self) {
        let now = self.now_ms;
        self.node.tick(now);
        self.note_election();
        self.note_rejoined();
        self.repropose_after_leader_change();
        // Proposals that found no leader try again.
        let waiting = std::mem::take(&mut self.unproposed);
        for item in waiting {
            if item.deadline_ms <= now {
                self.fail_proposal(&item.proposal);
            } else {
                self.propose(item.proposal, item.deadline_ms);
            }
        }
        for read in std::mem::take(&mut self.reads_retry) {
            if read.deadline_ms <= now {
                self.fail_read(read, "no leader could confirm the read in time");
            } else {
                self.start_linearizable_read(read);
            }
        }
        self.expire_waiting();
        self.serve_parked();
        self.leader_duties();
        self.identity_duties();
        if now >= self.last_keep_alive_flush_ms + self.config.timeouts.heartbeat_interval_ms {
            self.last_keep_alive_flush_ms = now;
            self.flush_keep_alives();
        }
    }

    /// Logs the moment a rejoining replica has caught up and votes again.
    fn note_rejoined(&mut self) {
        let joining = self.node.is_joining();
        if self.was_joining && !joining {
            tracing::info!(
                node = self.config.id,
                chosen_through = self.node.chosen_through(),
                "rejoined: caught up after a lost disk, voting again"
            );
        }
        self.was_joining = joining;
    }

    /// Counts and logs an election this replica starts.
    fn note_election(&mut self) {
        let role = self.node.role();
        if role == Role::Candidate && self.last_role != Role::Candidate {
            self.metrics.elections_started.inc();
            tracing::info!(
                node = self.config.id,
                ballot = %self.node.promised(),
                "election started"
            );
        }
        self.last_role = role;
    }

    /// Writes this replica forwarded to a leader that has since been
    /// replaced may have died with it: propose them again to the new one, in
    /// `(session, sequence)` order. The state machine applies a request at
    /// most once, and only the first application is answered, so a write
    /// the old leader did get chosen is not applied twice.
    fn repropose_after_leader_change(&mut self) {
        let Some(leader) = self.node.leader() else {
            return;
        };
        let previous = self.last_leader.replace(leader);
        if previous.is_none_or(|previous| previous == leader) {
            if previous.is_none() {
                tracing::info!(
                    node = self.config.id,
                    leader,
                    ballot = %self.node.promised(),
                    "leader known"
                );
            }
            return;
        }
        self.metrics.leader_changes.inc();
        tracing::info!(
            node = self.config.id,
            leader,
            previous,
            ballot = %self.node.promised(),
            "leader changed"
        );
        let again: Vec<(Request, u64)> = self
            .waiting_writes
            .values()
            .map(|waiting| (waiting.request.clone(), waiting.deadline_ms))
            .collect();
        if !again.is_empty() {
            tracing::info!(
                node = self.config.id,
                leader,
                writes = again.len(),
                "leader changed; proposing waiting writes again"
            );
        }
        for (request, deadline) in again {
            self.propose(Proposal::Client(request), deadline);
        }
    }

    fn fail_proposal(&mut self, proposal: &Proposal) {
        let response = self.unavailable("no leader accepted the write in time");
        match proposal {
            Proposal::Client(request) => {
                if let Some(waiting) = self
                    .waiting_writes
                    .remove(&(request.session, request.sequence))
                {
                    self.respond(
                        waiting.connection,
                        (&request.op, waiting.received),
                        request.sequence,
                        waiting.cost,
                        response,
                    );
                }
            }
            Proposal::OpenSession { origin, .. } => {
                if let Some(waiting) = self.opening.remove(&origin.token) {
                    let reason = "no leader could open the session in time".to_string();
                    let frame = ServerFrame::Unavailable { reason };
                    self.answer(waiting.connection, waiting.cost, frame);
                }
            }
            _ => {}
        }
    }

    fn fail_read(&mut self, read: PendingRead, reason: &str) {
        match read.kind {
            ReadKind::Op { request, .. } => {
                let response = self.unavailable(reason);
                self.respond(
                    read.connection,
                    (&request.op, read.received),
                    request.sequence,
                    read.cost,
                    response,
                );
            }
            ReadKind::Resume { .. } => {
                let reason = reason.to_string();
                let frame = ServerFrame::Unavailable { reason };
                self.answer(read.connection, read.cost, frame);
            }
        }
    }

    /// Requests not answered by their deadline (no leader for that long, or
    /// a write lost with a leader and not proposed again in time) get
    /// `Unavailable`; the client may retry them safely.
    fn expire_waiting(&mut self) {
        let now = self.now_ms;
        for ((_, sequence), waiting) in
            take_expired(&mut self.waiting_writes, |w| w.deadline_ms <= now)
        {
            let response = self.unavailable("the write was not applied in time");
            self.respond(
                waiting.connection,
                (&waiting.request.op, waiting.received),
                sequence,
                waiting.cost,
                response,
            );
        }
        for (_, waiting) in take_expired(&mut self.opening, |w| w.deadline_ms <= now) {
            let reason = "the session was not opened in time".to_string();
            let frame = ServerFrame::Unavailable { reason };
            self.answer(waiting.connection, waiting.cost, frame);
        }
        for (_, read) in take_expired(&mut self.reads_at_slot, |r| r.deadline_ms <= now) {
            self.fail_read(read, "the replica did not catch up in time");
        }
        for (_, read) in take_expired(&mut self.reads_at_revision, |r| r.deadline_ms <= now) {
            self.fail_read(read, "the revision asked for was not reached in time");
        }
    }

    fn leader_duties(&mut self) {
        let now = self.now_ms;
        let leading = self.node.role() == Role::Leader;
        if !leading {
            if self.tracker.take().is_some() {
                tracing::info!(node = self.config.id, "no longer leader");
            }
            return;
        }
        if self.tracker.is_none() {
            let tracker =
                SessionTracker::resume(&self.state, now, self.config.timeouts.session_grace_ms);
            tracing::info!(
                node = self.config.id,
                sessions = tracker.len(),
                "leading; resumed session deadlines from the last checkpoint"
            );
            self.tracker = Some(tracker);
            for session in std::mem::take(&mut self.keep_alives) {
                self.note_keep_alive(session);
            }
        }
        let interval = self.config.timeouts.session_checkpoint_interval_ms;
        let Some(tracker) = self.tracker.as_mut() else {
            return;
        };
        let expired = tracker.take_expired(now);
        let checkpoint = tracker.checkpoint_due(now, interval);
        let deadline = now + self.config.timeouts.request_timeout_ms;
        if !expired.is_empty() {
            tracing::info!(node = self.config.id, ?expired, "sessions expired");
            self.propose(Proposal::ExpireSessions(expired), deadline);
        }
        if let Some(remaining) = checkpoint {
            self.propose(Proposal::CheckpointSessions(remaining), deadline);
        }
        if let Some(end) = self.state.next_lock_delay_end_ms() {
            let every = self.config.timeouts.heartbeat_interval_ms;
            if now >= end && now >= self.last_tick_proposal_ms + every {
                self.last_tick_proposal_ms = now;
                self.propose(Proposal::Tick, deadline);
            }
        }
    }

    fn flush_keep_alives(&mut self) {
        if self.keep_alives.is_empty() {
            return;
        }
        let Some(leader) = self.node.leader().filter(|&l| l != self.config.id) else {
            return;
        };
        let sessions: Vec<SessionId> = std::mem::take(&mut self.keep_alives).into_iter().collect();
        let message = PeerMessage::KeepAlives {
            from: self.config.id,
            to: leader,
            sessions,
        };
        self.outbox.peer.push((leader, message));
    }

    fn on_snapshot_fetched(&mut self, result: Result<FetchedState, String>) {
        self.fetching_snapshot = false;
        let started = self.snapshot_fetch_started.take();
        let fetched = match result {
            Ok(fetched) => fetched,
            Err(error) => {
                self.metrics.snapshot_fetch_failures.inc();
                tracing::warn!(node = self.config.id, %error, "snapshot fetch failed");
                return;
            }
        };
        if let Some(started) = started {
            self.metrics
                .snapshot_fetch_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        let FetchedState { header, state } = fetched;
        let through = header.through;
        if through < self.node.apply_next() {
            return;
        }
        if self.state.cluster_identity().is_some()
            && state.cluster_identity() != self.state.cluster_identity()
        {
            // The transport refuses peers of another identity, so this
            // cannot come from the cluster; never adopt it.
            tracing::error!(
                node = self.config.id,
                "fetched snapshot belongs to another cluster identity; refused"
            );
            return;
        }
        if !header.membership.contains(self.config.id) {
            tracing::warn!(
                node = self.config.id,
                through,
                "fetched snapshot is of a membership without this replica; refused"
            );
            return;
        }
        tracing::info!(node = self.config.id, through, "installing snapshot");
        let membership = header.membership.clone();
        let old = std::mem::replace(&mut self.state, *state);
        self.outbox.discarded_state = Some(Box::new(old));
        self.outbox.storage.push(StorageJob::ActivateState(header));
        // The state writer reports StateSaved once the state is live on
        // disk. The core may hear of it now: the batch in which it then
        // compacts its log below the snapshot waits in the log writer until
        // the state writer has made the snapshot live
        // (`LogStore::wait_for_saved_state`).
        self.node
            .snapshot_installed(self.now_ms, through, membership);
        self.after_apply();
    }

    /// Takes the core's outputs until it has none.
    fn drain_core(&mut self) {
        for _ in 0..1_000 {
            if !self.node.has_ready() {
                break;
            }
            let ready = self.node.ready();
            self.carry_out(ready);
        }
        self.leader_duties_after_drain();
    }

    fn leader_duties_after_drain(&mut self) {
        if self.node.role() != Role::Leader && self.tracker.is_some() {
            self.tracker = None;
        }
    }

    fn carry_out(&mut self, ready: Ready) {
        let Ready {
            persist,
            messages,
            chosen,
            reads,
            snapshot,
            refusals,
        } = ready;
        for refusal in refusals {
            // A target of their own, so an operator can turn on just these.
            tracing::debug!(target: "synod_server::election", node = self.config.id, "{refusal}");
        }
        if let Some(batch) = persist {
            self.outbox.storage.push(StorageJob::Persist(batch));
        }
        for envelope in messages {
            let to = envelope.to;
            self.outbox.peer.push((to, PeerMessage::Paxos(envelope)));
        }
        if !chosen.is_empty() {
            let applying = Instant::now();
            for entry in chosen {
                self.apply_entry(entry);
            }
            self.metrics
                .apply_seconds
                .observe(applying.elapsed().as_secs_f64());
            self.save_changes();
            self.after_apply();
        }
        for outcome in reads {
            match outcome {
                ReadOutcome::Ready { id, read_index } => {
                    if let Some(read) = self.reads_at_core.remove(&id) {
                        if self.node.apply_next() > read_index {
                            self.serve_read(read);
                        } else {
                            self.reads_at_slot.insert((read_index, id), read);
                        }
                    }
                }
                ReadOutcome::Aborted { id } => {
                    if let Some(read) = self.reads_at_core.remove(&id) {
                        self.reads_retry.push(read);
                    }
                }
            }
        }
        if let Some(request) = snapshot {
            if !self.fetching_snapshot {
                self.fetching_snapshot = true;
                self.snapshot_fetch_started = Some(Instant::now());
                self.outbox.fetch_snapshot = Some(request.from);
            }
        }
    }

    fn apply_entry(&mut self, entry: ChosenEntry) {
        let Value::Commands(batch) = entry.value else {
            return;
        };
        self.metrics
            .slot_commands
            .observe(batch.commands.len() as f64);
        for bytes in batch.commands.iter() {
            if bytes.is_empty() {
                // A rejoining replica's nudge: fills a slot, changes nothing.
                continue;
            }
            let proposal = match Proposal::decode(bytes) {
                Ok(proposal) => proposal,
                Err(error) => {
                    // Every replica skips the same bytes, so the state
                    // machines stay identical.
                    tracing::error!(slot = entry.slot, %error, "skipping an undecodable log entry");
                    continue;
                }
            };
            let origin = match &proposal {
                Proposal::OpenSession { origin, secret, .. } => Some((*origin, *secret)),
                _ => None,
            };
            let request = match &proposal {
                Proposal::Client(request) => Some((request.session, request.sequence)),
                _ => None,
            };
            let command = proposal.into_command(batch.stamp_ms);
            let applied = self.state.apply(&command);
            self.dispatch(applied, origin, request);
        }
    }

    fn dispatch(
        &mut self,
        applied: Applied,
        origin: Option<(Origin, SessionSecret)>,
        request: Option<(SessionId, u64)>,
    ) {
        let Applied {
            revision: _,
            response,
            events,
            grants,
            ended_sessions,
        } = applied;
        // Events go out before the response of the command that fired them:
        // a client never sees a revision before the events at it.
        if !events.is_empty() {
            self.history.record(&events);
            for notification in self.watches.dispatch(&events) {
                if let Some(&connection) = self.session_connection.get(&notification.session) {
                    self.send_to(connection, ServerFrame::Event(notification.event));
                }
            }
        }
        if let Some(response) = response {
            if let (
                Some(tracker),
                Ok(synod_proto::OpResult::SessionOpened {
                    session,
                    timeout_ms,
                }),
            ) = (self.tracker.as_mut(), &response.result)
            {
                // The leader tracks every new session, whoever proposed it.
                tracker.opened(*session, *timeout_ms, self.now_ms);
            }
            if let Some((origin, secret)) = origin.filter(|(o, _)| o.node == self.config.id) {
                if let Some(waiting) = self.opening.remove(&origin.token) {
                    self.on_session_opened(waiting.connection, waiting.cost, secret, &response);
                }
            } else if let Some(key) = request {
                if let Some(waiting) = self.waiting_writes.remove(&key) {
                    self.respond(
                        waiting.connection,
                        (&waiting.request.op, waiting.received),
                        key.1,
                        waiting.cost,
                        response,
                    );
                }
            }
        }
        for grant in grants {
            if let Some(&connection) = self.session_connection.get(&grant.session) {
                let frame = ServerFrame::LockGranted {
                    sequencer: grant.sequencer,
                    election: grant.election,
                };
                self.send_to(connection, frame);
            }
        }
        if !ended_sessions.is_empty() {
            const LOGGED_SESSIONS_MAX: usize = 16;
            tracing::info!(
                node = self.config.id,
                count = ended_sessions.len(),
                sessions = ?&ended_sessions[..ended_sessions.len().min(LOGGED_SESSIONS_MAX)],
                "sessions ended (closed or expired)"
            );
            if let Some(tracker) = self.tracker.as_mut() {
                tracker.ended(&ended_sessions);
            }
            for session in ended_sessions {
                self.watches.remove_session(session);
                self.keep_alives.remove(&session);
                if let Some(connection) = self.session_connection.remove(&session) {
                    if let Some(client) = self.clients.get_mut(&connection) {
                        client.session = None;
                    }
                    self.send_to(connection, ServerFrame::SessionExpired { session });
                }
            }
        }
    }

    fn on_session_opened(
        &mut self,
        connection: ConnectionId,
        cost: u64,
        secret: SessionSecret,
        response: &Response,
    ) {
        let Ok(synod_proto::OpResult::SessionOpened {
            session,
            timeout_ms,
        }) = &response.result
        else {
            let reason = match &response.result {
                Err(error) => error.to_string(),
                Ok(_) => "unexpected answer to opening a session".into(),
            };
            self.answer(connection, cost, ServerFrame::Unavailable { reason });
            return;
        };
        if let Some(client) = self.clients.get_mut(&connection) {
            client.session = Some(*session);
            self.session_connection.insert(*session, connection);
        }
        let frame = ServerFrame::SessionReady {
            session: *session,
            secret,
            timeout_ms: *timeout_ms,
            revision: response.revision,
        };
        self.answer(connection, cost, frame);
    }

    /// After entries were applied: serve reads that waited for them.
    fn after_apply(&mut self) {
        let applied = self.node.apply_next().saturating_sub(1);
        let ready: Vec<(Slot, u64)> = self
            .reads_at_slot
            .range(..=(applied, u64::MAX))
            .map(|(&key, _)| key)
            .collect();
        for key in ready {
            if let Some(read) = self.reads_at_slot.remove(&key) {
                self.serve_read(read);
            }
        }
        let revision = self.state.revision();
        let ready: Vec<(Revision, u64)> = self
            .reads_at_revision
            .range(..=(revision, u64::MAX))
            .map(|(&key, _)| key)
            .collect();
        for key in ready {
            if let Some(read) = self.reads_at_revision.remove(&key) {
                self.serve_read(read);
            }
        }
    }

    /// Lets the core drop the log below the saved state (less its retained
    /// tail), but never the log after a snapshot being streamed to a peer.
    fn compact(&mut self, saved_through: Slot) {
        let through = match self.holds.floor() {
            Some(held) => saved_through.min(
                held.saturating_add(1)
                    .saturating_add(self.config.limits.log_retain_slots),
            ),
            None => saved_through,
        };
        self.node.compact(through);
    }

    /// Hands what the applied entries changed to the writer, through the
    /// last slot applied. Costs what changed, not the size of the state.
    fn save_changes(&mut self) {
        let applied = self.node.apply_next().saturating_sub(1);
        let delta = self.state.take_delta(applied, self.node.membership());
        self.outbox.storage.push(StorageJob::SaveState(delta));
    }

    /// Applies the chosen log the core holds from disk, before the replica
    /// talks to anyone, so that what the state knows (its cluster identity
    /// above all) is known before the first handshake. What it produces
    /// waits in the outbox for the runner.
    pub fn replay(&mut self) {
        self.drain_core();
    }

    /// What the peer transport must know of the cluster identity.
    pub fn identity_view(&self) -> IdentityView {
        IdentityView {
            cluster: self.state.cluster_identity(),
            confirmed: self.state.confirmed_members().clone(),
            joining: self.node.is_joining(),
        }
    }

    /// A leader whose state holds no cluster identity proposes one; a
    /// replica that holds it, is not rejoining and is not yet listed as
    /// confirmed says it holds it. Both are retried every election timeout
    /// until applied; the state machine keeps the first identity and
    /// records a confirmation once, so repeats are harmless.
    ///
    /// A confirmation waits one election timeout after the identity was
    /// first seen, so that the chosen prefix through the identity's slot is
    /// durable here before the cluster counts on this replica holding it: a
    /// replica that crashed before that restarts without the identity, and
    /// must not then be taken for one that lost its data.
    fn identity_duties(&mut self) {
        let now = self.now_ms;
        let every = self.config.timeouts.election_timeout_max_ms;
        let due = |last: Option<u64>| last.is_none_or(|last| now >= last.saturating_add(every));
        let deadline = now + self.config.timeouts.request_timeout_ms;
        if self.node.is_joining() {
            return;
        }
        match self.state.cluster_identity() {
            None => {
                if self.node.role() != Role::Leader || !due(self.last_mint_proposal_ms) {
                    return;
                }
                self.last_mint_proposal_ms = Some(now);
                // OS-seeded and cryptographically secure, as session secrets.
                let identity: u128 = rand::random();
                tracing::info!(
                    node = self.config.id,
                    identity = %identity_hex(identity),
                    "leading a cluster with no identity; proposing one"
                );
                self.propose(Proposal::MintClusterIdentity(identity), deadline);
            }
            Some(_) => {
                let seen = *self.identity_seen_ms.get_or_insert(now);
                let confirmed = self.state.confirmed_members().contains(&self.config.id);
                if confirmed || now < seen.saturating_add(every) {
                    return;
                }
                if !due(self.last_confirm_proposal_ms) {
                    return;
                }
                self.last_confirm_proposal_ms = Some(now);
                self.propose(Proposal::MemberConfirmed(self.config.id), deadline);
            }
        }
    }
}

/// Removes and returns, in key order, the entries of `map` that `expired`
/// says are past their deadline.
fn take_expired<K: Ord + Clone, V>(
    map: &mut BTreeMap<K, V>,
    expired: impl Fn(&V) -> bool,
) -> Vec<(K, V)> {
    let keys: Vec<K> = map
        .iter()
        .filter(|(_, value)| expired(value))
        .map(|(key, _)| key.clone())
        .collect();
    keys.into_iter()
        .filter_map(|key| map.remove(&key).map(|value| (key, value)))
        .collect()
}
