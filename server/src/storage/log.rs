//! The log database: the acceptor's promise, its log and the log's bounds,
//! and the membership (together a [`DurableState`]), in `synod.redb`.
//!
//! [`LogStore`] commits the core's `Persist` batches, one group per
//! transaction with one `fsync`. It never compacts the log past the state
//! the state database has durably saved (`compact_below <= through + 1`),
//! which it learns through [`Shared`]: a compaction that runs ahead of the
//! saved state is refused, and the writer thread waits for the state
//! instead ([`LogStore::wait_for_saved_state`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase};
use synod_paxos::{Ballot, DurableState, LogRecord, Membership, Persist, Slot};

use super::codec::{
    log_domain, seal, unseal, valid_membership, KEY_CHOSEN_THROUGH, KEY_JOINING, KEY_LOG_START,
    KEY_MEMBERSHIP, KEY_PROMISED, LOG, META, ROLE_LOG,
};
use super::{
    check_header_meta, corrupt, describe_state, get_meta, guard_panics, put_meta, redb_error,
    refused, require_meta, state, Identity, Poison, Result, Shared, StorageError,
};

/// The log database of one replica, written by one thread.
///
/// Fail-stop: the first error poisons it, and every later call returns
/// [`StorageError::Poisoned`].
#[derive(Debug)]
pub struct LogStore {
    path: PathBuf,
    database: Database,
    identity: Identity,
    /// The committed meta values, mirrored so that a batch's effects can be
    /// computed without reading them back. Valid while not poisoned.
    pub(super) promised: Ballot,
    pub(super) chosen_through: Slot,
    pub(super) log_start: Slot,
    /// The id of the last batch persisted.
    last_batch_id: Option<u64>,
    poison: Poison,
    shared: Arc<Shared>,
}

/// The meta values a group of batches leaves behind, computed before
/// anything is written.
pub(super) struct LogAfter {
    last_batch_id: Option<u64>,
    promised: Ballot,
    chosen_through: Slot,
    log_start: Slot,
    membership: Option<Membership>,
    joining: Option<bool>,
    changes: bool,
}

impl LogStore {
    /// The database file (or the name given for a backend).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The identity recorded in the database, which matched the caller's.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The first error this store returned, if any.
    pub fn poisoned(&self) -> Option<&str> {
        self.poison.cause()
    }

    pub(super) fn poison(&self, cause: &str) {
        self.poison.set(cause);
    }

    /// Makes `batches` durable, in one write transaction with one `fsync`
    /// (group commit): when this returns `Ok`, every batch is on stable
    /// storage, and a later open returns the state that
    /// [`DurableState::apply`] of each batch in order would give. A crash
    /// before it returns keeps all of them or none. Batches with no changes
    /// cost no commit.
    ///
    /// Batch ids must increase, within the call and across calls. A batch
    /// may compact the log only below the state the state database has
    /// saved durably (`compact_below <= through + 1`).
    ///
    /// # Errors
    /// [`StorageError::Refused`] (nothing written) for batch ids out of
    /// order, a compaction past the saved state or an invalid membership;
    /// [`StorageError::Database`] if a write or the commit failed; always
    /// [`StorageError::Poisoned`] after an earlier error. Any error poisons.
    pub fn commit(&mut self, batches: &[&Persist]) -> Result<()> {
        self.check_live()?;
        let path = self.path.clone();
        let result = guard_panics(&path, || {
            let after = self.check(batches, self.shared.saved_through())?;
            self.write(batches, after)
        });
        if let Err(error) = &result {
            self.poison(&error.to_string());
        }
        result
    }

    /// Blocks until the state database has durably saved a state that
    /// every compaction in `batches` may rely on. Returns `false` when the
    /// state database closed or failed first, so the batches must not be
    /// committed.
    pub fn wait_for_saved_state(&self, batches: &[&Persist]) -> bool {
        let needed = batches
            .iter()
            .filter_map(|batch| batch.compact_below)
            .filter(|&below| below > self.log_start)
            .max();
        match needed {
            Some(below) => self.shared.wait_saved(below - 1),
            None => true,
        }
    }

    /// Closes the database, reporting any error that dropping it would
    /// ignore. Everything acknowledged was already durable.
    ///
    /// # Errors
    /// redb's error from closing; [`StorageError::Poisoned`] after an
    /// earlier error.
    pub fn close(self) -> Result<()> {
        self.check_live()?;
        self.database
            .close()
            .map_err(|error| redb_error(&self.path, "close the database", error))
    }

    pub(super) fn check_live(&self) -> Result<()> {
        self.poison.check(&self.path)
    }

    fn refused(&self, detail: String) -> StorageError {
        refused(&self.path, detail)
    }

    /// Checks `batches` against the committed values and a saved state
    /// through `state_through`, computing what they leave behind.
    pub(super) fn check(
        &self,
        batches: &[&Persist],
        state_through: Option<Slot>,
    ) -> Result<LogAfter> {
        let mut after = LogAfter {
            last_batch_id: self.last_batch_id,
            promised: self.promised,
            chosen_through: self.chosen_through,
            log_start: self.log_start,
            membership: None,
            joining: None,
            changes: false,
        };
        for batch in batches {
            if let Some(last) = after.last_batch_id.filter(|&last| batch.id <= last) {
                return Err(self.refused(format!(
                    "batch {} persisted after batch {last}: batches must be persisted in increasing id order",
                    batch.id
                )));
            }
            after.last_batch_id = Some(batch.id);
            after.changes |= !batch.is_empty();
            if let Some(ballot) = batch.promised {
                after.promised = after.promised.max(ballot);
            }
            if let Some(slot) = batch.chosen_through {
                after.chosen_through = after.chosen_through.max(slot);
            }
            if let Some(below) = batch.compact_below.filter(|&below| below > after.log_start) {
                if state_through.is_none_or(|through| below > through.saturating_add(1)) {
                    return Err(self.refused(format!(
                        "batch {} compacts the log below slot {below}, past the saved state ({})",
                        batch.id,
                        describe_state(state_through)
                    )));
                }
                after.log_start = below;
            }
            if let Some(new) = &batch.membership {
                valid_membership(new)
                    .map_err(|detail| self.refused(format!("batch {}: {detail}", batch.id)))?;
                after.membership = Some(new.clone());
            }
            if let Some(flag) = batch.joining {
                after.joining = Some(flag);
            }
        }
        Ok(after)
    }

    fn write(&mut self, batches: &[&Persist], after: LogAfter) -> Result<()> {
        if !after.changes {
            self.last_batch_id = after.last_batch_id;
            return Ok(());
        }
        let path = &self.path;
        let transaction = self
            .database
            .begin_write()
            .map_err(|error| redb_error(path, "begin a write transaction", error))?;
        {
            let mut log = transaction
                .open_table(LOG)
                .map_err(|error| redb_error(path, "open the log table", error))?;
            let mut meta = transaction
                .open_table(META)
                .map_err(|error| redb_error(path, "open the meta table", error))?;
            // Replay the batches in order, exactly as `DurableState::apply`
            // does, against the running log start.
            let mut log_start = self.log_start;
            for batch in batches {
                write_batch(&mut log, path, batch, &mut log_start)?;
            }
            assert_eq!(
                log_start, after.log_start,
                "the log start replayed from the batches must match the one checked before writing"
            );
            if after.promised != self.promised {
                put_meta(&mut meta, path, KEY_PROMISED, &after.promised)?;
            }
            if after.chosen_through != self.chosen_through {
                put_meta(&mut meta, path, KEY_CHOSEN_THROUGH, &after.chosen_through)?;
            }
            if after.log_start != self.log_start {
                put_meta(&mut meta, path, KEY_LOG_START, &after.log_start)?;
            }
            if let Some(membership) = &after.membership {
                put_meta(&mut meta, path, KEY_MEMBERSHIP, membership)?;
            }
            if let Some(joining) = &after.joining {
                put_meta(&mut meta, path, KEY_JOINING, joining)?;
            }
        }
        transaction
            .commit()
            .map_err(|error| redb_error(path, "commit (fsync) the writes", error))?;
        self.last_batch_id = after.last_batch_id;
        self.promised = after.promised;
        self.chosen_through = after.chosen_through;
        self.log_start = after.log_start;
        self.shared.publish_log_start(after.log_start);
        Ok(())
    }
}

/// Reads and checks everything in a freshly opened log database.
pub(super) fn recover(
    database: Database,
    path: PathBuf,
    identity: &Identity,
    shared: Arc<Shared>,
) -> Result<(LogStore, DurableState)> {
    let transaction = database
        .begin_read()
        .map_err(|error| redb_error(&path, "begin a read transaction", error))?;
    let meta = super::open_meta(&transaction, &path)?;
    let stored = check_header_meta(&meta, &path, identity, ROLE_LOG)?;
    let promised: Ballot = require_meta(&meta, &path, KEY_PROMISED)?;
    let chosen_through: Slot = require_meta(&meta, &path, KEY_CHOSEN_THROUGH)?;
    let log_start: Slot = require_meta(&meta, &path, KEY_LOG_START)?;
    let membership: Membership = require_meta(&meta, &path, KEY_MEMBERSHIP)?;
    let joining: bool = get_meta(&meta, &path, KEY_JOINING)?.unwrap_or(false);
    valid_membership(&membership).map_err(|detail| corrupt(&path, format!("meta: {detail}")))?;

    let log_table = transaction
        .open_table(LOG)
        .map_err(|error| redb_error(&path, "open the log table", error))?;
    let mut log = BTreeMap::new();
    let entries = log_table
        .range::<u64>(..)
        .map_err(|error| redb_error(&path, "read the log", error))?;
    let mut order = state::KeyOrder::new(&path, "log");
    for entry in entries {
        let (key, value) = entry.map_err(|error| redb_error(&path, "read the log", error))?;
        let slot = key.value();
        order.next(&slot.to_be_bytes())?;
        if slot < log_start {
            return Err(corrupt(
                &path,
                format!("the log holds slot {slot} below its start {log_start}"),
            ));
        }
        let record: LogRecord = unseal(&log_domain(slot), value.value())
            .map_err(|detail| corrupt(&path, format!("log slot {slot}: {detail}")))?;
        log.insert(slot, record);
    }
    order.finish(&log_table)?;
    drop(log_table);
    drop(meta);
    drop(transaction);

    shared.publish_log_start(log_start);
    let durable = DurableState {
        membership,
        promised,
        chosen_through,
        log_start,
        log,
        joining,
    };
    let store = LogStore {
        path,
        database,
        identity: stored,
        promised,
        chosen_through,
        log_start,
        last_batch_id: None,
        poison: Poison::default(),
        shared,
    };
    Ok((store, durable))
}

/// A new log database's store, once [`write_initial`] committed.
pub(super) fn created(
    database: Database,
    path: PathBuf,
    identity: Identity,
    state: &DurableState,
    shared: Arc<Shared>,
) -> LogStore {
    shared.publish_log_start(state.log_start);
    LogStore {
        path,
        database,
        identity,
        promised: state.promised,
        chosen_through: state.chosen_through,
        log_start: state.log_start,
        last_batch_id: None,
        poison: Poison::default(),
        shared,
    }
}

/// Writes a new log database's meta and log in one durable commit.
pub(super) fn write_initial(
    database: &Database,
    path: &Path,
    identity: &Identity,
    state: &DurableState,
) -> Result<()> {
    let transaction = database
        .begin_write()
        .map_err(|error| redb_error(path, "begin a write transaction", error))?;
    {
        let mut meta = transaction
            .open_table(META)
            .map_err(|error| redb_error(path, "create the meta table", error))?;
        super::put_header_meta(&mut meta, path, identity, ROLE_LOG)?;
        put_meta(&mut meta, path, KEY_PROMISED, &state.promised)?;
        put_meta(&mut meta, path, KEY_CHOSEN_THROUGH, &state.chosen_through)?;
        put_meta(&mut meta, path, KEY_LOG_START, &state.log_start)?;
        put_meta(&mut meta, path, KEY_MEMBERSHIP, &state.membership)?;
        if state.joining {
            put_meta(&mut meta, path, KEY_JOINING, &true)?;
        }
        let mut log = transaction
            .open_table(LOG)
            .map_err(|error| redb_error(path, "create the log table", error))?;
        for (&slot, record) in &state.log {
            put_log_record(&mut log, path, slot, record)?;
        }
    }
    transaction
        .commit()
        .map_err(|error| redb_error(path, "commit (fsync) the new database", error))
}

type LogTable<'txn> = redb::Table<'txn, u64, &'static [u8]>;

/// Writes one batch's log changes (`DurableState::apply`'s rules) against
/// the running log start.
fn write_batch(
    log: &mut LogTable<'_>,
    path: &Path,
    batch: &Persist,
    log_start: &mut Slot,
) -> Result<()> {
    let accepted = batch
        .accepted
        .iter()
        .map(|entry| (entry.slot, entry.ballot, &entry.value));
    let learned = batch
        .learned
        .iter()
        .map(|entry| (entry.slot, Ballot::ZERO, &entry.value));
    for (slot, ballot, value) in accepted.chain(learned) {
        if slot < *log_start {
            continue;
        }
        let record = LogRecord {
            ballot,
            value: value.clone(),
        };
        put_log_record(log, path, slot, &record)?;
    }
    if let Some(below) = batch.compact_below.filter(|&below| below > *log_start) {
        log.retain_in::<u64, _>(..below, |_, _| false)
            .map_err(|error| redb_error(path, "compact the log", error))?;
        *log_start = below;
    }
    Ok(())
}

/// Writes one sealed log record.
fn put_log_record(
    log: &mut LogTable<'_>,
    path: &Path,
    slot: Slot,
    record: &LogRecord,
) -> Result<()> {
    let sealed = seal(&log_domain(slot), record).map_err(|source| StorageError::Encode {
        path: path.to_path_buf(),
        what: "a log record",
        source,
    })?;
    log.insert(slot, sealed.as_slice())
        .map_err(|error| redb_error(path, "write a log record", error))?;
    Ok(())
}
