//! The replica's writers: two OS threads, one for each database (see
//! `crate::storage`), that make the driver's jobs durable in order.
//!
//! The log writer ([`spawn_log_writer`]) takes the core's `Persist`
//! batches. Group commit: while one commit is in flight, batches keep
//! queueing; the next round takes everything queued and writes it as one
//! journal record (one fsync), in order. Whenever nothing is queued, and
//! after a round once [`WRITE_BACK_BATCHES_MAX`] batches wait, it writes
//! the journaled batches back to the log database
//! ([`LogStore::write_back`]), off the path of any waiting write. A round whose batches compact the
//! log first waits until the state database has saved the state the
//! compaction relies on ([`LogStore::wait_for_saved_state`]): the driver
//! tells the core of a snapshot installed before the writer has made it
//! live, so the batch that compacts below it can reach this thread first.
//!
//! The state writer ([`spawn_state_writer`]) takes the state machine's
//! changes ([`StorageJob::SaveState`]), snapshots being installed
//! ([`WriterRequest::Stage`], [`StorageJob::ActivateState`]). Changes are
//! not written at once: they are kept, folded into one delta (a key changed
//! many times is written once, [`StateDelta::merged`]) and written after
//! [`WriterSettings::state_flush_interval`] has passed since the first of
//! them, or as soon as they hold [`WriterSettings::state_flush_bytes_max`].
//! Nothing is lost meanwhile: the log holds every entry they came from, and
//! is compacted only below a saved state (the driver compacts when it hears
//! [`Input::StateSaved`]). So a restart loads the saved state and replays
//! at most one interval of the log, and a B-tree page that many changes
//! touch is written once per interval instead of once per commit. A flush
//! of a large state takes hundreds of milliseconds; on a thread and a
//! database of its own it never holds up the log's commits.
//!
//! Fail-stop: the first error is reported to the driver as fatal and the
//! thread stops; the replica exits and recovers from disk.

use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use synod_paxos::Persist;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::driver::{Input, StorageJob};
use crate::metrics::Metrics;
use crate::storage::{LogStore, StateDelta, StateStore, StateTable, StateWrite};

/// A commit that takes this long is logged: every write waits for it.
const SLOW_COMMIT: Duration = Duration::from_millis(250);

/// A state flush that takes this long is logged.
const SLOW_FLUSH: Duration = Duration::from_secs(1);

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

/// A request to the state writer.
pub enum WriterRequest {
    /// A job from the driver (never [`StorageJob::Persist`], which goes to
    /// the log writer).
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

/// What a writer tells the replica.
#[derive(Debug)]
pub enum WriterEvent {
    /// A driver input: `Persisted` or `StateSaved`.
    Done(Input),
    /// A write failed; the replica must stop.
    Failed(String),
}

/// Starts the log writer thread.
pub fn spawn_log_writer(
    mut log: LogStore,
    metrics: Arc<Metrics>,
    requests: std_mpsc::Receiver<Persist>,
    completions: mpsc::UnboundedSender<WriterEvent>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("synod-log".into())
        .spawn(move || {
            if let Err(error) = run_log_writer(&mut log, &metrics, &requests, &completions) {
                let _ = completions.send(WriterEvent::Failed(error));
                return;
            }
            if let Err(error) = log.close() {
                tracing::error!(%error, "closing the log database failed");
            }
        })
}

/// Batches journaled but not yet in the log database past which the
/// writer writes them back even though more commits wait.
const WRITE_BACK_BATCHES_MAX: usize = 512;

fn run_log_writer(
    log: &mut LogStore,
    metrics: &Metrics,
    requests: &std_mpsc::Receiver<Persist>,
    completions: &mpsc::UnboundedSender<WriterEvent>,
) -> Result<(), String> {
    loop {
        // Write the journaled batches back to the database when there is
        // nothing to commit, off the path of any waiting write.
        let first = match requests.try_recv() {
            Ok(batch) => batch,
            Err(std_mpsc::TryRecvError::Empty) => {
                write_back(log, metrics)?;
                match requests.recv() {
                    Ok(batch) => batch,
                    Err(_) => break,
                }
            }
            Err(std_mpsc::TryRecvError::Disconnected) => break,
        };
        let mut round = vec![first];
        while round.len() < JOBS_PER_ROUND_MAX {
            match requests.try_recv() {
                Ok(batch) => round.push(batch),
                Err(_) => break,
            }
        }
        let batches: Vec<&Persist> = round.iter().collect();
        if !log.wait_for_saved_state(&batches) {
            // The state writer stopped (the replica is stopping, or it
            // failed and said so): these batches were never acknowledged.
            tracing::info!(
                batches = batches.len(),
                "the state database closed; batches compacting below it are not written"
            );
            return Ok(());
        }
        let started = Instant::now();
        log.commit(&batches).map_err(|error| error.to_string())?;
        let elapsed = started.elapsed();
        metrics
            .storage_commit_seconds
            .observe(elapsed.as_secs_f64());
        metrics.storage_commit_writes.observe(batches.len() as f64);
        if elapsed >= SLOW_COMMIT {
            tracing::warn!(
                elapsed_ms = elapsed.as_millis() as u64,
                batches = batches.len(),
                "slow commit"
            );
        }
        if let Some(last) = round.last() {
            let _ = completions.send(WriterEvent::Done(Input::Persisted(last.id)));
        }
        if log.pending_batches() >= WRITE_BACK_BATCHES_MAX {
            write_back(log, metrics)?;
        }
    }
    Ok(())
}

/// Writes the journaled batches back to the log database, timing the
/// checkpoint when there is one.
fn write_back(log: &mut LogStore, metrics: &Metrics) -> Result<(), String> {
    let started = Instant::now();
    let checkpointed = log.write_back().map_err(|error| error.to_string())?;
    if checkpointed {
        metrics
            .storage_checkpoint_seconds
            .observe(started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Starts the state writer thread.
pub fn spawn_state_writer(
    mut state: StateStore,
    settings: WriterSettings,
    metrics: Arc<Metrics>,
    requests: std_mpsc::Receiver<WriterRequest>,
    completions: mpsc::UnboundedSender<WriterEvent>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("synod-state".into())
        .spawn(move || {
            let mut writer = StateWriter {
                state: &mut state,
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
            if let Err(error) = state.close() {
                tracing::error!(%error, "closing the state database failed");
            }
        })
}

struct StateWriter<'a> {
    state: &'a mut StateStore,
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

impl StateWriter<'_> {
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
        let mut writes: Vec<StateWrite> = Vec::with_capacity(round.len() + 1);
        let mut permits = Vec::new();
        let mut saved_through = None;
        for request in round {
            match request {
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
                    writes.push(StateWrite::StageActivate(header));
                }
                WriterRequest::Job(StorageJob::Persist(batch)) => {
                    return Err(format!(
                        "batch {} reached the state writer; batches go to the log writer",
                        batch.id
                    ));
                }
                WriterRequest::Stage { write, permit } => {
                    permits.extend(permit);
                    writes.push(write);
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
            writes.push(StateWrite::Delta(delta));
        }
        let started = Instant::now();
        let refs: Vec<&StateWrite> = writes.iter().collect();
        self.state
            .commit(&refs)
            .map_err(|error| error.to_string())?;
        let elapsed = started.elapsed();
        if !writes.is_empty() {
            self.metrics
                .state_commit_seconds
                .observe(elapsed.as_secs_f64());
        }
        if elapsed >= SLOW_FLUSH {
            tracing::warn!(
                elapsed_ms = elapsed.as_millis() as u64,
                writes = writes.len(),
                state_through = saved_through,
                "slow state flush"
            );
        }
        drop(permits);
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
    use synod_paxos::{Ballot, DurableState, Membership};

    use super::*;
    use crate::storage::{DatabasePaths, Identity, Storage};

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

    fn promise(id: u64, round: u64) -> Persist {
        Persist {
            id,
            promised: Some(Ballot::new(round, 1)),
            ..Persist::default()
        }
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
        let paths = DatabasePaths {
            log: "log.redb".into(),
            state: "state.redb".into(),
            journal: "flaky.journal".into(),
        };
        let storage = Storage::create_with_backends(
            InMemoryBackend::new(),
            InMemoryBackend::new(),
            disk,
            &paths,
            identity,
            &DurableState::bootstrap(membership),
        )
        .expect("create");
        let (requests, receiver) = std_mpsc::channel();
        let (events, mut completions) = mpsc::unbounded_channel();
        let (log, _state) = storage.into_parts();
        let writer =
            spawn_log_writer(log, Arc::new(Metrics::new()), receiver, events).expect("spawn");

        requests.send(promise(1, 1)).expect("send");
        match completions.blocking_recv() {
            Some(WriterEvent::Done(Input::Persisted(1))) => {}
            other => panic!("expected batch 1 durable, got {other:?}"),
        }

        fail_syncs.store(true, Ordering::SeqCst);
        requests.send(promise(2, 2)).expect("send");
        match completions.blocking_recv() {
            Some(WriterEvent::Failed(reason)) => {
                assert!(reason.contains("flaky.journal"), "{reason}")
            }
            other => panic!("expected a fatal failure, got {other:?}"),
        }
        // The writer stopped: nothing more is acknowledged.
        let _ = requests.send(promise(3, 3));
        writer.join().expect("the writer thread ends");
        assert!(completions.blocking_recv().is_none());
    }
}
