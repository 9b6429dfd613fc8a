//! Sessions: what the state machine remembers about each open session.
//!
//! The leader tracks keep-alives outside the log and decides expiry; here a
//! session only records its timeout, the remaining time at the last
//! checkpoint the leader committed (from which a new leader resumes), and the
//! last request it applied with its response (for at-most-once retries),
//! and who owns it: the client identity (certificate subject) that opened
//! it and the random secret handed to that client. Only the owner holding
//! the secret may resume the session on another connection.

use serde::{Deserialize, Serialize};
use synod_proto::{Response, SessionId, SessionSecret};

/// One open session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Session {
    /// The timeout granted at open, after clamping.
    pub timeout_ms: u64,
    /// Time left before expiry, as of `checkpoint_time_ms`.
    pub remaining_ms: u64,
    /// Leader-stamped time at which `remaining_ms` was measured.
    pub checkpoint_time_ms: u64,
    /// Sequence number of the last applied request (0: none yet).
    pub last_sequence: u64,
    /// The response to that request, replayed on a retry.
    pub last_response: Option<Response>,
    /// The client identity that opened the session.
    pub owner: String,
    /// The secret the owner must present to resume the session.
    pub secret: SessionSecret,
}

/// A session's remaining time, as committed in a checkpoint by the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRemaining {
    /// The session.
    pub session: SessionId,
    /// Time left before it expires, in ms, at the checkpoint's time.
    pub remaining_ms: u64,
}
