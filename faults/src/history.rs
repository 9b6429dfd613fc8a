//! What a fault run records: every operation a client invoked, with the
//! moment it was invoked, the moment it completed (if it did) and what the
//! cluster answered, plus the asynchronous observations (a lock reported
//! lost, a watch event, a fault injected). A history is saved as JSON lines
//! (`history.jsonl`, one [`Record`] per line) so a failed run can be checked
//! again with `synod-faults check DIR`.
//!
//! Times are nanoseconds on the harness's monotonic clock since the run
//! started; every client runs in the harness's process, so their times are
//! comparable. An operation whose answer never came (a timeout, a lost
//! connection, "outcome unknown") is [`Outcome::Indeterminate`]: it may have
//! taken effect at any moment after its invocation, or never.

use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Identifies one client worker of the run (each has its own session).
pub type ClientId = u32;

/// One line of a history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// A client's call and its answer.
    Operation(Operation),
    /// A lock holder was told its lock may be lost (`LockGuard::lost`
    /// resolved, or `is_held` turned false), at `at_ns`.
    LockLost {
        /// The holder.
        client: ClientId,
        /// The lock's path.
        lock: String,
        /// The token of the grant it lost.
        token: u64,
        /// When the holder learned it.
        at_ns: u64,
    },
    /// A watcher registered a persistent recursive watch at `path`: it sees
    /// every change below `path` with a revision above `revision`.
    WatchStarted {
        /// The watcher.
        client: ClientId,
        /// The watched subtree.
        path: String,
        /// The revision the watch starts after.
        revision: u64,
        /// When it was registered.
        at_ns: u64,
    },
    /// An event a watcher received.
    WatchEvent {
        /// The watcher.
        client: ClientId,
        /// The node the event is about.
        path: String,
        /// `created`, `changed` or `deleted`.
        kind: String,
        /// The revision of the command that fired it.
        revision: u64,
        /// When it was received.
        at_ns: u64,
    },
    /// A watcher's stream ended: the history it needed was compacted
    /// (`compacted`), or its session or connection ended. Events after this
    /// belong to a new `WatchStarted`.
    WatchEnded {
        /// The watcher.
        client: ClientId,
        /// The watched subtree.
        path: String,
        /// Whether the cluster reported `HistoryCompacted`.
        compacted: bool,
        /// Why it ended, for the report.
        reason: String,
        /// When it ended.
        at_ns: u64,
    },
    /// A fault the nemesis injected or healed, for the report and the
    /// availability figures.
    Fault {
        /// What was done, for example `kill 2` or `heal partition`.
        description: String,
        /// The fault's kind, for grouping stalls (`kill`, `pause`, ...).
        kind: String,
        /// When it was done.
        at_ns: u64,
    },
}

/// One call a client made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    /// Unique within the history.
    pub id: u64,
    /// The client that made it.
    pub client: ClientId,
    /// When the call was made.
    pub invoked_ns: u64,
    /// When the answer came; `None` for an indeterminate outcome.
    pub completed_ns: Option<u64>,
    /// What was asked.
    pub call: Call,
    /// What was answered.
    pub outcome: Outcome,
}

/// What a client asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Call {
    /// Create the register `key` with `value` (version 0).
    Create {
        /// The node.
        key: String,
        /// Its first value.
        value: String,
    },
    /// A linearizable read of the register `key`.
    Read {
        /// The node.
        key: String,
    },
    /// Set `key` to `value` whatever its version.
    Write {
        /// The node.
        key: String,
        /// The new value, unique in the history.
        value: String,
    },
    /// Set `key` to `value` if its version is `expected_version`.
    CompareAndSet {
        /// The node.
        key: String,
        /// The version it must have.
        expected_version: u64,
        /// The new value, unique in the history.
        value: String,
    },
    /// Create a sequential node under `parent`.
    CreateSequential {
        /// The parent node.
        parent: String,
    },
    /// Acquire the exclusive lock `lock`.
    Acquire {
        /// The lock's path.
        lock: String,
    },
    /// Release the lock `lock` held under `token`.
    Release {
        /// The lock's path.
        lock: String,
        /// The token of the grant being released.
        token: u64,
    },
    /// Write `value` to the fenced resource `resource` under the token of a
    /// grant of `lock`: the resource refuses a token older than one it saw.
    FencedWrite {
        /// The lock whose token fences the resource.
        lock: String,
        /// The resource (a node written with `set_fenced`).
        resource: String,
        /// The token presented.
        token: u64,
        /// The value written, unique in the history.
        value: String,
    },
}

/// What the cluster answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// A read: the register's value and version (`None`: no such node).
    Read {
        /// The value and version read.
        value: Option<(String, u64)>,
    },
    /// A create, write or compare-and-set took effect.
    Written {
        /// The register's version after it.
        version: u64,
        /// The revision of the command.
        revision: u64,
    },
    /// A compare-and-set was refused: the version was not the expected one.
    VersionMismatch,
    /// A sequential node was created with this name (the last path segment).
    Created {
        /// The node's full path.
        path: String,
    },
    /// A lock was granted under this token.
    Granted {
        /// The fencing token's generation.
        token: u64,
    },
    /// A lock was released.
    Released,
    /// The fenced resource accepted the write.
    FenceAccepted,
    /// The fenced resource refused the write: a newer token had been seen.
    FenceRejected,
    /// The call was refused and certainly did not take effect.
    Failed {
        /// The error.
        error: String,
    },
    /// The call may or may not have taken effect (timeout, lost
    /// connection, outcome unknown).
    Indeterminate {
        /// The error.
        error: String,
    },
}

impl Operation {
    /// Whether the outcome is known.
    pub fn is_determinate(&self) -> bool {
        !matches!(self.outcome, Outcome::Indeterminate { .. })
    }
}

/// A whole run's history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// Every record, in the order they were recorded.
    pub records: Vec<Record>,
}

impl History {
    /// The operations, in the order they were recorded.
    pub fn operations(&self) -> impl Iterator<Item = &Operation> {
        self.records.iter().filter_map(|record| match record {
            Record::Operation(operation) => Some(operation),
            _ => None,
        })
    }

    /// Writes the history as JSON lines.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for record in &self.records {
            serde_json::to_writer(&mut out, record)?;
            out.write_all(b"\n")?;
        }
        out.flush()
    }

    /// Reads a history saved by [`History::save`].
    ///
    /// # Errors
    /// The file cannot be read, or a line is not a record (the error names
    /// the line).
    pub fn load(path: &Path) -> std::io::Result<History> {
        let file = std::io::BufReader::new(std::fs::File::open(path)?);
        let mut records = Vec::new();
        for (number, line) in file.lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let record = serde_json::from_str(&line).map_err(|error| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}:{}: {error}", path.display(), number + 1),
                )
            })?;
            records.push(record);
        }
        Ok(History { records })
    }
}
