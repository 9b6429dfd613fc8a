//! The state as records: what the replica saves as entries are applied,
//! streams to a lagging replica, and loads back at restart.
//!
//! Every node, session and lock is one record under a byte key in one of
//! the storage's [`StateTable`]s, and the scalars (revision, time, counters,
//! the cluster identity) are one small header. The state machine marks what
//! each command changes ([`DirtyKeys`]), and [`StateMachine::take_delta`]
//! turns the marks into the records to write or remove, so the cost of
//! saving is proportional to what changed, never to the size of the state.
//! [`StateLoader`] rebuilds a state from records in key order, checking the
//! same invariants as [`StateMachine::restore`].
//!
//! Encodings (postcard):
//! - node: key = the revision that created the node (8 bytes, big-endian),
//!   then the path's bytes; payload = the [`Meta`] then the data's raw bytes
//!   (the rest of the payload). Keyed in creation order, the nodes that a
//!   save adds go at the end of the table, in a few new pages, instead of
//!   into pages all over it (at 1,000,000 nodes that halved the cost of a
//!   save). A path deleted and created again is a new record;
//!   [`StateLoader`] checks that no path has two;
//! - session: key = the id, 8 bytes big-endian; payload = the session;
//! - lock: key = the path's bytes; payload = the lock's state;
//! - header: [`Scalars`].
//!
//! # What a node costs
//!
//! In memory (the replica's allocator is jemalloc), a node of path `p` and
//! data `d` costs:
//! - 40 bytes in a leaf of the namespace's B-tree: the path (a
//!   `path::PathKey`, which holds a path of up to 24 bytes inline, so that
//!   searches compare keys without following a pointer) and the node's
//!   pointer and length (`tree::Node`). Leaves hold 11 entries in a
//!   512-byte block; they are packed full after a load (about 48 bytes a
//!   node with the branch nodes) and about two-thirds full after random
//!   inserts (about 70);
//! - a heap block for the path only if it is longer than 24 bytes;
//! - one heap block for 72 bytes of metadata and the data, rounded up to
//!   the allocator's size class (100 bytes of data take 192).
//!
//! So a node with a 20-byte path and 100 bytes of data costs about 262
//! bytes (240 once loaded), and 1,000,000 of them about 262 MB. The rest of
//! a replica's memory is redb's page cache (32 MiB at most), the retained
//! log, the event history, the clients' buffers (each bounded by a limit)
//! and memory freed but not yet returned to the system (jemalloc returns
//! it after a second, see `.cargo/config.toml`): measured with
//! `synod bench fill`, a replica holding 1,000,000 such nodes is resident
//! in 303-390 MB (the least on a replica that loaded a packed tree).
//!
//! On disk, the record is the path, about 30 bytes of encoded metadata, the
//! data and a 4-byte checksum, in redb's B-tree pages (at 1,000,000 nodes a
//! data directory holds about 300 MB, log included).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use synod_paxos::{Membership, Slot};
use synod_proto::Revision;

use super::lock::{LockState, LockTable};
use super::path::{validate_path, PathKey};
use super::session::Session;
use super::tree::{Meta, Node, Tree};
use super::{StateConfig, StateMachine};
use crate::storage::{SavedStateHeader, StateDelta, StateRecordRef, StateTable};

/// Keys changed since they were last taken. Bookkeeping, not state: any
/// two compare equal, so that a state compares by content alone.
///
/// Marks are appended (a key marked twice in a row is kept once) and sorted
/// only when taken: marking is on the apply path of every command, and a
/// push costs less than a search of an ordered set. Between two takes (one
/// applied batch) the list holds at most a few marks per command.
#[derive(Debug, Clone, Default)]
pub(crate) struct DirtyKeys<K: Ord>(Vec<K>);

impl<K: Ord> PartialEq for DirtyKeys<K> {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

impl<K: Ord> Eq for DirtyKeys<K> {}

impl<K: Ord> DirtyKeys<K> {
    /// Marks a key changed.
    pub fn mark(&mut self, key: impl Into<K>) {
        let key = key.into();
        if self.0.last() != Some(&key) {
            self.0.push(key);
        }
    }

    /// The keys marked so far, in order and each once; none are marked
    /// after.
    pub fn take(&mut self) -> Vec<K> {
        let mut keys = std::mem::take(&mut self.0);
        keys.sort_unstable();
        keys.dedup();
        keys
    }
}

/// The scalars of a state, saved as the header of its records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Scalars {
    pub revision: u64,
    pub now_ms: u64,
    pub next_session_id: u64,
    pub next_lock_generation: u64,
    pub cluster_identity: Option<u128>,
    pub confirmed_members: Vec<u64>,
}

/// The revision, the leader-stamped time and the cluster identity of a
/// saved state's header, without loading the state.
///
/// # Errors
/// The header does not decode.
pub fn header_scalars(scalars: &[u8]) -> Result<(u64, u64, Option<u128>), LoadError> {
    let scalars: Scalars =
        decode(scalars).map_err(|error| format!("the state header does not decode: {error}"))?;
    Ok((scalars.revision, scalars.now_ms, scalars.cluster_identity))
}

/// Why records could not be turned back into a state.
pub type LoadError = String;

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("encoding a record into memory cannot fail")
}

/// A node's payload: its metadata, then its data.
fn node_payload(node: &Node) -> Vec<u8> {
    let mut payload = postcard::to_extend(&node.meta(), Vec::with_capacity(40 + node.data().len()))
        .expect("encoding a record into memory cannot fail");
    payload.extend_from_slice(node.data());
    payload
}

/// A node's record key: the revision that created it (8 bytes, big-endian),
/// then its path.
fn node_record_key(created: Revision, path: &str) -> Box<[u8]> {
    let mut key = Vec::with_capacity(8 + path.len());
    key.extend_from_slice(&created.to_be_bytes());
    key.extend_from_slice(path.as_bytes());
    key.into_boxed_slice()
}

/// The revision and path of a node's record key.
fn parse_node_record_key(key: &[u8]) -> Result<(Revision, &str), LoadError> {
    let Some((created, path)) = key.split_first_chunk::<8>() else {
        return Err(format!("a node record key of {} bytes", key.len()));
    };
    let path = std::str::from_utf8(path).map_err(|_| "a node path is not UTF-8".to_string())?;
    Ok((Revision::from_be_bytes(*created), path))
}

/// A saved session record with its secret zeroed: what a backup carries.
/// A restored cluster closes every session, so nothing needs the secrets,
/// and whoever holds a backup must not be able to resume a live session
/// with one (resuming needs the owner's certificate as well, but a secret
/// is a secret).
///
/// # Errors
/// The record does not decode as a session.
pub fn session_record_without_secret(value: &[u8]) -> Result<Vec<u8>, LoadError> {
    let mut session: Session =
        decode(value).map_err(|error| format!("a session record does not decode: {error}"))?;
    session.secret = 0;
    Ok(encode(&session))
}

fn session_key(session: u64) -> Box<[u8]> {
    Box::from(session.to_be_bytes())
}

impl StateMachine {
    /// The scalars, encoded as a saved state's header.
    pub fn encode_scalars(&self) -> Vec<u8> {
        let (_, next_lock_generation) = self.locks.parts();
        encode(&Scalars {
            revision: self.revision,
            now_ms: self.now_ms,
            next_session_id: self.next_session_id,
            next_lock_generation,
            cluster_identity: self.cluster_identity,
            confirmed_members: self.confirmed_members.iter().copied().collect(),
        })
    }

    /// What changed since the last call, as records to write or remove,
    /// with the header of the state as it now is: applied through
    /// `through`, with `membership` in force. Costs what changed.
    pub fn take_delta(&mut self, through: Slot, membership: &Membership) -> StateDelta {
        let nodes = self.tree.take_dirty();
        let sessions = self.dirty_sessions.take();
        let locks = self.locks.take_dirty();
        // In table then key order, so the map below is built in one pass.
        let mut changes = Vec::with_capacity(nodes.len() + sessions.len() + locks.len());
        for (created, path) in nodes {
            // The path may since hold another node (deleted and created
            // again), saved under its own record.
            let value = self
                .tree
                .get(&path)
                .filter(|node| node.created_revision() == created)
                .map(node_payload);
            changes.push(((StateTable::Nodes, node_record_key(created, &path)), value));
        }
        for session in sessions {
            let value = self.sessions.get(&session).map(encode);
            changes.push(((StateTable::Sessions, session_key(session)), value));
        }
        for path in locks {
            let value = self.locks.get(&path).map(encode);
            changes.push(((StateTable::Locks, Box::from(path.as_bytes())), value));
        }
        StateDelta {
            header: Some(SavedStateHeader {
                through,
                membership: membership.clone(),
                scalars: self.encode_scalars(),
            }),
            changes: changes.into_iter().collect(),
        }
    }

    /// Marks every record changed, so that the next delta holds the whole
    /// state (for tests, and for a state that must be saved anew).
    pub fn mark_all_dirty(&mut self) {
        self.tree.mark_all_dirty();
        for session in self.sessions.keys() {
            self.dirty_sessions.mark(*session);
        }
        self.locks.mark_all_dirty();
    }
}

/// How many decoded nodes the loader gathers before it builds them into a
/// segment of the namespace's tree.
const LOAD_BATCH_NODES: usize = 1 << 16;

/// Decodes node records, which must come in key order, into batches of
/// nodes sorted by path, each path checked. A [`StateLoader`] has one, and
/// a restart runs one on the thread that reads the records, so that
/// decoding and sorting overlap with building the tree
/// ([`StateLoader::take_nodes`]).
pub struct NodeBatcher {
    path_bytes_max: u64,
    batch: Vec<(PathKey, Node)>,
    /// The key of the last record taken.
    last_key: Vec<u8>,
}

/// Nodes sorted by path, no path twice: a batch from a [`NodeBatcher`].
pub struct SortedNodes(Vec<(PathKey, Node)>);

impl NodeBatcher {
    /// A batcher for paths of at most `path_bytes_max` bytes.
    pub fn new(path_bytes_max: u64) -> NodeBatcher {
        NodeBatcher {
            path_bytes_max,
            batch: Vec::with_capacity(LOAD_BATCH_NODES),
            last_key: Vec::new(),
        }
    }

    /// Takes one node record; returns the batch once it is full.
    ///
    /// # Errors
    /// A message saying why the record does not decode, is out of order,
    /// or names a path twice within the batch.
    pub fn record(&mut self, key: &[u8], value: &[u8]) -> Result<Option<SortedNodes>, LoadError> {
        let (created, path) = parse_node_record_key(key)?;
        if !self.last_key.is_empty() && *self.last_key >= *key {
            return Err(format!("node {path} is out of order"));
        }
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
        validate_path(path, self.path_bytes_max)
            .map_err(|error| format!("node {path}: {error}"))?;
        let (meta, data) = postcard::take_from_bytes::<Meta>(value)
            .map_err(|error| format!("node {path} does not decode: {error}"))?;
        if meta.created_revision != created {
            return Err(format!(
                "node {path} is saved under revision {created} but was created at {}",
                meta.created_revision
            ));
        }
        self.batch
            .push((PathKey::from(path), Node::new(meta, data)));
        if self.batch.len() >= LOAD_BATCH_NODES {
            return self.take().map(Some);
        }
        Ok(None)
    }

    /// The nodes taken since the last full batch, if any.
    ///
    /// # Errors
    /// A path named twice within them.
    pub fn finish(mut self) -> Result<Option<SortedNodes>, LoadError> {
        if self.batch.is_empty() {
            return Ok(None);
        }
        self.take().map(Some)
    }

    fn take(&mut self) -> Result<SortedNodes, LoadError> {
        let mut batch = std::mem::replace(&mut self.batch, Vec::with_capacity(LOAD_BATCH_NODES));
        batch.sort_unstable_by(|(left, _), (right, _)| left.cmp(right));
        if let Some(pair) = batch.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            return Err(format!("node {} is saved twice", pair[0].0));
        }
        Ok(SortedNodes(batch))
    }
}

/// Rebuilds a state from its records, which must come in table then key
/// order (as storage and snapshot streams give them), then its header.
pub struct StateLoader {
    config: StateConfig,
    /// Segments of the tree, each a B-tree packed full; their sizes at
    /// least halve from one to the next (a binary counter), so merging them
    /// moves each node O(log n) times and never holds a second copy of the
    /// tree.
    segments: Vec<BTreeMap<PathKey, Node>>,
    /// Decodes the node records taken with [`StateLoader::record`].
    nodes: Option<NodeBatcher>,
    sessions: BTreeMap<u64, Session>,
    locks: BTreeMap<PathKey, LockState>,
    records: u64,
}

impl StateLoader {
    /// A loader for a state with these limits.
    pub fn new(config: StateConfig) -> StateLoader {
        StateLoader {
            nodes: Some(NodeBatcher::new(config.path_bytes_max)),
            config,
            segments: Vec::new(),
            sessions: BTreeMap::new(),
            locks: BTreeMap::new(),
            records: 0,
        }
    }

    /// Records taken so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Takes one record.
    ///
    /// # Errors
    /// A message saying why the record does not decode, or is out of order.
    pub fn record(&mut self, record: StateRecordRef<'_>) -> Result<(), LoadError> {
        self.records += 1;
        match record.table {
            StateTable::Nodes => {
                let Some(nodes) = self.nodes.as_mut() else {
                    return Err("node records after nodes taken in batches".into());
                };
                if let Some(batch) = nodes.record(record.key, record.value)? {
                    self.fold(batch)?;
                }
            }
            StateTable::Sessions => {
                let id: [u8; 8] = record
                    .key
                    .try_into()
                    .map_err(|_| format!("a session key of {} bytes", record.key.len()))?;
                let id = u64::from_be_bytes(id);
                let session: Session = decode(record.value)
                    .map_err(|error| format!("session {id} does not decode: {error}"))?;
                if self
                    .sessions
                    .last_key_value()
                    .is_some_and(|(&last, _)| last >= id)
                {
                    return Err(format!("session {id} is out of order"));
                }
                self.sessions.insert(id, session);
            }
            StateTable::Locks => {
                let path = std::str::from_utf8(record.key)
                    .map_err(|_| "a lock path is not UTF-8".to_string())?;
                let lock: LockState = decode(record.value)
                    .map_err(|error| format!("lock {path} does not decode: {error}"))?;
                if self
                    .locks
                    .last_key_value()
                    .is_some_and(|(last, _)| &**last >= path)
                {
                    return Err(format!("lock {path} is out of order"));
                }
                self.locks.insert(PathKey::from(path), lock);
            }
        }
        Ok(())
    }

    /// Takes a batch of nodes decoded elsewhere (by a [`NodeBatcher`] fed
    /// the node records in key order); node records must then not be given
    /// to [`StateLoader::record`] too.
    ///
    /// # Errors
    /// A path that an earlier batch holds too.
    pub fn take_nodes(&mut self, nodes: SortedNodes) -> Result<(), LoadError> {
        self.records += nodes.0.len() as u64;
        if self
            .nodes
            .take()
            .is_some_and(|batcher| !batcher.batch.is_empty())
        {
            return Err("node records taken both one by one and in batches".into());
        }
        self.fold(nodes)
    }

    /// Builds a sorted batch into a new segment, then merges segments of
    /// similar size (a bulk rebuild that packs the tree full and frees the
    /// merged ones as it goes).
    ///
    /// # Errors
    /// A path held by two records.
    fn fold(&mut self, nodes: SortedNodes) -> Result<(), LoadError> {
        let segment: BTreeMap<PathKey, Node> = nodes.0.into_iter().collect();
        self.segments.push(segment);
        while let [.., earlier, later] = &self.segments[..] {
            if earlier.len() > 2 * later.len() {
                break;
            }
            self.merge_last()?;
        }
        Ok(())
    }

    /// Merges the last segment into the one before it.
    ///
    /// # Errors
    /// A path held by a record in each.
    fn merge_last(&mut self) -> Result<(), LoadError> {
        let Some(mut later) = self.segments.pop() else {
            return Ok(());
        };
        let Some(earlier) = self.segments.last_mut() else {
            self.segments.push(later);
            return Ok(());
        };
        let expected = earlier.len() + later.len();
        earlier.append(&mut later);
        if earlier.len() != expected {
            return Err("a node is saved twice".into());
        }
        Ok(())
    }

    /// The state, once every record was taken, with the header's scalars.
    ///
    /// # Errors
    /// A message naming the first broken invariant (as
    /// [`StateMachine::restore`] checks them).
    pub fn finish(mut self, scalars: &[u8]) -> Result<StateMachine, LoadError> {
        if let Some(batch) = self
            .nodes
            .take()
            .map(NodeBatcher::finish)
            .transpose()?
            .flatten()
        {
            self.fold(batch)?;
        }
        while self.segments.len() > 1 {
            self.merge_last()?;
        }
        let nodes = self.segments.pop().unwrap_or_default();
        let scalars: Scalars = decode(scalars)
            .map_err(|error| format!("the state header does not decode: {error}"))?;
        let locks = LockTable::from_parts(self.locks, scalars.next_lock_generation)?;
        // The batcher checked every path.
        let tree = Tree::from_checked_nodes(nodes)?;
        let confirmed_members: BTreeSet<u64> = scalars.confirmed_members.iter().copied().collect();
        if confirmed_members.len() != scalars.confirmed_members.len()
            || !scalars.confirmed_members.is_sorted()
        {
            return Err("the confirmed members are not in strictly increasing order".into());
        }
        StateMachine::from_parts(
            self.config,
            super::snapshot::Parts {
                revision: scalars.revision,
                now_ms: scalars.now_ms,
                next_session_id: scalars.next_session_id,
                tree,
                sessions: self.sessions,
                locks,
                next_lock_generation: scalars.next_lock_generation,
                cluster_identity: scalars.cluster_identity,
                confirmed_members,
            },
        )
    }
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|error| error.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} bytes left over", rest.len()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node_record(created: Revision, path: &str, children_count: u64) -> (Box<[u8]>, Vec<u8>) {
        let meta = Meta {
            created_revision: created,
            children_count,
            ..Meta::default()
        };
        let node = Node::new(meta, b"data");
        (node_record_key(created, path), node_payload(&node))
    }

    fn load(records: &[(Box<[u8]>, Vec<u8>)]) -> Result<StateMachine, LoadError> {
        let mut loader = StateLoader::new(StateConfig::default());
        for (key, value) in records {
            loader.record(StateRecordRef {
                table: StateTable::Nodes,
                key,
                value,
            })?;
        }
        loader.finish(&scalars_at_revision(10))
    }

    /// The scalars of a small valid state at `revision`.
    fn scalars(revision: u64) -> Scalars {
        Scalars {
            revision,
            now_ms: 0,
            next_session_id: 1,
            next_lock_generation: 1,
            cluster_identity: None,
            confirmed_members: Vec::new(),
        }
    }

    fn scalars_at_revision(revision: u64) -> Vec<u8> {
        encode(&scalars(revision))
    }

    /// A loader that has taken the root and nothing else.
    fn loader_with_root() -> StateLoader {
        let mut loader = StateLoader::new(StateConfig::default());
        let (key, value) = node_record(0, "/", 0);
        loader
            .record(StateRecordRef {
                table: StateTable::Nodes,
                key: &key,
                value: &value,
            })
            .expect("the root");
        loader
    }

    /// Node records of `/n{first}` to `/n{last}` (created at their number),
    /// sorted as one batch of a [`NodeBatcher`].
    fn node_batch(numbers: std::ops::RangeInclusive<u64>) -> SortedNodes {
        let mut batcher = NodeBatcher::new(StateConfig::default().path_bytes_max);
        for number in numbers {
            let (key, value) = node_record(number, &format!("/n{number:03}"), 0);
            assert!(batcher
                .record(&key, &value)
                .expect("a valid node")
                .is_none());
        }
        batcher.finish().expect("no path twice").expect("a batch")
    }

    #[test]
    fn nodes_taken_in_batches_merge_into_one_tree_in_few_segments() {
        let (key, value) = node_record(0, "/", 80);
        let mut root = NodeBatcher::new(StateConfig::default().path_bytes_max);
        root.record(&key, &value).expect("the root");
        // Eight batches of ten: the segments stay a binary counter.
        let mut loader = StateLoader::new(StateConfig::default());
        loader
            .take_nodes(root.finish().expect("one node").expect("a batch"))
            .expect("the root");
        for batch in 0..8 {
            let first = 1 + batch * 10;
            loader
                .take_nodes(node_batch(first..=first + 9))
                .expect("new paths");
            assert!(
                loader.segments.len() <= 4,
                "{} segments after {} batches",
                loader.segments.len(),
                batch + 1
            );
        }
        assert_eq!(loader.records(), 81);
        let state = loader
            .finish(&scalars_at_revision(100))
            .expect("a valid state");
        assert_eq!(state.node_count(), 81);
        let paths: Vec<String> = state
            .tree
            .nodes()
            .keys()
            .map(|path| path.as_str().to_string())
            .collect();
        let mut sorted = paths.clone();
        sorted.sort();
        assert_eq!(paths, sorted);
        assert_eq!(paths[1], "/n001");
    }

    #[test]
    fn a_node_owned_by_a_session_that_is_not_open_is_refused() {
        let mut loader = StateLoader::new(StateConfig::default());
        let (root_key, root) = node_record(0, "/", 1);
        loader
            .record(StateRecordRef {
                table: StateTable::Nodes,
                key: &root_key,
                value: &root,
            })
            .expect("the root");
        let meta = Meta {
            created_revision: 3,
            ephemeral_owner: 5,
            ..Meta::default()
        };
        let node = Node::new(meta, b"held");
        let (key, value) = (node_record_key(3, "/held"), node_payload(&node));
        loader
            .record(StateRecordRef {
                table: StateTable::Nodes,
                key: &key,
                value: &value,
            })
            .expect("a well-formed record");
        let mut scalars = scalars(10);
        scalars.next_session_id = 6;
        let error = loader
            .finish(&encode(&scalars))
            .expect_err("owner not open");
        assert!(
            error
                .to_string()
                .contains("session 5 owns nodes or locks but is not open"),
            "{error}"
        );
    }

    #[test]
    fn a_segment_merges_into_one_at_most_twice_its_size() {
        let mut loader = StateLoader::new(StateConfig::default());
        let counts = |loader: &StateLoader| {
            loader
                .segments
                .iter()
                .map(BTreeMap::len)
                .collect::<Vec<_>>()
        };
        loader.take_nodes(node_batch(1..=15)).expect("new paths");
        loader.take_nodes(node_batch(16..=25)).expect("new paths");
        assert_eq!(counts(&loader), vec![25], "15 is at most twice 10: merged");
        loader.take_nodes(node_batch(26..=30)).expect("new paths");
        assert_eq!(
            counts(&loader),
            vec![25, 5],
            "25 is more than twice 5: apart"
        );
        loader.take_nodes(node_batch(31..=40)).expect("new paths");
        assert_eq!(counts(&loader), vec![40], "15 then 25 merge in turn");
    }

    #[test]
    fn a_path_in_two_batches_is_refused() {
        for (first, second) in [(1..=10, 5..=5), (1..=1, 1..=3)] {
            let mut loader = StateLoader::new(StateConfig::default());
            loader
                .take_nodes(node_batch(first))
                .expect("the first batch");
            let error = loader
                .take_nodes(node_batch(second))
                .and_then(|()| loader.finish(&scalars_at_revision(100)).map(|_| ()))
                .expect_err("a path twice");
            assert!(error.contains("saved twice"), "{error}");
        }
    }

    #[test]
    fn records_are_counted_however_they_come() {
        let mut loader = StateLoader::new(StateConfig::default());
        for (key, value) in [node_record(0, "/", 1), node_record(2, "/a", 0)] {
            loader
                .record(StateRecordRef {
                    table: StateTable::Nodes,
                    key: &key,
                    value: &value,
                })
                .expect("a valid node");
        }
        assert_eq!(loader.records(), 2);
        let error = loader
            .take_nodes(node_batch(5..=6))
            .expect_err("nodes both ways");
        assert!(error.contains("both one by one and in batches"), "{error}");
    }

    #[test]
    fn confirmed_members_out_of_order_or_twice_are_refused() {
        for members in [vec![2, 1], vec![1, 1], vec![1, 3, 2]] {
            let loader = loader_with_root();
            let scalars = encode(&Scalars {
                confirmed_members: members.clone(),
                ..scalars(1)
            });
            let error = loader.finish(&scalars).expect_err("refused");
            assert!(
                error.contains("strictly increasing"),
                "{members:?}: {error}"
            );
        }
    }

    #[test]
    fn counters_out_of_range_are_refused() {
        let good = scalars(1);
        let cases = [
            Scalars {
                revision: u64::MAX,
                ..good.clone()
            },
            Scalars {
                next_session_id: u64::MAX,
                ..good.clone()
            },
            Scalars {
                next_session_id: 0,
                ..good.clone()
            },
            Scalars {
                next_lock_generation: u64::MAX,
                ..good.clone()
            },
            Scalars {
                next_lock_generation: 0,
                ..good.clone()
            },
        ];
        for scalars in cases {
            let loader = loader_with_root();
            let error = loader.finish(&encode(&scalars)).expect_err("refused");
            assert!(error.contains("out of range"), "{scalars:?}: {error}");
        }
    }

    #[test]
    fn a_node_with_any_revision_past_the_states_is_refused() {
        let late = [
            Meta {
                created_revision: 11,
                ..Meta::default()
            },
            Meta {
                modified_revision: 11,
                ..Meta::default()
            },
            Meta {
                child_modified_revision: 11,
                ..Meta::default()
            },
        ];
        for meta in late {
            let node = Node::new(meta, b"data");
            let error = load(&[
                node_record(0, "/", 1),
                (
                    node_record_key(meta.created_revision, "/a"),
                    node_payload(&node),
                ),
            ])
            .expect_err("a revision after the state's");
            assert!(error.contains("revision after"), "{meta:?}: {error}");
        }
    }

    #[test]
    fn a_session_numbered_zero_is_refused() {
        let session = Session {
            timeout_ms: 10_000,
            remaining_ms: 10_000,
            checkpoint_time_ms: 0,
            last_sequence: 0,
            last_response: None,
            owner: "CN=app".into(),
            secret: 1,
        };
        let mut loader = loader_with_root();
        loader
            .record(StateRecordRef {
                table: StateTable::Sessions,
                key: &session_key(0),
                value: &encode(&session),
            })
            .expect("a session record");
        let scalars = encode(&Scalars {
            next_session_id: 5,
            ..scalars(1)
        });
        let error = loader.finish(&scalars).expect_err("session 0");
        assert!(
            error.contains("session identifier is out of range"),
            "{error}"
        );
    }

    #[test]
    fn a_backup_session_record_keeps_everything_but_the_secret() {
        let session = Session {
            timeout_ms: 10_000,
            remaining_ms: 7_000,
            checkpoint_time_ms: 123,
            last_sequence: 9,
            last_response: None,
            owner: "CN=app".into(),
            secret: 0xfeed,
        };
        let stripped = session_record_without_secret(&encode(&session)).expect("a session");
        let restored: Session = decode(&stripped).expect("still a session");
        assert_eq!(
            restored,
            Session {
                secret: 0,
                ..session
            }
        );
        let error = session_record_without_secret(b"\xff").expect_err("not a session");
        assert!(error.contains("does not decode"), "{error}");
    }

    #[test]
    fn a_header_gives_its_revision_time_and_cluster_identity() {
        let scalars = encode(&Scalars {
            revision: 42,
            now_ms: 1_700_000_000_123,
            next_session_id: 5,
            next_lock_generation: 6,
            cluster_identity: Some(0xfeed_beef),
            confirmed_members: vec![1, 2, 3],
        });
        assert_eq!(
            header_scalars(&scalars),
            Ok((42, 1_700_000_000_123, Some(0xfeed_beef)))
        );
        let error = header_scalars(&scalars[..3]).expect_err("a cut header");
        assert!(error.contains("does not decode"), "{error}");
    }

    #[test]
    fn nodes_load_from_creation_order_into_path_order() {
        let state = load(&[
            node_record(0, "/", 2),
            node_record(3, "/b", 0),
            node_record(5, "/a", 0),
        ])
        .expect("a valid state");
        let paths: Vec<&str> = state
            .tree
            .nodes()
            .keys()
            .map(|path| path.as_str())
            .collect();
        assert_eq!(paths, ["/", "/a", "/b"]);
    }

    #[test]
    fn a_node_saved_under_another_revision_than_its_own_is_refused() {
        let (key, _) = node_record(7, "/a", 0);
        let (_, value) = node_record(6, "/a", 0);
        let error = load(&[node_record(0, "/", 1), (key, value)]).expect_err("refused");
        assert!(error.contains("saved under revision 7"), "{error}");
    }

    #[test]
    fn a_path_saved_twice_is_refused() {
        let error = load(&[
            node_record(0, "/", 1),
            node_record(3, "/a", 0),
            node_record(5, "/a", 0),
        ])
        .expect_err("refused");
        assert!(error.contains("saved twice"), "{error}");
    }

    #[test]
    fn node_records_out_of_key_order_are_refused() {
        let error = load(&[
            node_record(0, "/", 2),
            node_record(5, "/a", 0),
            node_record(3, "/b", 0),
        ])
        .expect_err("refused");
        assert!(error.contains("out of order"), "{error}");
    }
}
