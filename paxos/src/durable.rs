//! What the core asks its caller to make durable, and the durable state a
//! replica restarts from.
//!
//! The caller owns the disk. The core hands it [`Persist`] batches in
//! increasing `id` order; the caller makes each durable, in order, and then
//! reports [`crate::Node::persisted`]. [`DurableState::apply`] is the
//! reference meaning of a batch: a storage layer must leave its tables exactly
//! as `apply` leaves a `DurableState`, and a restart passes that state back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::types::{AcceptedEntry, Ballot, ChosenEntry, Membership, Slot, Value};

/// One batch of changes to make durable, atomically or in the order listed
/// (promise, acceptances, learned values, chosen prefix, compaction,
/// membership): every order is safe because no answer depending on the batch
/// leaves the replica before the whole batch is durable. It serializes
/// so that storage can journal it as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persist {
    /// Batches are numbered 1, 2, 3, ... and must become durable in order.
    pub id: u64,
    /// The new promised ballot, if it changed.
    pub promised: Option<Ballot>,
    /// Acceptances to record, replacing whatever the slot held.
    pub accepted: Vec<AcceptedEntry>,
    /// Chosen values learned from other replicas, replacing whatever the slot
    /// held.
    pub learned: Vec<ChosenEntry>,
    /// The new chosen prefix, if it advanced. A hint for a faster restart:
    /// the chosen prefix is never below what the state machine applied.
    pub chosen_through: Option<Slot>,
    /// Log entries below this slot may be dropped; the state machine covers them.
    pub compact_below: Option<Slot>,
    /// The membership in force after a snapshot was installed.
    pub membership: Option<Membership>,
    /// `Some(false)` once a rejoining replica may vote again.
    pub joining: Option<bool>,
}

impl Persist {
    /// Whether the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.promised.is_none()
            && self.accepted.is_empty()
            && self.learned.is_empty()
            && self.chosen_through.is_none()
            && self.compact_below.is_none()
            && self.membership.is_none()
            && self.joining.is_none()
    }
}

/// One slot of the durable log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// The ballot the value was accepted under; [`Ballot::ZERO`] for values
    /// learned as chosen from another replica.
    pub ballot: Ballot,
    /// The value.
    pub value: Value,
}

/// Everything a replica's core needs to restart: the acceptor's promise, its
/// log, and how much of the log is known chosen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurableState {
    /// The voting members (from slot 0, or from the last installed snapshot).
    pub membership: Membership,
    /// The highest ballot promised.
    pub promised: Ballot,
    /// Every slot up to this one is chosen, and the log holds the chosen
    /// value for each retained one.
    pub chosen_through: Slot,
    /// The first slot retained in the log; earlier ones were compacted.
    pub log_start: Slot,
    /// Accepted and chosen values by slot, none below `log_start`.
    pub log: BTreeMap<Slot, LogRecord>,
    /// The replica lost its disk and is rejoining: it does not vote until
    /// it has learned what it may have forgotten (see [`DurableState::rejoin`]).
    #[serde(default)]
    pub joining: bool,
}

impl DurableState {
    /// The state of a brand-new cluster member: slot 0 holds the initial
    /// membership, chosen by construction, and nothing is promised.
    pub fn bootstrap(membership: Membership) -> DurableState {
        let mut log = BTreeMap::new();
        log.insert(
            0,
            LogRecord {
                ballot: Ballot::ZERO,
                value: membership.to_value(),
            },
        );
        DurableState {
            membership,
            promised: Ballot::ZERO,
            chosen_through: 0,
            log_start: 0,
            log,
            joining: false,
        }
    }

    /// The state of a member that lost its disk (or was given a new, empty
    /// one) and rejoins the cluster it belonged to. Such a replica may have
    /// forgotten promises and acceptances it made, so it votes in nothing
    /// until every other member has told it the highest ballot it promised
    /// and the highest slot it accepted, it has promised at least that
    /// ballot, and it has learned the chosen values through that slot.
    pub fn rejoin(membership: Membership) -> DurableState {
        DurableState {
            joining: true,
            ..DurableState::bootstrap(membership)
        }
    }

    /// Applies one batch, as a storage layer would.
    pub fn apply(&mut self, batch: &Persist) {
        if let Some(promised) = batch.promised {
            self.promised = self.promised.max(promised);
        }
        for entry in &batch.accepted {
            if entry.slot >= self.log_start {
                self.log.insert(
                    entry.slot,
                    LogRecord {
                        ballot: entry.ballot,
                        value: entry.value.clone(),
                    },
                );
            }
        }
        for entry in &batch.learned {
            if entry.slot >= self.log_start {
                self.log.insert(
                    entry.slot,
                    LogRecord {
                        ballot: Ballot::ZERO,
                        value: entry.value.clone(),
                    },
                );
            }
        }
        if let Some(chosen_through) = batch.chosen_through {
            self.chosen_through = self.chosen_through.max(chosen_through);
        }
        if let Some(below) = batch.compact_below {
            if below > self.log_start {
                self.log = self.log.split_off(&below);
                self.log_start = below;
            }
        }
        if let Some(membership) = &batch.membership {
            self.membership = membership.clone();
        }
        if let Some(joining) = batch.joining {
            self.joining = joining;
        }
    }

    /// Checks that the state can be restarted from, given the first slot the
    /// state machine has not applied.
    ///
    /// # Errors
    /// A log that misses chosen entries the state machine still needs, or
    /// holds entries below its start.
    pub fn check(&self, apply_from: Slot) -> Result<(), ConfigError> {
        if let Some((&first, _)) = self.log.iter().next() {
            if first < self.log_start {
                return Err(ConfigError::InconsistentState(format!(
                    "log holds slot {first} below its start {}",
                    self.log_start
                )));
            }
        }
        if apply_from < self.log_start {
            return Err(ConfigError::InconsistentState(format!(
                "state machine applied up to slot {apply_from} but the log was compacted below {}",
                self.log_start
            )));
        }
        let mut slot = apply_from;
        while slot <= self.chosen_through {
            if !self.log.contains_key(&slot) {
                return Err(ConfigError::InconsistentState(format!(
                    "chosen slot {slot} is missing from the log"
                )));
            }
            slot += 1;
        }
        Ok(())
    }
}
