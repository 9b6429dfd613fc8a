//! Snapshot and restore of the whole state, so a replica can start from a
//! snapshot and a lagging replica can be sent one.
//!
//! Format (version 2: sessions carry their owner and secret, and the body
//! ends with the cluster identity), deterministic byte for byte, since every part is an
//! ordered map or a vector serialized in order:
//!
//! | bytes | content |
//! | --- | --- |
//! | 8 | magic `SYNODSM\0` |
//! | 8 | format version, u64 little-endian |
//! | 8 | body length in bytes, u64 little-endian |
//! | n | body: postcard of revision, time, next session id, nodes, sessions, locks, next lock generation, then (since version 2) the cluster identity and the confirmed members |
//! | 4 | CRC-32 (IEEE) of all the bytes before it, little-endian |
//!
//! Restore checks every part (magic, version, length, checksum, decoding)
//! and then the invariants the state machine relies on (parents exist, child
//! counts, owners of ephemeral nodes and locks are open sessions), and
//! reports the first violation as an error. It never panics on bad input.
//!
//! Version 1 (before the cluster identity) is still read, as a state with
//! no identity and no confirmed members: the cluster's leader then mints
//! one. A replica restores its cluster identity from here at start, before
//! its transport starts, so its first peer handshake carries it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use synod_proto::{Revision, SessionId};

use super::lock::{LockState, LockTable};
use super::path::PathKey;
use super::records::DirtyKeys;
use super::session::Session;
use super::tree::{Node, Tree};
use super::{StateConfig, StateMachine};

/// The first bytes of every snapshot.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"SYNODSM\0";

/// The snapshot format this build writes and reads.
pub const SNAPSHOT_FORMAT_VERSION: u64 = 2;

/// The oldest snapshot format this build still reads. Version 1 is not
/// read: its sessions have no owner, so nobody could use them safely.
pub const SNAPSHOT_FORMAT_VERSION_MIN: u64 = 2;

const HEADER_BYTES: usize = 24;
const CHECKSUM_BYTES: usize = 4;

/// Why a snapshot could not be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The bytes end before the header, body or checksum does.
    #[error(
        "snapshot is truncated: {actual_bytes} bytes, expected {expected_bytes}; fetch it again"
    )]
    Truncated {
        /// Bytes present.
        actual_bytes: u64,
        /// Bytes the header announces (or the minimum).
        expected_bytes: u64,
    },
    /// The bytes do not start with the snapshot magic.
    #[error("not a Synod state snapshot (bad magic bytes)")]
    BadMagic,
    /// The snapshot was written in a format this build cannot read.
    #[error("snapshot format version {found} is not supported (this build reads {supported}); upgrade the replica")]
    UnsupportedVersion {
        /// The version found.
        found: u64,
        /// The version this build reads.
        supported: u64,
    },
    /// The checksum does not match: the snapshot is corrupt.
    #[error("snapshot checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): it is corrupt; fetch it again")]
    ChecksumMismatch {
        /// The stored checksum.
        stored: u32,
        /// The checksum of the bytes.
        computed: u32,
    },
    /// The body could not be decoded, or has bytes left over.
    #[error("snapshot body is malformed: {0}")]
    Malformed(String),
    /// The body decodes but breaks an invariant of the state.
    #[error("snapshot state is inconsistent: {0}")]
    Inconsistent(String),
}

#[derive(Serialize)]
struct BodyRef<'a> {
    revision: Revision,
    now_ms: u64,
    next_session_id: SessionId,
    nodes: &'a BTreeMap<PathKey, Node>,
    sessions: &'a BTreeMap<SessionId, Session>,
    locks: &'a BTreeMap<PathKey, LockState>,
    next_lock_generation: u64,
}

/// What version 2 appended to the body.
#[derive(Serialize)]
struct IdentityRef<'a> {
    cluster_identity: Option<u128>,
    confirmed_members: &'a std::collections::BTreeSet<u64>,
}

/// [`IdentityRef`] as read back; the set as a list, to refuse disorder.
#[derive(Deserialize)]
struct IdentityPart {
    cluster_identity: Option<u128>,
    confirmed_members: Vec<u64>,
}

/// The body as read back. Maps are read as lists of pairs (postcard encodes
/// both alike) so that keys out of order or repeated are refused rather than
/// silently sorted or overwritten: an accepted snapshot is in canonical form.
#[derive(Deserialize)]
struct Body {
    revision: Revision,
    now_ms: u64,
    next_session_id: SessionId,
    nodes: Vec<(PathKey, Node)>,
    sessions: Vec<(SessionId, Session)>,
    locks: Vec<(PathKey, LockState)>,
    next_lock_generation: u64,
}

/// A map from pairs whose keys strictly increase.
fn ascending<K: Ord + std::fmt::Debug, V>(
    what: &str,
    pairs: Vec<(K, V)>,
) -> Result<BTreeMap<K, V>, String> {
    if let Some(window) = pairs.windows(2).find(|w| w[0].0 >= w[1].0) {
        return Err(format!(
            "{what} are not in strictly increasing order at {:?}",
            window[1].0
        ));
    }
    Ok(pairs.into_iter().collect())
}

impl StateMachine {
    /// The whole state in the versioned snapshot format. Two replicas that
    /// applied the same commands produce identical bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        let (locks, next_lock_generation) = self.locks.parts();
        let body = BodyRef {
            revision: self.revision,
            now_ms: self.now_ms,
            next_session_id: self.next_session_id,
            nodes: self.tree.nodes(),
            sessions: &self.sessions,
            locks,
            next_lock_generation,
        };
        let identity = IdentityRef {
            cluster_identity: self.cluster_identity,
            confirmed_members: &self.confirmed_members,
        };
        let body =
            postcard::to_allocvec(&body).expect("encoding a snapshot into memory cannot fail");
        let body = postcard::to_extend(&identity, body)
            .expect("encoding a snapshot into memory cannot fail");
        let mut bytes = Vec::with_capacity(HEADER_BYTES + body.len() + CHECKSUM_BYTES);
        bytes.extend_from_slice(&SNAPSHOT_MAGIC);
        bytes.extend_from_slice(&SNAPSHOT_FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&body);
        let checksum = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&checksum.to_le_bytes());
        bytes
    }

    /// A state machine restored from a snapshot, with the given limits.
    ///
    /// # Errors
    /// A [`SnapshotError`] saying what is wrong with the bytes.
    pub fn restore(config: StateConfig, bytes: &[u8]) -> Result<StateMachine, SnapshotError> {
        let minimum = HEADER_BYTES + CHECKSUM_BYTES;
        if bytes.len() < minimum {
            return Err(SnapshotError::Truncated {
                actual_bytes: bytes.len() as u64,
                expected_bytes: minimum as u64,
            });
        }
        if bytes[..8] != SNAPSHOT_MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let version = read_u64(&bytes[8..16]);
        if !(SNAPSHOT_FORMAT_VERSION_MIN..=SNAPSHOT_FORMAT_VERSION).contains(&version) {
            return Err(SnapshotError::UnsupportedVersion {
                found: version,
                supported: SNAPSHOT_FORMAT_VERSION,
            });
        }
        let body_bytes = read_u64(&bytes[16..24]);
        let expected_bytes = body_bytes.saturating_add(minimum as u64);
        if bytes.len() as u64 != expected_bytes {
            return Err(SnapshotError::Truncated {
                actual_bytes: bytes.len() as u64,
                expected_bytes,
            });
        }
        let (covered, stored) = bytes.split_at(bytes.len() - CHECKSUM_BYTES);
        let stored = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]);
        let computed = crc32fast::hash(covered);
        if stored != computed {
            return Err(SnapshotError::ChecksumMismatch { stored, computed });
        }
        let (body, rest): (Body, &[u8]) = postcard::take_from_bytes(&covered[HEADER_BYTES..])
            .map_err(|error| SnapshotError::Malformed(error.to_string()))?;
        let (identity, rest) = if version >= 2 {
            let (identity, rest): (IdentityPart, &[u8]) = postcard::take_from_bytes(rest)
                .map_err(|error| SnapshotError::Malformed(error.to_string()))?;
            (identity, rest)
        } else {
            let identity = IdentityPart {
                cluster_identity: None,
                confirmed_members: Vec::new(),
            };
            (identity, rest)
        };
        if !rest.is_empty() {
            return Err(SnapshotError::Malformed(format!(
                "{} bytes after the body",
                rest.len()
            )));
        }
        Self::from_body(config, body, identity).map_err(SnapshotError::Inconsistent)
    }

    fn from_body(
        config: StateConfig,
        body: Body,
        identity: IdentityPart,
    ) -> Result<StateMachine, String> {
        let confirmed_members: std::collections::BTreeSet<u64> = ascending(
            "confirmed members",
            identity
                .confirmed_members
                .into_iter()
                .map(|node| (node, ()))
                .collect(),
        )?
        .into_keys()
        .collect();
        let nodes = ascending("nodes", body.nodes)?;
        let sessions = ascending("sessions", body.sessions)?;
        let locks = ascending("locks", body.locks)?;
        let tree = Tree::from_nodes(nodes, config.path_bytes_max)?;
        let locks = LockTable::from_parts(locks, body.next_lock_generation)?;
        StateMachine::from_parts(
            config,
            Parts {
                revision: body.revision,
                now_ms: body.now_ms,
                next_session_id: body.next_session_id,
                tree,
                sessions,
                locks,
                next_lock_generation: body.next_lock_generation,
                cluster_identity: identity.cluster_identity,
                confirmed_members,
            },
        )
    }

    /// A state from its parts, checking the invariants that hold between
    /// them (what [`Tree::from_nodes`] and [`LockTable::from_parts`] check
    /// within each is already checked).
    pub(crate) fn from_parts(config: StateConfig, parts: Parts) -> Result<StateMachine, String> {
        let Parts {
            revision,
            now_ms,
            next_session_id,
            tree,
            sessions,
            locks,
            next_lock_generation,
            cluster_identity,
            confirmed_members,
        } = parts;
        if cluster_identity.is_none() && !confirmed_members.is_empty() {
            return Err("members confirmed a cluster identity that is not there".into());
        }
        for (path, node) in tree.nodes() {
            let meta = node.meta();
            if meta.created_revision > revision
                || meta.modified_revision > revision
                || meta.child_modified_revision > revision
            {
                return Err(format!("node {path} has a revision after the snapshot's"));
            }
        }
        // Counters at their maximum would overflow on the next command.
        if revision == u64::MAX
            || next_session_id == u64::MAX
            || next_lock_generation == u64::MAX
            || next_session_id == 0
            || next_lock_generation == 0
        {
            return Err("a counter is out of range".into());
        }
        if let Some(last) = sessions.keys().next_back() {
            if *last >= next_session_id || sessions.contains_key(&0) {
                return Err("a session identifier is out of range".into());
            }
        }
        for owner in tree.ephemeral_owners().chain(locks.sessions()) {
            if !sessions.contains_key(&owner) {
                return Err(format!(
                    "session {owner} owns nodes or locks but is not open"
                ));
            }
        }
        let mut sessions_per_owner: BTreeMap<String, u64> = BTreeMap::new();
        for session in sessions.values() {
            *sessions_per_owner.entry(session.owner.clone()).or_insert(0) += 1;
        }
        Ok(StateMachine {
            config,
            revision,
            now_ms,
            tree,
            sessions,
            sessions_per_owner,
            next_session_id,
            locks,
            cluster_identity,
            confirmed_members,
            dirty_sessions: DirtyKeys::default(),
        })
    }
}

/// A state's parts, each already checked on its own.
pub(crate) struct Parts {
    pub revision: Revision,
    pub now_ms: u64,
    pub next_session_id: SessionId,
    pub tree: Tree,
    pub sessions: BTreeMap<SessionId, Session>,
    pub locks: LockTable,
    pub next_lock_generation: u64,
    pub cluster_identity: Option<u128>,
    pub confirmed_members: std::collections::BTreeSet<u64>,
}

fn read_u64(bytes: &[u8]) -> u64 {
    let mut buffer = [0u8; 8];
    buffer.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_state_round_trips() {
        let state = StateMachine::new(StateConfig::default());
        let bytes = state.snapshot();
        let restored = StateMachine::restore(StateConfig::default(), &bytes).expect("restores");
        assert_eq!(restored, state);
        assert_eq!(restored.snapshot(), bytes);
    }

    #[test]
    fn the_cluster_identity_round_trips_and_version_1_is_refused() {
        let mut state = StateMachine::new(StateConfig::default());
        for command in [
            super::super::Command::MemberConfirmed { node: 1, now_ms: 1 },
            super::super::Command::MintClusterIdentity {
                identity: 0xfeed,
                now_ms: 2,
            },
            super::super::Command::MintClusterIdentity {
                identity: 0xbad,
                now_ms: 3,
            },
            super::super::Command::MemberConfirmed { node: 3, now_ms: 4 },
            super::super::Command::MemberConfirmed { node: 2, now_ms: 5 },
        ] {
            state.apply(&command);
        }
        assert_eq!(state.cluster_identity(), Some(0xfeed));
        assert_eq!(
            state
                .confirmed_members()
                .iter()
                .copied()
                .collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(state.revision(), 0, "identity commands take no revision");
        let bytes = state.snapshot();
        let restored = StateMachine::restore(StateConfig::default(), &bytes).expect("restores");
        assert_eq!(restored, state);

        // The same state written as version 1: the body without the
        // identity part.
        let empty = StateMachine::new(StateConfig::default());
        let (locks, next_lock_generation) = empty.locks.parts();
        let body = postcard::to_allocvec(&BodyRef {
            revision: 0,
            now_ms: 0,
            next_session_id: 1,
            nodes: empty.tree.nodes(),
            sessions: &empty.sessions,
            locks,
            next_lock_generation,
        })
        .expect("encodes");
        let mut v1 = Vec::new();
        v1.extend_from_slice(&SNAPSHOT_MAGIC);
        v1.extend_from_slice(&1u64.to_le_bytes());
        v1.extend_from_slice(&(body.len() as u64).to_le_bytes());
        v1.extend_from_slice(&body);
        let checksum = crc32fast::hash(&v1);
        v1.extend_from_slice(&checksum.to_le_bytes());
        assert!(matches!(
            StateMachine::restore(StateConfig::default(), &v1),
            Err(SnapshotError::UnsupportedVersion { found: 1, .. })
        ));
    }
}
