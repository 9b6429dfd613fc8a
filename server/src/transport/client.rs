//! The client port: authenticate, check the hello, and hand each session
//! stream to the replica as a channel of frames in and a byte-bounded
//! queue of replies out.
//!
//! Who may hold what, in the order a connection meets the bounds:
//! 1. `client_handshakes_max` handshakes in progress at once, each for at
//!    most `handshake_timeout`: a connection that has not shown a
//!    certificate holds nothing longer.
//! 2. The client's identity is its certificate's subject
//!    ([`tls::client_identity`]); it may hold
//!    `client_connections_per_identity_max` connections, and the replica
//!    `client_connections_max` in all. A refused connection is told which
//!    bound it met.
//! 3. Each connection's pending requests and queued replies are charged to
//!    its own [`ConnectionBudget`] (see that module).
//! 4. A connection that sends nothing for `client_idle_timeout` is closed.
//! 5. A connection whose hello asks for a backup ([`Hello::Backup`]) takes
//!    one of `backups_max` permits (or is refused), gets the saved state
//!    streamed as a peer would ([`send_snapshot`]), for at most
//!    `backup_timeout`, and is closed; it never reaches the replica's
//!    event loop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use synod_proto::tls::{self, FrameReadError, FrameReader, TlsMaterial};
use synod_proto::wire::{decode_frame, encode_frame, ClientFrame, Hello, HelloReply, ServerFrame};
use synod_proto::{Response, PROTOCOL_VERSION};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use super::budget::{ConnectionBudget, QueuedReply, Refusal, ReplySender, WeakReplySender};
use super::peer::refuse;
use super::snapshot::{open_registered, send_snapshot, SnapshotSource};
use super::tasks::{cancelled, Supervisor, Tasks};
use super::{
    close_code, RefusalSink, Result, TlsReloader, TlsTarget, TransportError, TransportLimits,
    CLOSE_LIMIT, CLOSE_NORMAL, CLOSE_PROTOCOL_ERROR, CLOSE_SHUTDOWN, CLOSE_TIMEOUT,
};

/// How a [`ClientListener`] is set up.
#[derive(Debug, Clone)]
pub struct ClientListenerConfig {
    /// This replica, named in the handshake's welcome.
    pub node_id: u64,
    /// Where to listen for clients (port 0 picks one; see
    /// [`ClientListener::local_addr`]).
    pub listen: SocketAddr,
    /// This replica's certificate, key and the cluster CA (clients must
    /// present a certificate it signed).
    pub tls: TlsMaterial,
    /// Bounds and timings.
    pub limits: TransportLimits,
    /// Where refusals are counted.
    pub refusals: RefusalSink,
}

/// One client's session stream, handed to the replica.
///
/// The replica reads `frames` until it returns `None` (the client went
/// away, or sent something malformed and was disconnected), settles each
/// frame's charge on the connection's budget when done with it
/// ([`ConnectionBudget::settle`]), and writes answers and events to
/// `replies`, which go out in order. Dropping every clone of `replies` ends
/// the session: the stream is finished and the connection closed once what
/// was sent has arrived.
#[derive(Debug)]
pub struct ClientConnection {
    /// Unique among this listener's connections, counting from 1.
    pub id: u64,
    /// The client's address (as of the handshake; QUIC migration may move it).
    pub remote: SocketAddr,
    /// The client's identity: its certificate's subject.
    pub identity: String,
    /// Frames from the client, decoded, bounded in size and charged.
    pub frames: mpsc::Receiver<InboundFrame>,
    /// Frames to the client.
    pub replies: ReplySender,
}

/// A frame from a client with the bytes it was charged to the
/// connection's pending budget; settle it with
/// [`ConnectionBudget::settle`]`(cost, is_request)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundFrame {
    /// The frame.
    pub frame: ClientFrame,
    /// Bytes charged (the frame's size on the wire).
    pub cost: u64,
}

impl InboundFrame {
    /// Whether the frame waits for an answer (a request, a session open or
    /// resume) and so counts against the pending requests bound until it
    /// is answered; other frames are settled as soon as they are handled.
    pub fn is_request(&self) -> bool {
        is_request(&self.frame)
    }
}

fn is_request(frame: &ClientFrame) -> bool {
    matches!(
        frame,
        ClientFrame::Request { .. }
            | ClientFrame::OpenSession { .. }
            | ClientFrame::ResumeSession { .. }
    )
}

/// Accepts client connections on the replica's client port.
///
/// A connection whose certificate the cluster CA did not sign fails in the
/// TLS handshake and never reaches the replica; one that speaks another
/// protocol version is refused with a reason it can print. Each accepted
/// connection is handed over as a [`ClientConnection`] on the channel given
/// to [`ClientListener::start`]. Dropping the listener closes its endpoint;
/// [`ClientListener::shutdown`] also waits for its tasks.
pub struct ClientListener {
    shared: Arc<Shared>,
    supervisor: Supervisor,
}

struct Shared {
    node_id: u64,
    limits: TransportLimits,
    endpoint: quinn::Endpoint,
    /// The QUIC settings every configuration is built with.
    quic_transport: Arc<quinn::TransportConfig>,
    connections: mpsc::Sender<ClientConnection>,
    next_id: AtomicU64,
    permits: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    connections_per_identity: Arc<Mutex<HashMap<String, usize>>>,
    refusals: RefusalSink,
    backups: Arc<Semaphore>,
    snapshot_source: RwLock<Option<Arc<dyn SnapshotSource>>>,
}

impl TlsTarget for Shared {
    fn replace_tls(&self, material: &TlsMaterial) -> Result<()> {
        let server = tls::quic_server_config(material, self.quic_transport.clone())?;
        self.endpoint.set_server_config(Some(server));
        Ok(())
    }
}

/// What a welcomed client asked for in its hello.
enum Purpose {
    /// A session: the stream goes to the replica.
    Session,
    /// A backup, holding one of the `backups_max` permits.
    Backup(OwnedSemaphorePermit),
}

/// One identity's hold on a connection slot, given back on drop.
struct IdentitySlot {
    identity: String,
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for IdentitySlot {
    fn drop(&mut self) {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = counts.get_mut(&self.identity) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.identity);
            }
        }
    }
}

impl Shared {
    /// Takes a connection slot for `identity`, or says which bound is met.
    fn take_slot(
        &self,
        identity: &str,
    ) -> std::result::Result<(IdentitySlot, OwnedSemaphorePermit), String> {
        let max = self.limits.client_connections_per_identity_max;
        {
            let mut counts = self
                .connections_per_identity
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let count = counts.entry(identity.to_owned()).or_insert(0);
            if *count >= max {
                self.refusals.refused("client_connections_per_identity_max");
                return Err(format!(
                    "client identity {identity:?} already has {max} connections to this replica \
                     (limit `limits.client_connections_per_identity_max`); close some first"
                ));
            }
            *count += 1;
        }
        let slot = IdentitySlot {
            identity: identity.to_owned(),
            counts: self.connections_per_identity.clone(),
        };
        let permit = self.permits.clone().try_acquire_owned().map_err(|_| {
            self.refusals.refused("client_connections_max");
            format!(
                "the replica serves {} client connections, its limit \
                 (`limits.client_connections_max`); try another replica",
                self.limits.client_connections_max
            )
        })?;
        Ok((slot, permit))
    }
}

impl ClientListener {
    /// Binds the client endpoint and starts accepting. Must be called
    /// inside a tokio runtime.
    ///
    /// # Errors
    /// [`TransportError::Config`] for unusable limits, [`TransportError::Tls`]
    /// for unusable TLS material, [`TransportError::Bind`] when the address
    /// cannot be bound.
    pub fn start(
        config: ClientListenerConfig,
        connections: mpsc::Sender<ClientConnection>,
    ) -> Result<Self> {
        let socket =
            std::net::UdpSocket::bind(config.listen).map_err(|source| TransportError::Bind {
                address: config.listen,
                source,
            })?;
        ClientListener::start_on(socket, config, connections)
    }

    /// As [`ClientListener::start`], on a socket bound beforehand;
    /// `config.listen` is ignored.
    ///
    /// # Errors
    /// As [`ClientListener::start`].
    pub fn start_on(
        socket: std::net::UdpSocket,
        config: ClientListenerConfig,
        connections: mpsc::Sender<ClientConnection>,
    ) -> Result<Self> {
        config.limits.validate()?;
        let address = socket.local_addr().map_err(|source| TransportError::Bind {
            address: config.listen,
            source,
        })?;
        let transport = config.limits.client_quic_transport()?;
        let server_config = tls::quic_server_config(&config.tls, transport.clone())?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| TransportError::Config("no tokio runtime is running".into()))?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            runtime,
        )
        .map_err(|source| TransportError::Bind { address, source })?;
        let (supervisor, tasks) = Supervisor::new();
        let shared = Arc::new(Shared {
            node_id: config.node_id,
            permits: Arc::new(Semaphore::new(config.limits.client_connections_max)),
            handshakes: Arc::new(Semaphore::new(config.limits.client_handshakes_max)),
            connections_per_identity: Arc::new(Mutex::new(HashMap::new())),
            refusals: config.refusals,
            backups: Arc::new(Semaphore::new(config.limits.backups_max)),
            snapshot_source: RwLock::new(None),
            limits: config.limits,
            endpoint,
            quic_transport: transport,
            connections,
            next_id: AtomicU64::new(1),
        });
        tasks.spawn(run_accept(shared.clone(), tasks.clone()));
        info!(
            node = shared.node_id,
            address = ?shared.endpoint.local_addr().ok(),
            "client transport listening"
        );
        Ok(ClientListener { shared, supervisor })
    }

    /// The address the endpoint is bound to.
    ///
    /// # Errors
    /// The socket's error.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.shared.endpoint.local_addr()
    }

    /// What replaces the TLS material of this endpoint, for the client
    /// connections it accepts from then on.
    pub fn tls_reloader(&self) -> TlsReloader {
        let target: Arc<dyn TlsTarget> = self.shared.clone();
        TlsReloader {
            targets: vec![Arc::downgrade(&target)],
        }
    }

    /// Sets where backups asked for by clients come from, replacing any
    /// earlier source. Until one is set, backups are answered that no
    /// snapshot is saved.
    pub fn register_snapshot_source(&self, source: Arc<dyn SnapshotSource>) {
        *self
            .shared
            .snapshot_source
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(source);
    }

    /// Client connections open now.
    pub fn open_connections(&self) -> usize {
        self.shared.endpoint.open_connections()
    }

    /// Closes every client connection (telling each session
    /// `Unavailable`) and the endpoint, and waits (boundedly) for the tasks
    /// to finish. Calling it again is harmless. The socket is released once
    /// the connections have drained and the `ClientListener` is dropped.
    pub async fn shutdown(&self) {
        self.supervisor.signal();
        self.shared
            .endpoint
            .close(close_code(CLOSE_SHUTDOWN), b"replica shutting down");
        let timeout = self.shared.limits.handshake_timeout;
        if !self.supervisor.wait(timeout).await {
            warn!(
                node = self.shared.node_id,
                "client tasks still running after shutdown"
            );
        }
        let drain = self.shared.limits.shutdown_drain_timeout;
        let _ = tokio::time::timeout(drain, self.shared.endpoint.wait_idle()).await;
    }
}

impl Drop for ClientListener {
    fn drop(&mut self) {
        self.supervisor.signal();
        self.shared
            .endpoint
            .close(close_code(CLOSE_SHUTDOWN), b"replica shutting down");
    }
}

impl std::fmt::Debug for ClientListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientListener")
            .field("node_id", &self.shared.node_id)
            .field("local_addr", &self.shared.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

async fn run_accept(shared: Arc<Shared>, tasks: Tasks) {
    let mut shutdown = tasks.shutdown();
    loop {
        let incoming = tokio::select! {
            _ = cancelled(&mut shutdown) => break,
            incoming = shared.endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let Ok(permit) = shared.handshakes.clone().try_acquire_owned() else {
            shared.refusals.refused("client_handshakes_max");
            warn!(
                node = shared.node_id,
                remote = %incoming.remote_address(),
                max = shared.limits.client_handshakes_max,
                "too many client handshakes in progress; refused"
            );
            incoming.refuse();
            continue;
        };
        tasks.spawn(serve_client(
            shared.clone(),
            incoming,
            permit,
            tasks.clone(),
        ));
    }
}

async fn serve_client(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    handshake_permit: OwnedSemaphorePermit,
    tasks: Tasks,
) {
    let mut shutdown = tasks.shutdown();
    let remote = incoming.remote_address();
    let limits = &shared.limits;
    let connection = match tokio::time::timeout(limits.handshake_timeout, incoming).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            // Includes certificates from another CA.
            info!(node = shared.node_id, %remote, %error, "client TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(node = shared.node_id, %remote, "client TLS handshake timed out");
            return;
        }
    };
    let identity = tls::peer_certificates(&connection)
        .and_then(|chain| chain.first().and_then(tls::client_identity));
    let admitted = match &identity {
        Some(identity) => shared.take_slot(identity),
        None => Err("the client certificate names no subject; issue it with a common name".into()),
    };
    let accepted = tokio::select! {
        _ = cancelled(&mut shutdown) => return,
        accepted = tokio::time::timeout(
            limits.handshake_timeout,
            accept_hello(&shared, &connection, admitted.as_ref().err().cloned()),
        ) => accepted,
    };
    drop(handshake_permit);
    let (mut send, frames, purpose) = match accepted {
        Ok(Some(session)) => session,
        Ok(None) => return,
        Err(_) => {
            debug!(node = shared.node_id, %remote, "no hello from client in time");
            connection.close(close_code(CLOSE_TIMEOUT), b"no hello in time");
            return;
        }
    };
    let (Some(identity), Ok(_slot)) = (identity, admitted) else {
        return;
    };
    if let Purpose::Backup(permit) = purpose {
        drop(frames);
        serve_backup(&shared, &connection, &identity, send, permit, &mut shutdown).await;
        return;
    }

    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let budget = ConnectionBudget::new(limits.client_bounds);
    let (frames_sender, frames_receiver) = mpsc::channel(limits.client_queue_frames_max);
    let (replies_sender, replies) = ReplySender::new(budget.clone());
    let weak_replies = replies_sender.downgrade();
    let handed = ClientConnection {
        id,
        remote,
        identity,
        frames: frames_receiver,
        replies: replies_sender,
    };
    let handed_over = tokio::select! {
        _ = cancelled(&mut shutdown) => false,
        sent = shared.connections.send(handed) => sent.is_ok(),
    };
    if !handed_over {
        let unavailable = ServerFrame::Unavailable {
            reason: "the replica is shutting down".to_string(),
        };
        let _ = send.write_all(&encode_frame(&unavailable)).await;
        let _ = send.finish();
        let _ = tokio::time::timeout(limits.handshake_timeout, send.stopped()).await;
        connection.close(close_code(CLOSE_SHUTDOWN), b"replica shutting down");
        return;
    }
    debug!(node = shared.node_id, id, %remote, "client session stream open");

    // The reader reports a malformed frame here, for the writer to tell the
    // client why before closing.
    let (fatal_sender, fatal) = mpsc::channel::<(String, u32)>(1);
    tasks.spawn(read_frames(
        shared.clone(),
        id,
        connection.clone(),
        frames,
        Inbound {
            frames: frames_sender,
            replies: weak_replies,
            budget: budget.clone(),
            refusals: shared.refusals.clone(),
            refusal_logged: AtomicBool::new(false),
        },
        fatal_sender,
        tasks.shutdown(),
    ));
    write_frames(
        &shared,
        id,
        &connection,
        send,
        replies,
        &budget,
        fatal,
        &mut shutdown,
    )
    .await;
}

/// Streams the saved state to a client that asked for a backup, within
/// `backup_timeout`, then closes the connection.
async fn serve_backup(
    shared: &Shared,
    connection: &quinn::Connection,
    identity: &str,
    mut send: quinn::SendStream,
    _permit: OwnedSemaphorePermit,
    shutdown: &mut watch::Receiver<bool>,
) {
    let mut pieces = open_registered(&shared.snapshot_source);
    let node = shared.node_id;
    let remote = connection.remote_address();
    let timeout = shared.limits.backup_timeout;
    tokio::select! {
        _ = cancelled(shutdown) => {
            connection.close(close_code(CLOSE_SHUTDOWN), b"replica shutting down");
            return;
        }
        outcome = tokio::time::timeout(timeout, send_snapshot(&mut send, &mut pieces)) => match outcome {
            Ok(Ok(Some(sent))) => info!(
                node, %remote, identity, through_slot = sent.through_slot, chunks = sent.chunks,
                bytes = sent.bytes, "backup sent"
            ),
            Ok(Ok(None)) => info!(node, %remote, identity, "backup asked for, but no state is saved"),
            Ok(Err(error)) => info!(node, %remote, identity, %error, "backup failed"),
            Err(_) => {
                info!(node, %remote, identity, "backup cut off: `limits.backup_timeout_ms` passed");
                connection.close(close_code(CLOSE_TIMEOUT), b"backup took too long");
                return;
            }
        },
    }
    connection.close(close_code(CLOSE_NORMAL), b"backup sent");
}

/// Reads the client's hello and answers it; the session stream if welcomed.
/// A connection that met a bound (`refusal`) is refused with it after its
/// hello, so the client can print why.
async fn accept_hello(
    shared: &Shared,
    connection: &quinn::Connection,
    refusal: Option<String>,
) -> Option<(quinn::SendStream, FrameReader, Purpose)> {
    let (mut send, receive) = match connection.accept_bi().await {
        Ok(streams) => streams,
        Err(error) => {
            debug!(node = shared.node_id, %error, "client connection closed before its hello");
            return None;
        }
    };
    let mut frames = FrameReader::new(receive, shared.limits.client_frame_bytes_max);
    let verdict = match frames.next::<Hello>().await {
        Ok(Some(Hello::Client { protocol_version })) if protocol_version == PROTOCOL_VERSION => {
            refusal.map_or(Ok(Purpose::Session), Err)
        }
        Ok(Some(Hello::Backup { protocol_version })) if protocol_version == PROTOCOL_VERSION => {
            match refusal {
                Some(reason) => Err(reason),
                None => shared
                    .backups
                    .clone()
                    .try_acquire_owned()
                    .map(Purpose::Backup)
                    .map_err(|_| {
                        shared.refusals.refused("backups_max");
                        format!(
                            "the replica is streaming {} backups, its limit \
                             (`limits.backups_max`); try again later or ask another replica",
                            shared.limits.backups_max
                        )
                    }),
            }
        }
        Ok(Some(
            Hello::Client { protocol_version } | Hello::Backup { protocol_version },
        )) => Err(format!(
            "protocol version {protocol_version} is not supported; this replica speaks version {PROTOCOL_VERSION}"
        )),
        Ok(Some(Hello::Peer { .. })) => Err(
            "this is a replica's client port; replicas connect to its peer port".to_string(),
        ),
        Ok(None) => Err("the stream ended before a hello".to_string()),
        Err(error) => Err(format!("unreadable hello: {error}")),
    };
    match verdict {
        Ok(purpose) => {
            let welcome = HelloReply::Welcome {
                protocol_version: PROTOCOL_VERSION,
                node_id: shared.node_id,
            };
            match send.write_all(&encode_frame(&welcome)).await {
                Ok(()) => Some((send, frames, purpose)),
                Err(error) => {
                    debug!(node = shared.node_id, %error, "cannot welcome client");
                    None
                }
            }
        }
        Err(reason) => {
            info!(
                node = shared.node_id,
                remote = %connection.remote_address(),
                %reason,
                "client refused"
            );
            refuse(connection, send, &reason, shared.limits.handshake_timeout).await;
            None
        }
    }
}

/// Where the reader puts what it reads: frames for the replica, and
/// answers of its own to requests over the budget.
struct Inbound {
    frames: mpsc::Sender<InboundFrame>,
    replies: WeakReplySender,
    budget: Arc<ConnectionBudget>,
    refusals: RefusalSink,
    /// Whether a refusal was logged for this connection yet.
    refusal_logged: AtomicBool,
}

/// Decodes the session stream (and keep-alive datagrams) into `frames`,
/// charging each frame to the connection's budget. Stops reading while the
/// client's replies are backed up; closes an idle connection.
async fn read_frames(
    shared: Arc<Shared>,
    id: u64,
    connection: quinn::Connection,
    mut stream: FrameReader,
    inbound: Inbound,
    fatal: mpsc::Sender<(String, u32)>,
    mut shutdown: watch::Receiver<bool>,
) {
    let idle_timeout = shared.limits.client_idle_timeout;
    let budget = &inbound.budget;
    let mut datagrams_open = true;
    // The idle timer is re-armed only when it fires, from the time the
    // client was last heard: resetting a timer per frame costs a visit to
    // the runtime's timer wheel each.
    let mut last_heard = tokio::time::Instant::now();
    let idle = tokio::time::sleep(idle_timeout);
    // Made once and polled across frames, as the idle timer is.
    let stop = cancelled(&mut shutdown);
    let connection_closed = connection.closed();
    tokio::pin!(idle, stop, connection_closed);
    loop {
        if budget.replies_backlogged() {
            // The client does not read its replies: read nothing more from
            // it until it does (QUIC flow control then stops it sending).
            // A client that goes away meanwhile must end this task too, or
            // its connection's state would be held for good.
            tokio::select! {
                _ = &mut stop => return,
                _ = &mut connection_closed => return,
                _ = budget.wait_until(|budget| !budget.replies_backlogged()) => {}
            }
            last_heard = tokio::time::Instant::now();
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = &mut idle => {
                let quiet_until = last_heard + idle_timeout;
                if quiet_until > tokio::time::Instant::now() {
                    idle.as_mut().reset(quiet_until);
                    continue;
                }
                let millis = idle_timeout.as_millis();
                debug!(node = shared.node_id, id, "client connection idle; closing");
                let reason = format!(
                    "the connection sent nothing for {millis} ms \
                     (limit `limits.client_idle_timeout_ms`)"
                );
                let _ = fatal.try_send((reason, CLOSE_TIMEOUT));
                return;
            }
            next = stream.next::<ClientFrame>() => match next {
                Ok(Some(frame)) => {
                    last_heard = tokio::time::Instant::now();
                    let cost = stream.last_frame_bytes();
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = &mut connection_closed => return,
                        delivered = deliver(&inbound, frame, cost) => if !delivered {
                            // The replica dropped the session.
                            return;
                        },
                    }
                }
                Ok(None) => {
                    debug!(node = shared.node_id, id, "client finished its session stream");
                    return;
                }
                Err(FrameReadError::Frame(error)) => {
                    warn!(node = shared.node_id, id, remote = %connection.remote_address(), %error, "bad frame from client; closing its connection");
                    let _ = fatal.try_send((error.to_string(), CLOSE_PROTOCOL_ERROR));
                    return;
                }
                Err(error) => {
                    debug!(node = shared.node_id, id, %error, "client session stream ended");
                    return;
                }
            },
            datagram = connection.read_datagram(), if datagrams_open => match datagram {
                Ok(bytes) => match decode_frame::<ClientFrame>(&bytes) {
                    // Keep-alives only: anything else must be ordered with
                    // the session stream. A full queue means the replica is
                    // busy with newer frames anyway.
                    Ok(ClientFrame::KeepAlive) => {
                        last_heard = tokio::time::Instant::now();
                        if budget.admit(0, false).is_ok() {
                            let frame = InboundFrame { frame: ClientFrame::KeepAlive, cost: 0 };
                            if inbound.frames.try_send(frame).is_err() {
                                budget.settle(0, false);
                            }
                        }
                    }
                    Ok(_) | Err(_) => {
                        debug!(node = shared.node_id, id, "datagram other than a keep-alive ignored");
                    }
                },
                Err(_) => datagrams_open = false,
            },
        }
    }
}

/// Charges `frame` and hands it to the replica; a request that does not
/// fit is answered here with the bound it met, and any other frame waits
/// for room. `false` once the replica is gone.
async fn deliver(inbound: &Inbound, frame: ClientFrame, cost: u64) -> bool {
    let request = is_request(&frame);
    loop {
        match inbound.budget.admit(cost, request) {
            Ok(()) => {
                return inbound
                    .frames
                    .send(InboundFrame { frame, cost })
                    .await
                    .is_ok();
            }
            Err(refusal @ (Refusal::Requests(_) | Refusal::Bytes(_))) if request => {
                let (limit, error) = match refusal {
                    Refusal::Requests(error) => ("pending_requests_per_connection_max", error),
                    Refusal::Bytes(error) => ("pending_request_bytes_per_connection_max", error),
                };
                inbound.refusals.refused(limit);
                // The first refusal of a connection is logged; the metric
                // counts them all, so a flood does not flood the log.
                if !inbound.refusal_logged.swap(true, Ordering::Relaxed) {
                    info!(
                        limit,
                        %error,
                        "client request refused (later refusals on this connection are only counted)"
                    );
                }
                let answer = match frame {
                    ClientFrame::Request { request, .. } => ServerFrame::Response {
                        sequence: request.sequence,
                        response: Response {
                            revision: 0,
                            result: Err(error),
                        },
                    },
                    _ => ServerFrame::Unavailable {
                        reason: error.to_string(),
                    },
                };
                if inbound.replies.send(&answer).is_err() {
                    inbound.budget.close(format!(
                        "the client does not read its replies (limit \
                         `limits.reply_queue_bytes_per_connection_max` is {} bytes)",
                        inbound.budget.bounds().reply_bytes_max
                    ));
                    return false;
                }
                return true;
            }
            Err(_) => {
                let bounds = inbound.budget.bounds();
                inbound
                    .budget
                    .wait_until(|budget| {
                        budget.pending_bytes() + cost + super::budget::PENDING_OVERHEAD_BYTES
                            <= bounds.pending_bytes_max
                    })
                    .await;
            }
        }
    }
}

/// Writes the replica's frames in order, many per write, giving their
/// charge back to the budget once written; on a fatal report from the
/// reader or a close asked through the budget, tells the client why and
/// closes.
#[allow(clippy::too_many_arguments)]
async fn write_frames(
    shared: &Shared,
    id: u64,
    connection: &quinn::Connection,
    mut send: quinn::SendStream,
    mut replies: mpsc::UnboundedReceiver<QueuedReply>,
    budget: &ConnectionBudget,
    mut fatal: mpsc::Receiver<(String, u32)>,
    shutdown: &mut watch::Receiver<bool>,
) {
    let limits = &shared.limits;
    let mut reader_open = true;
    let mut batch = Vec::new();
    // Made once and polled across replies: each would otherwise register
    // with (and leave) a notifier per reply.
    let stop = cancelled(shutdown);
    let budget_closed = budget.closed();
    let connection_closed = connection.closed();
    tokio::pin!(stop, budget_closed, connection_closed);
    loop {
        let first = tokio::select! {
            biased;
            _ = &mut stop => {
                close_with(
                    connection,
                    send,
                    "the replica is shutting down",
                    CLOSE_SHUTDOWN,
                    limits,
                )
                .await;
                return;
            }
            _ = &mut budget_closed => {
                let reason = budget.closing_reason().unwrap_or_default();
                info!(node = shared.node_id, id, %reason, "closing a client connection");
                connection.close(close_code(CLOSE_LIMIT), reason.as_bytes());
                return;
            }
            reason = fatal.recv(), if reader_open => match reason {
                Some((reason, code)) => {
                    close_with(connection, send, &reason, code, limits).await;
                    return;
                }
                None => {
                    reader_open = false;
                    continue;
                }
            },
            frame = replies.recv() => match frame {
                Some(frame) => frame,
                None => {
                    // The replica ended the session: let what was written
                    // arrive, then close.
                    let _ = send.finish();
                    let _ = tokio::time::timeout(limits.handshake_timeout, send.stopped()).await;
                    connection.close(close_code(CLOSE_NORMAL), b"session closed");
                    debug!(node = shared.node_id, id, "client session closed by the replica");
                    return;
                }
            },
            error = &mut connection_closed => {
                debug!(node = shared.node_id, id, %error, "client connection closed");
                return;
            }
        };
        batch.clear();
        batch.extend_from_slice(&first.bytes);
        let mut cost = first.cost;
        while batch.len() < limits.client_write_batch_bytes_max {
            match replies.try_recv() {
                Ok(frame) => {
                    batch.extend_from_slice(&frame.bytes);
                    cost += frame.cost;
                }
                Err(_) => break,
            }
        }
        tokio::select! {
            _ = &mut stop => {
                connection.close(close_code(CLOSE_SHUTDOWN), b"replica shutting down");
                return;
            }
            _ = &mut budget_closed => {
                let reason = budget.closing_reason().unwrap_or_default();
                info!(node = shared.node_id, id, %reason, "closing a client connection");
                connection.close(close_code(CLOSE_LIMIT), reason.as_bytes());
                return;
            }
            written = send.write_all(&batch) => if let Err(error) = written {
                debug!(node = shared.node_id, id, %error, "cannot write to client");
                return;
            },
        }
        budget.replies_written(cost);
    }
}

/// Tells the client why with `Unavailable`, lets it arrive (boundedly), and
/// closes the connection with `code` and the reason.
async fn close_with(
    connection: &quinn::Connection,
    mut send: quinn::SendStream,
    reason: &str,
    code: u32,
    limits: &TransportLimits,
) {
    let frame = ServerFrame::Unavailable {
        reason: reason.to_string(),
    };
    let told = async {
        send.write_all(&encode_frame(&frame)).await.ok()?;
        send.finish().ok()?;
        send.stopped().await.ok()
    };
    let _ = tokio::time::timeout(limits.handshake_timeout, told).await;
    connection.close(close_code(code), reason.as_bytes());
}
