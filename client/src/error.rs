//! The client's errors: the cluster's answers with ZooKeeper's meanings,
//! and the client's own failures, each with a message that says what to do.
//!
//! Match on [`ClientError::kind`] for the reason, whether the cluster
//! refused the request or the client failed on its own:
//!
//! ```
//! use synod_client::{ClientError, ErrorKind};
//!
//! let error = ClientError::Refused(synod_proto::Error::NoNode { path: "/a".into() });
//! assert_eq!(error.kind(), ErrorKind::NoNode);
//! assert!(error.to_string().contains("create it"));
//! ```

use thiserror::Error;

/// Result of a client call.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Why a call failed.
///
/// ```no_run
/// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
/// use synod_client::{ClientError, CreateMode, ErrorKind};
/// match client.create("/app", b"", CreateMode::Persistent).await {
///     Ok(_) => {}
///     Err(error) if error.kind() == ErrorKind::NodeExists => {}
///     Err(ClientError::SessionExpired) => panic!("connect again"),
///     Err(error) => return Err(error),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientError {
    /// The cluster refused the request (no node, bad version, lock busy, ...);
    /// nothing changed. Match on the inner error, or on [`ClientError::kind`],
    /// for the reason.
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
    #[error("no answer within {0} ms; the request may or may not have been applied: read the state to find out, or raise the request timeout")]
    Timeout(u64),
    /// The request was answered, but its outcome was lost in a failover;
    /// read the state to find out whether it was applied.
    #[error("the outcome of the request was lost in a failover; read the state to find out whether it was applied")]
    OutcomeUnknown,
    /// A lock (or leadership) this client held is gone: its session expired
    /// or it was released. Stop the work it protected.
    #[error("the lock {path} was lost (its session ended or it was released); stop the work it protected and acquire it again")]
    LockLost {
        /// The lock or election.
        path: String,
    },
    /// The client was closed.
    #[error("the client is closed; create a new one to go on")]
    Closed,
    /// The configuration is unusable (bad endpoint, unreadable TLS files).
    #[error("bad client configuration: {0}")]
    Config(String),
    /// The replica answered something the client did not expect.
    #[error("unexpected answer from the replica: {0}; check that client and cluster run the same version")]
    Protocol(String),
}

/// What went wrong, as one flat list with ZooKeeper's meanings: the
/// cluster's refusals and the client's own failures alike.
///
/// ```
/// use synod_client::{ClientError, ErrorKind};
/// let error = ClientError::Timeout(3_000);
/// assert_eq!(error.kind(), ErrorKind::Timeout);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The node (or a create's parent) does not exist.
    NoNode,
    /// A node already exists at the path.
    NodeExists,
    /// The node's version is not the expected one.
    BadVersion,
    /// The node has children.
    NotEmpty,
    /// Ephemeral nodes cannot have children.
    NoChildrenForEphemerals,
    /// The session expired (or was closed).
    SessionExpired,
    /// No replica could be reached.
    ConnectionLost,
    /// No answer within the request timeout.
    Timeout,
    /// The outcome of a request is unknown after a failover.
    OutcomeUnknown,
    /// A try-lock found the lock held.
    LockBusy,
    /// The session neither holds nor waits for the lock.
    LockNotHeld,
    /// The session already holds or waits for the lock.
    LockAlreadyRequested,
    /// A held lock or leadership is gone.
    LockLost,
    /// A fencing token is no longer current.
    StaleSequencer,
    /// A malformed argument.
    BadArgument,
    /// Data larger than the cluster allows.
    DataTooLarge,
    /// An operation of a `multi` failed; nothing was applied.
    MultiOpFailed,
    /// The cluster could not serve the request in time.
    Unavailable,
    /// The client is closed.
    Closed,
    /// The client's configuration is unusable.
    Config,
    /// An unexpected answer, or a refusal this client does not know.
    Protocol,
}

impl ClientError {
    /// The reason, as one flat list.
    ///
    /// ```
    /// use synod_client::{ClientError, ErrorKind};
    /// assert_eq!(ClientError::SessionExpired.kind(), ErrorKind::SessionExpired);
    /// ```
    pub fn kind(&self) -> ErrorKind {
        use synod_proto::Error as E;
        match self {
            ClientError::Refused(error) => match error {
                E::NoNode { .. } => ErrorKind::NoNode,
                E::NodeExists { .. } => ErrorKind::NodeExists,
                E::BadVersion { .. } => ErrorKind::BadVersion,
                E::NotEmpty { .. } => ErrorKind::NotEmpty,
                E::NoChildrenForEphemerals { .. } => ErrorKind::NoChildrenForEphemerals,
                E::SessionExpired { .. } => ErrorKind::SessionExpired,
                E::StaleRequestSequence { .. } => ErrorKind::OutcomeUnknown,
                E::BadArgument { .. } => ErrorKind::BadArgument,
                E::DataTooLarge { .. } => ErrorKind::DataTooLarge,
                E::LockNotHeld { .. } => ErrorKind::LockNotHeld,
                E::LockBusy { .. } => ErrorKind::LockBusy,
                E::LockAlreadyRequested { .. } => ErrorKind::LockAlreadyRequested,
                E::StaleSequencer { .. } => ErrorKind::StaleSequencer,
                E::Unavailable { .. } => ErrorKind::Unavailable,
                E::MultiOpFailed { .. } => ErrorKind::MultiOpFailed,
                _ => ErrorKind::Protocol,
            },
            ClientError::SessionExpired => ErrorKind::SessionExpired,
            ClientError::ConnectionLost(_) => ErrorKind::ConnectionLost,
            ClientError::Timeout(_) => ErrorKind::Timeout,
            ClientError::OutcomeUnknown => ErrorKind::OutcomeUnknown,
            ClientError::LockLost { .. } => ErrorKind::LockLost,
            ClientError::Closed => ErrorKind::Closed,
            ClientError::Config(_) => ErrorKind::Config,
            ClientError::Protocol(_) => ErrorKind::Protocol,
        }
    }

    /// Whether retrying the same call may succeed without changing it
    /// (the cluster or the connection was briefly unavailable).
    ///
    /// ```
    /// use synod_client::ClientError;
    /// assert!(ClientError::Timeout(100).is_transient());
    /// assert!(!ClientError::SessionExpired.is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::Timeout
                | ErrorKind::Unavailable
                | ErrorKind::ConnectionLost
                | ErrorKind::OutcomeUnknown
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_cluster_error() {
        let refused = |error| ClientError::Refused(error).kind();
        use synod_proto::Error as E;
        assert_eq!(
            refused(E::NodeExists { path: "/a".into() }),
            ErrorKind::NodeExists
        );
        assert_eq!(
            refused(E::LockBusy { path: "/l".into() }),
            ErrorKind::LockBusy
        );
        assert_eq!(
            refused(E::SessionExpired { session: 4 }),
            ErrorKind::SessionExpired
        );
        assert_eq!(
            ClientError::LockLost { path: "/l".into() }.kind(),
            ErrorKind::LockLost
        );
        assert!(ClientError::OutcomeUnknown.is_transient());
        let error = ClientError::Refused(E::NoNode { path: "/a".into() });
        assert!(error.to_string().contains("/a"));
    }
}
