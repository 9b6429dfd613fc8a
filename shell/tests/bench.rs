//! `synod bench`, end to end: each benchmark starts its own three
//! `synod-server` processes in a temporary directory on free ports.
//!
//! `synod bench fill` at a tiny size runs every phase and prints one JSON
//! document. The test checks that the document holds every figure with
//! sane values (all 2,000 creates done and none failed, positive rates, the
//! catch-up and the restart measured, memory and disk per replica, a
//! verdict per target), and that afterwards no replica is left running and
//! the temporary directory is gone. A second run is interrupted with SIGINT
//! during the fill: it must exit with 130 and leave nothing behind either.
//!
//! Each workload (`write`, `write --create`, `read`, `mixed`, `lock`,
//! `election`) runs for a second and must report operations of its kinds
//! with none failed and latencies in order; an operation count ends a load
//! early; a killed and a paused leader are each replaced with every writer
//! writing again well before their confirm pings would have noticed; and the suite, cut down to one repetition of its rows of
//! at most 16 clients, prints a figure for each row. None of these checks a
//! speed: they run beside other tests.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use common::{run_bounded, synod_with_home};

/// Longest the tiny benchmark may take (it may build synod-server first).
const BENCH_TIMEOUT: Duration = Duration::from_secs(240);

/// `synod` with a private home, so no user config or SYNOD_* setting leaks in.
fn synod(home: &tempfile::TempDir) -> Command {
    synod_with_home(home.path())
}

/// Whether any process's command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|line| String::from_utf8_lossy(&line).contains(needle))
        })
        .collect()
}

fn number(value: &Value, pointer: &str) -> f64 {
    value
        .pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{pointer} is not a number in {value}"))
}

#[test]
fn a_tiny_fill_reports_every_figure_and_leaves_nothing_behind() {
    let home = tempfile::tempdir().expect("home");
    let mut command = synod(&home);
    command.args([
        "--json",
        "bench",
        "fill",
        "--nodes",
        "2000",
        "--sessions",
        "4",
        "--in-flight",
        "4",
        "--parents",
        "10",
        "--clients",
        "8",
        "--steady-secs",
        "1",
    ]);
    let started = Instant::now();
    let output = run_bounded(command, BENCH_TIMEOUT);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "synod bench fill failed:\n{stderr}"
    );
    let text = String::from_utf8(output.stdout).expect("UTF-8 output");
    let report: Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|error| panic!("not one JSON document ({error}):\n{text}\n{stderr}"));

    let fill = &report["fill"];
    assert_eq!(fill["nodes"], 2000);
    assert_eq!(fill["creates_done"], 2000, "{fill}");
    assert_eq!(fill["created"], 2000, "{fill}");
    assert_eq!(fill["failed"], 0, "{fill}");
    assert_eq!(fill["timed_out"], 0, "{fill}");
    assert!(number(&report, "/fill/rate_per_sec") > 0.0);
    assert!(number(&report, "/fill/first_slice_rate_per_sec") > 0.0);
    assert!(number(&report, "/fill/last_slice_rate_per_sec") > 0.0);
    let slices = fill["slices"].as_array().expect("slices");
    assert_eq!(slices.len(), 10, "a slice per 200 creates: {fill}");
    assert_eq!(
        slices.last().map(|slice| &slice["creates_done"]),
        Some(&2000.into())
    );
    assert!(number(&report, "/fill/latency/p99_ms") > 0.0);

    for phase in ["baseline", "full_size", "catch_up/writes"] {
        let pointer = format!("/{phase}/ops_per_sec");
        assert!(number(&report, &pointer) > 0.0, "{pointer}");
        let p99 = number(&report, &format!("/{phase}/latency/p99_ms"));
        assert!(p99 > 0.0 && p99 < 10_000.0, "{phase} p99 {p99}");
    }
    assert!(number(&report, "/full_size_to_baseline_ratio") > 0.0);

    let catch_up = &report["catch_up"];
    assert_eq!(catch_up["replica"], report["setup"]["lagging_replica"]);
    assert_eq!(catch_up["caught_up"], true, "{catch_up}");
    assert!(number(&report, "/catch_up/target_applied_through") > 0.0);
    assert!(number(&report, "/catch_up/reached_target_ms") > 0.0);
    assert!(
        number(&report, "/catch_up/caught_up_ms") >= number(&report, "/catch_up/reached_target_ms")
    );

    let restart = &report["restart"];
    assert_eq!(restart["served"], true, "{restart}");
    assert_ne!(restart["replica"], report["setup"]["lagging_replica"]);
    assert!(number(&report, "/restart/serving_ms") > 0.0);
    assert!(number(&report, "/restart/port_bound_ms") <= number(&report, "/restart/serving_ms"));

    let memory = report["memory"].as_array().expect("memory");
    assert_eq!(memory.len(), 3);
    for replica in memory {
        let steady = replica["steady_rss_mb"].as_f64().expect("steady RSS");
        let peak = replica["peak_rss_mb"].as_f64().expect("peak RSS");
        assert!(steady > 1.0 && peak >= steady * 0.5, "{replica}");
        assert!(replica["peak_rss_mb_by_phase"]["catch_up"]
            .as_f64()
            .is_some());
    }
    let disk = report["disk"].as_array().expect("disk");
    assert_eq!(disk.len(), 3);
    assert!(disk
        .iter()
        .all(|replica| replica["data_dir_mb"].as_f64().is_some_and(|mb| mb > 0.0)));

    let checks = report["checks"].as_array().expect("checks");
    // 7 for the cluster, 2 per replica, the restart and the catch-up.
    assert_eq!(checks.len(), 15, "{checks:?}");
    assert!(checks
        .iter()
        .all(|check| check["pass"].is_boolean() && check["target"].is_string()));
    assert!(report["passed"].is_boolean());
    assert!(report["leader_changes"].is_object());

    let data_dir = report["setup"]["data_dir"].as_str().expect("data dir");
    assert!(
        !std::path::Path::new(data_dir).exists(),
        "{data_dir} was not removed"
    );
    assert!(
        processes_mentioning(data_dir).is_empty(),
        "replicas of {data_dir} still run"
    );
    eprintln!("the tiny bench took {:?}", started.elapsed());
}

#[test]
fn an_interrupted_bench_stops_its_replicas_and_removes_its_data() {
    let home = tempfile::tempdir().expect("home");
    let mut command = synod(&home);
    command
        .args([
            "bench",
            "fill",
            "--nodes",
            "1000000",
            "--sessions",
            "4",
            "--clients",
            "4",
            "--steady-secs",
            "1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("synod starts");
    let stderr = child.stderr.take().expect("stderr");
    // Read stderr to its end on a thread, so the bench never blocks on it.
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + BENCH_TIMEOUT;
    let mut data_dir = None;
    let mut seen = Vec::new();
    while let Ok(line) = received.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        seen.push(line.clone());
        if let Some(dir) = line.strip_prefix("bench: starting 3 replicas in ") {
            data_dir = Some(dir.to_string());
        }
        if line.starts_with("bench: fill:") {
            break;
        }
    }
    let data_dir =
        data_dir.unwrap_or_else(|| panic!("no data directory named:\n{}", seen.join("\n")));
    assert!(
        !processes_mentioning(&data_dir).is_empty(),
        "the replicas run"
    );
    let pid = i32::try_from(child.id()).expect("pid");
    kill(Pid::from_raw(pid), Signal::SIGINT).expect("SIGINT");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the bench did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130));
    assert!(
        processes_mentioning(&data_dir).is_empty(),
        "replicas of {data_dir} still run"
    );
    assert!(
        !std::path::Path::new(&data_dir).exists(),
        "{data_dir} was not removed"
    );
}

/// Runs `synod --json bench ARGS` to its end and returns its one JSON
/// document; checks that every cluster it started (named on stderr) is
/// stopped and its temporary directory gone.
fn bench_json(args: &[&str]) -> Value {
    let home = tempfile::tempdir().expect("home");
    let mut command = synod(&home);
    command.arg("--json").arg("bench").args(args);
    let output = run_bounded(command, BENCH_TIMEOUT);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "synod bench {args:?} failed:\n{stderr}"
    );
    let data_dirs: Vec<&str> = stderr
        .lines()
        .filter_map(|line| line.strip_prefix("bench: starting 3 replicas in "))
        .collect();
    assert!(!data_dirs.is_empty(), "no cluster named:\n{stderr}");
    for dir in data_dirs {
        assert!(!std::path::Path::new(dir).exists(), "{dir} was not removed");
        assert!(
            processes_mentioning(dir).is_empty(),
            "replicas of {dir} still run"
        );
    }
    let text = String::from_utf8(output.stdout).expect("UTF-8 output");
    serde_json::from_str(text.trim())
        .unwrap_or_else(|error| panic!("not one JSON document ({error}):\n{text}\n{stderr}"))
}

/// Checks one kind of operation's figures: some succeeded, none failed,
/// the latencies in order.
fn check_kind(report: &Value, kind: &str) {
    let figures = &report["figures"]["by_kind"][kind];
    assert!(
        number(figures, "/ops") > 0.0,
        "no {kind} succeeded: {report}"
    );
    assert!(number(figures, "/ops_per_sec") > 0.0, "{report}");
    assert_eq!(figures["timeouts"], 0, "{report}");
    assert_eq!(figures["errors"], serde_json::json!({}), "{report}");
    let latency = |name: &str| number(figures, &format!("/latency/{name}"));
    assert!(latency("p50_ms") > 0.0, "{report}");
    assert!(latency("p50_ms") <= latency("p90_ms"), "{report}");
    assert!(latency("p90_ms") <= latency("p99_ms"), "{report}");
    assert!(latency("p99_ms") <= latency("p999_ms"), "{report}");
    assert!(latency("p999_ms") <= latency("max_ms"), "{report}");
}

#[test]
fn every_workload_measures_its_operations_on_a_cluster_of_its_own() {
    let quick = ["--duration-secs", "1", "--warmup-secs", "0", "--keys", "20"];
    let cases: [(&[&str], &[&str]); 6] = [
        (&["write", "--clients", "2"], &["write"]),
        (
            &["write", "--create", "--clients", "2", "--in-flight", "2"],
            &["create"],
        ),
        (
            &["read", "--consistency", "at-least", "--clients", "3"],
            &["read"],
        ),
        (
            &["mixed", "--read-percent", "50", "--clients", "2"],
            &["read", "write"],
        ),
        (&["lock", "--clients", "3"], &["lock"]),
        (&["election", "--clients", "2"], &["election"]),
    ];
    for (args, kinds) in cases {
        let mut all = args.to_vec();
        all.extend(quick);
        let report = bench_json(&all);
        assert_eq!(report["workload"], args[0], "{report}");
        for kind in kinds {
            check_kind(&report, kind);
        }
        let measured: Vec<&String> = report["figures"]["by_kind"]
            .as_object()
            .expect("kinds")
            .keys()
            .collect();
        assert_eq!(measured.len(), kinds.len(), "{report}");
        assert!(number(&report, "/figures/secs") >= 1.0, "{report}");
    }
}

#[test]
fn an_operation_count_ends_the_load_before_its_time() {
    let report = bench_json(&[
        "write",
        "--clients",
        "2",
        "--ops",
        "50",
        "--duration-secs",
        "600",
        "--warmup-secs",
        "0",
    ]);
    assert_eq!(report["figures"]["ops"], 50, "{report}");
    assert!(number(&report, "/figures/secs") < 120.0, "{report}");
}

#[test]
fn a_killed_or_paused_leader_is_replaced_and_every_writer_recovers() {
    for fault in ["kill", "stop"] {
        // A long session timeout: its confirm pings would notice a dead
        // replica only after 10 s, so a faster recovery is the QUIC
        // liveness check's.
        let report = bench_json(&[
            "failover",
            "--fault",
            fault,
            "--clients",
            "3",
            "--warmup-secs",
            "1",
            "--session-timeout-ms",
            "30000",
        ]);
        let figures = &report["figures"];
        assert_eq!(figures["fault"], fault, "{report}");
        assert_eq!(figures["writers"], 3, "{report}");
        assert_eq!(figures["writers_recovered"], 3, "{report}");
        assert!(number(figures, "/writes_before") > 0.0, "{report}");
        assert!(number(figures, "/writes_after") >= 3.0, "{report}");
        let first = number(figures, "/first_write_ok_ms");
        let every = number(figures, "/every_writer_ok_ms");
        assert!(first > 0.0 && first <= every, "{report}");
        assert!(
            every < 6_000.0,
            "the writers left the silent leader within the liveness timeout, not the \
             confirm ping's 10 s: {report}"
        );
        let new_leader = figures["new_leader"].as_u64().expect("a new leader");
        assert_ne!(Some(new_leader), figures["old_leader"].as_u64(), "{report}");
    }
}

#[test]
fn the_suite_prints_a_row_per_measurement_with_every_run() {
    let home = tempfile::tempdir().expect("home");
    let mut command = synod(&home);
    command.args([
        "bench",
        "suite",
        "--repeat",
        "1",
        "--duration-secs",
        "1",
        "--warmup-secs",
        "0",
        "--clients-max",
        "16",
    ]);
    let output = run_bounded(command, BENCH_TIMEOUT);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "synod bench suite failed:\n{stderr}"
    );
    let text = String::from_utf8(output.stdout).expect("UTF-8 output");
    let rows: Vec<&str> = text.lines().filter(|line| line.starts_with("| ")).collect();
    // The header, then one writer, writes, the two kinds of reads and lock
    // hand-offs at 16 clients, and the two failovers.
    assert_eq!(rows.len(), 8, "{text}");
    assert!(rows[0].starts_with("| workload | median |"), "{text}");
    for row in &rows[1..] {
        assert!(
            !row.contains("none"),
            "a row without a figure: {row}\n{stderr}"
        );
        assert!(
            !row.contains("failed"),
            "a row with failures: {row}\n{stderr}"
        );
    }
    assert!(
        rows.iter()
            .any(|row| row.starts_with("| one writer, p50 (via leader) |") && row.contains(" ms |")),
        "{text}"
    );
    assert!(
        rows.iter()
            .any(|row| row.starts_with("| kill -9 of the leader") && row.contains(" s / ")),
        "{text}"
    );
    let data_dirs: Vec<&str> = stderr
        .lines()
        .filter_map(|line| line.strip_prefix("bench: starting 3 replicas in "))
        .collect();
    assert_eq!(
        data_dirs.len(),
        3,
        "one cluster for the loads, one per failover"
    );
    for dir in data_dirs {
        assert!(!std::path::Path::new(dir).exists(), "{dir} was not removed");
    }
}
