//! The typed errors a request can be answered with. Each variant carries what
//! is needed to act on it, and its message says what to do next.

use serde::{Deserialize, Serialize};

use crate::{LockMode, SessionId};

/// Result of a request against the coordination state.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a request was refused. Meanings follow ZooKeeper's error codes where
/// one exists. A refused request changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The node (or, for create, its parent) does not exist.
    #[error("node {path} does not exist; create it (and its parents) first, or check the path")]
    NoNode {
        /// The missing path.
        path: String,
    },
    /// A node already exists at the path being created.
    #[error("node {path} already exists; pick another name, or set its data instead")]
    NodeExists {
        /// The existing path.
        path: String,
    },
    /// The node's version differs from the version the request expected.
    #[error(
        "node {path} is at version {actual_version}, not the expected {expected_version}; \
         re-read it and retry with the current version"
    )]
    BadVersion {
        /// The node.
        path: String,
        /// The version the request required.
        expected_version: u64,
        /// The node's current version.
        actual_version: u64,
    },
    /// A node with children cannot be deleted.
    #[error("node {path} has children; delete them first")]
    NotEmpty {
        /// The node.
        path: String,
    },
    /// Ephemeral nodes cannot have children.
    #[error("node {path} is ephemeral and cannot have children; make the parent persistent")]
    NoChildrenForEphemerals {
        /// The ephemeral parent.
        path: String,
    },
    /// The session does not exist: it expired, was closed, or never existed.
    #[error(
        "session {session} has expired or was closed; open a new session and re-create \
         its ephemeral nodes, locks and watches"
    )]
    SessionExpired {
        /// The session named by the request.
        session: SessionId,
    },
    /// A request with this sequence number was already superseded by a later
    /// one; its result is no longer kept.
    #[error(
        "request {sequence} of session {session} is older than the last applied request \
         {last_sequence}; send each new request with a higher sequence number"
    )]
    StaleRequestSequence {
        /// The session.
        session: SessionId,
        /// The sequence number of the refused request.
        sequence: u64,
        /// The last sequence number applied for the session.
        last_sequence: u64,
    },
    /// An argument is malformed (a bad path, an op not allowed here, ...).
    #[error("bad argument: {message}")]
    BadArgument {
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The node data is larger than the configured limit.
    #[error("data of {size_bytes} bytes exceeds the limit of {max_bytes} bytes; store less, or split it over several nodes")]
    DataTooLarge {
        /// Size of the refused data.
        size_bytes: u64,
        /// The configured limit.
        max_bytes: u64,
    },
    /// The session neither holds nor waits for the lock it tried to release.
    #[error("session does not hold the lock {path}; acquire it first")]
    LockNotHeld {
        /// The lock.
        path: String,
    },
    /// A try-acquire found the lock held by another session, or in its
    /// lock-delay after a holder's session ended.
    #[error("lock {path} is busy; retry later or acquire it with wait")]
    LockBusy {
        /// The lock.
        path: String,
    },
    /// The session already holds or waits for this lock.
    #[error("session already holds or waits for lock {path}; release it before acquiring again")]
    LockAlreadyRequested {
        /// The lock.
        path: String,
    },
    /// A fencing token (sequencer) is no longer current: its holder released
    /// the lock or lost its session.
    #[error(
        "the {mode:?} fencing token for {path} at generation {generation} is no longer current; \
         re-acquire the lock and retry with the new token"
    )]
    StaleSequencer {
        /// The lock.
        path: String,
        /// The token's mode.
        mode: LockMode,
        /// The token's generation.
        generation: u64,
    },
    /// The replica could not get the request through in time (no leader
    /// elected, no quorum reachable, or the replica is shutting down). The
    /// request may or may not have been applied; retrying it with the same
    /// `(session, sequence)` is safe.
    #[error("the cluster could not serve the request: {reason}; retry, or try another replica")]
    Unavailable {
        /// What stood in the way.
        reason: String,
    },
    /// A bound of the replica's or the cluster's `[limits]` was reached; the
    /// request changed nothing. Other clients are not affected.
    #[error("{message} (limit `{limit}` is {max})")]
    LimitExceeded {
        /// The bound, as named in the config file (`limits.<name>`).
        limit: String,
        /// Its value.
        max: u64,
        /// What was refused and what to do about it.
        message: String,
    },
    /// One operation of a `multi` failed, so none was applied.
    #[error("operation {index} of the multi failed, so nothing was applied: {cause}")]
    MultiOpFailed {
        /// Zero-based index of the failed operation.
        index: u64,
        /// Why it failed.
        cause: Box<Error>,
    },
}

impl Error {
    /// A [`Error::LimitExceeded`] for the bound `limit` (named without the
    /// `limits.` prefix) of value `max`.
    pub fn limit_exceeded(limit: &str, max: u64, message: impl Into<String>) -> Self {
        Error::LimitExceeded {
            limit: format!("limits.{limit}"),
            max,
            message: message.into(),
        }
    }

    /// A [`Error::BadArgument`] with the given explanation.
    pub fn bad_argument(message: impl Into<String>) -> Self {
        Error::BadArgument {
            message: message.into(),
        }
    }
}
