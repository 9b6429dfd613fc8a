//! The clients of a run: tasks in the harness's process, each with its own
//! session and its own source address (so the firewall can cut one client
//! off), recording every call and answer.
//!
//! - register workers read (linearizable, unless the run asks otherwise),
//!   write unique values and compare-and-set the registers `/reg/k<N>`;
//! - a sequence worker creates sequential nodes under `/seq`;
//! - lock workers contend for `/locks/fenced`, write the fenced resource
//!   `/fenced` with their token while they hold it, and release it;
//! - a watcher keeps a persistent recursive watch on `/reg`.
//!
//! A worker whose session ended connects again with a new one. Every loop
//! stops at the run's stop signal.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use synod_client::{
    Client, ClientError, Consistency, CreateMode, ErrorKind, EventType, LockOptions,
};
use tokio::sync::watch;

use crate::cluster::AddressPlan;
use crate::history::{Call, ClientId, Outcome, Record};
use crate::recorder::Recorder;

/// The parent of the registers.
pub const REGISTERS: &str = "/reg";
/// The parent of the sequential nodes.
pub const SEQUENCE_PARENT: &str = "/seq";
/// The lock the lock workers contend for.
pub const LOCK: &str = "/locks/fenced";
/// The node the lock's token fences.
pub const FENCED: &str = "/fenced";
/// The parent of the ephemeral nodes of killed client processes.
pub const EPHEMERALS: &str = "/eph";

/// How the run's clients connect.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Every replica's client address.
    pub endpoints: Vec<String>,
    /// The directory holding `ca.pem`, `client.pem`, `client-key.pem`.
    pub certs: PathBuf,
    /// The run's addresses (each client binds its own).
    pub plan: AddressPlan,
    /// The sessions' timeout.
    pub session_timeout_ms: u64,
    /// How long one call may take, retries included.
    pub request_timeout_ms: u64,
    /// The consistency of register reads.
    pub consistency: Consistency,
}

impl ClientSettings {
    /// Connects client `index` from its own address, trying the replicas
    /// starting from a different one for each client so that sessions
    /// spread.
    ///
    /// # Errors
    /// No replica answered.
    pub async fn connect(&self, index: u32) -> synod_client::Result<Client> {
        let mut endpoints = self.endpoints.clone();
        if !endpoints.is_empty() {
            let shift = index as usize % endpoints.len();
            endpoints.rotate_left(shift);
        }
        Client::builder()
            .endpoints(endpoints)
            .tls_dir(&self.certs)
            .local_address(self.plan.client(index).into())
            .session_timeout_ms(self.session_timeout_ms)
            .request_timeout_ms(self.request_timeout_ms)
            .consistency(self.consistency)
            .rebalance_after_ms(REBALANCE_AFTER_MS)
            .connect()
            .await
    }
}

/// How long a session that failed over stays away from its home replica:
/// short, so that sessions spread again between faults (and moving back is
/// itself exercised under faults).
pub const REBALANCE_AFTER_MS: u64 = 4_000;

/// The clients each worker uses now, so the nemesis can find the replica
/// a client is attached to.
pub type Attachments = Arc<Mutex<HashMap<ClientId, Client>>>;

/// What every worker shares.
#[derive(Clone)]
pub struct WorkerContext {
    /// How to connect.
    pub settings: ClientSettings,
    /// Where to record.
    pub recorder: Arc<Recorder>,
    /// Turns true when the run stops.
    pub stop: watch::Receiver<bool>,
    /// The current client of each worker.
    pub attachments: Attachments,
    /// The number of registers.
    pub keys: u32,
}

/// How a client error is recorded: refused calls certainly did not take
/// effect; everything else may have.
pub fn outcome_of_error(error: &ClientError) -> Outcome {
    let error_text = error.to_string();
    match error.kind() {
        ErrorKind::Timeout
        | ErrorKind::Unavailable
        | ErrorKind::ConnectionLost
        | ErrorKind::OutcomeUnknown
        | ErrorKind::SessionExpired
        | ErrorKind::LockLost
        | ErrorKind::Closed
        | ErrorKind::Protocol => Outcome::Indeterminate { error: error_text },
        _ => Outcome::Failed { error: error_text },
    }
}

fn session_over(error: &ClientError) -> bool {
    matches!(
        error.kind(),
        ErrorKind::SessionExpired | ErrorKind::Closed | ErrorKind::Config
    )
}

impl WorkerContext {
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    async fn pause(&self, duration: Duration) {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(duration) => {}
            _ = stop.wait_for(|stopped| *stopped) => {}
        }
    }

    /// Connects worker `client`, retrying until it works or the run stops.
    async fn connect(&self, client: ClientId) -> Option<Client> {
        while !self.stopped() {
            match self.settings.connect(client).await {
                Ok(connected) => {
                    self.attachments
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .insert(client, connected.clone());
                    return Some(connected);
                }
                Err(error) => {
                    tracing::debug!(client, %error, "connect failed");
                    self.pause(Duration::from_millis(200)).await;
                }
            }
        }
        None
    }

    fn detach(&self, client: ClientId) {
        self.attachments
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&client);
    }
}

/// Creates the nodes the workers use (the registers are created by the
/// register workers' first calls, recorded like the rest).
///
/// # Errors
/// A create that fails for another reason than existing already.
pub async fn prepare(client: &Client) -> synod_client::Result<()> {
    for path in [REGISTERS, SEQUENCE_PARENT, FENCED, EPHEMERALS] {
        match client.create(path, b"", CreateMode::Persistent).await {
            Ok(_) => {}
            Err(error) if error.kind() == ErrorKind::NodeExists => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// The path of register `key`.
pub fn register_path(key: u32) -> String {
    format!("{REGISTERS}/k{key}")
}

/// Reads, writes and compare-and-sets random registers until the run stops.
pub async fn register_worker(context: WorkerContext, client_id: ClientId, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let recorder = &context.recorder;
    let mut written = 0u64;
    let mut versions: HashMap<u32, u64> = HashMap::new();
    'session: while let Some(client) = context.connect(client_id).await {
        while !context.stopped() {
            let key = rng.random_range(0..context.keys);
            let path = register_path(key);
            let choice = rng.random_range(0..10);
            let invoked = recorder.now_ns();
            let error = if choice < 4 {
                let call = Call::Read { key: path.clone() };
                match client.get(&path).await {
                    Ok((data, stat)) => {
                        versions.insert(key, stat.version);
                        let value = String::from_utf8_lossy(&data).into_owned();
                        recorder.operation(
                            client_id,
                            invoked,
                            call,
                            Outcome::Read {
                                value: Some((value, stat.version)),
                            },
                        );
                        None
                    }
                    Err(error) if error.kind() == ErrorKind::NoNode => {
                        let outcome = Outcome::Read { value: None };
                        recorder.operation(client_id, invoked, call, outcome);
                        let value = format!("c{client_id}-{written}");
                        written += 1;
                        let call = Call::Create {
                            key: path.clone(),
                            value: value.clone(),
                        };
                        let invoked = recorder.now_ns();
                        let outcome = match client
                            .create(&path, value.as_bytes(), CreateMode::Persistent)
                            .await
                        {
                            Ok(_) => Outcome::Written {
                                version: 0,
                                revision: 0,
                            },
                            Err(error) => outcome_of_error(&error),
                        };
                        recorder.operation(client_id, invoked, call, outcome);
                        None
                    }
                    Err(error) => {
                        let outcome = Outcome::Failed {
                            error: error.to_string(),
                        };
                        recorder.operation(client_id, invoked, call, outcome);
                        Some(error)
                    }
                }
            } else {
                let value = format!("c{client_id}-{written}");
                written += 1;
                let expected = (choice >= 7).then(|| versions.get(&key).copied().unwrap_or(0));
                let call = match expected {
                    Some(expected_version) => Call::CompareAndSet {
                        key: path.clone(),
                        expected_version,
                        value: value.clone(),
                    },
                    None => Call::Write {
                        key: path.clone(),
                        value: value.clone(),
                    },
                };
                match client.set(&path, value.as_bytes(), expected).await {
                    Ok(stat) => {
                        versions.insert(key, stat.version);
                        let outcome = Outcome::Written {
                            version: stat.version,
                            revision: stat.modified_revision,
                        };
                        recorder.operation(client_id, invoked, call, outcome);
                        None
                    }
                    Err(error) => {
                        let outcome = match error.kind() {
                            ErrorKind::BadVersion => {
                                versions.remove(&key);
                                Outcome::VersionMismatch
                            }
                            _ => outcome_of_error(&error),
                        };
                        recorder.operation(client_id, invoked, call, outcome);
                        Some(error)
                    }
                }
            };
            if let Some(error) = error {
                if session_over(&error) {
                    context.detach(client_id);
                    continue 'session;
                }
                if error.is_transient() {
                    context.pause(Duration::from_millis(20)).await;
                }
            }
        }
        client.close().await;
        break;
    }
    context.detach(client_id);
}

/// Creates sequential nodes under [`SEQUENCE_PARENT`] until the run stops.
pub async fn sequence_worker(context: WorkerContext, client_id: ClientId) {
    let recorder = &context.recorder;
    'session: while let Some(client) = context.connect(client_id).await {
        while !context.stopped() {
            let invoked = recorder.now_ns();
            let call = Call::CreateSequential {
                parent: SEQUENCE_PARENT.to_string(),
            };
            let prefix = format!("{SEQUENCE_PARENT}/n-");
            match client
                .create(&prefix, b"", CreateMode::PersistentSequential)
                .await
            {
                Ok(path) => recorder.operation(client_id, invoked, call, Outcome::Created { path }),
                Err(error) => {
                    recorder.operation(client_id, invoked, call, outcome_of_error(&error));
                    if session_over(&error) {
                        context.detach(client_id);
                        continue 'session;
                    }
                    context.pause(Duration::from_millis(20)).await;
                }
            }
            context.pause(Duration::from_millis(5)).await;
        }
        client.close().await;
        break;
    }
    context.detach(client_id);
}

/// Acquires [`LOCK`], writes [`FENCED`] under its token while holding it,
/// and releases it, until the run stops.
pub async fn lock_worker(context: WorkerContext, client_id: ClientId, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let recorder = context.recorder.clone();
    let mut written = 0u64;
    'session: while let Some(client) = context.connect(client_id).await {
        while !context.stopped() {
            let invoked = recorder.now_ns();
            let call = Call::Acquire {
                lock: LOCK.to_string(),
            };
            let options = LockOptions::exclusive().timeout(Duration::from_secs(5));
            let guard = match client.lock_with(LOCK, options).await {
                Ok(guard) => guard,
                Err(error) => {
                    let outcome = match error.kind() {
                        ErrorKind::Timeout => Outcome::Failed {
                            error: error.to_string(),
                        },
                        _ => outcome_of_error(&error),
                    };
                    recorder.operation(client_id, invoked, call, outcome);
                    if session_over(&error) {
                        context.detach(client_id);
                        continue 'session;
                    }
                    context.pause(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let token = guard.token().generation;
            recorder.operation(client_id, invoked, call, Outcome::Granted { token });
            // The moment the client is told the lock may be lost.
            let lost = guard.lost();
            let lost_recorder = recorder.clone();
            let lost_watch = tokio::spawn(async move {
                lost.await;
                lost_recorder.push(Record::LockLost {
                    client: client_id,
                    lock: LOCK.to_string(),
                    token,
                    at_ns: lost_recorder.now_ns(),
                });
            });
            let uses = rng.random_range(1..=3);
            for _ in 0..uses {
                if !guard.is_held() || context.stopped() {
                    break;
                }
                let value = format!("c{client_id}-{written}");
                written += 1;
                let invoked = recorder.now_ns();
                let call = Call::FencedWrite {
                    lock: LOCK.to_string(),
                    resource: FENCED.to_string(),
                    token,
                    value: value.clone(),
                };
                let outcome = match client
                    .set_fenced(FENCED, value.as_bytes(), guard.token())
                    .await
                {
                    Ok(_) => Outcome::FenceAccepted,
                    Err(error) if error.kind() == ErrorKind::StaleSequencer => {
                        Outcome::FenceRejected
                    }
                    Err(error) => outcome_of_error(&error),
                };
                recorder.operation(client_id, invoked, call, outcome);
                let hold = rng.random_range(0..30);
                context.pause(Duration::from_millis(hold)).await;
            }
            let held = guard.is_held();
            if !held {
                recorder.push(Record::LockLost {
                    client: client_id,
                    lock: LOCK.to_string(),
                    token,
                    at_ns: recorder.now_ns(),
                });
            }
            let invoked = recorder.now_ns();
            let call = Call::Release {
                lock: LOCK.to_string(),
                token,
            };
            let result = guard.release().await;
            lost_watch.abort();
            let outcome = match &result {
                Ok(()) => Outcome::Released,
                Err(error) => outcome_of_error(error),
            };
            recorder.operation(client_id, invoked, call, outcome);
            if let Err(error) = result {
                if session_over(&error) {
                    context.detach(client_id);
                    continue 'session;
                }
            }
            let rest = rng.random_range(0..20);
            context.pause(Duration::from_millis(rest)).await;
        }
        client.close().await;
        break;
    }
    context.detach(client_id);
}

/// Keeps a persistent recursive watch on [`REGISTERS`] and records every
/// event, until the run stops.
pub async fn watch_worker(context: WorkerContext, client_id: ClientId) {
    let recorder = &context.recorder;
    'session: while let Some(client) = context.connect(client_id).await {
        while !context.stopped() {
            let mut stream = match client.watch(REGISTERS).await {
                Ok(stream) => stream,
                Err(error) => {
                    if session_over(&error) {
                        context.detach(client_id);
                        continue 'session;
                    }
                    context.pause(Duration::from_millis(100)).await;
                    continue;
                }
            };
            recorder.push(Record::WatchStarted {
                client: client_id,
                path: REGISTERS.to_string(),
                revision: stream.revision(),
                at_ns: recorder.now_ns(),
            });
            let mut stop = context.stop.clone();
            let (compacted, reason, over) = loop {
                let event = tokio::select! {
                    event = stream.next() => event,
                    _ = stop.wait_for(|stopped| *stopped) => break (false, "the run stopped".to_string(), false),
                };
                match event {
                    Ok(event) if event.event_type == EventType::HistoryCompacted => {
                        break (true, "history compacted".to_string(), false);
                    }
                    Ok(event) => recorder.push(Record::WatchEvent {
                        client: client_id,
                        path: event.path,
                        kind: format!("{:?}", event.event_type),
                        revision: event.revision,
                        at_ns: recorder.now_ns(),
                    }),
                    Err(error) => break (false, error.to_string(), session_over(&error)),
                }
            };
            recorder.push(Record::WatchEnded {
                client: client_id,
                path: REGISTERS.to_string(),
                compacted,
                reason,
                at_ns: recorder.now_ns(),
            });
            if over {
                context.detach(client_id);
                continue 'session;
            }
        }
        client.close().await;
        break;
    }
    context.detach(client_id);
}
