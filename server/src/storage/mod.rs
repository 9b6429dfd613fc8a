//! The durable state of one replica, in two redb database files and the
//! log database's journal.
//!
//! [`Storage`] keeps what a replica needs to restart: the Paxos acceptor's
//! promise, its log, the log's bounds and the membership (together a
//! [`DurableState`]) in the *log database*, and the state machine's own
//! tables, saved as entries are applied (DESIGN.md section 3; see
//! `state.rs` for their layout), in the *state database*. At restart the
//! replica loads the saved state, which covers every slot up to `through`,
//! and the Paxos core replays the chosen log after it: a bounded tail,
//! since the log is compacted below the saved state as it advances.
//!
//! # Why two files
//!
//! DESIGN.md section 3 puts the state tables in the log's database,
//! updated in the apply path's group commit. That is how this began, and
//! at a million nodes it stalled every write: redb runs one write
//! transaction at a time, and a state flush (tens of thousands of records
//! inserted, tens of megabytes of pages written: 200-400 ms) held the one
//! writer while every log commit, which each client write waits for,
//! queued behind it. So the state tables have a database of their own,
//! written by a thread of its own ([`StateStore`]), and the log's commits
//! ([`LogStore`]) go on beside a flush. What the one transaction gave for
//! free, the two stores now keep by rule (see the durability contract):
//! the log is compacted only below a state the state database has made
//! durable, and a restart copes with a state saved past the log's chosen
//! prefix.
//!
//! # Why a journal in front of the log database
//!
//! DESIGN.md section 3 makes the acceptor's state durable with a commit of
//! its redb database. That was so until every client write waited on it:
//! a durable redb commit of one small batch writes about 32 KiB (the
//! touched pages of the log and meta tables, redb's allocator trees and
//! its header) and syncs, 0.1 ms alone and 0.25 ms with three replicas on
//! one disk, which was 0.38 ms of a one-writer round trip of 0.57 ms. So a
//! group commit is now one record appended to [`journal::Journal`] and
//! one `fdatasync` (about 50 us), and the batches reach the log database
//! later, without a sync ([`LogStore::write_back`]), with a durable commit
//! now and then (a checkpoint) after which the journal starts over. redb
//! stays the log's home, and what section 3 asks (durable before any
//! answer, group commit, checksums, clear errors) holds of the pair.
//!
//! # Layout
//!
//! Three files in the data directory ([`DatabasePaths::in_dir`]):
//!
//! - [`DATABASE_FILE_NAME`], the log database:
//!   - `synod_meta` (`&str -> bytes`): the format version, the replica's
//!     [`Identity`], the file's role (`log`), the promised ballot,
//!     `chosen_through`, `log_start`, the membership, `joining`, and
//!     `journal_group`, the last journal group the database holds;
//!   - `synod_log` (`u64 slot -> bytes`): one [`LogRecord`] per retained
//!     slot.
//! - [`STATE_DATABASE_FILE_NAME`], the state database:
//!   - `synod_meta`: the format version, the [`Identity`], the role
//!     (`state`), the live set of state tables (`state_live`) and each
//!     set's [`SavedStateHeader`] (`state.0`, `state.1`: the slot it
//!     covers, the membership, the scalars);
//!   - `synod_state_{nodes,sessions,locks}.{0,1}` (`bytes -> bytes`): the
//!     records of the two sets of state tables, one live and one for
//!     staging a snapshot installed from a peer.
//! - [`journal::JOURNAL_FILE_NAME`], the log database's journal: a header
//!   with the format version and [`Identity`], then one sealed record per
//!   group commit not yet checkpointed (see [`journal`]).
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
//! 3. It takes the storage apart ([`Storage::into_parts`]) and gives each
//!    database a writer thread. Each round of the log writer takes every
//!    batch queued so far and calls [`LogStore::commit`] once (one
//!    journal record, one `fsync`), then reports `Node::persisted` with the
//!    last batch id; when nothing is queued, or many batches wait, it calls
//!    [`LogStore::write_back`]. The
//!    state writer folds the state machine's changes and calls
//!    [`StateStore::commit`] now and then, and reports the slot the saved
//!    state reached.
//! 4. Once the saved state covers slot `S`, it calls `Node::compact(S)`, whose
//!    `compact_below` a later log commit writes (refused past `S + 1`). For a
//!    snapshot installed from a peer, it stages the records
//!    ([`StateWrite::StageBegin`], [`StateWrite::Stage`]), makes them live
//!    ([`StateWrite::StageActivate`]) and tells the core
//!    (`Node::snapshot_installed`); the log writer holds the batch that
//!    compacts below the snapshot until the activation is durable
//!    ([`LogStore::wait_for_saved_state`]).
//! 5. On any error it stops the replica, which restarts from step 1.
//!
//! # Durability contract
//!
//! [`StateStore::commit`] runs one redb write transaction with
//! [`redb::Durability::Immediate`] (redb's one-phase-plus-checksum commit:
//! the data, the checksums and the new header are written, then one
//! `fsync`); [`LogStore::commit`] appends one journal record and
//! `fdatasync`s the journal. When either returns `Ok`, everything it was
//! given is on stable storage. [`Storage::commit`] runs the state
//! database's, then the log's. The log database gets the journaled batches
//! in commits with [`redb::Durability::None`] ([`LogStore::write_back`]),
//! which a crash may undo, and in a durable commit at each checkpoint,
//! which also records the last group it holds (`journal_group`); only then
//! is the journal emptied (shrunk and synced). Opening replays the
//! journal's groups above `journal_group` onto the database, so the two
//! together always hold every acknowledged batch, in order.
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
//!    `fsync`). The journal's last record is incomplete or missing, and
//!    [`journal::Journal::open`] cuts it off; the log database rolls back
//!    to its last durable commit (redb finds the previous header, or a new
//!    one whose page checksums do not verify), and the journal holds every
//!    group after it. Every batch of that call is lost together; none was
//!    acknowledged, so no promise or acceptance from them left the replica:
//!    to the cluster it is as if the messages that caused them were lost,
//!    which the protocol tolerates. Batches become durable in id order
//!    because one call writes a whole group as one checksummed record and
//!    calls are sequential. A crash during a write-back or a checkpoint
//!    loses nothing: until the checkpoint's commit is durable, the journal
//!    still holds every group it covers.
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
//!    and the journal, which hold the last successful commit (case 1).
//! 4. **Crash with state changes in flight.** Each state commit is one
//!    transaction, so a saved state never holds half a delta. It may lag
//!    the log by up to a flush interval; the log still holds every slot
//!    after it, because the log refuses to compact past the saved state
//!    (`compact_below` must be at most `through + 1`, `through` being what
//!    the state database has made durable) and the state database refuses
//!    a saved state that would go back or leave a gap before the log. The
//!    state may also be ahead: saved through a slot the log's durable
//!    `chosen_through` has not reached (the two commit apart, and an
//!    installed snapshot is ahead of the log until the core compacts).
//!    Then the log's records at or below it may be acceptances that lost,
//!    which must never be served as chosen: [`Storage::open`] leaves them
//!    out of [`Recovered::durable`] (the log starts after the saved state,
//!    which covers them), and the next compaction removes them. A crash
//!    while a snapshot is staged leaves the old live set, untouched:
//!    staging writes only the other set, and one commit flips
//!    `state_live` and drops the old set. Opening refuses a state database
//!    that does not reach the log's start (an old copy, say). The
//!    crash-image tests take images of both files at every sync of either
//!    and cover all of these, with write-backs and checkpoints between
//!    calls (`server/tests/storage.rs`).
//! 5. **Crash during [`Storage::create`].** The three files are created
//!    with `create_new`; the state database's meta is written in one
//!    durable transaction, the journal's header is written and synced,
//!    then the log database's initial tables and meta in a durable
//!    transaction, after which the directory is synced. A crash before that
//!    leaves no log file, an empty one, or a redb file without Synod meta;
//!    [`Storage::open`] refuses each ([`StorageError::NotFound`],
//!    [`StorageError::NotSynod`] or [`StorageError::Corrupt`], naming the
//!    file), so a half-created replica never votes as if it had an empty
//!    past.
//! 6. **A lost or replaced data directory.** `open` refuses a missing file,
//!    any of the three ([`StorageError::NotFound`]), instead of creating
//!    one: a replica that forgot its promises must not vote. The one
//!    exception is the journal beside a log database without
//!    `journal_group`, written by a build before the journal, which never
//!    had one: it gets an empty journal. Creating a fresh database is a
//!    separate, explicit call that refuses an existing file.
//! 7. **Damage after the fact** (bit rot, a stray tool, a file from another
//!    replica). Opening verifies every redb page checksum (integrity check
//!    on open), the format version, the cluster and node ids (of the
//!    journal too), each file's role (so the two are never swapped), every
//!    journal record's checksum (damage other than a torn last record is
//!    refused, see [`journal`]), and the consistency of meta and
//!    log. Every record (log, meta and state) is
//!    sealed with a CRC-32 over its table, key and payload and checked
//!    whenever it is read, and a full read of a table must give its keys in
//!    strict order and as many as redb's header for the table counts
//!    (`state::KeyOrder`). Any failure is refused with an error naming the
//!    file. A redb panic on damaged data, while opening, reading or
//!    committing, is caught and reported as [`StorageError::Corrupt`] (this
//!    needs the default `panic = "unwind"`). Single flipped bits are tested
//!    to be refused or harmless (`server/tests/storage.rs`).
//! 8. **Two processes on one data directory.** redb locks each file; the
//!    second open fails with [`StorageError::AlreadyOpen`].

mod codec;
mod error;
pub mod journal;
mod log;
mod state;
mod state_store;

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use redb::backends::FileBackend;
use redb::{Builder, Database, DatabaseError, ReadableTable, StorageBackend, TableError};
use serde::{Deserialize, Serialize};
use synod_paxos::{DurableState, Persist, Slot};

use codec::{
    meta_domain, seal, unseal, valid_membership, FORMAT_VERSION, KEY_FORMAT_VERSION, KEY_IDENTITY,
    KEY_ROLE, META,
};
pub use error::{Result, StorageError};
use journal::Journal;
use log::JournalFound;
pub use log::LogStore;
pub use state::{
    SavedStateHeader, StateDelta, StateKey, StateReader, StateRecordRef, StateTable, StateWrite,
};
pub use state_store::StateStore;

/// The log database's file name inside a replica's data directory.
pub const DATABASE_FILE_NAME: &str = "synod.redb";

/// The state database's file name inside a replica's data directory.
pub const STATE_DATABASE_FILE_NAME: &str = "synod-state.redb";

/// redb's page cache for the log database (half of it at most for a
/// commit's dirty pages): the log is small, and its commits touch its end.
const LOG_CACHE_BYTES: usize = 16 << 20;

/// redb's page cache for the state database. Reads are served from memory
/// by the state machine, so the cache only speeds up state flushes and
/// restarts; the operating system caches the file as well.
const STATE_CACHE_BYTES: usize = 32 << 20;

/// The files of one replica: two databases and the log's journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabasePaths {
    /// The log database: promise, log, bounds, membership.
    pub log: PathBuf,
    /// The state database: the state machine's tables.
    pub state: PathBuf,
    /// The log database's write-ahead journal ([`journal`]).
    pub journal: PathBuf,
}

impl DatabasePaths {
    /// The files of a replica whose data directory is `data_dir`.
    pub fn in_dir(data_dir: &Path) -> DatabasePaths {
        DatabasePaths {
            log: data_dir.join(DATABASE_FILE_NAME),
            state: data_dir.join(STATE_DATABASE_FILE_NAME),
            journal: data_dir.join(journal::JOURNAL_FILE_NAME),
        }
    }

    /// The same files with `suffix` appended to their names (where a
    /// restore builds them before moving them into place).
    pub fn with_suffix(&self, suffix: &str) -> DatabasePaths {
        let suffixed = |path: &Path| {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        DatabasePaths {
            log: suffixed(&self.log),
            state: suffixed(&self.state),
            journal: suffixed(&self.journal),
        }
    }

    /// The bytes the files take, as far as they exist.
    pub fn bytes(&self) -> u64 {
        [&self.log, &self.state, &self.journal]
            .into_iter()
            .filter_map(|path| std::fs::metadata(path).ok())
            .map(|metadata| metadata.len())
            .sum()
    }
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
    /// The Paxos core's durable state, as the acknowledged batches left
    /// it (see [`DurableState::apply`]), less any log at or below a saved
    /// state that got ahead of the log's chosen prefix (durability case 4).
    pub durable: DurableState,
    /// The header of the saved state machine, if any. Load its records
    /// with [`Storage::read_state`] and start the core with
    /// `apply_from = through + 1` (`Node::new` checks that the log covers
    /// every chosen slot from there); without one, start the state machine
    /// empty and replay the log from its start.
    pub state: Option<SavedStateHeader>,
}

/// One write of a [`Storage::commit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// A batch of the Paxos core.
    Persist(Persist),
    /// A change to the state machine's tables.
    State(StateWrite),
}

/// What the two databases of a replica tell each other: the slot the state
/// database has durably saved through (the log may be compacted below it),
/// and the log's durable start (a saved state may not leave a gap before
/// it).
#[derive(Debug, Default)]
pub(crate) struct Shared {
    saved: Mutex<SavedProgress>,
    changed: Condvar,
    log_start: AtomicU64,
}

#[derive(Debug, Default)]
struct SavedProgress {
    through: Option<Slot>,
    /// The state database closed or failed: nothing more will be saved.
    closed: bool,
}

impl Shared {
    fn progress(&self) -> std::sync::MutexGuard<'_, SavedProgress> {
        self.saved
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn saved_through(&self) -> Option<Slot> {
        self.progress().through
    }

    fn publish_saved(&self, through: Slot) {
        let mut progress = self.progress();
        progress.through = Some(progress.through.map_or(through, |old| old.max(through)));
        self.changed.notify_all();
    }

    fn close_state(&self) {
        self.progress().closed = true;
        self.changed.notify_all();
    }

    /// Waits until a state through at least `through` is saved; `false`
    /// if the state database closed first.
    fn wait_saved(&self, through: Slot) -> bool {
        let mut progress = self.progress();
        loop {
            if progress.through.is_some_and(|saved| saved >= through) {
                return true;
            }
            if progress.closed {
                return false;
            }
            progress = self
                .changed
                .wait(progress)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn log_start(&self) -> Slot {
        self.log_start.load(Ordering::Acquire)
    }

    fn publish_log_start(&self, log_start: Slot) {
        self.log_start.fetch_max(log_start, Ordering::AcqRel);
    }
}

/// One replica's durable state in its two redb databases, as one handle.
///
/// Tests and offline tools use it whole; a running replica takes it apart
/// ([`Storage::into_parts`]) and gives each database a writer thread of
/// its own.
///
/// Getters: [`Storage::path`], [`Storage::state_path`],
/// [`Storage::identity`], [`Storage::poisoned`]. Constructors:
/// [`Storage::create`] and [`Storage::open`] for files, with
/// `*_with_backends` variants for any redb [`StorageBackend`]s (tests use
/// in-memory ones). Writes: [`Storage::commit`] (and [`Storage::persist`]
/// for batches alone), durable when they return. Reads:
/// [`Storage::read_state`], and from other threads through
/// [`Storage::state_reader`].
///
/// Fail-stop: the first error from any method poisons the `Storage`, and
/// every later call returns [`StorageError::Poisoned`]. The replica must then
/// exit and reopen the files.
#[derive(Debug)]
pub struct Storage {
    log: LogStore,
    state: StateStore,
}

impl Storage {
    /// Creates a brand-new pair of database files at `paths` for a replica
    /// that starts from `state` (normally [`DurableState::bootstrap`]),
    /// records `identity` and the format version in each, and makes it all
    /// durable, including the directory entries, before returning. The
    /// state database is written first and the log database last, so a
    /// crash part way leaves a log database that is missing, empty or
    /// without meta, which [`Storage::open`] refuses.
    ///
    /// # Errors
    /// [`StorageError::AlreadyExists`] if anything is at either path (an
    /// existing database is never overwritten); [`StorageError::Refused`]
    /// if `state` is not a valid starting state (an invalid membership, log
    /// entries below `log_start`, or a compacted log, which would need a
    /// snapshot); I/O and redb errors. On error the new files are removed.
    pub fn create(
        paths: &DatabasePaths,
        identity: Identity,
        state: &DurableState,
    ) -> Result<Storage> {
        check_initial_state(&paths.log, state)?;
        let log_file = create_file(&paths.log)?;
        let mut made = vec![&paths.log];
        let created = (|| {
            let state_file = create_file(&paths.state)?;
            made.push(&paths.state);
            let journal_file = create_file(&paths.journal)?;
            made.push(&paths.journal);
            let log_backend = FileBackend::new(log_file)
                .map_err(|error| redb_error(&paths.log, "open the new database file", error))?;
            let state_backend = FileBackend::new(state_file)
                .map_err(|error| redb_error(&paths.state, "open the new database file", error))?;
            let journal_backend = FileBackend::new(journal_file)
                .map_err(|error| redb_error(&paths.journal, "open the new journal file", error))?;
            let storage = Storage::create_with_backends(
                log_backend,
                state_backend,
                journal_backend,
                paths,
                identity,
                state,
            )?;
            sync_parent_directory(&paths.log)?;
            Ok(storage)
        })();
        if created.is_err() {
            // Best effort: the files hold no acknowledged state, and leaving
            // them would make the next `create` fail for no reason.
            for path in made {
                let _ = std::fs::remove_file(path);
            }
        }
        created
    }

    /// Like [`Storage::create`], on any redb backends (the journal's
    /// included), which must be empty. `paths` only name the files in
    /// errors.
    ///
    /// # Errors
    /// [`StorageError::AlreadyExists`] if a backend is not empty;
    /// [`StorageError::Refused`] for an invalid `state`; redb errors.
    pub fn create_with_backends(
        log_backend: impl StorageBackend,
        state_backend: impl StorageBackend,
        journal_backend: impl StorageBackend,
        paths: &DatabasePaths,
        identity: Identity,
        state: &DurableState,
    ) -> Result<Storage> {
        for (backend_len, path) in [
            (log_backend.len(), &paths.log),
            (state_backend.len(), &paths.state),
            (journal_backend.len(), &paths.journal),
        ] {
            let length = backend_len
                .map_err(|error| redb_error(path, "read the backend's length", error))?;
            if length != 0 {
                return Err(StorageError::AlreadyExists { path: path.clone() });
            }
        }
        check_initial_state(&paths.log, state)?;
        let shared = Arc::new(Shared::default());
        let state_database = builder(STATE_CACHE_BYTES)
            .create_with_backend(state_backend)
            .map_err(|error| open_error(&paths.state, error))?;
        state_store::write_initial(&state_database, &paths.state, &identity)?;
        let journal = Journal::create(journal_backend, &paths.journal, &identity)?;
        let log_database = builder(LOG_CACHE_BYTES)
            .create_with_backend(log_backend)
            .map_err(|error| open_error(&paths.log, error))?;
        log::write_initial(&log_database, &paths.log, &identity, state)?;
        Ok(Storage {
            log: log::created(
                log_database,
                paths.log.clone(),
                identity,
                state,
                journal,
                shared.clone(),
            ),
            state: state_store::created(state_database, paths.state.clone(), shared),
        })
    }

    /// Opens the existing databases at `paths`, checks that they belong to
    /// `identity`, to each other and are intact, and returns what a restart
    /// needs.
    ///
    /// Every redb page checksum and every log record's CRC-32 is verified,
    /// so this reads both files whole (the state records' CRCs are checked
    /// as the loader reads them).
    ///
    /// # Errors
    /// Each names the file: [`StorageError::NotFound`] if a file is
    /// missing; [`StorageError::AlreadyOpen`] if another process or
    /// `Storage` has it open; [`StorageError::Corrupt`] for a file that is
    /// not a database, fails a checksum, does not decode, is the other of
    /// the two, or is inconsistent with the other; [`StorageError::NotSynod`]
    /// for a redb database without Synod meta (such as one whose creation
    /// crashed); [`StorageError::FormatVersion`],
    /// [`StorageError::WrongCluster`], [`StorageError::WrongNode`]; I/O and
    /// redb errors.
    pub fn open(paths: &DatabasePaths, identity: &Identity) -> Result<(Storage, Recovered)> {
        let shared = Arc::new(Shared::default());
        let journal_created = std::cell::Cell::new(false);
        let log = open_file(&paths.log, LOG_CACHE_BYTES, |database| {
            log::recover(
                database,
                paths.log.clone(),
                identity,
                shared.clone(),
                || {
                    let (journal, created) = open_journal_file(&paths.journal, identity)?;
                    journal_created.set(created);
                    Ok(journal)
                },
            )
        });
        if log.is_err() && journal_created.get() {
            // Leave the directory as it was found.
            let _ = std::fs::remove_file(&paths.journal);
        }
        let (log, durable) = log?;
        let (state, header) = open_file(&paths.state, STATE_CACHE_BYTES, |database| {
            state_store::recover(database, paths.state.clone(), identity, shared.clone())
        })?;
        Storage::assemble(log, durable, state, header)
    }

    /// Like [`Storage::open`], on any redb backends (the journal's
    /// included). `paths` only name the files in errors.
    ///
    /// # Errors
    /// As [`Storage::open`]; an empty database backend is
    /// [`StorageError::NotFound`], and so is an empty journal backend
    /// beside a log database that had a journal.
    pub fn open_with_backends(
        log_backend: impl StorageBackend,
        state_backend: impl StorageBackend,
        journal_backend: impl StorageBackend,
        paths: &DatabasePaths,
        identity: &Identity,
    ) -> Result<(Storage, Recovered)> {
        let shared = Arc::new(Shared::default());
        let open_journal = || {
            let journal_length = journal_backend
                .len()
                .map_err(|error| redb_error(&paths.journal, "read the backend's length", error))?;
            if journal_length == 0 {
                let journal = Journal::create(journal_backend, &paths.journal, identity)?;
                Ok(JournalFound::Created(journal))
            } else {
                let (journal, groups) = Journal::open(journal_backend, &paths.journal, identity)?;
                Ok(JournalFound::Opened(journal, groups))
            }
        };
        let (log, durable) = open_backend(log_backend, &paths.log, LOG_CACHE_BYTES, |database| {
            log::recover(
                database,
                paths.log.clone(),
                identity,
                shared.clone(),
                open_journal,
            )
        })?;
        let (state, header) =
            open_backend(state_backend, &paths.state, STATE_CACHE_BYTES, |database| {
                state_store::recover(database, paths.state.clone(), identity, shared.clone())
            })?;
        Storage::assemble(log, durable, state, header)
    }

    /// Checks the two databases against each other and says what to
    /// restart from (durability case 4).
    fn assemble(
        log: LogStore,
        mut durable: DurableState,
        state: StateStore,
        header: Option<SavedStateHeader>,
    ) -> Result<(Storage, Recovered)> {
        let state_through = header.as_ref().map(|header| header.through);
        if durable.log_start > 0
            && state_through.is_none_or(|through| durable.log_start > through.saturating_add(1))
        {
            return Err(corrupt(
                state.path(),
                format!(
                    "the log ({}) was compacted below slot {} but the saved state does not reach it ({})",
                    log.path().display(),
                    durable.log_start,
                    describe_state(state_through)
                ),
            ));
        }
        if let Some(through) = state_through.filter(|&through| through > durable.chosen_through) {
            // The state was saved past what the log knows to be chosen: the
            // log's records at or below it may be acceptances that lost,
            // which must never be served as chosen. The state covers them.
            durable.log = durable.log.split_off(&(through + 1));
            durable.log_start = through + 1;
            durable.chosen_through = through;
        }
        Ok((
            Storage { log, state },
            Recovered {
                durable,
                state: header,
            },
        ))
    }

    /// The log database file (or the name given for a backend).
    pub fn path(&self) -> &Path {
        self.log.path()
    }

    /// The state database file (or the name given for a backend).
    pub fn state_path(&self) -> &Path {
        self.state.path()
    }

    /// The identity recorded in the databases, which matched the caller's.
    pub fn identity(&self) -> &Identity {
        self.log.identity()
    }

    /// The first error this `Storage` returned, if any: once set, every call
    /// fails and the replica must restart from disk.
    pub fn poisoned(&self) -> Option<&str> {
        self.log.poisoned().or_else(|| self.state.poisoned())
    }

    /// Makes `batches` durable in the log database (see
    /// [`LogStore::commit`]): one journal record with one `fsync`.
    ///
    /// # Errors
    /// As [`Storage::commit`].
    pub fn persist(&mut self, batches: &[Persist]) -> Result<()> {
        let writes: Vec<Write> = batches.iter().cloned().map(Write::Persist).collect();
        self.commit(&writes)
    }

    /// Makes `writes` durable: the state writes in one transaction of the
    /// state database ([`StateStore::commit`]), then the batches in one of
    /// the log database ([`LogStore::commit`]), checked against the state
    /// the state writes leave. Everything is checked before anything is
    /// written. A crash before it returns keeps, for each database, all of
    /// its writes or none, and never the batches without the state writes.
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
        let states: Vec<&StateWrite> = writes
            .iter()
            .filter_map(|write| match write {
                Write::State(state) => Some(state),
                Write::Persist(_) => None,
            })
            .collect();
        let batches: Vec<&Persist> = writes
            .iter()
            .filter_map(|write| match write {
                Write::Persist(batch) => Some(batch),
                Write::State(_) => None,
            })
            .collect();
        let result = (|| {
            let after = self.state.check(&states, self.log.log_start)?;
            self.log.check(&batches, after.state_through)?;
            self.state.commit(&states)?;
            self.log.commit(&batches)
        })();
        if let Err(error) = &result {
            let cause = error.to_string();
            self.log.poison(&cause);
            self.state.poison(&cause);
        }
        result
    }

    /// Writes the journaled batches to the log database, checkpointing if
    /// one is due (see [`LogStore::write_back`]); returns whether it
    /// checkpointed.
    ///
    /// # Errors
    /// As [`LogStore::write_back`]; any error poisons both databases.
    pub fn write_back(&mut self) -> Result<bool> {
        self.check_live()?;
        let result = self.log.write_back();
        if let Err(error) = &result {
            self.state.poison(&error.to_string());
        }
        result
    }

    /// Checkpoints the log database now (see [`LogStore::checkpoint`]).
    ///
    /// # Errors
    /// As [`LogStore::checkpoint`]; any error poisons both databases.
    pub fn checkpoint(&mut self) -> Result<()> {
        self.check_live()?;
        let result = self.log.checkpoint();
        if let Err(error) = &result {
            self.state.poison(&error.to_string());
        }
        result
    }

    /// The slot the saved state covers, if one is saved.
    pub fn state_through(&self) -> Option<Slot> {
        self.state.state_through()
    }

    /// Reads the saved state's records (see [`StateStore::read_state`]).
    ///
    /// # Errors
    /// As [`StateReader::read`]; [`StorageError::Poisoned`] after an
    /// earlier error. Any error poisons.
    pub fn read_state(
        &self,
        visit: &mut dyn FnMut(StateRecordRef<'_>) -> std::result::Result<(), String>,
    ) -> Result<Option<SavedStateHeader>> {
        self.check_live()?;
        self.state.read_state(visit)
    }

    /// A handle for reading the saved state from another thread while this
    /// `Storage` keeps writing.
    pub fn state_reader(&self) -> StateReader {
        self.state.reader()
    }

    /// The two databases, for a writer thread each. The log database waits
    /// for the state database's saves before it compacts
    /// ([`LogStore::wait_for_saved_state`]).
    pub fn into_parts(self) -> (LogStore, StateStore) {
        (self.log, self.state)
    }

    /// Closes both databases, reporting any error that dropping them would
    /// ignore. Everything acknowledged was already durable.
    ///
    /// # Errors
    /// redb's error from closing; [`StorageError::Poisoned`] after an
    /// earlier error.
    pub fn close(self) -> Result<()> {
        self.check_live()?;
        let state = self.state.close();
        let log = self.log.close();
        state.and(log)
    }

    fn check_live(&self) -> Result<()> {
        self.log.check_live()?;
        self.state.check_live()
    }
}

/// The first error a store returned: once set, every call fails
/// (fail-stop).
#[derive(Debug, Default)]
pub(crate) struct Poison(OnceLock<String>);

impl Poison {
    fn cause(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }

    fn set(&self, cause: &str) {
        let _ = self.0.set(cause.to_string());
    }

    /// `Ok` while nothing failed, then [`StorageError::Poisoned`] naming
    /// `path` and the first error.
    fn check(&self, path: &Path) -> Result<()> {
        match self.0.get() {
            Some(cause) => Err(StorageError::Poisoned {
                path: path.to_path_buf(),
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }
}

/// A write refused before anything was written.
fn refused(path: &Path, detail: String) -> StorageError {
    StorageError::Refused {
        path: path.to_path_buf(),
        detail,
    }
}

/// Creates a new, empty file for a database, refusing an existing one.
fn create_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| match source.kind() {
            ErrorKind::AlreadyExists => StorageError::AlreadyExists {
                path: path.to_path_buf(),
            },
            _ => StorageError::Io {
                path: path.to_path_buf(),
                operation: "create the database file",
                source,
            },
        })
}

/// Opens the journal file, or creates one when there is none (for a log
/// database written before the journal; `log::recover` refuses a missing
/// journal beside one that had it). Says whether it was created.
fn open_journal_file(path: &Path, identity: &Identity) -> Result<(JournalFound, bool)> {
    let existing = OpenOptions::new().read(true).write(true).open(path);
    match existing {
        Ok(file) => {
            let backend = FileBackend::new(file)
                .map_err(|error| redb_error(path, "open the journal file", error))?;
            let (journal, groups) = Journal::open(backend, path, identity)?;
            Ok((JournalFound::Opened(journal, groups), false))
        }
        Err(error) if error.kind() == ErrorKind::NotFound => {
            let file = create_file(path)?;
            let created = FileBackend::new(file)
                .map_err(|error| redb_error(path, "open the new journal file", error))
                .and_then(|backend| Journal::create(backend, path, identity))
                .and_then(|journal| {
                    sync_parent_directory(path)?;
                    Ok(journal)
                });
            match created {
                Ok(journal) => Ok((JournalFound::Created(journal), true)),
                Err(error) => {
                    let _ = std::fs::remove_file(path);
                    Err(error)
                }
            }
        }
        Err(source) => Err(StorageError::Io {
            path: path.to_path_buf(),
            operation: "open the journal file",
            source,
        }),
    }
}

/// Opens one existing database file and recovers it with `recover`,
/// logging how long the open (redb's integrity check) and the recovery
/// took.
fn open_file<T>(
    path: &Path,
    cache_bytes: usize,
    recover: impl FnOnce(Database) -> Result<T>,
) -> Result<T> {
    let metadata = std::fs::metadata(path).map_err(|source| match source.kind() {
        ErrorKind::NotFound => StorageError::NotFound {
            path: path.to_path_buf(),
        },
        _ => StorageError::Io {
            path: path.to_path_buf(),
            operation: "inspect the database file",
            source,
        },
    })?;
    if metadata.len() == 0 {
        return Err(StorageError::NotSynod {
            path: path.to_path_buf(),
            detail: "the file is empty (did creating it crash?)".to_string(),
        });
    }
    guard_panics(path, || {
        let started = Instant::now();
        let database = builder(cache_bytes)
            .open(path)
            .map_err(|error| open_error(path, error))?;
        let checked_ms = started.elapsed().as_millis() as u64;
        let recovered = recover(database)?;
        tracing::info!(
            path = %path.display(),
            bytes = metadata.len(),
            checked_ms,
            recovered_ms = started.elapsed().as_millis() as u64 - checked_ms,
            "database opened"
        );
        Ok(recovered)
    })
}

/// Opens one database on a backend and recovers it with `recover`.
fn open_backend<T>(
    backend: impl StorageBackend,
    path: &Path,
    cache_bytes: usize,
    recover: impl FnOnce(Database) -> Result<T>,
) -> Result<T> {
    let length = backend
        .len()
        .map_err(|error| redb_error(path, "read the backend's length", error))?;
    if length == 0 {
        return Err(StorageError::NotFound {
            path: path.to_path_buf(),
        });
    }
    guard_panics(path, || {
        let database = builder(cache_bytes)
            .create_with_backend(backend)
            .map_err(|error| open_error(path, error))?;
        recover(database)
    })
}

/// Opens a database's meta table, which every Synod database has.
fn open_meta(
    transaction: &redb::ReadTransaction,
    path: &Path,
) -> Result<redb::ReadOnlyTable<&'static str, &'static [u8]>> {
    match transaction.open_table(META) {
        Ok(table) => Ok(table),
        Err(TableError::TableDoesNotExist(_)) => Err(StorageError::NotSynod {
            path: path.to_path_buf(),
            detail: "it has no meta table (did creating it crash?)".to_string(),
        }),
        Err(error) => Err(redb_error(path, "open the meta table", error)),
    }
}

/// Writes what every Synod database's meta starts with: the format version,
/// the identity and the file's role.
fn put_header_meta(
    meta: &mut redb::Table<'_, &'static str, &'static [u8]>,
    path: &Path,
    identity: &Identity,
    role: &'static str,
) -> Result<()> {
    put_meta(meta, path, KEY_FORMAT_VERSION, &FORMAT_VERSION)?;
    put_meta(meta, path, KEY_IDENTITY, identity)?;
    put_meta(meta, path, KEY_ROLE, &role)
}

/// Checks what every Synod database's meta starts with against this build,
/// `identity` and the `role` the file is opened as; returns the identity.
fn check_header_meta(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    path: &Path,
    identity: &Identity,
    role: &'static str,
) -> Result<Identity> {
    let Some(version) = get_meta::<u32>(meta, path, KEY_FORMAT_VERSION)? else {
        return Err(StorageError::NotSynod {
            path: path.to_path_buf(),
            detail: "it has no format version (did creating it crash?)".to_string(),
        });
    };
    if version != FORMAT_VERSION {
        return Err(StorageError::FormatVersion {
            path: path.to_path_buf(),
            found: version,
            expected: FORMAT_VERSION,
        });
    }
    let stored: Identity = require_meta(meta, path, KEY_IDENTITY)?;
    if stored.cluster_id != identity.cluster_id {
        return Err(StorageError::WrongCluster {
            path: path.to_path_buf(),
            found: stored.cluster_id,
            expected: identity.cluster_id.clone(),
        });
    }
    if stored.node_id != identity.node_id {
        return Err(StorageError::WrongNode {
            path: path.to_path_buf(),
            found: stored.node_id,
            expected: identity.node_id,
        });
    }
    let found: String = require_meta(meta, path, KEY_ROLE)?;
    if found != role {
        return Err(corrupt(
            path,
            format!("it is a replica's {found} database, opened as its {role} database"),
        ));
    }
    Ok(stored)
}

pub(super) fn describe_state(through: Option<Slot>) -> String {
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
fn builder(cache_bytes: usize) -> Builder {
    let mut builder = Builder::new();
    builder
        .set_cache_size(cache_bytes)
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

pub(super) fn corrupt(path: &Path, detail: String) -> StorageError {
    StorageError::Corrupt {
        path: path.to_path_buf(),
        detail,
    }
}

/// Maps any redb error, sorting out the ones with a variant of their own.
pub(super) fn redb_error(
    path: &Path,
    operation: &'static str,
    error: impl Into<redb::Error>,
) -> StorageError {
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
    // From slot 0, no slot of the log can be below its start.
    Ok(())
}

pub(super) fn put_meta<T: Serialize>(
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

pub(super) fn get_meta<T: serde::de::DeserializeOwned>(
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

pub(super) fn require_meta<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    path: &Path,
    key: &'static str,
) -> Result<T> {
    get_meta(table, path, key)?.ok_or_else(|| corrupt(path, format!("meta {key:?} is missing")))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{sync_parent, sync_parent_directory, Shared, StorageError};

    #[test]
    fn a_directory_that_cannot_be_synced_is_an_error() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let file = directory.path().join("synod.redb");
        sync_parent(&file).expect("an existing directory syncs");
        let missing = directory.path().join("gone").join("synod.redb");
        assert!(sync_parent(&missing).is_err());
        let error = sync_parent_directory(&missing).expect_err("refused");
        assert!(
            matches!(&error, StorageError::Io { path, operation, .. }
                if path == &missing && operation.contains("sync the data directory")),
            "{error}"
        );
        sync_parent(Path::new("synod.redb")).expect("a bare name syncs the working directory");
    }

    #[test]
    fn shared_progress_only_moves_forward_and_ends_at_close() {
        let shared = Shared::default();
        assert_eq!(shared.log_start(), 0);
        shared.publish_log_start(5);
        shared.publish_log_start(3);
        assert_eq!(shared.log_start(), 5, "the log's start never goes back");
        assert_eq!(shared.saved_through(), None);
        shared.publish_saved(4);
        shared.publish_saved(2);
        assert_eq!(shared.saved_through(), Some(4), "nor the saved state");
        assert!(shared.wait_saved(3));
        assert!(shared.wait_saved(4));
        shared.close_state();
        assert!(!shared.wait_saved(9), "nothing more is saved once closed");
    }
}
