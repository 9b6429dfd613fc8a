//! Snapshot transfer between replicas: the driver's [`SnapshotSource`], and
//! the frames of the bulk-transfer stream.
//!
//! The fetching replica opens a bidirectional stream on its connection to
//! the peer and sends one [`PeerRequest::Snapshot`] frame. The peer answers
//! one [`SnapshotHeader`] frame; after `Ready`, [`SnapshotFrame::Chunk`]
//! frames follow as the source produces them, then one
//! [`SnapshotFrame::End`] counting them, and the stream finishes. Neither
//! side holds more than a few chunks: the source produces them into a
//! bounded channel (streaming from a read transaction), and the fetcher
//! hands each one on to a bounded channel of its own. The fetcher refuses a
//! transfer once it passes its byte bound, without reading further.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use synod_proto::wire::encode_frame;
pub(crate) use synod_proto::wire::{SnapshotFrame, SnapshotHeader};

use super::TransportError;
use tokio::sync::mpsc;

/// One piece of a snapshot, as a [`SnapshotSource`] produces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotPiece {
    /// First: the snapshot reflects every slot up to this one.
    Start {
        /// The snapshot's slot.
        through_slot: u64,
    },
    /// The next bytes, opaque to the transport.
    Chunk(Bytes),
    /// Last: every chunk was produced.
    End,
    /// The source could not produce (the rest of) the snapshot.
    Failed(String),
}

/// Where the transport finds the snapshot to serve to a lagging peer.
/// Called on a transport task; it must return promptly and produce the
/// pieces elsewhere (for instance on a thread streaming a read
/// transaction), into a bounded channel.
pub trait SnapshotSource: Send + Sync + 'static {
    /// The latest saved snapshot, as pieces: `Start`, chunks, then `End`
    /// (or `Failed` at any point, as the first piece when there is none).
    fn open_snapshot(&self) -> mpsc::Receiver<SnapshotPiece>;
}

impl<F> SnapshotSource for F
where
    F: Fn() -> mpsc::Receiver<SnapshotPiece> + Send + Sync + 'static,
{
    fn open_snapshot(&self) -> mpsc::Receiver<SnapshotPiece> {
        self()
    }
}

/// A request on a bulk-transfer stream between peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum PeerRequest {
    /// Send your latest snapshot.
    Snapshot,
}

/// Opens the snapshot of the source registered in `slot`; with none
/// registered yet, a stream that says so.
pub(crate) fn open_registered(
    slot: &std::sync::RwLock<Option<std::sync::Arc<dyn SnapshotSource>>>,
) -> mpsc::Receiver<SnapshotPiece> {
    let source = slot
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    match source {
        Some(source) => source.open_snapshot(),
        None => {
            let (sender, receiver) = mpsc::channel(1);
            let _ = sender.try_send(SnapshotPiece::Failed(
                "no snapshot is saved yet".to_string(),
            ));
            receiver
        }
    }
}

/// What [`send_snapshot`] sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SnapshotSent {
    /// The snapshot reflects every slot through this one.
    pub through_slot: u64,
    /// Chunks sent.
    pub chunks: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Writes a snapshot to `send` as the source produces it: the header,
/// the chunks, the end frame counting them; then finishes the stream and
/// waits until the other side has it. `None` when the source had no
/// snapshot to give (the header says why). Bound it with a timeout: a
/// slow reader holds it (and the source's read transaction) that long.
pub(crate) async fn send_snapshot(
    send: &mut quinn::SendStream,
    pieces: &mut mpsc::Receiver<SnapshotPiece>,
) -> Result<Option<SnapshotSent>, TransportError> {
    let through_slot = match pieces.recv().await {
        Some(SnapshotPiece::Start { through_slot }) => Some(through_slot),
        Some(SnapshotPiece::Failed(reason)) => {
            send.write_all(&encode_frame(&SnapshotHeader::Unavailable { reason }))
                .await?;
            None
        }
        Some(_) | None => {
            let reason = "the snapshot source produced nothing".to_string();
            send.write_all(&encode_frame(&SnapshotHeader::Unavailable { reason }))
                .await?;
            None
        }
    };
    let mut sent = None;
    if let Some(through_slot) = through_slot {
        send.write_all(&encode_frame(&SnapshotHeader::Ready { through_slot }))
            .await?;
        let (mut chunks, mut bytes) = (0u64, 0u64);
        loop {
            let frame = match pieces.recv().await {
                Some(SnapshotPiece::Chunk(chunk)) => {
                    chunks += 1;
                    bytes += chunk.len() as u64;
                    SnapshotFrame::Chunk(chunk)
                }
                Some(SnapshotPiece::End) => SnapshotFrame::End { chunks, bytes },
                Some(SnapshotPiece::Failed(reason)) => SnapshotFrame::Failed(reason),
                Some(SnapshotPiece::Start { .. }) | None => {
                    SnapshotFrame::Failed("the snapshot source stopped".to_string())
                }
            };
            let complete = matches!(frame, SnapshotFrame::End { .. });
            let last = !matches!(frame, SnapshotFrame::Chunk(_));
            send.write_all(&encode_frame(&frame)).await?;
            if last {
                if complete {
                    sent = Some(SnapshotSent {
                        through_slot,
                        chunks,
                        bytes,
                    });
                }
                break;
            }
        }
    }
    let _ = send.finish();
    // Let the bytes arrive before the caller (and maybe the connection)
    // goes away.
    let _ = send.stopped().await;
    Ok(sent)
}

/// Bound on the request and header frames of a bulk-transfer stream.
pub(crate) const CONTROL_FRAME_BYTES_MAX: u64 = 4096;
