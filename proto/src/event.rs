//! Events fired by applied commands, and the kinds of watches that observe
//! them.

use serde::{Deserialize, Serialize};

use crate::Revision;

/// What happened to a node. Which watches each type fires follows ZooKeeper:
///
/// | event | fires |
/// | --- | --- |
/// | `NodeCreated` at p | exists watches on p; persistent recursive watches on p or an ancestor |
/// | `NodeDeleted` at p | data, exists and children watches on p; persistent recursive |
/// | `NodeDataChanged` at p | data and exists watches on p; persistent recursive |
/// | `NodeChildrenChanged` at p | children watches on p |
/// | `LeaderChanged` at p | leader watches on the election p |
/// | `HistoryCompacted` | sent on reconnect when missed events are no longer kept |
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EventType {
    /// A node was created at the path.
    NodeCreated,
    /// The node at the path was deleted.
    NodeDeleted,
    /// The node's data was set (even to the same bytes).
    NodeDataChanged,
    /// A child of the node was created or deleted.
    NodeChildrenChanged,
    /// The leader of the election at the path changed (a new leader, or none).
    LeaderChanged,
    /// The events a reconnecting client missed are no longer retained: it
    /// must re-read the state it watches.
    HistoryCompacted,
}

/// One event: what happened, where, and at which revision. Events of one
/// command share its revision and are listed in the order they happened.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Event {
    /// The node or election path.
    pub path: String,
    /// What happened.
    pub event_type: EventType,
    /// Revision of the command that fired it.
    pub revision: Revision,
}

/// The kind of a watch a client registers on a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum WatchKind {
    /// One-shot: fires on the node's next data change or deletion.
    Data,
    /// One-shot: fires on the next child creation or deletion, or the node's deletion.
    Children,
    /// One-shot: fires on the node's creation, data change or deletion.
    Exists,
    /// Persistent: fires on every creation, data change and deletion at the
    /// path or below it, until removed.
    PersistentRecursive,
    /// Persistent: fires on every change of leader of the election at the path.
    Leader,
}

impl WatchKind {
    /// Whether a watch of this kind stays registered after it fires.
    pub fn is_persistent(self) -> bool {
        matches!(self, WatchKind::PersistentRecursive | WatchKind::Leader)
    }

    /// Whether an event of `event_type` at `event_path` fires a watch of this
    /// kind registered at `watch_path`.
    pub fn fires_on(self, watch_path: &str, event_path: &str, event_type: EventType) -> bool {
        use EventType as E;
        match self {
            WatchKind::Data => {
                watch_path == event_path
                    && matches!(event_type, E::NodeDataChanged | E::NodeDeleted)
            }
            WatchKind::Exists => {
                watch_path == event_path
                    && matches!(
                        event_type,
                        E::NodeCreated | E::NodeDataChanged | E::NodeDeleted
                    )
            }
            WatchKind::Children => {
                watch_path == event_path
                    && matches!(event_type, E::NodeChildrenChanged | E::NodeDeleted)
            }
            WatchKind::PersistentRecursive => {
                matches!(
                    event_type,
                    E::NodeCreated | E::NodeDataChanged | E::NodeDeleted
                ) && is_self_or_descendant(watch_path, event_path)
            }
            WatchKind::Leader => watch_path == event_path && event_type == E::LeaderChanged,
        }
    }
}

/// Whether `path` is `ancestor` itself or lies below it.
fn is_self_or_descendant(ancestor: &str, path: &str) -> bool {
    if ancestor == "/" {
        return path.starts_with('/');
    }
    match path.strip_prefix(ancestor) {
        Some("") => true,
        Some(rest) => rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recursive_watch_matches_only_subtree() {
        let kind = WatchKind::PersistentRecursive;
        assert!(kind.fires_on("/a", "/a", EventType::NodeCreated));
        assert!(kind.fires_on("/a", "/a/b/c", EventType::NodeDeleted));
        assert!(!kind.fires_on("/a", "/ab", EventType::NodeCreated));
        assert!(kind.fires_on("/", "/ab", EventType::NodeDataChanged));
        assert!(!kind.fires_on("/a", "/a/b", EventType::NodeChildrenChanged));
    }
}
