//! Identifiers, ballots and log values: the vocabulary of the protocol.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Identifies a replica. Stable for the life of the replica's data directory.
pub type NodeId = u64;

/// Index of a position in the replicated log. Slot 0 holds the initial
/// membership; client commands start at slot 1.
pub type Slot = u64;

/// An opaque client command. The core never looks inside it.
pub type Command = Bytes;

/// A proposal number: totally ordered by `(round, node)`, so two proposers
/// never share a ballot.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Ballot {
    /// Increases with every leadership attempt.
    pub round: u64,
    /// The proposer that owns this ballot; breaks ties between equal rounds.
    pub node: NodeId,
}

impl Ballot {
    /// The ballot below every real ballot; nothing is ever proposed under it.
    pub const ZERO: Ballot = Ballot { round: 0, node: 0 };

    /// Creates the ballot `(round, node)`.
    pub fn new(round: u64, node: NodeId) -> Ballot {
        Ballot { round, node }
    }
}

impl fmt::Display for Ballot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.round, self.node)
    }
}

/// What a slot of the log holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Value {
    /// Fills a gap found by a new leader; changes nothing when applied.
    Noop,
    /// A batch of client commands, applied in order.
    Commands(Batch),
    /// The voting members from this slot on. Slot 0 always holds the initial
    /// member set; later entries are reserved for reconfiguration.
    Membership(Arc<[NodeId]>),
}

impl Value {
    /// Number of client commands this value carries.
    pub fn command_count(&self) -> usize {
        match self {
            Value::Commands(batch) => batch.commands.len(),
            Value::Noop | Value::Membership(_) => 0,
        }
    }
}

/// Client commands packed into one slot by the leader, with the leader's
/// clock reading when it packed them: the only way time enters the
/// replicated state machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The leader's time when the slot was filled, in the caller's clock
    /// units (the replica uses ms since the Unix epoch). Never decreases
    /// within one leadership.
    pub stamp_ms: u64,
    /// The commands, in the order they were proposed.
    pub commands: Arc<[Command]>,
}

/// A value accepted by an acceptor under a ballot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedEntry {
    /// The slot the value was accepted for.
    pub slot: Slot,
    /// The ballot it was accepted under.
    pub ballot: Ballot,
    /// The value itself.
    pub value: Value,
}

/// An entry known to be chosen, ready to apply in slot order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChosenEntry {
    /// The slot; entries are handed out with consecutive slots.
    pub slot: Slot,
    /// The chosen value.
    pub value: Value,
}

/// The voting members of the cluster, sorted, with quorum arithmetic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    members: Arc<[NodeId]>,
}

/// The most members a cluster may have (quorums are tracked in a `u64` mask).
pub const MAX_MEMBERS: usize = 64;

impl Membership {
    /// Builds a membership from a list of distinct node ids.
    ///
    /// # Errors
    /// Empty, duplicated or more than [`MAX_MEMBERS`] ids.
    pub fn new(members: &[NodeId]) -> Result<Membership, crate::ConfigError> {
        let mut sorted = members.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.is_empty() {
            return Err(crate::ConfigError::NoMembers);
        }
        if sorted.len() != members.len() {
            return Err(crate::ConfigError::DuplicateMember);
        }
        if sorted.len() > MAX_MEMBERS {
            return Err(crate::ConfigError::TooManyMembers(sorted.len()));
        }
        Ok(Membership {
            members: sorted.into(),
        })
    }

    /// The member ids in ascending order.
    pub fn members(&self) -> &[NodeId] {
        &self.members
    }

    /// The position of `node` among the members, if it is one.
    pub fn index_of(&self, node: NodeId) -> Option<usize> {
        self.members.binary_search(&node).ok()
    }

    /// Whether `node` votes.
    pub fn contains(&self, node: NodeId) -> bool {
        self.index_of(node).is_some()
    }

    /// The smallest number of members that makes a majority.
    pub fn quorum(&self) -> usize {
        self.members.len() / 2 + 1
    }

    /// Whether the members whose bits are set in `mask` form a majority.
    pub fn is_quorum(&self, mask: u64) -> bool {
        mask.count_ones() as usize >= self.quorum()
    }

    /// The value of slot 0 for this membership.
    pub fn to_value(&self) -> Value {
        Value::Membership(self.members.clone())
    }

    /// Reads a membership back from a [`Value::Membership`].
    pub fn from_value(value: &Value) -> Option<Membership> {
        match value {
            Value::Membership(members) => Membership::new(members).ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_membership_round_trips_through_its_log_value() {
        let members = Membership::new(&[3, 1, 2]).expect("membership");
        assert_eq!(Membership::from_value(&members.to_value()), Some(members));
        assert_eq!(Membership::from_value(&Value::Noop), None);
    }

    #[test]
    fn only_command_batches_count_commands() {
        let batch = Value::Commands(Batch {
            stamp_ms: 0,
            commands: vec![Command::from_static(b"a"), Command::from_static(b"b")].into(),
        });
        assert_eq!(batch.command_count(), 2);
        assert_eq!(Value::Noop.command_count(), 0);
        let members = Membership::new(&[1, 2, 3]).expect("membership");
        assert_eq!(members.to_value().command_count(), 0);
    }

    #[test]
    fn ballots_order_by_round_then_node() {
        assert!(Ballot::new(1, 9) < Ballot::new(2, 1));
        assert!(Ballot::new(2, 1) < Ballot::new(2, 3));
        assert!(Ballot::ZERO < Ballot::new(0, 1));
        assert_eq!(Ballot::new(3, 2), Ballot::new(3, 2));
        let mut ballots = vec![Ballot::new(2, 3), Ballot::new(1, 5), Ballot::new(2, 1)];
        ballots.sort();
        assert_eq!(
            ballots,
            vec![Ballot::new(1, 5), Ballot::new(2, 1), Ballot::new(2, 3)]
        );
    }

    #[test]
    fn quorum_is_a_strict_majority() {
        let three = Membership::new(&[3, 1, 2]).expect("valid");
        assert_eq!(three.members(), &[1, 2, 3]);
        assert_eq!(three.quorum(), 2);
        assert!(!three.is_quorum(0b001));
        assert!(three.is_quorum(0b101));
        let five = Membership::new(&[1, 2, 3, 4, 5]).expect("valid");
        assert_eq!(five.quorum(), 3);
        assert!(!five.is_quorum(0b00011));
        assert!(five.is_quorum(0b10101));
        let four = Membership::new(&[1, 2, 3, 4]).expect("valid");
        assert_eq!(four.quorum(), 3);
    }

    #[test]
    fn membership_rejects_bad_sets() {
        assert!(Membership::new(&[]).is_err());
        assert!(Membership::new(&[1, 1]).is_err());
        let many: Vec<NodeId> = (0..65).collect();
        assert!(Membership::new(&many).is_err());
    }
}
