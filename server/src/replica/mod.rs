//! A running replica: storage, the Paxos core and the state machine joined
//! by one event loop, with QUIC transport to peers and clients.
//!
//! [`Replica::start`] opens (or, with `bootstrap`, creates) the database,
//! loads the state machine from its tables, starts the core (which replays
//! the chosen log after the saved state: at most one flush interval of
//! writes, see [`storage_thread`]), binds the peer and
//! client endpoints, and runs the event loop until [`Replica::shutdown`] or
//! a fatal error. The chosen log on disk is applied before the endpoints
//! bind, so the cluster identity the state holds is in the first peer
//! handshake (see [`crate::transport::identity`]); a replica its peers
//! refuse for its identity stops with [`ReplicaError::ClusterIdentity`]. One task owns the core and the state machine; two OS
//! threads own the two databases, the log's committing in groups and the
//! state's flushing applied changes now and then.

pub mod driver;
mod net;
pub mod proposal;
pub mod sessions;
pub mod snapshot;
mod storage_thread;
mod tls_watch;
mod waiting;

use std::net::{SocketAddr, UdpSocket};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use synod_paxos::{DurableState, Membership, Node, Persist};
use synod_proto::wire::ClusterStatus;
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::ReplicaConfig;
use crate::http::{HttpServer, HttpSettings};
use crate::state::records::{NodeBatcher, SortedNodes, StateLoader};
use crate::state::StateMachine;
use crate::storage::{
    DatabasePaths, Identity, Recovered, StateReader, StateRecordRef, StateTable, Storage,
};
use crate::transport::{ClientConnection, ClusterIdentity, RefusalSink};

pub use driver::{Driver, Input, PeerMessage, StorageJob};
use net::Endpoints;
use storage_thread::{WriterEvent, WriterRequest, WriterSettings};

/// How often the event loop ticks the core.
const TICK_INTERVAL: Duration = Duration::from_millis(10);

/// The published status is refreshed every this many ticks.
const STATUS_EVERY_TICKS: u64 = 5;

/// Most inputs handled before the loop flushes its outputs.
const INPUTS_PER_ROUND_MAX: usize = 1024;

/// How a replica starts.
#[derive(Debug, Default)]
pub struct StartOptions {
    /// Create a new database when the data directory has none, as a
    /// founding member of a new cluster. Without it, a missing database is
    /// an error: a replica whose disk was lost must not vote with promises
    /// it no longer remembers.
    pub bootstrap: bool,
    /// Create an empty database, when the data directory has none, for a
    /// member that lost its disk and rejoins its cluster: it votes in
    /// nothing until every other member has told it what it may have
    /// forgotten and it has caught up (see `DurableState::rejoin`).
    pub join: bool,
    /// An already bound socket for the peer endpoint (tests bind port 0
    /// first so every replica knows every address before any starts).
    pub peer_socket: Option<UdpSocket>,
    /// An already bound socket for the client endpoint.
    pub client_socket: Option<UdpSocket>,
    /// Notified to reload the TLS files at once (`synod-server` notifies
    /// it on SIGHUP); they are also looked at every `tls.reload_check_ms`.
    pub reload_tls: Option<Arc<tokio::sync::Notify>>,
    /// For fault tests only: how this replica's clock departs from the
    /// machine's (see [`ClockSkew`]).
    pub clock_skew: ClockSkew,
}

/// A deliberate error of a replica's clock, for fault tests: a fixed offset
/// from the machine's wall clock and a rate error. The lease argument
/// assumes replicas' clocks run at rates within `clock_drift_margin_ms` per
/// lease of each other; a test keeps a skew within that bound to show the
/// cluster stays safe, or beyond it to see what breaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClockSkew {
    /// Added to the wall clock at the start (may be negative).
    pub offset_ms: i64,
    /// Parts per million the clock runs fast (positive) or slow (negative);
    /// within ±500,000.
    pub rate_ppm: i64,
}

impl ClockSkew {
    /// The largest rate error accepted, in parts per million.
    pub const RATE_PPM_MAX: i64 = 500_000;
}

/// Why a replica could not start or had to stop.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// The data directory holds no database and `bootstrap` was not given.
    #[error(
        "data directory {0} holds no database: pass --bootstrap to found a new cluster, \
         or --join for a member that lost its disk and rejoins its cluster"
    )]
    NoDatabase(String),
    /// The database could not be opened, created or written.
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    /// The saved snapshot or the configuration could not be used.
    #[error("cannot start: {0}")]
    Start(String),
    /// The transport could not start.
    #[error(transparent)]
    Transport(#[from] crate::transport::TransportError),
    /// A write failed while running; the replica stopped (fail-stop) and
    /// recovers from disk on restart.
    #[error("stopped after a storage failure: {0}")]
    Fatal(String),
    /// The cluster refused this replica's database: it belongs to another
    /// cluster, or it is fresh where the cluster knows this member held its
    /// state (restart it with `--join`).
    #[error("refused by the cluster: {0}")]
    ClusterIdentity(String),
}

/// Milliseconds since the Unix epoch, never decreasing within the process
/// (skewed as a fault test asks).
#[derive(Debug, Clone, Copy)]
struct Clock {
    start_wall_ms: u64,
    start: Instant,
    rate_ppm: i64,
}

impl Clock {
    fn new() -> Clock {
        Clock::skewed(ClockSkew::default())
    }

    fn skewed(skew: ClockSkew) -> Clock {
        let wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Clock {
            start_wall_ms: wall_ms.saturating_add_signed(skew.offset_ms),
            start: Instant::now(),
            rate_ppm: skew
                .rate_ppm
                .clamp(-ClockSkew::RATE_PPM_MAX, ClockSkew::RATE_PPM_MAX),
        }
    }

    fn now_ms(&self) -> u64 {
        let elapsed_us = self.start.elapsed().as_micros() as i128;
        let skewed_us = elapsed_us + elapsed_us * i128::from(self.rate_ppm) / 1_000_000;
        self.start_wall_ms + (skewed_us / 1000) as u64
    }
}

/// A replica running in this process.
pub struct Replica {
    id: u64,
    client_address: SocketAddr,
    peer_address: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), ReplicaError>>,
    /// The log and state writer threads, joined at the end.
    writers: Vec<std::thread::JoinHandle<()>>,
    /// The task that reloads changed TLS files, stopped at the end.
    tls_watch: JoinHandle<()>,
    status: watch::Receiver<ClusterStatus>,
    http: Option<HttpServer>,
    http_stop: watch::Sender<bool>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.id)
            .field("client_address", &self.client_address)
            .finish()
    }
}

fn open_storage(
    config: &ReplicaConfig,
    bootstrap: bool,
    join: bool,
) -> Result<(Storage, crate::storage::Recovered), ReplicaError> {
    let identity = Identity {
        cluster_id: config.cluster_id.clone(),
        node_id: config.id,
    };
    let paths = DatabasePaths::in_dir(&config.data_dir);
    if !paths.log.exists() {
        if bootstrap && join {
            return Err(ReplicaError::Start(
                "--bootstrap and --join exclude each other".into(),
            ));
        }
        if !bootstrap && !join {
            return Err(ReplicaError::NoDatabase(
                config.data_dir.display().to_string(),
            ));
        }
        std::fs::create_dir_all(&config.data_dir).map_err(|error| {
            ReplicaError::Start(format!(
                "cannot create data directory {}: {error}",
                config.data_dir.display()
            ))
        })?;
        let ids: Vec<u64> = config.members.iter().map(|m| m.id).collect();
        let membership =
            Membership::new(&ids).map_err(|error| ReplicaError::Start(error.to_string()))?;
        let durable = if join {
            tracing::warn!(
                node = config.id,
                "rejoining with an empty data directory: not voting until caught up"
            );
            DurableState::rejoin(membership)
        } else {
            DurableState::bootstrap(membership)
        };
        let storage = Storage::create(&paths, identity, &durable)?;
        return Ok((
            storage,
            Recovered {
                durable,
                state: None,
            },
        ));
    }
    Ok(Storage::open(&paths, &identity)?)
}

/// Loads the saved state machine (or starts an empty one) and says from
/// which slot the core must replay the log.
fn load_state(
    config: &ReplicaConfig,
    storage: &Storage,
    recovered: &Recovered,
) -> Result<(StateMachine, u64), ReplicaError> {
    let Some(header) = &recovered.state else {
        return Ok((StateMachine::new(config.state_config()), 0));
    };
    let started = Instant::now();
    let mut loader = StateLoader::new(config.state_config());
    load_records(
        storage.state_reader(),
        &mut loader,
        config.state_config().path_bytes_max,
    )?;
    let records = loader.records();
    let read_ms = started.elapsed().as_millis() as u64;
    let state = loader
        .finish(&header.scalars)
        .map_err(|error| ReplicaError::Start(format!("saved state: {error}")))?;
    tracing::info!(
        node = config.id,
        through = header.through,
        records,
        read_ms,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "state loaded"
    );
    Ok((state, header.through + 1))
}

/// Records read off the disk, packed: their bytes in one buffer, and for
/// each its table and where its key and value end.
#[derive(Default)]
struct RecordBatch {
    bytes: Vec<u8>,
    records: Vec<(StateTable, usize, usize)>,
}

/// What the reading thread hands the loader: nodes decoded and sorted, or
/// other records as they were read.
enum LoadPiece {
    Nodes(SortedNodes),
    Records(RecordBatch),
}

/// Records per batch of other records handed to the loader.
const LOAD_BATCH_RECORDS: usize = 8192;

/// Feeds the saved state's records to `loader`. A thread of its own reads
/// them (redb, CRCs) and decodes, checks and sorts the nodes in batches
/// ([`NodeBatcher`]), so that this thread only builds and merges the
/// namespace's segments: a restart takes about the longer of the two, not
/// their sum.
fn load_records(
    reader: StateReader,
    loader: &mut StateLoader,
    path_bytes_max: u64,
) -> Result<(), ReplicaError> {
    let (pieces, arriving) = std_mpsc::sync_channel::<LoadPiece>(4);
    let reading = std::thread::Builder::new()
        .name("synod-load".into())
        .spawn(move || {
            let send = |piece| {
                pieces
                    .send(piece)
                    .map_err(|_| "the loader stopped".to_string())
            };
            let mut nodes = Some(NodeBatcher::new(path_bytes_max));
            // The nodes table comes first: its last batch goes before any
            // other record.
            let finish_nodes = |nodes: &mut Option<NodeBatcher>| -> Result<(), String> {
                if let Some(sorted) = nodes.take().map(NodeBatcher::finish).transpose()?.flatten() {
                    send(LoadPiece::Nodes(sorted))?;
                }
                Ok(())
            };
            let mut batch = RecordBatch::default();
            let result = reader.read(&mut |_| Ok(()), &mut |record| {
                if record.table == StateTable::Nodes {
                    let Some(batcher) = nodes.as_mut() else {
                        return Err("a node record after the other tables".into());
                    };
                    if let Some(sorted) = batcher.record(record.key, record.value)? {
                        send(LoadPiece::Nodes(sorted))?;
                    }
                    return Ok(());
                }
                finish_nodes(&mut nodes)?;
                batch.bytes.extend_from_slice(record.key);
                let key_end = batch.bytes.len();
                batch.bytes.extend_from_slice(record.value);
                batch
                    .records
                    .push((record.table, key_end, batch.bytes.len()));
                if batch.records.len() >= LOAD_BATCH_RECORDS {
                    send(LoadPiece::Records(std::mem::take(&mut batch)))?;
                }
                Ok(())
            });
            result.map_err(ReplicaError::from)?;
            finish_nodes(&mut nodes)
                .and_then(|()| {
                    if batch.records.is_empty() {
                        Ok(())
                    } else {
                        send(LoadPiece::Records(batch))
                    }
                })
                .map_err(|detail| ReplicaError::Start(format!("saved state: {detail}")))
        })
        .map_err(|error| ReplicaError::Start(format!("cannot start loading the state: {error}")))?;
    let mut refused = None;
    'pieces: for piece in arriving.iter() {
        let batch = match piece {
            LoadPiece::Nodes(sorted) => {
                if let Err(error) = loader.take_nodes(sorted) {
                    refused = Some(error);
                    break 'pieces;
                }
                continue;
            }
            LoadPiece::Records(batch) => batch,
        };
        let mut start = 0;
        for &(table, key_end, end) in &batch.records {
            let record = StateRecordRef {
                table,
                key: &batch.bytes[start..key_end],
                value: &batch.bytes[key_end..end],
            };
            start = end;
            if let Err(error) = loader.record(record) {
                refused = Some(error);
                break 'pieces;
            }
        }
    }
    // Stops the reader if the loader refused a piece.
    drop(arriving);
    let read = reading
        .join()
        .map_err(|_| ReplicaError::Start("loading the state panicked".into()))?;
    if let Some(error) = refused {
        return Err(ReplicaError::Start(format!("saved state: {error}")));
    }
    read?;
    Ok(())
}

/// A replica's state as its data directory holds it, with its chosen log
/// applied (see [`recover_offline`]).
#[derive(Debug)]
pub struct OfflineState {
    /// The state machine.
    pub state: StateMachine,
    /// The last slot applied to it.
    pub applied_through: u64,
    /// The membership the database holds.
    pub membership: synod_paxos::Membership,
}

/// Opens a stopped replica's database (never creating one), loads its
/// saved state and applies every chosen slot its log holds after it, as a
/// restart would, without starting anything or writing to the database.
/// For disaster recovery (`synod-server export`): the survivor of a
/// cluster that lost its majority for good.
///
/// # Errors
/// As a restart's: a missing or unusable database, a saved state that does
/// not load.
pub fn recover_offline(config: &ReplicaConfig) -> Result<OfflineState, ReplicaError> {
    let clock = Clock::new();
    let (storage, recovered) = open_storage(config, false, false)?;
    let (state, apply_from) = load_state(config, &storage, &recovered)?;
    let membership = recovered.durable.membership.clone();
    let node = Node::new(
        config.paxos_config(config.id),
        recovered.durable.clone(),
        apply_from,
        clock.now_ms(),
    )
    .map_err(|error| ReplicaError::Start(error.to_string()))?;
    let holds = Arc::new(snapshot::StreamHolds::default());
    let mut driver = Driver::new(config.clone(), node, state, holds, clock.now_ms());
    driver.replay();
    drop(storage);
    let (state, applied_through) = driver.into_state();
    Ok(OfflineState {
        state,
        applied_through,
        membership,
    })
}

impl Replica {
    /// Starts a replica in this process.
    ///
    /// # Errors
    /// A missing database without `bootstrap`, a database that cannot be
    /// used, a snapshot that does not restore, or endpoints that cannot bind.
    pub async fn start(
        config: ReplicaConfig,
        options: StartOptions,
    ) -> Result<Replica, ReplicaError> {
        let clock = Clock::skewed(options.clock_skew);
        // The TLS files first: a bad one fails the start at once, before
        // the state is loaded. What they look like is taken before they are
        // read, so a change made while they are read is seen.
        let tls_files = tls_watch::Fingerprint::of(&tls_watch::watched_files(&config));
        let material = config
            .load_tls()
            .map_err(|error| ReplicaError::Start(error.to_string()))?;
        let opening = Instant::now();
        let (storage, recovered) = open_storage(&config, options.bootstrap, options.join)?;
        tracing::info!(
            node = config.id,
            path = %storage.path().display(),
            elapsed_ms = opening.elapsed().as_millis() as u64,
            "database opened and checked"
        );
        let (state, apply_from) = load_state(&config, &storage, &recovered)?;
        let seed = clock.now_ms() ^ u64::from(std::process::id()).rotate_left(32) ^ config.id;
        let node = Node::new(
            config.paxos_config(seed),
            recovered.durable.clone(),
            apply_from,
            clock.now_ms(),
        )
        .map_err(|error| ReplicaError::Start(error.to_string()))?;

        let (log_requests, log_receiver) = std_mpsc::channel::<Persist>();
        let (writer_requests, writer_receiver) = std_mpsc::channel::<WriterRequest>();
        let (writer_events, writer_events_receiver) = mpsc::unbounded_channel();
        let state_reader = storage.state_reader();
        let settings = WriterSettings {
            state_flush_interval: Duration::from_millis(config.limits.state_flush_interval_ms),
            state_flush_bytes_max: config.limits.state_flush_bytes_max,
        };
        let holds = Arc::new(snapshot::StreamHolds::default());
        let mut driver = Driver::new(config.clone(), node, state, holds.clone(), clock.now_ms());
        let metrics = driver.metrics();
        let (log_store, state_store) = storage.into_parts();
        let state_writer = storage_thread::spawn_state_writer(
            state_store,
            settings,
            metrics.clone(),
            writer_receiver,
            writer_events.clone(),
        )
        .map_err(|error| ReplicaError::Start(format!("cannot start the state writer: {error}")))?;
        let log_writer = storage_thread::spawn_log_writer(
            log_store,
            metrics.clone(),
            log_receiver,
            writer_events,
        )
        .map_err(|error| ReplicaError::Start(format!("cannot start the log writer: {error}")))?;
        driver.replay();
        let identity = Arc::new(ClusterIdentity::new(
            config.id,
            config.members.len(),
            driver.identity_view(),
        ));
        if let Some(cluster) = driver.identity_view().cluster {
            tracing::info!(
                node = config.id,
                identity = %crate::transport::identity::identity_hex(cluster),
                "cluster identity restored"
            );
        }

        let (peer_inbound, peer_receiver) = mpsc::channel::<PeerMessage>(65_536);
        let (connections, connection_receiver) = mpsc::channel::<ClientConnection>(1024);
        tls_watch::note_certificate(config.id, &material, &metrics);
        let endpoints = Endpoints::start(
            &config,
            material,
            options.peer_socket,
            options.client_socket,
            peer_inbound,
            connections,
            net::SnapshotServing {
                state: state_reader,
                holds,
                metrics: metrics.clone(),
            },
            identity.clone(),
            RefusalSink::new({
                let metrics = metrics.clone();
                move |limit| {
                    metrics.refused(limit).inc();
                }
            }),
        )?;
        let client_address = endpoints.client_address();
        let peer_address = endpoints.peer_address();
        let (shutdown, shutdown_receiver) = watch::channel(false);
        let tls_watch = tokio::spawn(tls_watch::run(tls_watch::TlsWatch {
            config: config.clone(),
            reloader: endpoints.tls_reloader(),
            metrics: metrics.clone(),
            loaded: tls_files,
            requests: options.reload_tls,
            shutdown: shutdown_receiver.clone(),
        }));
        let (status_sender, status) = watch::channel(driver.status());
        let (running, running_receiver) = watch::channel(true);
        let (http_stop, http_stop_receiver) = watch::channel(false);
        let http = match config.monitoring.http_address {
            Some(address) => Some(
                HttpServer::start(
                    HttpSettings {
                        address,
                        node: config.id,
                        databases: DatabasePaths::in_dir(&config.data_dir),
                        ready_lag_slots_max: config.monitoring.ready_lag_slots_max,
                        connections_max: usize::try_from(config.limits.http_connections_max)
                            .unwrap_or(usize::MAX),
                        header_timeout: Duration::from_millis(config.limits.http_header_timeout_ms),
                    },
                    metrics,
                    running_receiver,
                    status.clone(),
                    http_stop_receiver,
                )
                .await
                .map_err(|error| {
                    ReplicaError::Start(format!(
                        "cannot listen on monitoring.http_address {address}: {error}"
                    ))
                })?,
            ),
            None => None,
        };
        driver.publish_metrics();
        let id = config.id;
        let task = tokio::spawn(event_loop(EventLoop {
            driver,
            clock,
            endpoints,
            log_writer: log_requests,
            writer: writer_requests,
            writer_events: writer_events_receiver,
            peer_receiver,
            connection_receiver,
            shutdown: shutdown_receiver,
            status: status_sender,
            identity,
            _running: RunningFlag(running),
        }));
        tracing::info!(node = id, %client_address, %peer_address, "replica started");
        Ok(Replica {
            id,
            client_address,
            peer_address,
            shutdown,
            task,
            writers: vec![log_writer, state_writer],
            tls_watch,
            status,
            http,
            http_stop,
        })
    }

    /// Serves until `shutdown` resolves, then stops cleanly, or until the
    /// replica stops by itself (a fatal error).
    ///
    /// # Errors
    /// Why the replica stopped by itself, or an error stopping it.
    pub async fn run_until(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), ReplicaError> {
        tokio::select! {
            _ = shutdown => self.shutdown().await,
            result = &mut self.task => {
                self.join_writer().await;
                result.unwrap_or_else(|error| Err(ReplicaError::Fatal(error.to_string())))
            }
        }
    }

    /// Where the HTTP listener for metrics and health serves, if configured.
    pub fn http_address(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(HttpServer::address)
    }

    /// The replica's status, refreshed every few ticks: role, leader,
    /// ballot, slots, sessions.
    pub fn status(&self) -> ClusterStatus {
        self.status.borrow().clone()
    }

    /// The replica's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Where clients reach it.
    pub fn client_address(&self) -> SocketAddr {
        self.client_address
    }

    /// Where peers reach it.
    pub fn peer_address(&self) -> SocketAddr {
        self.peer_address
    }

    /// Stops cleanly: the event loop ends, every acknowledged write is
    /// already durable, and the database is closed.
    ///
    /// # Errors
    /// The error that had already stopped the replica, if any.
    pub async fn shutdown(mut self) -> Result<(), ReplicaError> {
        let _ = self.shutdown.send(true);
        let result = (&mut self.task)
            .await
            .unwrap_or_else(|error| Err(ReplicaError::Fatal(error.to_string())));
        self.join_writer().await;
        result
    }

    /// Stops abruptly, as a crash would: the event loop is aborted wherever
    /// it is, and writes not yet committed may or may not reach the disk.
    pub async fn kill(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
        self.join_writer().await;
    }

    /// Waits until the replica stops by itself (a fatal error).
    ///
    /// # Errors
    /// Why it stopped.
    pub async fn wait(mut self) -> Result<(), ReplicaError> {
        let result = (&mut self.task)
            .await
            .unwrap_or_else(|error| Err(ReplicaError::Fatal(error.to_string())));
        self.join_writer().await;
        result
    }

    async fn stop_http(&mut self) {
        let _ = self.http_stop.send(true);
        if let Some(http) = self.http.take() {
            http.stopped().await;
        }
    }

    async fn join_writer(&mut self) {
        self.tls_watch.abort();
        self.stop_http().await;
        for writer in std::mem::take(&mut self.writers) {
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
    }
}

struct EventLoop {
    driver: Driver,
    clock: Clock,
    endpoints: Endpoints,
    /// The core's batches, to the log writer.
    log_writer: std_mpsc::Sender<Persist>,
    /// Everything else, to the state writer.
    writer: std_mpsc::Sender<WriterRequest>,
    writer_events: mpsc::UnboundedReceiver<WriterEvent>,
    peer_receiver: mpsc::Receiver<PeerMessage>,
    connection_receiver: mpsc::Receiver<ClientConnection>,
    shutdown: watch::Receiver<bool>,
    status: watch::Sender<ClusterStatus>,
    identity: Arc<ClusterIdentity>,
    /// Cleared when the event loop ends, however it ends (`/livez`).
    _running: RunningFlag,
}

/// Holds `true` while its owner lives, `false` once it is dropped.
struct RunningFlag(watch::Sender<bool>);

impl Drop for RunningFlag {
    fn drop(&mut self) {
        let _ = self.0.send(false);
    }
}

async fn event_loop(mut run: EventLoop) -> Result<(), ReplicaError> {
    let (client_inputs, mut client_receiver) = mpsc::channel::<Input>(65_536);
    let (fetched, mut fetched_receiver) = mpsc::channel::<Input>(4);
    let mut next_connection = 1u64;
    let mut ticks = 0u64;
    let mut tick = tokio::time::interval(TICK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let result = loop {
        let first = tokio::select! {
            changed = run.shutdown.changed() => {
                if changed.is_err() || *run.shutdown.borrow() {
                    break Ok(());
                }
                continue;
            }
            Some(message) = run.peer_receiver.recv() => Input::Peer(message),
            Some(connection) = run.connection_receiver.recv() => {
                let id = next_connection;
                next_connection += 1;
                accept_connection(id, connection, client_inputs.clone())
            }
            Some(input) = client_receiver.recv() => input,
            Some(event) = run.writer_events.recv() => match event {
                WriterEvent::Done(input) => input,
                WriterEvent::Failed(error) => {
                    tracing::error!(%error, "storage failed; stopping");
                    break Err(ReplicaError::Fatal(error));
                }
            },
            Some(input) = fetched_receiver.recv() => input,
            _ = tick.tick() => {
                ticks += 1;
                if ticks.is_multiple_of(STATUS_EVERY_TICKS) {
                    run.driver.publish_peer_links(
                        |peer| run.endpoints.is_connected(peer),
                        run.endpoints.dropped_messages(),
                    );
                    let _ = run.status.send(run.driver.status());
                    run.driver.publish_metrics();
                }
                if let Some(reason) = run.identity.fatal() {
                    break Err(ReplicaError::ClusterIdentity(reason));
                }
                let view = run.driver.identity_view();
                if view != run.identity.view() {
                    run.identity.publish(view);
                }
                Input::Tick
            }
        };
        run.driver.handle(first, run.clock.now_ms());
        // Take whatever else is already waiting before flushing, so that
        // everything that arrived meanwhile shares one persist round.
        let mut handled = 1;
        while handled < INPUTS_PER_ROUND_MAX {
            let next = if let Ok(message) = run.peer_receiver.try_recv() {
                Input::Peer(message)
            } else if let Ok(input) = client_receiver.try_recv() {
                input
            } else if let Ok(WriterEvent::Done(input)) = run.writer_events.try_recv() {
                input
            } else {
                break;
            };
            run.driver.handle(next, run.clock.now_ms());
            handled += 1;
        }
        let outbox = run.driver.take_outbox();
        if let Some(error) = outbox.fatal {
            break Err(ReplicaError::Fatal(error));
        }
        for job in outbox.storage {
            let sent = match job {
                StorageJob::Persist(batch) => run.log_writer.send(batch).is_ok(),
                job => run.writer.send(WriterRequest::Job(job)).is_ok(),
            };
            if !sent {
                break;
            }
        }
        if let Some(old) = outbox.discarded_state {
            // Freeing a large state takes a while: not on the event loop.
            tokio::task::spawn_blocking(move || drop(old));
        }
        if !outbox.peer.is_empty() {
            run.endpoints.send(outbox.peer);
        }
        if let Some(from) = outbox.fetch_snapshot {
            let (chunks, arriving) = mpsc::channel(snapshot::CHUNKS_IN_FLIGHT);
            let fetch = run.endpoints.fetch_snapshot(from, chunks);
            let writer = run.writer.clone();
            let config = run.driver.state().config().clone();
            let runtime = tokio::runtime::Handle::current();
            let fetched = fetched.clone();
            tokio::spawn(async move {
                let install = tokio::task::spawn_blocking(move || {
                    snapshot::install(arriving, writer, config, runtime)
                });
                let transfer = fetch.await;
                let installed = install
                    .await
                    .unwrap_or_else(|error| Err(format!("installing the snapshot: {error}")));
                let result = match (transfer, installed) {
                    (Ok(through), Ok(state)) if through == state.header.through => Ok(state),
                    (Ok(through), Ok(state)) => Err(format!(
                        "the snapshot announced slot {through} but holds slot {}",
                        state.header.through
                    )),
                    (Err(error), _) | (Ok(_), Err(error)) => Err(error),
                };
                let _ = fetched.send(Input::SnapshotFetched(result)).await;
            });
        }
    };
    run.endpoints.close().await;
    drop(run.log_writer);
    drop(run.writer);
    result
}

/// Hands a client connection's frames to the event loop, in order, and
/// reports its end.
fn accept_connection(id: u64, connection: ClientConnection, inputs: mpsc::Sender<Input>) -> Input {
    let ClientConnection {
        mut frames,
        replies,
        identity,
        ..
    } = connection;
    tokio::spawn(async move {
        while let Some(frame) = frames.recv().await {
            if inputs.send(Input::ClientFrame { id, frame }).await.is_err() {
                return;
            }
        }
        let _ = inputs.send(Input::ClientDisconnected { id }).await;
    });
    Input::ClientConnected {
        id,
        identity,
        replies,
    }
}

/// Runs one replica until `shutdown` resolves (the binary's entry point).
///
/// # Errors
/// Why it could not start, or why it stopped.
pub async fn run(
    config: ReplicaConfig,
    options: StartOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ReplicaError> {
    Replica::start(config, options)
        .await?
        .run_until(shutdown)
        .await
}
