//! Commands chosen per second through the Paxos core alone: three replicas
//! in one thread, messages handed directly from one to another, and every
//! persist batch acknowledged at once (no disk). This measures the core's own
//! cost per command and per slot, which bounds what the replica can do.
//!
//! Run with `cargo bench -p synod-paxos`.

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use synod_paxos::{Config, DurableState, Envelope, Membership, Node, Role};

struct Cluster {
    nodes: Vec<Node>,
    in_flight: VecDeque<Envelope>,
    now_ms: u64,
    commands_chosen_at_leader: u64,
    slots_chosen_at_leader: u64,
}

impl Cluster {
    fn new(max_commands_per_slot: usize, max_inflight_slots: u64) -> Cluster {
        let membership = Membership::new(&[1, 2, 3]).expect("membership");
        let nodes = (1..=3)
            .map(|id| {
                let mut config = Config::new(id, 42);
                config.max_commands_per_slot = max_commands_per_slot;
                config.max_inflight_slots = max_inflight_slots;
                config.max_slots_per_message = 256;
                config.max_pending_commands = 10_000_000;
                config.log_retain_slots = 1_000;
                Node::new(config, DurableState::bootstrap(membership.clone()), 0, 0).expect("node")
            })
            .collect();
        Cluster {
            nodes,
            in_flight: VecDeque::new(),
            now_ms: 0,
            commands_chosen_at_leader: 0,
            slots_chosen_at_leader: 0,
        }
    }

    /// Drains every node's outputs and delivers every message until nothing
    /// moves.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            for index in 0..self.nodes.len() {
                let node = &mut self.nodes[index];
                if !node.has_ready() {
                    continue;
                }
                moved = true;
                let ready = node.ready();
                if let Some(batch) = &ready.persist {
                    node.persisted(self.now_ms, batch.id);
                }
                if node.role() == Role::Leader {
                    self.slots_chosen_at_leader += ready.chosen.len() as u64;
                    self.commands_chosen_at_leader += ready
                        .chosen
                        .iter()
                        .map(|entry| entry.value.command_count() as u64)
                        .sum::<u64>();
                    if let Some(last) = ready.chosen.last() {
                        node.compact(last.slot);
                    }
                } else if let Some(last) = ready.chosen.last() {
                    node.compact(last.slot);
                }
                black_box(&ready.chosen);
                self.in_flight.extend(ready.messages);
            }
            while let Some(envelope) = self.in_flight.pop_front() {
                moved = true;
                let to = (envelope.to - 1) as usize;
                self.nodes[to].step(self.now_ms, envelope);
            }
            if !moved {
                return;
            }
        }
    }

    fn elect(&mut self) -> usize {
        for _ in 0..1_000 {
            self.now_ms += 50;
            for node in &mut self.nodes {
                node.tick(self.now_ms);
            }
            self.pump();
            if let Some(leader) = self.nodes.iter().position(|n| n.role() == Role::Leader) {
                return leader;
            }
        }
        panic!("no leader elected");
    }
}

fn run(name: &str, commands: u64, batch: usize, max_commands_per_slot: usize, window: u64) {
    let mut cluster = Cluster::new(max_commands_per_slot, window);
    let leader = cluster.elect();
    cluster.commands_chosen_at_leader = 0;
    cluster.slots_chosen_at_leader = 0;
    let payload = Bytes::from_static(&[7u8; 16]);
    let started = Instant::now();
    let mut proposed = 0;
    while cluster.commands_chosen_at_leader < commands {
        if proposed < commands {
            let count = (batch as u64).min(commands - proposed) as usize;
            let proposal = vec![payload.clone(); count];
            cluster.nodes[leader]
                .propose(cluster.now_ms, proposal)
                .expect("leader accepts proposals");
            proposed += count as u64;
        }
        cluster.pump();
        assert_eq!(cluster.nodes[leader].role(), Role::Leader, "leader lost");
        if started.elapsed() > Duration::from_secs(60) {
            panic!("{name}: did not finish within 60 s");
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{name:<34} {:>12.0} commands/s {:>10.0} slots/s  ({} commands in {} slots, {:.2} s)",
        cluster.commands_chosen_at_leader as f64 / elapsed,
        cluster.slots_chosen_at_leader as f64 / elapsed,
        cluster.commands_chosen_at_leader,
        cluster.slots_chosen_at_leader,
        elapsed
    );
}

fn main() {
    // `cargo test --benches` runs bench targets with `--bench` absent; keep
    // that quick.
    let quick = !std::env::args().any(|arg| arg == "--bench");
    let scale = if quick { 100 } else { 1 };
    println!("synod-paxos core throughput, 3 replicas in one thread, no disk");
    run(
        "batched (4096 commands/slot)",
        4_000_000 / scale,
        10_000,
        4096,
        256,
    );
    run(
        "batched (256 commands/slot)",
        2_000_000 / scale,
        1_000,
        256,
        256,
    );
    run("one command per slot", 1_000_000 / scale, 64, 1, 256);
    run("one command per round trip", 200_000 / scale, 1, 1, 256);
}
