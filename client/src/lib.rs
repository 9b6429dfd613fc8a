//! Async client library for Synod: sessions with failover, the namespace,
//! watches, locks with fencing tokens and leader election, on tokio.
//!
//! # Connecting
//!
//! ```no_run
//! # async fn example() -> synod_client::Result<()> {
//! use synod_client::{Client, CreateMode};
//!
//! let client = Client::builder()
//!     .endpoints(["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"])
//!     .tls_dir("synod-dev/certs")
//!     .session_timeout_ms(5_000)
//!     .connect()
//!     .await?;
//! client.create("/config", b"v1", CreateMode::Persistent).await?;
//! let (data, stat) = client.get("/config").await?;
//! assert_eq!(data, b"v1");
//! # let _ = stat;
//! # Ok(())
//! # }
//! ```
//!
//! Every call goes through one session. Reads are linearizable unless the
//! builder or the call says otherwise. Refusals come back as
//! [`ClientError::Refused`] with ZooKeeper's meanings; match on
//! [`ClientError::kind`].
//!
//! # Sessions and failover
//!
//! The session sends keep-alives and pings the replica it is attached to.
//! When that replica dies, the client resumes the same session on another
//! one, re-registers its watches with the last revision it has fully seen
//! (the replica replays what was missed) and resends unanswered requests
//! with their `(session, sequence)`, which the cluster applies at most once.
//! Its state ([`SessionState`]: connected, suspended, expired, closed) is
//! observable with [`Client::state`] and [`Client::state_changes`]. A request
//! whose answer was lost in a failover, and which the cluster can no longer
//! replay, fails with [`ClientError::OutcomeUnknown`]: read the state to
//! find out. Locks and elections handle this themselves.
//!
//! # Watches
//!
//! ```no_run
//! # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
//! // One-shot, set atomically with the read:
//! let (data, _stat, changed) = client.get_watch("/config").await?;
//! # let _ = data;
//! let event = changed.await?;
//! # let _ = event;
//! // Persistent and recursive, as a stream:
//! let mut changes = client.watch("/services").await?;
//! while let Ok(event) = changes.next().await {
//!     println!("{:?} {}", event.event_type, event.path);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Locks and fencing tokens
//!
//! ```no_run
//! # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
//! let guard = client.lock("/locks/report").await?;
//! // Hand the token to the services the lock protects; they refuse older
//! // tokens, or check it: `client.check_sequencer(&token)`.
//! let token = guard.token().clone();
//! client.set_fenced("/report", b"done", &token).await?;
//! tokio::select! {
//!     lost = guard.lost() => eprintln!("stop: {lost}"),
//!     _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
//! }
//! guard.release().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Leader election
//!
//! ```no_run
//! # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
//! let mut leaders = client.observe("/elections/scheduler").await?;
//! let leadership = client.campaign("/elections/scheduler", b"10.0.0.7:8080").await?;
//! println!("leading with token {}", leadership.token().generation);
//! let current = leaders.next().await?;
//! # let _ = current;
//! leadership.resign().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Programs without tokio use [`blocking::Client`]
//! ([`ClientBuilder::connect_blocking`]). `examples/lock.rs` and
//! `examples/election.rs` run against `synod dev`.

mod backup;
mod blocking_impl;
mod election;
mod error;
mod lock;
mod session;
mod watch;

use std::collections::BTreeSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use synod_proto::tls::TlsFiles;
use synod_proto::wire::{ClusterStatus, ReadConsistency, WatchRegistration};
use tokio::sync::{broadcast, mpsc, oneshot, watch as state_watch};

pub use backup::SnapshotDownload;
pub use election::{LeaderStream, Leadership};
pub use error::{ClientError, ErrorKind, Result};
pub use lock::{LockGuard, LockOptions};
pub use session::{Grant, SessionState};
pub use synod_proto::tls::TlsFiles as Tls;
pub use synod_proto::wire::ReadConsistency as Consistency;
pub use synod_proto::{
    CreateMode, Event, EventType, LeaderInfo, LockMode, MultiOp, MultiResult, Op, OpResult,
    Response, Revision, Sequencer, SessionId, Stat, WatchKind, PROTOCOL_VERSION,
};
pub use watch::{StateStream, Watch, WatchStream};

/// How long, by default, a session that failed over stays away from its
/// home replica ([`ClientBuilder::rebalance_after_ms`]).
pub const DEFAULT_REBALANCE_AFTER_MS: u64 = 60_000;

/// How long, by default, the replica a session is attached to may stay
/// silent before the session fails over ([`ClientBuilder::liveness_timeout_ms`]).
pub const DEFAULT_LIVENESS_TIMEOUT_MS: u64 = 400;

/// The shortest liveness timeout a builder takes.
const LIVENESS_TIMEOUT_MIN_MS: u64 = 20;

/// A small blocking facade over [`Client`] for programs that do not run
/// tokio: it owns a runtime with one worker thread for the session.
pub mod blocking {
    pub use crate::blocking_impl::{Client, LeadershipGuard, LockGuard};
}

use session::{Call, SessionSettings, Shared};

/// How a request answered `Unavailable` (no leader, no quorum in time) is
/// retried. Retries resend the same `(session, sequence)`, which the cluster
/// applies at most once, so they are safe for every operation.
///
/// ```
/// use synod_client::RetryPolicy;
/// let patient = RetryPolicy { attempts_max: 10, ..RetryPolicy::default() };
/// assert!(patient.attempts_max > RetryPolicy::default().attempts_max);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; `1` never retries.
    pub attempts_max: u32,
    /// Wait before the first retry; doubled for each further one.
    pub backoff_initial_ms: u64,
    /// Longest wait between two attempts.
    pub backoff_max_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts_max: 5,
            backoff_initial_ms: 50,
            backoff_max_ms: 1000,
        }
    }
}

impl RetryPolicy {
    /// The wait after attempt number `attempt` (1 for the first).
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(20);
        let wait = self.backoff_initial_ms.saturating_mul(1u64 << doublings);
        Duration::from_millis(wait.min(self.backoff_max_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_backoff_doubles_up_to_its_bound() {
        let policy = RetryPolicy {
            attempts_max: 10,
            backoff_initial_ms: 50,
            backoff_max_ms: 300,
        };
        let waits: Vec<u64> = (1..=6)
            .map(|attempt| policy.backoff(attempt).as_millis() as u64)
            .collect();
        assert_eq!(waits, vec![50, 100, 200, 300, 300, 300]);
        assert_eq!(policy.backoff(u32::MAX), Duration::from_millis(300));
    }
}

/// Builds a [`Client`]: endpoints, TLS files, session timeout, default read
/// consistency, retry policy and request timeout.
///
/// ```no_run
/// # async fn example() -> synod_client::Result<()> {
/// use synod_client::{Client, Consistency, RetryPolicy};
///
/// let client = Client::builder()
///     .endpoints(["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"])
///     .tls_dir("synod-dev/certs")
///     .session_timeout_ms(5_000)
///     .request_timeout_ms(3_000)
///     .consistency(Consistency::Linearizable)
///     .retry_policy(RetryPolicy::default())
///     .connect()
///     .await?;
/// # let _ = client;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    tls: Option<TlsFiles>,
    session_timeout_ms: u64,
    request_timeout_ms: u64,
    consistency: ReadConsistency,
    frame_bytes_max: u64,
    retry: RetryPolicy,
    local_address: Option<std::net::IpAddr>,
    rebalance_after_ms: u64,
    liveness_timeout_ms: u64,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            endpoints: Vec::new(),
            tls: None,
            session_timeout_ms: 10_000,
            request_timeout_ms: 10_000,
            consistency: ReadConsistency::Linearizable,
            frame_bytes_max: synod_proto::wire::DEFAULT_MAX_FRAME_BYTES,
            retry: RetryPolicy::default(),
            local_address: None,
            rebalance_after_ms: DEFAULT_REBALANCE_AFTER_MS,
            liveness_timeout_ms: DEFAULT_LIVENESS_TIMEOUT_MS,
        }
    }
}

impl ClientBuilder {
    /// The replicas' client addresses (`host:port`); the client tries them
    /// in order and fails over between them.
    ///
    /// ```
    /// let builder = synod_client::Client::builder().endpoints(["127.0.0.1:7101"]);
    /// # let _ = builder;
    /// ```
    pub fn endpoints<I, S>(mut self, endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.endpoints = endpoints.into_iter().map(Into::into).collect();
        self
    }

    /// TLS files: the cluster CA, and this client's certificate and key.
    ///
    /// ```
    /// use synod_client::{Client, Tls};
    /// let files = Tls::in_dir(std::path::Path::new("certs"), "client");
    /// let builder = Client::builder().tls(files);
    /// # let _ = builder;
    /// ```
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }

    /// TLS files named as `synod certs` writes them in `dir`: `ca.pem`,
    /// `client.pem`, `client-key.pem`.
    ///
    /// ```
    /// let builder = synod_client::Client::builder().tls_dir("synod-dev/certs");
    /// # let _ = builder;
    /// ```
    pub fn tls_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.tls = Some(TlsFiles::in_dir(dir.as_ref(), "client"));
        self
    }

    /// How long the session survives without contact (clamped by the
    /// cluster). Locks are released and ephemeral nodes deleted this long
    /// after the client's process dies; a failover must complete within it.
    ///
    /// ```
    /// let builder = synod_client::Client::builder().session_timeout_ms(5_000);
    /// # let _ = builder;
    /// ```
    pub fn session_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.session_timeout_ms = timeout_ms;
        self
    }

    /// How long a session that failed over stays away from the replica
    /// that opened it (its home: the first endpoint that answered) before
    /// it moves back, once home answers again; 0 keeps it where it is.
    /// Without this, every failover gathers sessions on the replicas that
    /// survived, until one fault stops them all. Moving is a resume: no
    /// request, watch or lock is lost, and requests in flight are sent
    /// again. Default 60 s, and up to half as long again, at random, so
    /// that sessions that failed over together do not move back together.
    ///
    /// ```
    /// let builder = synod_client::Client::builder().rebalance_after_ms(30_000);
    /// # let _ = builder;
    /// ```
    pub fn rebalance_after_ms(mut self, after_ms: u64) -> Self {
        self.rebalance_after_ms = after_ms;
        self
    }

    /// How long the replica a session is attached to may stay silent
    /// before the session fails over to another one. Silent means no QUIC
    /// packet at all: the connection sends a QUIC keep-alive every quarter
    /// of this, which a live replica acknowledges at once whatever its
    /// event loop is doing, so only a dead, hung or unreachable replica
    /// stays silent. This is how a session leaves a killed or paused
    /// replica within half a second; the confirm ping (every sixth of the
    /// session timeout) still catches a replica that is alive but reaches
    /// no leader. Raise it on slow or lossy links. Default 400 ms; at least
    /// 20 ms, and at most a third of the session timeout.
    ///
    /// ```
    /// let builder = synod_client::Client::builder().liveness_timeout_ms(1_000);
    /// # let _ = builder;
    /// ```
    pub fn liveness_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.liveness_timeout_ms = timeout_ms;
        self
    }

    /// How long a call waits for its answer, retries included.
    ///
    /// ```
    /// let builder = synod_client::Client::builder().request_timeout_ms(3_000);
    /// # let _ = builder;
    /// ```
    pub fn request_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.request_timeout_ms = timeout_ms;
        self
    }

    /// The consistency of reads that do not say otherwise.
    ///
    /// ```
    /// use synod_client::{Client, Consistency};
    /// let builder = Client::builder().consistency(Consistency::Sequential);
    /// # let _ = builder;
    /// ```
    pub fn consistency(mut self, consistency: ReadConsistency) -> Self {
        self.consistency = consistency;
        self
    }

    /// How requests answered `Unavailable` are retried.
    ///
    /// ```
    /// use synod_client::{Client, RetryPolicy};
    /// let builder = Client::builder().retry_policy(RetryPolicy { attempts_max: 1, ..RetryPolicy::default() });
    /// # let _ = builder;
    /// ```
    pub fn retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The local IP address the client's socket binds to (an ephemeral
    /// port on it), for a host with several addresses where the cluster or
    /// a firewall tells clients apart by source address; by default the
    /// unspecified address of the replicas' family.
    ///
    /// ```
    /// let builder = synod_client::Client::builder().local_address("127.0.0.1".parse().unwrap());
    /// # let _ = builder;
    /// ```
    pub fn local_address(mut self, address: std::net::IpAddr) -> Self {
        self.local_address = Some(address);
        self
    }

    /// Connects to the first replica that answers and opens a session.
    ///
    /// # Errors
    /// [`ClientError::Config`] for bad endpoints or TLS files;
    /// [`ClientError::ConnectionLost`] when no replica answers.
    pub async fn connect(self) -> Result<Client> {
        let material = self.tls_material()?;
        let (endpoints, first) = self.resolved_endpoints()?;
        if self.session_timeout_ms == 0 || self.request_timeout_ms == 0 {
            return Err(ClientError::Config(
                "session and request timeouts must be positive".into(),
            ));
        }
        // The session task detects a silent replica itself, by the QUIC
        // keep-alives going unanswered; QUIC's idle timeout is the
        // backstop, and the keep-alives also keep NAT bindings warm.
        let idle_ms = (self.session_timeout_ms / 2).clamp(500, 10_000);
        let liveness_ms = self.liveness_timeout_ms.clamp(
            LIVENESS_TIMEOUT_MIN_MS,
            (self.session_timeout_ms / 3).max(LIVENESS_TIMEOUT_MIN_MS),
        );
        let keep_alive_ms = (liveness_ms / 4).max(5);
        let endpoint = quic_endpoint(&material, first, self.local_address, idle_ms, keep_alive_ms)?;
        let shared = Arc::new(Shared::new());
        let settings = SessionSettings {
            endpoints,
            endpoint,
            session_timeout_ms: self.session_timeout_ms,
            request_timeout_ms: self.request_timeout_ms,
            frame_bytes_max: self.frame_bytes_max,
            retry: self.retry,
            rebalance_after: (self.rebalance_after_ms > 0)
                .then(|| Duration::from_millis(self.rebalance_after_ms)),
            liveness_timeout: Duration::from_millis(liveness_ms),
        };
        let calls = session::start(settings, shared.clone()).await?;
        let session = match *shared.state.borrow() {
            SessionState::Connected { session, .. } => session,
            _ => {
                return Err(ClientError::ConnectionLost(
                    "the session ended at once".into(),
                ))
            }
        };
        Ok(Client {
            inner: Arc::new(Inner {
                calls,
                state: shared.state.subscribe(),
                shared,
                session,
                consistency: self.consistency,
                session_timeout_ms: self.session_timeout_ms,
                claimed: Mutex::new(BTreeSet::new()),
            }),
        })
    }

    /// Starts a backup: connects to the first replica that answers (no
    /// session is opened) and has it stream its saved state, one
    /// consistent state from one read transaction, without stalling the
    /// cluster. Read the chunks with [`SnapshotDownload::next_chunk`]; the
    /// shell's `synod snapshot save` writes them to a file.
    ///
    /// # Errors
    /// [`ClientError::Config`] for bad endpoints or TLS files;
    /// [`ClientError::ConnectionLost`] when no replica answers or every one
    /// refuses (the last reason is given).
    pub async fn fetch_snapshot(self) -> Result<SnapshotDownload> {
        let material = self.tls_material()?;
        let (endpoints, first) = self.resolved_endpoints()?;
        let endpoint = quic_endpoint(&material, first, self.local_address, 10_000, 2_500)?;
        backup::fetch(
            endpoint,
            &endpoints,
            Duration::from_millis(self.request_timeout_ms),
        )
        .await
    }

    fn tls_material(&self) -> Result<synod_proto::tls::TlsMaterial> {
        let tls = self.tls.clone().ok_or_else(|| {
            ClientError::Config("no TLS files given; call tls() or tls_dir()".into())
        })?;
        tls.load()
            .map_err(|error| ClientError::Config(error.to_string()))
    }

    /// The endpoints as addresses, each with the name its certificate must
    /// carry, and the first address.
    fn resolved_endpoints(&self) -> Result<(Vec<(SocketAddr, String)>, SocketAddr)> {
        let mut endpoints = Vec::new();
        for endpoint in &self.endpoints {
            let address: SocketAddr = endpoint
                .to_socket_addrs()
                .map_err(|error| ClientError::Config(format!("endpoint {endpoint}: {error}")))?
                .next()
                .ok_or_else(|| ClientError::Config(format!("endpoint {endpoint}: no address")))?;
            let host = endpoint
                .rsplit_once(':')
                .map_or(endpoint.as_str(), |(host, _)| host)
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            endpoints.push((address, host));
        }
        let Some(&(first, _)) = endpoints.first() else {
            return Err(ClientError::Config(
                "no endpoints given; call endpoints() with the replicas' client addresses".into(),
            ));
        };
        Ok((endpoints, first))
    }

    /// Connects as [`ClientBuilder::connect`] does, for programs without
    /// tokio: the returned client blocks on each call.
    ///
    /// # Errors
    /// As [`ClientBuilder::connect`], and [`ClientError::Config`] when the
    /// runtime cannot start.
    pub fn connect_blocking(self) -> Result<blocking::Client> {
        blocking::Client::connect(self)
    }
}

/// A QUIC client endpoint presenting `material`, bound to `local` (or the
/// unspecified address of `first`'s family), sending a keep-alive after
/// `keep_alive_ms` without sending anything and closing connections silent
/// for `idle_ms`.
fn quic_endpoint(
    material: &synod_proto::tls::TlsMaterial,
    first: SocketAddr,
    local: Option<std::net::IpAddr>,
    idle_ms: u64,
    keep_alive_ms: u64,
) -> Result<quinn::Endpoint> {
    let bind = if let Some(local) = local {
        SocketAddr::new(local, 0)
    } else if first.is_ipv6() {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
    };
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(keep_alive_ms)));
    transport.max_idle_timeout(Some(
        quinn::VarInt::from_u32(u32::try_from(idle_ms).unwrap_or(10_000)).into(),
    ));
    synod_proto::tls::client_endpoint(material, bind, Arc::new(transport))
        .map_err(|error| ClientError::Config(error.to_string()))
}

struct Inner {
    calls: mpsc::Sender<Call>,
    shared: Arc<Shared>,
    state: state_watch::Receiver<SessionState>,
    session: SessionId,
    consistency: ReadConsistency,
    session_timeout_ms: u64,
    /// Locks and elections this client holds or is acquiring, so that a
    /// second acquire of the same path from this client is refused at once
    /// and a `LockAlreadyRequested` from the cluster can only mean an
    /// earlier attempt of ours whose answer was lost.
    claimed: Mutex<BTreeSet<String>>,
}

/// A connection to a Synod cluster with one session. Cheap to clone; every
/// clone shares the session.
///
/// Dropping the last clone without [`Client::close`] leaves the session to
/// expire after its timeout, as if the process had died; locks held through
/// guards keep the session alive while the guards live.
///
/// ```no_run
/// # async fn example() -> synod_client::Result<()> {
/// use synod_client::{Client, CreateMode};
///
/// let client = Client::builder()
///     .endpoints(["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"])
///     .tls_dir("synod-dev/certs")
///     .connect()
///     .await?;
/// client.create("/app", b"", CreateMode::Persistent).await?;
/// let guard = client.lock("/app/lock").await?;
/// println!("holding with token {}", guard.token().generation);
/// guard.release().await?;
/// client.close().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("session", &self.inner.session)
            .field("state", &*self.inner.state.borrow())
            .finish()
    }
}

fn unexpected(result: OpResult) -> ClientError {
    ClientError::Protocol(format!("unexpected result {result:?}"))
}

impl Client {
    /// Starts building a client.
    ///
    /// ```
    /// let builder = synod_client::Client::builder();
    /// # let _ = builder;
    /// ```
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The session's id, while the session is attached to a replica.
    ///
    /// ```no_run
    /// # fn example(client: &synod_client::Client) {
    /// if let Some(session) = client.session() {
    ///     println!("session {session:#x}");
    /// }
    /// # }
    /// ```
    pub fn session(&self) -> Option<SessionId> {
        match *self.inner.state.borrow() {
            SessionState::Connected { session, .. } => Some(session),
            _ => None,
        }
    }

    /// The session's id, whatever its state: the owner recorded in its
    /// ephemeral nodes and in the leader of an election it leads.
    ///
    /// ```no_run
    /// # fn example(client: &synod_client::Client) {
    /// println!("session {}", client.session_id());
    /// # }
    /// ```
    pub fn session_id(&self) -> SessionId {
        self.inner.session
    }

    /// The session timeout this client asked for, in milliseconds.
    ///
    /// ```no_run
    /// # fn example(client: &synod_client::Client) {
    /// assert!(client.session_timeout_ms() > 0);
    /// # }
    /// ```
    pub fn session_timeout_ms(&self) -> u64 {
        self.inner.session_timeout_ms
    }

    /// The session's state now, and its latest changes: `changed().await`
    /// on the receiver waits for the next one. Fast transitions may be
    /// coalesced; [`Client::state_changes`] sees each of them.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) {
    /// use synod_client::SessionState;
    /// let mut state = client.state();
    /// while state.changed().await.is_ok() {
    ///     if *state.borrow() == SessionState::Expired { break; }
    /// }
    /// # }
    /// ```
    pub fn state(&self) -> state_watch::Receiver<SessionState> {
        self.inner.state.clone()
    }

    /// Every transition of the session's state from now on, in order
    /// (connected, suspended, connected again, expired or closed).
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) {
    /// let mut changes = client.state_changes();
    /// while let Some(state) = changes.next().await {
    ///     println!("session is now {state:?}");
    /// }
    /// # }
    /// ```
    pub fn state_changes(&self) -> StateStream {
        StateStream::new(
            self.inner.shared.transitions.subscribe(),
            self.inner.state.clone(),
        )
    }

    /// Sends one request and waits for its answer (after retries of
    /// `Unavailable` answers as the retry policy says).
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// use synod_client::Op;
    /// let response = client.request(Op::Sync, None, None).await?;
    /// println!("at revision {}", response.revision);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// A failure of the client or session; the cluster's refusal is in
    /// [`Response::result`].
    pub async fn request(
        &self,
        op: Op,
        consistency: Option<ReadConsistency>,
        watch: Option<WatchKind>,
    ) -> Result<Response> {
        let (reply, answer) = oneshot::channel();
        let call = Call::Request {
            op,
            consistency: consistency.unwrap_or(self.inner.consistency),
            watch,
            reply,
        };
        self.inner
            .calls
            .send(call)
            .await
            .map_err(|_| self.closed_error())?;
        answer.await.map_err(|_| self.closed_error())?
    }

    fn closed_error(&self) -> ClientError {
        match *self.inner.state.borrow() {
            SessionState::Expired => ClientError::SessionExpired,
            _ => ClientError::Closed,
        }
    }

    async fn call(&self, op: Op) -> Result<OpResult> {
        let response = self.request(op, None, None).await?;
        Ok(response.result?)
    }

    async fn read_with(
        &self,
        op: Op,
        consistency: Option<ReadConsistency>,
    ) -> Result<(Revision, OpResult)> {
        let response = self.request(op, consistency, None).await?;
        Ok((response.revision, response.result?))
    }

    /// Creates a node and returns its path (with the counter for sequential
    /// modes).
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// use synod_client::CreateMode;
    /// let path = client.create("/jobs/job-", b"payload", CreateMode::PersistentSequential).await?;
    /// assert!(path.starts_with("/jobs/job-"));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `NodeExists`, `NoNode` (no parent), `NoChildrenForEphemerals`, bad paths.
    pub async fn create(&self, path: &str, data: &[u8], mode: CreateMode) -> Result<String> {
        let op = Op::Create {
            path: path.into(),
            data: data.to_vec(),
            mode,
        };
        match self.call(op).await? {
            OpResult::Created { path, .. } => Ok(path),
            other => Err(unexpected(other)),
        }
    }

    /// A node's data and stat.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// let (data, stat) = client.get("/config").await?;
    /// println!("{} bytes at version {}", data.len(), stat.version);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `NoNode`.
    pub async fn get(&self, path: &str) -> Result<(Vec<u8>, Stat)> {
        self.get_with(path, None).await
    }

    /// A node's data and stat, read with the given consistency.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// use synod_client::Consistency;
    /// let (data, _) = client.get_with("/config", Some(Consistency::Sequential)).await?;
    /// # let _ = data;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `NoNode`.
    pub async fn get_with(
        &self,
        path: &str,
        consistency: Option<ReadConsistency>,
    ) -> Result<(Vec<u8>, Stat)> {
        let op = Op::GetData { path: path.into() };
        match self.read_with(op, consistency).await?.1 {
            OpResult::Data { data, stat } => Ok((data, stat)),
            other => Err(unexpected(other)),
        }
    }

    /// Replaces a node's data, if its version is `expected_version` when given.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// let (_, stat) = client.get("/config").await?;
    /// client.set("/config", b"v2", Some(stat.version)).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `NoNode`, `BadVersion`, `DataTooLarge`.
    pub async fn set(
        &self,
        path: &str,
        data: &[u8],
        expected_version: Option<u64>,
    ) -> Result<Stat> {
        let op = Op::SetData {
            path: path.into(),
            data: data.to_vec(),
            expected_version,
        };
        match self.call(op).await? {
            OpResult::DataSet { stat } => Ok(stat),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes a childless node, if its version is `expected_version` when given.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// client.delete("/config", None).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `NoNode`, `BadVersion`, `NotEmpty`.
    pub async fn delete(&self, path: &str, expected_version: Option<u64>) -> Result<()> {
        let op = Op::Delete {
            path: path.into(),
            expected_version,
        };
        match self.call(op).await? {
            OpResult::Deleted => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// A node's stat, or `None` when it does not exist.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// if client.exists("/config").await?.is_none() {
    ///     println!("not configured yet");
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// Bad paths, or a failure of the session.
    pub async fn exists(&self, path: &str) -> Result<Option<Stat>> {
        match self.call(Op::Exists { path: path.into() }).await? {
            OpResult::Exists { stat } => Ok(stat),
            other => Err(unexpected(other)),
        }
    }

    /// A node's children's names, sorted.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// for name in client.children("/").await? {
    ///     println!("/{name}");
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `NoNode`.
    pub async fn children(&self, path: &str) -> Result<Vec<String>> {
        match self.call(Op::GetChildren { path: path.into() }).await? {
            OpResult::Children { children, .. } => Ok(children),
            other => Err(unexpected(other)),
        }
    }

    /// Applies the operations atomically: all or none.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// use synod_client::{CreateMode, MultiOp};
    /// client.multi(vec![
    ///     MultiOp::Check { path: "/config".into(), expected_version: Some(3) },
    ///     MultiOp::Create { path: "/config/applied".into(), data: vec![], mode: CreateMode::Persistent },
    /// ]).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `MultiOpFailed` naming the operation that failed.
    pub async fn multi(&self, ops: Vec<MultiOp>) -> Result<Vec<MultiResult>> {
        match self.call(Op::Multi { ops }).await? {
            OpResult::Multi { results } => Ok(results),
            other => Err(unexpected(other)),
        }
    }

    /// Waits until the replica serving this session has applied every write
    /// committed before the call.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// client.sync().await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// A failure of the session.
    pub async fn sync(&self) -> Result<()> {
        match self.call(Op::Sync).await? {
            OpResult::Synced => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Reads `path` and leaves a one-shot watch of `kind` on it atomically;
    /// events arrive on [`Client::events`]. [`Client::get_watch`],
    /// [`Client::exists_watch`] and [`Client::children_watch`] are the
    /// convenient forms.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// use synod_client::{Op, WatchKind};
    /// let response = client.read_and_watch(Op::GetData { path: "/a".into() }, WatchKind::Data).await?;
    /// # let _ = response;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// A failure of the session; the read's refusal is in the response (an
    /// exists watch is left even on a missing node).
    pub async fn read_and_watch(&self, op: Op, kind: WatchKind) -> Result<Response> {
        self.request(op, None, Some(kind)).await
    }

    /// Registers a watch without reading (persistent recursive, or leader).
    /// Each call must be matched by a [`Client::remove_watch`];
    /// [`Client::watch`] does both for you.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// use synod_client::WatchKind;
    /// client.add_watch("/config", WatchKind::PersistentRecursive).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`ClientError::Closed`].
    pub async fn add_watch(&self, path: &str, kind: WatchKind) -> Result<()> {
        let registration = WatchRegistration {
            path: path.into(),
            kind,
        };
        self.inner
            .calls
            .send(Call::AddWatch { registration })
            .await
            .map_err(|_| self.closed_error())
    }

    /// Removes a watch registered with [`Client::add_watch`].
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// use synod_client::WatchKind;
    /// client.remove_watch("/config", WatchKind::PersistentRecursive).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`ClientError::Closed`].
    pub async fn remove_watch(&self, path: &str, kind: WatchKind) -> Result<()> {
        let registration = WatchRegistration {
            path: path.into(),
            kind,
        };
        self.inner
            .calls
            .send(Call::RemoveWatch { registration })
            .await
            .map_err(|_| self.closed_error())
    }

    /// Removes a watch without waiting (for `Drop`).
    pub(crate) fn remove_watch_soon(&self, registration: WatchRegistration) {
        let _ = self
            .inner
            .calls
            .try_send(Call::RemoveWatch { registration });
    }

    /// Sends a request without waiting for its answer (for `Drop`).
    pub(crate) fn request_soon(&self, op: Op) {
        let (reply, _) = oneshot::channel();
        let call = Call::Request {
            op,
            consistency: ReadConsistency::Linearizable,
            watch: None,
            reply,
        };
        let _ = self.inner.calls.try_send(call);
    }

    /// Every event delivered to this session from now on, in order, each
    /// once. The typed streams ([`Client::watch`], [`Watch`]) filter it.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) {
    /// let mut events = client.events();
    /// while let Ok(event) = events.recv().await {
    ///     println!("{:?} at {}", event.event_type, event.path);
    /// }
    /// # }
    /// ```
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.shared.events.subscribe()
    }

    /// Lock and election grants delivered to this session from now on.
    /// [`Client::lock`] and [`Client::campaign`] wait for them for you.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) {
    /// let mut grants = client.grants();
    /// if let Ok(grant) = grants.recv().await {
    ///     println!("granted {}", grant.sequencer.path);
    /// }
    /// # }
    /// ```
    pub fn grants(&self) -> broadcast::Receiver<Grant> {
        self.inner.shared.grants.subscribe()
    }

    /// While suspended, when the cluster may expire the session.
    pub(crate) fn jeopardy(&self) -> state_watch::Receiver<Option<tokio::time::Instant>> {
        self.inner.shared.jeopardy.subscribe()
    }

    /// Counts the connections the session has been served on.
    pub(crate) fn connections(&self) -> state_watch::Receiver<u64> {
        self.inner.shared.connections.subscribe()
    }

    /// The status of the replica serving this session.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// let status = client.status().await?;
    /// println!("replica {} is {}", status.replica.node_id, status.replica.role);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// A failure of the session.
    pub async fn status(&self) -> Result<ClusterStatus> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .calls
            .send(Call::Status { reply })
            .await
            .map_err(|_| self.closed_error())?;
        answer.await.map_err(|_| self.closed_error())?
    }

    /// Closes the session: its ephemeral nodes are deleted and its locks
    /// released at once, instead of after the session timeout.
    ///
    /// ```no_run
    /// # async fn example(client: synod_client::Client) {
    /// client.close().await;
    /// # }
    /// ```
    pub async fn close(&self) {
        let (reply, answer) = oneshot::channel();
        if self.inner.calls.send(Call::Close { reply }).await.is_ok() {
            let _ = answer.await;
        }
    }

    /// Marks `path` as held or being acquired by this client.
    ///
    /// # Errors
    /// `LockAlreadyRequested` when it already is.
    pub(crate) fn claim(&self, path: &str) -> Result<Claim> {
        let mut claimed = self
            .inner
            .claimed
            .lock()
            .map_err(|_| ClientError::Protocol("poisoned lock table".into()))?;
        if !claimed.insert(path.to_string()) {
            return Err(ClientError::Refused(
                synod_proto::Error::LockAlreadyRequested { path: path.into() },
            ));
        }
        Ok(Claim {
            client: self.clone(),
            path: path.to_string(),
        })
    }
}

/// A path this client holds or is acquiring; released on drop.
pub(crate) struct Claim {
    pub(crate) client: Client,
    pub(crate) path: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Ok(mut claimed) = self.client.inner.claimed.lock() {
            claimed.remove(&self.path);
        }
    }
}

/// Where `synod dev` and `synod certs` put the client's TLS files.
///
/// ```
/// let dir = synod_client::default_tls_dir(std::path::Path::new("synod-dev"));
/// assert!(dir.ends_with("certs"));
/// ```
pub fn default_tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("certs")
}
