//! Backups: a replica's saved state in one file, with its checksum, and
//! restoring a new cluster from one.
//!
//! # Taking one
//!
//! `synod snapshot save FILE` connects to a replica with
//! [`Hello::Backup`](synod_proto::wire::Hello::Backup); the replica
//! streams its saved state from one read transaction on a thread of its
//! own, exactly as it streams a snapshot to a lagging peer, so the backup
//! is one consistent state (every slot through its `through_slot`) and the
//! event loop does no work for it. [`BackupWriter`] writes the chunks as
//! they arrive.
//!
//! # The file
//!
//! - 8 bytes `SYNODBAK`, then the format version, a `u32` little-endian;
//! - the stream's chunks, each as a `u64` little-endian length and its
//!   bytes (a chunk holds whole records: the header, the records of the
//!   state tables in table and key order, and an end record counting
//!   them), then a zero length;
//! - the SHA-256 of everything before it (32 bytes).
//!
//! It is written to `FILE.partial`, synced, and renamed into place, so an
//! interrupted backup leaves no `FILE`. [`read_backup`] checks the magic,
//! the version and the checksum before it decodes anything, then rebuilds
//! the state, checking every invariant the state machine relies on: a
//! damaged, truncated or foreign file is refused with the reason.
//!
//! A stopped replica's data directory can also be written out as a backup
//! ([`export`], `synod-server export`): for a cluster that lost its
//! majority for good, the survivor's saved state with its chosen log
//! applied.
//!
//! # Restoring
//!
//! [`restore`] seeds one new replica's data directory from a backup:
//! - the same tree, with its revisions and counters, so revisions keep
//!   growing for clients that remember them;
//! - every session closed (expired, as if its client had gone: its
//!   ephemeral nodes deleted, its locks released and waits cancelled);
//! - without the old cluster's identity or confirmed members, so the new
//!   cluster mints its own identity and the old cluster's replicas are
//!   refused by it (see `transport::identity`);
//! - with the new replica's membership, as a saved state covering slot 0
//!   of a fresh log.
//!
//! Every member of the new cluster restores from the same file and so
//! starts from the same state, byte for byte. The databases and the log's
//! journal are built as `synod.redb.restoring`,
//! `synod-state.redb.restoring` and `synod.journal.restoring` and renamed
//! into place once durable, the log database last: a restore that fails or is
//! killed leaves no log database behind, so nothing starts from half of
//! one (a state database alone is overwritten by the next restore).

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write as _};
use std::path::{Path, PathBuf};

use ring::digest::{Context, SHA256, SHA256_OUTPUT_LEN};
use synod_paxos::{DurableState, Membership};
use thiserror::Error;

use crate::config::ReplicaConfig;
use crate::replica::snapshot::{FetchedState, StreamDecoder, StreamScanner};
use crate::state::records::header_scalars;
use crate::state::{Command, StateConfig};
use crate::storage::{DatabasePaths, Identity, StateWrite, Storage, StorageError, Write};

/// The first bytes of every backup file.
pub const BACKUP_MAGIC: &[u8; 8] = b"SYNODBAK";

/// The backup format this build writes and reads.
pub const BACKUP_FORMAT_VERSION: u32 = 1;

/// Bytes before the first chunk: the magic and the version.
const PREAMBLE_BYTES: u64 = 12;

/// Largest chunk a backup may hold: a stream chunk is about 1 MiB, but
/// holds at least one whole record, whose data may be up to 64 MiB.
const CHUNK_BYTES_MAX: u64 = 256 << 20;

/// Why a backup could not be written, read or restored. Each names the
/// file.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BackupError {
    /// Reading or writing the file failed.
    #[error("{path}: cannot {operation}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        operation: &'static str,
        /// The error.
        error: std::io::Error,
    },
    /// The file exists already; a backup never overwrites one.
    #[error("{path} exists already; choose another name or remove it first")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The file is not a Synod backup.
    #[error("{path} is not a Synod backup (it does not start with SYNODBAK)")]
    NotABackup {
        /// The file.
        path: PathBuf,
    },
    /// The file is a backup of another format.
    #[error(
        "{path} is a backup of format {found}; this build reads format {BACKUP_FORMAT_VERSION}"
    )]
    FormatVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The checksum does not match: the file was damaged or cut short.
    #[error("{path} is damaged or incomplete: its SHA-256 does not match ({reason})")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },
    /// The checksum matches but the state does not decode or breaks an
    /// invariant (a backup written by a faulty build).
    #[error("{path} does not hold a usable state: {reason}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The data directory already holds a database.
    #[error(
        "{path} exists already: a restore seeds new replicas only; use an empty data directory"
    )]
    DatabaseExists {
        /// The database file.
        path: PathBuf,
    },
    /// The new database could not be written.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

type Result<T> = std::result::Result<T, BackupError>;

fn io_error(path: &Path, operation: &'static str) -> impl FnOnce(std::io::Error) -> BackupError {
    let path = path.to_path_buf();
    move |error| BackupError::Io {
        path,
        operation,
        error,
    }
}

/// Writes a backup file as its chunks arrive (see the module docs). A
/// writer dropped before [`BackupWriter::finish`] removes what it wrote.
pub struct BackupWriter {
    path: PathBuf,
    partial: PathBuf,
    file: Option<BufWriter<File>>,
    digest: Context,
    bytes: u64,
}

impl std::fmt::Debug for BackupWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupWriter")
            .field("path", &self.path)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl BackupWriter {
    /// Starts a backup at `path`, writing `path.partial` meanwhile.
    ///
    /// # Errors
    /// [`BackupError::Exists`] when `path` or the partial file exists; I/O
    /// errors.
    pub fn create(path: impl AsRef<Path>) -> Result<BackupWriter> {
        let path = path.as_ref().to_path_buf();
        if path.exists() {
            return Err(BackupError::Exists { path });
        }
        let mut partial = path.clone().into_os_string();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
            .map_err(|source| match source.kind() {
                ErrorKind::AlreadyExists => BackupError::Exists {
                    path: partial.clone(),
                },
                _ => BackupError::Io {
                    path: partial.clone(),
                    operation: "create the backup file",
                    error: source,
                },
            })?;
        let mut writer = BackupWriter {
            path,
            partial,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            digest: Context::new(&SHA256),
            bytes: 0,
        };
        writer.put(BACKUP_MAGIC)?;
        writer.put(&BACKUP_FORMAT_VERSION.to_le_bytes())?;
        Ok(writer)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.digest.update(bytes);
        self.bytes += bytes.len() as u64;
        let partial = &self.partial;
        match self.file.as_mut() {
            Some(file) => file
                .write_all(bytes)
                .map_err(io_error(partial, "write the backup file")),
            None => Ok(()),
        }
    }

    /// Appends one chunk of the stream.
    ///
    /// # Errors
    /// I/O errors.
    pub fn chunk(&mut self, chunk: &[u8]) -> Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.put(&(chunk.len() as u64).to_le_bytes())?;
        self.put(chunk)
    }

    /// Ends the file with its checksum, makes it durable and puts it in
    /// place; returns its size and SHA-256 (hex).
    ///
    /// # Errors
    /// I/O errors; the partial file is removed.
    pub fn finish(mut self) -> Result<(u64, String)> {
        self.put(&0u64.to_le_bytes())?;
        let digest = std::mem::replace(&mut self.digest, Context::new(&SHA256)).finish();
        let partial = self.partial.clone();
        let Some(mut file) = self.file.take() else {
            return Err(BackupError::Io {
                path: partial,
                operation: "finish the backup file",
                error: std::io::Error::other("already finished"),
            });
        };
        let finished = file
            .write_all(digest.as_ref())
            .and_then(|()| file.flush())
            .map_err(io_error(&partial, "write the backup file"))
            .and_then(|()| {
                file.get_ref()
                    .sync_all()
                    .map_err(io_error(&partial, "sync the backup file"))
            })
            .and_then(|()| {
                std::fs::rename(&partial, &self.path)
                    .map_err(io_error(&self.path, "move the finished backup into place"))
            })
            .and_then(|()| sync_directory_of(&self.path));
        if let Err(error) = finished {
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
        Ok((self.bytes + SHA256_OUTPUT_LEN as u64, hex(digest.as_ref())))
    }
}

impl Drop for BackupWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

fn sync_directory_of(path: &Path) -> Result<()> {
    crate::storage::sync_parent(path).map_err(io_error(path, "sync the directory holding"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// What a backup holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    /// The saved state reflects every slot through this one (of the
    /// cluster it was taken from).
    pub through_slot: u64,
    /// The state's revision.
    pub revision: u64,
    /// The leader-stamped time of the state, ms since the Unix epoch.
    pub time_ms: u64,
    /// Nodes, the root included.
    pub nodes: u64,
    /// Sessions open when it was taken (a restore closes them).
    pub sessions: u64,
    /// Locks held or waited for when it was taken.
    pub locks: u64,
    /// The members of the cluster it was taken from.
    pub members: Vec<u64>,
    /// The identity of the cluster it was taken from, if it had minted one.
    pub cluster_identity: Option<u128>,
    /// Records in the file.
    pub records: u64,
    /// Bytes of the file.
    pub file_bytes: u64,
    /// The file's SHA-256 (hex), as its last 32 bytes hold it.
    pub sha256: String,
}

/// A backup, read back and checked.
#[derive(Debug)]
pub struct Backup {
    /// What it holds, in numbers.
    pub summary: BackupSummary,
    /// The state, rebuilt and checked.
    pub state: FetchedState,
}

/// State limits wide enough for any backup: a backup is checked for
/// consistency, and a restore then against the new cluster's own limits.
pub fn any_state_config() -> StateConfig {
    StateConfig {
        data_bytes_max: u64::MAX,
        path_bytes_max: u64::MAX,
        ..StateConfig::default()
    }
}

/// Checks the backup at `path` (magic, version, checksum, and that its
/// records decode and add up) and says what it holds, without building
/// its state: cheap in memory whatever its size.
///
/// # Errors
/// [`BackupError`] saying what is wrong, naming the file.
pub fn scan_backup(path: impl AsRef<Path>) -> Result<BackupSummary> {
    let path = path.as_ref();
    let mut scanner = StreamScanner::default();
    let (file_bytes, sha256) = read_chunks(path, |chunk| scanner.chunk(chunk))?;
    let damaged = |reason: String| BackupError::Damaged {
        path: path.to_path_buf(),
        reason,
    };
    let (Some(header), true) = (scanner.header, scanner.ended) else {
        return Err(damaged("the snapshot ended early".into()));
    };
    let (revision, time_ms, cluster_identity) = header_scalars(&header.scalars).map_err(damaged)?;
    let [nodes, sessions, locks] = scanner.counts;
    Ok(BackupSummary {
        through_slot: header.through,
        revision,
        time_ms,
        nodes,
        sessions,
        locks,
        members: header.membership.members().to_vec(),
        cluster_identity,
        records: nodes + sessions + locks,
        file_bytes,
        sha256,
    })
}

/// Reads the backup at `path`: checks its magic, version and checksum,
/// then rebuilds its state within `config`'s limits, checking every
/// invariant.
///
/// # Errors
/// [`BackupError`] saying what is wrong, naming the file.
pub fn read_backup(path: impl AsRef<Path>, config: StateConfig) -> Result<Backup> {
    let path = path.as_ref();
    let mut decoder = StreamDecoder::new(config);
    let mut records = 0u64;
    let (file_bytes, sha256) = read_chunks(path, |chunk| decoder.chunk(chunk, |_| records += 1))?;
    let state = decoder.finish().map_err(|reason| BackupError::Damaged {
        path: path.to_path_buf(),
        reason,
    })?;
    let machine = &state.state;
    let summary = BackupSummary {
        through_slot: state.header.through,
        revision: machine.revision(),
        time_ms: machine.now_ms(),
        nodes: machine.node_count(),
        sessions: machine.session_count(),
        locks: machine.lock_count(),
        members: state.header.membership.members().to_vec(),
        cluster_identity: machine.cluster_identity(),
        records,
        file_bytes,
        sha256,
    };
    Ok(Backup { summary, state })
}

/// Checks the file's checksum, then hands each chunk to `take`; returns
/// the file's size and SHA-256 (hex).
fn read_chunks(
    path: &Path,
    mut take: impl FnMut(&[u8]) -> std::result::Result<(), String>,
) -> Result<(u64, String)> {
    let file_bytes = std::fs::metadata(path)
        .map_err(io_error(path, "read the backup file"))?
        .len();
    let sha256 = verify_checksum(path, file_bytes)?;
    let damaged = |reason: String| BackupError::Damaged {
        path: path.to_path_buf(),
        reason,
    };
    let mut reader = BufReader::with_capacity(
        1 << 20,
        File::open(path).map_err(io_error(path, "open the backup file"))?,
    );
    let mut preamble = [0u8; PREAMBLE_BYTES as usize];
    reader
        .read_exact(&mut preamble)
        .map_err(io_error(path, "read the backup file"))?;
    let body_end = file_bytes - SHA256_OUTPUT_LEN as u64;
    let mut chunk = Vec::new();
    let mut offset = PREAMBLE_BYTES;
    loop {
        if offset + 8 > body_end {
            return Err(damaged("the chunks end without their end mark".into()));
        }
        let mut length = [0u8; 8];
        reader
            .read_exact(&mut length)
            .map_err(io_error(path, "read the backup file"))?;
        let length = u64::from_le_bytes(length);
        offset += 8;
        if length == 0 {
            break;
        }
        if length > CHUNK_BYTES_MAX || offset + length > body_end {
            return Err(damaged(format!(
                "a chunk of {length} bytes at byte {offset}"
            )));
        }
        chunk.resize(usize::try_from(length).unwrap_or(usize::MAX), 0);
        reader
            .read_exact(&mut chunk)
            .map_err(io_error(path, "read the backup file"))?;
        offset += length;
        take(&chunk).map_err(damaged)?;
    }
    if offset != body_end {
        return Err(damaged(format!(
            "{} bytes after the end mark",
            body_end - offset
        )));
    }
    Ok((file_bytes, sha256))
}

/// Checks the magic and version, and that the last 32 bytes are the
/// SHA-256 of the rest; returns it (hex).
fn verify_checksum(path: &Path, file_bytes: u64) -> Result<String> {
    let mut file = File::open(path).map_err(io_error(path, "open the backup file"))?;
    let mut preamble = [0u8; PREAMBLE_BYTES as usize];
    match file.read_exact(&mut preamble) {
        Ok(()) => {}
        Err(error) if error.kind() == ErrorKind::UnexpectedEof => {
            return Err(BackupError::NotABackup {
                path: path.to_path_buf(),
            })
        }
        Err(error) => return Err(io_error(path, "read the backup file")(error)),
    }
    if &preamble[..8] != BACKUP_MAGIC {
        return Err(BackupError::NotABackup {
            path: path.to_path_buf(),
        });
    }
    let mut version = [0u8; 4];
    version.copy_from_slice(&preamble[8..]);
    let version = u32::from_le_bytes(version);
    if version != BACKUP_FORMAT_VERSION {
        return Err(BackupError::FormatVersion {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let checksum = |reason: String| BackupError::Checksum {
        path: path.to_path_buf(),
        reason,
    };
    let trailer = SHA256_OUTPUT_LEN as u64;
    if file_bytes < PREAMBLE_BYTES + 8 + trailer {
        return Err(checksum(format!(
            "the file is cut short at {file_bytes} bytes"
        )));
    }
    let mut digest = Context::new(&SHA256);
    digest.update(&preamble);
    let mut remaining = file_bytes - PREAMBLE_BYTES - trailer;
    let mut buffer = vec![0u8; 1 << 20];
    while remaining > 0 {
        let take = usize::try_from(remaining.min(buffer.len() as u64)).unwrap_or(buffer.len());
        file.read_exact(&mut buffer[..take])
            .map_err(io_error(path, "read the backup file"))?;
        digest.update(&buffer[..take]);
        remaining -= take as u64;
    }
    let mut stored = [0u8; SHA256_OUTPUT_LEN];
    file.read_exact(&mut stored)
        .map_err(io_error(path, "read the backup file"))?;
    let computed = digest.finish();
    if computed.as_ref() != stored {
        return Err(checksum(format!(
            "computed {}, stored {}",
            hex(computed.as_ref()),
            hex(&stored)
        )));
    }
    Ok(hex(&stored))
}

/// Writes a backup of a stopped replica's data directory to `to`: its
/// saved state with every chosen slot of its log applied (see
/// [`crate::replica::recover_offline`]). For disaster recovery, when a
/// cluster lost its majority for good and a survivor's data is the best
/// copy left: restore the new cluster from this file. Slots the survivor
/// accepted but never learned were chosen are not in it.
///
/// # Errors
/// The database cannot be opened or its state does not load
/// ([`BackupError::Damaged`] with the reason); the file cannot be written.
pub fn export(config: &ReplicaConfig, to: impl AsRef<Path>) -> Result<BackupSummary> {
    let to = to.as_ref();
    let mut writer = BackupWriter::create(to)?;
    let mut recovered =
        crate::replica::recover_offline(config).map_err(|error| BackupError::Damaged {
            path: DatabasePaths::in_dir(&config.data_dir).log,
            reason: error.to_string(),
        })?;
    crate::replica::snapshot::encode_state(
        &mut recovered.state,
        recovered.applied_through,
        &recovered.membership,
        |chunk| writer.chunk(chunk),
    )?;
    writer.finish()?;
    scan_backup(to)
}

/// What [`restore`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreSummary {
    /// The backup, as read.
    pub backup: BackupSummary,
    /// The database file created.
    pub database: PathBuf,
    /// Sessions closed.
    pub sessions_closed: u64,
    /// Nodes in the restored state (after the sessions' ephemeral nodes
    /// went).
    pub nodes: u64,
    /// The restored state's revision.
    pub revision: u64,
}

/// Seeds `config`'s data directory from the backup at `from` (see the
/// module docs), for a replica of a new cluster.
///
/// # Errors
/// [`BackupError::DatabaseExists`] when the data directory holds a
/// database; the backup's errors; a state that does not fit the new
/// cluster's limits ([`BackupError::Damaged`]); storage errors.
pub fn restore(from: impl AsRef<Path>, config: &ReplicaConfig) -> Result<RestoreSummary> {
    let from = from.as_ref();
    let databases = DatabasePaths::in_dir(&config.data_dir);
    if databases.log.exists() {
        return Err(BackupError::DatabaseExists {
            path: databases.log,
        });
    }
    let Backup { summary, state } = read_backup(from, config.state_config())?;
    let mut state = state.state;
    let sessions = state.sessions();
    let sessions_closed = sessions.len() as u64;
    if !sessions.is_empty() {
        let now_ms = state.now_ms();
        state.apply(&Command::ExpireSessions { sessions, now_ms });
    }
    state.forget_cluster_identity();
    let member_ids: Vec<u64> = config.members.iter().map(|member| member.id).collect();
    let membership = Membership::new(&member_ids).map_err(|error| BackupError::Damaged {
        path: from.to_path_buf(),
        reason: format!("the new cluster's members: {error}"),
    })?;
    state.mark_all_dirty();
    let delta = state.take_delta(0, &membership);
    std::fs::create_dir_all(&config.data_dir)
        .map_err(io_error(&config.data_dir, "create the data directory"))?;
    let building = databases.with_suffix(".restoring");
    // A restore killed before the renames left these behind; they hold
    // nothing anyone relies on.
    for path in [&building.log, &building.state, &building.journal] {
        if path.exists() {
            std::fs::remove_file(path).map_err(io_error(path, "remove an unfinished restore"))?;
        }
    }
    let identity = Identity {
        cluster_id: config.cluster_id.clone(),
        node_id: config.id,
    };
    let written = (|| -> Result<()> {
        let mut storage =
            Storage::create(&building, identity, &DurableState::bootstrap(membership))?;
        storage.commit(&[Write::State(StateWrite::Delta(delta))])?;
        storage.close()?;
        std::fs::rename(&building.state, &databases.state).map_err(io_error(
            &databases.state,
            "move the restored database into place",
        ))?;
        std::fs::rename(&building.journal, &databases.journal).map_err(io_error(
            &databases.journal,
            "move the restored journal into place",
        ))?;
        std::fs::rename(&building.log, &databases.log).map_err(io_error(
            &databases.log,
            "move the restored database into place",
        ))?;
        sync_directory_of(&databases.log)
    })();
    if let Err(error) = written {
        let _ = std::fs::remove_file(&building.log);
        let _ = std::fs::remove_file(&building.state);
        let _ = std::fs::remove_file(&building.journal);
        return Err(error);
    }
    Ok(RestoreSummary {
        backup: summary,
        database: databases.log,
        sessions_closed,
        nodes: state.node_count(),
        revision: state.revision(),
    })
}
