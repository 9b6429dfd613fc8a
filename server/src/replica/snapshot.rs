//! Snapshots between replicas, streamed: served from a read transaction on
//! the saved state, installed by staging the records on disk while the
//! state is rebuilt in memory.
//!
//! Serving ([`serve`]): a thread opens one read transaction on the saved
//! state tables and packs their records into chunks of about
//! [`CHUNK_BYTES`], which it hands to the transport through a channel of
//! [`CHUNKS_IN_FLIGHT`]: the replica holds a few chunks, never a copy of
//! the state, and the read transaction keeps the state it started from
//! however long the transfer takes.
//!
//! Installing ([`install`]): the chunks that arrive are decoded once; each
//! record goes both into a [`StateLoader`] (the new state in memory) and,
//! as a [`StateWrite::Stage`], to the writer, which stages it on disk in the
//! state tables that are not live. At most [`CHUNKS_IN_FLIGHT`] staged
//! chunks wait for the disk, which paces the transfer. The driver makes the
//! staged state live ([`StorageJob::ActivateState`](super::driver::StorageJob))
//! only once the whole state arrived and checked out.
//!
//! The stream is a sequence of postcard-encoded [`StreamRecord`]s: the
//! header first, every record in table then key order, then an end record
//! counting them. Records never straddle chunks.

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use synod_paxos::Slot;
use tokio::sync::{mpsc, Semaphore};

use super::storage_thread::{StagedRecords, WriterRequest};
use crate::state::records::{session_record_without_secret, StateLoader};
use crate::state::{StateConfig, StateMachine};
use crate::storage::{SavedStateHeader, StateReader, StateRecordRef, StateTable, StateWrite};
use crate::transport::SnapshotPiece;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

/// The size chunks are filled to (a chunk holds at least one record,
/// whatever its size).
pub const CHUNK_BYTES: usize = 1 << 20;

/// Chunks held between producer and consumer, on each side: a few MiB,
/// enough that the staging writes share commits instead of waiting for
/// an fsync each.
pub const CHUNKS_IN_FLIGHT: usize = 8;

/// How long after a snapshot stream ends the log after it is still kept
/// (see [`StreamHolds`]): time for the peer to install it and catch up.
pub const HOLD_GRACE: Duration = Duration::from_secs(30);

/// The slots that snapshots streamed to peers cover. A peer that installs
/// a snapshot through slot `S` catches up from the log after `S`, so the
/// replica keeps that log (it compacts no further than `S + 1`) while the
/// stream runs and for [`HOLD_GRACE`] after: otherwise a transfer that
/// takes longer than the retained log lasts would be out of date on
/// arrival and the peer would fetch again, and again. A hold lasts at most
/// the transfer's own bound plus the grace.
#[derive(Debug, Default)]
pub struct StreamHolds {
    holds: Mutex<Vec<Hold>>,
}

#[derive(Debug, Clone, Copy)]
struct Hold {
    id: u64,
    through: Slot,
    /// When the hold ends; `None` while the stream runs.
    until: Option<Instant>,
}

impl StreamHolds {
    /// The lowest slot held, if any.
    pub fn floor(&self) -> Option<Slot> {
        let now = Instant::now();
        let mut holds = lock(&self.holds);
        holds.retain(|hold| hold.until.is_none_or(|until| until > now));
        holds.iter().map(|hold| hold.through).min()
    }

    fn hold(self: &Arc<Self>, through: Slot) -> HoldGuard {
        let mut holds = lock(&self.holds);
        let id = holds.iter().map(|hold| hold.id + 1).max().unwrap_or(0);
        holds.push(Hold {
            id,
            through,
            until: None,
        });
        HoldGuard {
            holds: self.clone(),
            id,
        }
    }
}

/// Ends a stream's hold (after the grace) when the stream ends, however.
struct HoldGuard {
    holds: Arc<StreamHolds>,
    id: u64,
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        let until = Instant::now() + HOLD_GRACE;
        for hold in lock(&self.holds.holds).iter_mut() {
            if hold.id == self.id {
                hold.until = Some(until);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Bytes borrowed from the chunk they were read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RawBytes<'a>(&'a [u8]);

impl Serialize for RawBytes<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawBytes<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <&'a [u8]>::deserialize(deserializer).map(RawBytes)
    }
}

/// One item of a snapshot stream.
#[derive(Debug, Serialize, Deserialize)]
enum StreamRecord<'a> {
    /// First: what the state covers.
    Header(SavedStateHeader),
    /// A record of a state table.
    Record {
        table: StateTable,
        #[serde(borrow)]
        key: RawBytes<'a>,
        #[serde(borrow)]
        value: RawBytes<'a>,
    },
    /// Last: how many records came.
    End { records: u64 },
}

/// Streams the saved state to a peer: `Start`, chunks, `End` (or
/// `Failed`), produced on a thread of their own from one read transaction,
/// holding the log after it in `holds` meanwhile.
/// Where a snapshot stream's time and failures are counted.
#[derive(Debug, Clone)]
pub struct ServeTiming {
    /// The time of each stream that finished.
    pub seconds: Histogram,
    /// Streams that did not finish.
    pub failures: Counter,
}

/// Whether a stream carries the sessions' secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    /// Kept: a peer that installs the state resumes the sessions.
    Keep,
    /// Zeroed ([`session_record_without_secret`]): a backup, which a
    /// restore opens with every session closed.
    Zero,
}

/// Holds the log in `holds`, if given (a peer catches up from it; a backup
/// does not). Its time and outcome go to `timing`.
pub fn serve(
    reader: StateReader,
    holds: Option<Arc<StreamHolds>>,
    secrets: Secrets,
    timing: ServeTiming,
) -> mpsc::Receiver<SnapshotPiece> {
    let (pieces, receiver) = mpsc::channel(CHUNKS_IN_FLIGHT);
    let spawned = std::thread::Builder::new()
        .name("synod-snapshot".into())
        .spawn({
            let pieces = pieces.clone();
            move || {
                let started = Instant::now();
                if stream_state(&reader, holds.as_ref(), secrets, &pieces) {
                    timing.seconds.observe(started.elapsed().as_secs_f64());
                } else {
                    timing.failures.inc();
                }
            }
        });
    if let Err(error) = spawned {
        let _ = pieces.try_send(SnapshotPiece::Failed(format!(
            "cannot start streaming the snapshot: {error}"
        )));
    }
    receiver
}

/// Whether the whole snapshot was handed over.
fn stream_state(
    reader: &StateReader,
    holds: Option<&Arc<StreamHolds>>,
    secrets: Secrets,
    pieces: &mpsc::Sender<SnapshotPiece>,
) -> bool {
    const GONE: &str = "the peer stopped taking the snapshot";
    // Both callbacks below add to the chunk being filled.
    let chunk = std::cell::RefCell::new(Vec::with_capacity(CHUNK_BYTES * 2));
    let send_chunk = || -> Result<(), String> {
        let full = chunk.replace(Vec::with_capacity(CHUNK_BYTES * 2));
        pieces
            .blocking_send(SnapshotPiece::Chunk(Bytes::from(full)))
            .map_err(|_| GONE.to_string())
    };
    let mut records = 0u64;
    let mut hold = None;
    let result = reader.read(
        &mut |header| {
            hold = holds.map(|holds| holds.hold(header.through));
            pieces
                .blocking_send(SnapshotPiece::Start {
                    through_slot: header.through,
                })
                .map_err(|_| GONE.to_string())?;
            append(
                &mut chunk.borrow_mut(),
                &StreamRecord::Header(header.clone()),
            );
            Ok(())
        },
        &mut |record: StateRecordRef<'_>| {
            records += 1;
            let redacted = match (secrets, record.table) {
                (Secrets::Zero, StateTable::Sessions) => {
                    Some(session_record_without_secret(record.value)?)
                }
                _ => None,
            };
            let full = {
                let mut chunk = chunk.borrow_mut();
                append(
                    &mut chunk,
                    &StreamRecord::Record {
                        table: record.table,
                        key: RawBytes(record.key),
                        value: RawBytes(redacted.as_deref().unwrap_or(record.value)),
                    },
                );
                chunk.len() >= CHUNK_BYTES
            };
            if full {
                send_chunk()?;
            }
            Ok(())
        },
    );
    let last = match result {
        Ok(Some(_)) => {
            append(&mut chunk.borrow_mut(), &StreamRecord::End { records });
            send_chunk().map(|()| SnapshotPiece::End)
        }
        Ok(None) => Ok(SnapshotPiece::Failed(
            "no state is saved yet (a new cluster saves its first within \
             `limits.state_flush_interval_ms` of its first write); try again in a moment"
                .to_string(),
        )),
        Err(error) => Ok(SnapshotPiece::Failed(error.to_string())),
    };
    let served = match last {
        Ok(piece) => {
            let ended = matches!(piece, SnapshotPiece::End);
            pieces.blocking_send(piece).is_ok() && ended
        }
        Err(_) => false,
    };
    drop(hold);
    served
}

/// Encodes a whole state as a snapshot stream (the header, every record,
/// the end), handing chunks of about [`CHUNK_BYTES`] to `sink`: the stream
/// a replica would serve as a backup had it saved this state through
/// `through` (sessions' secrets zeroed, [`Secrets::Zero`]).
///
/// # Errors
/// The first error of `sink`.
pub fn encode_state<E>(
    state: &mut StateMachine,
    through: Slot,
    membership: &synod_paxos::Membership,
    mut sink: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<u64, E> {
    state.mark_all_dirty();
    let delta = state.take_delta(through, membership);
    let mut chunk = Vec::with_capacity(CHUNK_BYTES * 2);
    if let Some(header) = delta.header {
        append(&mut chunk, &StreamRecord::Header(header));
    }
    let mut records = 0u64;
    for ((table, key), value) in &delta.changes {
        // Every record of a whole state is present; nothing to remove.
        let Some(value) = value else { continue };
        records += 1;
        let redacted = match table {
            StateTable::Sessions => Some(
                session_record_without_secret(value)
                    .expect("a session record just encoded decodes"),
            ),
            _ => None,
        };
        append(
            &mut chunk,
            &StreamRecord::Record {
                table: *table,
                key: RawBytes(key),
                value: RawBytes(redacted.as_deref().unwrap_or(value)),
            },
        );
        if chunk.len() >= CHUNK_BYTES {
            sink(&chunk)?;
            chunk.clear();
        }
    }
    append(&mut chunk, &StreamRecord::End { records });
    sink(&chunk)?;
    Ok(records)
}

fn append(chunk: &mut Vec<u8>, record: &StreamRecord<'_>) {
    let buffer = std::mem::take(chunk);
    *chunk = postcard::to_extend(record, buffer).expect("encoding into memory cannot fail");
}

/// A state fetched from a peer: staged on disk (not yet live) and rebuilt
/// in memory.
#[derive(Debug)]
pub struct FetchedState {
    /// What it covers.
    pub header: SavedStateHeader,
    /// The state, checked.
    pub state: Box<StateMachine>,
}

/// Takes a snapshot's chunks as they arrive (until the channel closes),
/// stages each record through the writer and rebuilds the state. Blocks:
/// run it on a blocking thread.
///
/// # Errors
/// Why the snapshot is unusable: a chunk that does not decode, records out
/// of order or missing, a state that breaks an invariant, or the writer
/// gone.
pub fn install(
    mut chunks: mpsc::Receiver<Bytes>,
    writer: std_mpsc::Sender<WriterRequest>,
    config: StateConfig,
    runtime: tokio::runtime::Handle,
) -> Result<FetchedState, String> {
    let in_flight = Arc::new(Semaphore::new(CHUNKS_IN_FLIGHT));
    let stage = |write: StateWrite| -> Result<(), String> {
        let permit = runtime
            .block_on(in_flight.clone().acquire_owned())
            .map_err(|_| "the staging budget closed".to_string())?;
        writer
            .send(WriterRequest::Stage {
                write,
                permit: Some(permit),
            })
            .map_err(|_| "the writer stopped".to_string())
    };
    stage(StateWrite::StageBegin)?;
    let mut decoder = StreamDecoder::new(config);
    while let Some(chunk) = chunks.blocking_recv() {
        let mut staged: StagedRecords = Vec::new();
        decoder.chunk(&chunk, |record| {
            staged.push((record.table, Box::from(record.key), record.value.to_vec()));
        })?;
        if !staged.is_empty() {
            stage(StateWrite::Stage(staged))?;
        }
    }
    decoder.finish()
}

/// Counts what a snapshot stream holds, chunk by chunk, without building
/// the state: its header and the records of each table.
#[derive(Debug, Default)]
pub(crate) struct StreamScanner {
    /// The header, once seen.
    pub header: Option<SavedStateHeader>,
    /// Records per table: nodes, sessions, locks.
    pub counts: [u64; 3],
    /// Whether the end record was seen (and its count matched).
    pub ended: bool,
}

impl StreamScanner {
    /// Takes the next chunk.
    ///
    /// # Errors
    /// A record that does not decode, a record before the header or after
    /// the end, or an end record whose count does not match.
    pub fn chunk(&mut self, chunk: &[u8]) -> Result<(), String> {
        let ended = &mut self.ended;
        for_each_record(chunk, ended, |record| {
            match record {
                StreamRecord::Header(header) => {
                    if self.header.is_some() {
                        return Err("a second snapshot header".into());
                    }
                    self.header = Some(header);
                }
                StreamRecord::Record { table, .. } => {
                    if self.header.is_none() {
                        return Err("a snapshot record before its header".into());
                    }
                    let index = match table {
                        StateTable::Nodes => 0,
                        StateTable::Sessions => 1,
                        StateTable::Locks => 2,
                    };
                    self.counts[index] += 1;
                }
                StreamRecord::End { records } => {
                    let counted: u64 = self.counts.iter().sum();
                    if records != counted {
                        return Err(format!(
                            "the snapshot ends after {counted} records but counts {records}"
                        ));
                    }
                }
            }
            Ok(())
        })
    }
}

/// Decodes the records of one chunk in order and hands each to `take`;
/// `ended` is set after an end record, and any record after it refused.
fn for_each_record(
    chunk: &[u8],
    ended: &mut bool,
    mut take: impl FnMut(StreamRecord<'_>) -> Result<(), String>,
) -> Result<(), String> {
    let mut rest: &[u8] = chunk;
    while !rest.is_empty() {
        if *ended {
            return Err("records after the end of the snapshot".into());
        }
        let (record, remaining) = postcard::take_from_bytes::<StreamRecord<'_>>(rest)
            .map_err(|error| format!("a snapshot record does not decode: {error}"))?;
        rest = remaining;
        let end = matches!(record, StreamRecord::End { .. });
        take(record)?;
        *ended = end;
    }
    Ok(())
}

/// Decodes a snapshot stream chunk by chunk into the state it holds,
/// checking its order, its count and every invariant of the state.
pub(crate) struct StreamDecoder {
    loader: StateLoader,
    header: Option<SavedStateHeader>,
    ended: bool,
}

impl StreamDecoder {
    /// A decoder for a state with these limits.
    pub fn new(config: StateConfig) -> StreamDecoder {
        StreamDecoder {
            loader: StateLoader::new(config),
            header: None,
            ended: false,
        }
    }

    /// Takes the next chunk; `on_record` sees each record of it once the
    /// loader took it.
    ///
    /// # Errors
    /// Why the stream is unusable: a record that does not decode, one out
    /// of order or before the header, or anything after the end.
    pub fn chunk(
        &mut self,
        chunk: &[u8],
        mut on_record: impl FnMut(StateRecordRef<'_>),
    ) -> Result<(), String> {
        let Self {
            loader,
            header,
            ended,
        } = self;
        for_each_record(chunk, ended, |record| {
            match record {
                StreamRecord::Header(first) => {
                    if header.is_some() || loader.records() != 0 {
                        return Err("a snapshot header in the middle of the snapshot".into());
                    }
                    *header = Some(first);
                }
                StreamRecord::Record { table, key, value } => {
                    if header.is_none() {
                        return Err("a snapshot record before its header".into());
                    }
                    let record = StateRecordRef {
                        table,
                        key: key.0,
                        value: value.0,
                    };
                    loader.record(record)?;
                    on_record(record);
                }
                StreamRecord::End { records } => {
                    if records != loader.records() {
                        return Err(format!(
                            "the snapshot ends after {} records but counts {records}",
                            loader.records()
                        ));
                    }
                }
            }
            Ok(())
        })
    }

    /// The state, once the whole stream was taken.
    ///
    /// # Errors
    /// The stream ended early, or the state breaks an invariant.
    pub fn finish(self) -> Result<FetchedState, String> {
        let (Some(header), true) = (self.header, self.ended) else {
            return Err("the snapshot ended early".into());
        };
        let state = self.loader.finish(&header.scalars)?;
        Ok(FetchedState {
            header,
            state: Box::new(state),
        })
    }
}
