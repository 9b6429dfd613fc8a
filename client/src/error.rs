//! The client's errors: the cluster's answers with ZooKeeper's meanings,
//! and the client's own failures, each with a message that says what to do.

use thiserror::Error;

/// Result of a client call.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Why a call failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientError {
    /// The cluster refused the request (no node, bad version, lock busy, ...);
    /// nothing changed. Match on the inner error for the reason.
    #[error(transparent)]
    Refused(#[from] synod_proto::Error),
    /// The session expired: its ephemeral nodes are gone and its locks
    /// released. Create a new client to go on.
    #[error("the session expired; its ephemeral nodes and locks are gone: connect again")]
    SessionExpired,
    /// No replica could be reached within the session timeout.
    #[error("no replica reachable: {0}; check the endpoints and the network")]
    ConnectionLost(String),
    /// The answer did not come within the request timeout. The request may
    /// or may not have been applied.
    #[error("no answer within {0} ms; the request may or may not have been applied")]
    Timeout(u64),
    /// The request was answered, but its outcome was lost in a failover;
    /// read the state to find out whether it was applied.
    #[error("the outcome of the request was lost in a failover; read the state to find out")]
    OutcomeUnknown,
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
    /// The configuration is unusable (bad endpoint, unreadable TLS files).
    #[error("bad client configuration: {0}")]
    Config(String),
    /// The replica answered something the client did not expect.
    #[error("unexpected answer from the replica: {0}")]
    Protocol(String),
}
