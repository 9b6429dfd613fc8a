//! The namespace: one ordered map from full path to a compact node.
//!
//! Children are counted, not stored: listing a node's children is a range
//! scan over the ordered paths that skips each child's subtree, so a node
//! costs one map entry (its path, and one heap block holding 72 bytes of
//! metadata and its data) and
//! nothing in its parent.
//!
//! Every write validates completely before it changes anything, so a failed
//! write changes nothing. Inside a multi, writes also record how to undo
//! themselves, so a later failure can roll the earlier ones back.

use std::collections::{btree_map, BTreeMap, BTreeSet};
use std::ops::Bound;

use serde::{Deserialize, Serialize};
use synod_proto::{CreateMode, Error, Event, EventType, Revision, SessionId, Stat};

use super::config::StateConfig;
use super::path::{descendant_prefix, parent, validate_path, PathKey};
use super::records::DirtyKeys;

/// A changed node as the saved state names it: the revision that created
/// it, and its path. A path deleted and created again is another node,
/// saved under another record (see `records.rs`).
pub(crate) type NodeMark = (Revision, PathKey);

/// A node's metadata, stored inline in the map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub created_revision: Revision,
    pub modified_revision: Revision,
    pub created_time_ms: u64,
    pub modified_time_ms: u64,
    pub version: u64,
    pub child_version: u64,
    pub ephemeral_owner: SessionId,
    pub child_modified_revision: Revision,
    pub children_count: u64,
}

/// Bytes of a [`Meta`] at the front of a node's allocation.
const META_BYTES: usize = 9 * 8;

/// One node: its metadata and data in one allocation (the metadata's nine
/// fields as little-endian `u64`s, then the data), so that a node costs one
/// heap block and 16 bytes in the map's entry beside its path.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Node {
    bytes: Box<[u8]>,
}

impl Node {
    /// A node holding `meta` and `data`.
    pub fn new(meta: Meta, data: &[u8]) -> Node {
        let mut bytes = Vec::with_capacity(META_BYTES + data.len());
        bytes.extend_from_slice(&meta.to_bytes());
        bytes.extend_from_slice(data);
        Node {
            bytes: bytes.into_boxed_slice(),
        }
    }

    /// The revision that created it (the first of its metadata's fields).
    pub fn created_revision(&self) -> Revision {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(&self.bytes[..8]);
        u64::from_le_bytes(bytes)
    }

    /// Its metadata.
    pub fn meta(&self) -> Meta {
        Meta::from_bytes(&self.bytes[..META_BYTES])
    }

    /// Its data.
    pub fn data(&self) -> &[u8] {
        &self.bytes[META_BYTES..]
    }

    /// Replaces its metadata in place.
    pub fn set_meta(&mut self, meta: &Meta) {
        self.bytes[..META_BYTES].copy_from_slice(&meta.to_bytes());
    }

    /// The node's stat as the wire shows it.
    pub fn stat(&self) -> Stat {
        let meta = self.meta();
        let meta = &meta;
        Stat {
            created_revision: meta.created_revision,
            modified_revision: meta.modified_revision,
            created_time_ms: meta.created_time_ms,
            modified_time_ms: meta.modified_time_ms,
            version: meta.version,
            child_version: meta.child_version,
            ephemeral_owner: meta.ephemeral_owner,
            data_length: self.data().len() as u64,
            children_count: meta.children_count,
            child_modified_revision: meta.child_modified_revision,
        }
    }
}

impl Meta {
    fn fields(&self) -> [u64; 9] {
        [
            self.created_revision,
            self.modified_revision,
            self.created_time_ms,
            self.modified_time_ms,
            self.version,
            self.child_version,
            self.ephemeral_owner,
            self.child_modified_revision,
            self.children_count,
        ]
    }

    fn to_bytes(self) -> [u8; META_BYTES] {
        let mut bytes = [0u8; META_BYTES];
        for (chunk, field) in bytes.chunks_exact_mut(8).zip(self.fields()) {
            chunk.copy_from_slice(&field.to_le_bytes());
        }
        bytes
    }

    fn from_bytes(bytes: &[u8]) -> Meta {
        let mut fields = [0u64; 9];
        for (field, chunk) in fields.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            *field = u64::from_le_bytes(word);
        }
        let [created_revision, modified_revision, created_time_ms, modified_time_ms, version, child_version, ephemeral_owner, child_modified_revision, children_count] =
            fields;
        Meta {
            created_revision,
            modified_revision,
            created_time_ms,
            modified_time_ms,
            version,
            child_version,
            ephemeral_owner,
            child_modified_revision,
            children_count,
        }
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("meta", &self.meta())
            .field("data", &self.data())
            .finish()
    }
}

/// A node as snapshots encode it: the metadata, then the data.
#[derive(Serialize, Deserialize)]
struct NodeWire<'a> {
    meta: Meta,
    #[serde(borrow)]
    data: std::borrow::Cow<'a, [u8]>,
}

impl Serialize for Node {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        NodeWire {
            meta: self.meta(),
            data: std::borrow::Cow::Borrowed(self.data()),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = NodeWire::deserialize(deserializer)?;
        Ok(Node::new(wire.meta, &wire.data))
    }
}

/// How to undo one change to the map.
#[derive(Debug)]
pub(crate) enum Undo {
    /// The path was inserted: remove it.
    Inserted(PathKey),
    /// The path was removed: put the node back.
    Removed(PathKey, Node),
    /// The node's metadata changed: restore it.
    Meta(PathKey, Meta),
    /// The node was replaced (its data changed): put the old one back.
    Replaced(PathKey, Node),
}

/// What a write needs from the command applying it, and what it produces.
pub(crate) struct Effects<'a> {
    /// The revision the command's changes take.
    pub revision: Revision,
    /// The command's leader-stamped time.
    pub now_ms: u64,
    /// Events fired so far, in order.
    pub events: &'a mut Vec<Event>,
    /// When inside a multi: how to undo each change, in order.
    pub undo: Option<&'a mut Vec<Undo>>,
}

impl Effects<'_> {
    fn event(&mut self, path: &str, event_type: EventType) {
        self.events.push(Event {
            path: path.to_owned(),
            event_type,
            revision: self.revision,
        });
    }

    fn record(&mut self, undo: impl FnOnce() -> Undo) {
        if let Some(log) = self.undo.as_deref_mut() {
            log.push(undo());
        }
    }
}

/// The namespace plus an index of ephemeral nodes by owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tree {
    nodes: BTreeMap<PathKey, Node>,
    ephemerals: BTreeSet<(SessionId, PathKey)>,
    /// Nodes changed since the last [`Tree::take_dirty`], each with the
    /// revision that created it (see [`NodeMark`]).
    dirty: DirtyKeys<NodeMark>,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

impl Tree {
    /// A namespace holding only the root `/`.
    pub fn new() -> Self {
        let mut nodes = BTreeMap::new();
        nodes.insert(PathKey::from("/"), Node::new(Meta::default(), &[]));
        let mut dirty = DirtyKeys::default();
        // A new state saves its root with its first changes.
        dirty.mark((0, PathKey::from("/")));
        Tree {
            nodes,
            ephemerals: BTreeSet::new(),
            dirty,
        }
    }

    /// Rebuilds a tree from its nodes, checking the invariants that the
    /// snapshot reader cannot trust: every path is well formed, the root
    /// exists, every node's parent
    /// exists and is persistent, and every child count is right.
    pub fn from_nodes(nodes: BTreeMap<PathKey, Node>, path_bytes_max: u64) -> Result<Self, String> {
        for path in nodes.keys() {
            validate_path(path, path_bytes_max).map_err(|error| error.to_string())?;
        }
        Tree::from_checked_nodes(nodes)
    }

    /// As [`Tree::from_nodes`], for nodes whose paths were each checked
    /// already (as a `records::NodeBatcher` checks them).
    ///
    /// # Errors
    /// As [`Tree::from_nodes`] but for the paths' own form.
    pub fn from_checked_nodes(nodes: BTreeMap<PathKey, Node>) -> Result<Self, String> {
        if !nodes.contains_key("/") {
            return Err("the root node is missing".into());
        }
        // Siblings mostly come one after another in path order (a subtree
        // between two of them breaks the run), so one cached parent serves
        // a whole run: one lookup per run, not per node.
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        let mut run: Option<(&str, u64)> = None;
        let mut ephemerals = BTreeSet::new();
        for (path, node) in &nodes {
            if let Some(parent_path) = parent(path) {
                match &mut run {
                    Some((cached, count)) if *cached == parent_path => *count += 1,
                    _ => {
                        let Some(parent_node) = nodes.get(parent_path) else {
                            return Err(format!("node {path} has no parent"));
                        };
                        if parent_node.meta().ephemeral_owner != 0 {
                            return Err(format!("node {path} has an ephemeral parent"));
                        }
                        if let Some((cached, count)) = run.replace((parent_path, 1)) {
                            *counts.entry(cached).or_default() += count;
                        }
                    }
                }
            }
            let owner = node.meta().ephemeral_owner;
            if owner != 0 {
                ephemerals.insert((owner, path.clone()));
            }
        }
        if let Some((cached, count)) = run {
            *counts.entry(cached).or_default() += count;
        }
        // Both in path order: walk them together.
        let mut counted = counts.into_iter().peekable();
        for (path, node) in &nodes {
            let children = match counted.peek() {
                Some((parent_path, count)) if *parent_path == &**path => {
                    let count = *count;
                    counted.next();
                    count
                }
                _ => 0,
            };
            let recorded = node.meta().children_count;
            if recorded != children {
                return Err(format!(
                    "node {path} records {recorded} children but has {children}"
                ));
            }
        }
        drop(counted);
        Ok(Tree {
            nodes,
            ephemerals,
            dirty: DirtyKeys::default(),
        })
    }

    /// All nodes in path order.
    pub fn nodes(&self) -> &BTreeMap<PathKey, Node> {
        &self.nodes
    }

    /// The nodes changed since the last call, in (creating revision, path)
    /// order.
    pub fn take_dirty(&mut self) -> Vec<NodeMark> {
        self.dirty.take()
    }

    /// Marks every node changed (a new state saves all of them).
    pub fn mark_all_dirty(&mut self) {
        for (path, node) in &self.nodes {
            self.dirty.mark((node.created_revision(), path.clone()));
        }
    }

    /// Number of nodes, the root included.
    pub fn len(&self) -> u64 {
        self.nodes.len() as u64
    }

    /// The node at a path.
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    /// The owner of every ephemeral node (a session once per node it owns).
    pub fn ephemeral_owners(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.ephemerals.iter().map(|(owner, _)| *owner)
    }

    /// The ephemeral nodes of a session, in path order.
    pub fn ephemerals_of(&self, session: SessionId) -> Vec<PathKey> {
        let start: (SessionId, PathKey) = (session, PathKey::default());
        self.ephemerals
            .range(start..)
            .take_while(|(owner, _)| *owner == session)
            .map(|(_, path)| path.clone())
            .collect()
    }

    /// The names of a node's children, sorted bytewise.
    ///
    /// Scans the paths below the node in order and, on meeting a grandchild,
    /// seeks past that child's whole subtree: every path starting with
    /// `child + "/"` sorts below `child + "0"` ('0' follows '/').
    pub fn children(&self, path: &str) -> Vec<String> {
        let prefix = descendant_prefix(path);
        let mut names = Vec::new();
        let mut lower = prefix.clone();
        loop {
            let mut range = self
                .nodes
                .range::<str, _>((Bound::Included(lower.as_str()), Bound::Unbounded));
            lower = loop {
                let Some((key, _)) = range.next() else {
                    return names;
                };
                let Some(rest) = key.strip_prefix(prefix.as_str()) else {
                    return names;
                };
                if rest.is_empty() {
                    continue;
                }
                match rest.find('/') {
                    None => names.push(rest.to_owned()),
                    Some(end) => break format!("{prefix}{}0", &rest[..end]),
                }
            };
        }
    }

    /// Creates a node; returns its full path.
    ///
    /// # Errors
    /// `BadArgument` (bad path), `DataTooLarge`, `NodeExists`, `NoNode` (no
    /// parent), `NoChildrenForEphemerals`.
    pub fn create(
        &mut self,
        config: &StateConfig,
        path: &str,
        data: &[u8],
        mode: CreateMode,
        owner: SessionId,
        fx: &mut Effects<'_>,
    ) -> Result<String, Error> {
        // A sequential create names a prefix that may end in '/' ("/q/" gives
        // "/q/0000000001"), so for it the full path is what must be valid.
        let parent_path = if mode.is_sequential() {
            if !path.starts_with('/') {
                validate_path(path, config.path_bytes_max)?;
            }
            let parent_path = match path.rfind('/') {
                Some(0) | None => "/",
                Some(end) => &path[..end],
            };
            validate_path(parent_path, config.path_bytes_max)?;
            parent_path
        } else {
            validate_path(path, config.path_bytes_max)?;
            if path == "/" {
                return Err(Error::NodeExists { path: path.into() });
            }
            parent(path).unwrap_or("/")
        };
        check_data(config, data)?;
        let Some(parent_node) = self.nodes.get(parent_path) else {
            return Err(Error::NoNode {
                path: parent_path.into(),
            });
        };
        if parent_node.meta().ephemeral_owner != 0 {
            return Err(Error::NoChildrenForEphemerals {
                path: parent_path.into(),
            });
        }
        let full_path = if mode.is_sequential() {
            let full = format!("{path}{:010}", parent_node.meta().child_version);
            validate_path(&full, config.path_bytes_max)?;
            full
        } else {
            path.to_owned()
        };
        // One search both checks that the node is new and inserts it.
        let vacant = match self.nodes.entry(PathKey::from(full_path.as_str())) {
            btree_map::Entry::Occupied(_) => return Err(Error::NodeExists { path: full_path }),
            btree_map::Entry::Vacant(vacant) => vacant,
        };
        // Validated: from here on nothing fails.
        let owner = if mode.is_ephemeral() { owner } else { 0 };
        let key = vacant.key().clone();
        let meta = Meta {
            created_revision: fx.revision,
            modified_revision: fx.revision,
            created_time_ms: fx.now_ms,
            modified_time_ms: fx.now_ms,
            version: 0,
            child_version: 0,
            ephemeral_owner: owner,
            child_modified_revision: fx.revision,
            children_count: 0,
        };
        if owner != 0 {
            self.ephemerals.insert((owner, key.clone()));
        }
        vacant.insert(Node::new(meta, data));
        fx.record(|| Undo::Inserted(key.clone()));
        self.dirty.mark((fx.revision, key));
        self.touch_parent(parent_path, 1, fx);
        fx.event(&full_path, EventType::NodeCreated);
        fx.event(parent_path, EventType::NodeChildrenChanged);
        Ok(full_path)
    }

    /// Deletes a childless node.
    ///
    /// # Errors
    /// `BadArgument` (bad path, or the root), `NoNode`, `BadVersion`, `NotEmpty`.
    pub fn delete(
        &mut self,
        config: &StateConfig,
        path: &str,
        expected_version: Option<u64>,
        fx: &mut Effects<'_>,
    ) -> Result<(), Error> {
        validate_path(path, config.path_bytes_max)?;
        if path == "/" {
            return Err(Error::bad_argument("the root node / cannot be deleted"));
        }
        let node = self.node_at_version(path, expected_version)?;
        if node.meta().children_count != 0 {
            return Err(Error::NotEmpty { path: path.into() });
        }
        self.remove_node(path, fx);
        Ok(())
    }

    /// Removes a node known to exist and to have no children.
    pub fn remove_node(&mut self, path: &str, fx: &mut Effects<'_>) {
        let Some((key, node)) = self.nodes.remove_entry(path) else {
            return;
        };
        let meta = node.meta();
        assert_eq!(meta.children_count, 0, "removing {path} with children");
        if meta.ephemeral_owner != 0 {
            self.ephemerals.remove(&(meta.ephemeral_owner, key.clone()));
        }
        self.dirty.mark((meta.created_revision, key.clone()));
        fx.record(|| Undo::Removed(key, node));
        let parent_path = parent(path).unwrap_or("/");
        self.touch_parent(parent_path, -1, fx);
        fx.event(path, EventType::NodeDeleted);
        fx.event(parent_path, EventType::NodeChildrenChanged);
    }

    /// Replaces a node's data; returns its new stat.
    ///
    /// # Errors
    /// `BadArgument` (bad path), `DataTooLarge`, `NoNode`, `BadVersion`.
    pub fn set(
        &mut self,
        config: &StateConfig,
        path: &str,
        data: &[u8],
        expected_version: Option<u64>,
        fx: &mut Effects<'_>,
    ) -> Result<Stat, Error> {
        validate_path(path, config.path_bytes_max)?;
        check_data(config, data)?;
        self.node_at_version(path, expected_version)?;
        let Some(node) = self.nodes.get_mut(path) else {
            return Err(Error::NoNode { path: path.into() });
        };
        let mut meta = node.meta();
        meta.version += 1;
        meta.modified_revision = fx.revision;
        meta.modified_time_ms = fx.now_ms;
        let old = std::mem::replace(node, Node::new(meta, data));
        let stat = node.stat();
        self.dirty
            .mark((meta.created_revision, PathKey::from(path)));
        fx.record(|| Undo::Replaced(PathKey::from(path), old));
        fx.event(path, EventType::NodeDataChanged);
        Ok(stat)
    }

    /// The node at `path`, if its version is `expected_version` (when given).
    ///
    /// # Errors
    /// `BadArgument` (bad path), `NoNode`, `BadVersion`.
    pub fn check(
        &self,
        config: &StateConfig,
        path: &str,
        expected_version: Option<u64>,
    ) -> Result<&Node, Error> {
        validate_path(path, config.path_bytes_max)?;
        self.node_at_version(path, expected_version)
    }

    fn node_at_version(&self, path: &str, expected_version: Option<u64>) -> Result<&Node, Error> {
        let Some(node) = self.nodes.get(path) else {
            return Err(Error::NoNode { path: path.into() });
        };
        match expected_version {
            Some(expected) if expected != node.meta().version => Err(Error::BadVersion {
                path: path.into(),
                expected_version: expected,
                actual_version: node.meta().version,
            }),
            _ => Ok(node),
        }
    }

    fn touch_parent(&mut self, parent_path: &str, delta: i64, fx: &mut Effects<'_>) {
        let Some(node) = self.nodes.get_mut(parent_path) else {
            panic!("parent {parent_path} vanished during a write");
        };
        let mut meta = node.meta();
        fx.record(|| Undo::Meta(PathKey::from(parent_path), meta));
        meta.children_count = meta.children_count.wrapping_add_signed(delta);
        meta.child_version += 1;
        meta.child_modified_revision = fx.revision;
        node.set_meta(&meta);
        self.dirty
            .mark((meta.created_revision, PathKey::from(parent_path)));
    }

    /// Undoes recorded changes, last first.
    pub fn rollback(&mut self, undo: Vec<Undo>) {
        for change in undo.into_iter().rev() {
            match change {
                Undo::Inserted(path) => {
                    if let Some(node) = self.nodes.remove(&path) {
                        let owner = node.meta().ephemeral_owner;
                        if owner != 0 {
                            self.ephemerals.remove(&(owner, path));
                        }
                    }
                }
                Undo::Removed(path, node) => {
                    let owner = node.meta().ephemeral_owner;
                    if owner != 0 {
                        self.ephemerals.insert((owner, path.clone()));
                    }
                    self.nodes.insert(path, node);
                }
                Undo::Meta(path, meta) => {
                    if let Some(node) = self.nodes.get_mut(&path) {
                        node.set_meta(&meta);
                    }
                }
                Undo::Replaced(path, node) => {
                    self.nodes.insert(path, node);
                }
            }
        }
    }
}

fn check_data(config: &StateConfig, data: &[u8]) -> Result<(), Error> {
    if data.len() as u64 > config.data_bytes_max {
        return Err(Error::DataTooLarge {
            size_bytes: data.len() as u64,
            max_bytes: config.data_bytes_max,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_shows_its_metadata_and_data_when_debugged() {
        let meta = Meta {
            version: 4,
            ..Meta::default()
        };
        let shown = format!("{:?}", Node::new(meta, b"v1"));
        assert!(shown.starts_with("Node {"), "{shown}");
        assert!(shown.contains("version: 4"), "{shown}");
        assert!(shown.contains("data: [118, 49]"), "{shown}");
    }
}
