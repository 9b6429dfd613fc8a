//! The replica's core: acceptor, proposer and learner in one deterministic
//! state machine. Its invariants are checked after every input
//! ([`invariants`]).

mod invariants;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::mem;
use std::sync::Arc;

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use thiserror::Error;

use crate::config::{Config, ConfigError};
use crate::durable::{DurableState, Persist};
use crate::message::*;
use crate::refusal::{ElectionStep, Refusal, RefusalReason};
use crate::types::{
    AcceptedEntry, Ballot, Batch, ChosenEntry, Command, Membership, NodeId, Slot, Value,
};

/// Chooses a read; picked by the caller and handed back in [`ReadOutcome`].
pub type ReadId = u64;

/// The role a replica plays at the moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Follows a leader, or waits for one.
    Follower,
    /// Asking whether a majority would promise before raising its round.
    PreCandidate,
    /// Running phase 1 under its own ballot.
    Candidate,
    /// Won phase 1; proposes in phase 2.
    Leader,
}

/// A proposal the core could not take, with the commands handed back.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProposeError {
    /// No leader is known; try again after one is elected.
    #[error("no leader is known")]
    NoLeader(Vec<Command>),
    /// The leader's queue of commands waiting for a slot is full.
    #[error("too many commands are waiting for a slot")]
    Overloaded(Vec<Command>),
}

/// What became of a read request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// The read is linearizable once the state machine applied every slot up
    /// to `read_index`.
    Ready {
        /// The caller's read.
        id: ReadId,
        /// Serve the read after applying this slot.
        read_index: Slot,
    },
    /// No safe read index could be had (no leader, leadership lost, or
    /// timeout); the caller may retry.
    Aborted {
        /// The caller's read.
        id: ReadId,
    },
}

/// The core needs the state machine's snapshot from another replica because
/// the entries it lacks were compacted there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRequest {
    /// The replica to fetch the snapshot from.
    pub from: NodeId,
    /// The snapshot must cover at least every slot up to this one.
    pub covering_through: Slot,
}

/// Everything the core asks of its caller since the last call to
/// [`Node::ready`]. See the crate docs for the order of duties.
#[derive(Debug, Default)]
pub struct Ready {
    /// Changes to make durable, then report with [`Node::persisted`].
    pub persist: Option<Persist>,
    /// Messages to send now; each one's durable dependencies are met.
    pub messages: Vec<Envelope>,
    /// Chosen entries to apply, in consecutive slot order.
    pub chosen: Vec<ChosenEntry>,
    /// Reads that may now be served, or were aborted.
    pub reads: Vec<ReadOutcome>,
    /// A snapshot to fetch and install (then call [`Node::snapshot_installed`]).
    pub snapshot: Option<SnapshotRequest>,
    /// Why this replica held an election back since the last call, for the
    /// logs; acting on them is never needed.
    pub refusals: Vec<Refusal>,
}

/// One member's progress as the leader sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// The member.
    pub id: NodeId,
    /// The member's chosen prefix as last reported to the leader.
    pub chosen_through: Slot,
    /// When the leader last heard from it under the current ballot, on the
    /// leader's clock.
    pub last_heard_ms: u64,
}

/// A snapshot of the core's state for status displays and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// This replica.
    pub id: NodeId,
    /// Its role.
    pub role: Role,
    /// The leader it believes in, if any.
    pub leader: Option<NodeId>,
    /// Its highest promised ballot.
    pub promised: Ballot,
    /// Its chosen prefix.
    pub chosen_through: Slot,
    /// The highest chosen prefix it has heard of (from a leader, or a read
    /// index), at least its own: how far behind the cluster it is.
    pub known_chosen_through: Slot,
    /// The first slot it has not handed out for applying.
    pub apply_next: Slot,
    /// Its first retained log slot.
    pub log_start: Slot,
    /// Commands waiting for a slot (leader only).
    pub pending_commands: usize,
    /// Slots proposed and not yet known chosen (leader only).
    pub inflight_slots: u64,
    /// The next slot the leader will assign (leader only).
    pub next_slot: Slot,
    /// Per-member progress (leader only).
    pub peers: Vec<PeerStatus>,
    /// Other members that lost their disks and asked what they may have
    /// forgotten, and have sent this replica no voter's message since
    /// (a pre-vote, prepare, promise, accept, acceptance or heartbeat):
    /// they vote in nothing until they have heard from every other member
    /// and caught up.
    pub rejoining: Vec<NodeId>,
}

/// An entry of the in-memory log.
#[derive(Clone, Debug)]
struct Entry {
    ballot: Ballot,
    value: Value,
    /// The persist batch that wrote it; 0 for entries loaded from disk.
    batch: u64,
}

/// When a message may leave.
#[derive(Clone, Copy, Debug)]
enum After {
    /// Right away.
    Now,
    /// Once every write issued so far is durable.
    AllWrites,
    /// Once the given batch is durable.
    Batch(u64),
}

/// Who asked for a read the leader is confirming.
#[derive(Clone, Copy, Debug)]
enum Reader {
    Local(ReadId),
    Remote { node: NodeId, request: u64 },
}

#[derive(Debug)]
struct PreCandidate {
    round: u64,
    granted: u64,
}

#[derive(Debug)]
struct ReceivedPromise {
    chosen_through: Slot,
    entries: Vec<AcceptedEntry>,
}

#[derive(Debug)]
struct Candidate {
    ballot: Ballot,
    /// The persist batch that records the promise of `ballot`.
    ballot_batch: u64,
    promises: BTreeMap<NodeId, ReceivedPromise>,
}

#[derive(Clone, Copy, Debug)]
struct Inflight {
    acks: u64,
    chosen: bool,
    sent_at_ms: u64,
}

#[derive(Debug)]
struct Leader {
    ballot: Ballot,
    ballot_batch: u64,
    /// The next slot to assign.
    next_slot: Slot,
    /// Slots from `inflight_base` to `next_slot - 1`, in order.
    inflight: VecDeque<Inflight>,
    /// The slot of `inflight[0]`; always `chosen_through + 1` once trimmed.
    inflight_base: Slot,
    /// The no-op proposed on election; lease and read-index reads wait until
    /// it is chosen, so that every earlier chosen entry is known.
    barrier_slot: Slot,
    pending: VecDeque<Command>,
    /// The stamp of the last batch packed; stamps never decrease.
    last_stamp_ms: u64,
    /// Slots assigned since the last broadcast.
    unsent_from: Option<Slot>,
    announced_chosen_through: Slot,
    heartbeat_sequence: u64,
    last_heartbeat_ms: u64,
    heartbeat_due: bool,
    heartbeat_sent_at: VecDeque<(u64, u64)>,
    acked_sequence: Vec<u64>,
    last_heard_ms: Vec<u64>,
    peer_chosen_through: Vec<Slot>,
    lease_until_ms: u64,
    reads_waiting_barrier: Vec<Reader>,
    reads_waiting_quorum: VecDeque<(u64, Reader, Slot, u64)>,
}

/// Where a replica rejoining after losing its disk stands
/// ([`Node::join_progress`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinProgress {
    /// Waiting for these members to report what they promised and accepted;
    /// it must hear from every other member before it may vote.
    WaitingFor(Vec<NodeId>),
    /// Every member reported: it votes once its chosen prefix reaches `slot`.
    CatchingUp {
        /// The highest slot another member reported accepted or chosen.
        slot: Slot,
        /// Its own chosen prefix now.
        chosen_through: Slot,
    },
}

/// A replica rejoining after losing its disk: what the other members told it.
#[derive(Debug, Default)]
struct Joining {
    replies: BTreeMap<NodeId, JoinProbeReply>,
    /// Once every other member replied: the ballot to promise at least, and
    /// the slot the chosen prefix must reach before voting.
    target: Option<(Ballot, Slot)>,
    last_probe_ms: Option<u64>,
    last_nudge_ms: u64,
}

#[derive(Debug)]
enum RoleState {
    Follower,
    PreCandidate(PreCandidate),
    Candidate(Candidate),
    Leader(Box<Leader>),
}

/// How many recent heartbeat send times the leader remembers for leases.
const HEARTBEAT_HISTORY: usize = 64;

/// A Multi-Paxos replica: acceptor, proposer and learner.
///
/// Methods fall into four groups, called in this order by the driver:
///
/// * **Inputs** (each takes the current time): [`Node::step`] for a message
///   from a peer, [`Node::tick`] for the passage of time, [`Node::propose`],
///   [`Node::read`], and the caller's reports [`Node::persisted`],
///   [`Node::compact`], [`Node::snapshot_installed`].
/// * **Output**: [`Node::ready`] drains everything the inputs produced;
///   [`Node::has_ready`] says whether there is anything to drain.
/// * **Getters**: [`Node::id`], [`Node::role`], [`Node::leader`],
///   [`Node::chosen_through`], [`Node::has_lease`], [`Node::status`], ...
/// * **Construction**: [`Node::new`] from durable state (a bootstrap state
///   for a new member).
#[derive(Debug)]
pub struct Node {
    config: Config,
    membership: Membership,
    self_bit: u64,
    rng: ChaCha8Rng,
    now_ms: u64,

    promised: Ballot,
    log: BTreeMap<Slot, Entry>,
    log_start: Slot,
    chosen_through: Slot,
    apply_next: Slot,
    highest_round_seen: u64,

    building: Persist,
    durable_through: u64,
    held: BTreeMap<u64, Vec<Envelope>>,
    loopback: VecDeque<Message>,
    outbox: Vec<Envelope>,
    reads_out: Vec<ReadOutcome>,
    snapshot_out: Option<SnapshotRequest>,
    refusals_out: Vec<Refusal>,
    /// Members that probed as rejoiners and have not voted since.
    rejoining_members: BTreeSet<NodeId>,

    role: RoleState,
    leader_hint: Option<NodeId>,
    election_deadline_ms: u64,
    lease_granted_until_ms: u64,
    lease_granted_to: Option<NodeId>,
    no_promise_until_ms: u64,

    announced_chosen_through: Slot,
    catch_up_sent: Option<(NodeId, Slot, u64)>,
    next_read_request: u64,
    forwarded_reads: BTreeMap<u64, (ReadId, u64)>,
    reads_waiting_chosen: Vec<(ReadId, Slot, u64)>,
    joining: Option<Joining>,
}

impl Node {
    /// Starts a replica's core from its durable state. `apply_from` is the
    /// first slot the caller's state machine has not applied (0 for a new
    /// member). The replica promises nothing for one lease duration, since it
    /// may have forgotten a lease it granted before it stopped.
    ///
    /// # Errors
    /// An invalid configuration, a replica that is not a member, or a durable
    /// state inconsistent with `apply_from`.
    pub fn new(
        config: Config,
        state: DurableState,
        apply_from: Slot,
        now_ms: u64,
    ) -> Result<Node, ConfigError> {
        config.validate()?;
        let membership = state.membership.clone();
        let Some(self_index) = membership.index_of(config.id) else {
            return Err(ConfigError::NotAMember(config.id));
        };
        state.check(apply_from)?;
        let chosen_through = state.chosen_through.max(apply_from.saturating_sub(1));
        let joining = state.joining.then(Joining::default);
        let log = state
            .log
            .into_iter()
            .map(|(slot, record)| {
                (
                    slot,
                    Entry {
                        ballot: record.ballot,
                        value: record.value,
                        batch: 0,
                    },
                )
            })
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ config.id.rotate_left(32));
        // Read-index requests are numbered from a random start, so that a
        // reply delayed from before a restart cannot match a new request.
        let next_read_request = rng.next_u64() >> 1;
        let first_timeout = random_between(
            &mut rng,
            config.election_timeout_min_ms,
            config.election_timeout_max_ms,
        );
        Ok(Node {
            membership,
            self_bit: 1 << self_index,
            rng,
            now_ms,
            promised: state.promised,
            log,
            log_start: state.log_start,
            chosen_through,
            apply_next: apply_from,
            highest_round_seen: state.promised.round,
            building: Persist {
                id: 1,
                ..Persist::default()
            },
            durable_through: 0,
            held: BTreeMap::new(),
            loopback: VecDeque::new(),
            outbox: Vec::new(),
            reads_out: Vec::new(),
            snapshot_out: None,
            refusals_out: Vec::new(),
            rejoining_members: BTreeSet::new(),
            role: RoleState::Follower,
            leader_hint: None,
            election_deadline_ms: now_ms + first_timeout,
            lease_granted_until_ms: 0,
            lease_granted_to: None,
            no_promise_until_ms: now_ms + config.lease_ms,
            announced_chosen_through: chosen_through,
            catch_up_sent: None,
            next_read_request,
            forwarded_reads: BTreeMap::new(),
            reads_waiting_chosen: Vec::new(),
            joining,
            config,
        })
    }

    // ----- Getters -----

    /// This replica's id.
    pub fn id(&self) -> NodeId {
        self.config.id
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The voting members.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The current role.
    pub fn role(&self) -> Role {
        match self.role {
            RoleState::Follower => Role::Follower,
            RoleState::PreCandidate(_) => Role::PreCandidate,
            RoleState::Candidate(_) => Role::Candidate,
            RoleState::Leader(_) => Role::Leader,
        }
    }

    /// The leader this replica believes in (itself when it leads).
    pub fn leader(&self) -> Option<NodeId> {
        self.leader_hint
    }

    /// The highest ballot this replica promised.
    pub fn promised(&self) -> Ballot {
        self.promised
    }

    /// Every slot up to this one is known chosen here.
    pub fn chosen_through(&self) -> Slot {
        self.chosen_through
    }

    /// The first slot not yet handed out for applying.
    pub fn apply_next(&self) -> Slot {
        self.apply_next
    }

    /// The first slot retained in the log.
    pub fn log_start(&self) -> Slot {
        self.log_start
    }

    /// Whether this replica is rejoining after losing its disk (and so does
    /// not vote yet).
    pub fn is_joining(&self) -> bool {
        self.joining.is_some()
    }

    /// Where a rejoining replica stands, or `None` once it votes.
    pub fn join_progress(&self) -> Option<JoinProgress> {
        let joining = self.joining.as_ref()?;
        Some(match joining.target {
            Some((_, slot)) => JoinProgress::CatchingUp {
                slot,
                chosen_through: self.chosen_through,
            },
            None => JoinProgress::WaitingFor(
                self.membership
                    .members()
                    .iter()
                    .copied()
                    .filter(|&member| {
                        member != self.config.id && !joining.replies.contains_key(&member)
                    })
                    .collect(),
            ),
        })
    }

    /// Whether this replica leads and holds a lease at `now_ms` (its clock).
    pub fn has_lease(&self, now_ms: u64) -> bool {
        match &self.role {
            RoleState::Leader(leader) => now_ms < leader.lease_until_ms,
            _ => false,
        }
    }

    /// When the leader's lease ends on its clock; 0 when it holds none.
    pub fn lease_until_ms(&self) -> u64 {
        match &self.role {
            RoleState::Leader(leader) => leader.lease_until_ms,
            _ => 0,
        }
    }

    /// Role, leader, ballot, slots and per-member progress.
    pub fn status(&self) -> Status {
        let (pending_commands, inflight_slots, next_slot, peers) = match &self.role {
            RoleState::Leader(leader) => (
                leader.pending.len(),
                leader.inflight.len() as u64,
                leader.next_slot,
                self.membership
                    .members()
                    .iter()
                    .enumerate()
                    .map(|(index, &id)| PeerStatus {
                        id,
                        chosen_through: leader.peer_chosen_through[index],
                        last_heard_ms: leader.last_heard_ms[index],
                    })
                    .collect(),
            ),
            _ => (0, 0, 0, Vec::new()),
        };
        Status {
            id: self.id(),
            role: self.role(),
            leader: self.leader_hint,
            promised: self.promised,
            chosen_through: self.chosen_through,
            known_chosen_through: self.announced_chosen_through.max(self.chosen_through),
            apply_next: self.apply_next,
            log_start: self.log_start,
            pending_commands,
            inflight_slots,
            next_slot,
            peers,
            rejoining: self
                .rejoining_members
                .iter()
                .copied()
                .filter(|&member| self.membership.contains(member))
                .collect(),
        }
    }

    // ----- Output -----

    /// Whether [`Node::ready`] would return anything. (A commit announcement
    /// falls due only when the chosen prefix advanced, which the batch being
    /// built records, so it needs no test of its own.)
    pub fn has_ready(&self) -> bool {
        !self.building.is_empty()
            || !self.outbox.is_empty()
            || !self.reads_out.is_empty()
            || !self.refusals_out.is_empty()
            || self.snapshot_out.is_some()
            || self.chosen_releasable()
            || self.proposals_flushable()
    }

    /// Drains every output produced since the last call.
    pub fn ready(&mut self) -> Ready {
        self.flush_proposals();
        self.announce_commit();
        self.drain_loopback();
        let persist = if self.building.is_empty() {
            None
        } else {
            let next = Persist {
                id: self.building.id + 1,
                ..Persist::default()
            };
            Some(mem::replace(&mut self.building, next))
        };
        let chosen = self.release_chosen();
        self.check_invariants();
        Ready {
            persist,
            messages: mem::take(&mut self.outbox),
            chosen,
            reads: mem::take(&mut self.reads_out),
            snapshot: self.snapshot_out.take(),
            refusals: mem::take(&mut self.refusals_out),
        }
    }

    // ----- Inputs -----

    /// Reports that every persist batch up to `id` is durable. Messages that
    /// waited for them are released, and the leader counts its own
    /// acceptances. An `id` past the last batch handed out counts as that
    /// batch: a batch not yet handed out cannot be durable.
    pub fn persisted(&mut self, now_ms: u64, id: u64) {
        self.advance_clock(now_ms);
        let id = id.min(self.last_issued_batch());
        if id <= self.durable_through {
            return;
        }
        self.durable_through = id;
        let later = self.held.split_off(&(id + 1));
        let released = mem::replace(&mut self.held, later);
        for (_, envelopes) in released {
            for envelope in envelopes {
                self.route(envelope);
            }
        }
        self.drain_loopback();
        self.check_invariants();
    }

    /// Advances time: heartbeats, retransmissions, elections, timeouts.
    pub fn tick(&mut self, now_ms: u64) {
        self.advance_clock(now_ms);
        if matches!(self.role, RoleState::Leader(_)) {
            self.leader_tick();
        } else {
            if self.joining.is_some() {
                self.joining_tick();
            } else if self.now_ms >= self.election_deadline_ms {
                self.start_pre_vote();
            }
            self.retry_catch_up();
        }
        self.expire_reads();
        self.drain_loopback();
        self.check_invariants();
    }

    /// Handles a message from a peer. Messages from non-members and
    /// misaddressed messages are ignored.
    pub fn step(&mut self, now_ms: u64, envelope: Envelope) {
        self.advance_clock(now_ms);
        if envelope.to != self.id()
            || envelope.from == self.id()
            || !self.membership.contains(envelope.from)
        {
            return;
        }
        self.handle(envelope.from, envelope.message);
        self.drain_loopback();
        self.check_invariants();
    }

    /// Proposes commands. At the leader they queue for the next slots; at a
    /// follower they are forwarded to the leader (and may be lost with it: the
    /// caller retries, and its state machine drops duplicates).
    ///
    /// # Errors
    /// [`ProposeError::NoLeader`] when no leader is known,
    /// [`ProposeError::Overloaded`] when the leader's queue is full; both hand
    /// the commands back.
    pub fn propose(&mut self, now_ms: u64, commands: Vec<Command>) -> Result<(), ProposeError> {
        self.advance_clock(now_ms);
        if commands.is_empty() {
            return Ok(());
        }
        let max_pending = self.config.max_pending_commands;
        match &mut self.role {
            RoleState::Leader(leader) => {
                if leader.pending.len() + commands.len() > max_pending {
                    return Err(ProposeError::Overloaded(commands));
                }
                leader.pending.extend(commands);
                Ok(())
            }
            // Only a leader names itself (see the invariants).
            _ => match self.leader_hint {
                Some(leader) => {
                    self.send(
                        leader,
                        Message::Forward(Forward {
                            commands: commands.into(),
                        }),
                        After::Now,
                    );
                    Ok(())
                }
                _ => Err(ProposeError::NoLeader(commands)),
            },
        }
    }

    /// Asks for a linearizable read. The outcome arrives in
    /// [`Ready::reads`]: at a leader with a lease at once, otherwise after a
    /// heartbeat round confirms the leadership (at a follower, through the
    /// leader).
    pub fn read(&mut self, now_ms: u64, id: ReadId) {
        self.advance_clock(now_ms);
        let pending = self.forwarded_reads.len() + self.reads_waiting_chosen.len();
        if pending >= self.config.max_pending_reads {
            self.reads_out.push(ReadOutcome::Aborted { id });
            return;
        }
        if matches!(self.role, RoleState::Leader(_)) {
            self.leader_read(Reader::Local(id));
        } else if let Some(leader) = self.leader_hint {
            // Not leading, so the leader named is another replica (see the
            // invariants); likewise below wherever a follower asks its leader.
            let request = self.next_read_request;
            self.next_read_request += 1;
            let deadline = self.now_ms + self.config.read_timeout_ms;
            self.forwarded_reads.insert(request, (id, deadline));
            self.send(
                leader,
                Message::ReadIndex(ReadIndex { request }),
                After::Now,
            );
        } else {
            self.reads_out.push(ReadOutcome::Aborted { id });
        }
        self.drain_loopback();
        self.check_invariants();
    }

    /// Reports that the state machine's effects are durable through slot
    /// `applied_through`; the log below it, less a retained tail, may go.
    pub fn compact(&mut self, applied_through: Slot) {
        let limit = applied_through
            .min(self.chosen_through)
            .min(self.apply_next.saturating_sub(1));
        let new_start = limit.saturating_sub(self.config.log_retain_slots);
        if new_start <= self.log_start {
            return;
        }
        self.log = self.log.split_off(&new_start);
        self.log_start = new_start;
        self.building.compact_below = Some(new_start);
        self.check_invariants();
    }

    /// Reports that the caller installed, durably, a snapshot of the state
    /// machine covering every slot up to `through`, with `membership` in
    /// force. The log below it is dropped and catch-up resumes after it.
    pub fn snapshot_installed(&mut self, now_ms: u64, through: Slot, membership: Membership) {
        self.advance_clock(now_ms);
        if through < self.apply_next {
            return;
        }
        if !membership.contains(self.id()) {
            return;
        }
        self.apply_next = through + 1;
        if through > self.chosen_through {
            self.chosen_through = through;
            self.building.chosen_through = Some(through);
            self.trim_inflight();
        }
        // Past the log's start: `through` is at least `apply_next`, which is
        // at least `log_start` (see the invariants).
        let new_start = through + 1;
        self.log = self.log.split_off(&new_start);
        self.log_start = new_start;
        self.building.compact_below = Some(new_start);
        if membership != self.membership {
            self.self_bit = membership.index_of(self.id()).map_or(0, |index| 1 << index);
            self.membership = membership.clone();
            self.building.membership = Some(membership);
        }
        self.catch_up_sent = None;
        if let Some(leader) = self.leader_hint.filter(|&l| l != self.id()) {
            if self.announced_chosen_through > self.chosen_through {
                self.request_catch_up(leader);
            }
        }
        self.check_join_complete();
        self.drain_loopback();
        self.check_invariants();
    }

    // ----- Plumbing -----

    fn advance_clock(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    fn random_election_timeout(&mut self) -> u64 {
        random_between(
            &mut self.rng,
            self.config.election_timeout_min_ms,
            self.config.election_timeout_max_ms,
        )
    }

    fn reset_election_deadline(&mut self) {
        self.election_deadline_ms = self.now_ms + self.random_election_timeout();
    }

    fn last_issued_batch(&self) -> u64 {
        self.building.id - 1
    }

    fn send(&mut self, to: NodeId, message: Message, after: After) {
        let dependency = match after {
            After::Now => 0,
            After::AllWrites => {
                if self.building.is_empty() {
                    self.last_issued_batch()
                } else {
                    self.building.id
                }
            }
            After::Batch(id) => id,
        };
        let envelope = Envelope {
            from: self.id(),
            to,
            message,
        };
        if dependency <= self.durable_through {
            self.route(envelope);
        } else {
            self.held.entry(dependency).or_default().push(envelope);
        }
    }

    fn broadcast(&mut self, message: Message, after: After, include_self: bool) {
        for index in 0..self.membership.members().len() {
            let to = self.membership.members()[index];
            if to == self.id() && !include_self {
                continue;
            }
            self.send(to, message.clone(), after);
        }
    }

    fn route(&mut self, envelope: Envelope) {
        if envelope.to == self.id() {
            self.loopback.push_back(envelope.message);
        } else {
            self.outbox.push(envelope);
        }
    }

    fn drain_loopback(&mut self) {
        while let Some(message) = self.loopback.pop_front() {
            self.handle(self.id(), message);
        }
    }

    fn member_bit(&self, node: NodeId) -> u64 {
        self.membership.index_of(node).map_or(0, |index| 1 << index)
    }

    fn handle(&mut self, from: NodeId, message: Message) {
        if let Message::JoinProbe(_) = message {
            self.rejoining_members.insert(from);
        } else if matches!(
            message,
            Message::PreVote(_)
                | Message::Prepare(_)
                | Message::Promise(_)
                | Message::Accept(_)
                | Message::Accepted(_)
                | Message::Heartbeat(_)
                | Message::HeartbeatAck(_)
        ) {
            // Only a voter sends these: it has rejoined.
            self.rejoining_members.remove(&from);
        }
        match message {
            Message::PreVote(m) => self.on_pre_vote(from, m),
            Message::PreVoteReply(m) => self.on_pre_vote_reply(from, m),
            Message::Prepare(m) => self.on_prepare(from, m),
            Message::Promise(m) => self.on_promise(from, m),
            Message::Reject(m) => self.on_reject(from, m),
            Message::Accept(m) => self.on_accept(from, m),
            Message::Accepted(m) => self.on_accepted(from, m),
            Message::Commit(m) => self.on_commit(from, m),
            Message::Heartbeat(m) => self.on_heartbeat(from, m),
            Message::HeartbeatAck(m) => self.on_heartbeat_ack(from, m),
            Message::CatchUp(m) => self.on_catch_up(from, m),
            Message::Chosen(m) => self.on_chosen(from, m),
            Message::SnapshotNeeded(m) => self.on_snapshot_needed(from, m),
            Message::Forward(m) => self.on_forward(from, m),
            Message::ReadIndex(m) => self.on_read_index(from, m),
            Message::ReadIndexReply(m) => self.on_read_index_reply(from, m),
            Message::JoinProbe(_) => self.on_join_probe(from),
            Message::JoinProbeReply(m) => self.on_join_probe_reply(from, m),
        }
    }

    /// Why this acceptor may not promise a ballot owned by `candidate` now,
    /// if it may not: while rejoining, within a lease it granted to another
    /// leader, or within one lease duration of its own start.
    fn promise_refusal(&self, candidate: NodeId) -> Option<RefusalReason> {
        if self.joining.is_some() {
            return Some(RefusalReason::Joining);
        }
        if self.now_ms < self.no_promise_until_ms {
            return Some(RefusalReason::RecentlyStarted {
                until_ms: self.no_promise_until_ms,
            });
        }
        if self.now_ms < self.lease_granted_until_ms {
            if let Some(to) = self.lease_granted_to.filter(|&to| to != candidate) {
                return Some(RefusalReason::LeaseGranted {
                    to,
                    until_ms: self.lease_granted_until_ms,
                });
            }
        }
        None
    }

    fn refuse(&mut self, candidate: NodeId, step: ElectionStep, reason: RefusalReason) {
        self.refusals_out.push(Refusal {
            candidate,
            step,
            reason,
        });
    }

    fn leads_with(&self, ballot: Ballot) -> bool {
        matches!(&self.role, RoleState::Leader(leader) if leader.ballot == ballot)
    }

    fn note_ballot(&mut self, ballot: Ballot) {
        self.highest_round_seen = self.highest_round_seen.max(ballot.round);
    }

    // ----- Election -----

    fn start_pre_vote(&mut self) {
        self.reset_election_deadline();
        if let Some(reason) = self.promise_refusal(self.id()) {
            self.refuse(self.id(), ElectionStep::Candidacy, reason);
            return;
        }
        let round = self.highest_round_seen.max(self.promised.round) + 1;
        self.role = RoleState::PreCandidate(PreCandidate {
            round,
            granted: self.self_bit,
        });
        self.set_leader_hint(None);
        let message = Message::PreVote(PreVote {
            round,
            chosen_through: self.chosen_through,
        });
        self.broadcast(message, After::Now, false);
        self.check_pre_vote_quorum();
    }

    fn on_pre_vote(&mut self, from: NodeId, message: PreVote) {
        let refusal = self.promise_refusal(from).or_else(|| {
            if Ballot::new(message.round, from) <= self.promised {
                Some(RefusalReason::BallotNotHigher {
                    promised: self.promised,
                })
            } else if message.chosen_through < self.chosen_through {
                Some(RefusalReason::CandidateBehind {
                    candidate_chosen_through: message.chosen_through,
                    own_chosen_through: self.chosen_through,
                })
            } else if matches!(self.role, RoleState::Leader(_)) {
                Some(RefusalReason::Leading)
            } else {
                None
            }
        });
        let granted = refusal.is_none();
        if let Some(reason) = refusal {
            let step = ElectionStep::PreVote {
                round: message.round,
            };
            self.refuse(from, step, reason);
        }
        let reply = Message::PreVoteReply(PreVoteReply {
            round: message.round,
            granted,
            promised: self.promised,
        });
        self.send(from, reply, After::Now);
    }

    fn on_pre_vote_reply(&mut self, from: NodeId, message: PreVoteReply) {
        self.note_ballot(message.promised);
        let bit = self.member_bit(from);
        if let RoleState::PreCandidate(pre) = &mut self.role {
            if message.round == pre.round && message.granted {
                pre.granted |= bit;
            }
        }
        self.check_pre_vote_quorum();
    }

    fn check_pre_vote_quorum(&mut self) {
        let RoleState::PreCandidate(pre) = &self.role else {
            return;
        };
        if !self.membership.is_quorum(pre.granted) {
            return;
        }
        let round = pre.round.max(self.highest_round_seen + 1);
        let ballot = Ballot::new(round, self.id());
        self.note_ballot(ballot);
        self.promised = ballot;
        self.building.promised = Some(ballot);
        self.role = RoleState::Candidate(Candidate {
            ballot,
            ballot_batch: self.building.id,
            promises: BTreeMap::new(),
        });
        let prepare = Message::Prepare(Prepare {
            ballot,
            from_slot: self.chosen_through + 1,
        });
        // The ballot must be durable before any prepare leaves, or a restart
        // could reuse it for different values.
        self.broadcast(prepare, After::AllWrites, true);
    }

    fn on_prepare(&mut self, from: NodeId, message: Prepare) {
        self.note_ballot(message.ballot);
        if self.joining.is_some() {
            let step = ElectionStep::Promise {
                ballot: message.ballot,
            };
            self.refuse(from, step, RefusalReason::Joining);
            return;
        }
        let repeat = message.ballot == self.promised && message.ballot.node == from;
        if !repeat {
            let step = ElectionStep::Promise {
                ballot: message.ballot,
            };
            if message.ballot <= self.promised {
                let reason = RefusalReason::BallotNotHigher {
                    promised: self.promised,
                };
                self.refuse(from, step, reason);
                let reject = Message::Reject(Reject {
                    ballot: message.ballot,
                    promised: self.promised,
                });
                self.send(from, reject, After::Now);
                return;
            }
            if let Some(reason) = self.promise_refusal(from) {
                self.refuse(from, step, reason);
                return;
            }
            self.promised = message.ballot;
            self.building.promised = Some(message.ballot);
            if from != self.id() {
                self.step_down(None);
            }
        }
        let promise = self.make_promise(message.ballot, message.from_slot);
        // A promise is an answer: it leaves only once it is durable.
        self.send(from, Message::Promise(promise), After::AllWrites);
    }

    fn make_promise(&self, ballot: Ballot, from_slot: Slot) -> Promise {
        let start = from_slot.max(self.log_start);
        let chosen_limit = start.saturating_add(4 * self.config.max_slots_per_message as u64);
        let entries = self
            .log
            .range(start..)
            .filter(|(&slot, _)| slot > self.chosen_through || slot < chosen_limit)
            .map(|(&slot, entry)| AcceptedEntry {
                slot,
                ballot: entry.ballot,
                value: entry.value.clone(),
            })
            .collect();
        Promise {
            ballot,
            chosen_through: self.chosen_through,
            log_start: self.log_start,
            entries,
        }
    }

    fn on_promise(&mut self, from: NodeId, message: Promise) {
        let RoleState::Candidate(candidate) = &mut self.role else {
            return;
        };
        if message.ballot != candidate.ballot {
            return;
        }
        candidate.promises.insert(
            from,
            ReceivedPromise {
                chosen_through: message.chosen_through,
                entries: message.entries,
            },
        );
        let mut mask = 0;
        for &node in candidate.promises.keys() {
            if let Some(index) = self.membership.index_of(node) {
                mask |= 1 << index;
            }
        }
        if self.membership.is_quorum(mask) {
            self.become_leader();
        }
    }

    fn on_reject(&mut self, _from: NodeId, message: Reject) {
        self.note_ballot(message.promised);
        let own = match &self.role {
            RoleState::Candidate(candidate) => Some(candidate.ballot),
            RoleState::Leader(leader) => Some(leader.ballot),
            _ => None,
        };
        if own == Some(message.ballot) && message.promised > message.ballot {
            self.step_down(None);
        }
    }

    fn become_leader(&mut self) {
        let RoleState::Candidate(candidate) = mem::replace(&mut self.role, RoleState::Follower)
        else {
            return;
        };
        let ballot = candidate.ballot;
        // Learn what the promisers know to be chosen, contiguously from ours.
        let mut chosen_known: BTreeMap<Slot, Value> = BTreeMap::new();
        let mut most_chosen: Option<(NodeId, Slot)> = None;
        for (&node, promise) in &candidate.promises {
            for entry in &promise.entries {
                if entry.slot <= promise.chosen_through && entry.slot > self.chosen_through {
                    chosen_known
                        .entry(entry.slot)
                        .or_insert_with(|| entry.value.clone());
                }
            }
            if most_chosen.is_none_or(|(_, slot)| promise.chosen_through > slot) {
                most_chosen = Some((node, promise.chosen_through));
            }
        }
        let mut learned = Vec::new();
        while let Some(value) = chosen_known.remove(&(self.chosen_through + 1)) {
            let slot = self.chosen_through + 1;
            learned.push(ChosenEntry { slot, value });
            self.chosen_through = slot;
        }
        self.record_learned(learned);
        if let Some((node, slot)) = most_chosen {
            if slot > self.chosen_through {
                // Some promiser knows more chosen slots than it could send
                // (compacted, or too many): catch up before leading.
                let reason = RefusalReason::PromiserKnowsMore {
                    promiser: node,
                    chosen_through: slot,
                    own_chosen_through: self.chosen_through,
                };
                self.refuse(self.id(), ElectionStep::Leadership { ballot }, reason);
                self.step_down(None);
                self.request_catch_up(node);
                return;
            }
        }
        // Adopt, per open slot, the value accepted under the highest ballot.
        let mut adopted: BTreeMap<Slot, (Ballot, Value)> = BTreeMap::new();
        for promise in candidate.promises.values() {
            for entry in &promise.entries {
                if entry.slot <= self.chosen_through {
                    continue;
                }
                match adopted.get(&entry.slot) {
                    Some((ballot, _)) if *ballot >= entry.ballot => {}
                    _ => {
                        adopted.insert(entry.slot, (entry.ballot, entry.value.clone()));
                    }
                }
            }
        }
        let highest_seen = adopted
            .keys()
            .next_back()
            .copied()
            .unwrap_or(self.chosen_through);
        let barrier_slot = highest_seen + 1;
        let members = self.membership.members().len();
        let ballot_batch = candidate.ballot_batch;
        let mut leader = Leader {
            ballot,
            ballot_batch,
            next_slot: self.chosen_through + 1,
            inflight: VecDeque::new(),
            inflight_base: self.chosen_through + 1,
            barrier_slot,
            pending: VecDeque::new(),
            last_stamp_ms: 0,
            unsent_from: None,
            announced_chosen_through: self.chosen_through,
            heartbeat_sequence: 0,
            last_heartbeat_ms: self.now_ms,
            heartbeat_due: true,
            heartbeat_sent_at: VecDeque::new(),
            acked_sequence: vec![0; members],
            last_heard_ms: vec![self.now_ms; members],
            peer_chosen_through: self
                .membership
                .members()
                .iter()
                .map(|member| {
                    candidate
                        .promises
                        .get(member)
                        .map_or(0, |promise| promise.chosen_through)
                })
                .collect(),
            lease_until_ms: 0,
            reads_waiting_barrier: Vec::new(),
            reads_waiting_quorum: VecDeque::new(),
        };
        let mut values = Vec::new();
        for slot in self.chosen_through + 1..barrier_slot {
            let value = adopted
                .remove(&slot)
                .map_or(Value::Noop, |(_, value)| value);
            values.push(value);
        }
        values.push(Value::Noop);
        for value in values {
            assign_slot(&mut leader, value, &mut self.log, self.now_ms, ballot);
        }
        self.role = RoleState::Leader(Box::new(leader));
        self.set_leader_hint(Some(self.id()));
        self.broadcast_new_slots();
        self.leader_heartbeat();
    }

    fn step_down(&mut self, leader: Option<NodeId>) {
        if let RoleState::Leader(state) = mem::replace(&mut self.role, RoleState::Follower) {
            for reader in state.reads_waiting_barrier {
                self.finish_read(reader, None);
            }
            for (_, reader, _, _) in state.reads_waiting_quorum {
                self.finish_read(reader, None);
            }
        }
        self.set_leader_hint(leader);
        self.reset_election_deadline();
    }

    /// Changes the leader this replica believes in. Reads it forwarded to
    /// the one it believed in before will not be answered in time, even
    /// once it leads itself: they are aborted, so the caller retries them
    /// at once (at the new leader, or here).
    fn set_leader_hint(&mut self, leader: Option<NodeId>) {
        if self.leader_hint == leader {
            return;
        }
        self.leader_hint = leader;
        for (_, (id, _)) in mem::take(&mut self.forwarded_reads) {
            self.reads_out.push(ReadOutcome::Aborted { id });
        }
    }

    /// A message under `ballot` from its owner `from` shows a live leader.
    /// Returns false when the ballot is stale and the message must be refused.
    fn follow(&mut self, from: NodeId, ballot: Ballot) -> bool {
        if ballot.node != from {
            return false;
        }
        self.note_ballot(ballot);
        if ballot < self.promised {
            let reject = Message::Reject(Reject {
                ballot,
                promised: self.promised,
            });
            self.send(from, reject, After::Now);
            return false;
        }
        match &self.role {
            RoleState::Leader(leader) if leader.ballot == ballot => return true,
            RoleState::Leader(_) | RoleState::Candidate(_) | RoleState::PreCandidate(_) => {
                self.step_down(Some(from));
            }
            RoleState::Follower => {}
        }
        if self.leader_hint != Some(from) {
            self.set_leader_hint(Some(from));
            self.catch_up_sent = None;
        }
        self.reset_election_deadline();
        true
    }

    // ----- Replication -----

    fn on_accept(&mut self, from: NodeId, message: Accept) {
        if from == self.id() && !self.leads_with(message.ballot) {
            // Our own accept from a leadership we have since left.
            return;
        }
        if !self.follow(from, message.ballot) {
            return;
        }
        if self.joining.is_some() {
            // Not a voter yet: learn what is chosen, accept nothing.
            self.learn_chosen_through(from, message.ballot, message.chosen_through);
            return;
        }
        if message.ballot > self.promised {
            self.promised = message.ballot;
            self.building.promised = Some(message.ballot);
        }
        let count = message.values.len() as u64;
        for (offset, value) in message.values.into_iter().enumerate() {
            let slot = message.first_slot + offset as u64;
            if slot <= self.chosen_through || slot < self.log_start {
                // Already chosen: the leader can only be proposing the chosen
                // value again, so there is nothing to record.
                continue;
            }
            self.building.accepted.push(AcceptedEntry {
                slot,
                ballot: message.ballot,
                value: value.clone(),
            });
            self.log.insert(
                slot,
                Entry {
                    ballot: message.ballot,
                    value,
                    batch: self.building.id,
                },
            );
        }
        let accepted = Message::Accepted(Accepted {
            ballot: message.ballot,
            first_slot: message.first_slot,
            count,
        });
        self.send(from, accepted, After::AllWrites);
        self.learn_chosen_through(from, message.ballot, message.chosen_through);
    }

    /// The follower rule: slot `s` up to `announced` is chosen here only if it
    /// was accepted under the announcing leader's `ballot`; otherwise its
    /// value is fetched.
    fn learn_chosen_through(&mut self, from: NodeId, ballot: Ballot, announced: Slot) {
        if from == self.id() {
            return;
        }
        self.announced_chosen_through = self.announced_chosen_through.max(announced);
        let before = self.chosen_through;
        while self.chosen_through < announced {
            let next = self.chosen_through + 1;
            match self.log.get(&next) {
                Some(entry) if entry.ballot == ballot => self.chosen_through = next,
                _ => break,
            }
        }
        if self.chosen_through > before {
            self.building.chosen_through = Some(self.chosen_through);
            self.complete_reads_waiting_chosen();
            self.check_join_complete();
        }
        if self.chosen_through < announced {
            self.request_catch_up(from);
        }
    }

    fn on_accepted(&mut self, from: NodeId, message: Accepted) {
        let bit = self.member_bit(from);
        let now = self.now_ms;
        let RoleState::Leader(leader) = &mut self.role else {
            return;
        };
        if message.ballot != leader.ballot {
            return;
        }
        if let Some(index) = self.membership.index_of(from) {
            leader.last_heard_ms[index] = now;
        }
        let base = leader.inflight_base;
        let end = message.first_slot.saturating_add(message.count);
        for slot in message.first_slot.max(base)..end.min(leader.next_slot) {
            let Some(inflight) = leader.inflight.get_mut((slot - base) as usize) else {
                break;
            };
            inflight.acks |= bit;
            if !inflight.chosen && self.membership.is_quorum(inflight.acks) {
                inflight.chosen = true;
            }
        }
        self.trim_inflight();
    }

    fn on_leader_chosen_advanced(&mut self) {
        let chosen_through = self.chosen_through;
        let RoleState::Leader(leader) = &mut self.role else {
            return;
        };
        if chosen_through >= leader.barrier_slot && !leader.reads_waiting_barrier.is_empty() {
            let readers = mem::take(&mut leader.reads_waiting_barrier);
            for reader in readers {
                self.leader_read(reader);
            }
        }
    }

    fn on_commit(&mut self, from: NodeId, message: Commit) {
        if self.follow(from, message.ballot) {
            self.learn_chosen_through(from, message.ballot, message.chosen_through);
        }
    }

    fn proposals_flushable(&self) -> bool {
        match &self.role {
            RoleState::Leader(leader) => {
                !leader.pending.is_empty()
                    && (leader.inflight.len() as u64) < self.config.max_inflight_slots
            }
            _ => false,
        }
    }

    /// Packs queued commands into new slots, as many per slot as the bounds
    /// allow, while the in-flight window has room.
    fn flush_proposals(&mut self) {
        let RoleState::Leader(leader) = &mut self.role else {
            return;
        };
        let ballot = leader.ballot;
        while !leader.pending.is_empty()
            && (leader.inflight.len() as u64) < self.config.max_inflight_slots
        {
            let mut batch = Vec::new();
            let mut bytes = 0;
            while let Some(command) = leader.pending.front() {
                let full = batch.len() >= self.config.max_commands_per_slot
                    || (!batch.is_empty() && bytes + command.len() > self.config.max_slot_bytes);
                if full {
                    break;
                }
                bytes += command.len();
                if let Some(command) = leader.pending.pop_front() {
                    batch.push(command);
                }
            }
            leader.last_stamp_ms = leader.last_stamp_ms.max(self.now_ms);
            let value = Value::Commands(Batch {
                stamp_ms: leader.last_stamp_ms,
                commands: Arc::from(batch),
            });
            assign_slot(leader, value, &mut self.log, self.now_ms, ballot);
        }
        self.broadcast_new_slots();
    }

    /// Sends the slots assigned since the last broadcast to every member,
    /// itself included, in messages of consecutive slots.
    fn broadcast_new_slots(&mut self) {
        let RoleState::Leader(leader) = &mut self.role else {
            return;
        };
        let Some(first) = leader.unsent_from.take() else {
            return;
        };
        let end = leader.next_slot;
        let ballot = leader.ballot;
        let after = After::Batch(leader.ballot_batch);
        leader.announced_chosen_through = self.chosen_through;
        self.send_accepts(ballot, first, end, after, None);
    }

    /// Sends accepts for `first..end` (taking values from the log) to every
    /// member, or only to `only_to` when retransmitting.
    fn send_accepts(
        &mut self,
        ballot: Ballot,
        first: Slot,
        end: Slot,
        after: After,
        only_to: Option<NodeId>,
    ) {
        let chunk = self.config.max_slots_per_message as u64;
        let mut start = first;
        while start < end {
            let stop = (start + chunk).min(end);
            let values: Vec<Value> = (start..stop)
                .map(|slot| {
                    self.log
                        .get(&slot)
                        .map_or(Value::Noop, |entry| entry.value.clone())
                })
                .collect();
            let message = Message::Accept(Accept {
                ballot,
                first_slot: start,
                values,
                chosen_through: self.chosen_through,
            });
            match only_to {
                Some(to) => self.send(to, message, after),
                None => self.broadcast(message, after, true),
            }
            start = stop;
        }
    }

    fn announce_commit(&mut self) {
        let chosen_through = self.chosen_through;
        let RoleState::Leader(leader) = &mut self.role else {
            return;
        };
        if chosen_through <= leader.announced_chosen_through {
            return;
        }
        leader.announced_chosen_through = chosen_through;
        let message = Message::Commit(Commit {
            ballot: leader.ballot,
            chosen_through,
        });
        self.broadcast(message, After::Now, false);
    }

    fn chosen_releasable(&self) -> bool {
        self.apply_next <= self.chosen_through
            && self
                .log
                .get(&self.apply_next)
                .is_some_and(|entry| entry.batch <= self.durable_through)
    }

    /// Hands out chosen entries in slot order, each only once its value is
    /// durable here, so that a restart never finds an applied slot missing.
    fn release_chosen(&mut self) -> Vec<ChosenEntry> {
        let mut chosen = Vec::new();
        while self.apply_next <= self.chosen_through {
            let Some(entry) = self.log.get(&self.apply_next) else {
                break;
            };
            if entry.batch > self.durable_through {
                break;
            }
            if let Value::Membership(_) = entry.value {
                if let Some(membership) = Membership::from_value(&entry.value) {
                    if membership.contains(self.id()) {
                        self.self_bit =
                            membership.index_of(self.id()).map_or(0, |index| 1 << index);
                        self.membership = membership;
                    }
                }
            }
            chosen.push(ChosenEntry {
                slot: self.apply_next,
                value: entry.value.clone(),
            });
            self.apply_next += 1;
        }
        chosen
    }

    // ----- Heartbeats, leases and reads -----

    fn leader_tick(&mut self) {
        let now = self.now_ms;
        let lease_ms = self.config.lease_ms;
        let heartbeat_interval = self.config.heartbeat_interval_ms;
        let retransmit = self.config.retransmit_interval_ms;
        let RoleState::Leader(leader) = &mut self.role else {
            return;
        };
        // Step down when a majority has not been heard from for a lease: a
        // partitioned leader stops believing in itself. Every member counts
        // as heard at the election, so a new leader has a lease's grace.
        let mut heard = 0;
        for (index, &last) in leader.last_heard_ms.iter().enumerate() {
            if (1 << index) == self.self_bit || last + lease_ms > now {
                heard |= 1 << index;
            }
        }
        if !self.membership.is_quorum(heard) {
            self.step_down(None);
            return;
        }
        if leader.heartbeat_due || now >= leader.last_heartbeat_ms + heartbeat_interval {
            self.leader_heartbeat();
        }
        // Retransmit accepts a majority has not acknowledged in time.
        let RoleState::Leader(leader) = &mut self.role else {
            return;
        };
        let base = leader.inflight_base;
        let ballot = leader.ballot;
        let after = After::Batch(leader.ballot_batch);
        let mut resend: Vec<(NodeId, Slot, Slot)> = Vec::new();
        for (index, &member) in self.membership.members().iter().enumerate() {
            let bit = 1u64 << index;
            let mut run: Option<(Slot, Slot)> = None;
            for (offset, inflight) in leader.inflight.iter_mut().enumerate() {
                let slot = base + offset as u64;
                let missing = !inflight.chosen
                    && inflight.acks & bit == 0
                    && inflight.sent_at_ms + retransmit <= now;
                match (&mut run, missing) {
                    (Some((_, end)), true) if *end == slot => *end = slot + 1,
                    (_, true) => {
                        if let Some((start, end)) = run.take() {
                            resend.push((member, start, end));
                        }
                        run = Some((slot, slot + 1));
                    }
                    (_, false) => {}
                }
            }
            if let Some((start, end)) = run {
                resend.push((member, start, end));
            }
        }
        for inflight in leader.inflight.iter_mut() {
            if !inflight.chosen && inflight.sent_at_ms + retransmit <= now {
                inflight.sent_at_ms = now;
            }
        }
        for (member, start, end) in resend {
            self.send_accepts(ballot, start, end, after, Some(member));
        }
    }

    fn leader_heartbeat(&mut self) {
        let now = self.now_ms;
        let lease_ms = self.config.lease_ms;
        let chosen_through = self.chosen_through;
        let self_index = self.self_bit.trailing_zeros() as usize;
        let RoleState::Leader(leader) = &mut self.role else {
            return;
        };
        leader.heartbeat_sequence += 1;
        leader.last_heartbeat_ms = now;
        leader.heartbeat_due = false;
        let sequence = leader.heartbeat_sequence;
        leader.heartbeat_sent_at.push_back((sequence, now));
        if leader.heartbeat_sent_at.len() > HEARTBEAT_HISTORY {
            leader.heartbeat_sent_at.pop_front();
        }
        leader.acked_sequence[self_index] = sequence;
        leader.last_heard_ms[self_index] = now;
        leader.peer_chosen_through[self_index] = chosen_through;
        leader.announced_chosen_through = leader.announced_chosen_through.max(chosen_through);
        let message = Message::Heartbeat(Heartbeat {
            ballot: leader.ballot,
            chosen_through,
            sequence,
        });
        // The leader will promise nobody else while it leads.
        self.lease_granted_until_ms = now + lease_ms;
        self.lease_granted_to = Some(self.id());
        self.broadcast(message, After::Now, false);
        self.update_quorum_sequence();
    }

    fn on_heartbeat(&mut self, from: NodeId, message: Heartbeat) {
        if !self.follow(from, message.ballot) {
            return;
        }
        if self.joining.is_some() {
            self.learn_chosen_through(from, message.ballot, message.chosen_through);
            return;
        }
        // Acknowledging grants a lease: promise no other ballot until one
        // lease duration after this receipt.
        self.lease_granted_until_ms = self.now_ms + self.config.lease_ms;
        self.lease_granted_to = Some(from);
        self.learn_chosen_through(from, message.ballot, message.chosen_through);
        let ack = Message::HeartbeatAck(HeartbeatAck {
            ballot: message.ballot,
            sequence: message.sequence,
            chosen_through: self.chosen_through,
        });
        self.send(from, ack, After::Now);
    }

    fn on_heartbeat_ack(&mut self, from: NodeId, message: HeartbeatAck) {
        let now = self.now_ms;
        let Some(index) = self.membership.index_of(from) else {
            return;
        };
        let RoleState::Leader(leader) = &mut self.role else {
            return;
        };
        if message.ballot != leader.ballot || message.sequence > leader.heartbeat_sequence {
            return;
        }
        leader.last_heard_ms[index] = now;
        leader.peer_chosen_through[index] = message.chosen_through;
        // Acknowledgements may arrive out of order; a stale one changes
        // nothing below (the recount is idempotent).
        leader.acked_sequence[index] = leader.acked_sequence[index].max(message.sequence);
        self.update_quorum_sequence();
    }

    /// Recomputes the highest heartbeat a majority acknowledged, extends the
    /// lease from its send time, and completes reads waiting on it.
    fn update_quorum_sequence(&mut self) {
        let lease = self.config.lease_ms - self.config.clock_drift_margin_ms;
        let quorum = self.membership.quorum();
        let RoleState::Leader(leader) = &mut self.role else {
            return;
        };
        let mut acked = leader.acked_sequence.clone();
        acked.sort_unstable_by(|a, b| b.cmp(a));
        let quorum_sequence = acked[quorum - 1];
        if quorum_sequence == 0 {
            return;
        }
        if let Some(&(_, sent_at)) = leader
            .heartbeat_sent_at
            .iter()
            .find(|(sequence, _)| *sequence == quorum_sequence)
        {
            leader.lease_until_ms = leader.lease_until_ms.max(sent_at + lease);
        }
        let mut done = Vec::new();
        while leader
            .reads_waiting_quorum
            .front()
            .is_some_and(|(needed, ..)| *needed <= quorum_sequence)
        {
            if let Some((_, reader, index, _)) = leader.reads_waiting_quorum.pop_front() {
                done.push((reader, index));
            }
        }
        for (reader, index) in done {
            self.finish_read(reader, Some(index));
        }
    }

    fn leader_read(&mut self, reader: Reader) {
        let now = self.now_ms;
        let chosen_through = self.chosen_through;
        let deadline = now + self.config.read_timeout_ms;
        let RoleState::Leader(leader) = &mut self.role else {
            self.finish_read(reader, None);
            return;
        };
        if chosen_through < leader.barrier_slot {
            leader.reads_waiting_barrier.push(reader);
            return;
        }
        if now < leader.lease_until_ms {
            self.finish_read(reader, Some(chosen_through));
            return;
        }
        let needed = leader.heartbeat_sequence + 1;
        leader.heartbeat_due = true;
        leader
            .reads_waiting_quorum
            .push_back((needed, reader, chosen_through, deadline));
    }

    fn finish_read(&mut self, reader: Reader, read_index: Option<Slot>) {
        match reader {
            Reader::Local(id) => self.reads_out.push(match read_index {
                Some(read_index) => ReadOutcome::Ready { id, read_index },
                None => ReadOutcome::Aborted { id },
            }),
            Reader::Remote { node, request } => {
                let reply = Message::ReadIndexReply(ReadIndexReply {
                    request,
                    read_index,
                });
                self.send(node, reply, After::Now);
            }
        }
    }

    fn on_read_index(&mut self, from: NodeId, message: ReadIndex) {
        let reader = Reader::Remote {
            node: from,
            request: message.request,
        };
        if matches!(self.role, RoleState::Leader(_)) {
            self.leader_read(reader);
        } else {
            self.finish_read(reader, None);
        }
    }

    fn on_read_index_reply(&mut self, _from: NodeId, message: ReadIndexReply) {
        let Some((id, deadline)) = self.forwarded_reads.remove(&message.request) else {
            return;
        };
        match message.read_index {
            Some(read_index) if read_index <= self.chosen_through => {
                self.reads_out.push(ReadOutcome::Ready { id, read_index });
            }
            Some(read_index) => {
                self.reads_waiting_chosen.push((id, read_index, deadline));
                if let Some(leader) = self.leader_hint {
                    self.announced_chosen_through = self.announced_chosen_through.max(read_index);
                    self.request_catch_up(leader);
                }
            }
            None => self.reads_out.push(ReadOutcome::Aborted { id }),
        }
    }

    fn complete_reads_waiting_chosen(&mut self) {
        if self.reads_waiting_chosen.is_empty() {
            return;
        }
        let chosen_through = self.chosen_through;
        let (ready, waiting): (Vec<_>, Vec<_>) = mem::take(&mut self.reads_waiting_chosen)
            .into_iter()
            .partition(|(_, index, _)| *index <= chosen_through);
        self.reads_waiting_chosen = waiting;
        for (id, read_index, _) in ready {
            self.reads_out.push(ReadOutcome::Ready { id, read_index });
        }
    }

    fn expire_reads(&mut self) {
        let now = self.now_ms;
        let expired: Vec<u64> = self
            .forwarded_reads
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(&request, _)| request)
            .collect();
        for request in expired {
            if let Some((id, _)) = self.forwarded_reads.remove(&request) {
                self.reads_out.push(ReadOutcome::Aborted { id });
            }
        }
        let (expired, waiting): (Vec<_>, Vec<_>) = mem::take(&mut self.reads_waiting_chosen)
            .into_iter()
            .partition(|(_, _, deadline)| *deadline <= now);
        self.reads_waiting_chosen = waiting;
        for (id, _, _) in expired {
            self.reads_out.push(ReadOutcome::Aborted { id });
        }
        let mut timed_out = Vec::new();
        if let RoleState::Leader(leader) = &mut self.role {
            leader
                .reads_waiting_quorum
                .retain(|&(_, reader, _, deadline)| {
                    if deadline <= now {
                        timed_out.push(reader);
                        false
                    } else {
                        true
                    }
                });
        }
        for reader in timed_out {
            self.finish_read(reader, None);
        }
    }

    // ----- Catch-up -----

    fn request_catch_up(&mut self, from: NodeId) {
        let from_slot = self.chosen_through + 1;
        if let Some((peer, slot, sent_at)) = self.catch_up_sent {
            if peer == from
                && slot == from_slot
                && self.now_ms < sent_at + self.config.catch_up_retry_ms
            {
                return;
            }
        }
        self.catch_up_sent = Some((from, from_slot, self.now_ms));
        self.send(from, Message::CatchUp(CatchUp { from_slot }), After::Now);
    }

    fn retry_catch_up(&mut self) {
        if self.announced_chosen_through <= self.chosen_through {
            return;
        }
        if let Some(leader) = self.leader_hint {
            self.request_catch_up(leader);
        }
    }

    fn on_catch_up(&mut self, from: NodeId, message: CatchUp) {
        if message.from_slot < self.log_start {
            let reply = Message::SnapshotNeeded(SnapshotNeeded {
                log_start: self.log_start,
                chosen_through: self.chosen_through,
            });
            self.send(from, reply, After::Now);
            return;
        }
        let end = self
            .chosen_through
            .min(message.from_slot + self.config.max_slots_per_message as u64 - 1);
        let mut values = Vec::new();
        let mut slot = message.from_slot;
        while slot <= end {
            match self.log.get(&slot) {
                Some(entry) => values.push(entry.value.clone()),
                None => break,
            }
            slot += 1;
        }
        let reply = Message::Chosen(Chosen {
            first_slot: message.from_slot,
            values,
            chosen_through: self.chosen_through,
        });
        self.send(from, reply, After::Now);
    }

    fn on_chosen(&mut self, from: NodeId, message: Chosen) {
        self.announced_chosen_through = self.announced_chosen_through.max(message.chosen_through);
        let mut learned = Vec::new();
        for (offset, value) in message.values.into_iter().enumerate() {
            let slot = message.first_slot + offset as u64;
            if slot != self.chosen_through + 1 {
                if slot <= self.chosen_through {
                    continue;
                }
                break;
            }
            learned.push(ChosenEntry { slot, value });
            self.chosen_through = slot;
        }
        let progressed = !learned.is_empty();
        self.record_learned(learned);
        if progressed {
            self.complete_reads_waiting_chosen();
            self.catch_up_sent = None;
            self.check_join_complete();
        }
        if self.chosen_through < self.announced_chosen_through && progressed {
            self.request_catch_up(from);
        }
    }

    /// Records values learned as chosen (from a promise or a catch-up) in the
    /// log and the next persist batch. `chosen_through` already covers them.
    fn record_learned(&mut self, learned: Vec<ChosenEntry>) {
        if learned.is_empty() {
            return;
        }
        for entry in &learned {
            self.log.insert(
                entry.slot,
                Entry {
                    ballot: Ballot::ZERO,
                    value: entry.value.clone(),
                    batch: self.building.id,
                },
            );
        }
        self.building.learned.extend(learned);
        self.building.chosen_through = Some(self.chosen_through);
        self.trim_inflight();
    }

    /// Drops the front of the leader's in-flight window while it is chosen,
    /// by a majority's acknowledgements or by another path (a late catch-up
    /// reply, a snapshot), advancing the chosen prefix over the slots the
    /// acknowledgements chose, and keeps the window aligned with the prefix.
    /// A slot a majority acknowledged behind one learned another way is
    /// taken at once, not at the next acknowledgement (which an idle
    /// cluster may never send).
    fn trim_inflight(&mut self) {
        let before = self.chosen_through;
        let RoleState::Leader(leader) = &mut self.role else {
            return;
        };
        while let Some(front) = leader.inflight.front() {
            if !front.chosen && leader.inflight_base > self.chosen_through {
                break;
            }
            leader.inflight.pop_front();
            self.chosen_through = self.chosen_through.max(leader.inflight_base);
            leader.inflight_base += 1;
        }
        leader.inflight_base = leader.inflight_base.max(self.chosen_through + 1);
        leader.next_slot = leader.next_slot.max(leader.inflight_base);
        if self.chosen_through > before {
            self.building.chosen_through = Some(self.chosen_through);
        }
        self.on_leader_chosen_advanced();
    }

    fn on_snapshot_needed(&mut self, from: NodeId, message: SnapshotNeeded) {
        self.announced_chosen_through = self.announced_chosen_through.max(message.chosen_through);
        if message.log_start > self.chosen_through + 1 {
            self.snapshot_out = Some(SnapshotRequest {
                from,
                covering_through: message.log_start - 1,
            });
        }
    }

    // ----- Rejoining after a lost disk -----

    /// Asks every member that has not answered yet, and nudges the log
    /// forward when the slots to learn are not chosen yet.
    fn joining_tick(&mut self) {
        // No election deadline runs while rejoining: the join's completion
        // starts one.
        let now = self.now_ms;
        let retry = self.config.catch_up_retry_ms;
        let nudge_every = self.config.election_timeout_min_ms;
        let leader = self.leader_hint;
        let Some(joining) = self.joining.as_mut() else {
            return;
        };
        let mut probe = Vec::new();
        if joining.target.is_none() && joining.last_probe_ms.is_none_or(|last| now >= last + retry)
        {
            joining.last_probe_ms = Some(now);
            probe = self
                .membership
                .members()
                .iter()
                .copied()
                .filter(|&member| {
                    member != self.config.id && !joining.replies.contains_key(&member)
                })
                .collect();
        }
        let mut nudge = None;
        if let (Some(_), Some(leader)) = (joining.target, leader) {
            // The prefix is short of the target (or the join would be
            // complete): see the invariants.
            if now >= joining.last_nudge_ms + nudge_every {
                // Slots some member accepted but nobody chose yet: an empty
                // command makes the leader fill the log past them.
                joining.last_nudge_ms = now;
                nudge = Some(leader);
            }
        }
        for member in probe {
            self.send(member, Message::JoinProbe(JoinProbe {}), After::Now);
        }
        if let Some(leader) = nudge {
            let commands: Arc<[Command]> = Arc::from(vec![Command::new()]);
            self.send(leader, Message::Forward(Forward { commands }), After::Now);
        }
    }

    fn on_join_probe(&mut self, from: NodeId) {
        if self.joining.is_some() {
            // A replica that lost its own disk knows nothing worth telling.
            return;
        }
        let highest_accepted_slot = self
            .log
            .keys()
            .next_back()
            .copied()
            .unwrap_or(self.chosen_through)
            .max(self.chosen_through);
        let reply = Message::JoinProbeReply(JoinProbeReply {
            promised: self.promised,
            highest_accepted_slot,
            chosen_through: self.chosen_through,
        });
        self.send(from, reply, After::Now);
    }

    fn on_join_probe_reply(&mut self, from: NodeId, message: JoinProbeReply) {
        let others = self.membership.members().len().saturating_sub(1);
        let Some(joining) = self.joining.as_mut() else {
            return;
        };
        if joining.target.is_some() {
            return;
        }
        joining.replies.insert(from, message);
        if joining.replies.len() < others {
            return;
        }
        // Every other member answered. Any candidate that may hold a promise
        // this replica forgot made its own ballot durable before asking, so
        // the highest promise reported covers it; any value chosen with an
        // acceptance this replica forgot was accepted by another member too,
        // so it lies at or below the highest slot reported.
        let ballot = joining
            .replies
            .values()
            .map(|reply| reply.promised)
            .max()
            .unwrap_or(Ballot::ZERO);
        let slot = joining
            .replies
            .values()
            .map(|reply| reply.highest_accepted_slot.max(reply.chosen_through))
            .max()
            .unwrap_or(0);
        let known_chosen = joining
            .replies
            .values()
            .map(|reply| reply.chosen_through)
            .max()
            .unwrap_or(0);
        joining.target = Some((ballot, slot));
        self.note_ballot(ballot);
        if ballot > self.promised {
            self.promised = ballot;
            self.building.promised = Some(ballot);
        }
        self.announced_chosen_through = self.announced_chosen_through.max(known_chosen);
        self.check_join_complete();
    }

    /// Becomes a voter once the promise is raised and the chosen prefix
    /// covers every slot another member had accepted.
    fn check_join_complete(&mut self) {
        let Some(joining) = &self.joining else {
            return;
        };
        let Some((_, slot)) = joining.target else {
            return;
        };
        if self.chosen_through < slot {
            return;
        }
        self.joining = None;
        self.building.joining = Some(false);
        self.reset_election_deadline();
    }

    fn on_forward(&mut self, _from: NodeId, message: Forward) {
        if matches!(self.role, RoleState::Leader(_)) {
            // A full queue drops the commands; the proposer retries.
            let _ = self.propose(self.now_ms, message.commands.to_vec());
        }
    }
}

/// Assigns the next slot to `value` under the leader's ballot: the value
/// enters the log when the leader's own acceptor takes the accept.
fn assign_slot(
    leader: &mut Leader,
    value: Value,
    log: &mut BTreeMap<Slot, Entry>,
    now_ms: u64,
    ballot: Ballot,
) {
    let slot = leader.next_slot;
    leader.next_slot += 1;
    // Stage the value so that `send_accepts` can read it; the acceptor path
    // overwrites this with the durable batch number when it takes the accept.
    log.insert(
        slot,
        Entry {
            ballot,
            value,
            batch: u64::MAX,
        },
    );
    leader.inflight.push_back(Inflight {
        acks: 0,
        chosen: false,
        sent_at_ms: now_ms,
    });
    if leader.unsent_from.is_none() {
        leader.unsent_from = Some(slot);
    }
}

fn random_between(rng: &mut ChaCha8Rng, low: u64, high: u64) -> u64 {
    if high <= low {
        return low;
    }
    low + rng.next_u64() % (high - low)
}

#[cfg(test)]
mod tests {
    //! The acceptor's rules, the follower's chosen-prefix rule and lease
    //! arithmetic, checked on one node fed hand-made messages.

    use super::*;

    const LEASE_MS: u64 = 1000;
    const MARGIN_MS: u64 = 100;

    fn node(id: NodeId, now_ms: u64) -> Node {
        let membership = Membership::new(&[1, 2, 3]).expect("membership");
        let mut config = Config::new(id, 1);
        config.lease_ms = LEASE_MS;
        config.clock_drift_margin_ms = MARGIN_MS;
        Node::new(config, DurableState::bootstrap(membership), 0, now_ms).expect("node")
    }

    fn deliver(node: &mut Node, now_ms: u64, from: NodeId, message: Message) {
        let to = node.id();
        node.step(now_ms, Envelope { from, to, message });
    }

    /// Node 2 following leader 1 (ballot 1.1), from a heartbeat at `now`.
    fn follower_of_leader_1(now: u64) -> Node {
        let mut follower = node(2, 0);
        follower.ready();
        let heartbeat = Heartbeat {
            ballot: Ballot::new(1, 1),
            chosen_through: 0,
            sequence: 1,
        };
        deliver(&mut follower, now, 1, Message::Heartbeat(heartbeat));
        follower.ready();
        follower
    }

    /// Node 3 of 1-3 started after losing its disk.
    fn rejoining_node() -> Node {
        let membership = Membership::new(&[1, 2, 3]).expect("membership");
        let state = DurableState::rejoin(membership);
        Node::new(Config::new(3, 1), state, 0, 0).expect("node")
    }

    fn messages(ready: &Ready) -> Vec<Message> {
        ready.messages.iter().map(|e| e.message.clone()).collect()
    }

    fn commands(names: &[&str]) -> Value {
        Value::Commands(Batch {
            stamp_ms: 0,
            commands: names
                .iter()
                .map(|n| Command::copy_from_slice(n.as_bytes()))
                .collect::<Vec<_>>()
                .into(),
        })
    }

    #[test]
    fn promise_leaves_only_after_it_is_durable() {
        let mut acceptor = node(2, 0);
        let ballot = Ballot::new(1, 1);
        deliver(
            &mut acceptor,
            5000,
            1,
            Message::Prepare(Prepare {
                ballot,
                from_slot: 1,
            }),
        );
        let ready = acceptor.ready();
        let batch = ready.persist.clone().expect("the promise is written");
        assert_eq!(batch.promised, Some(ballot));
        assert!(
            messages(&ready).is_empty(),
            "no promise before the write is durable"
        );
        acceptor.persisted(5000, batch.id);
        let ready = acceptor.ready();
        assert!(matches!(
            messages(&ready).as_slice(),
            [Message::Promise(Promise { ballot: b, .. })] if *b == ballot
        ));
    }

    #[test]
    fn lower_or_equal_ballots_from_others_are_rejected() {
        let mut acceptor = node(2, 0);
        let high = Ballot::new(5, 3);
        deliver(
            &mut acceptor,
            5000,
            3,
            Message::Prepare(Prepare {
                ballot: high,
                from_slot: 1,
            }),
        );
        let id = acceptor.ready().persist.expect("write").id;
        acceptor.persisted(5000, id);
        acceptor.ready();
        for ballot in [Ballot::new(5, 1), Ballot::new(4, 3)] {
            deliver(
                &mut acceptor,
                5000,
                ballot.node,
                Message::Prepare(Prepare {
                    ballot,
                    from_slot: 1,
                }),
            );
            let ready = acceptor.ready();
            assert!(ready.persist.is_none());
            assert_eq!(
                messages(&ready),
                vec![Message::Reject(Reject {
                    ballot,
                    promised: high
                })]
            );
        }
        let stale = Ballot::new(4, 1);
        let accept = Accept {
            ballot: stale,
            first_slot: 1,
            values: vec![Value::Noop],
            chosen_through: 0,
        };
        deliver(&mut acceptor, 5000, 1, Message::Accept(accept));
        let ready = acceptor.ready();
        assert!(ready.persist.is_none(), "a stale accept changes nothing");
        assert_eq!(
            messages(&ready),
            vec![Message::Reject(Reject {
                ballot: stale,
                promised: high
            })]
        );
    }

    #[test]
    fn promise_reports_accepted_values_from_the_requested_slot() {
        let mut acceptor = node(2, 0);
        let first = Ballot::new(1, 1);
        let accept = Accept {
            ballot: first,
            first_slot: 1,
            values: vec![commands(&["a"]), commands(&["b"])],
            chosen_through: 0,
        };
        deliver(&mut acceptor, 5000, 1, Message::Accept(accept));
        let ready = acceptor.ready();
        let batch = ready.persist.clone().expect("acceptances written");
        assert_eq!(batch.accepted.len(), 2);
        assert!(messages(&ready)
            .iter()
            .all(|m| !matches!(m, Message::Accepted(_))));
        acceptor.persisted(5000, batch.id);
        assert_eq!(
            messages(&acceptor.ready()),
            vec![Message::Accepted(Accepted {
                ballot: first,
                first_slot: 1,
                count: 2
            })]
        );
        // A later candidate asking from slot 2 learns the value of slot 2.
        let second = Ballot::new(2, 3);
        deliver(
            &mut acceptor,
            9000,
            3,
            Message::Prepare(Prepare {
                ballot: second,
                from_slot: 2,
            }),
        );
        let id = acceptor.ready().persist.expect("promise written").id;
        acceptor.persisted(9000, id);
        let ready = acceptor.ready();
        let promise = match messages(&ready).as_slice() {
            [Message::Promise(promise)] => promise.clone(),
            other => panic!("expected one promise, got {other:?}"),
        };
        assert_eq!(
            promise.entries,
            vec![AcceptedEntry {
                slot: 2,
                ballot: first,
                value: commands(&["b"])
            }]
        );
    }

    #[test]
    fn chosen_announcement_needs_acceptance_under_the_announcing_ballot() {
        let mut follower = node(2, 0);
        follower.ready();
        let old = Ballot::new(1, 1);
        let accept = Accept {
            ballot: old,
            first_slot: 1,
            values: vec![commands(&["stale"])],
            chosen_through: 0,
        };
        deliver(&mut follower, 5000, 1, Message::Accept(accept));
        let id = follower.ready().persist.expect("write").id;
        follower.persisted(5000, id);
        follower.ready();
        // A new leader announces slot 1 chosen: the follower accepted slot 1
        // only under an older ballot, so it must fetch the value.
        let new = Ballot::new(2, 3);
        deliver(
            &mut follower,
            6000,
            3,
            Message::Commit(Commit {
                ballot: new,
                chosen_through: 1,
            }),
        );
        let ready = follower.ready();
        assert_eq!(follower.chosen_through(), 0);
        assert!(ready.chosen.is_empty());
        assert_eq!(
            messages(&ready),
            vec![Message::CatchUp(CatchUp { from_slot: 1 })]
        );
        // Once it accepts slot 1 under the new ballot, the announcement counts.
        let accept = Accept {
            ballot: new,
            first_slot: 1,
            values: vec![commands(&["fresh"])],
            chosen_through: 1,
        };
        deliver(&mut follower, 6001, 3, Message::Accept(accept));
        assert_eq!(follower.chosen_through(), 1);
        let ready = follower.ready();
        assert!(
            ready.chosen.is_empty(),
            "not applied before the value is durable"
        );
        follower.persisted(6001, ready.persist.expect("write").id);
        let ready = follower.ready();
        assert_eq!(
            ready.chosen,
            vec![ChosenEntry {
                slot: 1,
                value: commands(&["fresh"])
            }]
        );
    }

    /// Makes node 1 leader at `now` with promises from 2 and 3.
    fn elected_leader(now: u64) -> Node {
        elected_leader_with_id(1, now)
    }

    /// Makes node `id` leader at `now` with the promise of one other member.
    fn elected_leader_with_id(id: NodeId, now: u64) -> Node {
        let mut leader = node(id, 0);
        leader.ready();
        leader.tick(now);
        leader.ready();
        let voters: Vec<NodeId> = [1, 2, 3].into_iter().filter(|&v| v != id).collect();
        for &voter in &voters {
            let reply = PreVoteReply {
                round: 1,
                granted: true,
                promised: Ballot::ZERO,
            };
            deliver(&mut leader, now, voter, Message::PreVoteReply(reply));
        }
        let id = leader.ready().persist.expect("own promise").id;
        leader.persisted(now, id);
        leader.ready();
        let ballot = leader.promised();
        let promise = Promise {
            ballot,
            chosen_through: 0,
            log_start: 0,
            entries: vec![],
        };
        deliver(&mut leader, now, voters[0], Message::Promise(promise));
        assert_eq!(leader.role(), Role::Leader);
        leader
    }

    /// The values of the accepts a leader's ready sends to member `to`, as
    /// (first slot, values).
    fn accepts_to(ready: &Ready, to: NodeId) -> Vec<(Slot, Vec<Value>)> {
        ready
            .messages
            .iter()
            .filter(|e| e.to == to)
            .filter_map(|e| match &e.message {
                Message::Accept(accept) => Some((accept.first_slot, accept.values.clone())),
                _ => None,
            })
            .collect()
    }

    /// The sequence of the heartbeat in `ready`, if it holds one.
    fn heartbeat_sequence(ready: &Ready) -> Option<u64> {
        messages(ready).iter().find_map(|m| match m {
            Message::Heartbeat(h) => Some(h.sequence),
            _ => None,
        })
    }

    #[test]
    fn lease_runs_from_the_heartbeat_send_time_less_the_drift_margin() {
        let elected_at = 3000;
        let mut leader = elected_leader(elected_at);
        let ballot = leader.promised();
        let sequence = heartbeat_sequence(&leader.ready()).expect("a heartbeat on election");
        assert!(
            !leader.has_lease(elected_at),
            "no lease before a majority acknowledges"
        );
        // The acknowledgement arrives later; the lease still counts from the send.
        let ack = HeartbeatAck {
            ballot,
            sequence,
            chosen_through: 0,
        };
        deliver(&mut leader, elected_at + 40, 2, Message::HeartbeatAck(ack));
        assert_eq!(leader.lease_until_ms(), elected_at + LEASE_MS - MARGIN_MS);
        assert!(leader.has_lease(elected_at + LEASE_MS - MARGIN_MS - 1));
        assert!(!leader.has_lease(elected_at + LEASE_MS - MARGIN_MS));
    }

    #[test]
    fn acceptor_promises_nobody_else_within_a_lease_of_a_heartbeat() {
        let mut acceptor = node(2, 0);
        acceptor.ready();
        let leader = Ballot::new(1, 1);
        let heartbeat = Heartbeat {
            ballot: leader,
            chosen_through: 0,
            sequence: 1,
        };
        deliver(&mut acceptor, 5000, 1, Message::Heartbeat(heartbeat));
        acceptor.ready();
        let rival = Ballot::new(2, 3);
        let prepare = Prepare {
            ballot: rival,
            from_slot: 1,
        };
        deliver(
            &mut acceptor,
            5000 + LEASE_MS - 1,
            3,
            Message::Prepare(prepare.clone()),
        );
        let ready = acceptor.ready();
        assert!(
            ready.persist.is_none() && ready.messages.is_empty(),
            "refused within the lease"
        );
        let vote = PreVote {
            round: 2,
            chosen_through: 0,
        };
        deliver(
            &mut acceptor,
            5000 + LEASE_MS - 1,
            3,
            Message::PreVote(vote.clone()),
        );
        assert!(matches!(
            messages(&acceptor.ready()).as_slice(),
            [Message::PreVoteReply(PreVoteReply { granted: false, .. })]
        ));
        deliver(&mut acceptor, 5000 + LEASE_MS, 3, Message::Prepare(prepare));
        let ready = acceptor.ready();
        assert_eq!(
            ready.persist.expect("promise written").promised,
            Some(rival)
        );
    }

    #[test]
    fn a_restarted_acceptor_promises_nothing_for_one_lease() {
        let started_at = 10_000;
        let mut acceptor = node(2, started_at);
        acceptor.ready();
        let prepare = Prepare {
            ballot: Ballot::new(3, 1),
            from_slot: 1,
        };
        deliver(
            &mut acceptor,
            started_at + LEASE_MS - 1,
            1,
            Message::Prepare(prepare.clone()),
        );
        let ready = acceptor.ready();
        assert!(ready.persist.is_none() && ready.messages.is_empty());
        deliver(
            &mut acceptor,
            started_at + LEASE_MS,
            1,
            Message::Prepare(prepare),
        );
        assert!(acceptor.ready().persist.is_some());
    }

    #[test]
    fn leader_counts_its_own_acceptance_only_once_durable() {
        let mut leader = elected_leader(3000);
        let ballot = leader.promised();
        let ready = leader.ready();
        let batch = ready.persist.expect("own acceptance of the no-op");
        // Both followers acknowledge; without its own durable acceptance the
        // leader still has a majority, so use one follower only.
        let accepted = Accepted {
            ballot,
            first_slot: 1,
            count: 1,
        };
        deliver(&mut leader, 3001, 2, Message::Accepted(accepted));
        assert_eq!(
            leader.chosen_through(),
            0,
            "one follower and a non-durable self is no majority"
        );
        leader.persisted(3002, batch.id);
        assert_eq!(leader.chosen_through(), 1);
    }

    #[test]
    fn messages_misaddressed_from_itself_or_from_strangers_are_ignored() {
        let mut follower = node(2, 0);
        follower.ready();
        let heartbeat = Message::Heartbeat(Heartbeat {
            ballot: Ballot::new(1, 1),
            chosen_through: 0,
            sequence: 1,
        });
        for (from, to) in [(1, 3), (2, 2), (9, 2)] {
            // Under the sender's own ballot, which a member would follow.
            let message = Message::Heartbeat(Heartbeat {
                ballot: Ballot::new(1, from),
                chosen_through: 0,
                sequence: 1,
            });
            follower.step(5000, Envelope { from, to, message });
            assert!(!follower.has_ready(), "{from}->{to} was not ignored");
            assert_eq!(follower.leader(), None);
        }
        deliver(&mut follower, 5000, 1, heartbeat);
        assert_eq!(follower.leader(), Some(1));
        assert!(follower.has_ready(), "the acknowledgement is due");
    }

    #[test]
    fn a_proposal_that_would_overflow_the_leaders_queue_is_handed_back() {
        let mut leader = elected_leader(3000);
        leader.config.max_pending_commands = 4;
        let five: Vec<Command> = (0..5u8).map(|i| Command::from(vec![i])).collect();
        assert_eq!(
            leader.propose(3000, five.clone()),
            Err(ProposeError::Overloaded(five.clone()))
        );
        assert_eq!(leader.propose(3000, five[..4].to_vec()), Ok(()));
        assert_eq!(leader.status().pending_commands, 4);
        assert_eq!(
            leader.propose(3000, five[4..].to_vec()),
            Err(ProposeError::Overloaded(five[4..].to_vec()))
        );
    }

    #[test]
    fn a_forwarded_read_is_aborted_at_its_deadline_and_not_before() {
        let mut follower = follower_of_leader_1(5000);
        // Shorter than the election timeout, which would abort it anyway.
        follower.config.read_timeout_ms = 500;
        follower.read(5000, 42);
        let ready = follower.ready();
        assert!(matches!(
            messages(&ready).as_slice(),
            [Message::ReadIndex(_)]
        ));
        let deadline = 5000 + follower.config.read_timeout_ms;
        follower.tick(deadline - 1);
        assert!(
            follower.ready().reads.is_empty(),
            "aborted before its deadline"
        );
        follower.tick(deadline);
        assert_eq!(
            follower.ready().reads,
            vec![ReadOutcome::Aborted { id: 42 }],
            "a read with no answer is aborted at its deadline"
        );
    }

    #[test]
    fn a_replica_that_lost_its_disk_reports_whom_it_waits_for() {
        let fresh = node(3, 0);
        assert!(!fresh.is_joining());
        assert_eq!(fresh.join_progress(), None);
        let mut joining = rejoining_node();
        assert!(joining.is_joining());
        assert_eq!(
            joining.join_progress(),
            Some(JoinProgress::WaitingFor(vec![1, 2]))
        );
        let reply = JoinProbeReply {
            promised: Ballot::new(2, 1),
            highest_accepted_slot: 4,
            chosen_through: 3,
        };
        deliver(&mut joining, 10, 2, Message::JoinProbeReply(reply.clone()));
        assert_eq!(
            joining.join_progress(),
            Some(JoinProgress::WaitingFor(vec![1]))
        );
        deliver(&mut joining, 10, 1, Message::JoinProbeReply(reply));
        assert_eq!(
            joining.join_progress(),
            Some(JoinProgress::CatchingUp {
                slot: 4,
                chosen_through: 0
            })
        );
        assert_eq!(joining.promised(), Ballot::new(2, 1));
    }

    /// An acceptor that accepted slots 1..=24 under ballot 1.1 from replica
    /// 1 and learned 1..=20 chosen, its persists all durable.
    fn acceptor_with_chosen_prefix(now: u64) -> Node {
        let (mut acceptor, id) = acceptor_with_chosen_unapplied(now);
        acceptor.persisted(now, id);
        acceptor.ready();
        assert_eq!(acceptor.apply_next(), 21);
        acceptor
    }

    /// Node 2 holding slots 1-24 from leader 1, 1-20 of them chosen, with
    /// the batch writing them (its id returned) handed out but not yet
    /// durable, so that nothing is applied.
    fn acceptor_with_chosen_unapplied(now: u64) -> (Node, u64) {
        let mut acceptor = node(2, 0);
        acceptor.ready();
        let ballot = Ballot::new(1, 1);
        let values = (1..=24).map(|i| commands(&[&format!("c{i}")])).collect();
        let accept = Accept {
            ballot,
            first_slot: 1,
            values,
            chosen_through: 0,
        };
        deliver(&mut acceptor, now, 1, Message::Accept(accept));
        let commit = Commit {
            ballot,
            chosen_through: 20,
        };
        deliver(&mut acceptor, now, 1, Message::Commit(commit));
        let id = acceptor.ready().persist.expect("accepted and chosen").id;
        assert_eq!(acceptor.chosen_through(), 20);
        assert_eq!(acceptor.apply_next(), 1);
        (acceptor, id)
    }

    #[test]
    fn a_snapshot_moves_only_what_it_passes() {
        let (mut replica, _) = acceptor_with_chosen_unapplied(5000);
        let membership = replica.membership().clone();
        let progress = |replica: &Node| {
            (
                replica.apply_next(),
                replica.log_start(),
                replica.chosen_through(),
            )
        };
        // Through the first slot not applied: that slot is covered and the
        // log below it goes; the chosen prefix, past it, is not rewritten.
        replica.snapshot_installed(5000, 1, membership.clone());
        assert_eq!(progress(&replica), (2, 2, 20));
        let batch = replica.ready().persist.expect("the compaction is written");
        assert_eq!((batch.compact_below, batch.chosen_through), (Some(2), None));
        // Through the chosen prefix: likewise.
        replica.snapshot_installed(5000, 20, membership.clone());
        assert_eq!(progress(&replica), (21, 21, 20));
        let batch = replica.ready().persist.expect("the compaction is written");
        assert_eq!(
            (batch.compact_below, batch.chosen_through),
            (Some(21), None)
        );
        // Snapshots of what is already covered change nothing.
        replica.snapshot_installed(5000, 20, membership.clone());
        replica.snapshot_installed(5000, 7, membership);
        assert_eq!(progress(&replica), (21, 21, 20));
        assert_eq!(replica.ready().persist, None);
    }

    #[test]
    fn an_own_accept_released_after_stepping_down_is_dropped() {
        // Elected by the promises of both peers while its own promise is
        // still being written: its accepts, to itself too, wait for it.
        let mut leader = node(1, 0);
        leader.ready();
        leader.tick(3000);
        leader.ready();
        for voter in [2, 3] {
            let reply = PreVoteReply {
                round: 1,
                granted: true,
                promised: Ballot::ZERO,
            };
            deliver(&mut leader, 3000, voter, Message::PreVoteReply(reply));
        }
        let own_promise = leader.ready().persist.expect("own promise").id;
        let ballot = leader.promised();
        for voter in [2, 3] {
            let promise = Promise {
                ballot,
                chosen_through: 0,
                log_start: 0,
                entries: vec![],
            };
            deliver(&mut leader, 3000, voter, Message::Promise(promise));
        }
        assert_eq!(leader.role(), Role::Leader);
        leader.ready();
        // A higher ballot elsewhere: it steps down, its promise unchanged.
        let reject = Reject {
            ballot,
            promised: Ballot::new(ballot.round + 1, 3),
        };
        deliver(&mut leader, 3001, 2, Message::Reject(reject));
        assert_eq!(leader.role(), Role::Follower);
        assert_eq!(leader.promised(), ballot);
        // The write lands and releases its accept to itself: a leadership
        // it has left, so it must not follow itself.
        leader.persisted(3002, own_promise);
        assert_eq!(leader.role(), Role::Follower);
        assert_ne!(leader.status().leader, Some(1));
    }

    #[test]
    fn reads_waiting_for_their_index_count_against_the_pending_bound() {
        let mut follower = follower_of_leader_1(5000);
        follower.config.max_pending_reads = 3;
        follower.read(5000, 1);
        let request = messages(&follower.ready())
            .iter()
            .find_map(|m| match m {
                Message::ReadIndex(read) => Some(read.request),
                _ => None,
            })
            .expect("the read is forwarded");
        let reply = ReadIndexReply {
            request,
            read_index: Some(7),
        };
        deliver(&mut follower, 5001, 1, Message::ReadIndexReply(reply));
        assert!(follower.ready().reads.is_empty(), "it waits for slot 7");
        // One read waits for its index and two are forwarded: the bound.
        for id in 2..=4 {
            follower.read(5001, id);
        }
        assert_eq!(follower.ready().reads, vec![ReadOutcome::Aborted { id: 4 }]);
    }

    #[test]
    fn a_leader_keeps_at_most_its_window_of_slots_in_flight() {
        let mut leader = elected_leader(3000);
        leader.ready();
        leader.config.max_commands_per_slot = 1;
        leader.config.max_inflight_slots = 3;
        let proposed = (0..5u8).map(|i| Command::from(vec![i])).collect();
        leader.propose(3000, proposed).expect("leader takes them");
        leader.ready();
        let status = leader.status();
        // The election's no-op and two commands; three commands wait.
        assert_eq!((status.inflight_slots, status.pending_commands), (3, 3));
    }

    #[test]
    fn a_leader_heartbeats_once_per_interval() {
        let mut leader = elected_leader(3000);
        let interval = leader.config.heartbeat_interval_ms;
        let first = heartbeat_sequence(&leader.ready()).expect("a heartbeat on election");
        leader.tick(3000 + interval - 1);
        assert_eq!(heartbeat_sequence(&leader.ready()), None, "too early");
        leader.tick(3000 + interval);
        assert_eq!(heartbeat_sequence(&leader.ready()), Some(first + 1));
        leader.tick(3000 + 2 * interval - 1);
        assert_eq!(heartbeat_sequence(&leader.ready()), None, "once");
    }

    #[test]
    fn a_promise_carries_chosen_entries_only_within_four_chunks_of_its_first_slot() {
        let mut acceptor = acceptor_with_chosen_prefix(5000);
        acceptor.config.max_slots_per_message = 2;
        let ballot = Ballot::new(2, 3);
        let prepare = Prepare {
            ballot,
            from_slot: 3,
        };
        deliver(&mut acceptor, 5000, 3, Message::Prepare(prepare));
        let id = acceptor.ready().persist.expect("the promise").id;
        acceptor.persisted(5000, id);
        let ready = acceptor.ready();
        let promise = match messages(&ready).as_slice() {
            [Message::Promise(promise)] => promise.clone(),
            other => panic!("expected one promise, got {other:?}"),
        };
        let slots: Vec<Slot> = promise.entries.iter().map(|e| e.slot).collect();
        // Chosen slots 3..=10 (four chunks of two from slot 3), none of the
        // chosen 11..=20, and every slot accepted past the chosen prefix.
        let expected: Vec<Slot> = (3..=10).chain(21..=24).collect();
        assert_eq!(slots, expected);
        assert_eq!(promise.chosen_through, 20);
        assert!(promise
            .entries
            .iter()
            .all(|e| e.ballot == Ballot::new(1, 1)));
    }

    #[test]
    fn a_catch_up_request_is_sent_once_per_retry_interval() {
        let mut follower = node(2, 0);
        follower.ready();
        let ballot = Ballot::new(1, 1);
        let catch_ups = |follower: &mut Node| {
            messages(&follower.ready())
                .into_iter()
                .filter(|m| matches!(m, Message::CatchUp(CatchUp { from_slot: 1 })))
                .count()
        };
        let commit = |chosen_through| {
            Message::Commit(Commit {
                ballot,
                chosen_through,
            })
        };
        deliver(&mut follower, 5000, 1, commit(5));
        assert_eq!(catch_ups(&mut follower), 1, "behind: asks the leader");
        let retry = follower.config.catch_up_retry_ms;
        deliver(&mut follower, 5000 + retry - 1, 1, commit(6));
        follower.tick(5000 + retry - 1);
        assert_eq!(catch_ups(&mut follower), 0, "asked already");
        follower.tick(5000 + retry);
        assert_eq!(catch_ups(&mut follower), 1, "no answer: asks again");
    }

    #[test]
    fn slots_are_packed_up_to_their_byte_bound() {
        let mut leader = elected_leader(3000);
        leader.ready();
        leader.config.max_slot_bytes = 10;
        let five = |name: &str| Command::copy_from_slice(format!("{name:5}").as_bytes());
        let six = |name: &str| Command::copy_from_slice(format!("{name:6}").as_bytes());
        let big = Command::copy_from_slice(&[b'z'; 12]);
        let proposed = vec![
            five("a"),
            five("b"),
            five("c"),
            six("d"),
            six("e"),
            big.clone(),
        ];
        leader.propose(3000, proposed).expect("leader takes them");
        let ready = leader.ready();
        let batch = |commands: Vec<Command>| {
            Value::Commands(Batch {
                stamp_ms: 3000,
                commands: commands.into(),
            })
        };
        // 5 + 5 bytes fit exactly, 6 + 6 do not, and a command larger than
        // the bound has a slot of its own.
        let expected = vec![(
            2,
            vec![
                batch(vec![five("a"), five("b")]),
                batch(vec![five("c")]),
                batch(vec![six("d")]),
                batch(vec![six("e")]),
                batch(vec![big]),
            ],
        )];
        assert_eq!(accepts_to(&ready, 2), expected);
    }

    #[test]
    fn accepts_carry_at_most_the_slots_per_message() {
        let mut leader = elected_leader(3000);
        leader.ready();
        leader.config.max_slots_per_message = 2;
        leader.config.max_commands_per_slot = 1;
        let proposed = (0..5u8).map(|i| Command::from(vec![i])).collect();
        leader.propose(3000, proposed).expect("leader takes them");
        let ready = leader.ready();
        let ranges: Vec<(Slot, usize)> = accepts_to(&ready, 3)
            .into_iter()
            .map(|(first, values)| (first, values.len()))
            .collect();
        assert_eq!(ranges, vec![(2, 2), (4, 2), (6, 1)]);
    }

    #[test]
    fn a_lease_read_ends_where_the_lease_ends() {
        let elected_at = 3000;
        let mut leader = elected_leader(elected_at);
        let ballot = leader.promised();
        let ready = leader.ready();
        let sequence = heartbeat_sequence(&ready).expect("a heartbeat on election");
        let batch = ready.persist.expect("own acceptance of the no-op").id;
        let ack = |sequence| {
            Message::HeartbeatAck(HeartbeatAck {
                ballot,
                sequence,
                chosen_through: 0,
            })
        };
        deliver(&mut leader, elected_at, 2, ack(sequence));
        // The barrier no-op is chosen once a majority durably accepted it.
        leader.persisted(elected_at, batch);
        let accepted = Accepted {
            ballot,
            first_slot: 1,
            count: 1,
        };
        deliver(&mut leader, elected_at, 2, Message::Accepted(accepted));
        leader.ready();
        let end = leader.lease_until_ms();
        leader.read(end - 1, 1);
        assert_eq!(
            leader.ready().reads,
            vec![ReadOutcome::Ready {
                id: 1,
                read_index: 1
            }],
            "served by the lease"
        );
        leader.read(end, 2);
        assert!(
            leader.ready().reads.is_empty(),
            "the lease has ended: a round first"
        );
        leader.tick(end);
        let sequence = heartbeat_sequence(&leader.ready()).expect("a heartbeat for the read");
        deliver(&mut leader, end, 3, ack(sequence));
        assert_eq!(
            leader.ready().reads,
            vec![ReadOutcome::Ready {
                id: 2,
                read_index: 1
            }]
        );
    }

    #[test]
    fn a_leader_heard_by_a_majority_keeps_leading_and_steps_down_a_lease_after_the_last() {
        let mut leader = elected_leader(3000);
        let ballot = leader.promised();
        let mut now = 3000;
        let mut last_ack = now;
        while now < 3000 + 5 * LEASE_MS {
            now += 50;
            leader.tick(now);
            if let Some(sequence) = heartbeat_sequence(&leader.ready()) {
                let ack = HeartbeatAck {
                    ballot,
                    sequence,
                    chosen_through: 0,
                };
                deliver(&mut leader, now, 2, Message::HeartbeatAck(ack));
                last_ack = now;
            }
            assert_eq!(leader.role(), Role::Leader, "stepped down at {now} ms");
        }
        leader.tick(last_ack + LEASE_MS - 1);
        assert_eq!(leader.role(), Role::Leader);
        leader.tick(last_ack + LEASE_MS);
        assert_eq!(leader.role(), Role::Follower, "nobody heard for a lease");
    }

    #[test]
    fn a_leader_resumed_after_a_pause_counts_itself_heard() {
        // Paused past its lease, the leader hears one member before its next
        // tick: with itself that is a majority, although its own last
        // heartbeat is a lease old.
        let mut leader = elected_leader_with_id(2, 3000);
        let ballot = leader.promised();
        let sequence = heartbeat_sequence(&leader.ready()).expect("a heartbeat on election");
        let resumed = 3000 + LEASE_MS + 500;
        let ack = HeartbeatAck {
            ballot,
            sequence,
            chosen_through: 0,
        };
        deliver(&mut leader, resumed, 1, Message::HeartbeatAck(ack));
        leader.tick(resumed);
        assert_eq!(leader.role(), Role::Leader);
    }

    #[test]
    fn missing_acknowledgements_are_resent_in_runs_once_per_interval() {
        let mut leader = elected_leader(3000);
        leader.ready();
        leader.config.max_commands_per_slot = 1;
        let proposed = (0..3u8).map(|i| Command::from(vec![i])).collect();
        leader.propose(3000, proposed).expect("leader takes them");
        leader.ready();
        let retransmit = leader.config.retransmit_interval_ms;
        leader.tick(3000 + retransmit - 1);
        assert!(accepts_to(&leader.ready(), 2).is_empty(), "too early");
        let resent_at = 3000 + retransmit;
        leader.tick(resent_at);
        let resent: Vec<(Slot, usize)> = accepts_to(&leader.ready(), 2)
            .into_iter()
            .map(|(first, values)| (first, values.len()))
            .collect();
        assert_eq!(resent, vec![(1, 4)], "the no-op and the three, in one run");
        leader.tick(resent_at + retransmit - 1);
        assert!(accepts_to(&leader.ready(), 2).is_empty(), "resent once");
        leader.tick(resent_at + retransmit);
        assert_eq!(accepts_to(&leader.ready(), 2).len(), 1, "the next interval");
    }

    #[test]
    fn a_catch_up_reply_carries_at_most_the_slots_per_message() {
        let mut peer = acceptor_with_chosen_prefix(5000);
        peer.config.max_slots_per_message = 4;
        let mut reply_from = |from_slot| {
            deliver(&mut peer, 5000, 3, Message::CatchUp(CatchUp { from_slot }));
            match messages(&peer.ready()).as_slice() {
                [Message::Chosen(reply)] => reply.clone(),
                other => panic!("expected one reply, got {other:?}"),
            }
        };
        let reply = reply_from(2);
        assert_eq!(reply.first_slot, 2);
        assert_eq!(reply.values.len(), 4);
        assert_eq!(reply.chosen_through, 20);
        let reply = reply_from(19);
        assert_eq!(reply.values.len(), 2, "only chosen slots, through 20");
    }

    #[test]
    fn a_read_waiting_for_the_leaders_index_completes_once_chosen_or_at_its_deadline() {
        let mut follower = follower_of_leader_1(5000);
        follower.config.read_timeout_ms = 500;
        let ballot = Ballot::new(1, 1);
        let forward_read = |follower: &mut Node, at, id| {
            follower.read(at, id);
            let ready = follower.ready();
            match messages(&ready).as_slice() {
                [Message::ReadIndex(ReadIndex { request })] => *request,
                other => panic!("expected a read index request, got {other:?}"),
            }
        };
        let first = forward_read(&mut follower, 5000, 1);
        let second = forward_read(&mut follower, 5000, 2);
        for request in [first, second] {
            let reply = ReadIndexReply {
                request,
                read_index: Some(1),
            };
            deliver(&mut follower, 5010, 1, Message::ReadIndexReply(reply));
        }
        let ready = follower.ready();
        assert!(ready.reads.is_empty(), "slot 1 is not chosen here yet");
        assert!(
            messages(&ready)
                .iter()
                .any(|m| matches!(m, Message::CatchUp(CatchUp { from_slot: 1 }))),
            "it asks the leader for the slots it lacks at once"
        );
        // Slot 1 arrives and is announced chosen: both reads complete.
        let accept = Accept {
            ballot,
            first_slot: 1,
            values: vec![Value::Noop],
            chosen_through: 1,
        };
        deliver(&mut follower, 5020, 1, Message::Accept(accept));
        assert_eq!(
            follower.ready().reads,
            vec![
                ReadOutcome::Ready {
                    id: 1,
                    read_index: 1
                },
                ReadOutcome::Ready {
                    id: 2,
                    read_index: 1
                }
            ]
        );
        // A read whose index never arrives here is aborted at its deadline.
        let third = forward_read(&mut follower, 5030, 3);
        let reply = ReadIndexReply {
            request: third,
            read_index: Some(9),
        };
        deliver(&mut follower, 5040, 1, Message::ReadIndexReply(reply));
        follower.ready();
        follower.tick(5030 + 500 - 1);
        assert!(
            follower.ready().reads.is_empty(),
            "aborted before its deadline"
        );
        follower.tick(5030 + 500);
        assert_eq!(follower.ready().reads, vec![ReadOutcome::Aborted { id: 3 }]);
    }

    #[test]
    fn a_batch_not_yet_handed_out_is_never_durable() {
        let mut acceptor = node(2, 0);
        acceptor.ready();
        let prepare = |round| {
            Message::Prepare(Prepare {
                ballot: Ballot::new(round, 1),
                from_slot: 1,
            })
        };
        deliver(&mut acceptor, 5000, 1, prepare(1));
        let first = acceptor.ready().persist.expect("the first promise").id;
        acceptor.persisted(5000, first + 10);
        assert!(matches!(
            messages(&acceptor.ready()).as_slice(),
            [Message::Promise(_)]
        ));
        deliver(&mut acceptor, 5000, 1, prepare(2));
        let ready = acceptor.ready();
        assert_eq!(
            ready.persist.as_ref().map(|batch| batch.id),
            Some(first + 1)
        );
        assert!(
            messages(&ready).is_empty(),
            "the second promise waits for its own write"
        );
    }

    #[test]
    fn reads_past_the_pending_bound_are_aborted_at_once() {
        let mut follower = follower_of_leader_1(5000);
        follower.config.max_pending_reads = 2;
        for id in 1..=3 {
            follower.read(5000, id);
        }
        let ready = follower.ready();
        assert_eq!(ready.reads, vec![ReadOutcome::Aborted { id: 3 }]);
        let forwarded = messages(&ready)
            .iter()
            .filter(|m| matches!(m, Message::ReadIndex(_)))
            .count();
        assert_eq!(forwarded, 2);
    }

    #[test]
    fn a_snapshot_with_another_membership_moves_this_replica_to_its_place() {
        let mut replica = node(3, 0);
        replica.ready();
        let membership = Membership::new(&[1, 3, 5]).expect("membership");
        replica.snapshot_installed(5000, 10, membership.clone());
        assert_eq!(replica.membership(), &membership);
        assert_eq!(replica.self_bit, 0b010);
        assert_eq!(replica.apply_next(), 11);
        assert_eq!(replica.chosen_through(), 10);
        assert_eq!(replica.log_start(), 11);
        let batch = replica
            .ready()
            .persist
            .expect("the new membership is written");
        assert_eq!(batch.membership, Some(membership));
        assert_eq!(batch.compact_below, Some(11));
    }

    #[test]
    fn only_granted_pre_votes_of_the_current_round_count() {
        let mut candidate = node(1, 0);
        candidate.ready();
        candidate.tick(3000);
        assert_eq!(candidate.role(), Role::PreCandidate);
        let round = messages(&candidate.ready())
            .iter()
            .find_map(|m| match m {
                Message::PreVote(pre_vote) => Some(pre_vote.round),
                _ => None,
            })
            .expect("pre-votes asked");
        let reply = |round, granted| {
            Message::PreVoteReply(PreVoteReply {
                round,
                granted,
                promised: Ballot::ZERO,
            })
        };
        deliver(&mut candidate, 3001, 2, reply(round, false));
        assert_eq!(candidate.role(), Role::PreCandidate, "a refusal counted");
        deliver(&mut candidate, 3001, 3, reply(round + 1, true));
        assert_eq!(
            candidate.role(),
            Role::PreCandidate,
            "another round counted"
        );
        deliver(&mut candidate, 3001, 3, reply(round, true));
        assert_eq!(candidate.role(), Role::Candidate);
    }

    #[test]
    fn an_accept_under_a_higher_ballot_raises_the_promise() {
        let mut acceptor = node(2, 0);
        acceptor.ready();
        let ballot = Ballot::new(3, 1);
        let accept = Accept {
            ballot,
            first_slot: 1,
            values: vec![Value::Noop],
            chosen_through: 0,
        };
        deliver(&mut acceptor, 5000, 1, Message::Accept(accept));
        assert_eq!(acceptor.promised(), ballot);
        let batch = acceptor.ready().persist.expect("the acceptance is written");
        assert_eq!(batch.promised, Some(ballot), "and the promise with it");
    }

    #[test]
    fn a_lease_counts_from_any_of_the_last_64_heartbeats() {
        let mut leader = elected_leader(3000);
        leader.config.heartbeat_interval_ms = 10;
        let ballot = leader.promised();
        let mut sent = vec![heartbeat_sequence(&leader.ready()).expect("first heartbeat")];
        let mut now = 3000;
        while sent.len() < HEARTBEAT_HISTORY {
            now += 10;
            leader.tick(now);
            sent.extend(heartbeat_sequence(&leader.ready()));
        }
        assert_eq!(sent.len(), 64);
        // The oldest of the 64 is still remembered: the lease runs from it.
        let ack = HeartbeatAck {
            ballot,
            sequence: sent[0],
            chosen_through: 0,
        };
        deliver(&mut leader, now, 2, Message::HeartbeatAck(ack));
        assert_eq!(leader.lease_until_ms(), 3000 + LEASE_MS - MARGIN_MS);
    }

    #[test]
    fn a_snapshot_past_a_leaders_window_moves_the_window_past_it() {
        let mut leader = elected_leader(3000);
        leader.ready();
        let membership = leader.membership().clone();
        leader.snapshot_installed(3000, 10, membership);
        assert_eq!(leader.chosen_through(), 10);
        let status = leader.status();
        assert_eq!((status.inflight_slots, status.next_slot), (0, 11));
        leader
            .propose(3000, vec![Command::from_static(b"x")])
            .expect("leads");
        let firsts: Vec<Slot> = accepts_to(&leader.ready(), 2)
            .into_iter()
            .map(|(first, _)| first)
            .collect();
        assert_eq!(firsts, vec![11], "the next command goes past the snapshot");
    }

    #[test]
    fn a_snapshot_is_asked_for_only_when_the_log_starts_past_the_next_slot() {
        let mut follower = acceptor_with_chosen_prefix(5000);
        let needed = |log_start| {
            Message::SnapshotNeeded(SnapshotNeeded {
                log_start,
                chosen_through: 40,
            })
        };
        deliver(&mut follower, 5000, 1, needed(21));
        assert_eq!(follower.ready().snapshot, None, "slot 21 is still there");
        deliver(&mut follower, 5000, 1, needed(22));
        assert_eq!(
            follower.ready().snapshot,
            Some(SnapshotRequest {
                from: 1,
                covering_through: 21
            })
        );
    }

    #[test]
    fn a_leader_read_without_a_lease_is_aborted_at_its_deadline() {
        let mut leader = elected_leader(3000);
        leader.ready();
        leader.config.read_timeout_ms = 500;
        let ballot = leader.promised();
        // The barrier no-op is chosen, but no heartbeat was acknowledged.
        let batch = leader.ready().persist.map_or(0, |batch| batch.id);
        leader.persisted(3000, batch.max(leader.last_issued_batch()));
        let accepted = Accepted {
            ballot,
            first_slot: 1,
            count: 1,
        };
        deliver(&mut leader, 3000, 2, Message::Accepted(accepted));
        leader.ready();
        assert!(!leader.has_lease(3000));
        leader.read(3000, 5);
        leader.tick(3499);
        assert!(
            leader.ready().reads.is_empty(),
            "aborted before its deadline"
        );
        leader.tick(3500);
        assert_eq!(leader.ready().reads, vec![ReadOutcome::Aborted { id: 5 }]);
        assert_eq!(leader.role(), Role::Leader, "aborted, not stepped down");
    }

    #[test]
    fn a_rejoining_replica_probes_again_those_that_did_not_answer() {
        let mut joining = rejoining_node();
        joining.ready();
        let probed = |node: &mut Node| -> Vec<NodeId> {
            node.ready()
                .messages
                .iter()
                .filter(|e| matches!(e.message, Message::JoinProbe(_)))
                .map(|e| e.to)
                .collect()
        };
        joining.tick(10);
        assert_eq!(probed(&mut joining), vec![1, 2]);
        let reply = JoinProbeReply {
            promised: Ballot::new(2, 1),
            highest_accepted_slot: 4,
            chosen_through: 3,
        };
        deliver(&mut joining, 11, 2, Message::JoinProbeReply(reply));
        let retry = joining.config.catch_up_retry_ms;
        joining.tick(10 + retry - 1);
        assert_eq!(probed(&mut joining), Vec::<NodeId>::new(), "too early");
        joining.tick(10 + retry);
        assert_eq!(
            probed(&mut joining),
            vec![1],
            "only the one that did not answer"
        );
    }

    #[test]
    fn a_slot_acknowledged_behind_slots_learned_by_catch_up_is_chosen_at_once() {
        let mut leader = elected_leader(3000);
        leader.config.max_commands_per_slot = 1;
        let ballot = leader.promised();
        let first = leader
            .ready()
            .persist
            .expect("own acceptance of the no-op")
            .id;
        leader.persisted(3000, first);
        leader.ready();
        let x = Command::from_static(b"x");
        leader
            .propose(3000, vec![x.clone(), Command::from_static(b"y")])
            .expect("leads");
        let own = leader
            .ready()
            .persist
            .expect("own acceptance of 2 and 3")
            .id;
        leader.persisted(3000, own);
        leader.ready();
        // Replica 2 acknowledges slot 3 only: it is chosen, behind 1 and 2.
        let accepted = Accepted {
            ballot,
            first_slot: 3,
            count: 1,
        };
        deliver(&mut leader, 3000, 2, Message::Accepted(accepted));
        assert_eq!(leader.chosen_through(), 0);
        // A catch-up reply teaches it slots 1 and 2 chosen.
        let chosen = Chosen {
            first_slot: 1,
            values: vec![
                Value::Noop,
                Value::Commands(Batch {
                    stamp_ms: 3000,
                    commands: vec![x].into(),
                }),
            ],
            chosen_through: 2,
        };
        deliver(&mut leader, 3001, 3, Message::Chosen(chosen));
        assert_eq!(leader.chosen_through(), 3, "slot 3 was chosen already");
        assert_eq!(leader.status().inflight_slots, 0);
    }

    /// Node 1 as a candidate whose own promise is not yet durable, so that
    /// the promises of 2 and 3 alone make its quorum.
    fn candidate_awaiting_promises(now: u64) -> Node {
        let mut candidate = node(1, 0);
        candidate.ready();
        candidate.tick(now);
        candidate.ready();
        for voter in [2, 3] {
            let reply = PreVoteReply {
                round: 1,
                granted: true,
                promised: Ballot::ZERO,
            };
            deliver(&mut candidate, now, voter, Message::PreVoteReply(reply));
        }
        assert_eq!(candidate.role(), Role::Candidate);
        candidate
    }

    #[test]
    fn a_candidate_catches_up_first_when_a_promiser_knows_more_than_it_sent() {
        let mut candidate = candidate_awaiting_promises(3000);
        let ballot = candidate.promised();
        let promise = |chosen_through| {
            Message::Promise(Promise {
                ballot,
                chosen_through,
                log_start: 0,
                entries: vec![],
            })
        };
        deliver(&mut candidate, 3000, 2, promise(0));
        deliver(&mut candidate, 3000, 3, promise(50));
        assert_eq!(candidate.role(), Role::Follower, "it may not lead yet");
        let ready = candidate.ready();
        assert!(ready.refusals.iter().any(|r| matches!(
            r.reason,
            RefusalReason::PromiserKnowsMore {
                promiser: 3,
                chosen_through: 50,
                ..
            }
        )));
        let asked: Vec<NodeId> = ready
            .messages
            .iter()
            .filter(|e| matches!(e.message, Message::CatchUp(_)))
            .map(|e| e.to)
            .collect();
        assert_eq!(asked, vec![3], "it asks the promiser that knows most");
    }

    #[test]
    fn a_candidate_learns_the_chosen_entries_a_promise_carries() {
        let mut candidate = candidate_awaiting_promises(3000);
        let ballot = candidate.promised();
        let old = Ballot::new(0, 2);
        let entries = (1..=3)
            .map(|slot| AcceptedEntry {
                slot,
                ballot: old,
                value: commands(&[&format!("c{slot}")]),
            })
            .collect();
        let with_entries = Promise {
            ballot,
            chosen_through: 3,
            log_start: 0,
            entries,
        };
        let empty = Promise {
            ballot,
            chosen_through: 0,
            log_start: 0,
            entries: vec![],
        };
        deliver(&mut candidate, 3000, 3, Message::Promise(empty));
        deliver(&mut candidate, 3000, 2, Message::Promise(with_entries));
        assert_eq!(candidate.role(), Role::Leader);
        assert_eq!(candidate.chosen_through(), 3, "learned from the promise");
        let status = candidate.status();
        assert_eq!(status.next_slot, 5, "the barrier at slot 4");
    }

    #[test]
    fn a_pre_vote_is_refused_to_a_candidate_behind_and_granted_otherwise() {
        let mut voter = acceptor_with_chosen_prefix(0);
        let granted = |voter: &mut Node, chosen_through| {
            let pre_vote = PreVote {
                round: 5,
                chosen_through,
            };
            deliver(voter, 5000, 3, Message::PreVote(pre_vote));
            match messages(&voter.ready()).as_slice() {
                [Message::PreVoteReply(reply)] => reply.granted,
                other => panic!("expected a reply, got {other:?}"),
            }
        };
        assert!(!granted(&mut voter, 19), "behind the voter's chosen prefix");
        assert!(granted(&mut voter, 20));
        assert!(granted(&mut voter, 21));
    }

    #[test]
    fn a_catch_up_reply_overlapping_the_known_prefix_still_teaches_the_rest() {
        let mut follower = acceptor_with_chosen_prefix(5000);
        let values = (19..=24)
            .map(|slot| commands(&[&format!("c{slot}")]))
            .collect();
        let reply = Chosen {
            first_slot: 19,
            values,
            chosen_through: 24,
        };
        deliver(&mut follower, 5000, 1, Message::Chosen(reply));
        assert_eq!(follower.chosen_through(), 24);
    }

    #[test]
    fn a_rejoining_replica_nudges_the_leader_once_per_interval() {
        let mut joining = rejoining_node();
        joining.ready();
        let reply = JoinProbeReply {
            promised: Ballot::new(1, 1),
            highest_accepted_slot: 4,
            chosen_through: 0,
        };
        for member in [1, 2] {
            deliver(
                &mut joining,
                10,
                member,
                Message::JoinProbeReply(reply.clone()),
            );
        }
        let heartbeat = Heartbeat {
            ballot: Ballot::new(1, 1),
            chosen_through: 0,
            sequence: 1,
        };
        deliver(&mut joining, 2000, 1, Message::Heartbeat(heartbeat));
        joining.ready();
        let nudges = |node: &mut Node| {
            node.ready()
                .messages
                .iter()
                .filter(|e| e.to == 1 && matches!(e.message, Message::Forward(_)))
                .count()
        };
        joining.tick(2000);
        assert_eq!(
            nudges(&mut joining),
            1,
            "slots to learn: the leader is nudged"
        );
        let every = joining.config.election_timeout_min_ms;
        joining.tick(2000 + every - 1);
        assert_eq!(nudges(&mut joining), 0);
        joining.tick(2000 + every);
        assert_eq!(nudges(&mut joining), 1);
    }
}
