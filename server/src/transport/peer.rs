//! Connections between replicas: one outgoing connection per other member,
//! with reconnection and backoff, carrying Paxos envelopes in batches; the
//! incoming side checks who is calling and delivers what it says; snapshots
//! travel on their own streams.
//!
//! Both sides check that the other holds a replica certificate for the node
//! it claims to be ([`replica_certificate_node`]), and the incoming side
//! checks the peer's cluster identity ([`ClusterIdentity::judge`]); the
//! dialling side records identity refusals ([`ClusterIdentity::refused_by`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use synod_paxos::{Envelope, NodeId};
use synod_proto::tls::{
    self, handshake, node_server_name, peer_certificates, replica_certificate_node, FrameReadError,
    FrameReader, HandshakeError, TlsMaterial,
};
use synod_proto::wire::{encode_frame, Hello, HelloReply, IdentityConflict, FRAME_HEADER_BYTES};
use synod_proto::PROTOCOL_VERSION;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use super::identity::ClusterIdentity;
use super::snapshot::{
    open_registered, send_snapshot, PeerRequest, SnapshotFrame, SnapshotHeader,
    CONTROL_FRAME_BYTES_MAX,
};
use super::tasks::{cancelled, Supervisor, Tasks};
use super::{
    close_code, PeerPayload, Result, SnapshotSource, TlsReloader, TlsTarget, TransportError,
    TransportLimits, CLOSE_NORMAL, CLOSE_PROTOCOL_ERROR, CLOSE_REFUSED, CLOSE_SHUTDOWN,
    CLOSE_SUPERSEDED, CLOSE_TIMEOUT,
};
use crate::address::HostPort;

/// How a [`PeerNetwork`] is set up.
#[derive(Debug, Clone)]
pub struct PeerNetworkConfig {
    /// This replica.
    pub node_id: NodeId,
    /// The cluster's identity; a peer of another cluster is refused.
    pub cluster_id: String,
    /// Where to listen for peers (port 0 picks one; see
    /// [`PeerNetwork::local_addr`]).
    pub listen: SocketAddr,
    /// Every member's peer address, this replica included; names are
    /// resolved at every dial.
    pub members: BTreeMap<NodeId, HostPort>,
    /// This replica's certificate (naming `node-<id>.synod`), key and CA.
    pub tls: TlsMaterial,
    /// Bounds and timings.
    pub limits: TransportLimits,
    /// The cluster identity peers are judged by, shared with the replica
    /// that publishes it ([`ClusterIdentity::unchecked`] judges no one).
    pub identity: Arc<ClusterIdentity>,
}

/// The replica's links to the other members.
///
/// [`PeerNetwork::send`] queues envelopes per destination and never blocks;
/// a task per peer dials it (again and again, with exponential backoff),
/// introduces this replica, and writes queued envelopes in batches on one
/// long-lived stream. Envelopes arriving from peers go to the channel given
/// to [`PeerNetwork::start`] once their sender is checked against the
/// authenticated peer.
///
/// Dropping a `PeerNetwork` signals its tasks and closes its endpoint;
/// [`PeerNetwork::shutdown`] also waits for them.
pub struct PeerNetwork<M: PeerPayload = Envelope> {
    shared: Arc<Shared<M>>,
    supervisor: Supervisor,
}

struct Shared<M: PeerPayload> {
    node_id: NodeId,
    cluster_id: String,
    limits: TransportLimits,
    endpoint: quinn::Endpoint,
    /// The QUIC settings every configuration is built with.
    quic_transport: Arc<quinn::TransportConfig>,
    /// How peers are dialled: replaced when the TLS material is.
    client_config: RwLock<quinn::ClientConfig>,
    members: BTreeMap<NodeId, HostPort>,
    outgoing: BTreeMap<NodeId, Outgoing<M>>,
    delivered: mpsc::Sender<M>,
    snapshot_source: RwLock<Option<Arc<dyn SnapshotSource>>>,
    incoming_by_node: Mutex<BTreeMap<NodeId, quinn::Connection>>,
    incoming_permits: Arc<Semaphore>,
    dropped_envelopes: AtomicU64,
    identity: Arc<ClusterIdentity>,
}

impl<M: PeerPayload> TlsTarget for Shared<M> {
    fn replace_tls(&self, material: &TlsMaterial) -> Result<()> {
        let server = tls::quic_server_config(material, self.quic_transport.clone())?;
        let client = tls::quic_client_config(material, self.quic_transport.clone())?;
        self.endpoint.set_server_config(Some(server));
        *self
            .client_config
            .write()
            .unwrap_or_else(PoisonError::into_inner) = client;
        Ok(())
    }
}

/// This replica's side of the link to one peer.
struct Outgoing<M> {
    queue: mpsc::Sender<M>,
    connection: watch::Receiver<Option<quinn::Connection>>,
    /// Cuts a backoff short: the peer just called us, so it is up.
    redial: Arc<Notify>,
}

impl<M: PeerPayload> PeerNetwork<M> {
    /// Binds the peer endpoint and starts dialling every other member.
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`TransportError::Config`] when `node_id` is not among `members` or a
    /// limit is unusable, [`TransportError::Tls`] for unusable TLS material,
    /// [`TransportError::Bind`] when the address cannot be bound.
    pub fn start(config: PeerNetworkConfig, delivered: mpsc::Sender<M>) -> Result<Self> {
        let socket =
            std::net::UdpSocket::bind(config.listen).map_err(|source| TransportError::Bind {
                address: config.listen,
                source,
            })?;
        PeerNetwork::start_on(socket, config, delivered)
    }

    /// As [`PeerNetwork::start`], on a socket bound beforehand (so that the
    /// members' addresses can be known before any of them starts, as in
    /// tests on ephemeral ports); `config.listen` is ignored.
    ///
    /// # Errors
    /// As [`PeerNetwork::start`].
    pub fn start_on(
        socket: std::net::UdpSocket,
        config: PeerNetworkConfig,
        delivered: mpsc::Sender<M>,
    ) -> Result<Self> {
        config.limits.validate()?;
        if !config.members.contains_key(&config.node_id) {
            return Err(TransportError::Config(format!(
                "node {} is not among the members {:?}",
                config.node_id,
                config.members.keys().collect::<Vec<_>>()
            )));
        }
        let address = socket.local_addr().map_err(|source| TransportError::Bind {
            address: config.listen,
            source,
        })?;
        let transport = config.limits.quic_transport()?;
        let server_config = tls::quic_server_config(&config.tls, transport.clone())?;
        let client_config = tls::quic_client_config(&config.tls, transport.clone())?;
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
        let mut outgoing = BTreeMap::new();
        let mut receivers = Vec::new();
        for (&peer, address) in &config.members {
            if peer == config.node_id {
                continue;
            }
            let (queue, queue_receiver) = mpsc::channel(config.limits.peer_queue_envelopes_max);
            let (connection_sender, connection) = watch::channel(None);
            let redial = Arc::new(Notify::new());
            outgoing.insert(
                peer,
                Outgoing {
                    queue,
                    connection,
                    redial: redial.clone(),
                },
            );
            receivers.push((
                peer,
                address.clone(),
                queue_receiver,
                connection_sender,
                redial,
            ));
        }
        let shared = Arc::new(Shared {
            node_id: config.node_id,
            cluster_id: config.cluster_id,
            incoming_permits: Arc::new(Semaphore::new(config.limits.peer_connections_max)),
            limits: config.limits,
            endpoint,
            quic_transport: transport,
            client_config: RwLock::new(client_config),
            members: config.members,
            outgoing,
            delivered,
            snapshot_source: RwLock::new(None),
            incoming_by_node: Mutex::new(BTreeMap::new()),
            dropped_envelopes: AtomicU64::new(0),
            identity: config.identity,
        });
        for (peer, address, queue, connection, redial) in receivers {
            tasks.spawn(run_outgoing(
                shared.clone(),
                Dialling {
                    peer,
                    address,
                    redial,
                },
                queue,
                connection,
                tasks.shutdown(),
            ));
        }
        tasks.spawn(run_accept(shared.clone(), tasks.clone()));
        info!(
            node = shared.node_id,
            address = ?shared.endpoint.local_addr().ok(),
            "peer transport listening"
        );
        Ok(PeerNetwork { shared, supervisor })
    }

    /// The address the endpoint is bound to.
    ///
    /// # Errors
    /// The socket's error.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.shared.endpoint.local_addr()
    }

    /// What replaces the TLS material of this endpoint: for the
    /// connections it accepts and the peers it dials from then on.
    pub fn tls_reloader(&self) -> TlsReloader {
        let target: Arc<dyn TlsTarget> = self.shared.clone();
        TlsReloader {
            targets: vec![Arc::downgrade(&target)],
        }
    }

    /// Queues `envelopes` for their destinations; never blocks. An envelope
    /// to a peer whose queue is full, to a node that is not a member, or too
    /// large for a frame, is dropped (counted in
    /// [`PeerNetwork::dropped_envelopes`]); the protocol retransmits what
    /// matters. An envelope to this replica itself is delivered locally.
    pub fn send(&self, envelopes: Vec<M>) {
        for envelope in envelopes {
            let to = envelope.recipient();
            let queued = if to == self.shared.node_id {
                self.shared.delivered.try_send(envelope).is_ok()
            } else if let Some(outgoing) = self.shared.outgoing.get(&to) {
                outgoing.queue.try_send(envelope).is_ok()
            } else {
                debug!(to, "envelope to a node that is not a member dropped");
                false
            };
            if !queued {
                self.shared
                    .dropped_envelopes
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Envelopes dropped so far by [`PeerNetwork::send`] or by a peer task
    /// (full queue, unknown destination, oversize).
    pub fn dropped_envelopes(&self) -> u64 {
        self.shared.dropped_envelopes.load(Ordering::Relaxed)
    }

    /// Whether the outgoing connection to `peer` is up now.
    pub fn is_connected(&self, peer: NodeId) -> bool {
        self.shared
            .outgoing
            .get(&peer)
            .is_some_and(|outgoing| outgoing.connection.borrow().is_some())
    }

    /// Sets where snapshots served to lagging peers come from, replacing any
    /// earlier source.
    pub fn register_snapshot_source(&self, source: Arc<dyn SnapshotSource>) {
        let mut slot = self
            .shared
            .snapshot_source
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *slot = Some(source);
    }

    /// Fetches `from`'s latest snapshot over a stream of its own on the
    /// connection to it, waiting up to the handshake timeout for that
    /// connection, and hands each chunk to `chunks` as it arrives (waiting
    /// for room there, which paces the transfer). Returns the slot the
    /// snapshot covers once every chunk was handed on and the sender's count
    /// of them matched. The whole transfer is bounded by
    /// [`TransportLimits::snapshot_timeout`] and its size by
    /// [`TransportLimits::snapshot_bytes_max`].
    ///
    /// # Errors
    /// [`TransportError::UnknownPeer`], [`TransportError::NotConnected`],
    /// [`TransportError::SnapshotUnavailable`],
    /// [`TransportError::SnapshotTooLarge`], [`TransportError::SnapshotLength`],
    /// [`TransportError::TimedOut`], or a connection or stream failure.
    pub async fn fetch_snapshot(&self, from: NodeId, chunks: mpsc::Sender<Bytes>) -> Result<u64> {
        let outgoing = self
            .shared
            .outgoing
            .get(&from)
            .ok_or(TransportError::UnknownPeer(from))?;
        let mut connection_watch = outgoing.connection.clone();
        let wait = self.shared.limits.handshake_timeout;
        let connection = match tokio::time::timeout(
            wait,
            connection_watch.wait_for(|connection| connection.is_some()),
        )
        .await
        {
            Ok(Ok(connection)) => connection.clone(),
            Ok(Err(_)) => return Err(TransportError::ShutDown),
            Err(_) => return Err(TransportError::NotConnected(from)),
        };
        let Some(connection) = connection else {
            return Err(TransportError::NotConnected(from));
        };
        let limit = self.shared.limits.snapshot_timeout;
        tokio::time::timeout(
            limit,
            receive_snapshot(&connection, from, &self.shared.limits, &chunks),
        )
        .await
        .map_err(|_| {
            TransportError::TimedOut(format!(
                "snapshot from node {from} not received in {limit:?}"
            ))
        })?
    }

    /// Stops dialling and accepting, closes every connection, and waits
    /// (boundedly) for the tasks and the endpoint to finish. Later calls to
    /// [`PeerNetwork::send`] drop everything, and
    /// [`PeerNetwork::fetch_snapshot`] fails. Calling it again is harmless.
    /// The socket is released once the connections have drained and the
    /// `PeerNetwork` is dropped.
    pub async fn shutdown(&self) {
        self.supervisor.signal();
        self.shared
            .endpoint
            .close(close_code(CLOSE_SHUTDOWN), b"replica shutting down");
        let timeout = self.shared.limits.handshake_timeout;
        if !self.supervisor.wait(timeout).await {
            warn!(
                node = self.shared.node_id,
                "peer tasks still running after shutdown"
            );
        }
        let drain = self.shared.limits.shutdown_drain_timeout;
        let _ = tokio::time::timeout(drain, self.shared.endpoint.wait_idle()).await;
    }
}

impl<M: PeerPayload> Drop for PeerNetwork<M> {
    fn drop(&mut self) {
        self.supervisor.signal();
        self.shared
            .endpoint
            .close(close_code(CLOSE_SHUTDOWN), b"replica shutting down");
    }
}

impl<M: PeerPayload> std::fmt::Debug for PeerNetwork<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerNetwork")
            .field("node_id", &self.shared.node_id)
            .field("cluster_id", &self.shared.cluster_id)
            .field("local_addr", &self.shared.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------
// Outgoing: dial, introduce, pump the queue.

/// Why a pump stopped.
enum PumpEnd {
    /// Shutdown: do not redial.
    Shutdown,
    /// The connection failed: redial.
    Lost(TransportError),
}

/// A dial pending this long when its peer calls in is started afresh.
const STALE_DIAL: Duration = Duration::from_millis(200);

/// Whom an outgoing task dials.
struct Dialling {
    peer: NodeId,
    /// Resolved at every dial.
    address: HostPort,
    /// Notified when the peer calls in: redial without waiting out the
    /// backoff (a member that restarts is reached at once, not after up to
    /// [`TransportLimits::reconnect_backoff_max`]).
    redial: Arc<Notify>,
}

async fn run_outgoing<M: PeerPayload>(
    shared: Arc<Shared<M>>,
    dialling: Dialling,
    mut queue: mpsc::Receiver<M>,
    connection_sender: watch::Sender<Option<quinn::Connection>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Dialling {
        peer,
        address,
        redial,
    } = dialling;
    let limits = &shared.limits;
    let mut backoff = limits.reconnect_backoff_min;
    let mut last_failure = String::new();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let mut started = Instant::now();
        let mut attempt = std::pin::pin!(dial(&shared, peer, &address));
        let dialled = loop {
            tokio::select! {
                _ = cancelled(&mut shutdown) => return,
                dialled = &mut attempt => break dialled,
                // The peer just called in. An attempt that has waited a
                // while sent its first packets while the peer was down,
                // and QUIC resends them only after a growing delay: a
                // fresh one gets through at once. A young attempt is left
                // alone (two members dialling each other at once must not
                // keep cancelling each other's attempts).
                _ = redial.notified() => {
                    if started.elapsed() >= STALE_DIAL {
                        attempt.set(dial(&shared, peer, &address));
                        started = Instant::now();
                    }
                }
            }
        };
        match dialled {
            Ok((connection, stream)) => {
                info!(node = shared.node_id, peer, %address, "connected to peer");
                backoff = limits.reconnect_backoff_min;
                last_failure.clear();
                connection_sender.send_replace(Some(connection.clone()));
                let end = pump(
                    &shared,
                    peer,
                    &connection,
                    stream,
                    &mut queue,
                    &mut shutdown,
                )
                .await;
                connection_sender.send_replace(None);
                match end {
                    PumpEnd::Shutdown => {
                        connection.close(close_code(CLOSE_SHUTDOWN), b"replica shutting down");
                        break;
                    }
                    PumpEnd::Lost(error) => {
                        info!(node = shared.node_id, peer, %error, "connection to peer lost");
                        connection.close(close_code(CLOSE_NORMAL), b"reconnecting");
                    }
                }
            }
            Err(error) => {
                // Log a failure once per streak of the same failure, so a
                // member that is down does not flood the log.
                let failure = error.to_string();
                if failure != last_failure {
                    warn!(node = shared.node_id, peer, %address, error = %failure, "cannot connect to peer; retrying with backoff");
                    last_failure = failure;
                } else {
                    debug!(node = shared.node_id, peer, %address, error = %failure, "cannot connect to peer");
                }
            }
        }
        tokio::select! {
            _ = cancelled(&mut shutdown) => break,
            _ = tokio::time::sleep(backoff) => {}
            _ = redial.notified() => {}
        }
        backoff = (backoff * 2).min(limits.reconnect_backoff_max);
    }
}

/// Connects to `peer`, introduces this replica and opens the envelope stream.
async fn dial<M: PeerPayload>(
    shared: &Shared<M>,
    peer: NodeId,
    configured: &HostPort,
) -> Result<(quinn::Connection, quinn::SendStream)> {
    let limits = &shared.limits;
    let local = shared
        .endpoint
        .local_addr()
        .map_err(|error| TransportError::Resolve(format!("{configured}: {error}")))?;
    let address = tokio::time::timeout(limits.handshake_timeout, configured.resolve(local))
        .await
        .map_err(|_| TransportError::Resolve(format!("{configured}: resolving timed out")))?
        .map_err(|error| TransportError::Resolve(format!("{configured}: {error}")))?;
    let client_config = shared
        .client_config
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let connecting = shared
        .endpoint
        .connect_with(client_config, address, &node_server_name(peer))
        .map_err(synod_proto::tls::HandshakeError::from)?;
    let connection = tokio::time::timeout(limits.handshake_timeout, connecting)
        .await
        .map_err(|_| TransportError::TimedOut(format!("TLS handshake with node {peer}")))??;
    // rustls checked the chain and the name node-<peer>.synod; a client's
    // certificate could carry that name too, so check it is a replica's.
    if let Err(reason) = check_replica_certificate(&connection, peer) {
        connection.close(close_code(CLOSE_REFUSED), reason.as_bytes());
        return Err(TransportError::PeerCertificate(format!(
            "node at {address}: {reason}"
        )));
    }
    let view = shared.identity.view();
    let hello = Hello::Peer {
        protocol_version: PROTOCOL_VERSION,
        cluster_id: shared.cluster_id.clone(),
        node_id: shared.node_id,
        cluster_identity: view.cluster,
        joining: view.joining,
    };
    let handshaken = match handshake(
        connection,
        &hello,
        CONTROL_FRAME_BYTES_MAX,
        limits.handshake_timeout,
    )
    .await
    {
        Ok(handshaken) => handshaken,
        Err(HandshakeError::IdentityRefused { reason, conflict }) => {
            shared.identity.refused_by(peer, conflict, &reason);
            return Err(HandshakeError::IdentityRefused { reason, conflict }.into());
        }
        Err(error) => return Err(error.into()),
    };
    // Welcomed: the peer holds the same identity, or none yet.
    shared.identity.agreed(peer);
    if handshaken.node_id != peer {
        // The certificate named `peer`, so this is a misconfiguration on
        // the other side; do not talk to it.
        handshaken
            .connection
            .close(close_code(CLOSE_REFUSED), b"unexpected node id");
        return Err(TransportError::Config(format!(
            "node at {address} says it is node {}, expected node {peer}",
            handshaken.node_id
        )));
    }
    let stream = handshaken.connection.open_uni().await?;
    Ok((handshaken.connection, stream))
}

/// Writes queued envelopes to `stream`, many per write, until the
/// connection fails or shutdown.
async fn pump<M: PeerPayload>(
    shared: &Shared<M>,
    peer: NodeId,
    connection: &quinn::Connection,
    mut stream: quinn::SendStream,
    queue: &mut mpsc::Receiver<M>,
    shutdown: &mut watch::Receiver<bool>,
) -> PumpEnd {
    let limits = &shared.limits;
    let mut batch = Vec::with_capacity(limits.peer_write_batch_bytes_max.min(64 * 1024));
    loop {
        let first = tokio::select! {
            _ = cancelled(shutdown) => return PumpEnd::Shutdown,
            error = connection.closed() => return PumpEnd::Lost(error.into()),
            envelope = queue.recv() => match envelope {
                Some(envelope) => envelope,
                None => return PumpEnd::Shutdown,
            },
        };
        batch.clear();
        append_envelope(shared, peer, &mut batch, &first);
        while batch.len() < limits.peer_write_batch_bytes_max {
            match queue.try_recv() {
                Ok(envelope) => append_envelope(shared, peer, &mut batch, &envelope),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        tokio::select! {
            _ = cancelled(shutdown) => return PumpEnd::Shutdown,
            written = stream.write_all(&batch) => {
                if let Err(error) = written {
                    return PumpEnd::Lost(error.into());
                }
            }
        }
    }
}

fn append_envelope<M: PeerPayload>(
    shared: &Shared<M>,
    peer: NodeId,
    batch: &mut Vec<u8>,
    envelope: &M,
) {
    let frame = encode_frame(envelope);
    let body_bytes = (frame.len() - FRAME_HEADER_BYTES) as u64;
    if body_bytes > shared.limits.peer_frame_bytes_max {
        warn!(
            node = shared.node_id,
            peer,
            bytes = body_bytes,
            max = shared.limits.peer_frame_bytes_max,
            "envelope larger than the peer frame bound dropped"
        );
        shared.dropped_envelopes.fetch_add(1, Ordering::Relaxed);
        return;
    }
    batch.extend_from_slice(&frame);
}

// ---------------------------------------------------------------------------
// Incoming: authenticate, deliver, serve snapshots.

async fn run_accept<M: PeerPayload>(shared: Arc<Shared<M>>, tasks: Tasks) {
    let mut shutdown = tasks.shutdown();
    loop {
        let incoming = tokio::select! {
            _ = cancelled(&mut shutdown) => break,
            incoming = shared.endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let Ok(permit) = shared.incoming_permits.clone().try_acquire_owned() else {
            debug!(
                node = shared.node_id,
                remote = %incoming.remote_address(),
                "too many incoming peer connections; refused"
            );
            incoming.refuse();
            continue;
        };
        tasks.spawn(serve_incoming(
            shared.clone(),
            incoming,
            permit,
            tasks.clone(),
        ));
    }
}

async fn serve_incoming<M: PeerPayload>(
    shared: Arc<Shared<M>>,
    incoming: quinn::Incoming,
    _permit: OwnedSemaphorePermit,
    tasks: Tasks,
) {
    let mut shutdown = tasks.shutdown();
    let remote = incoming.remote_address();
    let limits = &shared.limits;
    let connection = match tokio::time::timeout(limits.handshake_timeout, incoming).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            // Includes certificates from another CA.
            info!(node = shared.node_id, %remote, %error, "peer TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(node = shared.node_id, %remote, "peer TLS handshake timed out");
            return;
        }
    };
    let peer = tokio::select! {
        _ = cancelled(&mut shutdown) => return,
        verdict = tokio::time::timeout(limits.handshake_timeout, accept_hello(&shared, &connection)) => match verdict {
            Ok(Some(peer)) => peer,
            Ok(None) => return,
            Err(_) => {
                debug!(node = shared.node_id, %remote, "no hello from peer in time");
                connection.close(close_code(CLOSE_TIMEOUT), b"no hello in time");
                return;
            }
        },
    };
    info!(node = shared.node_id, peer, %remote, "peer connected");
    if let Some(outgoing) = shared.outgoing.get(&peer) {
        outgoing.redial.notify_one();
    }
    let superseded = lock(&shared.incoming_by_node).insert(peer, connection.clone());
    if let Some(old) = superseded {
        old.close(
            close_code(CLOSE_SUPERSEDED),
            b"superseded by a newer connection",
        );
    }
    loop {
        tokio::select! {
            _ = cancelled(&mut shutdown) => break,
            stream = connection.accept_uni() => match stream {
                Ok(stream) => tasks.spawn(read_envelopes(
                    shared.clone(),
                    connection.clone(),
                    peer,
                    stream,
                    tasks.shutdown(),
                )),
                Err(error) => {
                    debug!(node = shared.node_id, peer, %error, "incoming peer connection closed");
                    break;
                }
            },
            stream = connection.accept_bi() => match stream {
                Ok((send, receive)) => tasks.spawn(serve_snapshot(
                    shared.clone(),
                    peer,
                    send,
                    receive,
                    tasks.shutdown(),
                )),
                Err(error) => {
                    debug!(node = shared.node_id, peer, %error, "incoming peer connection closed");
                    break;
                }
            },
        }
    }
    let mut by_node = lock(&shared.incoming_by_node);
    if by_node
        .get(&peer)
        .is_some_and(|current| current.stable_id() == connection.stable_id())
    {
        by_node.remove(&peer);
    }
}

/// Reads the peer's hello and answers it; the peer's node id if welcomed.
/// A refused connection is closed with the reason.
async fn accept_hello<M: PeerPayload>(
    shared: &Shared<M>,
    connection: &quinn::Connection,
) -> Option<NodeId> {
    let (mut send, receive) = match connection.accept_bi().await {
        Ok(streams) => streams,
        Err(error) => {
            debug!(node = shared.node_id, %error, "peer connection closed before its hello");
            return None;
        }
    };
    let mut frames = FrameReader::new(receive, CONTROL_FRAME_BYTES_MAX);
    let verdict = match frames.next::<Hello>().await {
        Ok(Some(hello)) => judge_hello(shared, connection, hello),
        Ok(None) => Err(Refusal::Plain(
            "the stream ended before a hello".to_string(),
        )),
        Err(error) => Err(Refusal::Plain(format!(
            "unreadable hello ({error}); is the peer of another protocol version? this replica \
             speaks version {PROTOCOL_VERSION}"
        ))),
    };
    match verdict {
        Ok(peer) => {
            let welcome = HelloReply::Welcome {
                protocol_version: PROTOCOL_VERSION,
                node_id: shared.node_id,
            };
            match send.write_all(&encode_frame(&welcome)).await {
                Ok(()) => Some(peer),
                Err(error) => {
                    debug!(node = shared.node_id, peer, %error, "cannot welcome peer");
                    None
                }
            }
        }
        Err(Refusal::Plain(reason)) => {
            warn!(
                node = shared.node_id,
                remote = %connection.remote_address(),
                %reason,
                "peer refused"
            );
            refuse(connection, send, &reason, shared.limits.handshake_timeout).await;
            None
        }
        Err(Refusal::Identity(reason, conflict)) => {
            warn!(
                node = shared.node_id,
                remote = %connection.remote_address(),
                %reason,
                "peer refused for its cluster identity"
            );
            let reply = HelloReply::IdentityRefused {
                reason: reason.clone(),
                conflict,
            };
            refuse_with(
                connection,
                send,
                &reply,
                &reason,
                shared.limits.handshake_timeout,
            )
            .await;
            None
        }
    }
}

/// Why a peer's hello is refused.
enum Refusal {
    /// Anything but its cluster identity.
    Plain(String),
    /// Its cluster identity: the dialler decides from the conflict whether
    /// to stop.
    Identity(String, IdentityConflict),
}

/// Whether the leaf certificate `connection`'s peer presented is a replica
/// certificate for `node_id`; a reason for a person when it is not.
fn check_replica_certificate(
    connection: &quinn::Connection,
    node_id: NodeId,
) -> std::result::Result<(), String> {
    let Some(leaf) = peer_certificates(connection).and_then(|chain| chain.into_iter().next())
    else {
        return Err("no certificate was presented".to_string());
    };
    match replica_certificate_node(&leaf) {
        Ok(named) if named == node_id => Ok(()),
        Ok(named) => Err(format!(
            "the certificate presented is node {named}'s replica certificate, not one for {}, \
             so it cannot speak for node {node_id}",
            node_server_name(node_id)
        )),
        Err(error) => Err(format!(
            "the certificate presented is not a replica certificate for {} ({error}), so it \
             cannot speak for node {node_id}",
            node_server_name(node_id)
        )),
    }
}

fn judge_hello<M: PeerPayload>(
    shared: &Shared<M>,
    connection: &quinn::Connection,
    hello: Hello,
) -> std::result::Result<NodeId, Refusal> {
    let (protocol_version, cluster_id, node_id, cluster_identity, joining) = match hello {
        Hello::Peer {
            protocol_version,
            cluster_id,
            node_id,
            cluster_identity,
            joining,
        } => (
            protocol_version,
            cluster_id,
            node_id,
            cluster_identity,
            joining,
        ),
        Hello::Client { .. } | Hello::Backup { .. } => {
            return Err(Refusal::Plain(
                "this is a replica's peer port; clients connect to its client port".to_string(),
            ))
        }
    };
    if protocol_version != PROTOCOL_VERSION {
        return Err(Refusal::Plain(format!(
            "protocol version {protocol_version} is not supported; this replica speaks version {PROTOCOL_VERSION}"
        )));
    }
    if cluster_id != shared.cluster_id {
        return Err(Refusal::Plain(format!(
            "cluster id {cluster_id:?} does not match this replica's cluster {:?}",
            shared.cluster_id
        )));
    }
    if node_id == shared.node_id || !shared.members.contains_key(&node_id) {
        return Err(Refusal::Plain(format!(
            "node {node_id} is not another member of cluster {:?} (members: {:?})",
            shared.cluster_id,
            shared.members.keys().collect::<Vec<_>>()
        )));
    }
    check_replica_certificate(connection, node_id).map_err(Refusal::Plain)?;
    // Only an authenticated member's identity counts.
    shared
        .identity
        .judge(node_id, cluster_identity, joining)
        .map_err(|(reason, conflict)| Refusal::Identity(reason, conflict))?;
    Ok(node_id)
}

/// Sends a `Refused` reply, lets it arrive (boundedly), and closes.
pub(super) async fn refuse(
    connection: &quinn::Connection,
    send: quinn::SendStream,
    reason: &str,
    wait: Duration,
) {
    let reply = HelloReply::Refused {
        reason: reason.to_string(),
    };
    refuse_with(connection, send, &reply, reason, wait).await;
}

/// Sends `reply`, lets it arrive (boundedly), and closes with `reason`.
async fn refuse_with(
    connection: &quinn::Connection,
    mut send: quinn::SendStream,
    reply: &HelloReply,
    reason: &str,
    wait: Duration,
) {
    if send.write_all(&encode_frame(reply)).await.is_ok() && send.finish().is_ok() {
        let _ = tokio::time::timeout(wait, send.stopped()).await;
    }
    connection.close(close_code(CLOSE_REFUSED), reason.as_bytes());
}

async fn read_envelopes<M: PeerPayload>(
    shared: Arc<Shared<M>>,
    connection: quinn::Connection,
    peer: NodeId,
    stream: quinn::RecvStream,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut frames = FrameReader::new(stream, shared.limits.peer_frame_bytes_max);
    loop {
        let next = tokio::select! {
            _ = cancelled(&mut shutdown) => return,
            next = frames.next::<M>() => next,
        };
        match next {
            Ok(Some(envelope)) => {
                if envelope.sender() != peer || envelope.recipient() != shared.node_id {
                    warn!(
                        node = shared.node_id,
                        peer,
                        from = envelope.sender(),
                        to = envelope.recipient(),
                        "envelope with a sender or recipient other than the connection's dropped"
                    );
                    continue;
                }
                tokio::select! {
                    _ = cancelled(&mut shutdown) => return,
                    delivered = shared.delivered.send(envelope) => if delivered.is_err() {
                        // The driver is gone; so is the point of reading.
                        return;
                    },
                }
            }
            Ok(None) => return,
            Err(FrameReadError::Frame(error)) => {
                warn!(node = shared.node_id, peer, %error, "bad frame from peer; closing its connection");
                connection.close(
                    close_code(CLOSE_PROTOCOL_ERROR),
                    error.to_string().as_bytes(),
                );
                return;
            }
            Err(error) => {
                debug!(node = shared.node_id, peer, %error, "envelope stream from peer ended");
                return;
            }
        }
    }
}

async fn serve_snapshot<M: PeerPayload>(
    shared: Arc<Shared<M>>,
    peer: NodeId,
    mut send: quinn::SendStream,
    receive: quinn::RecvStream,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = &shared.limits;
    let mut frames = FrameReader::new(receive, CONTROL_FRAME_BYTES_MAX);
    match tokio::time::timeout(limits.handshake_timeout, frames.next::<PeerRequest>()).await {
        Ok(Ok(Some(PeerRequest::Snapshot))) => {}
        Ok(Ok(None)) => return,
        Ok(Err(error)) => {
            debug!(node = shared.node_id, peer, %error, "bad request on a peer stream");
            let _ = send.reset(close_code(CLOSE_PROTOCOL_ERROR));
            return;
        }
        Err(_) => {
            let _ = send.reset(close_code(CLOSE_TIMEOUT));
            return;
        }
    }
    let mut pieces = open_registered(&shared.snapshot_source);
    tokio::select! {
        _ = cancelled(&mut shutdown) => {}
        outcome = tokio::time::timeout(limits.snapshot_timeout, send_snapshot(&mut send, &mut pieces)) => match outcome {
            Ok(Ok(Some(sent))) => {
                info!(node = shared.node_id, peer, through_slot = sent.through_slot, chunks = sent.chunks, bytes = sent.bytes, "snapshot sent");
            }
            Ok(Ok(None)) => {}
            Ok(Err(error)) => info!(node = shared.node_id, peer, %error, "snapshot transfer failed"),
            Err(_) => info!(node = shared.node_id, peer, "snapshot transfer timed out"),
        },
    }
}

async fn receive_snapshot(
    connection: &quinn::Connection,
    from: NodeId,
    limits: &TransportLimits,
    chunks: &mpsc::Sender<Bytes>,
) -> Result<u64> {
    let (mut send, receive) = connection.open_bi().await?;
    send.write_all(&encode_frame(&PeerRequest::Snapshot))
        .await?;
    let _ = send.finish();
    let mut frames = FrameReader::new(receive, CONTROL_FRAME_BYTES_MAX);
    let through_slot = match frames.next::<SnapshotHeader>().await? {
        None => {
            return Err(TransportError::SnapshotUnavailable {
                from,
                reason: "the stream ended without an answer".to_string(),
            })
        }
        Some(SnapshotHeader::Unavailable { reason }) => {
            return Err(TransportError::SnapshotUnavailable { from, reason })
        }
        Some(SnapshotHeader::Ready { through_slot }) => through_slot,
    };
    frames.set_max_bytes(limits.peer_frame_bytes_max);
    let mut received = (0u64, 0u64);
    loop {
        let frame = frames.next::<SnapshotFrame>().await?;
        match frame {
            Some(SnapshotFrame::Chunk(chunk)) => {
                received.0 += 1;
                received.1 += chunk.len() as u64;
                if received.1 > limits.snapshot_bytes_max {
                    return Err(TransportError::SnapshotTooLarge {
                        from,
                        bytes: received.1,
                        max: limits.snapshot_bytes_max,
                    });
                }
                if chunks.send(chunk).await.is_err() {
                    return Err(TransportError::SnapshotUnavailable {
                        from,
                        reason: "the receiving side stopped taking chunks".to_string(),
                    });
                }
            }
            Some(SnapshotFrame::End {
                chunks: sent_chunks,
                bytes,
            }) => {
                if (sent_chunks, bytes) != received {
                    return Err(TransportError::SnapshotLength {
                        from,
                        received: received.1,
                        expected: bytes,
                    });
                }
                break;
            }
            Some(SnapshotFrame::Failed(reason)) => {
                return Err(TransportError::SnapshotUnavailable { from, reason })
            }
            None => {
                return Err(TransportError::SnapshotLength {
                    from,
                    received: received.1,
                    expected: received.1 + 1,
                })
            }
        }
    }
    // The end frame, then the end of the stream.
    match frames.next::<SnapshotFrame>().await? {
        None => Ok(through_slot),
        Some(_) => Err(TransportError::SnapshotLength {
            from,
            received: received.1 + 1,
            expected: received.1,
        }),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
