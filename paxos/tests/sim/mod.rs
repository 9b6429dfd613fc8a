//! A deterministic simulator for `synod-paxos`: it owns virtual time, the
//! network, the disks and the clocks of a 3- or 5-replica cluster, draws every
//! choice from one seed, and checks the protocol's invariants after every
//! event.
//!
//! A run has two phases. In the safety phase, faults of the run's mix are
//! injected: message loss, duplication and reordering, partitions (minority,
//! majority, one-way, the leader isolated), crash-restarts that lose all
//! volatile state and any write not yet synced (a random prefix of the
//! unsynced writes survives, as on a real disk), clocks running at different
//! rates, and compaction that forces catch-up by snapshot. Then every fault
//! heals, and the liveness phase requires a leader, every pending proposal
//! chosen and every replica caught up within a bounded virtual time.
//!
//! Liveness is also required of each request once the faults healed: every
//! command outstanding at the heal or proposed after it is chosen within
//! [`COMMAND_BOUND_US`] of the later of the two, and every read (forwarded
//! ones included) is served or explicitly aborted within
//! [`READ_BOUND_US`]. Once the cluster has settled, a read at every replica
//! must be served, not aborted, and then the leader must keep leading, with
//! its lease, for [`STABLE_US`] without any replica starting an election.
//!
//! Checked after every event:
//! - one value per slot: a value is chosen when a majority durably accepted
//!   it under one ballot, and no slot ever has two chosen values (nor one
//!   ballot two proposed values). Once a replica has lost its disk, an
//!   acceptance it forgot may pair with a later one into a majority nobody
//!   can learn; then two such values are tolerated only while neither was
//!   learned;
//! - every value a replica applies was accepted by a majority and equals
//!   the value every other replica applied at that slot, in slot order, so
//!   all applied sequences are prefixes of one sequence;
//! - no two replicas believe they hold a lease at overlapping real times;
//! - a read's index covers every entry any replica knew chosen when the
//!   read began.

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use synod_paxos::{
    Ballot, Config, DurableState, Envelope, Membership, Node, NodeId, Persist, ProposeError,
    ReadOutcome, Ready, Role, Slot, Value,
};

/// The fault mixes; a seed picks one as `seed % MIXES.len()`.
pub const MIXES: [Mix; 8] = [
    Mix::Lossy,
    Mix::Crashes,
    Mix::Partitions,
    Mix::Leases,
    Mix::Snapshots,
    Mix::Chaos,
    Mix::Durability,
    Mix::Elections,
];

/// Which faults a run injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    /// Loss, duplication, reordering and delay; no crashes.
    Lossy,
    /// Crash-restarts with unsynced writes lost, and some loss.
    Crashes,
    /// Partitions of every shape, including one-way and leader isolation.
    Partitions,
    /// Clock drift, leader isolation and many reads: stresses leases.
    Leases,
    /// Aggressive compaction and long outages: catch-up by snapshot.
    Snapshots,
    /// Everything at once.
    Chaos,
    /// Crashes aimed between a write and its sync, partitions, and messages
    /// held for up to a second: an acceptor that forgot an unsynced promise
    /// meets accepts from before it.
    Durability,
    /// Leadership changes while the promisers are far ahead of the
    /// candidate: many slots, few per message (so promises leave out chosen
    /// slots past their limit), logs compacted to a few slots (so promisers
    /// cannot send what the candidate lacks), one-way cuts and leader
    /// crashes (so candidates run behind), and catch-up racing compaction.
    Elections,
}

/// The parameters of one run, all drawn from its seed.
#[derive(Clone, Debug)]
pub struct Params {
    pub seed: u64,
    pub mix: Mix,
    pub nodes: usize,
    pub loss: f64,
    pub duplicate: f64,
    pub delay_min_us: u64,
    pub delay_max_us: u64,
    pub fsync_min_us: u64,
    pub fsync_max_us: u64,
    pub max_drift: f64,
    pub crashes: bool,
    pub partitions: bool,
    pub leader_isolation: bool,
    pub retain_slots: u64,
    pub safety_ms: u64,
    pub liveness_ms: u64,
    pub propose_every_us: u64,
    pub read_every_us: u64,
    pub max_commands_per_slot: usize,
    pub max_inflight_slots: u64,
    /// Slots per accept, catch-up reply and promise chunk; a promise carries
    /// chosen entries only within four such chunks of its first slot.
    pub max_slots_per_message: usize,
    /// Chance that a message is held in the network for 20 ms or more.
    pub long_delay: f64,
    /// The longest such hold.
    pub long_delay_max_us: u64,
    /// Chance that a replica crashes between issuing a write and its sync
    /// (ten times higher for writes that carry a promise).
    pub sync_crash: f64,
    pub lease_ms: u64,
    pub clock_drift_margin_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Chance that a crash also loses the replica's disk: it restarts
    /// empty and rejoins ([`DurableState::rejoin`]).
    pub disk_loss: f64,
}

impl Params {
    pub fn from_seed(seed: u64) -> Params {
        let mix = MIXES[(seed % MIXES.len() as u64) as usize];
        let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let nodes = if rng.random_bool(0.3) { 5 } else { 3 };
        let mut params = Params {
            seed,
            mix,
            nodes,
            loss: 0.0,
            duplicate: 0.0,
            delay_min_us: 100,
            delay_max_us: rng.random_range(500..8_000),
            fsync_min_us: 50,
            fsync_max_us: rng.random_range(200..4_000),
            max_drift: 0.0,
            crashes: false,
            partitions: false,
            leader_isolation: false,
            retain_slots: 1_000,
            safety_ms: 2_500,
            liveness_ms: 6_000,
            propose_every_us: rng.random_range(2_000..20_000),
            read_every_us: rng.random_range(5_000..30_000),
            max_commands_per_slot: rng.random_range(1..8),
            max_inflight_slots: rng.random_range(2..32),
            max_slots_per_message: 8,
            long_delay: 0.0,
            long_delay_max_us: 300_000,
            sync_crash: 0.0,
            lease_ms: 200,
            clock_drift_margin_ms: 20,
            election_timeout_min_ms: 200,
            election_timeout_max_ms: 400,
            disk_loss: 0.0,
        };
        match mix {
            Mix::Lossy => {
                params.loss = rng.random_range(0.0..0.25);
                params.duplicate = rng.random_range(0.0..0.15);
                params.long_delay = rng.random_range(0.0..0.03);
            }
            Mix::Crashes => {
                params.loss = rng.random_range(0.0..0.05);
                params.crashes = true;
                params.disk_loss = rng.random_range(0.0..0.5);
                params.long_delay = rng.random_range(0.0..0.03);
                params.sync_crash = rng.random_range(0.0..0.02);
            }
            Mix::Partitions => {
                params.partitions = true;
                params.leader_isolation = true;
                params.duplicate = rng.random_range(0.0..0.05);
                params.long_delay = rng.random_range(0.0..0.02);
            }
            Mix::Leases => {
                // A fast network, clock rates up to 10% apart and election
                // timeouts that fire as soon as the lease promises end: a
                // lease that ignores drift overlaps its successor's.
                params.max_drift = rng.random_range(0.02..0.10);
                params.clock_drift_margin_ms = 40;
                params.election_timeout_max_ms = 215;
                params.delay_max_us = rng.random_range(200..1_500);
                params.fsync_max_us = rng.random_range(100..500);
                params.leader_isolation = true;
                params.read_every_us = rng.random_range(1_000..5_000);
            }
            Mix::Snapshots => {
                params.crashes = true;
                params.retain_slots = rng.random_range(0..6);
                params.propose_every_us = rng.random_range(500..3_000);
            }
            Mix::Durability => {
                params.crashes = true;
                params.disk_loss = rng.random_range(0.0..0.3);
                params.partitions = true;
                params.leader_isolation = true;
                params.long_delay = rng.random_range(0.05..0.15);
                params.long_delay_max_us = 1_000_000;
                params.sync_crash = rng.random_range(0.03..0.08);
            }
            Mix::Chaos => {
                params.disk_loss = rng.random_range(0.0..0.2);
                params.long_delay = rng.random_range(0.0..0.02);
                params.sync_crash = rng.random_range(0.0..0.01);
                params.loss = rng.random_range(0.0..0.1);
                params.duplicate = rng.random_range(0.0..0.1);
                params.max_drift = rng.random_range(0.0..0.04);
                params.crashes = true;
                params.partitions = true;
                params.leader_isolation = true;
                params.retain_slots = rng.random_range(0..40);
            }
            Mix::Elections => {
                params.crashes = true;
                params.partitions = true;
                params.leader_isolation = true;
                params.loss = rng.random_range(0.0..0.05);
                params.long_delay = rng.random_range(0.0..0.05);
                params.retain_slots = rng.random_range(0..6);
                params.propose_every_us = rng.random_range(300..2_000);
                params.max_commands_per_slot = rng.random_range(1..3);
                params.max_slots_per_message = rng.random_range(1..4);
                params.sync_crash = rng.random_range(0.0..0.02);
            }
        }
        params
    }

    /// The core's configuration for member `id`, scaled for the simulator:
    /// a 200 ms lease with a drift margin that covers the run's largest
    /// clock-rate difference (margin >= lease * 2 * drift / (1 + drift)).
    pub fn config(&self, id: NodeId) -> Config {
        let mut config = Config::new(id, self.seed);
        config.heartbeat_interval_ms = 20;
        config.election_timeout_min_ms = self.election_timeout_min_ms;
        config.election_timeout_max_ms = self.election_timeout_max_ms;
        config.lease_ms = self.lease_ms;
        config.clock_drift_margin_ms = self.clock_drift_margin_ms;
        config.retransmit_interval_ms = 40;
        config.catch_up_retry_ms = 40;
        config.read_timeout_ms = 1_000;
        config.max_inflight_slots = self.max_inflight_slots;
        config.max_commands_per_slot = self.max_commands_per_slot;
        config.max_slots_per_message = self.max_slots_per_message;
        config.log_retain_slots = self.retain_slots;
        config
    }
}

#[derive(Debug)]
enum Event {
    Deliver(Envelope),
    Persisted {
        node: usize,
        incarnation: u64,
        id: u64,
    },
    Tick {
        node: usize,
        incarnation: u64,
    },
    SnapshotArrives {
        node: usize,
        incarnation: u64,
        from: usize,
    },
    Propose,
    Retry,
    Read,
    /// A read at a settled cluster, at one replica.
    Probe {
        node: usize,
    },
    Fault,
    Restart {
        node: usize,
    },
    Crash {
        node: usize,
        incarnation: u64,
    },
    Heal,
}

struct Clock {
    offset_us: f64,
    rate: f64,
}

impl Clock {
    fn local_ms(&self, real_us: u64) -> u64 {
        ((self.offset_us + real_us as f64 * self.rate) / 1000.0) as u64
    }

    /// The first real time at which the local clock shows `local_ms`.
    fn real_us_at(&self, local_ms: u64) -> f64 {
        (local_ms as f64 * 1000.0 - self.offset_us) / self.rate
    }
}

/// The simulated state machine: what a replica applied, as a position and a
/// running digest of the values.
#[derive(Clone, Debug)]
struct Machine {
    apply_next: Slot,
    digest: u64,
    membership: Membership,
}

struct SimNode {
    id: NodeId,
    core: Option<Node>,
    incarnation: u64,
    durable: DurableState,
    machine: Machine,
    unsynced: VecDeque<Persist>,
    /// The disk syncs as the replica's log writer does, by group commit:
    /// one sync at a time, each covering every write issued before it
    /// started. When the sync under way ends.
    sync_running_until_us: u64,
    /// When the sync queued behind it ends: every write issued meanwhile
    /// joins it.
    sync_queued_until_us: Option<u64>,
    clock: Clock,
    lease_believed_until_us: f64,
    snapshot_in_flight: bool,
    reads: HashMap<u64, PendingRead>,
}

/// A read a simulated client is waiting for.
#[derive(Clone, Copy, Debug)]
struct PendingRead {
    /// Every slot known chosen anywhere when the read began: its index must
    /// cover it.
    required: Slot,
    issued_us: u64,
    /// A read of the settled cluster, which must be served.
    probe: bool,
}

impl SimNode {
    /// When a write issued at `now_us` is durable, if a sync that starts
    /// now takes `fsync_us`.
    fn sync_done_for_write_at(&mut self, now_us: u64, fsync_us: u64) -> u64 {
        if let Some(queued) = self.sync_queued_until_us {
            if now_us >= self.sync_running_until_us {
                // The queued sync has started: it runs now.
                self.sync_running_until_us = queued;
                self.sync_queued_until_us = None;
            }
        }
        if now_us >= self.sync_running_until_us {
            self.sync_running_until_us = now_us + fsync_us;
            return self.sync_running_until_us;
        }
        *self
            .sync_queued_until_us
            .get_or_insert(self.sync_running_until_us + fsync_us)
    }
}

/// The outcome of a run, for the test's summary line.
#[derive(Debug, Default)]
pub struct Report {
    pub events: u64,
    pub chosen_slots: u64,
    pub commands_chosen: u64,
    pub reads_served: u64,
    pub crashes: u64,
    pub snapshots: u64,
    pub elections: u64,
    pub disk_losses: u64,
    /// The longest a command waited to be chosen, counted from the heal or
    /// its proposal, whichever was later.
    pub max_command_wait_after_heal_us: u64,
    /// The longest a read waited for its outcome, counted likewise.
    pub max_read_wait_after_heal_us: u64,
}

pub struct Simulation {
    params: Params,
    rng: ChaCha8Rng,
    now_us: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Event>,
    next_event: u64,
    nodes: Vec<SimNode>,
    membership: Membership,
    blocked: HashSet<(usize, usize)>,
    loss: f64,
    duplicate: f64,
    healed: bool,
    /// `(slot, ballot)` -> the value accepted and the mask of acceptors that
    /// made it durable.
    accepted: HashMap<(Slot, Ballot), (Value, u64)>,
    /// Values a majority durably accepted under one ballot, per slot, at
    /// any time (acceptances later lost with a disk included): more than one
    /// only after a disk loss, and then never one that was learned.
    chosen: HashMap<Slot, Vec<Value>>,
    /// The value first learned (applied) at each slot; every later learner
    /// must agree.
    learned: HashMap<Slot, Value>,
    /// Whether a replica lost its disk during this run.
    disk_lost: bool,
    max_known_chosen: Slot,
    next_command: u64,
    /// Commands not chosen yet: when last proposed, and when first.
    pending_commands: BTreeMap<u64, (u64, u64)>,
    /// When the faults healed.
    healed_at_us: u64,
    /// Once every command is chosen and every replica caught up: the probe
    /// reads are out and no other reads are issued.
    settled: bool,
    /// Probe reads served, per replica.
    probes_served: Vec<bool>,
    /// Once the probes are served: the leader's ballot and when the run
    /// ends, if leadership stays put until then.
    stable: Option<(Ballot, u64)>,
    probe_attempts: u64,
    commands_chosen: HashSet<u64>,
    next_read: u64,
    report: Report,
    leaders_seen: BTreeSet<Ballot>,
}

const TICK_US: u64 = 5_000;
/// Commands the simulated clients keep outstanding at most.
const MAX_OUTSTANDING_COMMANDS: usize = 64;
/// A client proposes a command again when it has not been chosen this long.
const RETRY_AFTER_US: u64 = 400_000;
/// Once faults heal, a command is chosen within this long of the heal or of
/// its proposal: a lease and the restart window for acceptors to promise
/// again, elections (pre-vote and phase 1) that may collide a few times,
/// a rejoining replica's catch-up, and a client's retry interval.
pub const COMMAND_BOUND_US: u64 = 3_000_000;
/// Once faults heal, a read is served or aborted within this long of the
/// heal or of its start: reads carry a 1 s deadline (on clocks up to 10%
/// slow), except those waiting for a new leader's barrier, which an elected
/// leader chooses within an election.
pub const READ_BOUND_US: u64 = 2_000_000;
/// How long a settled cluster's leader must keep leading, with its lease:
/// a few leases, so that a leader that stops renewing its lease, or a
/// follower that stops hearing heartbeats, shows.
pub const STABLE_US: u64 = 600_000;
/// A read at a settled cluster that is aborted is asked again this many
/// times before the replica counts as unable to serve reads.
const PROBE_ATTEMPTS: u64 = 20;

impl Simulation {
    pub fn new(params: Params) -> Simulation {
        let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
        let ids: Vec<NodeId> = (1..=params.nodes as NodeId).collect();
        let membership = Membership::new(&ids).expect("valid membership");
        let mut nodes = Vec::new();
        for &id in &ids {
            let drift = if params.max_drift > 0.0 {
                rng.random_range(-params.max_drift..params.max_drift)
            } else {
                0.0
            };
            let clock = Clock {
                offset_us: rng.random_range(0.0..1e9),
                rate: 1.0 + drift,
            };
            let durable = DurableState::bootstrap(membership.clone());
            let machine = Machine {
                apply_next: 0,
                digest: 0,
                membership: membership.clone(),
            };
            nodes.push(SimNode {
                id,
                core: None,
                incarnation: 0,
                durable,
                machine,
                unsynced: VecDeque::new(),
                sync_running_until_us: 0,
                sync_queued_until_us: None,
                clock,
                lease_believed_until_us: f64::NEG_INFINITY,
                snapshot_in_flight: false,
                reads: HashMap::new(),
            });
        }
        let mut chosen = HashMap::new();
        chosen.insert(0, vec![membership.to_value()]);
        let mut learned = HashMap::new();
        learned.insert(0, membership.to_value());
        let mut sim = Simulation {
            loss: params.loss,
            duplicate: params.duplicate,
            params,
            rng,
            now_us: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            next_event: 0,
            nodes,
            membership,
            blocked: HashSet::new(),
            healed: false,
            accepted: HashMap::new(),
            chosen,
            learned,
            disk_lost: false,
            max_known_chosen: 0,
            next_command: 1,
            pending_commands: BTreeMap::new(),
            healed_at_us: u64::MAX,
            settled: false,
            probes_served: Vec::new(),
            probe_attempts: 0,
            stable: None,
            commands_chosen: HashSet::new(),
            next_read: 1,
            report: Report::default(),
            leaders_seen: BTreeSet::new(),
        };
        for index in 0..sim.nodes.len() {
            sim.start_node(index);
        }
        sim
    }

    fn fail(&self, what: &str) -> ! {
        if std::env::var("SYNOD_SIM_DUMP").is_ok() {
            for node in &self.nodes {
                eprintln!("{:#?}", node.core);
            }
        }
        panic!(
            "simulation failed at {} us: {what}\n  replay: SYNOD_SEED={} ({:?}, {} nodes)",
            self.now_us, self.params.seed, self.params.mix, self.params.nodes
        );
    }

    fn schedule(&mut self, at_us: u64, event: Event) {
        let id = self.next_event;
        self.next_event += 1;
        self.events.insert(id, event);
        self.queue.push(Reverse((at_us, id)));
    }

    fn start_node(&mut self, index: usize) {
        let params = self.params.clone();
        let now_ms = self.nodes[index].clock.local_ms(self.now_us);
        let node = &mut self.nodes[index];
        node.incarnation += 1;
        node.unsynced.clear();
        node.snapshot_in_flight = false;
        node.reads.clear();
        let mut config = params.config(node.id);
        config.seed ^= node.incarnation.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let core = match Node::new(
            config,
            node.durable.clone(),
            node.machine.apply_next,
            now_ms,
        ) {
            Ok(core) => core,
            Err(error) => self.fail(&format!("restart of node {} refused: {error}", index + 1)),
        };
        let node = &mut self.nodes[index];
        node.core = Some(core);
        let incarnation = node.incarnation;
        let first_tick = self.now_us + self.rng.random_range(0..TICK_US);
        self.schedule(
            first_tick,
            Event::Tick {
                node: index,
                incarnation,
            },
        );
        self.drain(index);
    }

    fn crash(&mut self, index: usize) {
        if self.nodes[index].core.is_none() {
            return;
        }
        self.report.crashes += 1;
        if std::env::var("SYNOD_SIM_TRACE").is_ok() {
            eprintln!("{} node {} CRASHES", self.now_us, index + 1);
        }
        // A random prefix of the writes issued but not yet synced reached the
        // disk anyway; the rest is lost.
        let unsynced: Vec<Persist> = self.nodes[index].unsynced.drain(..).collect();
        let survive = self.rng.random_range(0..=unsynced.len());
        for batch in unsynced.into_iter().take(survive) {
            self.make_durable(index, &batch);
        }
        let node = &mut self.nodes[index];
        node.core = None;
        node.incarnation += 1;
        node.lease_believed_until_us = node.lease_believed_until_us.min(self.now_us as f64);
    }

    /// Records a batch as durable on `index`'s disk and in the chosen-value
    /// ground truth.
    fn make_durable(&mut self, index: usize, batch: &Persist) {
        let bit = 1u64 << index;
        for entry in &batch.accepted {
            let key = (entry.slot, entry.ballot);
            let quorum;
            {
                let record = self
                    .accepted
                    .entry(key)
                    .or_insert_with(|| (entry.value.clone(), 0));
                if record.0 != entry.value {
                    let message = format!(
                        "two values accepted for slot {} under ballot {}",
                        entry.slot, entry.ballot
                    );
                    self.fail(&message);
                }
                record.1 |= bit;
                quorum = self.membership.is_quorum(record.1);
            }
            if quorum {
                let values = self.chosen.entry(entry.slot).or_default();
                if values.is_empty() {
                    self.report.chosen_slots += 1;
                }
                if !values.contains(&entry.value) {
                    let earlier = values.first().cloned();
                    values.push(entry.value.clone());
                    if let Some(earlier) = earlier {
                        // Without a lost disk, acceptances are permanent and
                        // two chosen values are a violation outright. After
                        // one, an acceptance the lost replica made can pair
                        // with a later one that nobody could ever learn; it
                        // is a violation only if it contradicts a learned value.
                        let learned = self.learned.get(&entry.slot);
                        if !self.disk_lost || learned.is_some_and(|l| *l != entry.value) {
                            let message = format!(
                                "slot {} chosen twice: {:?} and then {:?} under ballot {}",
                                entry.slot, earlier, entry.value, entry.ballot
                            );
                            self.fail(&message);
                        }
                    }
                }
            }
        }
        self.nodes[index].durable.apply(batch);
    }

    /// Takes the node's outputs and carries them out, as a driver would.
    fn drain(&mut self, index: usize) {
        loop {
            let Some(core) = self.nodes[index].core.as_mut() else {
                return;
            };
            if !core.has_ready() {
                break;
            }
            let ready = core.ready();
            self.carry_out(index, ready);
        }
        self.check_node(index);
    }

    fn carry_out(&mut self, index: usize, ready: Ready) {
        let Ready {
            persist,
            messages,
            chosen,
            reads,
            snapshot,
            refusals: _,
        } = ready;
        if let Some(batch) = persist {
            let fsync = self
                .rng
                .random_range(self.params.fsync_min_us..=self.params.fsync_max_us);
            let done = self.nodes[index].sync_done_for_write_at(self.now_us, fsync);
            let incarnation = self.nodes[index].incarnation;
            let id = batch.id;
            let chance = if batch.promised.is_some() {
                self.params.sync_crash * 10.0
            } else {
                self.params.sync_crash
            };
            if !self.healed && chance > 0.0 && self.rng.random_bool(chance.min(1.0)) {
                let at = self
                    .rng
                    .random_range(self.now_us..done.max(self.now_us + 1));
                self.schedule(
                    at,
                    Event::Crash {
                        node: index,
                        incarnation,
                    },
                );
            }
            self.nodes[index].unsynced.push_back(batch);
            self.schedule(
                done,
                Event::Persisted {
                    node: index,
                    incarnation,
                    id,
                },
            );
        }
        for envelope in messages {
            self.transmit(envelope);
        }
        for entry in chosen {
            let node = &mut self.nodes[index];
            if entry.slot != node.machine.apply_next {
                let message = format!(
                    "node {} applied slot {} but expected slot {}",
                    index + 1,
                    entry.slot,
                    node.machine.apply_next
                );
                self.fail(&message);
            }
            let accepted_by_majority = self
                .chosen
                .get(&entry.slot)
                .is_some_and(|values| values.contains(&entry.value));
            if !accepted_by_majority {
                let message = format!(
                    "node {} applied {:?} at slot {}, which no majority accepted",
                    index + 1,
                    entry.value,
                    entry.slot
                );
                self.fail(&message);
            }
            match self.learned.get(&entry.slot) {
                Some(value) if *value != entry.value => {
                    let message = format!(
                        "node {} applied {:?} at slot {} but {:?} was learned there before",
                        index + 1,
                        entry.value,
                        entry.slot,
                        value
                    );
                    self.fail(&message);
                }
                Some(_) => {}
                None => {
                    self.learned.insert(entry.slot, entry.value.clone());
                }
            }

            let node = &mut self.nodes[index];
            node.machine.apply_next += 1;
            node.machine.digest = node
                .machine
                .digest
                .rotate_left(7)
                .wrapping_add(entry.slot.wrapping_mul(31));
            if let Value::Commands(batch) = &entry.value {
                for command in batch.commands.iter() {
                    if command.is_empty() {
                        // A rejoining replica's nudge.
                        continue;
                    }
                    let id = u64::from_le_bytes(command[..8].try_into().expect("8-byte command"));
                    if self.commands_chosen.insert(id) {
                        self.report.commands_chosen += 1;
                    }
                    if let Some((_, first)) = self.pending_commands.remove(&id) {
                        if self.healed {
                            let waited = self.now_us - first.max(self.healed_at_us);
                            let longest = &mut self.report.max_command_wait_after_heal_us;
                            *longest = (*longest).max(waited);
                        }
                    }
                }
            }
            if let Some(membership) = Membership::from_value(&entry.value) {
                self.nodes[index].machine.membership = membership;
            }
        }
        let applied = self.nodes[index].machine.apply_next.saturating_sub(1);
        if applied.is_multiple_of(4) {
            if let Some(core) = self.nodes[index].core.as_mut() {
                core.compact(applied);
            }
        }
        for outcome in reads {
            let id = match outcome {
                ReadOutcome::Ready { id, .. } | ReadOutcome::Aborted { id } => id,
            };
            if let Some(read) = self.nodes[index].reads.get(&id) {
                if self.healed {
                    let waited = self.now_us - read.issued_us.max(self.healed_at_us);
                    let longest = &mut self.report.max_read_wait_after_heal_us;
                    *longest = (*longest).max(waited);
                }
            }
            if let ReadOutcome::Ready { id, read_index } = outcome {
                if let Some(read) = self.nodes[index].reads.remove(&id) {
                    if read_index < read.required {
                        let message = format!(
                            "read {id} at node {} got index {read_index} but slot {} was known chosen when it began",
                            index + 1,
                            read.required
                        );
                        self.fail(&message);
                    }
                    self.report.reads_served += 1;
                    if read.probe {
                        self.probes_served[index] = true;
                    }
                }
            } else if let ReadOutcome::Aborted { id } = outcome {
                let read = self.nodes[index].reads.remove(&id);
                if read.is_some_and(|read| read.probe) {
                    self.probe_attempts += 1;
                    if self.probe_attempts > PROBE_ATTEMPTS * self.nodes.len() as u64 {
                        let message = format!(
                            "node {} aborts every read of the settled cluster ({} probes aborted)",
                            index + 1,
                            self.probe_attempts
                        );
                        self.fail(&message);
                    }
                    self.schedule(self.now_us + 50_000, Event::Probe { node: index });
                }
            }
        }
        if let Some(request) = snapshot {
            let Some(from) = self.nodes.iter().position(|n| n.id == request.from) else {
                self.fail("snapshot requested from an unknown node");
            };
            if !self.nodes[index].snapshot_in_flight {
                self.nodes[index].snapshot_in_flight = true;
                let delay = self.rng.random_range(1_000..20_000);
                let incarnation = self.nodes[index].incarnation;
                self.schedule(
                    self.now_us + delay,
                    Event::SnapshotArrives {
                        node: index,
                        incarnation,
                        from,
                    },
                );
            }
        }
    }

    fn transmit(&mut self, envelope: Envelope) {
        if std::env::var("SYNOD_SIM_TRACE").is_ok() {
            eprintln!("{} {:?}", self.now_us, envelope);
        }
        let from = (envelope.from - 1) as usize;
        let to = (envelope.to - 1) as usize;
        if self.blocked.contains(&(from, to)) {
            return;
        }
        if self.loss > 0.0 && self.rng.random_bool(self.loss) {
            return;
        }
        let copies = if self.duplicate > 0.0 && self.rng.random_bool(self.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay =
                if self.params.long_delay > 0.0 && self.rng.random_bool(self.params.long_delay) {
                    self.rng.random_range(20_000..self.params.long_delay_max_us)
                } else {
                    self.rng
                        .random_range(self.params.delay_min_us..=self.params.delay_max_us)
                };
            self.schedule(self.now_us + delay, Event::Deliver(envelope.clone()));
        }
    }

    /// Checks the lease invariant and records what the node knows chosen.
    fn check_node(&mut self, index: usize) {
        let Some(core) = self.nodes[index].core.as_ref() else {
            return;
        };
        self.max_known_chosen = self.max_known_chosen.max(core.chosen_through());
        if core.role() == Role::Leader {
            self.leaders_seen.insert(core.promised());
        }
        let local_now = self.nodes[index].clock.local_ms(self.now_us);
        let now = self.now_us as f64;
        if core.has_lease(local_now) {
            let until = self.nodes[index].clock.real_us_at(core.lease_until_ms());
            for (other, node) in self.nodes.iter().enumerate() {
                if other != index && node.lease_believed_until_us > now {
                    let message = format!(
                        "node {} holds a lease while node {} believes in its lease until {} us",
                        index + 1,
                        other + 1,
                        node.lease_believed_until_us
                    );
                    self.fail(&message);
                }
            }
            let node = &mut self.nodes[index];
            node.lease_believed_until_us = node.lease_believed_until_us.max(until);
        } else {
            let node = &mut self.nodes[index];
            node.lease_believed_until_us = node.lease_believed_until_us.min(now);
        }
    }

    /// Whether every replica but `index` has its disk and votes: losing a
    /// second disk before the first rejoined could lose chosen values, which
    /// no protocol survives.
    fn nobody_else_joining(&self, index: usize) -> bool {
        self.nodes.iter().enumerate().all(|(i, node)| {
            i == index
                || (!node.durable.joining
                    && node.core.as_ref().is_none_or(|core| !core.is_joining()))
        })
    }

    /// The crashed replica's disk is gone: it restarts empty, rejoining, and
    /// its state machine starts from nothing.
    fn lose_disk(&mut self, index: usize) {
        if std::env::var("SYNOD_SIM_TRACE").is_ok() {
            eprintln!("{} node {} LOSES ITS DISK", self.now_us, index + 1);
        }
        self.report.disk_losses += 1;
        self.disk_lost = true;
        let membership = self.membership.clone();
        let node = &mut self.nodes[index];
        node.durable = DurableState::rejoin(membership.clone());
        node.machine = Machine {
            apply_next: 0,
            digest: 0,
            membership,
        };
    }

    fn live_nodes(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].core.is_some())
            .collect()
    }

    fn propose_to(&mut self, index: usize, ids: Vec<u64>) {
        let now_ms = self.nodes[index].clock.local_ms(self.now_us);
        let Some(core) = self.nodes[index].core.as_mut() else {
            return;
        };
        let commands = ids
            .iter()
            .map(|id| Bytes::copy_from_slice(&id.to_le_bytes()))
            .collect();
        match core.propose(now_ms, commands) {
            Ok(()) | Err(ProposeError::NoLeader(_)) | Err(ProposeError::Overloaded(_)) => {}
            Err(error) => self.fail(&format!("unexpected propose error {error}")),
        }
        self.drain(index);
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Deliver(envelope) => {
                let from = (envelope.from - 1) as usize;
                let to = (envelope.to - 1) as usize;
                if self.blocked.contains(&(from, to)) {
                    return;
                }
                let now_ms = self.nodes[to].clock.local_ms(self.now_us);
                if let Some(core) = self.nodes[to].core.as_mut() {
                    core.step(now_ms, envelope);
                    self.drain(to);
                }
            }
            Event::Persisted {
                node,
                incarnation,
                id,
            } => {
                if self.nodes[node].incarnation != incarnation {
                    return;
                }
                while self.nodes[node]
                    .unsynced
                    .front()
                    .is_some_and(|batch| batch.id <= id)
                {
                    if let Some(batch) = self.nodes[node].unsynced.pop_front() {
                        self.make_durable(node, &batch);
                    }
                }
                let now_ms = self.nodes[node].clock.local_ms(self.now_us);
                if let Some(core) = self.nodes[node].core.as_mut() {
                    core.persisted(now_ms, id);
                    self.drain(node);
                }
            }
            Event::Tick { node, incarnation } => {
                if self.nodes[node].incarnation != incarnation {
                    return;
                }
                let now_ms = self.nodes[node].clock.local_ms(self.now_us);
                if let Some(core) = self.nodes[node].core.as_mut() {
                    core.tick(now_ms);
                    self.drain(node);
                }
                self.schedule(self.now_us + TICK_US, Event::Tick { node, incarnation });
            }
            Event::SnapshotArrives {
                node,
                incarnation,
                from,
            } => {
                if self.nodes[node].incarnation != incarnation {
                    return;
                }
                self.nodes[node].snapshot_in_flight = false;
                if self.nodes[from].core.is_none() {
                    return;
                }
                let source = self.nodes[from].machine.clone();
                if source.apply_next <= self.nodes[node].machine.apply_next {
                    return;
                }
                let through = source.apply_next - 1;
                self.report.snapshots += 1;
                self.nodes[node].machine = source.clone();
                // Installing a snapshot is durable before the core hears of it.
                let batch = Persist {
                    chosen_through: Some(through),
                    compact_below: Some(through + 1),
                    membership: Some(source.membership.clone()),
                    ..Persist::default()
                };
                self.nodes[node].durable.apply(&batch);
                let now_ms = self.nodes[node].clock.local_ms(self.now_us);
                if let Some(core) = self.nodes[node].core.as_mut() {
                    core.snapshot_installed(now_ms, through, source.membership);
                    self.drain(node);
                }
            }
            Event::Propose => {
                let live = self.live_nodes();
                // Clients keep a bounded number of commands outstanding.
                let room = self.pending_commands.len() < MAX_OUTSTANDING_COMMANDS;
                if !live.is_empty() && !self.healed && room {
                    let index = live[self.rng.random_range(0..live.len())];
                    let count = self.rng.random_range(1..=4);
                    let mut ids = Vec::new();
                    for _ in 0..count {
                        let id = self.next_command;
                        self.next_command += 1;
                        self.pending_commands.insert(id, (self.now_us, self.now_us));
                        ids.push(id);
                    }
                    self.propose_to(index, ids);
                }
                if !self.healed {
                    let next =
                        self.now_us + self.rng.random_range(1..=2 * self.params.propose_every_us);
                    self.schedule(next, Event::Propose);
                }
            }
            Event::Retry => {
                // A client re-proposes commands not chosen after a while, to
                // the leader a live replica names, or to any live replica.
                self.check_request_bounds();
                let stale: Vec<u64> = self
                    .pending_commands
                    .iter()
                    .filter(|(_, &(since, _))| since + RETRY_AFTER_US <= self.now_us)
                    .map(|(&id, _)| id)
                    .take(32)
                    .collect();
                let live = self.live_nodes();
                if !stale.is_empty() && !live.is_empty() {
                    let asked = live[self.rng.random_range(0..live.len())];
                    let target = self.nodes[asked]
                        .core
                        .as_ref()
                        .and_then(|core| core.leader())
                        .map(|leader| (leader - 1) as usize)
                        .filter(|&leader| self.nodes[leader].core.is_some())
                        .unwrap_or(asked);
                    for id in &stale {
                        if let Some((since, _)) = self.pending_commands.get_mut(id) {
                            *since = self.now_us;
                        }
                    }
                    self.propose_to(target, stale);
                }
                self.schedule(self.now_us + 50_000, Event::Retry);
            }
            Event::Read => {
                if self.settled {
                    return;
                }
                let live = self.live_nodes();
                if !live.is_empty() {
                    let index = live[self.rng.random_range(0..live.len())];
                    self.issue_read(index, false);
                }
                let next = self.now_us + self.rng.random_range(1..=2 * self.params.read_every_us);
                self.schedule(next, Event::Read);
            }
            Event::Probe { node } => self.issue_read(node, true),
            Event::Fault => {
                if self.healed {
                    return;
                }
                self.inject_fault();
                let next = self.now_us + self.rng.random_range(50_000..400_000);
                self.schedule(next, Event::Fault);
            }
            Event::Crash { node, incarnation } => {
                if self.nodes[node].incarnation == incarnation && !self.healed {
                    self.crash(node);
                    let down = self.rng.random_range(5_000..300_000);
                    self.schedule(self.now_us + down, Event::Restart { node });
                }
            }
            Event::Restart { node } => {
                if std::env::var("SYNOD_SIM_TRACE").is_ok() {
                    eprintln!("{} node {} RESTARTS", self.now_us, node + 1);
                }
                if self.nodes[node].core.is_none() {
                    self.start_node(node);
                }
            }
            Event::Heal => {
                self.healed = true;
                self.healed_at_us = self.now_us;
                self.blocked.clear();
                self.loss = 0.0;
                self.duplicate = 0.0;
                for index in 0..self.nodes.len() {
                    if self.nodes[index].core.is_none() {
                        self.start_node(index);
                    }
                }
            }
        }
    }

    fn issue_read(&mut self, index: usize, probe: bool) {
        let id = self.next_read;
        self.next_read += 1;
        let read = PendingRead {
            required: self.max_known_chosen,
            issued_us: self.now_us,
            probe,
        };
        self.nodes[index].reads.insert(id, read);
        let now_ms = self.nodes[index].clock.local_ms(self.now_us);
        if let Some(core) = self.nodes[index].core.as_mut() {
            core.read(now_ms, id);
            self.drain(index);
        }
    }

    /// Once faults healed, every command and every read is answered in time
    /// (see [`COMMAND_BOUND_US`] and [`READ_BOUND_US`]).
    fn check_request_bounds(&self) {
        if !self.healed {
            return;
        }
        let now = self.now_us;
        for (&id, &(_, first)) in &self.pending_commands {
            let from = first.max(self.healed_at_us);
            if now > from + COMMAND_BOUND_US {
                let message = format!(
                    "command {id}, first proposed at {first} us, not chosen {} ms after the heal at {} us or its proposal\n  {}",
                    (now - from) / 1000,
                    self.healed_at_us,
                    self.replica_states()
                );
                self.fail(&message);
            }
        }
        for (index, node) in self.nodes.iter().enumerate() {
            for (&id, read) in &node.reads {
                let from = read.issued_us.max(self.healed_at_us);
                if now > from + READ_BOUND_US {
                    let message = format!(
                        "read {id} at node {}, issued at {} us, neither served nor aborted {} ms after the heal at {} us or its start",
                        index + 1,
                        read.issued_us,
                        (now - from) / 1000,
                        self.healed_at_us
                    );
                    self.fail(&message);
                }
            }
        }
    }

    /// In a settled cluster nobody campaigns and the leader leads under
    /// `ballot`; at the end (`with_lease`), it holds its lease and every
    /// replica that lost its disk votes again.
    fn check_stable_leadership(&self, ballot: Ballot, with_lease: bool) {
        for (index, node) in self.nodes.iter().enumerate() {
            let Some(core) = node.core.as_ref() else {
                continue;
            };
            if with_lease && core.is_joining() {
                let message = format!(
                    "node {} is still rejoining, not voting, in a settled cluster: {:?}",
                    index + 1,
                    core.join_progress()
                );
                self.fail(&message);
            }
            let role = core.role();
            if matches!(role, Role::PreCandidate | Role::Candidate) {
                let message = format!(
                    "node {} became {role:?} in a settled cluster led under {ballot}",
                    index + 1
                );
                self.fail(&message);
            }
            if role == Role::Leader {
                let local_now = node.clock.local_ms(self.now_us);
                let lease = core.has_lease(local_now);
                if core.promised() != ballot || (with_lease && !lease) {
                    let message = format!(
                        "node {} leads under {} (lease {}) in a cluster settled under {ballot}",
                        index + 1,
                        core.promised(),
                        lease
                    );
                    self.fail(&message);
                }
            }
        }
        if self.current_leader().is_none() {
            self.fail(&format!(
                "the leader under {ballot} stepped down in a settled cluster"
            ));
        }
    }

    fn current_leader(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| {
            self.nodes[i]
                .core
                .as_ref()
                .is_some_and(|core| core.role() == Role::Leader)
        })
    }

    fn inject_fault(&mut self) {
        let n = self.nodes.len();
        let mut choices = Vec::new();
        if self.params.crashes {
            choices.push(0);
        }
        if self.params.partitions {
            choices.push(1);
            choices.push(2);
        }
        if self.params.leader_isolation {
            choices.push(3);
        }
        choices.push(4);
        let choice = choices[self.rng.random_range(0..choices.len())];
        match choice {
            0 => {
                // Crash a replica; keep at most a minority down unless the
                // dice say otherwise, and restart it later.
                let victim = self
                    .current_leader()
                    .filter(|_| self.rng.random_bool(0.5))
                    .unwrap_or_else(|| self.rng.random_range(0..n));
                self.crash(victim);
                if self.params.disk_loss > 0.0
                    && self.rng.random_bool(self.params.disk_loss)
                    && self.nobody_else_joining(victim)
                {
                    self.lose_disk(victim);
                }
                let down = self.rng.random_range(
                    10_000..if self.params.mix == Mix::Snapshots {
                        1_500_000
                    } else {
                        600_000
                    },
                );
                self.schedule(self.now_us + down, Event::Restart { node: victim });
            }
            1 => {
                // Split into two sides, in both directions.
                self.blocked.clear();
                let side: Vec<bool> = (0..n).map(|_| self.rng.random_bool(0.5)).collect();
                for a in 0..n {
                    for b in 0..n {
                        if side[a] != side[b] {
                            self.blocked.insert((a, b));
                        }
                    }
                }
            }
            2 => {
                // Cut some links in one direction only.
                self.blocked.clear();
                for a in 0..n {
                    for b in 0..n {
                        if a != b && self.rng.random_bool(0.25) {
                            self.blocked.insert((a, b));
                        }
                    }
                }
            }
            3 => {
                // Isolate the leader, sometimes only one way.
                self.blocked.clear();
                if let Some(leader) = self.current_leader() {
                    let inbound = self.rng.random_bool(0.7);
                    let outbound = !inbound || self.rng.random_bool(0.7);
                    for other in 0..n {
                        if other != leader {
                            if outbound {
                                self.blocked.insert((leader, other));
                            }
                            if inbound {
                                self.blocked.insert((other, leader));
                            }
                        }
                    }
                }
            }
            _ => self.blocked.clear(),
        }
    }

    /// Runs the safety phase, heals everything, and requires progress.
    pub fn run(mut self) -> Report {
        self.schedule(0, Event::Propose);
        self.schedule(50_000, Event::Retry);
        self.schedule(10_000, Event::Read);
        if self.params.crashes
            || self.params.partitions
            || self.params.leader_isolation
            || self.params.loss > 0.0
        {
            let first_fault = self.rng.random_range(100_000..400_000);
            self.schedule(first_fault, Event::Fault);
        }
        let heal_at = self.params.safety_ms * 1000;
        self.schedule(heal_at, Event::Heal);
        let deadline = heal_at + self.params.liveness_ms * 1000;
        let mut probe: Option<u64> = None;
        while let Some(Reverse((at, id))) = self.queue.pop() {
            if at > deadline {
                break;
            }
            self.now_us = at;
            let Some(event) = self.events.remove(&id) else {
                continue;
            };
            self.report.events += 1;
            self.handle(event);
            if self.healed {
                if probe.is_none() {
                    // One fresh command after healing must be chosen too.
                    let id = self.next_command;
                    self.next_command += 1;
                    self.pending_commands.insert(id, (0, self.now_us));
                    probe = Some(id);
                }
                if self.pending_commands.is_empty() && self.caught_up() {
                    if !self.settled {
                        // Settled: every replica must now serve a read.
                        self.settled = true;
                        self.probes_served = vec![false; self.nodes.len()];
                        for index in 0..self.nodes.len() {
                            self.issue_read(index, true);
                        }
                    }
                    let reads_done = self.nodes.iter().all(|node| node.reads.is_empty());
                    if reads_done && self.probes_served.iter().all(|&served| served) {
                        match self.stable {
                            None => {
                                let Some(leader) = self.current_leader() else {
                                    self.fail("no leader once the probe reads were served");
                                };
                                let ballot = self.nodes[leader].core.as_ref().map(Node::promised);
                                let ballot = ballot.unwrap_or(Ballot::ZERO);
                                self.stable = Some((ballot, self.now_us + STABLE_US));
                            }
                            Some((ballot, until)) => {
                                let at_end = self.now_us >= until;
                                self.check_stable_leadership(ballot, at_end);
                                if at_end {
                                    self.check_request_bounds();
                                    self.report.elections = self.leaders_seen.len() as u64;
                                    return self.report;
                                }
                            }
                        }
                    }
                }
            }
        }
        let leader = self.current_leader();
        let reads: usize = self.nodes.iter().map(|node| node.reads.len()).sum();
        let message = format!(
            "no progress within {} ms after healing: leader {:?}, {} commands pending (first {:?}), {reads} reads unanswered, probe reads served {:?}, max chosen {}\n  {}",
            self.params.liveness_ms,
            leader.map(|l| l + 1),
            self.pending_commands.len(),
            self.pending_commands.keys().next(),
            self.probes_served,
            self.max_known_chosen,
            self.replica_states()
        );
        self.fail(&message);
    }

    /// One line per replica: what it applied and what its core reports.
    fn replica_states(&self) -> String {
        let lines: Vec<String> = self
            .nodes
            .iter()
            .map(|node| {
                format!(
                    "node {}: applied {}, {:?}, joining {:?}",
                    node.id,
                    node.machine.apply_next,
                    node.core.as_ref().map(|c| c.status()),
                    node.core.as_ref().and_then(|c| c.join_progress()),
                )
            })
            .collect();
        lines.join("\n  ")
    }

    fn caught_up(&self) -> bool {
        let Some(leader) = self.current_leader() else {
            return false;
        };
        let Some(core) = self.nodes[leader].core.as_ref() else {
            return false;
        };
        let target = core.chosen_through();
        self.nodes
            .iter()
            .all(|node| node.machine.apply_next > target)
    }
}

/// Runs the simulation drawn from `seed`.
pub fn run_seed(seed: u64) -> Report {
    Simulation::new(Params::from_seed(seed)).run()
}
