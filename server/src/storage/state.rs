//! The state machine's tables: saved incrementally as entries are applied,
//! loaded directly at restart, streamed to lagging replicas from a read
//! transaction, and replaced whole by a snapshot installed from a peer.
//!
//! The storage layer does not know what the records mean. The state machine
//! (`crate::state::records`) encodes each node, session and lock as one
//! record under a byte key in one of three [`StateTable`]s, plus a small
//! header of scalars (revision, time, counters). Here those records are
//! sealed (CRC-32 over the table, key and payload), written, verified on
//! every read and handed back in key order.
//!
//! # Two sets of tables
//!
//! There are two sets of state tables, `0` and `1`. The meta key
//! `state_live` names the live one; its header (the slot it covers, the
//! membership in force, the scalars) is the meta value `state.<set>`.
//! [`StateWrite::Delta`] changes the live set in place. Installing a
//! snapshot writes the *other* set ([`StateWrite::StageBegin`] empties it,
//! [`StateWrite::Stage`] fills it, over as many commits as it takes), and
//! [`StateWrite::StageActivate`] makes it live in one commit and drops the
//! old set. A crash at any point leaves the old live set or the new one,
//! never a mix; a half-staged set is never read and is emptied by the next
//! `StageBegin`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use serde::{Deserialize, Serialize};
use synod_paxos::{Membership, Slot};

use super::codec::{meta_domain, unseal, unseal_bytes, valid_membership, META};
use super::{corrupt, redb_error, Result};

/// The three tables of state records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum StateTable {
    /// Nodes of the namespace, keyed by path.
    Nodes,
    /// Open sessions, keyed by id (8 bytes, big-endian).
    Sessions,
    /// Locks and elections, keyed by path.
    Locks,
}

impl StateTable {
    /// Every table, in the order they are read and streamed.
    pub const ALL: [StateTable; 3] = [StateTable::Nodes, StateTable::Sessions, StateTable::Locks];

    fn name(self) -> &'static str {
        match self {
            StateTable::Nodes => "nodes",
            StateTable::Sessions => "sessions",
            StateTable::Locks => "locks",
        }
    }

    pub(crate) fn definition(
        self,
        set: u8,
    ) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
        let name = match (self, set) {
            (StateTable::Nodes, 0) => "synod_state_nodes.0",
            (StateTable::Nodes, _) => "synod_state_nodes.1",
            (StateTable::Sessions, 0) => "synod_state_sessions.0",
            (StateTable::Sessions, _) => "synod_state_sessions.1",
            (StateTable::Locks, 0) => "synod_state_locks.0",
            (StateTable::Locks, _) => "synod_state_locks.1",
        };
        TableDefinition::new(name)
    }
}

/// The checksum domain of a state record.
pub(crate) fn record_domain(table: StateTable, key: &[u8]) -> Vec<u8> {
    let mut domain = b"synod/state/".to_vec();
    domain.extend_from_slice(table.name().as_bytes());
    domain.push(b'/');
    domain.extend_from_slice(key);
    domain
}

/// The meta key naming the live set.
pub(crate) const KEY_STATE_LIVE: &str = "state_live";

/// The meta key of a set's header.
pub(crate) fn header_key(set: u8) -> &'static str {
    if set == 0 {
        "state.0"
    } else {
        "state.1"
    }
}

/// What a saved state covers: the slot, the membership in force after it,
/// and the state machine's scalars (opaque here).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedStateHeader {
    /// Every slot up to and including this one is applied in the state.
    pub through: Slot,
    /// The membership in force after `through`.
    pub membership: Membership,
    /// The state machine's scalars, as it encoded them.
    pub scalars: Vec<u8>,
}

/// One record of a saved state, as read back (CRC verified).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateRecordRef<'a> {
    /// Its table.
    pub table: StateTable,
    /// Its key.
    pub key: &'a [u8],
    /// Its payload, as the state machine encoded it.
    pub value: &'a [u8],
}

/// A record's place: its table and key.
pub type StateKey = (StateTable, Box<[u8]>);

/// Changes to the live state, bringing it to `through`: every record
/// written or removed since the last delta, and the new header. Later
/// changes to a key replace earlier ones ([`StateDelta::merge`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateDelta {
    /// The header after the changes (`None` only for an empty delta).
    pub header: Option<SavedStateHeader>,
    /// Each changed record: its new payload, or `None` when removed.
    pub changes: BTreeMap<StateKey, Option<Vec<u8>>>,
}

impl StateDelta {
    /// The slot the delta brings the state to, if it has a header.
    pub fn through(&self) -> Option<Slot> {
        self.header.as_ref().map(|header| header.through)
    }

    /// Folds deltas, earliest first, into one: the last header, and for each
    /// key its latest change.
    ///
    /// One sort of all their changes (a stable merge of the already sorted
    /// runs), not a search of a growing map per change: a writer folds the
    /// deltas of a whole flush interval, many thousands of changes.
    pub fn merged(deltas: Vec<StateDelta>) -> StateDelta {
        let header = deltas.iter().rev().find_map(|delta| delta.header.clone());
        let count = deltas.iter().map(|delta| delta.changes.len()).sum();
        let mut changes: Vec<(StateKey, Option<Vec<u8>>)> = Vec::with_capacity(count);
        // Latest first, so that after the stable sort the first change of
        // each key is its latest, and the dedup keeps it.
        for delta in deltas.into_iter().rev() {
            changes.extend(delta.changes);
        }
        changes.sort_by(|(a, _), (b, _)| a.cmp(b));
        changes.dedup_by(|(later_in_order, _), (kept, _)| later_in_order == kept);
        StateDelta {
            header,
            changes: changes.into_iter().collect(),
        }
    }

    /// Roughly how many bytes the delta holds (keys and payloads).
    pub fn bytes(&self) -> u64 {
        self.changes
            .iter()
            .map(|((_, key), value)| (key.len() + value.as_ref().map_or(0, Vec::len) + 16) as u64)
            .sum::<u64>()
            + self
                .header
                .as_ref()
                .map_or(0, |header| header.scalars.len() as u64)
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.header.is_none() && self.changes.is_empty()
    }
}

/// A write to the state tables, made durable in order with the log's
/// batches by [`super::Storage::commit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateWrite {
    /// Apply changes to the live state (creating it, as set 0, if there is
    /// none yet).
    Delta(StateDelta),
    /// Empty the staging set and start staging a state installed from a
    /// peer.
    StageBegin,
    /// Records of the state being staged (payloads as the state machine
    /// encoded them).
    Stage(Vec<(StateTable, Box<[u8]>, Vec<u8>)>),
    /// Make the staged state live, with this header, and drop the old one.
    StageActivate(SavedStateHeader),
}

/// Where a saved state's records can be read from another thread while the
/// writer goes on: a lagging replica's snapshot is streamed from one read
/// transaction, so it is one consistent state however long it takes.
#[derive(Clone, Debug)]
pub struct StateReader {
    pub(crate) database: Arc<Database>,
    pub(crate) path: PathBuf,
}

impl StateReader {
    /// Reads the live state in one read transaction: returns its header
    /// (`None` when no state is saved yet) after calling `visit` on each
    /// record in table then key order. `visit` may stop the read early by
    /// returning an error, which is returned.
    ///
    /// # Errors
    /// [`super::StorageError::Corrupt`] for a damaged record or header
    /// (and for an error from `visit`); redb errors.
    pub fn read(
        &self,
        header_seen: &mut dyn FnMut(&SavedStateHeader) -> std::result::Result<(), String>,
        visit: &mut dyn FnMut(StateRecordRef<'_>) -> std::result::Result<(), String>,
    ) -> Result<Option<SavedStateHeader>> {
        super::guard_panics(&self.path, || {
            let transaction = self
                .database
                .begin_read()
                .map_err(|error| redb_error(&self.path, "begin a read transaction", error))?;
            read_state(&transaction, &self.path, header_seen, visit)
        })
    }
}

/// The live set and its header, read from meta.
pub(crate) fn live_set(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    path: &Path,
) -> Result<Option<(u8, SavedStateHeader)>> {
    let Some(set) = super::get_meta::<u8>(meta, path, KEY_STATE_LIVE)? else {
        return Ok(None);
    };
    if set > 1 {
        return Err(corrupt(
            path,
            format!("meta {KEY_STATE_LIVE:?} names set {set}"),
        ));
    }
    let key = header_key(set);
    let Some(sealed) = meta
        .get(key)
        .map_err(|error| redb_error(path, "read a meta value", error))?
    else {
        return Err(corrupt(
            path,
            format!("the live state set {set} has no header"),
        ));
    };
    let header: SavedStateHeader = unseal(&meta_domain(key), sealed.value())
        .map_err(|detail| corrupt(path, format!("meta {key:?}: {detail}")))?;
    valid_membership(&header.membership)
        .map_err(|detail| corrupt(path, format!("meta {key:?}: {detail}")))?;
    Ok(Some((set, header)))
}

/// Reads the live state of a read transaction (see [`StateReader::read`]).
pub(crate) fn read_state(
    transaction: &ReadTransaction,
    path: &Path,
    header_seen: &mut dyn FnMut(&SavedStateHeader) -> std::result::Result<(), String>,
    visit: &mut dyn FnMut(StateRecordRef<'_>) -> std::result::Result<(), String>,
) -> Result<Option<SavedStateHeader>> {
    let meta = transaction
        .open_table(META)
        .map_err(|error| redb_error(path, "open the meta table", error))?;
    let Some((set, header)) = live_set(&meta, path)? else {
        return Ok(None);
    };
    header_seen(&header).map_err(|detail| corrupt(path, format!("state header: {detail}")))?;
    for table in StateTable::ALL {
        // A live set always has all three tables (its first delta, or its
        // activation, creates them): one missing was lost to damage.
        let records = match transaction.open_table(table.definition(set)) {
            Ok(records) => records,
            Err(redb::TableError::TableDoesNotExist(_)) => {
                return Err(corrupt(
                    path,
                    format!("the live state set {set} has no {} table", table.name()),
                ))
            }
            Err(error) => return Err(redb_error(path, "open a state table", error)),
        };
        let range = records
            .range::<&[u8]>(..)
            .map_err(|error| redb_error(path, "read the state", error))?;
        let mut order = KeyOrder::new(path, table.name());
        for entry in range {
            let (key, value) = entry.map_err(|error| redb_error(path, "read the state", error))?;
            let key = key.value();
            order.next(key)?;
            let payload =
                unseal_bytes(&record_domain(table, key), value.value()).map_err(|detail| {
                    corrupt(
                        path,
                        format!("state {} record {:?}: {detail}", table.name(), lossy(key)),
                    )
                })?;
            visit(StateRecordRef {
                table,
                key,
                value: payload,
            })
            .map_err(|detail| {
                corrupt(
                    path,
                    format!("state {} record {:?}: {detail}", table.name(), lossy(key)),
                )
            })?;
        }
        order.finish(&records)?;
    }
    Ok(Some(header))
}

/// Checks a full read of a table against redb's own account of it. Every
/// record's CRC proves the record, not that the read saw all of them: a
/// damaged page can hide some (a lower entry count) or show a subtree twice
/// (a wrong child pointer). So the keys must come strictly in order, and
/// their number must be the length redb keeps in the table's header.
pub(crate) struct KeyOrder<'a> {
    path: &'a Path,
    table: &'a str,
    previous: Option<Vec<u8>>,
    seen: u64,
}

impl<'a> KeyOrder<'a> {
    /// Starts the read of `table` of the database at `path`.
    pub(crate) fn new(path: &'a Path, table: &'a str) -> Self {
        KeyOrder {
            path,
            table,
            previous: None,
            seen: 0,
        }
    }

    /// Takes the next key read.
    pub(crate) fn next(&mut self, key: &[u8]) -> Result<()> {
        if let Some(previous) = &mut self.previous {
            if key <= previous.as_slice() {
                return Err(corrupt(
                    self.path,
                    format!(
                        "the {} table gives key {:?} after {:?}: its pages are damaged",
                        self.table,
                        lossy(key),
                        lossy(previous)
                    ),
                ));
            }
            previous.clear();
            previous.extend_from_slice(key);
        } else {
            self.previous = Some(key.to_vec());
        }
        self.seen += 1;
        Ok(())
    }

    /// Ends the read: the keys seen must be all the table holds.
    pub(crate) fn finish(self, table: &impl ReadableTableMetadata) -> Result<()> {
        let length = table
            .len()
            .map_err(|error| redb_error(self.path, "read a table's length", error))?;
        if length != self.seen {
            return Err(corrupt(
                self.path,
                format!(
                    "the {} table holds {length} records by its header, but reading it gave {}: its pages are damaged",
                    self.table, self.seen
                ),
            ));
        }
        Ok(())
    }
}

/// A key for messages: text when it is text.
fn lossy(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageError;

    fn delta(through: Option<Slot>, changes: &[(&str, Option<&str>)]) -> StateDelta {
        StateDelta {
            header: through.map(|through| SavedStateHeader {
                through,
                membership: Membership::new(&[1, 2, 3]).expect("valid membership"),
                scalars: vec![through as u8],
            }),
            changes: changes
                .iter()
                .map(|(key, value)| {
                    (
                        (StateTable::Nodes, Box::from(key.as_bytes())),
                        value.map(|value| value.as_bytes().to_vec()),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn a_delta_reaches_the_slot_of_its_header_and_none_without_one() {
        assert_eq!(delta(Some(7), &[("/a", Some("1"))]).through(), Some(7));
        assert_eq!(delta(None, &[]).through(), None);
    }

    #[test]
    fn merged_deltas_keep_the_latest_change_of_each_key_and_the_last_header() {
        let merged = StateDelta::merged(vec![
            delta(
                Some(1),
                &[
                    ("/a", Some("a1")),
                    ("/b", Some("b1")),
                    ("/c", Some("c1")),
                    ("/e", Some("e1")),
                ],
            ),
            delta(None, &[("/b", None)]),
            delta(Some(3), &[("/a", Some("a3")), ("/d", Some("d3"))]),
            delta(
                Some(4),
                &[("/c", Some("c4")), ("/b", Some("b4")), ("/e", None)],
            ),
            delta(None, &[]),
        ]);
        assert_eq!(
            merged,
            delta(
                Some(4),
                &[
                    ("/a", Some("a3")),
                    ("/b", Some("b4")),
                    ("/c", Some("c4")),
                    ("/d", Some("d3")),
                    ("/e", None),
                ]
            )
        );
        assert_eq!(StateDelta::merged(Vec::new()), StateDelta::default());
    }

    #[test]
    fn a_delta_counts_its_keys_payloads_and_header() {
        // Each record counts its key, its payload (none for a removal) and
        // 16 bytes of overhead; the header counts its scalars.
        let changes = delta(None, &[("/abc", Some("hello")), ("/bc", None)]);
        assert_eq!(changes.bytes(), (4 + 5 + 16) + (3 + 16));
        let with_header = delta(Some(7), &[("/abc", Some("hello")), ("/bc", None)]);
        assert_eq!(with_header.bytes(), changes.bytes() + 1);
        assert_eq!(StateDelta::default().bytes(), 0);
        assert!(StateDelta::default().is_empty());
        assert!(!changes.is_empty());
        assert!(!delta(Some(1), &[]).is_empty());
    }

    /// A table of `records` keys in an in-memory database, read back
    /// through a [`KeyOrder`] that is shown the keys `shown`.
    fn key_order_read(records: u64, shown: &[u64]) -> Result<()> {
        let database = redb::Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .expect("in-memory database");
        let definition = TableDefinition::<u64, u64>::new("numbers");
        let transaction = database.begin_write().expect("write");
        {
            let mut table = transaction.open_table(definition).expect("table");
            for key in 0..records {
                table.insert(key, key).expect("insert");
            }
        }
        transaction.commit().expect("commit");
        let transaction = database.begin_read().expect("read");
        let table = transaction.open_table(definition).expect("table");
        let path = Path::new("memory.redb");
        let mut order = KeyOrder::new(path, "numbers");
        for key in shown {
            order.next(&key.to_be_bytes())?;
        }
        order.finish(&table)
    }

    #[test]
    fn a_read_must_see_every_record_of_the_table_in_order() {
        key_order_read(3, &[0, 1, 2]).expect("a whole read in order");
        key_order_read(0, &[]).expect("an empty table");
        let hidden = key_order_read(3, &[0, 2]).expect_err("a record hidden");
        assert!(
            matches!(&hidden, StorageError::Corrupt { detail, .. }
                if detail.contains("holds 3 records") && detail.contains("gave 2")),
            "{hidden}"
        );
        let twice = key_order_read(2, &[0, 1, 1]).expect_err("a record twice");
        assert!(
            matches!(&twice, StorageError::Corrupt { detail, .. } if detail.contains("after")),
            "{twice}"
        );
        let extra = key_order_read(2, &[0, 1, 2]).expect_err("a record too many");
        assert!(matches!(extra, StorageError::Corrupt { .. }), "{extra}");
    }
}
