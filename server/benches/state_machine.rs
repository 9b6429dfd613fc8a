//! Benchmark of the coordination state machine, run with
//! `cargo bench -p synod-server`. It prints, on one core and in memory:
//! - applied creates and sets per second (commands built before timing;
//!   the time covers `StateMachine::apply` only, with its events and
//!   responses);
//! - memory per node: bytes allocated by the state beyond each node's path
//!   and data, counted by an instrumented global allocator, with 1,000,000
//!   nodes of 100 bytes (`SYNOD_BENCH_NODES` changes the count).

use std::alloc::System;
use std::time::Instant;

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use synod_proto::{CreateMode, Op, Request};
use synod_server::state::{Command, StateConfig, StateMachine};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const DATA_BYTES: usize = 100;
const BATCH: u64 = 100_000;

fn node_path(index: u64) -> String {
    format!("/bench/{index:010}")
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
/// timed section; returns the seconds spent applying.
fn timed_apply(state: &mut StateMachine, count: u64, mut make: impl FnMut(u64) -> Command) -> f64 {
    let mut seconds = 0.0;
    let mut done = 0;
    while done < count {
        let batch: Vec<Command> = (done..(done + BATCH).min(count)).map(&mut make).collect();
        let start = Instant::now();
        for command in &batch {
            let applied = state.apply(command);
            assert!(
                matches!(&applied.response, Some(r) if r.result.is_ok()),
                "benchmark command failed: {:?}",
                applied.response
            );
        }
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
    let before = region.change();
    let base_bytes = before.bytes_allocated as i64 - before.bytes_deallocated as i64;

    let create_seconds = timed_apply(&mut state, nodes, |index| {
        client(
            2 + index,
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

    let set_seconds = timed_apply(&mut state, nodes, |index| {
        client(
            2 + nodes + index,
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
    assert_eq!(restored, Ok(nodes + 2));

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
        "  overhead per node      {:>12.1} bytes beyond path and data (target <= 250)",
        overhead_per_node
    );
    println!(
        "  snapshot               {:>12} bytes, written in {:.3} s, restored in {:.3} s",
        snapshot.len(),
        snapshot_seconds,
        restore_seconds
    );
}
