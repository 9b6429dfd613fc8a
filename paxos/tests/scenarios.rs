//! Scenario scripts for the Paxos core, in the manner of etcd raft's
//! `testdata/`: each file under `tests/scenarios/` is a list of commands,
//! each followed by `----` and the output it must produce (every message
//! sent, every write, every applied entry, every read outcome). A change of
//! behaviour shows up as a readable diff. After a deliberate change, rewrite
//! the expected outputs with `SYNOD_REWRITE=1 cargo test -p synod-paxos --test
//! scenarios` and review the diff.
//!
//! Commands (node ids are 1-based; time is one global clock in ms):
//! - `cluster N`: N fresh replicas at time 0.
//! - `tick MS [NODE...]`: set the clock to MS and tick the nodes (all by default).
//! - `stabilize`: repeatedly take every node's outputs (persisting at once,
//!   applying, installing requested snapshots) and deliver every message,
//!   until nothing moves.
//! - `round`: one such pass: take outputs once, deliver messages once.
//! - `propose NODE CMD...`: propose commands at a node.
//! - `read NODE ID`: ask a node for a linearizable read.
//! - `partition A.. | B..`: cut every link between the two groups; `heal`.
//! - `hold FROM TO [KIND]`: keep messages on that one link (only those of
//!   that kind, such as `Chosen`, if given) in the network, so they arrive
//!   late; `release FROM TO` delivers them on the next pass.
//! - `crash NODE`, `restart NODE`: lose volatile state, start again from disk.
//! - `lose-disk NODE`: after a crash, the disk is gone: the replica restarts
//!   empty and rejoins.
//! - `compact NODE THROUGH`: report applied state durable through a slot.
//! - `status`: one line per live node.

use std::collections::{BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::path::Path;

use bytes::Bytes;
use synod_paxos::{Config, DurableState, Envelope, Membership, Message, Node, ReadOutcome, Value};

struct Replica {
    core: Option<Node>,
    durable: DurableState,
    apply_next: u64,
    starts: u64,
}

struct Harness {
    replicas: Vec<Replica>,
    membership: Membership,
    in_flight: VecDeque<Envelope>,
    blocked: BTreeSet<(u64, u64)>,
    /// Links (and message kinds, if given) whose messages are held.
    holding: BTreeSet<(u64, u64, Option<String>)>,
    held: Vec<Envelope>,
    now_ms: u64,
}

fn config(id: u64, start: u64) -> Config {
    let mut config = Config::new(id, 7 + start * 1000);
    config.heartbeat_interval_ms = 100;
    config.election_timeout_min_ms = 1000;
    config.election_timeout_max_ms = 2000;
    config.lease_ms = 1000;
    config.clock_drift_margin_ms = 100;
    config.retransmit_interval_ms = 200;
    config.max_slots_per_message = 4;
    config.log_retain_slots = 2;
    config
}

fn value(value: &Value) -> String {
    match value {
        Value::Noop => "noop".into(),
        Value::Membership(members) => format!("members{members:?}"),
        Value::Commands(batch) => {
            let names: Vec<String> = batch
                .commands
                .iter()
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect();
            format!("[{}]", names.join(" "))
        }
    }
}

fn values(values: &[Value]) -> String {
    values.iter().map(value).collect::<Vec<_>>().join(", ")
}

fn message(message: &Message) -> String {
    match message {
        Message::PreVote(m) => format!("PreVote round={} chosen={}", m.round, m.chosen_through),
        Message::PreVoteReply(m) => format!(
            "PreVoteReply round={} granted={} promised={}",
            m.round, m.granted, m.promised
        ),
        Message::Prepare(m) => format!("Prepare {} from={}", m.ballot, m.from_slot),
        Message::Promise(m) => {
            let entries: Vec<String> = m
                .entries
                .iter()
                .map(|e| format!("{}@{}={}", e.slot, e.ballot, value(&e.value)))
                .collect();
            format!(
                "Promise {} chosen={} start={} [{}]",
                m.ballot,
                m.chosen_through,
                m.log_start,
                entries.join(", ")
            )
        }
        Message::Reject(m) => format!("Reject {} promised={}", m.ballot, m.promised),
        Message::Accept(m) => format!(
            "Accept {} slots={}..{} chosen={} ({})",
            m.ballot,
            m.first_slot,
            m.first_slot + m.values.len() as u64 - 1,
            m.chosen_through,
            values(&m.values)
        ),
        Message::Accepted(m) => format!(
            "Accepted {} slots={}..{}",
            m.ballot,
            m.first_slot,
            m.first_slot + m.count - 1
        ),
        Message::Commit(m) => format!("Commit {} chosen={}", m.ballot, m.chosen_through),
        Message::Heartbeat(m) => format!(
            "Heartbeat {} chosen={} seq={}",
            m.ballot, m.chosen_through, m.sequence
        ),
        Message::HeartbeatAck(m) => format!(
            "HeartbeatAck {} seq={} chosen={}",
            m.ballot, m.sequence, m.chosen_through
        ),
        Message::CatchUp(m) => format!("CatchUp from={}", m.from_slot),
        Message::Chosen(m) => format!(
            "Chosen first={} chosen={} ({})",
            m.first_slot,
            m.chosen_through,
            values(&m.values)
        ),
        Message::SnapshotNeeded(m) => format!(
            "SnapshotNeeded start={} chosen={}",
            m.log_start, m.chosen_through
        ),
        Message::Forward(m) => {
            let names: Vec<String> = m
                .commands
                .iter()
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect();
            format!("Forward [{}]", names.join(" "))
        }
        Message::ReadIndex(_) => "ReadIndex".into(),
        Message::ReadIndexReply(m) => format!("ReadIndexReply index={:?}", m.read_index),
        Message::JoinProbe(_) => "JoinProbe".into(),
        Message::JoinProbeReply(m) => format!(
            "JoinProbeReply promised={} accepted<={} chosen={}",
            m.promised, m.highest_accepted_slot, m.chosen_through
        ),
    }
}

impl Harness {
    fn new(count: u64) -> Harness {
        let ids: Vec<u64> = (1..=count).collect();
        let membership = Membership::new(&ids).expect("membership");
        let mut harness = Harness {
            replicas: Vec::new(),
            membership: membership.clone(),
            in_flight: VecDeque::new(),
            blocked: BTreeSet::new(),
            holding: BTreeSet::new(),
            held: Vec::new(),
            now_ms: 0,
        };
        for _ in &ids {
            harness.replicas.push(Replica {
                core: None,
                durable: DurableState::bootstrap(membership.clone()),
                apply_next: 0,
                starts: 0,
            });
        }
        for id in ids {
            harness.start(id);
        }
        harness
    }

    fn start(&mut self, id: u64) {
        let now = self.now_ms;
        let replica = &mut self.replicas[(id - 1) as usize];
        replica.starts += 1;
        let core = Node::new(
            config(id, replica.starts),
            replica.durable.clone(),
            replica.apply_next,
            now,
        )
        .expect("start");
        replica.core = Some(core);
    }

    fn drain(&mut self, id: u64, out: &mut String) -> bool {
        let now = self.now_ms;
        let index = (id - 1) as usize;
        let Some(core) = self.replicas[index].core.as_mut() else {
            return false;
        };
        if !core.has_ready() {
            return false;
        }
        let ready = core.ready();
        if let Some(batch) = &ready.persist {
            let mut parts = Vec::new();
            if let Some(promised) = batch.promised {
                parts.push(format!("promised={promised}"));
            }
            if !batch.accepted.is_empty() {
                let slots: Vec<String> = batch
                    .accepted
                    .iter()
                    .map(|e| format!("{}@{}", e.slot, e.ballot))
                    .collect();
                parts.push(format!("accepted=[{}]", slots.join(" ")));
            }
            if !batch.learned.is_empty() {
                let slots: Vec<String> = batch.learned.iter().map(|e| e.slot.to_string()).collect();
                parts.push(format!("learned=[{}]", slots.join(" ")));
            }
            if let Some(chosen) = batch.chosen_through {
                parts.push(format!("chosen={chosen}"));
            }
            if let Some(joining) = batch.joining {
                parts.push(format!("joining={joining}"));
            }
            if let Some(below) = batch.compact_below {
                parts.push(format!("compact<{below}"));
            }
            if let Some(membership) = &batch.membership {
                parts.push(format!("members={:?}", membership.members()));
            }
            let _ = writeln!(out, "{id}: persist {}", parts.join(" "));
            self.replicas[index].durable.apply(batch);
            if let Some(core) = self.replicas[index].core.as_mut() {
                core.persisted(now, batch.id);
            }
        }
        for entry in &ready.chosen {
            let _ = writeln!(out, "{id}: apply {} {}", entry.slot, value(&entry.value));
            self.replicas[index].apply_next = entry.slot + 1;
        }
        for read in &ready.reads {
            match read {
                ReadOutcome::Ready {
                    id: read,
                    read_index,
                } => {
                    let _ = writeln!(out, "{id}: read {read} ready at index {read_index}");
                }
                ReadOutcome::Aborted { id: read } => {
                    let _ = writeln!(out, "{id}: read {read} aborted");
                }
            }
        }
        for refusal in &ready.refusals {
            let _ = writeln!(out, "{id}: {refusal}");
        }
        if let Some(request) = &ready.snapshot {
            let source = self.replicas[(request.from - 1) as usize].apply_next;
            let _ = writeln!(
                out,
                "{id}: snapshot from {} covering {} -> installed through {}",
                request.from,
                request.covering_through,
                source - 1
            );
            self.replicas[index].apply_next = source;
            self.replicas[index].durable.apply(&synod_paxos::Persist {
                chosen_through: Some(source - 1),
                compact_below: Some(source),
                ..Default::default()
            });
            let membership = self.membership.clone();
            if let Some(core) = self.replicas[index].core.as_mut() {
                core.snapshot_installed(now, source - 1, membership);
            }
        }
        for envelope in ready.messages {
            let _ = writeln!(
                out,
                "{}->{} {}",
                envelope.from,
                envelope.to,
                message(&envelope.message)
            );
            self.in_flight.push_back(envelope);
        }
        true
    }

    fn stabilize(&mut self, out: &mut String) {
        for _ in 0..10_000 {
            if !self.round(out) {
                return;
            }
        }
        panic!("stabilize did not settle");
    }

    /// Takes every node's outputs once and delivers the messages once.
    /// Returns whether anything moved.
    fn round(&mut self, out: &mut String) -> bool {
        {
            let mut moved = false;
            for id in 1..=self.replicas.len() as u64 {
                while self.drain(id, out) {
                    moved = true;
                }
            }
            let messages: Vec<Envelope> = self.in_flight.drain(..).collect();
            for envelope in messages {
                moved = true;
                if self.blocked.contains(&(envelope.from, envelope.to)) {
                    let _ = writeln!(out, "{}->{} dropped", envelope.from, envelope.to);
                    continue;
                }
                let kind = message(&envelope.message)
                    .split_whitespace()
                    .next()
                    .map(str::to_owned);
                let link = (envelope.from, envelope.to);
                if self.holding.contains(&(link.0, link.1, None))
                    || self.holding.contains(&(link.0, link.1, kind))
                {
                    let _ = writeln!(out, "{}->{} held", envelope.from, envelope.to);
                    self.held.push(envelope);
                    continue;
                }
                let now = self.now_ms;
                if let Some(core) = self.replicas[(envelope.to - 1) as usize].core.as_mut() {
                    core.step(now, envelope);
                }
            }
            moved
        }
    }

    fn status(&self, out: &mut String) {
        for (index, replica) in self.replicas.iter().enumerate() {
            match &replica.core {
                Some(core) => {
                    let _ = writeln!(
                        out,
                        "{}: {:?} leader={:?} promised={} chosen={} applied<{} log>={} lease={}",
                        index + 1,
                        core.role(),
                        core.leader(),
                        core.promised(),
                        core.chosen_through(),
                        core.apply_next(),
                        core.log_start(),
                        core.has_lease(self.now_ms),
                    );
                    // The rest of what the core reports about itself.
                    let status = core.status();
                    let mut detail = format!("   known={}", status.known_chosen_through);
                    if core.has_lease(self.now_ms) {
                        let _ = write!(detail, " lease<{}", core.lease_until_ms());
                    }
                    if status.role == synod_paxos::Role::Leader {
                        let peers: Vec<String> = status
                            .peers
                            .iter()
                            .map(|p| format!("{}:{}@{}", p.id, p.chosen_through, p.last_heard_ms))
                            .collect();
                        let _ = write!(
                            detail,
                            " pending={} inflight={} next={} peers=[{}]",
                            status.pending_commands,
                            status.inflight_slots,
                            status.next_slot,
                            peers.join(" ")
                        );
                    }
                    if !status.rejoining.is_empty() {
                        let _ = write!(detail, " rejoining={:?}", status.rejoining);
                    }
                    if let Some(progress) = core.join_progress() {
                        let _ = write!(detail, " joining={progress:?}");
                    }
                    let _ = writeln!(out, "{detail}");
                }
                None => {
                    let _ = writeln!(out, "{}: down", index + 1);
                }
            }
        }
    }

    fn run(&mut self, command: &str) -> String {
        let mut out = String::new();
        let words: Vec<&str> = command.split_whitespace().collect();
        let number = |i: usize| -> u64 { words[i].parse().expect("number") };
        match words[0] {
            "tick" => {
                self.now_ms = number(1);
                let ids: Vec<u64> = if words.len() > 2 {
                    (2..words.len()).map(number).collect()
                } else {
                    (1..=self.replicas.len() as u64).collect()
                };
                for id in ids {
                    let now = self.now_ms;
                    if let Some(core) = self.replicas[(id - 1) as usize].core.as_mut() {
                        core.tick(now);
                    }
                }
                self.stabilize(&mut out);
            }
            "stabilize" => self.stabilize(&mut out),
            "round" => {
                self.round(&mut out);
            }
            "propose" => {
                let id = number(1);
                let commands = words[2..]
                    .iter()
                    .map(|w| Bytes::copy_from_slice(w.as_bytes()))
                    .collect();
                let now = self.now_ms;
                if let Some(core) = self.replicas[(id - 1) as usize].core.as_mut() {
                    if let Err(error) = core.propose(now, commands) {
                        let _ = writeln!(out, "{id}: propose refused: {error}");
                    }
                }
            }
            "read" => {
                let id = number(1);
                let now = self.now_ms;
                if let Some(core) = self.replicas[(id - 1) as usize].core.as_mut() {
                    core.read(now, number(2));
                }
            }
            "partition" => {
                let bar = words
                    .iter()
                    .position(|w| *w == "|")
                    .expect("a | in partition");
                let left: Vec<u64> = (1..bar).map(number).collect();
                let right: Vec<u64> = (bar + 1..words.len()).map(number).collect();
                for &a in &left {
                    for &b in &right {
                        self.blocked.insert((a, b));
                        self.blocked.insert((b, a));
                    }
                }
            }
            "heal" => self.blocked.clear(),
            "hold" => {
                let kind = words.get(3).map(|kind| kind.to_string());
                self.holding.insert((number(1), number(2), kind));
            }
            "release" => {
                let link = (number(1), number(2));
                self.holding.retain(|(from, to, _)| (*from, *to) != link);
                let (released, kept) = std::mem::take(&mut self.held)
                    .into_iter()
                    .partition(|e: &Envelope| (e.from, e.to) == link);
                self.held = kept;
                self.in_flight.extend(released);
            }
            "crash" => {
                let id = number(1);
                self.replicas[(id - 1) as usize].core = None;
                self.in_flight.retain(|e| e.to != id);
            }
            "restart" => self.start(number(1)),
            "lose-disk" => {
                let id = number(1);
                let replica = &mut self.replicas[(id - 1) as usize];
                replica.durable = DurableState::rejoin(self.membership.clone());
                replica.apply_next = 0;
            }
            "compact" => {
                let id = number(1);
                if let Some(core) = self.replicas[(id - 1) as usize].core.as_mut() {
                    core.compact(number(2));
                }
                self.stabilize(&mut out);
            }
            "status" => self.status(&mut out),
            other => panic!("unknown command {other}"),
        }
        out
    }
}

fn run_file(path: &Path) {
    let text = std::fs::read_to_string(path).expect("scenario file");
    let mut harness: Option<Harness> = None;
    let mut rewritten = String::new();
    let mut mismatches = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim().is_empty() {
            if !rewritten.is_empty() && !rewritten.ends_with("\n\n") {
                rewritten.push('\n');
            }
            continue;
        }
        if line.starts_with('#') {
            rewritten.push_str(line);
            rewritten.push('\n');
            continue;
        }
        let command = line.trim();
        let mut expected = String::new();
        if lines.peek() == Some(&"----") {
            lines.next();
            while let Some(next) = lines.peek() {
                if next.trim().is_empty() {
                    break;
                }
                expected.push_str(next);
                expected.push('\n');
                lines.next();
            }
        }
        let actual = if let Some(count) = command.strip_prefix("cluster ") {
            harness = Some(Harness::new(count.trim().parse().expect("cluster size")));
            String::new()
        } else {
            harness
                .as_mut()
                .expect("a cluster command first")
                .run(command)
        };
        rewritten.push_str(command);
        rewritten.push_str("\n----\n");
        rewritten.push_str(&actual);
        rewritten.push('\n');
        if actual != expected {
            mismatches.push(format!(
                "{}: `{command}`\n--- expected\n{expected}--- actual\n{actual}",
                path.display()
            ));
        }
    }
    if std::env::var("SYNOD_REWRITE").is_ok_and(|v| v == "1") {
        std::fs::write(path, rewritten).expect("rewrite scenario");
        return;
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

fn scenario(name: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/scenarios")
        .join(format!("{name}.txt"));
    run_file(&path);
}

#[test]
fn first_election() {
    scenario("first_election");
}

#[test]
fn duelling_proposers() {
    scenario("duelling_proposers");
}

#[test]
fn leader_change_with_slots_in_flight() {
    scenario("leader_change_with_slots_in_flight");
}

#[test]
fn returning_partitioned_replica() {
    scenario("returning_partitioned_replica");
}

#[test]
fn catch_up_by_snapshot() {
    scenario("catch_up_by_snapshot");
}

#[test]
fn lease_hand_over() {
    scenario("lease_hand_over");
}

#[test]
fn rejoin_after_disk_loss() {
    scenario("rejoin_after_disk_loss");
}

#[test]
fn read_forwarded_to_a_replaced_leader() {
    scenario("read_forwarded_to_a_replaced_leader");
}

#[test]
fn late_catch_up_reply_at_a_new_leader() {
    scenario("late_catch_up_reply_at_a_new_leader");
}
