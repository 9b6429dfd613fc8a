//! Frames on the wire and their encoding.
//!
//! Every connection (client or peer) starts with a [`Hello`] from the side
//! that connected, answered by a [`HelloReply`]; a peer speaking another
//! [`crate::PROTOCOL_VERSION`] is refused with a reason it can print. After
//! that, a client's session stream carries [`ClientFrame`]s one way and
//! [`ServerFrame`]s the other, in order: responses and watch events share one
//! ordered stream, so a client sees an event before any data newer than it.
//! A client that says [`Hello::Backup`] instead gets the replica's saved
//! state on the stream, as a peer fetching a snapshot does: one
//! [`SnapshotHeader`], then [`SnapshotFrame`]s.
//!
//! A frame is a little-endian `u32` length followed by that many bytes of
//! postcard. Lengths above the receiver's bound are refused before anything
//! is allocated ([`FrameError::TooLarge`]), and bytes that do not decode are
//! refused with [`FrameError::Malformed`]; either closes only that
//! connection.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{Event, Request, Response, Revision, Sequencer, SessionId, SessionSecret, WatchKind};

/// Bytes of the length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;

/// The default bound on one frame: room for a 1 MiB value plus its request.
pub const DEFAULT_MAX_FRAME_BYTES: u64 = 2 << 20;

/// The ALPN protocol name Synod's QUIC connections negotiate.
pub const ALPN: &[u8] = b"synod/1";

/// Who is connecting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hello {
    /// A client library or shell.
    Client {
        /// The client's protocol version.
        protocol_version: u64,
    },
    /// Another replica of the cluster.
    Peer {
        /// The sender's protocol version.
        protocol_version: u64,
        /// The cluster the sender belongs to.
        cluster_id: String,
        /// The sender's node id.
        node_id: u64,
        /// The identity of the cluster the sender's database belongs to,
        /// minted at the cluster's bootstrap; `None` when the sender's
        /// state holds none yet (a new cluster, a late founding member, or
        /// a member rejoining with an empty data directory).
        cluster_identity: Option<u128>,
        /// Whether the sender started with `--join` on an empty data
        /// directory and has not caught up yet.
        joining: bool,
    },
    /// A client taking a backup: after the welcome, the replica streams
    /// its saved state (a [`SnapshotHeader`], then [`SnapshotFrame`]s) and
    /// finishes the stream. No session is opened.
    Backup {
        /// The client's protocol version.
        protocol_version: u64,
    },
}

/// The first frame of a snapshot stream (to a peer catching up, or to a
/// client taking a backup).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotHeader {
    /// [`SnapshotFrame`]s follow.
    Ready {
        /// The state reflects every slot through this one.
        through_slot: u64,
    },
    /// No snapshot to give.
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// A frame of a snapshot stream after its header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotFrame {
    /// The next bytes, opaque to the transport.
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

/// The answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// Go ahead.
    Welcome {
        /// The replica's protocol version.
        protocol_version: u64,
        /// The replica's node id.
        node_id: u64,
    },
    /// Refused; the connection closes after this frame.
    Refused {
        /// Why, in words for a person.
        reason: String,
    },
    /// A peer refused because its database and the sender's do not belong
    /// to the same cluster; the connection closes after this frame. The
    /// sender decides from `conflict` whether it must stop.
    IdentityRefused {
        /// Why, in words for a person.
        reason: String,
        /// What does not match.
        conflict: IdentityConflict,
    },
}

/// Why a replica refused a peer's cluster identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdentityConflict {
    /// The two databases belong to different clusters.
    OtherCluster {
        /// The refusing replica's cluster identity.
        theirs: u128,
    },
    /// The sender presents no cluster identity and is not joining, but the
    /// refusing replica's state records that the sender once held the
    /// cluster's state: it lost its data directory and must rejoin with
    /// `--join`.
    LostData {
        /// The refusing replica's cluster identity.
        theirs: u128,
    },
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ReadConsistency {
    /// Reflects every write acknowledged before the read was sent (the
    /// leader's lease, or a read-index round).
    #[default]
    Linearizable,
    /// Reflects at least this revision: a causal token one client can hand
    /// another.
    AtLeast(Revision),
    /// Whatever the replica has applied, in order (ZooKeeper's default).
    Sequential,
}

/// Frames a client sends on its session stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// Open a new session with this timeout (clamped by the cluster).
    OpenSession {
        /// The timeout asked for.
        timeout_ms: u64,
    },
    /// Continue an existing session on this replica, re-registering watches
    /// and receiving every event after `last_revision` they missed.
    ResumeSession {
        /// The session.
        session: SessionId,
        /// The session's secret, from [`ServerFrame::SessionReady`]: only
        /// the client identity that opened the session, holding its secret,
        /// may resume it.
        secret: SessionSecret,
        /// The newest revision the client has seen.
        last_revision: Revision,
        /// The watches to re-register.
        watches: Vec<WatchRegistration>,
    },
    /// A request of the session. Writes go through the log; reads are served
    /// with the given consistency, and `watch` is registered atomically with
    /// the read.
    Request {
        /// The request, carrying `(session, sequence)`.
        request: Request,
        /// Freshness of a read; ignored for writes.
        consistency: ReadConsistency,
        /// A watch to leave on the path read.
        watch: Option<WatchKind>,
    },
    /// Register a watch without reading (persistent watches).
    AddWatch(WatchRegistration),
    /// Remove a watch.
    RemoveWatch(WatchRegistration),
    /// Keeps the session alive.
    KeepAlive,
    /// Ask for the cluster's status.
    Status,
}

/// A watch as a client registers it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WatchRegistration {
    /// The watched path.
    pub path: String,
    /// What kind of watch.
    pub kind: WatchKind,
}

/// Frames a replica sends on a session stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// The session is open (or resumed).
    SessionReady {
        /// The session.
        session: SessionId,
        /// The session's secret: the proof, with the client's certificate,
        /// that a later [`ClientFrame::ResumeSession`] comes from its owner.
        /// Keep it private.
        secret: SessionSecret,
        /// Its timeout as the cluster granted it.
        timeout_ms: u64,
        /// The revision the replica has applied.
        revision: Revision,
    },
    /// The session cannot be used: it expired or never existed.
    SessionExpired {
        /// The session.
        session: SessionId,
    },
    /// The answer to the request with this sequence.
    Response {
        /// The request's sequence.
        sequence: u64,
        /// The answer, with the revision it reflects.
        response: Response,
    },
    /// A watch fired.
    Event(Event),
    /// A lock (or leadership of an election) the session was queued for is
    /// now granted.
    LockGranted {
        /// The grant's fencing token.
        sequencer: Sequencer,
        /// Whether it is the leadership of an election.
        election: bool,
    },
    /// The cluster's status.
    Status(ClusterStatus),
    /// A resume was refused (the session belongs to another client
    /// identity, or the secret is wrong); nothing changed, and the session
    /// stays with its owner.
    SessionRefused {
        /// The session named.
        session: SessionId,
        /// Why, in words for a person.
        reason: String,
    },
    /// A watch could not be registered (a bad path, or a bound reached);
    /// the session goes on without it.
    WatchRefused {
        /// The watch.
        watch: WatchRegistration,
        /// Why.
        error: crate::Error,
    },
    /// This replica cannot serve the session now (not caught up, shutting
    /// down); the client should try another.
    Unavailable {
        /// Why, in words for a person.
        reason: String,
    },
}

/// One replica's view, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// The replica.
    pub node_id: u64,
    /// `leader`, `follower`, `candidate`, ...
    pub role: String,
    /// The leader it believes in.
    pub leader: Option<u64>,
    /// Its promised ballot, as `round.node`.
    pub ballot: String,
    /// Its chosen prefix.
    pub chosen_through: u64,
    /// The last slot applied to its state machine.
    pub applied_through: u64,
    /// Its state machine's revision.
    pub revision: Revision,
    /// Open sessions.
    pub sessions: u64,
    /// Watches registered on it.
    pub watches: u64,
    /// As seen by the leader: each member's chosen prefix.
    pub peers: Vec<(u64, u64)>,
    /// The cluster identity in the replica's state (32 hex digits), or
    /// `None` before the first leader minted it; every replica of one
    /// cluster shows the same.
    pub cluster_identity: Option<String>,
    /// The members that confirmed they hold the cluster's state.
    pub confirmed_members: Vec<u64>,
    /// Why the replica is not part of a working quorum, in words for a
    /// person (for example "rejoining after a lost disk: waiting for
    /// members 2, 3 to report"); `None` while it is.
    pub waiting: Option<String>,
}

/// The answer to [`ClientFrame::Status`]: the replica's own status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The replica that answered.
    pub replica: ReplicaStatus,
    /// Client addresses of every member, by node id.
    pub members: Vec<(u64, String)>,
}

/// A frame that could not be read.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix exceeds the bound.
    #[error("frame of {length} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The announced length.
        length: u64,
        /// The bound.
        max: u64,
    },
    /// The bytes are not a valid frame of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes `value` as one frame (length prefix and postcard body).
pub fn encode_frame<T: Serialize>(value: &T) -> Vec<u8> {
    let mut frame = postcard::to_extend(value, vec![0u8; FRAME_HEADER_BYTES])
        .expect("every wire type encodes into memory");
    let length = (frame.len() - FRAME_HEADER_BYTES) as u32;
    frame[..FRAME_HEADER_BYTES].copy_from_slice(&length.to_le_bytes());
    frame
}

/// Reads a frame's length from its prefix, refusing lengths above `max_bytes`.
///
/// # Errors
/// [`FrameError::TooLarge`].
pub fn frame_length(header: [u8; FRAME_HEADER_BYTES], max_bytes: u64) -> Result<usize, FrameError> {
    let length = u64::from(u32::from_le_bytes(header));
    if length > max_bytes {
        return Err(FrameError::TooLarge {
            length,
            max: max_bytes,
        });
    }
    Ok(length as usize)
}

/// Decodes a frame body (without its prefix).
///
/// # Errors
/// [`FrameError::Malformed`] when the bytes are not a `T`, or carry trailing bytes.
pub fn decode_frame<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (value, rest) = postcard::take_from_bytes(body)
        .map_err(|error| FrameError::Malformed(error.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after the frame",
            rest.len()
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Op;

    #[test]
    fn frames_round_trip() {
        let frame = ClientFrame::Request {
            request: Request {
                session: 3,
                sequence: 9,
                op: Op::GetData { path: "/a".into() },
            },
            consistency: ReadConsistency::AtLeast(17),
            watch: Some(WatchKind::Data),
        };
        let bytes = encode_frame(&frame);
        let header: [u8; 4] = bytes[..4].try_into().expect("header");
        let length = frame_length(header, DEFAULT_MAX_FRAME_BYTES).expect("within bound");
        assert_eq!(length, bytes.len() - 4);
        assert_eq!(decode_frame::<ClientFrame>(&bytes[4..]), Ok(frame));
    }

    #[test]
    fn oversize_and_malformed_frames_are_refused() {
        let header = (10_000_000u32).to_le_bytes();
        assert!(matches!(
            frame_length(header, DEFAULT_MAX_FRAME_BYTES),
            Err(FrameError::TooLarge {
                length: 10_000_000,
                ..
            })
        ));
        assert!(matches!(
            decode_frame::<ClientFrame>(&[0xff, 0xff, 0xff]),
            Err(FrameError::Malformed(_))
        ));
        let mut bytes = encode_frame(&ClientFrame::KeepAlive);
        bytes.push(0);
        assert!(matches!(
            decode_frame::<ClientFrame>(&bytes[4..]),
            Err(FrameError::Malformed(_))
        ));
    }
}
