//! What a client asks for: a [`Request`] carries a session, a sequence number
//! and one [`Op`].

use serde::{Deserialize, Serialize};

use crate::SessionId;

/// One client request. `(session, sequence)` identifies it: a retried request
/// with the same pair is applied at most once and answered with the original
/// result. A session's sequence numbers must increase; gaps are allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The session the request belongs to.
    pub session: SessionId,
    /// The request's sequence number within its session.
    pub sequence: u64,
    /// What to do.
    pub op: Op,
}

/// How a node is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum CreateMode {
    /// Lives until deleted.
    Persistent,
    /// Deleted when the creating session ends; cannot have children.
    Ephemeral,
    /// Persistent, with a 10-digit counter from the parent appended to the name.
    PersistentSequential,
    /// Ephemeral, with a 10-digit counter from the parent appended to the name.
    EphemeralSequential,
}

impl CreateMode {
    /// Whether nodes of this mode are deleted when their session ends.
    pub fn is_ephemeral(self) -> bool {
        matches!(
            self,
            CreateMode::Ephemeral | CreateMode::EphemeralSequential
        )
    }

    /// Whether a counter suffix is appended to the name.
    pub fn is_sequential(self) -> bool {
        matches!(
            self,
            CreateMode::PersistentSequential | CreateMode::EphemeralSequential
        )
    }
}

/// How a lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LockMode {
    /// One holder at a time.
    Exclusive,
    /// Any number of shared holders, and no exclusive holder.
    Shared,
}

/// A fencing token: proof that a lock was granted. `generation` strictly
/// increases across all grants of a lock, across holders, restarts and leader
/// changes, so a downstream service that remembers the highest generation it
/// saw can refuse a paused former holder.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Sequencer {
    /// The lock's path.
    pub path: String,
    /// The mode it was granted in.
    pub mode: LockMode,
    /// The grant's generation.
    pub generation: u64,
}

/// One operation. Reads (`GetData`, `Exists`, `GetChildren`, `GetLeader`,
/// `CheckSequencer`) change nothing; everything else is a write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Create a node. The parent must exist and must not be ephemeral.
    Create {
        /// Absolute path (for sequential modes, the prefix of the name).
        path: String,
        /// Initial data.
        data: Vec<u8>,
        /// How the node is created.
        mode: CreateMode,
    },
    /// Delete a childless node, if its version matches when one is given.
    Delete {
        /// The node.
        path: String,
        /// The version it must have; `None` for any.
        expected_version: Option<u64>,
    },
    /// Replace a node's data, if its version matches when one is given.
    SetData {
        /// The node.
        path: String,
        /// The new data.
        data: Vec<u8>,
        /// The version it must have; `None` for any.
        expected_version: Option<u64>,
    },
    /// Read a node's data and stat.
    GetData {
        /// The node.
        path: String,
    },
    /// Read a node's stat, or learn that it does not exist.
    Exists {
        /// The node.
        path: String,
    },
    /// List a node's children, sorted by name.
    GetChildren {
        /// The node.
        path: String,
    },
    /// Apply the operations atomically: all or none.
    Multi {
        /// The operations, applied in order.
        ops: Vec<MultiOp>,
    },
    /// A no-op through the log: once answered, the replica has applied
    /// everything committed before it.
    Sync,
    /// End the session: delete its ephemeral nodes, release its locks.
    /// A retry after the close is answered with `SessionExpired`, which the
    /// client should take as "closed": the session's records are gone.
    CloseSession,
    /// Acquire a lock named by a path (the lock needs no node at that path).
    AcquireLock {
        /// The lock.
        path: String,
        /// Exclusive or shared.
        mode: LockMode,
        /// Queue behind the current holders instead of failing with `LockBusy`.
        wait: bool,
        /// After this session ends while holding the lock, nobody may get it
        /// for this long (clamped to the configured maximum).
        lock_delay_ms: u64,
    },
    /// Release a held lock, or stop waiting for it.
    ReleaseLock {
        /// The lock.
        path: String,
    },
    /// Whether a fencing token is still current.
    CheckSequencer {
        /// The token.
        sequencer: Sequencer,
    },
    /// Run for leader of the election at the path with a value (for example
    /// the candidate's address); queue behind the current leader.
    Campaign {
        /// The election.
        path: String,
        /// The candidate's value, shown as the leader's value when elected.
        value: Vec<u8>,
    },
    /// Stop leading or stop campaigning.
    Resign {
        /// The election.
        path: String,
    },
    /// Who leads the election at the path.
    GetLeader {
        /// The election.
        path: String,
    },
}

impl Op {
    /// Whether the op only reads (`GetData`, `Exists`, `GetChildren`,
    /// `GetLeader`, `CheckSequencer`): a replica may serve it without the log.
    pub fn is_read(&self) -> bool {
        matches!(
            self,
            Op::GetData { .. }
                | Op::Exists { .. }
                | Op::GetChildren { .. }
                | Op::GetLeader { .. }
                | Op::CheckSequencer { .. }
        )
    }

    /// The path a read names, where a watch set with the read is left.
    pub fn read_path(&self) -> Option<&str> {
        match self {
            Op::GetData { path }
            | Op::Exists { path }
            | Op::GetChildren { path }
            | Op::GetLeader { path } => Some(path),
            _ => None,
        }
    }
}

/// One operation inside a [`Op::Multi`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MultiOp {
    /// Fail unless the node exists (at the version, when one is given).
    Check {
        /// The node.
        path: String,
        /// The version it must have; `None` for any.
        expected_version: Option<u64>,
    },
    /// Fail unless the fencing token is current: a guard that stops a former
    /// lock holder from writing.
    CheckSequencer {
        /// The token.
        sequencer: Sequencer,
    },
    /// As [`Op::Create`].
    Create {
        /// Absolute path.
        path: String,
        /// Initial data.
        data: Vec<u8>,
        /// How the node is created.
        mode: CreateMode,
    },
    /// As [`Op::Delete`].
    Delete {
        /// The node.
        path: String,
        /// The version it must have; `None` for any.
        expected_version: Option<u64>,
    },
    /// As [`Op::SetData`].
    SetData {
        /// The node.
        path: String,
        /// The new data.
        data: Vec<u8>,
        /// The version it must have; `None` for any.
        expected_version: Option<u64>,
    },
}
