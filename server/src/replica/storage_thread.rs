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
