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

/// The answer to [`PeerRequest::Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum SnapshotHeader {
    /// [`SnapshotFrame`]s follow.
    Ready {
        /// The snapshot's slot.
        through_slot: u64,
    },
    /// No snapshot to give.
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// A frame of a snapshot after its header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum SnapshotFrame {
    /// The next bytes.
    Chunk(Bytes),
    /// Every chunk was sent: how many, and their bytes in all.
    End {
        /// Chunks sent.
        chunks: u64,
        /// Their bytes.
        bytes: u64,
    },
    /// The source failed part-way; the snapshot is incomplete.
    Failed(String),
}

/// Bound on the request and header frames of a bulk-transfer stream.
pub(crate) const CONTROL_FRAME_BYTES_MAX: u64 = 4096;
