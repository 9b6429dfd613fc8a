//! The one error type of the storage layer.

use std::path::PathBuf;

/// What went wrong with a replica's database. Every variant names the
/// database file, so an operator reading the log knows which file to look at.
///
/// Any of these returned by a [`super::Storage`] method poisons that
/// `Storage`: the replica must stop and recover from disk.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// `open` found no file at the path.
    #[error("{path}: no Synod database here (the file does not exist)")]
    NotFound {
        /// The database file.
        path: PathBuf,
    },
    /// `create` found a file already at the path, or a non-empty backend.
    #[error("{path}: refusing to create a Synod database: the file already exists")]
    AlreadyExists {
        /// The database file.
        path: PathBuf,
    },
    /// Another process, or another `Storage` in this one, has the file open.
    #[error("{path}: the database is already open (by another replica or process)")]
    AlreadyOpen {
        /// The database file.
        path: PathBuf,
    },
    /// The file is a readable redb database but was never completely
    /// initialised as a Synod database (a crash during `create`, or another
    /// program's database).
    #[error("{path}: not a Synod database: {detail}")]
    NotSynod {
        /// The database file.
        path: PathBuf,
        /// What is missing.
        detail: String,
    },
    /// The file holds damaged or inconsistent data: not a database at all, a
    /// redb page checksum that fails, a record whose CRC-32 fails or that
    /// does not decode, or meta values that contradict each other.
    #[error("{path}: corrupt database: {detail}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What is wrong, and where.
        detail: String,
    },
    /// The file was written in a format version this build does not read.
    #[error(
        "{path}: database format version {found}, but this build reads only version {expected}; \
         there is no conversion between versions: start this replica on an empty data directory \
         with --join to restore it from its peers (a development cluster's directory can simply \
         be removed)"
    )]
    FormatVersion {
        /// The database file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The version this build reads and writes.
        expected: u32,
    },
    /// The file belongs to another cluster.
    #[error("{path}: the database belongs to cluster {found:?}, not {expected:?}")]
    WrongCluster {
        /// The database file.
        path: PathBuf,
        /// The cluster id in the file.
        found: String,
        /// The cluster id this replica was configured with.
        expected: String,
    },
    /// The file belongs to another replica of this cluster.
    #[error("{path}: the database belongs to node {found}, not node {expected}")]
    WrongNode {
        /// The database file.
        path: PathBuf,
        /// The node id in the file.
        found: u64,
        /// The node id this replica was configured with.
        expected: u64,
    },
    /// The caller broke the contract of a method (batches out of order, a
    /// compaction past the saved snapshot, ...). Nothing was written.
    #[error("{path}: refused: {detail}")]
    Refused {
        /// The database file.
        path: PathBuf,
        /// Which rule was broken.
        detail: String,
    },
    /// redb reported an error (I/O, a failed fsync, ...) while doing `operation`.
    #[error("{path}: {operation} failed: {source}")]
    Database {
        /// The database file.
        path: PathBuf,
        /// What the storage was doing.
        operation: &'static str,
        /// redb's error (boxed: redb's umbrella error is large).
        #[source]
        source: Box<redb::Error>,
    },
    /// The file system reported an error outside redb while doing `operation`.
    #[error("{path}: {operation} failed: {source}")]
    Io {
        /// The database file.
        path: PathBuf,
        /// What the storage was doing.
        operation: &'static str,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A value could not be encoded (a bug, never caused by disk contents).
    #[error("{path}: cannot encode {what}: {source}")]
    Encode {
        /// The database file.
        path: PathBuf,
        /// What was being encoded.
        what: &'static str,
        /// postcard's error.
        #[source]
        source: postcard::Error,
    },
    /// An earlier error poisoned this `Storage`; the replica must restart
    /// and recover from disk.
    #[error("{path}: storage is poisoned by an earlier error ({cause}); restart the replica to recover from disk")]
    Poisoned {
        /// The database file.
        path: PathBuf,
        /// The earlier error, as text.
        cause: String,
    },
}

impl StorageError {
    /// The database file the error is about.
    pub fn path(&self) -> &std::path::Path {
        match self {
            StorageError::NotFound { path }
            | StorageError::AlreadyExists { path }
            | StorageError::AlreadyOpen { path }
            | StorageError::NotSynod { path, .. }
            | StorageError::Corrupt { path, .. }
            | StorageError::FormatVersion { path, .. }
            | StorageError::WrongCluster { path, .. }
            | StorageError::WrongNode { path, .. }
            | StorageError::Refused { path, .. }
            | StorageError::Database { path, .. }
            | StorageError::Io { path, .. }
            | StorageError::Encode { path, .. }
            | StorageError::Poisoned { path, .. } => path,
        }
    }
}

/// The storage layer's result type.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
