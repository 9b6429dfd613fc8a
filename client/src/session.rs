//! The session task: one per client, owning the connection to the replica
//! it is attached to.
//!
//! Requests are numbered by the session's sequence and pipelined on the
//! session stream; answers are matched by sequence. Events and lock grants
//! arrive on the same ordered stream and go to their subscribers.
//!
//! Liveness: the replica must be heard from. The QUIC connection sends a
//! keep-alive whenever it has sent nothing for a quarter of the liveness
//! timeout, which a live replica acknowledges at once (QUIC does, whatever
//! its event loop is doing); a replica that sends no packet at all for the
//! liveness timeout (400 ms by default) is dead, paused or cut off, and the
//! task tries another replica. That alone would miss a replica that is
//! alive but cannot serve: every sixth of the session timeout the task also
//! sends a session keep-alive and, unless one is still in flight, a
//! linearizable read of `/` (the "confirm ping"). Its answer proves more than that the replica is alive:
//! the replica reached a leader backed by a quorum, which is where the
//! keep-alives go. A confirm ping unanswered for a third of the timeout
//! makes the task try another replica: the replica died (a killed replica
//! sends no close, and QUIC's idle timeout alone would be slow), lost the
//! quorum, or is waiting on a leader that died. The session's deadline is
//! the send time of the last request the cluster confirmed (any write, or
//! linearizable read, answered) plus the timeout, less a margin: past it,
//! the session is in jeopardy, since the cluster may have expired it, so
//! locks and leaderships report themselves lost, never later than the
//! cluster could grant them to someone else. The task keeps
//! trying for as long again (a new Paxos leader gives sessions a grace to
//! find it), until a replica says the session expired or the time is up.
//! It resumes the session on the first replica that answers, re-registering
//! watches with the last revision through which it has seen every event,
//! and sends again every request not yet answered: the replica's state
//! machine answers a repeated `(session, sequence)` with its original result.
//!
//! Revisions: a replica sends a write's response before the events of that
//! same write, so a write answered at revision `r` proves only that events
//! through `r - 1` were seen; a read answered at `r` proves all through `r`.
//! The resume point is the highest revision so proven, and events replayed
//! at or below what was already delivered are dropped, so subscribers see
//! each event exactly once, in order.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use synod_proto::tls::{connect, FrameReader, Handshaken};
use synod_proto::wire::{
    encode_frame, ClientFrame, ClusterStatus, ReadConsistency, ServerFrame, WatchRegistration,
};
use synod_proto::{
    Error, Event, EventType, Op, OpResult, Request, Response, Revision, Sequencer, SessionId,
    SessionSecret, WatchKind,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::error::ClientError;
use crate::RetryPolicy;

/// The session's state, observable with [`crate::Client::state`] and, as
/// a stream of every transition, [`crate::Client::state_changes`].
///
/// ```no_run
/// # fn example(client: &synod_client::Client) {
/// use synod_client::SessionState;
/// match *client.state().borrow() {
///     SessionState::Connected { node_id, .. } => println!("served by replica {node_id}"),
///     SessionState::Suspended => println!("looking for a replica"),
///     SessionState::Expired | SessionState::Closed => println!("over"),
/// }
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Attached to a replica.
    Connected {
        /// The session.
        session: SessionId,
        /// The replica serving it.
        node_id: u64,
    },
    /// The connection failed; looking for another replica. Locks and
    /// ephemeral nodes are still held, unless the session expires before a
    /// replica is found; past the point where the cluster may expire it,
    /// lock guards and leaderships report themselves lost.
    Suspended,
    /// The session is gone for good: its locks are released and its
    /// ephemeral nodes deleted.
    Expired,
    /// The client was closed.
    Closed,
}

impl SessionState {
    /// Whether the session is over (expired or closed).
    ///
    /// ```
    /// use synod_client::SessionState;
    /// assert!(SessionState::Expired.is_ended());
    /// assert!(!SessionState::Suspended.is_ended());
    /// ```
    pub fn is_ended(self) -> bool {
        matches!(self, SessionState::Expired | SessionState::Closed)
    }
}

/// A lock grant that arrived for a queued acquire or campaign
/// ([`crate::Client::grants`]; [`crate::Client::lock`] and
/// [`crate::Client::campaign`] wait for it for you).
///
/// ```no_run
/// # async fn example(client: &synod_client::Client) {
/// if let Ok(grant) = client.grants().recv().await {
///     println!("{} granted at generation {}", grant.sequencer.path, grant.sequencer.generation);
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The fencing token.
    pub sequencer: Sequencer,
    /// Whether it is the leadership of an election.
    pub election: bool,
}

/// What callers ask of the session task.
pub(crate) enum Call {
    Request {
        op: Op,
        consistency: ReadConsistency,
        watch: Option<WatchKind>,
        reply: oneshot::Sender<Result<Response, ClientError>>,
    },
    AddWatch {
        registration: WatchRegistration,
    },
    RemoveWatch {
        registration: WatchRegistration,
    },
    Status {
        reply: oneshot::Sender<Result<ClusterStatus, ClientError>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// Settings of the session task.
#[derive(Clone)]
pub(crate) struct SessionSettings {
    pub endpoints: Vec<(SocketAddr, String)>,
    pub endpoint: quinn::Endpoint,
    pub session_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub frame_bytes_max: u64,
    pub retry: RetryPolicy,
    /// How long a session stays away from its home replica before it
    /// moves back, if home answers; `None`: it stays where it is.
    pub rebalance_after: Option<Duration>,
    /// How long the replica may send no QUIC packet at all before the
    /// session fails over (the connection's keep-alives make a live one
    /// answer well within it).
    pub liveness_timeout: Duration,
}

/// Bound on calls queued for the session task.
pub(crate) const CALLS_QUEUED_MAX: usize = 1024;
/// Bound on requests sent and not yet answered; later calls wait in the
/// queue. Well below a replica's default `pending_requests_per_connection_max`
/// (4,096), so a busy client is held back here rather than refused there.
pub(crate) const REQUESTS_IN_FLIGHT_MAX: usize = 1024;
/// Bound on events buffered per subscriber before it is told it lagged.
pub(crate) const EVENTS_BUFFERED_MAX: usize = 4096;
/// Bound on grants buffered per subscriber.
pub(crate) const GRANTS_BUFFERED_MAX: usize = 1024;
/// Bound on state transitions buffered per subscriber.
pub(crate) const TRANSITIONS_BUFFERED_MAX: usize = 256;

/// Where the answer to a status request goes.
type StatusReply = oneshot::Sender<Result<ClusterStatus, ClientError>>;

struct Outstanding {
    /// A confirm ping of the task's own, not a caller's request.
    internal: bool,
    /// When the current attempt was sent.
    sent_at: Instant,
    request: Request,
    consistency: ReadConsistency,
    watch: Option<WatchKind>,
    reply: oneshot::Sender<Result<Response, ClientError>>,
    deadline: Instant,
    attempts: u32,
    /// Set while waiting to be sent again after an `Unavailable` answer.
    retry_at: Option<Instant>,
}

/// What the session task shares with the client handles.
pub(crate) struct Shared {
    pub events: broadcast::Sender<Event>,
    pub grants: broadcast::Sender<Grant>,
    pub state: watch::Sender<SessionState>,
    pub transitions: broadcast::Sender<SessionState>,
    /// Counts the connections the session was served on; a change means the
    /// session moved, and lock grants sent meanwhile may have been lost.
    pub connections: watch::Sender<u64>,
    /// While suspended: when the cluster may expire the session.
    pub jeopardy: watch::Sender<Option<tokio::time::Instant>>,
}

impl Shared {
    pub(crate) fn new() -> Shared {
        let (events, _) = broadcast::channel(EVENTS_BUFFERED_MAX);
        let (grants, _) = broadcast::channel(GRANTS_BUFFERED_MAX);
        let (transitions, _) = broadcast::channel(TRANSITIONS_BUFFERED_MAX);
        let (state, _) = watch::channel(SessionState::Suspended);
        let (connections, _) = watch::channel(0);
        let (jeopardy, _) = watch::channel(None);
        Shared {
            jeopardy,
            events,
            grants,
            state,
            transitions,
            connections,
        }
    }

    fn set_state(&self, state: SessionState) {
        let previous = self.state.send_replace(state);
        if previous != state {
            let _ = self.transitions.send(state);
        }
    }
}

/// Which revisions' events the client has certainly seen, and the events
/// above that point already delivered (to drop their replays).
#[derive(Debug, Default)]
struct Revisions {
    complete_through: Revision,
    delivered_above: BTreeSet<Event>,
}

impl Revisions {
    fn complete(&mut self, revision: Revision) {
        if revision > self.complete_through {
            self.complete_through = revision;
            let keep = self
                .delivered_above
                .split_off(&Event {
                    path: String::new(),
                    event_type: EventType::NodeCreated,
                    revision: revision + 1,
                })
                .into_iter()
                .filter(|event| event.revision > revision)
                .collect();
            self.delivered_above = keep;
        }
    }

    /// Whether `event` is new; records it.
    fn admit(&mut self, event: &Event) -> bool {
        if event.event_type == EventType::HistoryCompacted {
            self.complete(event.revision);
            return true;
        }
        if event.revision <= self.complete_through || self.delivered_above.contains(event) {
            return false;
        }
        self.complete(event.revision.saturating_sub(1));
        self.delivered_above.insert(event.clone());
        true
    }
}

/// Opens a session on the first replica that answers, and starts the task.
pub(crate) async fn start(
    settings: SessionSettings,
    shared: Arc<Shared>,
) -> Result<mpsc::Sender<Call>, ClientError> {
    let mut last_error = String::from("no endpoints");
    let deadline = Instant::now() + Duration::from_millis(settings.session_timeout_ms.max(2000));
    for round in 0..1_000u32 {
        if Instant::now() >= deadline {
            break;
        }
        for (index, (address, name)) in settings.endpoints.iter().enumerate() {
            match open(&settings, *address, name).await {
                Ok((link, session, secret, timeout_ms, revision)) => {
                    let (calls, receiver) = mpsc::channel(CALLS_QUEUED_MAX);
                    let task = SessionTask {
                        settings: settings.clone(),
                        shared: shared.clone(),
                        session,
                        secret,
                        timeout_ms,
                        next_sequence: 1,
                        revisions: Revisions {
                            complete_through: revision,
                            ..Revisions::default()
                        },
                        outstanding: BTreeMap::new(),
                        watches: BTreeMap::new(),
                        status_waiters: VecDeque::new(),
                        endpoint_index: index,
                        home_index: index,
                        away_since: None,
                        last_confirmed: Instant::now(),
                        confirm_ping: None,
                        unavailable_in_a_row: 0,
                    };
                    shared.connections.send_modify(|count| *count += 1);
                    shared.set_state(SessionState::Connected {
                        session,
                        node_id: link.node_id,
                    });
                    tokio::spawn(task.run(link, receiver));
                    return Ok(calls);
                }
                Err(error) => last_error = format!("{address}: {error}"),
            }
        }
        tracing::debug!(round, %last_error, "no replica opened a session yet");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(ClientError::ConnectionLost(last_error))
}

struct Link {
    send: quinn::SendStream,
    frames: FrameReader,
    node_id: u64,
    connection: quinn::Connection,
}

fn dial_timeout(settings: &SessionSettings) -> Duration {
    Duration::from_millis((settings.session_timeout_ms / 4).clamp(250, 2000))
}

async fn dial(
    settings: &SessionSettings,
    address: SocketAddr,
    name: &str,
    timeout: Duration,
) -> Result<Link, String> {
    let Handshaken {
        connection,
        send,
        frames,
        node_id,
        ..
    } = connect(
        &settings.endpoint,
        address,
        name,
        settings.frame_bytes_max,
        timeout,
    )
    .await
    .map_err(|error| error.to_string())?;
    Ok(Link {
        send,
        frames,
        node_id,
        connection,
    })
}

async fn open(
    settings: &SessionSettings,
    address: SocketAddr,
    name: &str,
) -> Result<(Link, SessionId, SessionSecret, u64, Revision), String> {
    let mut link = dial(settings, address, name, dial_timeout(settings)).await?;
    let frame = ClientFrame::OpenSession {
        timeout_ms: settings.session_timeout_ms,
    };
    link.send
        .write_all(&encode_frame(&frame))
        .await
        .map_err(|error| error.to_string())?;
    let timeout = Duration::from_millis(settings.request_timeout_ms);
    let answer = tokio::time::timeout(timeout, link.frames.next::<ServerFrame>())
        .await
        .map_err(|_| "no answer to opening a session".to_string())
        .and_then(|read| read.map_err(|error| error.to_string()));
    match answer {
        Ok(Some(ServerFrame::SessionReady {
            session,
            secret,
            timeout_ms,
            revision,
        })) => Ok((link, session, secret, timeout_ms, revision)),
        other => {
            link.connection.close(0u32.into(), b"no session");
            match other {
                Ok(Some(ServerFrame::Unavailable { reason })) => Err(reason),
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(error) => Err(error),
            }
        }
    }
}

struct SessionTask {
    settings: SessionSettings,
    shared: Arc<Shared>,
    session: SessionId,
    /// Shown with the client's certificate to resume the session elsewhere.
    secret: SessionSecret,
    timeout_ms: u64,
    next_sequence: u64,
    revisions: Revisions,
    outstanding: BTreeMap<u64, Outstanding>,
    /// Watches to re-register on resume, with the number of handles using
    /// each persistent one.
    watches: BTreeMap<WatchRegistration, u64>,
    /// Status requests in flight, in order; `None` for the task's own pings.
    status_waiters: VecDeque<(Option<StatusReply>, Instant)>,
    endpoint_index: usize,
    /// The endpoint that opened the session: after a failover the session
    /// moves back to it (see [`SessionSettings::rebalance_after`]), so that
    /// sessions do not all end up on the one replica that survived the
    /// last faults.
    home_index: usize,
    /// Since when the session has been served away from home.
    away_since: Option<Instant>,
    /// When the last request the cluster confirmed was sent.
    last_confirmed: Instant,
    /// The sequence of the confirm ping in flight.
    confirm_ping: Option<u64>,
    unavailable_in_a_row: u32,
}

/// How often the session task looks at its deadlines and at whether the
/// replica is still heard from (more often when the liveness timeout is
/// short).
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(50);

/// When the replica was last heard from: the connection's count of UDP
/// datagrams received, and when it last moved.
struct Heard {
    datagrams: u64,
    at: Instant,
    /// When the count was last looked at.
    looked: Instant,
}

impl Heard {
    fn new(connection: &quinn::Connection) -> Heard {
        let now = Instant::now();
        Heard {
            datagrams: connection.stats().udp_rx.datagrams,
            at: now,
            looked: now,
        }
    }

    /// How long the replica has sent nothing, as of now. A look that comes
    /// more than `judge_within` after the previous one (this process was
    /// itself held up, and so may have read nothing off the socket) counts
    /// as hearing the replica: only silence seen by a running client is
    /// the replica's.
    fn silent_for(&mut self, connection: &quinn::Connection, judge_within: Duration) -> Duration {
        let now = Instant::now();
        let datagrams = connection.stats().udp_rx.datagrams;
        if datagrams != self.datagrams || now.duration_since(self.looked) > judge_within {
            self.datagrams = datagrams;
            self.at = now;
        }
        self.looked = now;
        now.duration_since(self.at)
    }
}

/// A look at whether the home replica answers again.
type HomeProbe = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Link, String>> + Send>>;

enum Exit {
    Closed,
    Expired,
    Disconnected,
}

/// Consecutive `Unavailable` answers after which the task tries another
/// replica.
const UNAVAILABLE_SWITCH_AFTER: u32 = 2;

impl SessionTask {
    fn ping_interval(&self) -> Duration {
        Duration::from_millis((self.timeout_ms / 6).max(50))
    }

    /// A confirm ping unanswered this long makes the task try another
    /// replica; and, on resume, how long one replica is given.
    fn silence_max(&self) -> Duration {
        Duration::from_millis((self.timeout_ms / 3).max(300))
    }

    /// When the cluster may expire the session if it hears nothing more.
    fn session_deadline(&self) -> Instant {
        let margin = (self.timeout_ms / 10).max(50);
        self.last_confirmed + Duration::from_millis(self.timeout_ms.saturating_sub(margin))
    }

    /// Records that the cluster confirmed a request sent at `sent_at`, and
    /// publishes the session's new deadline.
    fn confirmed(&mut self, sent_at: Instant) {
        if sent_at > self.last_confirmed {
            self.last_confirmed = sent_at;
            let deadline = tokio::time::Instant::from_std(self.session_deadline());
            self.shared.jeopardy.send_replace(Some(deadline));
        }
    }

    /// A confirm ping, as an outstanding request of the task's own.
    fn confirm_ping(&mut self) -> ClientFrame {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let (reply, _) = oneshot::channel();
        let now = Instant::now();
        let outstanding = Outstanding {
            internal: true,
            sent_at: now,
            request: Request {
                session: self.session,
                sequence,
                op: Op::Exists { path: "/".into() },
            },
            consistency: ReadConsistency::Linearizable,
            watch: None,
            reply,
            deadline: now + Duration::from_millis(self.settings.request_timeout_ms),
            attempts: 1,
            retry_at: None,
        };
        let frame = Self::request_frame(&outstanding);
        self.outstanding.insert(sequence, outstanding);
        self.confirm_ping = Some(sequence);
        frame
    }

    /// When to stop looking for a replica: the deadline plus as long again
    /// (at least 2 s), the time a new Paxos leader may add for sessions to
    /// find it.
    fn give_up_at(&self) -> Instant {
        self.session_deadline() + Duration::from_millis(self.timeout_ms.max(2000))
    }

    /// When a session away from home should see whether home answers
    /// again: `rebalance_after` after it left (or after the last look), and
    /// up to half as long again, so that the sessions that failed over
    /// together do not all move back at the same moment.
    fn home_probe_due(&self) -> Option<Instant> {
        let after = self.settings.rebalance_after?;
        let since = self.away_since?;
        let spread = RandomState::new().build_hasher().finish() % 500;
        Some(since + after + after * spread as u32 / 1000)
    }

    async fn run(mut self, mut link: Link, mut calls: mpsc::Receiver<Call>) {
        let deadline = tokio::time::Instant::from_std(self.session_deadline());
        self.shared.jeopardy.send_replace(Some(deadline));
        loop {
            let exit = self.serve(&mut link, &mut calls).await;
            link.connection.close(0u32.into(), b"client leaving");
            match exit {
                Exit::Closed => {
                    self.shared.set_state(SessionState::Closed);
                    self.fail_all(ClientError::Closed);
                    return;
                }
                Exit::Expired => {
                    self.expire();
                    return;
                }
                Exit::Disconnected => {
                    self.shared.set_state(SessionState::Suspended);
                    self.fail_status_waiters();
                    match self.reconnect(&mut calls).await {
                        Ok(new_link) => link = new_link,
                        Err(Exit::Closed) => {
                            // Closed while no replica could be told: the
                            // cluster ends the session at its timeout.
                            self.shared.set_state(SessionState::Closed);
                            self.fail_all(ClientError::Closed);
                            return;
                        }
                        Err(_) => {
                            self.expire();
                            return;
                        }
                    }
                }
            }
        }
    }

    fn expire(&mut self) {
        tracing::info!(session = self.session, "session expired");
        self.shared.set_state(SessionState::Expired);
        self.fail_all(ClientError::SessionExpired);
    }

    fn fail_status_waiters(&mut self) {
        for (waiter, _) in self.status_waiters.drain(..) {
            if let Some(waiter) = waiter {
                let _ = waiter.send(Err(ClientError::ConnectionLost(
                    "the replica was lost while answering".into(),
                )));
            }
        }
    }

    fn fail_all(&mut self, error: ClientError) {
        for (_, outstanding) in std::mem::take(&mut self.outstanding) {
            let _ = outstanding.reply.send(Err(error.clone()));
        }
        for (waiter, _) in self.status_waiters.drain(..) {
            if let Some(waiter) = waiter {
                let _ = waiter.send(Err(error.clone()));
            }
        }
    }

    async fn write(&self, link: &mut Link, frame: &ClientFrame) -> bool {
        link.send.write_all(&encode_frame(frame)).await.is_ok()
    }

    fn request_frame(outstanding: &Outstanding) -> ClientFrame {
        ClientFrame::Request {
            request: outstanding.request.clone(),
            consistency: outstanding.consistency,
            watch: outstanding.watch,
        }
    }

    /// Takes a call into the task's records; returns the frame to send now,
    /// if any, and whether the call asks to close.
    fn accept(
        &mut self,
        call: Call,
        connected: bool,
    ) -> (Option<ClientFrame>, Option<oneshot::Sender<()>>) {
        match call {
            Call::Request {
                op,
                consistency,
                watch,
                reply,
            } => {
                let sequence = self.next_sequence;
                self.next_sequence += 1;
                let outstanding = Outstanding {
                    internal: false,
                    sent_at: Instant::now(),
                    request: Request {
                        session: self.session,
                        sequence,
                        op,
                    },
                    consistency,
                    watch,
                    reply,
                    deadline: Instant::now()
                        + Duration::from_millis(self.settings.request_timeout_ms),
                    attempts: 1,
                    retry_at: None,
                };
                let frame = Self::request_frame(&outstanding);
                self.outstanding.insert(sequence, outstanding);
                (Some(frame), None)
            }
            Call::AddWatch { registration } => {
                let count = self.watches.entry(registration.clone()).or_insert(0);
                *count += 1;
                // Registering twice is one watch at the replica; sending it
                // again is harmless and keeps one-shot and persistent
                // registrations of the same key simple.
                (Some(ClientFrame::AddWatch(registration)), None)
            }
            Call::RemoveWatch { registration } => {
                let remove = match self.watches.get_mut(&registration) {
                    Some(count) if *count > 1 => {
                        *count -= 1;
                        false
                    }
                    Some(_) => true,
                    None => false,
                };
                if remove {
                    self.watches.remove(&registration);
                    (Some(ClientFrame::RemoveWatch(registration)), None)
                } else {
                    (None, None)
                }
            }
            Call::Status { reply } => {
                if connected {
                    self.status_waiters.push_back((Some(reply), Instant::now()));
                    (Some(ClientFrame::Status), None)
                } else {
                    let _ = reply.send(Err(ClientError::ConnectionLost(
                        "the session is looking for a replica".into(),
                    )));
                    (None, None)
                }
            }
            Call::Close { reply } => (None, Some(reply)),
        }
    }

    async fn serve(&mut self, link: &mut Link, calls: &mut mpsc::Receiver<Call>) -> Exit {
        let mut probe_due = self.home_probe_due();
        let mut home_probe: Option<HomeProbe> = None;
        let mut ping = tokio::time::interval(self.ping_interval());
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut housekeeping =
            tokio::time::interval(HOUSEKEEPING_INTERVAL.min(self.settings.liveness_timeout / 4));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = Heard::new(&link.connection);
        loop {
            tokio::select! {
                call = calls.recv(), if self.outstanding.len() < REQUESTS_IN_FLIGHT_MAX => {
                    let Some(call) = call else { return Exit::Closed };
                    let (frame, close) = self.accept(call, true);
                    if let Some(reply) = close {
                        self.close(link).await;
                        let _ = reply.send(());
                        return Exit::Closed;
                    }
                    if let Some(frame) = frame {
                        if !self.write(link, &frame).await {
                            return Exit::Disconnected;
                        }
                    }
                }
                frame = link.frames.next::<ServerFrame>() => {
                    match frame {
                        Ok(Some(ServerFrame::SessionExpired { .. })) => return Exit::Expired,
                        Ok(Some(frame)) => {
                            if self.on_frame(frame) {
                                return Exit::Disconnected;
                            }
                        }
                        Ok(None) | Err(_) => return Exit::Disconnected,
                    }
                }
                _ = ping.tick() => {
                    if !self.write(link, &ClientFrame::KeepAlive).await {
                        return Exit::Disconnected;
                    }
                    if self.confirm_ping.is_none() {
                        let frame = self.confirm_ping();
                        if !self.write(link, &frame).await {
                            return Exit::Disconnected;
                        }
                    }
                }
                probed = async { home_probe.as_mut().expect("guarded by the condition").await },
                    if home_probe.is_some() =>
                {
                    home_probe = None;
                    match probed {
                        Ok(home) => {
                            home.connection.close(0u32.into(), b"only looking");
                            tracing::info!(
                                session = self.session,
                                from = link.node_id,
                                to = home.node_id,
                                "moving the session back to its home replica"
                            );
                            // The reconnection tries home first.
                            let count = self.settings.endpoints.len().max(1);
                            self.endpoint_index = (self.home_index + count - 1) % count;
                            return Exit::Disconnected;
                        }
                        Err(error) => {
                            tracing::debug!(session = self.session, %error, "home replica still away");
                            self.away_since = Some(Instant::now());
                            probe_due = self.home_probe_due();
                        }
                    }
                }
                _ = housekeeping.tick() => {
                    if home_probe.is_none() && probe_due.is_some_and(|due| Instant::now() >= due) {
                        probe_due = None;
                        let settings = self.settings.clone();
                        let (address, name) = settings.endpoints[self.home_index].clone();
                        let within = dial_timeout(&settings);
                        home_probe = Some(Box::pin(async move {
                            dial(&settings, address, &name, within).await
                        }));
                    }
                    self.expire_requests();
                    let liveness = self.settings.liveness_timeout;
                    if heard.silent_for(&link.connection, liveness / 2) > liveness {
                        tracing::info!(
                            session = self.session,
                            node = link.node_id,
                            silent_ms = self.settings.liveness_timeout.as_millis() as u64,
                            "the replica is silent; failing over"
                        );
                        return Exit::Disconnected;
                    }
                    let stuck = self
                        .confirm_ping
                        .and_then(|sequence| self.outstanding.get(&sequence))
                        .is_some_and(|ping| ping.sent_at.elapsed() > self.silence_max());
                    if stuck && self.last_confirmed.elapsed() > self.silence_max() {
                        tracing::info!(
                            session = self.session,
                            node = link.node_id,
                            "the replica confirms nothing; failing over"
                        );
                        return Exit::Disconnected;
                    }
                    let now = Instant::now();
                    let due: Vec<u64> = self
                        .outstanding
                        .iter()
                        .filter(|(_, o)| o.retry_at.is_some_and(|at| at <= now))
                        .map(|(&sequence, _)| sequence)
                        .collect();
                    for sequence in due {
                        let Some(outstanding) = self.outstanding.get_mut(&sequence) else { continue };
                        outstanding.retry_at = None;
                        outstanding.attempts += 1;
                        outstanding.sent_at = Instant::now();
                        let frame = Self::request_frame(outstanding);
                        if !self.write(link, &frame).await {
                            return Exit::Disconnected;
                        }
                    }
                }
            }
        }
    }

    /// Ends the session at the cluster, waiting for the answer within the
    /// request timeout.
    async fn close(&mut self, link: &mut Link) {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let frame = ClientFrame::Request {
            request: Request {
                session: self.session,
                sequence,
                op: Op::CloseSession,
            },
            consistency: ReadConsistency::Linearizable,
            watch: None,
        };
        if !self.write(link, &frame).await {
            return;
        }
        let wait = Duration::from_millis(self.settings.request_timeout_ms);
        let _ = tokio::time::timeout(wait, async {
            for _ in 0..100_000u32 {
                match link.frames.next::<ServerFrame>().await {
                    Ok(Some(ServerFrame::Response { sequence: s, .. })) if s == sequence => break,
                    Ok(Some(ServerFrame::SessionExpired { .. })) | Ok(None) | Err(_) => break,
                    Ok(Some(frame)) => {
                        self.on_frame(frame);
                    }
                }
            }
        })
        .await;
    }

    fn expire_requests(&mut self) {
        let now = Instant::now();
        let expired: Vec<u64> = self
            .outstanding
            .iter()
            .filter(|(_, o)| o.deadline <= now)
            .map(|(&sequence, _)| sequence)
            .collect();
        for sequence in expired {
            if self.confirm_ping == Some(sequence) {
                self.confirm_ping = None;
            }
            if let Some(outstanding) = self.outstanding.remove(&sequence) {
                let _ = outstanding
                    .reply
                    .send(Err(ClientError::Timeout(self.settings.request_timeout_ms)));
            }
        }
    }

    /// Handles one frame; returns whether to try another replica.
    fn on_frame(&mut self, frame: ServerFrame) -> bool {
        match frame {
            ServerFrame::Response { sequence, response } => {
                return self.on_response(sequence, response);
            }
            ServerFrame::Event(event) => {
                if !self.revisions.admit(&event) {
                    tracing::debug!(?event, "dropping a replayed event");
                    return false;
                }
                // One-shot watches are gone once they fire.
                self.watches.retain(|w, _| {
                    w.kind.is_persistent()
                        || !w.kind.fires_on(&w.path, &event.path, event.event_type)
                });
                let _ = self.shared.events.send(event);
            }
            ServerFrame::LockGranted {
                sequencer,
                election,
            } => {
                let _ = self.shared.grants.send(Grant {
                    sequencer,
                    election,
                });
            }
            ServerFrame::Status(status) => {
                if let Some((Some(waiter), _)) = self.status_waiters.pop_front() {
                    let _ = waiter.send(Ok(status));
                }
            }
            ServerFrame::SessionReady { .. } => {}
            ServerFrame::Unavailable { reason } => {
                tracing::debug!(%reason, "replica unavailable");
            }
            ServerFrame::SessionExpired { .. } | ServerFrame::SessionRefused { .. } => {}
            ServerFrame::WatchRefused { watch, error } => {
                // Not re-registered on resume either: it would be refused
                // again.
                tracing::warn!(path = %watch.path, kind = ?watch.kind, %error, "watch refused");
                self.watches.remove(&watch);
            }
        }
        false
    }

    fn on_response(&mut self, sequence: u64, response: Response) -> bool {
        let Some(mut outstanding) = self.outstanding.remove(&sequence) else {
            return false;
        };
        if outstanding.internal {
            self.confirm_ping = None;
        }
        if let Err(Error::Unavailable { reason }) = &response.result {
            self.unavailable_in_a_row += 1;
            if outstanding.internal {
                return self.unavailable_in_a_row >= UNAVAILABLE_SWITCH_AFTER;
            }
            let retry = &self.settings.retry;
            let backoff = retry.backoff(outstanding.attempts);
            if outstanding.attempts < retry.attempts_max
                && Instant::now() + backoff < outstanding.deadline
            {
                tracing::debug!(sequence, %reason, attempts = outstanding.attempts, "retrying");
                outstanding.retry_at = Some(Instant::now() + backoff);
                self.outstanding.insert(sequence, outstanding);
                return self.unavailable_in_a_row >= UNAVAILABLE_SWITCH_AFTER;
            }
            let _ = outstanding.reply.send(Ok(response));
            return false;
        }
        self.unavailable_in_a_row = 0;
        let linearizable = !outstanding.request.op.is_read()
            || outstanding.consistency == ReadConsistency::Linearizable;
        if linearizable {
            self.confirmed(outstanding.sent_at);
        }
        if outstanding.request.op.is_read() {
            self.revisions.complete(response.revision);
        } else {
            self.revisions.complete(response.revision.saturating_sub(1));
        }
        if let (Some(kind), Some(path)) = (outstanding.watch, outstanding.request.op.read_path()) {
            let registered = response.result.is_ok() || kind == WatchKind::Exists;
            if registered {
                self.watches
                    .entry(WatchRegistration {
                        path: path.to_string(),
                        kind,
                    })
                    .or_insert(1);
            }
        }
        let result = match &response.result {
            Err(Error::StaleRequestSequence { .. }) => Err(ClientError::OutcomeUnknown),
            Ok(OpResult::SessionClosed) => Ok(response),
            _ => Ok(response),
        };
        let _ = outstanding.reply.send(result);
        false
    }

    /// Finds another replica and resumes there; `Exit::Expired` when the
    /// session is lost, `Exit::Closed` when the client was closed or dropped
    /// meanwhile.
    async fn reconnect(&mut self, calls: &mut mpsc::Receiver<Call>) -> Result<Link, Exit> {
        let count = self.settings.endpoints.len().max(1);
        let mut delay = Duration::from_millis(20);
        for attempt in 0..10_000u32 {
            let give_up = self.give_up_at();
            let now = Instant::now();
            if now >= give_up {
                tracing::info!(
                    session = self.session,
                    attempt,
                    "no replica resumed the session in time"
                );
                return Err(Exit::Expired);
            }
            // Calls made meanwhile are recorded, and sent once resumed.
            while self.outstanding.len() < REQUESTS_IN_FLIGHT_MAX {
                match calls.try_recv() {
                    Ok(call) => {
                        let (_, close) = self.accept(call, false);
                        if let Some(reply) = close {
                            let _ = reply.send(());
                            return Err(Exit::Closed);
                        }
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return Err(Exit::Closed),
                }
            }
            self.expire_requests();
            self.endpoint_index = (self.endpoint_index + 1) % count;
            let (address, name) = self.settings.endpoints[self.endpoint_index].clone();
            let remaining = give_up - now;
            let dial_within = dial_timeout(&self.settings).min(remaining);
            if let Ok(mut link) = dial(&self.settings, address, &name, dial_within).await {
                let frame = ClientFrame::ResumeSession {
                    session: self.session,
                    secret: self.secret,
                    last_revision: self.revisions.complete_through,
                    watches: self.watches.keys().cloned().collect(),
                };
                let sent_at = Instant::now();
                if self.write(&mut link, &frame).await {
                    // A replica whose leader died may hold the resume until
                    // its request timeout; another may answer sooner.
                    let wait = give_up
                        .saturating_duration_since(Instant::now())
                        .min(self.silence_max().max(Duration::from_millis(500)));
                    match tokio::time::timeout(wait, link.frames.next::<ServerFrame>()).await {
                        Ok(Ok(Some(ServerFrame::SessionReady { .. }))) => {
                            // The events it missed follow this frame; the
                            // resume point moves only as they arrive.
                            self.confirmed(sent_at);
                            self.unavailable_in_a_row = 0;
                            self.away_since = if self.endpoint_index == self.home_index {
                                None
                            } else {
                                Some(Instant::now())
                            };
                            tracing::info!(
                                session = self.session,
                                node = link.node_id,
                                "session resumed"
                            );
                            self.shared.connections.send_modify(|count| *count += 1);
                            self.shared.set_state(SessionState::Connected {
                                session: self.session,
                                node_id: link.node_id,
                            });
                            if self.resend(&mut link).await {
                                return Ok(link);
                            }
                            self.shared.set_state(SessionState::Suspended);
                        }
                        Ok(Ok(Some(ServerFrame::SessionExpired { .. }))) => {
                            link.connection.close(0u32.into(), b"session expired");
                            return Err(Exit::Expired);
                        }
                        Ok(Ok(Some(ServerFrame::SessionRefused { reason, .. }))) => {
                            // Only this client's identity with the secret
                            // may resume it: a refusal will not change.
                            tracing::warn!(session = self.session, %reason, "resume refused");
                            link.connection.close(0u32.into(), b"resume refused");
                            return Err(Exit::Expired);
                        }
                        other => {
                            tracing::debug!(?address, ?other, "resume failed");
                        }
                    }
                }
                link.connection.close(0u32.into(), b"resume failed");
            }
            let pause = delay.min(self.give_up_at().saturating_duration_since(Instant::now()));
            tokio::time::sleep(pause).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        }
        Err(Exit::Expired)
    }

    /// Sends every unanswered request again, in order, with its sequence.
    async fn resend(&mut self, link: &mut Link) -> bool {
        let frames: Vec<ClientFrame> = self
            .outstanding
            .values_mut()
            .map(|o| {
                o.retry_at = None;
                o.sent_at = Instant::now();
                Self::request_frame(o)
            })
            .collect();
        for frame in frames {
            if !self.write(link, &frame).await {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(path: &str, revision: Revision) -> Event {
        Event {
            path: path.into(),
            event_type: EventType::NodeDataChanged,
            revision,
        }
    }

    #[test]
    fn replayed_events_are_dropped_and_the_resume_point_is_proven() {
        let mut revisions = Revisions::default();
        assert!(revisions.admit(&event("/a", 5)));
        assert_eq!(revisions.complete_through, 4, "more events at 5 may follow");
        assert!(revisions.admit(&event("/b", 5)));
        assert!(!revisions.admit(&event("/a", 5)), "a replay");
        revisions.complete(6);
        assert!(revisions.delivered_above.is_empty());
        assert!(!revisions.admit(&event("/b", 5)));
        assert!(revisions.admit(&event("/b", 7)));
        // A write answered at 9: its own events may still come.
        revisions.complete(8);
        assert!(revisions.admit(&event("/c", 9)));
    }
}
