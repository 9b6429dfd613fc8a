//! The replica's writer: one OS thread that owns the [`Storage`] and makes
//! the driver's jobs durable in order.
//!
//! Group commit: while one commit is in flight, jobs keep queueing; the next
//! round takes everything queued and writes it in one transaction (one
//! fsync), in order.
//!
//! The state machine's changes ([`StorageJob::SaveState`]) are not written
//! at once: they are kept, folded into one delta (a key changed many
//! times is written once, [`StateDelta::merged`]) and written with the
//! round that comes after
//! [`WriterSettings::state_flush_interval`] has passed since the first of
//! them, or as soon as they hold [`WriterSettings::state_flush_bytes_max`].
//! Nothing is lost meanwhile: the log holds every entry they came from, and
//! is compacted only below a saved state (the driver compacts when it hears
//! [`Input::StateSaved`]). So a restart loads the saved state and replays
//! at most one interval of the log, and a B-tree page that many changes
//! touch is written once per interval instead of once per commit.
//!
//! Fail-stop: the first error is reported to the driver as fatal and the
//! thread stops; the replica exits and recovers from disk.

use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::driver::{Input, StorageJob};
use crate::metrics::Metrics;
use crate::storage::{StateDelta, StateTable, StateWrite, Storage, Write};

/// A commit that takes this long is logged: every write waits for it.
const SLOW_COMMIT: Duration = Duration::from_millis(250);

/// Most jobs taken in one group-commit round.
const JOBS_PER_ROUND_MAX: usize = 4096;

/// When the state machine's changes are written.
#[derive(Debug, Clone, Copy)]
pub struct WriterSettings {
    /// Longest time a change waits before it is written.
    pub state_flush_interval: Duration,
    /// Pending changes are written once they hold this many bytes.
    pub state_flush_bytes_max: u64,
}

/// A request to the writer thread.
pub enum WriterRequest {
    /// A job from the driver.
    Job(StorageJob),
    /// A piece of a snapshot being installed, from the task fetching it:
    /// [`StateWrite::StageBegin`] first, then [`StateWrite::Stage`]s. The
    /// permit is released once the piece is written (staging is made
    /// durable by the activation's commit), which paces the fetch to the
    /// writer.
    Stage {
        /// The write.
        write: StateWrite,
        /// Held until the write is committed.
        permit: Option<OwnedSemaphorePermit>,
    },
}

/// Records of a staged snapshot, as the writer takes them.
pub type StagedRecords = Vec<(StateTable, Box<[u8]>, Vec<u8>)>;

/// Starts the writer thread.
pub fn spawn(
    mut storage: Storage,
    settings: WriterSettings,
    metrics: Arc<Metrics>,
    requests: std_mpsc::Receiver<WriterRequest>,
    completions: mpsc::UnboundedSender<WriterEvent>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("synod-storage".into())
        .spawn(move || {
            let mut writer = Writer {
                storage: &mut storage,
                settings,
                metrics: &metrics,
                completions: &completions,
                pending: Vec::new(),
                pending_since: None,
                pending_bytes: 0,
            };
            if let Err(error) = writer.run(&requests) {
                let _ = completions.send(WriterEvent::Failed(error));
                return;
            }
            if let Err(error) = storage.close() {
                tracing::error!(%error, "closing the database failed");
            }
        })
}

/// What the writer tells the replica.
#[derive(Debug)]
pub enum WriterEvent {
    /// A driver input: `Persisted` or `StateSaved`.
    Done(Input),
    /// A write failed; the replica must stop.
    Failed(String),
}

struct Writer<'a> {
    storage: &'a mut Storage,
    settings: WriterSettings,
    metrics: &'a Metrics,
    completions: &'a mpsc::UnboundedSender<WriterEvent>,
    /// The state machine's changes not written yet, in order; folded into
    /// one delta when they are written.
    pending: Vec<StateDelta>,
    /// When the oldest of them arrived.
    pending_since: Option<Instant>,
    /// The bytes of the deltas in `pending` (a key changed twice counts
    /// twice, as it is held twice until the fold), kept as they arrive so
    /// that no round walks them all.
    pending_bytes: u64,
}

impl Writer<'_> {
    fn run(&mut self, requests: &std_mpsc::Receiver<WriterRequest>) -> Result<(), String> {
        loop {
            let first = match self.pending_since {
                None => match requests.recv() {
                    Ok(request) => Some(request),
                    Err(_) => break,
                },
                Some(since) => {
                    let due = since + self.settings.state_flush_interval;
                    let wait = due.saturating_duration_since(Instant::now());
                    match requests.recv_timeout(wait) {
                        Ok(request) => Some(request),
                        Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                        Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            let mut round: Vec<WriterRequest> = first.into_iter().collect();
            while round.len() < JOBS_PER_ROUND_MAX {
                match requests.try_recv() {
                    Ok(request) => round.push(request),
                    Err(_) => break,
                }
            }
            self.round(round, false)?;
        }
        // The driver is gone: save what is pending, so that a clean restart
        // replays nothing.
        self.round(Vec::new(), true)
    }

    /// Writes one round in one commit, then reports it.
    fn round(&mut self, round: Vec<WriterRequest>, last: bool) -> Result<(), String> {
        let mut writes: Vec<Write> = Vec::with_capacity(round.len() + 1);
        let mut permits = Vec::new();
        let mut last_batch = None;
        let mut saved_through = None;
        for request in round {
            match request {
                WriterRequest::Job(StorageJob::Persist(batch)) => {
                    last_batch = Some(batch.id);
                    writes.push(Write::Persist(batch));
                }
                WriterRequest::Job(StorageJob::SaveState(delta)) => {
                    self.pending_since.get_or_insert_with(Instant::now);
                    self.pending_bytes += delta.bytes();
                    self.pending.push(delta);
                }
                WriterRequest::Job(StorageJob::ActivateState(header)) => {
                    // The installed state supersedes every change pending
                    // for the old one (they are all for earlier slots).
                    self.pending.clear();
                    self.pending_since = None;
                    self.pending_bytes = 0;
                    saved_through = Some(header.through);
                    writes.push(Write::State(StateWrite::StageActivate(header)));
                }
                WriterRequest::Stage { write, permit } => {
                    permits.extend(permit);
                    writes.push(Write::State(write));
                }
            }
        }
        let due = self.pending_since.is_some_and(|since| {
            since.elapsed() >= self.settings.state_flush_interval
                || self.pending_bytes >= self.settings.state_flush_bytes_max
        });
        if (due || last) && self.pending.iter().any(|delta| !delta.is_empty()) {
            let delta = StateDelta::merged(std::mem::take(&mut self.pending));
            self.pending_since = None;
            self.pending_bytes = 0;
            saved_through = delta.through().or(saved_through);
            writes.push(Write::State(StateWrite::Delta(delta)));
        }
        let started = Instant::now();
        self.storage
            .commit(&writes)
            .map_err(|error| error.to_string())?;
        let elapsed = started.elapsed();
        self.metrics
            .storage_commit_seconds
            .observe(elapsed.as_secs_f64());
        self.metrics
            .storage_commit_writes
            .observe(writes.len() as f64);
        if elapsed >= SLOW_COMMIT {
            tracing::warn!(
                elapsed_ms = elapsed.as_millis() as u64,
                writes = writes.len(),
                state_through = saved_through,
                "slow commit"
            );
        }
        drop(permits);
        if let Some(id) = last_batch {
            let _ = self
                .completions
                .send(WriterEvent::Done(Input::Persisted(id)));
        }
        if let Some(through) = saved_through {
            let _ = self
                .completions
                .send(WriterEvent::Done(Input::StateSaved(through)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! A failed sync is fatal: the writer reports it and stops instead of
    //! acknowledging the batch or carrying on.

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use redb::backends::InMemoryBackend;
    use redb::StorageBackend;
    use synod_paxos::{Ballot, DurableState, Membership, Persist};

    use super::*;
    use crate::storage::Identity;

    /// An in-memory disk whose syncs fail on command.
    #[derive(Debug)]
    struct FlakyDisk {
        bytes: InMemoryBackend,
        fail_syncs: Arc<AtomicBool>,
    }

    impl StorageBackend for FlakyDisk {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.bytes.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.bytes.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.bytes.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            if self.fail_syncs.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("injected fsync failure"));
            }
            self.bytes.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.bytes.write(offset, data)
        }
    }

    fn promise(id: u64, round: u64) -> StorageJob {
        StorageJob::Persist(Persist {
            id,
            promised: Some(Ballot::new(round, 1)),
            ..Persist::default()
        })
    }

    #[test]
    fn a_failed_sync_stops_the_writer() {
        let fail_syncs = Arc::new(AtomicBool::new(false));
        let disk = FlakyDisk {
            bytes: InMemoryBackend::new(),
            fail_syncs: fail_syncs.clone(),
        };
        let membership = Membership::new(&[1, 2, 3]).expect("membership");
        let identity = Identity {
            cluster_id: "test".into(),
            node_id: 1,
        };
        let storage = Storage::create_with_backend(
            disk,
            "flaky.redb",
            identity,
            &DurableState::bootstrap(membership),
        )
        .expect("create");
        let (requests, receiver) = std_mpsc::channel();
        let (events, mut completions) = mpsc::unbounded_channel();
        let settings = WriterSettings {
            state_flush_interval: Duration::from_secs(1),
            state_flush_bytes_max: 1 << 20,
        };
        let writer = spawn(
            storage,
            settings,
            Arc::new(Metrics::new()),
            receiver,
            events,
        )
        .expect("spawn");

        requests
            .send(WriterRequest::Job(promise(1, 1)))
            .expect("send");
        match completions.blocking_recv() {
            Some(WriterEvent::Done(Input::Persisted(1))) => {}
            other => panic!("expected batch 1 durable, got {other:?}"),
        }

        fail_syncs.store(true, Ordering::SeqCst);
        requests
            .send(WriterRequest::Job(promise(2, 2)))
            .expect("send");
        match completions.blocking_recv() {
            Some(WriterEvent::Failed(reason)) => assert!(reason.contains("flaky.redb"), "{reason}"),
            other => panic!("expected a fatal failure, got {other:?}"),
        }
        // The writer stopped: nothing more is acknowledged.
        let _ = requests.send(WriterRequest::Job(promise(3, 3)));
        writer.join().expect("the writer thread ends");
        assert!(completions.blocking_recv().is_none());
    }
}
