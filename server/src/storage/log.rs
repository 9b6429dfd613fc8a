//! The log database: the acceptor's promise, its log and the log's bounds,
//! and the membership (together a [`DurableState`]), in `synod.redb`.
//!
//! [`LogStore`] commits the core's `Persist` batches, a group at a time:
//! each group is appended to the journal ([`super::journal`]) and synced,
//! which makes it durable, and is written to the database later without a
//! sync ([`LogStore::write_back`]); now and then a durable database commit
//! (a checkpoint) lets the journal start over. It never compacts the log
//! past the state
//! the state database has durably saved (`compact_below <= through + 1`),
//! which it learns through [`Shared`]: a compaction that runs ahead of the
//! saved state is refused, and the writer thread waits for the state
//! instead ([`LogStore::wait_for_saved_state`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, Durability, ReadableDatabase};
use synod_paxos::{Ballot, DurableState, LogRecord, Membership, Persist, Slot};

use super::codec::{
    log_domain, seal, unseal, valid_membership, KEY_CHOSEN_THROUGH, KEY_JOINING, KEY_JOURNAL_GROUP,
    KEY_LOG_START, KEY_MEMBERSHIP, KEY_PROMISED, LOG, META, ROLE_LOG,
};
use super::journal::{Journal, JournalGroup};
use super::{
    check_header_meta, corrupt, describe_state, get_meta, guard_panics, put_meta, redb_error,
    refused, require_meta, state, Identity, Poison, Result, Shared, StorageError,
};

/// A checkpoint is due once this many groups were written back since the
/// last one: each holds on to the pages the groups replaced (redb frees
/// them only at a durable commit), 32 KiB or so per group.
const CHECKPOINT_GROUPS: u64 = 256;

/// A checkpoint is due once the journal holds this many bytes of records.
const CHECKPOINT_JOURNAL_BYTES: u64 = 16 << 20;

/// The log database of one replica and its journal, written by one thread.
///
/// Fail-stop: the first error poisons it, and every later call returns
/// [`StorageError::Poisoned`].
#[derive(Debug)]
pub struct LogStore {
    path: PathBuf,
    database: Database,
    identity: Identity,
    /// The meta values the committed (journaled) batches leave, mirrored
    /// so that a batch's effects can be computed without reading them
    /// back. Valid while not poisoned.
    pub(super) promised: Ballot,
    pub(super) chosen_through: Slot,
    pub(super) log_start: Slot,
    /// The id of the last batch persisted.
    last_batch_id: Option<u64>,
    /// The last group appended to the journal.
    group: u64,
    journal: Journal,
    /// What the database holds, behind the journal by `pending`.
    written: Written,
    /// Batches journaled but not yet written to the database, in order.
    pending: Vec<Persist>,
    /// The membership and joining flag `pending` sets, if it sets them.
    pending_membership: Option<Membership>,
    pending_joining: Option<bool>,
    /// Groups written back since the last checkpoint.
    groups_since_checkpoint: u64,
    poison: Poison,
    shared: Arc<Shared>,
}

/// The meta values the log database holds (durably or not).
#[derive(Debug, Clone, Copy)]
struct Written {
    promised: Ballot,
    chosen_through: Slot,
    log_start: Slot,
    group: u64,
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

    /// Makes `batches` durable, in one journal record with one `fsync`
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
            self.journal(batches, after)
        });
        if let Err(error) = &result {
            self.poison(&error.to_string());
        }
        result
    }

    /// Checkpoints now, whether or not one is due: writes the committed
    /// batches to the database in a durable commit, then empties the
    /// journal. [`LogStore::write_back`] does this when one is due and
    /// [`LogStore::close`] always does.
    ///
    /// # Errors
    /// As [`LogStore::write_back`].
    pub fn checkpoint(&mut self) -> Result<()> {
        self.check_live()?;
        let path = self.path.clone();
        let result = guard_panics(&path, || self.write_checkpoint());
        if let Err(error) = &result {
            self.poison(&error.to_string());
        }
        result
    }

    /// Batches committed but not yet written to the database.
    pub fn pending_batches(&self) -> usize {
        self.pending.len()
    }

    /// Writes the committed batches to the database without a sync (they
    /// are durable in the journal already), and checkpoints when one is
    /// due: a durable commit of the database, after which the journal
    /// starts over. Returns whether it checkpointed. The writer thread
    /// calls it when it has nothing to commit, or when many batches wait.
    ///
    /// # Errors
    /// [`StorageError::Database`] or an I/O error; always
    /// [`StorageError::Poisoned`] after an earlier error. Any error
    /// poisons.
    pub fn write_back(&mut self) -> Result<bool> {
        self.check_live()?;
        let path = self.path.clone();
        let result = guard_panics(&path, || {
            if !self.pending.is_empty() {
                let groups = self.group - self.written.group;
                self.write_pending(Durability::None)?;
                self.groups_since_checkpoint += groups;
            }
            let due = self.groups_since_checkpoint >= CHECKPOINT_GROUPS
                || self.journal.record_bytes() >= CHECKPOINT_JOURNAL_BYTES;
            if due {
                self.write_checkpoint()?;
            }
            Ok(due)
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
    pub fn close(mut self) -> Result<()> {
        self.check_live()?;
        // Leave the journal empty: the next start replays nothing.
        let path = self.path.clone();
        guard_panics(&path, || self.write_checkpoint())?;
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

    /// Appends `batches` to the journal as one group and syncs it; from
    /// then on they are durable, and the database gets them at the next
    /// [`LogStore::write_back`].
    fn journal(&mut self, batches: &[&Persist], after: LogAfter) -> Result<()> {
        if !after.changes {
            self.last_batch_id = after.last_batch_id;
            return Ok(());
        }
        let group = self.group + 1;
        self.journal.append(group, batches)?;
        self.journal.sync()?;
        self.group = group;
        self.remember(batches.iter().copied(), after);
        Ok(())
    }

    /// Takes in batches made durable (journaled, or replayed from the
    /// journal), which leave `after`, as pending for the database.
    fn remember<'a>(&mut self, batches: impl Iterator<Item = &'a Persist>, after: LogAfter) {
        self.pending.extend(batches.cloned());
        if after.membership.is_some() {
            self.pending_membership = after.membership;
        }
        if after.joining.is_some() {
            self.pending_joining = after.joining;
        }
        self.last_batch_id = after.last_batch_id;
        self.promised = after.promised;
        self.chosen_through = after.chosen_through;
        self.log_start = after.log_start;
        self.shared.publish_log_start(after.log_start);
    }

    /// Writes the pending batches and the meta values they leave (with the
    /// last group journaled) in one database transaction.
    fn write_pending(&mut self, durability: Durability) -> Result<()> {
        let path = &self.path;
        let mut transaction = self
            .database
            .begin_write()
            .map_err(|error| redb_error(path, "begin a write transaction", error))?;
        transaction
            .set_durability(durability)
            .map_err(|error| redb_error(path, "set the commit's durability", error))?;
        {
            let mut log = transaction
                .open_table(LOG)
                .map_err(|error| redb_error(path, "open the log table", error))?;
            let mut meta = transaction
                .open_table(META)
                .map_err(|error| redb_error(path, "open the meta table", error))?;
            // Replay the batches in order, exactly as `DurableState::apply`
            // does, against the running log start.
            let mut log_start = self.written.log_start;
            for batch in &self.pending {
                write_batch(&mut log, path, batch, &mut log_start)?;
            }
            assert_eq!(
                log_start, self.log_start,
                "the log start replayed from the batches must match the one checked before journaling"
            );
            if self.promised != self.written.promised {
                put_meta(&mut meta, path, KEY_PROMISED, &self.promised)?;
            }
            if self.chosen_through != self.written.chosen_through {
                put_meta(&mut meta, path, KEY_CHOSEN_THROUGH, &self.chosen_through)?;
            }
            if self.log_start != self.written.log_start {
                put_meta(&mut meta, path, KEY_LOG_START, &self.log_start)?;
            }
            if let Some(membership) = &self.pending_membership {
                put_meta(&mut meta, path, KEY_MEMBERSHIP, membership)?;
            }
            if let Some(joining) = &self.pending_joining {
                put_meta(&mut meta, path, KEY_JOINING, joining)?;
            }
            if self.group != self.written.group {
                put_meta(&mut meta, path, KEY_JOURNAL_GROUP, &self.group)?;
            }
        }
        transaction
            .commit()
            .map_err(|error| redb_error(path, "commit the writes", error))?;
        self.pending.clear();
        self.pending_membership = None;
        self.pending_joining = None;
        self.written = Written {
            promised: self.promised,
            chosen_through: self.chosen_through,
            log_start: self.log_start,
            group: self.group,
        };
        Ok(())
    }

    /// Makes the database durable with everything journaled (the pending
    /// batches included), then empties the journal.
    fn write_checkpoint(&mut self) -> Result<()> {
        self.write_pending(Durability::Immediate)?;
        self.journal.reset()?;
        self.groups_since_checkpoint = 0;
        Ok(())
    }

    /// Takes in the journal's groups that the database does not hold yet
    /// (a crash came before their checkpoint), checkpoints, and returns
    /// the durable state they leave.
    fn replay(&mut self, groups: Vec<JournalGroup>, durable: &mut DurableState) -> Result<()> {
        let missing: Vec<JournalGroup> = groups
            .into_iter()
            .filter(|group| group.group > self.written.group)
            .collect();
        if let Some(first) = missing.first() {
            if first.group != self.written.group + 1 {
                return Err(corrupt(
                    self.journal.path(),
                    format!(
                        "the journal starts at group {} but the log database holds groups through {}",
                        first.group, self.written.group
                    ),
                ));
            }
        }
        let Some(last) = missing.last().map(|group| group.group) else {
            return self.write_checkpoint();
        };
        let batches: Vec<&Persist> = missing.iter().flat_map(|group| &group.batches).collect();
        // They were checked against the saved state when first committed.
        let after = self.check(&batches, Some(Slot::MAX))?;
        for batch in &batches {
            durable.apply(batch);
        }
        self.group = last;
        self.remember(batches.iter().copied(), after);
        // A restarted core numbers its batches from 1 again.
        self.last_batch_id = None;
        tracing::info!(
            path = %self.journal.path().display(),
            groups = missing.len(),
            batches = batches.len(),
            "replayed the journal's groups the log database did not hold"
        );
        self.write_checkpoint()
    }
}

/// The journal beside a log database, as [`Storage::open`] found it.
///
/// [`Storage::open`]: super::Storage::open
pub(super) enum JournalFound {
    /// An existing journal and the groups it holds.
    Opened(Journal, Vec<JournalGroup>),
    /// A journal just created, as there was none: right only for a log
    /// database that never had one (written by an earlier build).
    Created(Journal),
}

/// Reads and checks everything in a freshly opened log database, then
/// opens its journal with `open_journal` and replays what the database
/// lacks.
pub(super) fn recover(
    database: Database,
    path: PathBuf,
    identity: &Identity,
    shared: Arc<Shared>,
    open_journal: impl FnOnce() -> Result<JournalFound>,
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
    let journal_group: Option<u64> = get_meta(&meta, &path, KEY_JOURNAL_GROUP)?;
    valid_membership(&membership).map_err(|detail| corrupt(&path, format!("meta: {detail}")))?;
    // Opened only once the database proved to be this replica's, so that
    // a wrong file is named as such first.
    let (journal, groups) = match open_journal()? {
        JournalFound::Opened(journal, groups) => (journal, groups),
        JournalFound::Created(journal) if journal_group.is_none() => (journal, Vec::new()),
        JournalFound::Created(journal) => {
            return Err(StorageError::NotFound {
                path: journal.path().to_path_buf(),
            })
        }
    };
    let journal_group = journal_group.unwrap_or(0);

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
    let mut durable = DurableState {
        membership,
        promised,
        chosen_through,
        log_start,
        log,
        joining,
    };
    let mut store = LogStore {
        path,
        database,
        identity: stored,
        promised,
        chosen_through,
        log_start,
        last_batch_id: None,
        group: journal_group,
        journal,
        written: Written {
            promised,
            chosen_through,
            log_start,
            group: journal_group,
        },
        pending: Vec::new(),
        pending_membership: None,
        pending_joining: None,
        groups_since_checkpoint: 0,
        poison: Poison::default(),
        shared,
    };
    store.replay(groups, &mut durable)?;
    Ok((store, durable))
}

/// A new log database's store, once [`write_initial`] committed.
pub(super) fn created(
    database: Database,
    path: PathBuf,
    identity: Identity,
    state: &DurableState,
    journal: Journal,
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
        group: 0,
        journal,
        written: Written {
            promised: state.promised,
            chosen_through: state.chosen_through,
            log_start: state.log_start,
            group: 0,
        },
        pending: Vec::new(),
        pending_membership: None,
        pending_joining: None,
        groups_since_checkpoint: 0,
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
        put_meta(&mut meta, path, KEY_JOURNAL_GROUP, &0u64)?;
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
