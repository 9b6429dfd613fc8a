//! What a request is answered with.

use serde::{Deserialize, Serialize};

use crate::{Error, Revision, Sequencer, SessionId};

/// A node's metadata, as in ZooKeeper's `Stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Stat {
    /// Revision that created the node.
    pub created_revision: Revision,
    /// Revision that last set its data (or created it).
    pub modified_revision: Revision,
    /// Leader-stamped time of creation, in ms since the Unix epoch.
    pub created_time_ms: u64,
    /// Leader-stamped time of the last data change, in ms since the Unix epoch.
    pub modified_time_ms: u64,
    /// Number of data changes since creation.
    pub version: u64,
    /// Number of child creations and deletions since creation.
    pub child_version: u64,
    /// Session owning an ephemeral node; `0` for persistent nodes.
    pub ephemeral_owner: SessionId,
    /// Length of the data in bytes.
    pub data_length: u64,
    /// Number of children.
    pub children_count: u64,
    /// Revision of the last child creation or deletion (or the node's creation).
    pub child_modified_revision: Revision,
}

/// The leader of an election.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// The leader's session.
    pub session: SessionId,
    /// The value it campaigned with.
    pub value: Vec<u8>,
    /// Its fencing token.
    pub sequencer: Sequencer,
}

/// The answer to one request: the revision the state was at after it was
/// applied, and its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The revision this response reflects.
    pub revision: Revision,
    /// The result, or why the request was refused (and changed nothing).
    pub result: Result<OpResult, Error>,
}

/// The result of a successful operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    /// A session was opened.
    SessionOpened {
        /// Its identifier.
        session: SessionId,
        /// Its timeout, after clamping to the configured bounds.
        timeout_ms: u64,
    },
    /// The session was closed.
    SessionClosed,
    /// A node was created.
    Created {
        /// Its full path (with the counter suffix for sequential nodes).
        path: String,
        /// Its stat.
        stat: Stat,
    },
    /// The node was deleted.
    Deleted,
    /// The node's data was set.
    DataSet {
        /// Its new stat.
        stat: Stat,
    },
    /// A node's data and stat.
    Data {
        /// The data.
        data: Vec<u8>,
        /// The stat.
        stat: Stat,
    },
    /// Whether a node exists.
    Exists {
        /// Its stat, or `None` when there is no node.
        stat: Option<Stat>,
    },
    /// A node's children.
    Children {
        /// The children's names (not full paths), sorted bytewise.
        children: Vec<String>,
        /// The parent's stat.
        stat: Stat,
    },
    /// Every operation of a multi succeeded.
    Multi {
        /// One result per operation, in order.
        results: Vec<MultiResult>,
    },
    /// A sync completed.
    Synced,
    /// The lock was granted now.
    LockAcquired {
        /// The grant's fencing token.
        sequencer: Sequencer,
    },
    /// The request is queued; the grant will come as a notification.
    LockQueued {
        /// Number of requests ahead of it in the queue.
        waiters_ahead: u64,
    },
    /// The lock was released, or the wait for it was cancelled.
    LockReleased,
    /// The fencing token is current.
    SequencerCurrent,
    /// The campaign won at once.
    Elected {
        /// The new leader's fencing token.
        sequencer: Sequencer,
    },
    /// The candidate is queued behind the leader.
    CampaignQueued {
        /// Number of candidates ahead of it.
        candidates_ahead: u64,
    },
    /// The session resigned (or stopped campaigning).
    Resigned,
    /// The current leader, if any.
    Leader {
        /// The leader, or `None` when nobody leads.
        leader: Option<LeaderInfo>,
    },
}

/// The result of one operation of a successful multi.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MultiResult {
    /// A check passed.
    Checked,
    /// A node was created at this path.
    Created {
        /// Its full path.
        path: String,
    },
    /// A node was deleted.
    Deleted,
    /// A node's data was set.
    DataSet {
        /// Its new stat.
        stat: Stat,
    },
}
