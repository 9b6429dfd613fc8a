//! Sans-I/O Multi-Paxos core of Synod.
//!
//! [`Node`] is one replica's acceptor, proposer and learner. It never reads a
//! clock, touches the disk or the network, or spawns anything: the caller
//! (the replica's driver, or the simulator in `tests/`) feeds it inputs and
//! carries out what it asks. Given the same inputs it produces the same
//! outputs; its only randomness comes from [`Config::seed`].
//!
//! # The driver's duties
//!
//! 1. Create the node from durable state with [`Node::new`] (a new member
//!    starts from [`DurableState::bootstrap`]).
//! 2. Feed inputs as they happen, each with the current time in
//!    milliseconds: [`Node::step`] for every message from a peer,
//!    [`Node::tick`] every few milliseconds, [`Node::propose`] for client
//!    commands, [`Node::read`] for linearizable reads.
//! 3. When [`Node::has_ready`], take the [`Ready`] with [`Node::ready`].
//! 4. Write `ready.persist` durably (batches in `id` order; many may share one
//!    fsync), and only then call [`Node::persisted`] with its id. Messages
//!    and acknowledgements that depended on it come out of a later `ready`.
//!    A failed write is fatal: stop the replica and restart it from disk.
//! 5. Send `ready.messages`; they may go at once, in any order, and may be
//!    lost: the protocol retries.
//! 6. Apply `ready.chosen` to the state machine, in order. Each entry's value
//!    is already durable here.
//! 7. Serve each [`ReadOutcome::Ready`] read once the state machine has
//!    applied its `read_index`.
//! 8. When `ready.snapshot` asks, fetch a snapshot of the state machine from
//!    that replica, install it durably, and call [`Node::snapshot_installed`].
//! 9. Now and then, once applied state is durable, call [`Node::compact`].
//!
//! # Protocol
//!
//! Multi-Paxos as in "Paxos Made Simple" and "Paxos Made Live": ballots
//! `(round, node)`; phase 1 once per leadership over every open slot, with
//! the highest-ballot accepted value adopted per slot and no-ops for gaps;
//! phase 2 pipelined up to [`Config::max_inflight_slots`] and batched (many
//! commands per slot, many slots per message). A follower marks slot `s`
//! chosen only if it accepted `s` under the ballot of the leader that
//! announced it; otherwise it fetches the value. Elections use randomised
//! timeouts and a pre-vote, and acceptors that acknowledged a live leader's
//! heartbeat promise nobody else for a lease, which gives the leader a lease
//! for local linearizable reads.

mod config;
mod durable;
mod message;
mod node;
mod refusal;
mod types;

pub use config::{Config, ConfigError};
pub use durable::{DurableState, LogRecord, Persist};
pub use message::*;
pub use node::{
    JoinProgress, Node, PeerStatus, ProposeError, ReadId, ReadOutcome, Ready, Role,
    SnapshotRequest, Status,
};
pub use refusal::{ElectionStep, Refusal, RefusalReason};
pub use types::{
    AcceptedEntry, Ballot, Batch, ChosenEntry, Command, Membership, NodeId, Slot, Value,
    MAX_MEMBERS,
};
