//! The state database: the state machine's tables and their headers (see
//! `state.rs` for the layout), in `synod-state.redb`.
//!
//! It is a file of its own, written by a thread of its own, so that a
//! state flush (hundreds of milliseconds at a million nodes: tens of
//! thousands of records inserted, then tens of megabytes of pages written)
//! never holds up the log's commits, which every write waits for. redb
//! runs one write transaction at a time per database; two databases commit
//! side by side.
//!
//! After each durable commit it tells the log database ([`Shared`]) which
//! slot the saved state now covers, so the log may be compacted below it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, Durability, ReadableDatabase};
use synod_paxos::Slot;

use super::codec::{self, valid_membership, META, ROLE_STATE};
use super::state::{self, SavedStateHeader, StateReader, StateRecordRef, StateTable, StateWrite};
use super::{
    check_header_meta, corrupt, guard_panics, put_meta, redb_error, refused, Identity, Poison,
    Result, Shared, StorageError,
};

/// The state database of one replica, written by one thread and read from
/// others ([`StateStore::reader`]).
///
/// Fail-stop: the first error poisons it, and every later call returns
/// [`StorageError::Poisoned`].
#[derive(Debug)]
pub struct StateStore {
    path: PathBuf,
    database: Arc<Database>,
    /// The slot the saved state covers through, if one is saved.
    state_through: Option<Slot>,
    /// The live set of state tables, if a state is saved.
    live_set: Option<u8>,
    /// The set a snapshot is being staged into, if one is.
    staging_set: Option<u8>,
    poison: Poison,
    /// Tells the log database when this store is gone.
    shared: ClosesOnDrop,
}

/// The [`Shared`] progress of a [`StateStore`], marked closed when the
/// store goes away however it does, so that a log writer waiting for a
/// saved state never waits for one that cannot come.
#[derive(Debug)]
struct ClosesOnDrop(Arc<Shared>);

impl std::ops::Deref for ClosesOnDrop {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl Drop for ClosesOnDrop {
    fn drop(&mut self) {
        self.0.close_state();
    }
}

/// What a group of state writes leaves behind, computed before anything is
/// written.
pub(super) struct StateAfter {
    pub(super) state_through: Option<Slot>,
    live_set: Option<u8>,
    staging_set: Option<u8>,
    changes: bool,
}

impl StateStore {
    /// The database file (or the name given for a backend).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The first error this store returned, if any.
    pub fn poisoned(&self) -> Option<&str> {
        self.poison.cause()
    }

    pub(super) fn poison(&self, cause: &str) {
        self.poison.set(cause);
        self.shared.close_state();
    }

    /// The slot the saved state covers, if one is saved.
    pub fn state_through(&self) -> Option<Slot> {
        self.state_through
    }

    /// Makes `writes` durable in order, in one write transaction with one
    /// `fsync` (see [`StateWrite`]). A crash before it returns keeps all of
    /// them or none. A commit of nothing but staging
    /// ([`StateWrite::StageBegin`], [`StateWrite::Stage`]) is written
    /// without an `fsync`: staged records are never read before their
    /// [`StateWrite::StageActivate`], whose durable commit makes them
    /// durable with it. Writes that change nothing cost no commit.
    ///
    /// # Errors
    /// [`StorageError::Refused`] (nothing written) for a saved state that
    /// would go back or leave a gap before the log, or staging out of
    /// order; [`StorageError::Database`] if a write or the commit failed;
    /// always [`StorageError::Poisoned`] after an earlier error. Any error
    /// poisons.
    pub fn commit(&mut self, writes: &[&StateWrite]) -> Result<()> {
        self.check_live()?;
        let path = self.path.clone();
        let result = guard_panics(&path, || {
            let after = self.check(writes, self.shared.log_start())?;
            self.write(writes, after)
        });
        if let Err(error) = &result {
            self.poison(&error.to_string());
        }
        result
    }

    /// Reads the saved state's records in one read transaction, in table
    /// then key order, verifying each one's CRC-32 (see
    /// [`StateReader::read`]), on this thread.
    ///
    /// # Errors
    /// As [`StateReader::read`]; [`StorageError::Poisoned`] after an
    /// earlier error. Any error poisons.
    pub fn read_state(
        &self,
        visit: &mut dyn FnMut(StateRecordRef<'_>) -> std::result::Result<(), String>,
    ) -> Result<Option<SavedStateHeader>> {
        self.check_live()?;
        let result = self.reader().read(&mut |_| Ok(()), visit);
        if let Err(error) = &result {
            self.poison(&error.to_string());
        }
        result
    }

    /// A handle for reading the saved state from another thread (to stream
    /// it to a lagging replica or a backup) while this store keeps writing.
    pub fn reader(&self) -> StateReader {
        StateReader {
            database: self.database.clone(),
            path: self.path.clone(),
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
        self.shared.close_state();
        match Arc::try_unwrap(self.database) {
            Ok(database) => database
                .close()
                .map_err(|error| redb_error(&self.path, "close the database", error)),
            // A reader still streams the state: the database closes when it
            // is done. Everything written is durable.
            Err(_shared) => Ok(()),
        }
    }

    pub(super) fn check_live(&self) -> Result<()> {
        self.poison.check(&self.path)
    }

    fn refused(&self, detail: String) -> StorageError {
        refused(&self.path, detail)
    }

    /// Checks `writes` against the committed sets and a log starting at
    /// `log_start`, computing what they leave behind.
    pub(super) fn check(&self, writes: &[&StateWrite], log_start: Slot) -> Result<StateAfter> {
        let mut after = StateAfter {
            state_through: self.state_through,
            live_set: self.live_set,
            staging_set: self.staging_set,
            changes: false,
        };
        let check_header = |header: &SavedStateHeader, what: &str, after: &StateAfter| {
            valid_membership(&header.membership)
                .map_err(|detail| self.refused(format!("{what}: {detail}")))?;
            if let Some(saved) = after.state_through.filter(|&saved| header.through < saved) {
                return Err(self.refused(format!(
                    "{what} through slot {} would take the saved state back from slot {saved}",
                    header.through
                )));
            }
            if header.through.saturating_add(1) < log_start {
                return Err(self.refused(format!(
                    "{what} through slot {} leaves a gap: the log starts at slot {log_start}",
                    header.through
                )));
            }
            Ok(())
        };
        for write in writes {
            match write {
                StateWrite::Delta(delta) => {
                    let Some(header) = &delta.header else {
                        if delta.changes.is_empty() {
                            continue;
                        }
                        return Err(self.refused("a state delta with changes but no header".into()));
                    };
                    check_header(header, "a state delta", &after)?;
                    after.state_through = Some(header.through);
                    after.live_set.get_or_insert(0);
                }
                StateWrite::StageBegin => {
                    after.staging_set = Some(after.live_set.map_or(1, |live| 1 - live));
                }
                StateWrite::Stage(_) => {
                    if after.staging_set.is_none() {
                        return Err(
                            self.refused("state records staged before staging began".into())
                        );
                    }
                }
                StateWrite::StageActivate(header) => {
                    let Some(staging) = after.staging_set else {
                        return Err(
                            self.refused("a staged state activated before staging began".into())
                        );
                    };
                    check_header(header, "an installed state", &after)?;
                    after.state_through = Some(header.through);
                    after.live_set = Some(staging);
                    after.staging_set = None;
                }
            }
            after.changes |= !matches!(write, StateWrite::Delta(delta) if delta.is_empty());
        }
        Ok(after)
    }

    fn write(&mut self, writes: &[&StateWrite], after: StateAfter) -> Result<()> {
        if !after.changes {
            return Ok(());
        }
        let path = &self.path;
        let mut transaction = self
            .database
            .begin_write()
            .map_err(|error| redb_error(path, "begin a write transaction", error))?;
        let staging_only = writes
            .iter()
            .all(|write| matches!(write, StateWrite::StageBegin | StateWrite::Stage(_)));
        if staging_only {
            transaction
                .set_durability(Durability::None)
                .map_err(|error| redb_error(path, "make a staging commit non-durable", error))?;
        }
        {
            let mut meta = transaction
                .open_table(META)
                .map_err(|error| redb_error(path, "open the meta table", error))?;
            let mut running = Sets {
                live: self.live_set,
                staging: self.staging_set,
            };
            for write in writes {
                write_state(&transaction, &mut meta, path, write, &mut running)?;
            }
        }
        transaction
            .commit()
            .map_err(|error| redb_error(path, "commit (fsync) the state", error))?;
        self.state_through = after.state_through;
        self.live_set = after.live_set;
        self.staging_set = after.staging_set;
        if !staging_only {
            if let Some(through) = after.state_through {
                self.shared.publish_saved(through);
            }
        }
        Ok(())
    }
}

/// Reads and checks a freshly opened state database: its meta, and the
/// live set's header (the records are read later, by the loader).
pub(super) fn recover(
    database: Database,
    path: PathBuf,
    identity: &Identity,
    shared: Arc<Shared>,
) -> Result<(StateStore, Option<SavedStateHeader>)> {
    let transaction = database
        .begin_read()
        .map_err(|error| redb_error(&path, "begin a read transaction", error))?;
    let meta = super::open_meta(&transaction, &path)?;
    check_header_meta(&meta, &path, identity, ROLE_STATE)?;
    let live = state::live_set(&meta, &path)?;
    drop(meta);
    drop(transaction);
    let state_through = live.as_ref().map(|(_, header)| header.through);
    if let Some(through) = state_through {
        shared.publish_saved(through);
    }
    let store = StateStore {
        path,
        database: Arc::new(database),
        state_through,
        live_set: live.as_ref().map(|(set, _)| *set),
        staging_set: None,
        poison: Poison::default(),
        shared: ClosesOnDrop(shared),
    };
    Ok((store, live.map(|(_, header)| header)))
}

/// A new state database's store, once [`write_initial`] committed.
pub(super) fn created(database: Database, path: PathBuf, shared: Arc<Shared>) -> StateStore {
    StateStore {
        path,
        database: Arc::new(database),
        state_through: None,
        live_set: None,
        staging_set: None,
        poison: Poison::default(),
        shared: ClosesOnDrop(shared),
    }
}

/// Writes a new state database's meta (no state saved yet) in one durable
/// commit.
pub(super) fn write_initial(database: &Database, path: &Path, identity: &Identity) -> Result<()> {
    let transaction = database
        .begin_write()
        .map_err(|error| redb_error(path, "begin a write transaction", error))?;
    {
        let mut meta = transaction
            .open_table(META)
            .map_err(|error| redb_error(path, "create the meta table", error))?;
        super::put_header_meta(&mut meta, path, identity, ROLE_STATE)?;
    }
    transaction
        .commit()
        .map_err(|error| redb_error(path, "commit (fsync) the new database", error))
}

type MetaTable<'txn> = redb::Table<'txn, &'static str, &'static [u8]>;

/// The live and staging sets as the writes of one commit run.
struct Sets {
    live: Option<u8>,
    staging: Option<u8>,
}

/// Writes one state write (see [`StateWrite`]) against the running sets.
fn write_state(
    transaction: &redb::WriteTransaction,
    meta: &mut MetaTable<'_>,
    path: &Path,
    write: &StateWrite,
    running: &mut Sets,
) -> Result<()> {
    let put_records = |set: u8,
                       records: &mut dyn Iterator<Item = (StateTable, &[u8], Option<&[u8]>)>|
     -> Result<()> {
        let mut tables = Vec::with_capacity(StateTable::ALL.len());
        for table in StateTable::ALL {
            tables.push(
                transaction
                    .open_table(table.definition(set))
                    .map_err(|error| redb_error(path, "open a state table", error))?,
            );
        }
        for (table, key, value) in records {
            let index = StateTable::ALL
                .iter()
                .position(|candidate| *candidate == table)
                .unwrap_or(0);
            let target = &mut tables[index];
            match value {
                Some(payload) => {
                    let sealed = codec::seal_bytes(&state::record_domain(table, key), payload);
                    target
                        .insert(key, sealed.as_slice())
                        .map_err(|error| redb_error(path, "write a state record", error))?;
                }
                None => {
                    target
                        .remove(key)
                        .map_err(|error| redb_error(path, "remove a state record", error))?;
                }
            }
        }
        Ok(())
    };
    match write {
        StateWrite::Delta(delta) => {
            let Some(header) = &delta.header else {
                return Ok(());
            };
            let set = *running.live.get_or_insert(0);
            put_records(
                set,
                &mut delta
                    .changes
                    .iter()
                    .map(|((table, key), value)| (*table, &key[..], value.as_deref())),
            )?;
            put_meta(meta, path, state::header_key(set), header)?;
            put_meta(meta, path, state::KEY_STATE_LIVE, &set)?;
        }
        StateWrite::StageBegin => {
            let set = running.live.map_or(1, |live| 1 - live);
            drop_set(transaction, meta, path, set)?;
            running.staging = Some(set);
        }
        StateWrite::Stage(records) => {
            let Some(set) = running.staging else {
                return Err(corrupt(path, "staging without a staging set".into()));
            };
            put_records(
                set,
                &mut records
                    .iter()
                    .map(|(table, key, value)| (*table, &key[..], Some(value.as_slice()))),
            )?;
        }
        StateWrite::StageActivate(header) => {
            let Some(set) = running.staging.take() else {
                return Err(corrupt(path, "activating without a staging set".into()));
            };
            // The staged set may lack a table that had no records: create
            // it, so the live set always has all three.
            for table in StateTable::ALL {
                transaction
                    .open_table(table.definition(set))
                    .map_err(|error| redb_error(path, "open a state table", error))?;
            }
            put_meta(meta, path, state::header_key(set), header)?;
            put_meta(meta, path, state::KEY_STATE_LIVE, &set)?;
            if let Some(old) = running.live.filter(|&old| old != set) {
                drop_set(transaction, meta, path, old)?;
            }
            running.live = Some(set);
        }
    }
    Ok(())
}

/// Drops a set of state tables and its header.
fn drop_set(
    transaction: &redb::WriteTransaction,
    meta: &mut MetaTable<'_>,
    path: &Path,
    set: u8,
) -> Result<()> {
    for table in StateTable::ALL {
        transaction
            .delete_table(table.definition(set))
            .map_err(|error| redb_error(path, "drop a set of state tables", error))?;
    }
    meta.remove(state::header_key(set))
        .map_err(|error| redb_error(path, "remove a meta value", error))?;
    Ok(())
}
