//! `synod bench fill` at a tiny size, end to end: it starts its own three
//! `synod-server` processes in a temporary directory on free ports, runs
//! every phase, and prints one JSON document. The test checks that the
//! document holds every figure with sane values (all 2,000 creates done and
//! none failed, positive rates, the catch-up and the restart measured,
//! memory and disk per replica, a verdict per target), and that afterwards
//! no replica is left running and the temporary directory is gone. A second
//! run is interrupted with SIGINT during the fill: it must exit with 130
//! and leave nothing behind either.

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
