//! The durable state of one replica, in one redb database file.
//!
//! [`Storage`] keeps what a replica needs to restart: the Paxos acceptor's
//! promise, its log, the log's bounds and the membership (together a
//! [`DurableState`]), and the state machine's own tables, saved as entries
//! are applied (DESIGN.md section 3; see `state.rs` for
//! their layout). At restart the replica loads the saved state, which
//! covers every slot up to `through`, and the Paxos core replays the chosen
//! log after it: a bounded tail, since the log is compacted below the saved
//! state as it advances.
//!
//! # Layout
//!
//! One file, conventionally [`database_path`]`(data_dir)`, with these
//! tables:
//!
//! - `synod_meta` (`&str -> bytes`): the format version, the replica's
//!   [`Identity`], the promised ballot, `chosen_through`, `log_start`, the
//!   membership, and for the state machine the live set of state tables
//!   (`state_live`) and each set's [`SavedStateHeader`] (`state.0`,
//!   `state.1`: the slot it covers, the membership, the scalars).
//! - `synod_log` (`u64 slot -> bytes`): one [`LogRecord`] per retained slot.
//! - `synod_state_{nodes,sessions,locks}.{0,1}` (`bytes -> bytes`): the
//!   records of the two sets of state tables, one live and one for staging
//!   a snapshot installed from a peer.
//!
//! Values are postcard-encoded. Every meta value, log record and state
//! record is followed by a CRC-32 over the table and key it belongs under
//! and its encoding, verified on every read. redb checksums its own pages
//! (which catches a torn commit); ours catch a value that redb stored
//! faithfully but that is wrong.
//!
//! # Use by the replica
//!
//! 1. A brand-new member calls [`Storage::create`] with
//!    [`DurableState::bootstrap`]; every later start calls [`Storage::open`],
//!    which never creates anything.
//! 2. It loads the saved state with [`Storage::read_state`] when
//!    [`Recovered::state`] says there is one, and starts the core with
//!    `Node::new(config, recovered.durable, through + 1, now)`.
//! 3. Each round of the writer takes every job queued so far and calls
//!    [`Storage::commit`] once (one `fsync`): the core's `Persist` batches
//!    and the state machine's changes, in order. It then reports
//!    `Node::persisted` with the last batch id, and the slot the saved
//!    state reached.
//! 4. Once the saved state covers slot `S`, it calls `Node::compact(S)`, whose
//!    `compact_below` a later commit writes (refused past `S + 1`). For a
//!    snapshot installed from a peer, it stages the records
//!    ([`StateWrite::StageBegin`], [`StateWrite::Stage`]), makes them live
//!    ([`StateWrite::StageActivate`]) and only then tells the core
//!    (`Node::snapshot_installed`).
//! 5. On any error it stops the replica, which restarts from step 1.
//!
//! # Durability contract
//!
//! [`Storage::commit`] runs one redb write transaction with
//! [`redb::Durability::Immediate`]: when it returns `Ok`, everything it was
//! given is on stable storage (redb's one-phase-plus-checksum commit: the
//! data, the checksums and the new header are written, then one `fsync`).
//! The one exception is a commit of nothing but staging
//! ([`StateWrite::StageBegin`], [`StateWrite::Stage`]): it is written with
//! [`redb::Durability::None`], without an `fsync`. Staged records are never
//! read back before their [`StateWrite::StageActivate`], whose durable
//! commit makes them durable with it, and a crash before that loses the
//! staging, which a reopen forgets anyway (case 4). A 10,000,000-node
//! snapshot is staged in hundreds of commits, and an `fsync` each made the
//! install outlast its timeout.
//! The driver calls `Node::persisted(id)` only after the commit holding that
//! batch returned `Ok`, and the core sends no message that depends on a
//! batch before that. The crash cases, and why each is safe:
//!
//! 1. **Crash before a `persist` commit is durable** (before or during its
//!    `fsync`). On reopen redb finds either the previous header, or a new
//!    header whose page checksums do not verify, and rolls back to the
//!    previous commit. Every batch of that call is lost together; none was
//!    acknowledged, so no promise or acceptance from them left the replica:
//!    to the cluster it is as if the messages that caused them were lost,
//!    which the protocol tolerates. Batches become durable in id order because
//!    one call writes a whole group atomically and calls are sequential.
//! 2. **Crash after a `persist` commit returned `Ok`** (before
//!    `Node::persisted`, or any time later). The batches are on disk and
//!    [`Storage::open`] returns them: the acceptor never forgets a promise or
//!    an acceptance it may have announced. Messages not yet sent are resent by
//!    the protocol.
//! 3. **A failed write or `fsync`.** The call returns an error and poisons
//!    the `Storage`: every later call fails with [`StorageError::Poisoned`].
//!    After a failed `fsync` the kernel may have dropped the dirty pages and
//!    a retry may report success for data that never reached the disk, so the
//!    only safe course is fail-stop: the replica exits and reopens the file,
//!    which holds the last successful commit (case 1).
//! 4. **Crash with state changes in flight.** State changes commit with
//!    the batches, atomically, so a saved state never holds half a delta.
//!    It may lag the log by up to a flush interval; the log still holds
//!    every slot after it, because `commit` refuses to compact the log past
//!    the saved state (`compact_below` must be at most `through + 1`) and
//!    refuses a saved state that would go back or leave a gap before the
//!    log. A crash while a snapshot is staged leaves the old live set,
//!    untouched: staging writes only the other set, and one commit flips
//!    `state_live` and drops the old set. The crash-image tests cover all
//!    of these (`server/tests/storage.rs`).
//! 5. **Crash during [`Storage::create`].** The file was created with
//!    `create_new`, and all initial tables and meta are written in one
//!    durable transaction, after which the directory is synced. A crash
//!    before that leaves no file, an empty file, or a redb file without
//!    Synod meta; [`Storage::open`] refuses the last two with
//!    [`StorageError::NotSynod`] or [`StorageError::Corrupt`], naming the
//!    file, so a half-created replica never votes as if it had an empty past.
//! 6. **A lost or replaced data directory.** `open` refuses a missing file
//!    ([`StorageError::NotFound`]) instead of creating one: a replica that
//!    forgot its promises must not vote. Creating a fresh database is a
//!    separate, explicit call that refuses an existing file.
//! 7. **Damage after the fact** (bit rot, a stray tool, a file from another
//!    replica). Opening verifies every redb page checksum (integrity check
//!    on open), the format version, the cluster and node ids, and the
//!    consistency of meta and log. Every record (log, meta and state) is
//!    sealed with a CRC-32 over its table, key and payload and checked
//!    whenever it is read, and a full read of a table must give its keys in
//!    strict order and as many as redb's header for the table counts
//!    (`state::KeyOrder`). Any failure is refused with an error naming the
//!    file. A redb panic on damaged data, while opening, reading or
//!    committing, is caught and reported as [`StorageError::Corrupt`] (this
//!    needs the default `panic = "unwind"`). Single flipped bits are tested
//!    to be refused or harmless (`server/tests/storage.rs`).
//! 8. **Two processes on one file.** redb locks the file; the second open
//!    fails with [`StorageError::AlreadyOpen`].

mod codec;
mod error;
mod state;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use redb::backends::FileBackend;
use redb::{
    Builder, Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, StorageBackend,
    TableError,
};
use serde::{Deserialize, Serialize};
use synod_paxos::{Ballot, DurableState, LogRecord, Membership, Persist, Slot};

use codec::{
    log_domain, meta_domain, seal, unseal, valid_membership, FORMAT_VERSION, KEY_CHOSEN_THROUGH,
    KEY_FORMAT_VERSION, KEY_IDENTITY, KEY_JOINING, KEY_LOG_START, KEY_MEMBERSHIP, KEY_PROMISED,
    LOG, META,
};
pub use error::{Result, StorageError};
pub use state::{
    SavedStateHeader, StateDelta, StateKey, StateReader, StateRecordRef, StateTable, StateWrite,
};

/// The database file's name inside a replica's data directory.
pub const DATABASE_FILE_NAME: &str = "synod.redb";

/// redb's page cache (half of it at most for a commit's dirty pages). Reads
/// are served from memory by the state machine, so the cache only speeds up
/// commits and restarts; the operating system caches the file as well.
const CACHE_BYTES: usize = 32 << 20;

/// The path of the database file in `data_dir`.
pub fn database_path(data_dir: &Path) -> PathBuf {
    data_dir.join(DATABASE_FILE_NAME)
}

/// Who a database belongs to. Written at creation and checked on every open,
/// so a replica never starts from another replica's or another cluster's
/// promises.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    /// The cluster's name, the same on every replica.
    pub cluster_id: String,
    /// This replica's id within the cluster.
    pub node_id: u64,
}

/// What [`Storage::open`] found on disk: everything a replica restarts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovered {
    /// The Paxos core's durable state, exactly as the acknowledged batches
    /// left it (see [`DurableState::apply`]).
    pub durable: DurableState,
    /// The header of the saved state machine, if any. Load its records
    /// with [`Storage::read_state`] and start the core with
    /// `apply_from = through + 1` (`Node::new` checks that the log covers
    /// every chosen slot from there); without one, start the state machine
    /// empty and replay the log from its start.
    pub state: Option<SavedStateHeader>,
}

/// One write of a [`Storage::commit`], in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// A batch of the Paxos core.
    Persist(Persist),
    /// A change to the state machine's tables.
    State(StateWrite),
}

impl Write {
    /// Whether it only stages a snapshot being installed.
    fn is_staging(&self) -> bool {
        matches!(
            self,
            Write::State(StateWrite::StageBegin | StateWrite::Stage(_))
        )
    }
}

/// One replica's durable state in a redb database.
///
/// Getters: [`Storage::path`], [`Storage::identity`], [`Storage::poisoned`].
/// Constructors: [`Storage::create`] and [`Storage::open`] for a file, with
/// `*_with_backend` variants for any redb [`StorageBackend`] (tests use
/// in-memory ones). Writes: [`Storage::commit`] (and [`Storage::persist`]
/// for batches alone), durable when they return. Reads:
/// [`Storage::read_state`], and from other threads through
/// [`Storage::state_reader`].
///
/// Fail-stop: the first error from any method poisons the `Storage`, and
/// every later call returns [`StorageError::Poisoned`]. The replica must then
/// exit and reopen the file.
#[derive(Debug)]
pub struct Storage {
    path: PathBuf,
    database: Arc<Database>,
    identity: Identity,
    /// The committed meta values, mirrored so that a batch's effects can be
    /// computed without reading them back. Valid while not poisoned.
    promised: Ballot,
    chosen_through: Slot,
    log_start: Slot,
    /// The slot the saved state covers through, if one is saved.
    state_through: Option<Slot>,
    /// The live set of state tables, if a state is saved.
    live_set: Option<u8>,
    /// The set a snapshot is being staged into, if one is.
    staging_set: Option<u8>,
    /// The id of the last batch persisted through this `Storage`.
    last_batch_id: Option<u64>,
    /// The first error, once one happened.
    poison: OnceLock<String>,
}

impl Storage {
    /// Creates a brand-new database file at `path` for a replica that starts
    /// from `state` (normally [`DurableState::bootstrap`]), records
    /// `identity` and the format version, and makes it all durable, including
    /// the directory entry, before returning.
    ///
    /// # Errors
    /// [`StorageError::AlreadyExists`] if anything is at `path` (an existing
    /// database is never overwritten); [`StorageError::Refused`] if `state`
    /// is not a valid starting state (an invalid membership, log entries
    /// below `log_start`, or a compacted log, which would need a snapshot);
    /// I/O and redb errors. On error the new file is removed.
    pub fn create(
        path: impl AsRef<Path>,
        identity: Identity,
        state: &DurableState,
    ) -> Result<Storage> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| match source.kind() {
                ErrorKind::AlreadyExists => StorageError::AlreadyExists { path: path.clone() },
                _ => StorageError::Io {
                    path: path.clone(),
                    operation: "create the database file",
                    source,
                },
            })?;
        let created = FileBackend::new(file)
            .map_err(|error| redb_error(&path, "open the new database file", error))
            .and_then(|backend| {
                Storage::create_with_backend(backend, path.clone(), identity, state)
            })
            .and_then(|storage| {
                sync_parent_directory(&path)?;
                Ok(storage)
            });
        if created.is_err() {
            // Best effort: the file holds no acknowledged state, and leaving it
            // would make the next `create` fail for no reason.
            let _ = std::fs::remove_file(&path);
        }
        created
    }

    /// Like [`Storage::create`], on any redb backend, which must be empty.
    /// `path` only names the database in errors.
    ///
    /// # Errors
    /// [`StorageError::AlreadyExists`] if the backend is not empty;
    /// [`StorageError::Refused`] for an invalid `state`; redb errors.
    pub fn create_with_backend(
        backend: impl StorageBackend,
        path: impl Into<PathBuf>,
        identity: Identity,
        state: &DurableState,
    ) -> Result<Storage> {
        let path = path.into();
        let length = backend
            .len()
            .map_err(|error| redb_error(&path, "read the backend's length", error))?;
        if length != 0 {
            return Err(StorageError::AlreadyExists { path });
        }
        check_initial_state(&path, state)?;
        let database = builder()
            .create_with_backend(backend)
            .map_err(|error| open_error(&path, error))?;
        write_initial(&database, &path, &identity, state)?;
        Ok(Storage {
            path,
            database: Arc::new(database),
            identity,
            promised: state.promised,
            chosen_through: state.chosen_through,
            log_start: state.log_start,
            state_through: None,
            live_set: None,
            staging_set: None,
            last_batch_id: None,
            poison: OnceLock::new(),
        })
    }

    /// Opens the existing database at `path`, checks that it belongs to
    /// `identity` and is intact, and returns what a restart needs.
    ///
    /// Every redb page checksum and every record's CRC-32 is verified, so
    /// this reads the whole file.
    ///
    /// # Errors
    /// Each names the file: [`StorageError::NotFound`] if there is no file;
    /// [`StorageError::AlreadyOpen`] if another process or `Storage` has it
    /// open; [`StorageError::Corrupt`] for a file that is not a database,
    /// fails a checksum, does not decode or is inconsistent;
    /// [`StorageError::NotSynod`] for a redb database without Synod meta
    /// (such as one whose creation crashed);
    /// [`StorageError::FormatVersion`], [`StorageError::WrongCluster`],
    /// [`StorageError::WrongNode`]; I/O and redb errors.
    pub fn open(path: impl AsRef<Path>, identity: &Identity) -> Result<(Storage, Recovered)> {
        let path = path.as_ref().to_path_buf();
        let metadata = std::fs::metadata(&path).map_err(|source| match source.kind() {
            ErrorKind::NotFound => StorageError::NotFound { path: path.clone() },
            _ => StorageError::Io {
                path: path.clone(),
                operation: "inspect the database file",
                source,
            },
        })?;
        if metadata.len() == 0 {
            return Err(StorageError::NotSynod {
                path,
                detail: "the file is empty (did creating it crash?)".to_string(),
            });
        }
        guard_panics(&path, || {
            let database = builder()
                .open(&path)
                .map_err(|error| open_error(&path, error))?;
            Storage::recover(database, path.clone(), identity)
        })
    }

    /// Like [`Storage::open`], on any redb backend. `path` only names the
    /// database in errors.
    ///
    /// # Errors
    /// As [`Storage::open`]; an empty backend is [`StorageError::NotFound`].
    pub fn open_with_backend(
        backend: impl StorageBackend,
        path: impl Into<PathBuf>,
        identity: &Identity,
    ) -> Result<(Storage, Recovered)> {
        let path = path.into();
        let length = backend
            .len()
            .map_err(|error| redb_error(&path, "read the backend's length", error))?;
        if length == 0 {
            return Err(StorageError::NotFound { path });
        }
        guard_panics(&path, || {
            let database = builder()
                .create_with_backend(backend)
                .map_err(|error| open_error(&path, error))?;
            Storage::recover(database, path.clone(), identity)
        })
    }

    /// The database file (or the name given for a backend).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The identity recorded in the database, which matched the caller's.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The first error this `Storage` returned, if any: once set, every call
    /// fails and the replica must restart from disk.
    pub fn poisoned(&self) -> Option<&str> {
        self.poison.get().map(String::as_str)
    }

    /// Makes `batches` durable, in one write transaction with one `fsync`
    /// (group commit): when this returns `Ok`, every batch is on stable
    /// storage, and a later [`Storage::open`] returns the state that
    /// [`DurableState::apply`] of each batch in order would give. A crash
    /// before it returns keeps all of them or none. Batches with no changes
    /// cost no commit.
    ///
    /// Batch ids must increase, within the call and across calls on this
    /// `Storage`. A batch may compact the log only below the saved state
    /// (`compact_below <= through + 1`), so that saved state and log tail
    /// always cover every chosen slot.
    ///
    /// # Errors
    /// As [`Storage::commit`].
    pub fn persist(&mut self, batches: &[Persist]) -> Result<()> {
        let writes: Vec<Write> = batches.iter().cloned().map(Write::Persist).collect();
        self.commit(&writes)
    }

    /// Makes `writes` durable in order, in one write transaction with one
    /// `fsync` (group commit): batches as [`Storage::persist`] describes,
    /// and changes to the state tables as [`StateWrite`] describes. A crash
    /// before it returns keeps all of them or none. Writes that change
    /// nothing cost no commit.
    ///
    /// # Errors
    /// [`StorageError::Refused`] (nothing written) for batch ids out of
    /// order, a compaction past the saved state, an invalid membership, a
    /// saved state that would go back or leave a gap before the log, or
    /// staging out of order; [`StorageError::Database`] if a write or the
    /// commit failed; always [`StorageError::Poisoned`] after an earlier
    /// error. Any error poisons.
    pub fn commit(&mut self, writes: &[Write]) -> Result<()> {
        self.check_live()?;
        let path = self.path.clone();
        let result = guard_panics(&path, || self.commit_writes(writes));
        self.poison_on_error(result)
    }

    /// The slot the saved state covers, if one is saved.
    pub fn state_through(&self) -> Option<Slot> {
        self.state_through
    }

    /// Reads the saved state's records in one read transaction, in table
    /// then key order, verifying each one's CRC-32 (see
    /// [`StateReader::read`]), on this thread. (A replica restarts through
    /// [`Storage::state_reader`], reading on a thread of its own.)
    ///
    /// # Errors
    /// As [`StateReader::read`]; [`StorageError::Poisoned`] after an
    /// earlier error. Any error poisons.
    pub fn read_state(
        &self,
        visit: &mut dyn FnMut(StateRecordRef<'_>) -> std::result::Result<(), String>,
    ) -> Result<Option<SavedStateHeader>> {
        self.check_live()?;
        let result = self.state_reader().read(&mut |_| Ok(()), visit);
        self.poison_on_error(result)
    }

    /// A handle for reading the saved state from another thread (to stream
    /// it to a lagging replica) while this `Storage` keeps writing.
    pub fn state_reader(&self) -> StateReader {
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
        match Arc::try_unwrap(self.database) {
            Ok(database) => database
                .close()
                .map_err(|error| redb_error(&self.path, "close the database", error)),
            // A reader still streams the state to a peer: the database
            // closes when it is done. Everything written is durable.
            Err(_shared) => Ok(()),
        }
    }

    fn check_live(&self) -> Result<()> {
        match self.poison.get() {
            Some(cause) => Err(StorageError::Poisoned {
                path: self.path.clone(),
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn poison_on_error<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(error) = &result {
            let _ = self.poison.set(error.to_string());
        }
        result
    }

    fn refused(&self, detail: String) -> StorageError {
        StorageError::Refused {
            path: self.path.clone(),
            detail,
        }
    }

    fn commit_writes(&mut self, writes: &[Write]) -> Result<()> {
        // Check every write before writing anything, computing the meta
        // values and state sets the writes leave behind.
        let mut after = self.mirror();
        let mut changes = false;
        for write in writes {
            match write {
                Write::Persist(batch) => {
                    self.check_batch(batch, &mut after)?;
                    changes |= !batch.is_empty();
                }
                Write::State(state) => {
                    self.check_state_write(state, &mut after)?;
                    changes |= !matches!(state, StateWrite::Delta(delta) if delta.is_empty());
                }
            }
        }
        if !changes {
            self.last_batch_id = after.last_batch_id;
            return Ok(());
        }

        let path = &self.path;
        let mut transaction = self
            .database
            .begin_write()
            .map_err(|error| redb_error(path, "begin a write transaction", error))?;
        if writes.iter().all(Write::is_staging) {
            // Made durable by the activation's commit (see the durability
            // contract above).
            transaction
                .set_durability(Durability::None)
                .map_err(|error| redb_error(path, "make a staging commit non-durable", error))?;
        }
        {
            let mut log = transaction
                .open_table(LOG)
                .map_err(|error| redb_error(path, "open the log table", error))?;
            let mut meta = transaction
                .open_table(META)
                .map_err(|error| redb_error(path, "open the meta table", error))?;
            // Replay the writes in order, exactly as `DurableState::apply`
            // does for batches, against the running log start and sets.
            let mut running = self.mirror();
            for write in writes {
                match write {
                    Write::Persist(batch) => write_batch(&mut log, path, batch, &mut running)?,
                    Write::State(state) => {
                        write_state(&transaction, &mut meta, path, state, &mut running)?
                    }
                }
            }
            assert_eq!(
                running.log_start, after.log_start,
                "the log start replayed from the writes must match the one checked before writing"
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
        self.state_through = after.state_through;
        self.live_set = after.live_set;
        self.staging_set = after.staging_set;
        Ok(())
    }

    /// The committed values a commit starts from.
    fn mirror(&self) -> Mirror {
        Mirror {
            last_batch_id: self.last_batch_id,
            promised: self.promised,
            chosen_through: self.chosen_through,
            log_start: self.log_start,
            membership: None,
            joining: None,
            state_through: self.state_through,
            live_set: self.live_set,
            staging_set: self.staging_set,
        }
    }

    fn check_batch(&self, batch: &Persist, after: &mut Mirror) -> Result<()> {
        if let Some(last) = after.last_batch_id.filter(|&last| batch.id <= last) {
            return Err(self.refused(format!(
                "batch {} persisted after batch {last}: batches must be persisted in increasing id order",
                batch.id
            )));
        }
        after.last_batch_id = Some(batch.id);
        if let Some(ballot) = batch.promised {
            after.promised = after.promised.max(ballot);
        }
        if let Some(slot) = batch.chosen_through {
            after.chosen_through = after.chosen_through.max(slot);
        }
        if let Some(below) = batch.compact_below.filter(|&below| below > after.log_start) {
            if after
                .state_through
                .is_none_or(|through| below > through.saturating_add(1))
            {
                return Err(self.refused(format!(
                    "batch {} compacts the log below slot {below}, past the saved state ({})",
                    batch.id,
                    describe_state(after.state_through)
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
        Ok(())
    }

    fn check_state_write(&self, write: &StateWrite, after: &mut Mirror) -> Result<()> {
        let check_header = |header: &SavedStateHeader, what: &str, after: &Mirror| {
            valid_membership(&header.membership)
                .map_err(|detail| self.refused(format!("{what}: {detail}")))?;
            if let Some(saved) = after.state_through.filter(|&saved| header.through < saved) {
                return Err(self.refused(format!(
                    "{what} through slot {} would take the saved state back from slot {saved}",
                    header.through
                )));
            }
            if header.through.saturating_add(1) < after.log_start {
                return Err(self.refused(format!(
                    "{what} through slot {} leaves a gap: the log starts at slot {}",
                    header.through, after.log_start
                )));
            }
            Ok(())
        };
        match write {
            StateWrite::Delta(delta) => {
                let Some(header) = &delta.header else {
                    if delta.changes.is_empty() {
                        return Ok(());
                    }
                    return Err(self.refused("a state delta with changes but no header".into()));
                };
                check_header(header, "a state delta", after)?;
                after.state_through = Some(header.through);
                after.live_set.get_or_insert(0);
            }
            StateWrite::StageBegin => {
                after.staging_set = Some(after.live_set.map_or(1, |live| 1 - live));
            }
            StateWrite::Stage(_) => {
                if after.staging_set.is_none() {
                    return Err(self.refused("state records staged before staging began".into()));
                }
            }
            StateWrite::StageActivate(header) => {
                let Some(staging) = after.staging_set else {
                    return Err(
                        self.refused("a staged state activated before staging began".into())
                    );
                };
                check_header(header, "an installed state", after)?;
                after.state_through = Some(header.through);
                after.live_set = Some(staging);
                after.staging_set = None;
            }
        }
        Ok(())
    }

    /// Reads and checks everything in a freshly opened database.
    fn recover(
        database: Database,
        path: PathBuf,
        identity: &Identity,
    ) -> Result<(Storage, Recovered)> {
        let transaction = database
            .begin_read()
            .map_err(|error| redb_error(&path, "begin a read transaction", error))?;
        let meta = match transaction.open_table(META) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => {
                return Err(StorageError::NotSynod {
                    path,
                    detail: "it has no meta table (did creating it crash?)".to_string(),
                })
            }
            Err(error) => return Err(redb_error(&path, "open the meta table", error)),
        };
        let Some(version) = get_meta::<u32>(&meta, &path, KEY_FORMAT_VERSION)? else {
            return Err(StorageError::NotSynod {
                path,
                detail: "it has no format version (did creating it crash?)".to_string(),
            });
        };
        if version != FORMAT_VERSION {
            return Err(StorageError::FormatVersion {
                path,
                found: version,
                expected: FORMAT_VERSION,
            });
        }
        let stored: Identity = require_meta(&meta, &path, KEY_IDENTITY)?;
        if stored.cluster_id != identity.cluster_id {
            return Err(StorageError::WrongCluster {
                path,
                found: stored.cluster_id,
                expected: identity.cluster_id.clone(),
            });
        }
        if stored.node_id != identity.node_id {
            return Err(StorageError::WrongNode {
                path,
                found: stored.node_id,
                expected: identity.node_id,
            });
        }
        let promised: Ballot = require_meta(&meta, &path, KEY_PROMISED)?;
        let chosen_through: Slot = require_meta(&meta, &path, KEY_CHOSEN_THROUGH)?;
        let log_start: Slot = require_meta(&meta, &path, KEY_LOG_START)?;
        let membership: Membership = require_meta(&meta, &path, KEY_MEMBERSHIP)?;
        let joining: bool = get_meta(&meta, &path, KEY_JOINING)?.unwrap_or(false);
        valid_membership(&membership)
            .map_err(|detail| corrupt(&path, format!("meta: {detail}")))?;

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

        let live = state::live_set(&meta, &path)?;
        let state_through = live.as_ref().map(|(_, header)| header.through);
        if log_start > 0
            && state_through.is_none_or(|through| log_start > through.saturating_add(1))
        {
            return Err(corrupt(
                &path,
                format!(
                    "the log was compacted below slot {log_start} but the saved state does not reach it ({})",
                    describe_state(state_through)
                ),
            ));
        }
        drop(log_table);
        drop(meta);
        drop(transaction);

        let durable = DurableState {
            membership,
            promised,
            chosen_through,
            log_start,
            log,
            joining,
        };
        let storage = Storage {
            path,
            database: Arc::new(database),
            identity: stored,
            promised,
            chosen_through,
            log_start,
            state_through,
            live_set: live.as_ref().map(|(set, _)| *set),
            staging_set: None,
            last_batch_id: None,
            poison: OnceLock::new(),
        };
        let state = live.map(|(_, header)| header);
        Ok((storage, Recovered { durable, state }))
    }
}

fn describe_state(through: Option<Slot>) -> String {
    match through {
        Some(through) => format!("it covers slots through {through}"),
        None => "none is saved".to_string(),
    }
}

/// redb's options, with its integrity check on every open: every page
/// checksum is verified and the allocator state rebuilt from the trees, so
/// a damaged file is refused at once rather than trusted (after a clean
/// shutdown redb would otherwise load its saved allocator state as it is,
/// and a damaged one panics in a later commit). It costs a read of the
/// whole file, page by page in tree order: 0.4 s at 1,000,000 nodes
/// (490 MB) and 3.8 s at 10,000,000 (3.4 GB) from the page cache, but
/// 132-151 s at 10,000,000 (about 2 GB) when much of the file had left it
/// (random 4 KiB reads). Reading the whole file in order just before
/// opening did not shorten that in the one run tried (132 s), so it was
/// taken out again.
fn builder() -> Builder {
    let mut builder = Builder::new();
    builder
        .set_cache_size(CACHE_BYTES)
        .set_check_integrity_on_open(true);
    builder
}

/// Runs an access to the database, turning a panic inside redb (which its
/// docs allow for a damaged file) into [`StorageError::Corrupt`]: disk
/// input never crashes the replica with a panic, only with an error naming
/// the file.
pub(crate) fn guard_panics<T>(path: &Path, access: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(access)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|message| (*message).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(corrupt(
                path,
                format!("redb panicked on the file's contents: {message}"),
            ))
        }
    }
}

fn corrupt(path: &Path, detail: String) -> StorageError {
    StorageError::Corrupt {
        path: path.to_path_buf(),
        detail,
    }
}

/// Maps any redb error, sorting out the ones with a variant of their own.
fn redb_error(path: &Path, operation: &'static str, error: impl Into<redb::Error>) -> StorageError {
    match error.into() {
        redb::Error::DatabaseAlreadyOpen => StorageError::AlreadyOpen {
            path: path.to_path_buf(),
        },
        redb::Error::Corrupted(detail) => corrupt(path, format!("{operation}: {detail}")),
        source => StorageError::Database {
            path: path.to_path_buf(),
            operation,
            source: Box::new(source),
        },
    }
}

fn open_error(path: &Path, error: DatabaseError) -> StorageError {
    match error {
        // A file that is too short to hold a header is not a database.
        DatabaseError::Storage(redb::StorageError::Io(source))
            if source.kind() == ErrorKind::UnexpectedEof =>
        {
            corrupt(path, format!("not a redb database (too short: {source})"))
        }
        error => redb_error(path, "open the database", error),
    }
}

/// Syncs the directory holding `path`, so that a file created or renamed
/// in it survives a crash.
///
/// # Errors
/// Opening or syncing the directory failed.
pub(crate) fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent).and_then(|directory| directory.sync_all())
}

fn sync_parent_directory(path: &Path) -> Result<()> {
    sync_parent(path).map_err(|source| StorageError::Io {
        path: path.to_path_buf(),
        operation: "sync the data directory",
        source,
    })
}

fn check_initial_state(path: &Path, state: &DurableState) -> Result<()> {
    let refuse = |detail: String| StorageError::Refused {
        path: path.to_path_buf(),
        detail,
    };
    valid_membership(&state.membership).map_err(refuse)?;
    if state.log_start != 0 {
        return Err(refuse(format!(
            "a new database cannot start from a log compacted below slot {}: that needs a snapshot",
            state.log_start
        )));
    }
    if let Some((&first, _)) = state.log.iter().next() {
        if first < state.log_start {
            return Err(refuse(format!(
                "the log holds slot {first} below its start {}",
                state.log_start
            )));
        }
    }
    Ok(())
}

fn write_initial(
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
        put_meta(&mut meta, path, KEY_FORMAT_VERSION, &FORMAT_VERSION)?;
        put_meta(&mut meta, path, KEY_IDENTITY, identity)?;
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

fn put_meta<T: Serialize>(
    table: &mut redb::Table<'_, &'static str, &'static [u8]>,
    path: &Path,
    key: &'static str,
    value: &T,
) -> Result<()> {
    let sealed = seal(&meta_domain(key), value).map_err(|source| StorageError::Encode {
        path: path.to_path_buf(),
        what: key,
        source,
    })?;
    table
        .insert(key, sealed.as_slice())
        .map_err(|error| redb_error(path, "write a meta value", error))?;
    Ok(())
}

fn get_meta<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    path: &Path,
    key: &'static str,
) -> Result<Option<T>> {
    let Some(value) = table
        .get(key)
        .map_err(|error| redb_error(path, "read a meta value", error))?
    else {
        return Ok(None);
    };
    unseal(&meta_domain(key), value.value())
        .map(Some)
        .map_err(|detail| corrupt(path, format!("meta {key:?}: {detail}")))
}

fn require_meta<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    path: &Path,
    key: &'static str,
) -> Result<T> {
    get_meta(table, path, key)?.ok_or_else(|| corrupt(path, format!("meta {key:?} is missing")))
}

/// The committed values of a [`Storage`], as a commit runs through its
/// writes.
struct Mirror {
    last_batch_id: Option<u64>,
    promised: Ballot,
    chosen_through: Slot,
    log_start: Slot,
    membership: Option<Membership>,
    joining: Option<bool>,
    state_through: Option<Slot>,
    live_set: Option<u8>,
    staging_set: Option<u8>,
}

type LogTable<'txn> = redb::Table<'txn, u64, &'static [u8]>;
type MetaTable<'txn> = redb::Table<'txn, &'static str, &'static [u8]>;

/// Writes one batch's log changes (`DurableState::apply`'s rules) against
/// the running log start.
fn write_batch(
    log: &mut LogTable<'_>,
    path: &Path,
    batch: &Persist,
    running: &mut Mirror,
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
        if slot < running.log_start {
            continue;
        }
        let record = LogRecord {
            ballot,
            value: value.clone(),
        };
        put_log_record(log, path, slot, &record)?;
    }
    if let Some(below) = batch
        .compact_below
        .filter(|&below| below > running.log_start)
    {
        log.retain_in::<u64, _>(..below, |_, _| false)
            .map_err(|error| redb_error(path, "compact the log", error))?;
        running.log_start = below;
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

/// Writes one state write (see [`StateWrite`]) against the running sets.
fn write_state(
    transaction: &redb::WriteTransaction,
    meta: &mut MetaTable<'_>,
    path: &Path,
    write: &StateWrite,
    running: &mut Mirror,
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
            let set = *running.live_set.get_or_insert(0);
            put_records(
                set,
                &mut delta
                    .changes
                    .iter()
                    .map(|((table, key), value)| (*table, &key[..], value.as_deref())),
            )?;
            put_meta(meta, path, state::header_key(set), header)?;
            put_meta(meta, path, state::KEY_STATE_LIVE, &set)?;
            running.state_through = Some(header.through);
        }
        StateWrite::StageBegin => {
            let set = running.live_set.map_or(1, |live| 1 - live);
            drop_set(transaction, meta, path, set)?;
            running.staging_set = Some(set);
        }
        StateWrite::Stage(records) => {
            let Some(set) = running.staging_set else {
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
            let Some(set) = running.staging_set.take() else {
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
            if let Some(old) = running.live_set.filter(|&old| old != set) {
                drop_set(transaction, meta, path, old)?;
            }
            running.live_set = Some(set);
            running.state_through = Some(header.through);
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
