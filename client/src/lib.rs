//! Async client library for Synod: sessions with failover, the namespace,
//! watches, locks with fencing tokens and leader election.
//!
//! ```no_run
//! # async fn example() -> synod_client::Result<()> {
//! use synod_client::{Client, CreateMode};
//!
//! let client = Client::builder()
//!     .endpoints(["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"])
//!     .tls_dir("synod-dev/certs")
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
//! Every call goes through one session. Writes are applied once, even when
//! the client fails over to another replica and retries them. Reads are
//! linearizable unless the builder or the call says otherwise.

mod error;
mod session;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use synod_proto::tls::TlsFiles;
use synod_proto::wire::{ClusterStatus, ReadConsistency, WatchRegistration};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use error::{ClientError, Result};
pub use session::{Grant, SessionState};
pub use synod_proto::wire::ReadConsistency as Consistency;
pub use synod_proto::{
    CreateMode, Event, EventType, LeaderInfo, LockMode, MultiOp, MultiResult, Op, OpResult,
    Response, Revision, Sequencer, SessionId, Stat, WatchKind, PROTOCOL_VERSION,
};

use session::{Call, SessionSettings, Shared};

/// Builds a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    tls: Option<TlsFiles>,
    session_timeout_ms: u64,
    request_timeout_ms: u64,
    consistency: ReadConsistency,
    frame_bytes_max: u64,
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
        }
    }
}

impl ClientBuilder {
    /// The replicas' client addresses (`host:port`); the client tries them
    /// in order and fails over between them.
    pub fn endpoints<I, S>(mut self, endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.endpoints = endpoints.into_iter().map(Into::into).collect();
        self
    }

    /// TLS files: the cluster CA, and this client's certificate and key.
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }

    /// TLS files named as `synod certs` writes them in `dir`: `ca.pem`,
    /// `client.pem`, `client-key.pem`.
    pub fn tls_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.tls = Some(TlsFiles::in_dir(dir.as_ref(), "client"));
        self
    }

    /// How long the session survives without contact (clamped by the cluster).
    pub fn session_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.session_timeout_ms = timeout_ms;
        self
    }

    /// How long a call waits for its answer.
    pub fn request_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.request_timeout_ms = timeout_ms;
        self
    }

    /// The consistency of reads that do not say otherwise.
    pub fn consistency(mut self, consistency: ReadConsistency) -> Self {
        self.consistency = consistency;
        self
    }

    /// Connects to the first replica that answers and opens a session.
    ///
    /// # Errors
    /// [`ClientError::Config`] for bad endpoints or TLS files;
    /// [`ClientError::ConnectionLost`] when no replica answers.
    pub async fn connect(self) -> Result<Client> {
        let tls = self
            .tls
            .clone()
            .ok_or_else(|| ClientError::Config("no TLS files given".into()))?;
        let material = tls
            .load()
            .map_err(|error| ClientError::Config(error.to_string()))?;
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
        if endpoints.is_empty() {
            return Err(ClientError::Config("no endpoints given".into()));
        }
        let bind: SocketAddr = if endpoints[0].0.is_ipv6() {
            "[::]:0"
                .parse()
                .map_err(|_| ClientError::Config("bind".into()))?
        } else {
            "0.0.0.0:0"
                .parse()
                .map_err(|_| ClientError::Config("bind".into()))?
        };
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(std::time::Duration::from_millis(500)));
        transport.max_idle_timeout(Some(quinn::VarInt::from_u32(3_000).into()));
        let endpoint = synod_proto::tls::client_endpoint(&material, bind, Arc::new(transport))
            .map_err(|error| ClientError::Config(error.to_string()))?;
        let (events, _) = broadcast::channel(4096);
        let (grants, _) = broadcast::channel(256);
        let (state, state_receiver) = watch::channel(SessionState::Suspended);
        let shared = Arc::new(Shared {
            events,
            grants,
            state,
        });
        let settings = SessionSettings {
            endpoints,
            endpoint,
            session_timeout_ms: self.session_timeout_ms,
            request_timeout_ms: self.request_timeout_ms,
            frame_bytes_max: self.frame_bytes_max,
        };
        let calls = session::start(settings, shared.clone()).await?;
        Ok(Client {
            inner: Arc::new(Inner {
                calls,
                shared,
                state: state_receiver,
                consistency: self.consistency,
            }),
        })
    }
}

struct Inner {
    calls: mpsc::Sender<Call>,
    shared: Arc<Shared>,
    state: watch::Receiver<SessionState>,
    consistency: ReadConsistency,
}

/// A connection to a Synod cluster with one session. Cheap to clone; every
/// clone shares the session.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("state", &*self.inner.state.borrow())
            .finish()
    }
}

fn unexpected(result: OpResult) -> ClientError {
    ClientError::Protocol(format!("unexpected result {result:?}"))
}

impl Client {
    /// Starts building a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The session's id.
    pub fn session(&self) -> Option<SessionId> {
        match *self.inner.state.borrow() {
            SessionState::Connected { session, .. } => Some(session),
            _ => None,
        }
    }

    /// The session's state now, and its changes: `changed().await` on the
    /// receiver waits for the next one.
    pub fn state(&self) -> watch::Receiver<SessionState> {
        self.inner.state.clone()
    }

    /// Sends one request and waits for its answer.
    ///
    /// # Errors
    /// The cluster's refusal as [`ClientError::Refused`], or a failure of
    /// the client or session.
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

    /// Creates a node and returns its path (with the counter for sequential
    /// modes).
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
    /// # Errors
    /// `NoNode`.
    pub async fn get(&self, path: &str) -> Result<(Vec<u8>, Stat)> {
        self.get_with(path, None).await
    }

    /// A node's data and stat, read with the given consistency.
    ///
    /// # Errors
    /// `NoNode`.
    pub async fn get_with(
        &self,
        path: &str,
        consistency: Option<ReadConsistency>,
    ) -> Result<(Vec<u8>, Stat)> {
        let op = Op::GetData { path: path.into() };
        match self.request(op, consistency, None).await?.result? {
            OpResult::Data { data, stat } => Ok((data, stat)),
            other => Err(unexpected(other)),
        }
    }

    /// Replaces a node's data, if its version is `expected_version` when given.
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
    /// # Errors
    /// A failure of the session.
    pub async fn sync(&self) -> Result<()> {
        match self.call(Op::Sync).await? {
            OpResult::Synced => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Reads `path` and leaves a one-shot watch of `kind` on it atomically;
    /// events arrive on [`Client::events`].
    ///
    /// # Errors
    /// The read's errors (an exists watch is left even on a missing node).
    pub async fn read_and_watch(&self, op: Op, kind: WatchKind) -> Result<Response> {
        self.request(op, None, Some(kind)).await
    }

    /// Registers a persistent watch (recursive on a path, or on an election).
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

    /// Removes a watch.
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

    /// Every event delivered to this session from now on, in order.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.shared.events.subscribe()
    }

    /// Lock and election grants delivered to this session from now on.
    pub fn grants(&self) -> broadcast::Receiver<Grant> {
        self.inner.shared.grants.subscribe()
    }

    /// The status of the replica serving this session.
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
    pub async fn close(&self) {
        let (reply, answer) = oneshot::channel();
        if self.inner.calls.send(Call::Close { reply }).await.is_ok() {
            let _ = answer.await;
        }
    }
}

/// Where `synod dev` and `synod certs` put the client's TLS files.
pub fn default_tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("certs")
}
