//! The replica's writer: one OS thread that owns the [`Storage`] and makes
//! the driver's jobs durable in order.
//!
//! Group commit: while one commit is in flight, jobs keep queueing; the next
//! round takes everything queued and writes every consecutive persist batch
//! in one transaction (one fsync). Snapshot saves go in order with them, so a
//! compaction never overtakes the snapshot that covers it.
//!
//! Fail-stop: the first error is reported to the driver as fatal and the
//! thread stops; the replica exits and recovers from disk.

use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;

use synod_paxos::Persist;
use tokio::sync::mpsc;

use super::driver::{Input, StorageJob};
use crate::storage::Storage;

/// Most jobs taken in one group-commit round.
const JOBS_PER_ROUND_MAX: usize = 4096;

/// A request to the writer thread.
pub enum WriterRequest {
    /// A job from the driver.
    Job(StorageJob),
}

/// Starts the writer thread.
pub fn spawn(
    mut storage: Storage,
    requests: std_mpsc::Receiver<WriterRequest>,
    completions: mpsc::UnboundedSender<WriterEvent>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("synod-storage".into())
        .spawn(move || {
            if let Err(error) = run(&mut storage, &requests, &completions) {
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
    /// A driver input: `Persisted` or `SnapshotSaved`.
    Done(Input),
    /// A write failed; the replica must stop.
    Failed(String),
}

fn run(
    storage: &mut Storage,
    requests: &std_mpsc::Receiver<WriterRequest>,
    completions: &mpsc::UnboundedSender<WriterEvent>,
) -> Result<(), String> {
    while let Ok(first) = requests.recv() {
        let mut round = vec![first];
        while round.len() < JOBS_PER_ROUND_MAX {
            match requests.try_recv() {
                Ok(request) => round.push(request),
                Err(_) => break,
            }
        }
        let mut batches: Vec<Persist> = Vec::new();
        for request in round {
            match request {
                WriterRequest::Job(StorageJob::Persist(batch)) => batches.push(batch),
                WriterRequest::Job(StorageJob::SaveSnapshot {
                    through,
                    membership,
                    bytes,
                })
                | WriterRequest::Job(StorageJob::InstallSnapshot {
                    through,
                    membership,
                    bytes,
                }) => {
                    flush(storage, &mut batches, completions)?;
                    storage
                        .save_snapshot(through, &membership, &bytes)
                        .map_err(|error| error.to_string())?;
                    let _ = completions.send(WriterEvent::Done(Input::SnapshotSaved(through)));
                }
            }
        }
        flush(storage, &mut batches, completions)?;
    }
    Ok(())
}

fn flush(
    storage: &mut Storage,
    batches: &mut Vec<Persist>,
    completions: &mpsc::UnboundedSender<WriterEvent>,
) -> Result<(), String> {
    let Some(last) = batches.last().map(|batch| batch.id) else {
        return Ok(());
    };
    storage
        .persist(batches)
        .map_err(|error| error.to_string())?;
    batches.clear();
    let _ = completions.send(WriterEvent::Done(Input::Persisted(last)));
    Ok(())
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
        let writer = spawn(storage, receiver, events).expect("spawn");

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
