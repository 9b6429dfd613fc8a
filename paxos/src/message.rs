//! Messages between replicas, one struct per message, grouped by
//! sub-protocol: election (pre-vote, prepare/promise), replication
//! (accept/accepted, commit), liveness and leases (heartbeats), catch-up,
//! and forwarding (proposals and reads sent to the leader).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::types::{AcceptedEntry, Ballot, Command, NodeId, Slot, Value};

/// A message addressed to one replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The sender.
    pub from: NodeId,
    /// The recipient.
    pub to: NodeId,
    /// What is said.
    pub message: Message,
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Asks whether the recipient would promise a ballot of this round.
    PreVote(PreVote),
    /// Answers a [`PreVote`].
    PreVoteReply(PreVoteReply),
    /// Phase 1a.
    Prepare(Prepare),
    /// Phase 1b.
    Promise(Promise),
    /// Refuses a prepare, accept or heartbeat under a ballot older than the
    /// one the acceptor promised.
    Reject(Reject),
    /// Phase 2a, for consecutive slots.
    Accept(Accept),
    /// Phase 2b, for consecutive slots, sent once the acceptance is durable.
    Accepted(Accepted),
    /// Announces the chosen prefix when no accept is going out to carry it.
    Commit(Commit),
    /// Keeps followers from electing, and gathers leases and read-index
    /// confirmations.
    Heartbeat(Heartbeat),
    /// Answers a [`Heartbeat`].
    HeartbeatAck(HeartbeatAck),
    /// Asks for chosen entries from a slot on.
    CatchUp(CatchUp),
    /// Chosen entries, answering a [`CatchUp`] or volunteered.
    Chosen(Chosen),
    /// Says the entries asked for were compacted away: fetch a snapshot.
    SnapshotNeeded(SnapshotNeeded),
    /// Commands proposed at a follower, passed to the leader.
    Forward(Forward),
    /// A read at a follower asking the leader for a safe read index.
    ReadIndex(ReadIndex),
    /// The leader's answer to a [`ReadIndex`].
    ReadIndexReply(ReadIndexReply),
    /// A replica rejoining after losing its disk asks what it may have
    /// forgotten.
    JoinProbe(JoinProbe),
    /// A voting member's answer to a [`JoinProbe`].
    JoinProbeReply(JoinProbeReply),
}

/// Would the recipient promise ballot `(round, sender)`? Sent before a real
/// prepare so that a replica that cannot win never raises its round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVote {
    /// The round the sender would campaign with.
    pub round: u64,
    /// The sender's chosen prefix; voters prefer candidates not behind them.
    pub chosen_through: Slot,
}

/// Answer to a [`PreVote`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVoteReply {
    /// The round asked about.
    pub round: u64,
    /// Whether the voter would promise.
    pub granted: bool,
    /// The voter's promised ballot, so that the candidate can pick a higher round.
    pub promised: Ballot,
}

/// Phase 1a: promise `ballot` and report what you accepted from `from_slot` on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepare {
    /// The ballot to promise.
    pub ballot: Ballot,
    /// The candidate's first slot not known to be chosen.
    pub from_slot: Slot,
}

/// Phase 1b: the acceptor promised `ballot`; sent once the promise is durable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promise {
    /// The ballot promised.
    pub ballot: Ballot,
    /// The acceptor's chosen prefix. Entries at or below it are chosen values.
    pub chosen_through: Slot,
    /// The acceptor's first retained slot; slots below were compacted.
    pub log_start: Slot,
    /// Accepted entries at or above the prepare's `from_slot`, in slot order.
    pub entries: Vec<AcceptedEntry>,
}

/// The recipient refused a message under `ballot` because it promised `promised`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// The refused ballot.
    pub ballot: Ballot,
    /// The higher ballot the acceptor promised.
    pub promised: Ballot,
}

/// Phase 2a: accept `values` for slots `first_slot..first_slot + values.len()`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accept {
    /// The leader's ballot.
    pub ballot: Ballot,
    /// The slot of the first value.
    pub first_slot: Slot,
    /// Values for consecutive slots.
    pub values: Vec<Value>,
    /// The leader's chosen prefix.
    pub chosen_through: Slot,
}

/// Phase 2b: the acceptor durably accepted slots `first_slot..first_slot + count`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The ballot accepted under.
    pub ballot: Ballot,
    /// The first slot.
    pub first_slot: Slot,
    /// How many consecutive slots.
    pub count: u64,
}

/// Announces that every slot up to `chosen_through` is chosen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// The leader's ballot.
    pub ballot: Ballot,
    /// The leader's chosen prefix.
    pub chosen_through: Slot,
}

/// The leader is alive. Acknowledging it grants the leader a lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The leader's ballot.
    pub ballot: Ballot,
    /// The leader's chosen prefix.
    pub chosen_through: Slot,
    /// Increases with every heartbeat of this leadership.
    pub sequence: u64,
}

/// Answer to a [`Heartbeat`]: the sender will promise no other ballot for
/// one lease duration from its receipt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    /// The leader's ballot.
    pub ballot: Ballot,
    /// The heartbeat acknowledged.
    pub sequence: u64,
    /// The follower's chosen prefix, for lag reporting.
    pub chosen_through: Slot,
}

/// Send me the chosen entries from `from_slot` on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatchUp {
    /// The first slot wanted.
    pub from_slot: Slot,
}

/// Chosen values for slots `first_slot..first_slot + values.len()`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chosen {
    /// The slot of the first value.
    pub first_slot: Slot,
    /// Chosen values for consecutive slots.
    pub values: Vec<Value>,
    /// The sender's chosen prefix, so the receiver knows whether to ask again.
    pub chosen_through: Slot,
}

/// The sender compacted the slots asked for; its state machine snapshot
/// covers them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotNeeded {
    /// The sender's first retained log slot.
    pub log_start: Slot,
    /// The sender's chosen prefix.
    pub chosen_through: Slot,
}

/// Commands proposed at a follower.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    /// The commands, in the order they were proposed.
    pub commands: Arc<[Command]>,
}

/// A follower's read asks the leader for a read index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadIndex {
    /// Chosen by the follower to match the reply.
    pub request: u64,
}

/// Asked by a replica that rejoins with an empty disk: what is the highest
/// ballot you promised and the highest slot you accepted?
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinProbe {}

/// A voting member's state, for a rejoining replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinProbeReply {
    /// The member's promised ballot.
    pub promised: Ballot,
    /// The highest slot it holds an accepted or chosen value for.
    pub highest_accepted_slot: Slot,
    /// Its chosen prefix.
    pub chosen_through: Slot,
}

/// The leader's answer to a [`ReadIndex`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadIndexReply {
    /// The follower's request number.
    pub request: u64,
    /// A read is linearizable once every slot up to this one is applied;
    /// `None` when the sender could not confirm its leadership.
    pub read_index: Option<Slot>,
}
