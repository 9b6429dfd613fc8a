//! Benchmark of the coordination state machine, run with
//! `cargo bench -p synod-server`. It prints, on one core and in memory:
//! - applied creates and sets per second (commands built before timing;
//!   the time covers `StateMachine::apply`, with its events and responses,
//!   and a delta of the changes every 100 commands);
//! - memory per node: bytes allocated by the state beyond each node's path
//!   and data, counted by an instrumented global allocator, with 1,000,000
//!   nodes of 100 bytes under 1,000 parents, paths like `/bench/d123/k0000001`
//!   (`SYNOD_BENCH_NODES` changes the count);
//! - saving: the deltas of what each batch of 100 commands changed
//!   (`StateMachine::take_delta`, what the replica hands its writer), and
//!   loading the whole state back from its records (`StateLoader`, what a
//!   restart and a snapshot install do), with the memory the loaded state
//!   holds (its B-tree packed full).

use std::alloc::System;
use std::time::Instant;

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use synod_paxos::Membership;
use synod_proto::{CreateMode, Op, Request};
use synod_server::state::records::StateLoader;
use synod_server::state::{Command, StateConfig, StateMachine};
use synod_server::storage::{StateKey, StateRecordRef};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const DATA_BYTES: usize = 100;
const BATCH: u64 = 100_000;
const PARENTS: u64 = 1_000;

fn parent_path(index: u64) -> String {
    format!("/bench/d{:03}", index % PARENTS)
}

fn node_path(index: u64) -> String {
    format!("{}/k{index:07}", parent_path(index))
}

fn client(sequence: u64, op: Op) -> Command {
    Command::Client {
        request: Request {
            session: 1,
            sequence,
            op,
        },
        now_ms: 1_700_000_000_000 + sequence,
    }
}

/// Applies `count` commands made by `make`, built in batches outside the
/// timed section, taking the delta of every 100 as the replica does (so
/// the state holds no backlog of changed keys); returns the seconds spent.
fn timed_apply(state: &mut StateMachine, count: u64, mut make: impl FnMut(u64) -> Command) -> f64 {
    let membership = Membership::new(&[1, 2, 3]).expect("membership");
    let mut seconds = 0.0;
    let mut done = 0;
    while done < count {
        let batch: Vec<Command> = (done..(done + BATCH).min(count)).map(&mut make).collect();
        let start = Instant::now();
        for (index, command) in batch.iter().enumerate() {
            let applied = state.apply(command);
            assert!(
                matches!(&applied.response, Some(r) if r.result.is_ok()),
                "benchmark command failed: {:?}",
                applied.response
            );
            if index % 100 == 99 {
                state.take_delta(index as u64, &membership);
            }
        }
        state.take_delta(0, &membership);
        seconds += start.elapsed().as_secs_f64();
        done += batch.len() as u64;
    }
    seconds
}

fn main() {
    let nodes: u64 = std::env::var("SYNOD_BENCH_NODES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(1_000_000);
    let data = vec![7u8; DATA_BYTES];

    let region = Region::new(GLOBAL);
    let mut state = StateMachine::new(StateConfig::default());
    state.apply(&Command::OpenSession {
        owner: "CN=test".into(),
        secret: 1,
        timeout_ms: 10_000,
        now_ms: 1_700_000_000_000,
    });
    state.apply(&client(
        1,
        Op::Create {
            path: "/bench".into(),
            data: Vec::new(),
            mode: CreateMode::Persistent,
        },
    ));
    for index in 0..PARENTS {
        state.apply(&client(
            2 + index,
            Op::Create {
                path: parent_path(index),
                data: Vec::new(),
                mode: CreateMode::Persistent,
            },
        ));
    }
    let first = 2 + PARENTS;
    let membership = Membership::new(&[1, 2, 3]).expect("membership");
    state.take_delta(0, &membership);
    let before = region.change();
    let base_bytes = before.bytes_allocated as i64 - before.bytes_deallocated as i64;

    let create_seconds = timed_apply(&mut state, nodes, |index| {
        client(
            first + index,
            Op::Create {
                path: node_path(index),
                data: data.clone(),
                mode: CreateMode::Persistent,
            },
        )
    });
    let after = region.change();
    let state_bytes = after.bytes_allocated as i64 - after.bytes_deallocated as i64 - base_bytes;
    let payload_bytes: u64 = (0..nodes)
        .map(|i| node_path(i).len() as u64 + DATA_BYTES as u64)
        .sum();
    let overhead_per_node = (state_bytes - payload_bytes as i64) as f64 / nodes as f64;

    // What the replica hands its writer: a delta for every 100 commands.
    let mut delta_seconds = 0.0;
    let mut delta_bytes = 0u64;
    let mut next = first + nodes;
    for round in 0..(nodes / 100).min(10_000) {
        for index in 0..100 {
            let applied = state.apply(&client(
                next,
                Op::SetData {
                    path: node_path((round * 100 + index) * 7 % nodes),
                    data: data.clone(),
                    expected_version: None,
                },
            ));
            assert!(matches!(&applied.response, Some(r) if r.result.is_ok()));
            next += 1;
        }
        let start = Instant::now();
        let delta = state.take_delta(round, &membership);
        delta_seconds += start.elapsed().as_secs_f64();
        delta_bytes += delta.bytes();
    }
    let delta_rounds = (nodes / 100).min(10_000);

    let set_seconds = timed_apply(&mut state, nodes, |index| {
        client(
            next + index,
            Op::SetData {
                path: node_path(index % nodes),
                data: data.clone(),
                expected_version: None,
            },
        )
    });

    let start = Instant::now();
    let mut read_bytes = 0u64;
    for index in 0..nodes {
        if let Ok(synod_proto::OpResult::Data { data, .. }) = state.read(&Op::GetData {
            path: node_path(index),
        }) {
            read_bytes += data.len() as u64;
        }
    }
    let read_seconds = start.elapsed().as_secs_f64();
    assert_eq!(read_bytes, nodes * DATA_BYTES as u64);

    let start = Instant::now();
    let snapshot = state.snapshot();
    let snapshot_seconds = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let restored = StateMachine::restore(StateConfig::default(), &snapshot).map(|s| s.node_count());
    let restore_seconds = start.elapsed().as_secs_f64();
    assert_eq!(restored, Ok(nodes + PARENTS + 2));
    drop(snapshot);

    // The whole state as records (as the storage holds them), then loaded
    // back, as at a restart.
    state.mark_all_dirty();
    let all = state.take_delta(1, &membership);
    let records: Vec<(StateKey, Vec<u8>)> = all
        .changes
        .into_iter()
        .filter_map(|(key, value)| value.map(|value| (key, value)))
        .collect();
    let scalars = all.header.expect("a header").scalars;
    let record_bytes: usize = records
        .iter()
        .map(|((_, key), value)| key.len() + value.len())
        .sum();
    let before_load = region.change();
    let start = Instant::now();
    let mut loader = StateLoader::new(StateConfig::default());
    for ((table, key), value) in &records {
        loader
            .record(StateRecordRef {
                table: *table,
                key,
                value,
            })
            .expect("a record");
    }
    let loaded = loader.finish(&scalars).expect("the state loads");
    let load_seconds = start.elapsed().as_secs_f64();
    let after_load = region.change();
    let loaded_bytes = (after_load.bytes_allocated as i64 - after_load.bytes_deallocated as i64)
        - (before_load.bytes_allocated as i64 - before_load.bytes_deallocated as i64);
    assert_eq!(loaded.node_count(), nodes + PARENTS + 2);

    println!("synod-server state machine, {nodes} nodes of {DATA_BYTES} bytes, one core:");
    println!(
        "  create (applied)       {:>12.0} ops/s  ({:.3} s)",
        nodes as f64 / create_seconds,
        create_seconds
    );
    println!(
        "  set (applied)          {:>12.0} ops/s  ({:.3} s)",
        nodes as f64 / set_seconds,
        set_seconds
    );
    println!(
        "  get (local read)       {:>12.0} ops/s  ({:.3} s)",
        nodes as f64 / read_seconds,
        read_seconds
    );
    println!(
        "  memory                 {:>12} bytes held by the state for the nodes",
        state_bytes
    );
    println!(
        "  overhead per node      {:>12.1} bytes beyond path and data (requested; the allocator rounds up)",
        overhead_per_node
    );
    println!(
        "  snapshot (tests only)  written in {:.3} s, restored in {:.3} s",
        snapshot_seconds, restore_seconds
    );
    println!(
        "  delta per 100 sets     {:>12.1} us, {:.0} bytes",
        delta_seconds * 1e6 / delta_rounds as f64,
        delta_bytes as f64 / delta_rounds as f64
    );
    println!(
        "  records                {:>12} records, {} bytes of keys and payloads",
        records.len(),
        record_bytes
    );
    println!(
        "  load from records      {:>12.0} records/s  ({:.3} s), {:.1} bytes per node beyond path and data",
        records.len() as f64 / load_seconds,
        load_seconds,
        (loaded_bytes - payload_bytes as i64) as f64 / nodes as f64
    );
}
