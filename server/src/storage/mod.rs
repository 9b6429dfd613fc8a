//! The durable state of one replica, in one redb database file.
//!
//! [`Storage`] keeps what a replica needs to restart: the Paxos acceptor's
//! promise, its log, the log's bounds and the membership (together a
//! [`DurableState`]), and the last saved snapshot of the state machine
//! ([`SavedSnapshot`]). At restart the replica restores the snapshot, which
//! covers every slot up to `through`, and the Paxos core replays the chosen
//! log after it.
//!
//! # Layout
//!
//! One file, conventionally [`database_path`]`(data_dir)`, with four tables:
//!
//! - `synod_meta` (`&str -> bytes`): the format version, the replica's
//!   [`Identity`], the promised ballot, `chosen_through`, `log_start` and the
//!   membership.
//! - `synod_log` (`u64 slot -> bytes`): one [`LogRecord`] per retained slot.
//! - `synod_snapshot` (`&str -> bytes`): the saved snapshot's header (the slot
//!   it covers, the membership in force, its length and CRC-32).
//! - `synod_snapshot_chunks` (`u64 -> bytes`): the snapshot bytes in 1 MiB
//!   chunks.
//!
//! Values are postcard-encoded. Every meta value, log record and snapshot
//! header is followed by a CRC-32 over the table and key it belongs under and
//! its encoding, verified on every read; the snapshot bytes are covered by the
//! CRC-32 in the header. redb checksums its own pages (which catches a torn
//! commit); ours catch a value that redb stored faithfully but that is wrong.
//!
//! # Use by the replica
//!
//! 1. A brand-new member calls [`Storage::create`] with
//!    [`DurableState::bootstrap`]; every later start calls [`Storage::open`],
//!    which never creates anything.
//! 2. It restores [`Recovered::snapshot`] into the state machine, if any, and
//!    starts the core with `Node::new(config, recovered.durable, through + 1,
//!    now)`.
//! 3. Each round of the writer takes every `Persist` batch queued so far,
//!    calls [`Storage::persist`] once (one `fsync`), and then reports
//!    `Node::persisted` with the last id.
//! 4. To compact, it first saves a snapshot through `S` with
//!    [`Storage::save_snapshot`], and only then calls `Node::compact(S)` (or,
//!    for a snapshot installed from the leader, `Node::snapshot_installed`),
//!    whose `compact_below` the next `persist` writes.
//! 5. On any error it stops the replica, which restarts from step 1.
//!
//! # Durability contract
//!
//! [`Storage::persist`] and [`Storage::save_snapshot`] each run one redb
//! write transaction with [`redb::Durability::Immediate`]: when they return
//! `Ok`, everything they were given is on stable storage (redb's
//! one-phase-plus-checksum commit: the data, the checksums and the new
//! header are written, then one `fsync`). The driver calls
//! `Node::persisted(id)` only after `persist` returned `Ok` for that batch,
//! and the core sends no message that depends on a batch before that. The
//! crash cases, and why each is safe:
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
//! 4. **Crash during [`Storage::save_snapshot`].** One transaction replaces
//!    header and chunks together: reopen finds the old snapshot or the new
//!    one, never a mix. `persist` refuses to compact the log past the saved
//!    snapshot (`compact_below` must be at most `through + 1`), so the log is
//!    trimmed only after a snapshot covering the trimmed slots is durable, and
//!    snapshot plus log tail always cover every chosen slot.
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
//!    on open), every record's CRC-32, the format version, the cluster and
//!    node ids, and the consistency of meta and log; any failure is refused
//!    with an error naming the file. A redb panic while opening damaged data
//!    is caught and reported as [`StorageError::Corrupt`] (this needs the
//!    default `panic = "unwind"`). Single flipped bits are tested to be
//!    refused or harmless (`server/tests/storage.rs`).
//! 8. **Two processes on one file.** redb locks the file; the second open
//!    fails with [`StorageError::AlreadyOpen`].

mod codec;
mod error;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use redb::backends::FileBackend;
use redb::{
    Builder, Database, DatabaseError, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, StorageBackend, TableError,
};
use serde::{Deserialize, Serialize};
use synod_paxos::{Ballot, DurableState, LogRecord, Membership, Persist, Slot};

use codec::{
    log_domain, meta_domain, seal, snapshot_domain, unseal, valid_membership, SnapshotHeader,
    FORMAT_VERSION, KEY_CHOSEN_THROUGH, KEY_FORMAT_VERSION, KEY_IDENTITY, KEY_JOINING,
    KEY_LOG_START, KEY_MEMBERSHIP, KEY_PROMISED, LOG, META, SNAPSHOT, SNAPSHOT_CHUNKS,
    SNAPSHOT_CHUNK_BYTES_MAX, SNAPSHOT_HEADER_KEY,
};
pub use error::{Result, StorageError};

/// The database file's name inside a replica's data directory.
pub const DATABASE_FILE_NAME: &str = "synod.redb";

/// redb's page cache. Reads are served from memory by the state machine, so
/// the cache only speeds up commits and restarts.
const CACHE_BYTES: usize = 64 << 20;

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

/// A snapshot of the state machine as saved on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedSnapshot {
    /// The snapshot covers every slot up to and including this one.
    pub through: Slot,
    /// The membership in force after `through`.
    pub membership: Membership,
    /// The state machine's snapshot bytes, exactly as saved.
    pub bytes: Vec<u8>,
}

/// What [`Storage::open`] found on disk: everything a replica restarts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovered {
    /// The Paxos core's durable state, exactly as the acknowledged batches
    /// left it (see [`DurableState::apply`]).
    pub durable: DurableState,
    /// The last saved snapshot, if any. Restore it and start the core with
    /// `apply_from = through + 1` (`Node::new` checks that the log covers
    /// every chosen slot from there); without one, start the state machine
    /// empty and replay the log from its start.
    pub snapshot: Option<SavedSnapshot>,
}

/// One replica's durable state in a redb database.
///
/// Getters: [`Storage::path`], [`Storage::identity`], [`Storage::poisoned`].
/// Constructors: [`Storage::create`] and [`Storage::open`] for a file, with
/// `*_with_backend` variants for any redb [`StorageBackend`] (tests use
/// in-memory ones). Writes: [`Storage::persist`], [`Storage::save_snapshot`],
/// both durable when they return. Reads: [`Storage::load_snapshot`].
///
/// Fail-stop: the first error from any method poisons the `Storage`, and
/// every later call returns [`StorageError::Poisoned`]. The replica must then
/// exit and reopen the file.
#[derive(Debug)]
pub struct Storage {
    path: PathBuf,
    database: Database,
    identity: Identity,
    /// The committed meta values, mirrored so that a batch's effects can be
    /// computed without reading them back. Valid while not poisoned.
    promised: Ballot,
    chosen_through: Slot,
    log_start: Slot,
    /// The slot the saved snapshot covers through, if one is saved.
    snapshot_through: Option<Slot>,
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
            database,
            identity,
            promised: state.promised,
            chosen_through: state.chosen_through,
            log_start: state.log_start,
            snapshot_through: None,
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
    /// `Storage`. A batch may compact the log only below the saved snapshot
    /// (`compact_below <= through + 1`), so that snapshot and log tail always
    /// cover every chosen slot.
    ///
    /// # Errors
    /// [`StorageError::Refused`] (nothing written) for ids out of order, a
    /// compaction past the saved snapshot, or an invalid membership;
    /// [`StorageError::Database`] if a write or the commit failed; always
    /// [`StorageError::Poisoned`] after an earlier error. Any error poisons.
    pub fn persist(&mut self, batches: &[Persist]) -> Result<()> {
        self.check_live()?;
        let result = self.persist_batches(batches);
        self.poison_on_error(result)
    }

    /// Saves `bytes`, a snapshot of the state machine covering every slot up
    /// to `through` with `membership` in force after it, replacing any
    /// previous snapshot. Durable when it returns `Ok`; a crash before keeps
    /// the old snapshot or the new one, never a mix.
    ///
    /// # Errors
    /// [`StorageError::Refused`] (nothing written) if the log was already
    /// compacted past `through + 1` (the slots in between would be covered by
    /// nothing) or `membership` is invalid; [`StorageError::Database`] if a
    /// write or the commit failed; [`StorageError::Poisoned`] after an
    /// earlier error. Any error poisons.
    pub fn save_snapshot(
        &mut self,
        through: Slot,
        membership: &Membership,
        bytes: &[u8],
    ) -> Result<()> {
        self.check_live()?;
        let result = self.write_snapshot(through, membership, bytes);
        self.poison_on_error(result)
    }

    /// Reads the saved snapshot in a read transaction (for sending it to a
    /// lagging replica), verifying its length and CRC-32.
    ///
    /// # Errors
    /// [`StorageError::Corrupt`] for a damaged snapshot; redb errors;
    /// [`StorageError::Poisoned`] after an earlier error. Any error poisons.
    pub fn load_snapshot(&self) -> Result<Option<SavedSnapshot>> {
        self.check_live()?;
        let result = self
            .database
            .begin_read()
            .map_err(|error| redb_error(&self.path, "begin a read transaction", error))
            .and_then(|transaction| read_snapshot(&transaction, &self.path));
        self.poison_on_error(result)
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

    fn persist_batches(&mut self, batches: &[Persist]) -> Result<()> {
        // Check every batch before writing anything, computing the meta
        // values the batches leave behind.
        let mut last_batch_id = self.last_batch_id;
        let mut promised = self.promised;
        let mut chosen_through = self.chosen_through;
        let mut log_start = self.log_start;
        let mut membership = None;
        let mut joining = None;
        for batch in batches {
            if let Some(last) = last_batch_id.filter(|&last| batch.id <= last) {
                return Err(self.refused(format!(
                    "batch {} persisted after batch {last}: batches must be persisted in increasing id order",
                    batch.id
                )));
            }
            last_batch_id = Some(batch.id);
            if let Some(ballot) = batch.promised {
                promised = promised.max(ballot);
            }
            if let Some(slot) = batch.chosen_through {
                chosen_through = chosen_through.max(slot);
            }
            if let Some(below) = batch.compact_below.filter(|&below| below > log_start) {
                if self
                    .snapshot_through
                    .is_none_or(|through| below > through.saturating_add(1))
                {
                    return Err(self.refused(format!(
                        "batch {} compacts the log below slot {below}, past the saved snapshot ({})",
                        batch.id,
                        describe_snapshot(self.snapshot_through)
                    )));
                }
                log_start = below;
            }
            if let Some(new) = &batch.membership {
                valid_membership(new)
                    .map_err(|detail| self.refused(format!("batch {}: {detail}", batch.id)))?;
                membership = Some(new.clone());
            }
            if let Some(flag) = batch.joining {
                joining = Some(flag);
            }
        }
        if batches.iter().all(Persist::is_empty) {
            self.last_batch_id = last_batch_id;
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
            // Replay the batches' log changes in order, exactly as
            // `DurableState::apply` does, against the running log start.
            let mut running_start = self.log_start;
            for batch in batches {
                let accepted = batch
                    .accepted
                    .iter()
                    .map(|entry| (entry.slot, entry.ballot, &entry.value));
                let learned = batch
                    .learned
                    .iter()
                    .map(|entry| (entry.slot, Ballot::ZERO, &entry.value));
                for (slot, ballot, value) in accepted.chain(learned) {
                    if slot < running_start {
                        continue;
                    }
                    let record = LogRecord {
                        ballot,
                        value: value.clone(),
                    };
                    let sealed = seal(&log_domain(slot), &record).map_err(|source| {
                        StorageError::Encode {
                            path: path.clone(),
                            what: "a log record",
                            source,
                        }
                    })?;
                    log.insert(slot, sealed.as_slice())
                        .map_err(|error| redb_error(path, "write a log record", error))?;
                }
                if let Some(below) = batch.compact_below.filter(|&below| below > running_start) {
                    log.retain_in::<u64, _>(..below, |_, _| false)
                        .map_err(|error| redb_error(path, "compact the log", error))?;
                    running_start = below;
                }
            }
            assert_eq!(
                running_start, log_start,
                "the log start replayed from the batches must match the one checked before writing"
            );

            let mut meta = transaction
                .open_table(META)
                .map_err(|error| redb_error(path, "open the meta table", error))?;
            if promised != self.promised {
                put_meta(&mut meta, path, KEY_PROMISED, &promised)?;
            }
            if chosen_through != self.chosen_through {
                put_meta(&mut meta, path, KEY_CHOSEN_THROUGH, &chosen_through)?;
            }
            if log_start != self.log_start {
                put_meta(&mut meta, path, KEY_LOG_START, &log_start)?;
            }
            if let Some(membership) = &membership {
                put_meta(&mut meta, path, KEY_MEMBERSHIP, membership)?;
            }
            if let Some(joining) = &joining {
                put_meta(&mut meta, path, KEY_JOINING, joining)?;
            }
        }
        transaction
            .commit()
            .map_err(|error| redb_error(path, "commit (fsync) the batches", error))?;

        self.last_batch_id = last_batch_id;
        self.promised = promised;
        self.chosen_through = chosen_through;
        self.log_start = log_start;
        Ok(())
    }

    fn write_snapshot(
        &mut self,
        through: Slot,
        membership: &Membership,
        bytes: &[u8],
    ) -> Result<()> {
        valid_membership(membership).map_err(|detail| self.refused(detail))?;
        if through.saturating_add(1) < self.log_start {
            return Err(self.refused(format!(
                "a snapshot through slot {through} leaves a gap: the log starts at slot {}",
                self.log_start
            )));
        }
        let path = &self.path;
        let chunks: Vec<&[u8]> = bytes.chunks(SNAPSHOT_CHUNK_BYTES_MAX).collect();
        let header = SnapshotHeader {
            through,
            membership: membership.clone(),
            length_bytes: bytes.len() as u64,
            chunk_count: chunks.len() as u64,
            bytes_crc32: crc32fast::hash(bytes),
        };
        let sealed = seal(&snapshot_domain(), &header).map_err(|source| StorageError::Encode {
            path: path.clone(),
            what: "the snapshot header",
            source,
        })?;
        let transaction = self
            .database
            .begin_write()
            .map_err(|error| redb_error(path, "begin a write transaction", error))?;
        {
            let mut table = transaction
                .open_table(SNAPSHOT_CHUNKS)
                .map_err(|error| redb_error(path, "open the snapshot chunks table", error))?;
            table
                .retain(|_, _| false)
                .map_err(|error| redb_error(path, "remove the old snapshot", error))?;
            for (index, chunk) in chunks.iter().enumerate() {
                table
                    .insert(index as u64, *chunk)
                    .map_err(|error| redb_error(path, "write the snapshot", error))?;
            }
            let mut table = transaction
                .open_table(SNAPSHOT)
                .map_err(|error| redb_error(path, "open the snapshot table", error))?;
            table
                .insert(SNAPSHOT_HEADER_KEY, sealed.as_slice())
                .map_err(|error| redb_error(path, "write the snapshot header", error))?;
        }
        transaction
            .commit()
            .map_err(|error| redb_error(path, "commit (fsync) the snapshot", error))?;
        self.snapshot_through = Some(through);
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
        for entry in entries {
            let (key, value) = entry.map_err(|error| redb_error(&path, "read the log", error))?;
            let slot = key.value();
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

        let snapshot = read_snapshot(&transaction, &path)?;
        let snapshot_through = snapshot.as_ref().map(|snapshot| snapshot.through);
        if log_start > 0
            && snapshot_through.is_none_or(|through| log_start > through.saturating_add(1))
        {
            return Err(corrupt(
                &path,
                format!(
                    "the log was compacted below slot {log_start} but the saved snapshot does not reach it ({})",
                    describe_snapshot(snapshot_through)
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
            database,
            identity: stored,
            promised,
            chosen_through,
            log_start,
            snapshot_through,
            last_batch_id: None,
            poison: OnceLock::new(),
        };
        Ok((storage, Recovered { durable, snapshot }))
    }
}

fn describe_snapshot(through: Option<Slot>) -> String {
    match through {
        Some(through) => format!("it covers slots through {through}"),
        None => "none is saved".to_string(),
    }
}

fn builder() -> Builder {
    let mut builder = Builder::new();
    builder
        .set_cache_size(CACHE_BYTES)
        .set_check_integrity_on_open(true);
    builder
}

/// Runs an open, turning a panic inside redb (which its docs allow for a
/// damaged file) into [`StorageError::Corrupt`]: disk input never crashes
/// the replica with a panic, only with an error naming the file.
fn guard_panics<T>(path: &Path, open: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(open)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|message| (*message).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(corrupt(
                path,
                format!("redb panicked while reading the file: {message}"),
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

fn sync_parent_directory(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|directory| directory.sync_all())
        .map_err(|source| StorageError::Io {
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
            let sealed =
                seal(&log_domain(slot), record).map_err(|source| StorageError::Encode {
                    path: path.to_path_buf(),
                    what: "a log record",
                    source,
                })?;
            log.insert(slot, sealed.as_slice())
                .map_err(|error| redb_error(path, "write a log record", error))?;
        }
        transaction
            .open_table(SNAPSHOT)
            .map_err(|error| redb_error(path, "create the snapshot table", error))?;
        transaction
            .open_table(SNAPSHOT_CHUNKS)
            .map_err(|error| redb_error(path, "create the snapshot chunks table", error))?;
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

/// Reads and verifies the saved snapshot, if any.
fn read_snapshot(transaction: &ReadTransaction, path: &Path) -> Result<Option<SavedSnapshot>> {
    let headers = transaction
        .open_table(SNAPSHOT)
        .map_err(|error| redb_error(path, "open the snapshot table", error))?;
    let chunks = transaction
        .open_table(SNAPSHOT_CHUNKS)
        .map_err(|error| redb_error(path, "open the snapshot chunks table", error))?;
    let header = headers
        .get(SNAPSHOT_HEADER_KEY)
        .map_err(|error| redb_error(path, "read the snapshot header", error))?;
    let Some(header) = header else {
        let count = chunks
            .len()
            .map_err(|error| redb_error(path, "read the snapshot", error))?;
        if count != 0 {
            return Err(corrupt(
                path,
                format!("{count} snapshot chunks without a snapshot header"),
            ));
        }
        return Ok(None);
    };
    let header: SnapshotHeader = unseal(&snapshot_domain(), header.value())
        .map_err(|detail| corrupt(path, format!("snapshot header: {detail}")))?;
    valid_membership(&header.membership)
        .map_err(|detail| corrupt(path, format!("snapshot header: {detail}")))?;
    let length = usize::try_from(header.length_bytes)
        .map_err(|_| corrupt(path, format!("snapshot of {} bytes", header.length_bytes)))?;
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(length).map_err(|_| {
        corrupt(
            path,
            format!("snapshot of {length} bytes does not fit in memory"),
        )
    })?;
    let mut expected_index = 0u64;
    let range = chunks
        .range::<u64>(..)
        .map_err(|error| redb_error(path, "read the snapshot", error))?;
    for chunk in range {
        let (index, chunk) = chunk.map_err(|error| redb_error(path, "read the snapshot", error))?;
        if index.value() != expected_index || expected_index >= header.chunk_count {
            return Err(corrupt(
                path,
                format!(
                    "snapshot chunk {} found where chunk {expected_index} of {} was expected",
                    index.value(),
                    header.chunk_count
                ),
            ));
        }
        let chunk = chunk.value();
        if bytes.len() + chunk.len() > length {
            return Err(corrupt(
                path,
                format!("snapshot chunks hold more than the {length} bytes its header says"),
            ));
        }
        bytes.extend_from_slice(chunk);
        expected_index += 1;
    }
    if expected_index != header.chunk_count || bytes.len() != length {
        return Err(corrupt(
            path,
            format!(
                "snapshot has {expected_index} chunks and {} bytes; its header says {} and {length}",
                bytes.len(),
                header.chunk_count
            ),
        ));
    }
    let computed = crc32fast::hash(&bytes);
    if computed != header.bytes_crc32 {
        return Err(corrupt(
            path,
            format!(
                "snapshot CRC-32 mismatch (stored {:08x}, computed {computed:08x})",
                header.bytes_crc32
            ),
        ));
    }
    Ok(Some(SavedSnapshot {
        through: header.through,
        membership: header.membership,
        bytes,
    }))
}
