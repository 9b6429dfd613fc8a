//! Snapshot transfer between replicas: the driver's [`SnapshotSource`], and
//! the frames of the bulk-transfer stream.
//!
//! The fetching replica opens a bidirectional stream on its connection to
//! the peer and sends one [`PeerRequest::Snapshot`] frame. The peer answers
//! one [`SnapshotHeader`] frame; after `Ready`, exactly `total_bytes` raw
//! bytes follow and the stream finishes. The fetcher refuses a length above
//! its bound before reading any of the bytes.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A saved snapshot of the state machine, as the driver hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Every slot up to and including this one is reflected.
    pub through_slot: u64,
    /// The encoded state machine (and membership); opaque to the transport.
    pub data: Bytes,
}

/// Where the transport finds the snapshot to serve to a lagging peer.
/// Called on a transport task; it must return promptly (hand out a cheap
/// clone of the latest saved snapshot).
pub trait SnapshotSource: Send + Sync + 'static {
    /// The latest saved snapshot, or `None` if there is none yet.
    fn current_snapshot(&self) -> Option<Snapshot>;
}

impl<F> SnapshotSource for F
where
    F: Fn() -> Option<Snapshot> + Send + Sync + 'static,
{
    fn current_snapshot(&self) -> Option<Snapshot> {
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
    /// `total_bytes` raw bytes follow.
    Ready {
        /// The snapshot's slot.
        through_slot: u64,
        /// Its length.
        total_bytes: u64,
    },
    /// No snapshot to give.
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// Bound on the request and header frames of a bulk-transfer stream.
pub(crate) const CONTROL_FRAME_BYTES_MAX: u64 = 4096;
