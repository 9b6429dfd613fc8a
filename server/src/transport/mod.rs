//! QUIC transport of a replica: [`PeerNetwork`] carries Paxos messages and
//! snapshots between replicas, [`ClientListener`] accepts client sessions.
//! Both run on tokio and talk to the replica driver only through channels
//! (and, for snapshots, a [`SnapshotSource`]).
//!
//! # Connections
//!
//! Every connection is mutual TLS 1.3 against the cluster CA
//! ([`synod_proto::tls`]); a certificate from another CA is refused by TLS
//! and never reaches this module's code. The connecting side then opens one
//! bidirectional stream and sends a [`Hello`](synod_proto::wire::Hello); the
//! replica answers [`HelloReply::Welcome`](synod_proto::wire::HelloReply) or
//! [`HelloReply::Refused`](synod_proto::wire::HelloReply) with a reason a
//! person can read, then closes a refused connection with
//! [`CLOSE_REFUSED`].
//!
//! - Peers: each replica keeps one outgoing connection to every other member
//!   and sends on it only; it receives on the connections the others opened
//!   to it. Both ends require a replica certificate for the node the other
//!   claims to be (`synod_proto::tls::replica_certificate_node`: a client
//!   certificate naming `node-<n>.synod` does not pass), and the replica
//!   dialled checks the dialler's cluster identity ([`identity`]),
//!   answering a mismatch with `HelloReply::IdentityRefused`. After the handshake the dialling replica opens one
//!   unidirectional stream and writes [`Envelope`](synod_paxos::Envelope)
//!   frames on it, many per write. A snapshot is fetched over a further
//!   bidirectional stream: one request frame, one header frame with the
//!   snapshot's slot, then chunk frames as the source produces them and an
//!   end frame counting them (see `snapshot.rs`).
//! - Clients: the handshake stream becomes the session stream, carrying
//!   [`ClientFrame`](synod_proto::wire::ClientFrame)s in and
//!   [`ServerFrame`](synod_proto::wire::ServerFrame)s out, in order.
//!   Keep-alives may also come as QUIC datagrams holding one postcard
//!   `ClientFrame::KeepAlive` (no length prefix).
//!
//! # Certificate rotation
//!
//! [`TlsReloader`] replaces an endpoint's certificate, key and CA for the
//! connections made after it (accepted and dialled); connections already
//! open keep the ones they were made with. It holds the endpoints weakly,
//! so it never keeps a stopped transport's socket bound.
//!
//! # Failure isolation
//!
//! A malformed or oversize frame closes only the connection it came on
//! ([`CLOSE_PROTOCOL_ERROR`]), after a client is told why with
//! `ServerFrame::Unavailable`. Nothing read from the network can panic.
//!
//! # Bounds
//!
//! Every queue, frame, batch, snapshot and wait is bounded by a field of
//! [`TransportLimits`].

mod budget;
mod client;
pub mod identity;
mod peer;
mod snapshot;
mod tasks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use synod_paxos::NodeId;
use synod_proto::tls::{FrameReadError, HandshakeError, TlsError};
use thiserror::Error;

pub use budget::{ConnectionBounds, ConnectionBudget, ReplyQueueFull, ReplySender};
pub use client::{ClientConnection, ClientListener, ClientListenerConfig, InboundFrame};
pub use identity::{ClusterIdentity, IdentityView};
pub use peer::{PeerNetwork, PeerNetworkConfig};
pub use snapshot::{SnapshotPiece, SnapshotSource};
pub(crate) use tasks::cancelled;

/// An endpoint whose TLS configuration can be replaced (see
/// [`TlsReloader`]).
trait TlsTarget: Send + Sync {
    fn replace_tls(&self, material: &synod_proto::tls::TlsMaterial) -> Result<()>;
}

/// Replaces the TLS material of a replica's endpoints for the connections
/// made from now on, without a restart (see the module docs). Built from
/// [`PeerNetwork::tls_reloader`] and [`ClientListener::tls_reloader`],
/// joined with [`TlsReloader::and`].
#[derive(Clone, Default)]
pub struct TlsReloader {
    targets: Vec<std::sync::Weak<dyn TlsTarget>>,
}

impl TlsReloader {
    /// One reloader for the endpoints of both.
    pub fn and(mut self, other: TlsReloader) -> TlsReloader {
        self.targets.extend(other.targets);
        self
    }

    /// Builds every endpoint's new configuration from `material`, then
    /// puts them all in place; when one cannot be built, none is replaced.
    /// `material` must have been checked for this replica
    /// ([`synod_proto::tls::check_node_material`]).
    ///
    /// # Errors
    /// [`TransportError::Tls`] for material no configuration can be built
    /// from, [`TransportError::Closed`] when every endpoint has stopped.
    pub fn reload(&self, material: &synod_proto::tls::TlsMaterial) -> Result<()> {
        let live: Vec<Arc<dyn TlsTarget>> = self
            .targets
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        if live.is_empty() {
            return Err(TransportError::Closed);
        }
        // Build every configuration first (quinn validates them as they
        // are built), so that a failure leaves each endpoint as it was.
        synod_proto::tls::server_config(material)?;
        synod_proto::tls::client_config(material)?;
        for target in live {
            target.replace_tls(material)?;
        }
        Ok(())
    }
}

/// Where the transport reports a connection or request it refused, by the
/// `[limits]` field it met (the replica counts them in its metrics).
/// Clones report to the same place; the default reports nowhere.
#[derive(Clone, Default)]
pub struct RefusalSink(Option<std::sync::Arc<dyn Fn(&'static str) + Send + Sync>>);

impl RefusalSink {
    /// A sink that calls `count` with the limit of each refusal.
    pub fn new(count: impl Fn(&'static str) + Send + Sync + 'static) -> RefusalSink {
        RefusalSink(Some(std::sync::Arc::new(count)))
    }

    /// Reports one refusal at `limit`.
    pub fn refused(&self, limit: &'static str) {
        if let Some(count) = &self.0 {
            count(limit);
        }
    }
}

impl std::fmt::Debug for RefusalSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RefusalSink").finish_non_exhaustive()
    }
}

/// Application close code: the connection ended normally.
pub const CLOSE_NORMAL: u32 = 0;
/// Application close code: the handshake was refused (see the reason).
pub const CLOSE_REFUSED: u32 = 1;
/// Application close code: a malformed or oversize frame arrived.
pub const CLOSE_PROTOCOL_ERROR: u32 = 2;
/// Application close code: the replica is shutting down.
pub const CLOSE_SHUTDOWN: u32 = 3;
/// Application close code: a newer connection from the same peer replaced
/// this one.
pub const CLOSE_SUPERSEDED: u32 = 4;
/// Application close code: no hello arrived in time, or the connection
/// was idle too long.
pub const CLOSE_TIMEOUT: u32 = 5;
/// Application close code: the client passed a bound of `[limits]` (the
/// reason names it).
pub const CLOSE_LIMIT: u32 = 6;

/// What travels between replicas: anything serde can carry that names its
/// sender and recipient. The transport checks the sender against the
/// authenticated peer and the recipient against this replica, and drops
/// anything else.
pub trait PeerPayload:
    serde::Serialize + serde::de::DeserializeOwned + Send + Sync + std::fmt::Debug + 'static
{
    /// The replica that sent it.
    fn sender(&self) -> synod_paxos::NodeId;
    /// The replica it is for.
    fn recipient(&self) -> synod_paxos::NodeId;
}

impl PeerPayload for synod_paxos::Envelope {
    fn sender(&self) -> synod_paxos::NodeId {
        self.from
    }

    fn recipient(&self) -> synod_paxos::NodeId {
        self.to
    }
}

/// Named bounds and timings of the transport, shared by peers and clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportLimits {
    /// Largest frame accepted from a peer (an envelope). A larger envelope
    /// is dropped by its sender with a warning.
    pub peer_frame_bytes_max: u64,
    /// Largest frame accepted from a client.
    pub client_frame_bytes_max: u64,
    /// Envelopes queued per peer; [`PeerNetwork::send`] drops envelopes to
    /// a peer whose queue is full (the protocol retries).
    pub peer_queue_envelopes_max: usize,
    /// Bytes of envelopes gathered into one stream write.
    pub peer_write_batch_bytes_max: usize,
    /// First wait before redialling a peer; doubled per failure.
    pub reconnect_backoff_min: Duration,
    /// Longest wait before redialling a peer.
    pub reconnect_backoff_max: Duration,
    /// Bound on the TLS handshake plus hello exchange.
    pub handshake_timeout: Duration,
    /// A client connection silent for this long is closed (by QUIC).
    pub idle_timeout: Duration,
    /// A peer connection that has received nothing (not even an
    /// acknowledgement of a keep-alive) for this long is closed and dialled
    /// afresh. Short, because after a partition heals QUIC resends on the
    /// old connection only after a delay that doubled all through the
    /// partition (seconds), while a new dial gets through at once: a link
    /// must not stay dead, and an election stall, long after the network
    /// is back.
    pub peer_idle_timeout: Duration,
    /// Keep-alive pings on idle connections, well below `idle_timeout`.
    pub keep_alive_interval: Duration,
    /// Largest snapshot accepted by [`PeerNetwork::fetch_snapshot`].
    pub snapshot_bytes_max: u64,
    /// Bound on one whole snapshot transfer.
    pub snapshot_timeout: Duration,
    /// Incoming peer connections served at once (members reconnecting, and
    /// strangers being refused).
    pub peer_connections_max: usize,
    /// Client connections served at once; more are refused at once.
    pub client_connections_max: usize,
    /// Client connections one client identity (certificate subject) may
    /// hold at once; more are refused with a reason naming the bound.
    pub client_connections_per_identity_max: usize,
    /// TLS handshakes and hellos in progress at once: connections that have
    /// not yet shown a certificate cannot hold more than this.
    pub client_handshakes_max: usize,
    /// A client connection that sends nothing (no frame, no keep-alive) for
    /// this long is closed.
    pub client_idle_timeout: Duration,
    /// Frames queued from one client connection to the replica.
    pub client_queue_frames_max: usize,
    /// What one client connection may make the replica hold.
    pub client_bounds: ConnectionBounds,
    /// Bytes of server frames gathered into one stream write.
    pub client_write_batch_bytes_max: usize,
    /// Backups streamed to clients at once; more are refused.
    pub backups_max: usize,
    /// Bound on streaming one backup to a client.
    pub backup_timeout: Duration,
    /// On shutdown, how long to wait for closed connections to drain (so
    /// peers hear the close) before giving up; the socket is released once
    /// they have drained.
    pub shutdown_drain_timeout: Duration,
}

impl Default for TransportLimits {
    fn default() -> Self {
        TransportLimits {
            peer_frame_bytes_max: 16 << 20,
            client_frame_bytes_max: synod_proto::wire::DEFAULT_MAX_FRAME_BYTES,
            peer_queue_envelopes_max: 4096,
            peer_write_batch_bytes_max: 1 << 20,
            reconnect_backoff_min: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
            peer_idle_timeout: Duration::from_secs(2),
            keep_alive_interval: Duration::from_millis(500),
            snapshot_bytes_max: 1 << 30,
            snapshot_timeout: Duration::from_secs(300),
            peer_connections_max: 64,
            client_connections_max: 10_000,
            client_connections_per_identity_max: 16,
            client_handshakes_max: 256,
            client_idle_timeout: Duration::from_secs(60),
            client_queue_frames_max: 1024,
            client_bounds: ConnectionBounds::default(),
            client_write_batch_bytes_max: 1 << 20,
            backups_max: 2,
            backup_timeout: Duration::from_secs(3600),
            shutdown_drain_timeout: Duration::from_secs(1),
        }
    }
}

impl TransportLimits {
    /// Checks the limits are usable.
    ///
    /// # Errors
    /// [`TransportError::Config`] naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("peer_frame_bytes_max", self.peer_frame_bytes_max > 0),
            ("client_frame_bytes_max", self.client_frame_bytes_max > 0),
            (
                "peer_queue_envelopes_max",
                self.peer_queue_envelopes_max > 0,
            ),
            (
                "peer_write_batch_bytes_max",
                self.peer_write_batch_bytes_max > 0,
            ),
            ("peer_connections_max", self.peer_connections_max > 0),
            ("client_connections_max", self.client_connections_max > 0),
            (
                "client_connections_per_identity_max",
                self.client_connections_per_identity_max > 0,
            ),
            ("client_handshakes_max", self.client_handshakes_max > 0),
            ("client_idle_timeout", !self.client_idle_timeout.is_zero()),
            (
                "client_bounds.pending_requests_max",
                self.client_bounds.pending_requests_max > 0,
            ),
            ("client_queue_frames_max", self.client_queue_frames_max > 0),
            (
                "client_write_batch_bytes_max",
                self.client_write_batch_bytes_max > 0,
            ),
            (
                "reconnect_backoff_min",
                !self.reconnect_backoff_min.is_zero(),
            ),
            ("handshake_timeout", !self.handshake_timeout.is_zero()),
            ("keep_alive_interval", !self.keep_alive_interval.is_zero()),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, ok)| !ok) {
            return Err(TransportError::Config(format!("{field} must be positive")));
        }
        if self.reconnect_backoff_max < self.reconnect_backoff_min {
            return Err(TransportError::Config(
                "reconnect_backoff_max is below reconnect_backoff_min".into(),
            ));
        }
        if self.keep_alive_interval >= self.idle_timeout.min(self.peer_idle_timeout) {
            return Err(TransportError::Config(
                "keep_alive_interval must be below idle_timeout".into(),
            ));
        }
        if self.client_bounds.pending_bytes_max
            < self.client_frame_bytes_max + budget::PENDING_OVERHEAD_BYTES
        {
            return Err(TransportError::Config(
                "client pending bytes must hold the largest client frame".into(),
            ));
        }
        if self.client_bounds.reply_bytes_max
            < 2 * (self.client_frame_bytes_max + budget::REPLY_OVERHEAD_BYTES)
        {
            return Err(TransportError::Config(
                "the client reply queue must hold two of the largest frames".into(),
            ));
        }
        let semaphore_max = tokio::sync::Semaphore::MAX_PERMITS;
        if self.client_connections_max > semaphore_max
            || self.client_handshakes_max > semaphore_max
            || self.peer_connections_max > semaphore_max
        {
            return Err(TransportError::Config(format!(
                "connection bounds must be at most {semaphore_max}"
            )));
        }
        if self.peer_frame_bytes_max > u64::from(u32::MAX)
            || self.client_frame_bytes_max > u64::from(u32::MAX)
        {
            return Err(TransportError::Config(
                "frame bounds must fit the u32 length prefix".into(),
            ));
        }
        Ok(())
    }

    /// The QUIC transport settings these limits imply, for peers.
    ///
    /// # Errors
    /// [`TransportError::Config`] when `idle_timeout` is out of QUIC's range.
    pub(crate) fn quic_transport(&self) -> Result<Arc<quinn::TransportConfig>> {
        let mut transport = self.base_transport()?;
        let idle = quinn::IdleTimeout::try_from(self.peer_idle_timeout)
            .map_err(|_| TransportError::Config("peer_idle_timeout is out of range".into()))?;
        transport.max_idle_timeout(Some(idle));
        // Members of a cluster are close to each other. QUIC's default
        // guess of a 333 ms round trip resends a lost first packet only
        // after about a second: a dial that reached a member while it was
        // restarting would wait that long to get through.
        transport.initial_rtt(PEER_INITIAL_RTT);
        Ok(Arc::new(transport))
    }

    /// The QUIC transport settings for the client port: a client may have
    /// one bidirectional stream (its session) and no unidirectional ones,
    /// so that unaccepted streams cannot pile up buffered data, and a small
    /// datagram buffer (keep-alives only).
    ///
    /// # Errors
    /// As [`TransportLimits::quic_transport`].
    pub(crate) fn client_quic_transport(&self) -> Result<Arc<quinn::TransportConfig>> {
        let mut transport = self.base_transport()?;
        transport
            .max_concurrent_bidi_streams(quinn::VarInt::from_u32(CLIENT_STREAMS_MAX))
            .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
            .datagram_receive_buffer_size(Some(CLIENT_DATAGRAM_BUFFER_BYTES));
        Ok(Arc::new(transport))
    }

    fn base_transport(&self) -> Result<quinn::TransportConfig> {
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| TransportError::Config("idle_timeout is out of range".into()))?;
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(self.keep_alive_interval));
        Ok(transport)
    }
}

/// The round trip assumed between members before one is measured.
const PEER_INITIAL_RTT: Duration = Duration::from_millis(50);

/// Bidirectional streams a client may have open at once: its session.
const CLIENT_STREAMS_MAX: u32 = 1;
/// Bytes of received datagrams buffered per client connection.
const CLIENT_DATAGRAM_BUFFER_BYTES: usize = 64 * 1024;

/// A transport error.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The TLS material or configuration is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The UDP socket could not be bound.
    #[error("cannot bind {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The configuration is inconsistent.
    #[error("invalid transport configuration: {0}")]
    Config(String),
    /// The endpoints have stopped.
    #[error("the transport has stopped")]
    Closed,
    /// A member's address could not be resolved.
    #[error("cannot resolve {0}")]
    Resolve(String),
    /// The node is not a member (or is this replica).
    #[error("node {0} is not another member of the cluster")]
    UnknownPeer(NodeId),
    /// There is no connection to the node now.
    #[error("not connected to node {0}")]
    NotConnected(NodeId),
    /// The connection failed.
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The handshake failed or was refused.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// Writing to a stream failed.
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from a stream failed.
    #[error("stream read failed: {0}")]
    Read(#[from] FrameReadError),
    /// The peer has no snapshot to give.
    #[error("node {from} has no snapshot: {reason}")]
    SnapshotUnavailable {
        /// The peer asked.
        from: NodeId,
        /// Its reason.
        reason: String,
    },
    /// The snapshot grew past [`TransportLimits::snapshot_bytes_max`].
    #[error("snapshot from node {from} passed {bytes} bytes, over the limit of {max} bytes")]
    SnapshotTooLarge {
        /// The peer asked.
        from: NodeId,
        /// The bytes received when it was refused.
        bytes: u64,
        /// The bound.
        max: u64,
    },
    /// The snapshot stream ended early, or its end frame does not count
    /// what arrived.
    #[error("snapshot from node {from}: received {received} bytes, {expected} announced")]
    SnapshotLength {
        /// The peer asked.
        from: NodeId,
        /// Bytes received.
        received: u64,
        /// Bytes announced.
        expected: u64,
    },
    /// An operation did not finish in time.
    #[error("timed out: {0}")]
    TimedOut(String),
    /// The transport is shut down.
    #[error("the transport is shut down")]
    ShutDown,
    /// A dialled peer's certificate is not a replica certificate for the
    /// member dialled.
    #[error("refusing the peer: {0}")]
    PeerCertificate(String),
}

/// Result of the transport's operations.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;

fn close_code(code: u32) -> quinn::VarInt {
    quinn::VarInt::from_u32(code)
}
