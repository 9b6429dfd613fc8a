//! The fault suite's short run, as CI runs it on every change: real replica
//! processes under load, faults of several kinds, and every checker's
//! verdict; and a run set up to break linearizability (reads at followers
//! while the leader is cut away), which the checker must catch.
//!
//! Each run prints its seed; `SYNOD_FAULTS_SEED=<seed>` replays one. The
//! partitions need nftables and root: without them those kinds are left
//! out, with a notice.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;

use support::server_binary;
use synod_faults::net;

/// The runs share two cores: one at a time.
static ONE_RUN_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The fault kinds that need no firewall.
const PROCESS_FAULTS: &str = "kill-leader,kill-all,pause-leader,disk-lost,clock-skew";
/// The fault kinds that cut links, run where nftables works.
const NETWORK_FAULTS: &str = "isolate-leader,leader-hears-nothing,bridge,client-cut-off";

/// The longest write stall a healed partition may cause.
const STALL_AFTER_PARTITION_MAX_MS: u64 = 5_000;

/// The longest write stall the report gives for `kind`: its line reads
/// `  <kind>  N × · writes stalled: median A ms, max B ms`.
fn longest_stall_ms(report: &str, kind: &str) -> Option<u64> {
    let line = report
        .lines()
        .find(|line| line.trim_start().starts_with(&format!("{kind} ")))?;
    let max = line.split("max ").nth(1)?;
    max.split_whitespace().next()?.parse().ok()
}

fn seed() -> u64 {
    std::env::var("SYNOD_FAULTS_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| rand::random::<u64>() >> 16)
}

fn fault_run(out: &Path, seed: u64, arguments: &[&str]) -> (Output, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_synod-faults"))
        .arg("run")
        .arg("--seed")
        .arg(seed.to_string())
        .arg("--out")
        .arg(out)
        .arg("--server-binary")
        .arg(server_binary())
        .args(arguments)
        .output()
        .expect("run synod-faults");
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    println!("{report}");
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    (output, report)
}

#[test]
fn every_checker_passes_under_faults() {
    let _one = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let seed = seed();
    let faults = if net::available() {
        format!("{PROCESS_FAULTS},{NETWORK_FAULTS}")
    } else {
        println!("notice: nftables is not usable here (not root, or no nft): partitions left out");
        PROCESS_FAULTS.to_string()
    };
    println!("fault run seed {seed}: replay with SYNOD_FAULTS_SEED={seed}");
    let out = tempfile::tempdir().expect("temp dir");
    let (output, report) = fault_run(
        out.path(),
        seed,
        // Spread over more keys than the default, the history of each stays
        // within the checker's search bound at today's write rates (six keys
        // gave 93,000 operations each, which it could not decide).
        &["--secs", "60", "--keys", "24", "--faults", &faults],
    );
    let kept = std::env::temp_dir().join(format!("synod-faults-failed-{seed}"));
    if !output.status.success() {
        // Keep the history and the replicas' logs for a look.
        let _ = std::fs::rename(out.path(), &kept);
    }
    assert!(
        output.status.success() && report.contains("verdicts: every checker passed"),
        "the fault run with seed {seed} failed (its history and logs are in {})",
        kept.display()
    );
    // A partition that heals must not leave a link dead for long: writes
    // resume within a lease and an election or two (they stalled up to
    // 7.4 s while QUIC connections kept waiting out their resend delays).
    for kind in ["isolate-leader", "leader-hears-nothing", "bridge"] {
        if let Some(stall) = longest_stall_ms(&report, kind) {
            assert!(
                stall < STALL_AFTER_PARTITION_MAX_MS,
                "writes stalled {stall} ms after {kind} (seed {seed})"
            );
        }
    }
    let injected: Vec<&str> = faults
        .split(',')
        .filter(|kind| report.contains(&format!("  {kind} ")))
        .collect();
    assert!(
        injected.len() >= 5,
        "only {injected:?} of {faults} were injected"
    );
}

#[test]
fn reads_at_followers_cut_from_the_leader_are_reported_not_linearizable() {
    if !net::available() {
        println!("notice: nftables is not usable here (not root, or no nft): test skipped");
        return;
    }
    let _one = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let seed = seed();
    println!("fault run seed {seed}: replay with SYNOD_FAULTS_SEED={seed}");
    let out = tempfile::tempdir().expect("temp dir");
    let (output, report) = fault_run(
        out.path(),
        seed,
        &[
            "--secs",
            "15",
            "--reads",
            "sequential",
            "--faults",
            "isolate-leader",
        ],
    );
    assert_eq!(
        output.status.code(),
        Some(1),
        "the run should end with a failed verdict"
    );
    assert!(
        report.contains("linearizable: FAILED"),
        "stale reads went unnoticed"
    );
    assert!(
        report.contains("none of these can come next"),
        "the offending operations are not printed"
    );
}
