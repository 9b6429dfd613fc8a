//! The history as it is being recorded: every client worker and the
//! nemesis append to one [`Recorder`], stamping records with the run's
//! monotonic clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::history::{Call, ClientId, History, Operation, Outcome, Record};

/// Shared by every task of a run.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    next_id: AtomicU64,
    records: Mutex<Vec<Record>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    /// An empty history whose clock starts now.
    pub fn new() -> Recorder {
        Recorder {
            start: Instant::now(),
            next_id: AtomicU64::new(1),
            records: Mutex::new(Vec::new()),
        }
    }

    /// Nanoseconds since the run started.
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Appends one record.
    pub fn push(&self, record: Record) {
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(record);
    }

    /// Records an operation invoked at `invoked_ns` whose outcome is known
    /// now (its completion is now, unless it is indeterminate).
    pub fn operation(&self, client: ClientId, invoked_ns: u64, call: Call, outcome: Outcome) {
        let completed_ns = match outcome {
            Outcome::Indeterminate { .. } => None,
            _ => Some(self.now_ns()),
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.push(Record::Operation(Operation {
            id,
            client,
            invoked_ns,
            completed_ns,
            call,
            outcome,
        }));
    }

    /// Records a fault (or its healing) now.
    pub fn fault(&self, kind: &str, description: String) {
        tracing::info!(kind, "{description}");
        self.push(Record::Fault {
            description,
            kind: kind.to_string(),
            at_ns: self.now_ns(),
        });
    }

    /// A copy of everything recorded so far.
    pub fn history(&self) -> History {
        History {
            records: self
                .records
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
        }
    }
}
