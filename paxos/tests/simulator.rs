//! Seeded simulations of 3- and 5-replica clusters under every fault mix (see
//! `sim/mod.rs` for the faults and the invariants checked after each event).
//!
//! Each test runs the seeds of one mix: seed `s` belongs to mix
//! `s % 8`. By default 16,000 seeds run in all (2,000 per mix); `SYNOD_SIM_SEEDS=N` runs the
//! first `N` seeds instead (the soak), and `SYNOD_SEED=s` replays exactly one.
//! A failing run prints its seed. `SYNOD_SIM_KEEP_GOING=1` runs every seed and
//! counts the failures instead of stopping at the first.

mod sim;

use std::panic::{self, AssertUnwindSafe};
use std::time::Instant;

use sim::{run_seed, Report, MIXES};

const DEFAULT_SEEDS: u64 = 16_000;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn run_mix(mix_index: u64) {
    let mixes = MIXES.len() as u64;
    if let Some(seed) = env_u64("SYNOD_SEED") {
        if seed % mixes == mix_index {
            let report = run_seed(seed);
            println!("seed {seed}: {report:?}");
        }
        return;
    }
    let total = env_u64("SYNOD_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let keep_going = std::env::var("SYNOD_SIM_KEEP_GOING").is_ok_and(|v| v == "1");
    let started = Instant::now();
    let mut sum = Report::default();
    let mut runs = 0u64;
    let mut failures = Vec::new();
    let mut seed = mix_index;
    while seed < total {
        if keep_going {
            let previous_hook = panic::take_hook();
            panic::set_hook(Box::new(|_| {}));
            let result = panic::catch_unwind(AssertUnwindSafe(|| run_seed(seed)));
            panic::set_hook(previous_hook);
            match result {
                Ok(report) => add(&mut sum, &report),
                Err(cause) => {
                    let text = cause
                        .downcast_ref::<String>()
                        .cloned()
                        .unwrap_or_else(|| "panic".into());
                    if failures.is_empty() {
                        println!("first failure: {text}");
                    }
                    failures.push(seed);
                }
            }
        } else {
            let result = panic::catch_unwind(AssertUnwindSafe(|| run_seed(seed)));
            match result {
                Ok(report) => add(&mut sum, &report),
                Err(cause) => {
                    eprintln!("simulation seed {seed} failed; replay with SYNOD_SEED={seed}");
                    panic::resume_unwind(cause);
                }
            }
        }
        runs += 1;
        seed += mixes;
    }
    println!(
        "{:?}: {runs} seeds in {:.1?}: {} events, {} slots chosen, {} commands, {} reads, {} crashes ({} disks lost), {} snapshots, {} elections; after the heal, commands chosen within {} ms and reads answered within {} ms; {} failed {:?}",
        MIXES[mix_index as usize],
        started.elapsed(),
        sum.events,
        sum.chosen_slots,
        sum.commands_chosen,
        sum.reads_served,
        sum.crashes,
        sum.disk_losses,
        sum.snapshots,
        sum.elections,
        sum.max_command_wait_after_heal_us / 1000,
        sum.max_read_wait_after_heal_us / 1000,
        failures.len(),
        &failures[..failures.len().min(20)],
    );
    assert!(failures.is_empty(), "{} seeds failed", failures.len());
}

fn add(sum: &mut Report, report: &Report) {
    sum.events += report.events;
    sum.chosen_slots += report.chosen_slots;
    sum.commands_chosen += report.commands_chosen;
    sum.reads_served += report.reads_served;
    sum.crashes += report.crashes;
    sum.snapshots += report.snapshots;
    sum.elections += report.elections;
    sum.disk_losses += report.disk_losses;
    sum.max_command_wait_after_heal_us = sum
        .max_command_wait_after_heal_us
        .max(report.max_command_wait_after_heal_us);
    sum.max_read_wait_after_heal_us = sum
        .max_read_wait_after_heal_us
        .max(report.max_read_wait_after_heal_us);
}

#[test]
fn lossy_network() {
    run_mix(0);
}

#[test]
fn crash_restarts() {
    run_mix(1);
}

#[test]
fn partitions() {
    run_mix(2);
}

#[test]
fn leases_under_clock_drift() {
    run_mix(3);
}

#[test]
fn catch_up_by_snapshot() {
    run_mix(4);
}

#[test]
fn chaos() {
    run_mix(5);
}

#[test]
fn crashes_between_write_and_sync() {
    run_mix(6);
}

#[test]
fn elections_with_promisers_ahead() {
    run_mix(7);
}
