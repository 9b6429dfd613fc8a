//! One-shot commands against a real cluster: `synod dev --detach` starts
//! three `synod-server` processes on free loopback ports in a temporary
//! directory and writes the client config file into a private home, so every
//! later `synod COMMAND` finds the cluster without flags. The test checks
//! that `--json` output parses as JSON with the expected fields (create, get
//! of text and binary data, set and compare-and-set, stat, ls, tree, status
//! of every replica, leader), that the connection may also come from SYNOD_*
//! environment variables, that errors exit non-zero with a plain message
//! (missing node, wrong version, unknown command, bad arguments, no cluster
//! configured), that `synod certs` writes a CA and certificates and issues
//! more from an existing CA that the running cluster accepts, that a
//! replica takes a replaced certificate on SIGHUP, that flags a
//! command does not use are refused, that a
//! second `synod dev` on the same data directory finds the data written
//! before it was stopped, and that `status` still answers, marking the lost
//! replicas unreachable and the one left saying why it waits, when two of
//! the three replicas are stopped.

mod common;

use std::process::{Command, Output};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use common::{run_bounded, synod_with_home, DevCluster, COMMAND_TIMEOUT};
use serde_json::Value;

fn run(mut command: Command, args: &[&str]) -> Output {
    command.args(args);
    run_bounded(command, COMMAND_TIMEOUT)
}

fn json(cluster: &DevCluster, args: &[&str]) -> Value {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let output = run(cluster.synod(), &full);
    assert!(
        output.status.success(),
        "synod {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("UTF-8 output");
    serde_json::from_str(text.trim()).unwrap_or_else(|error| {
        panic!("synod {args:?} printed something that is not JSON ({error}): {text}")
    })
}

/// `synod status`'s exit code and standard error.
fn status_exit(cluster: &DevCluster) -> (i32, String) {
    let output = run(cluster.synod(), &["status"]);
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn fails(cluster: &DevCluster, args: &[&str]) -> (i32, String) {
    let output = run(cluster.synod(), args);
    assert!(!output.status.success(), "synod {args:?} should fail");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn one_shot_commands_print_json_and_fail_plainly() {
    let cluster = DevCluster::start();

    let created = json(&cluster, &["create", "/app", "hello world"]);
    assert_eq!(created["path"], "/app");
    let got = json(&cluster, &["get", "/app"]);
    assert_eq!(got["data"], "hello world");
    assert_eq!(got["stat"]["version"], 0);
    assert_eq!(got["stat"]["data_length"], 11);

    // --json may also follow the command, and set takes @FILE.
    let file = cluster.home.path().join("value.bin");
    std::fs::write(&file, [0u8, 159, 146, 150, 0x1b]).expect("write value");
    let at_file = format!("@{}", file.display());
    let set = run(cluster.synod(), &["set", "/app", &at_file, "--json"]);
    assert!(set.status.success());
    let set: Value = serde_json::from_slice(&set.stdout).expect("set prints JSON");
    assert_eq!(set["stat"]["version"], 1);
    let got = json(&cluster, &["get", "/app"]);
    assert_eq!(got["data"], Value::Null);
    assert_eq!(got["data_hex"], "009f92961b");
    // Without --json, binary data is a hex dump, never raw bytes.
    let text = run(cluster.synod(), &["get", "/app"]);
    let shown = String::from_utf8(text.stdout).expect("text output is UTF-8");
    assert!(shown.contains("5 bytes of binary data"), "{shown}");
    assert!(!shown.contains('\x1b'));

    let sequential = json(&cluster, &["create", "-s", "/app/job-"]);
    let path = sequential["path"].as_str().expect("path");
    assert!(path.starts_with("/app/job-") && path.len() == "/app/job-".len() + 10);
    let listed = json(&cluster, &["ls", "/app"]);
    assert_eq!(listed["children"].as_array().map(Vec::len), Some(1));
    let long = json(&cluster, &["ls", "-l", "/"]);
    assert_eq!(long["children"][0]["name"], "app");
    assert_eq!(long["children"][0]["stat"]["children_count"], 1);
    let tree = json(&cluster, &["tree", "/"]);
    assert_eq!(tree["nodes"].as_array().map(Vec::len), Some(3));
    let stat = json(&cluster, &["stat", "/app"]);
    assert_eq!(stat["stat"]["ephemeral_owner"], 0);

    // Compare and set: -v names the version the node must be at.
    json(&cluster, &["create", "/cas", "a"]);
    let set = json(&cluster, &["set", "-v", "0", "/cas", "b"]);
    assert_eq!(set["stat"]["version"], 1);
    let (code, message) = fails(&cluster, &["set", "-v", "0", "/cas", "c"]);
    assert_eq!(code, 1);
    assert!(message.contains("not the expected 0"), "{message}");
    json(&cluster, &["rm", "-v1", "/cas"]);

    let status = json(&cluster, &["status"]);
    let replicas = status["replicas"].as_array().expect("replicas");
    assert_eq!(replicas.len(), 3);
    assert!(replicas.iter().all(|r| r["reachable"] == true));
    let leaders = replicas.iter().filter(|r| r["role"] == "leader").count();
    assert_eq!(leaders, 1, "{status}");
    // Every replica holds the one cluster identity (minted by the first
    // leader; it may take a moment after the cluster first answers).
    let mut status = status;
    for _ in 0..50 {
        let replicas = status["replicas"].as_array().expect("replicas");
        if replicas.iter().all(|r| {
            r["cluster_identity"].is_string()
                && r["cluster_identity"] == replicas[0]["cluster_identity"]
        }) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        status = json(&cluster, &["status"]);
    }
    let identity = status["replicas"][0]["cluster_identity"]
        .as_str()
        .unwrap_or_else(|| panic!("a cluster identity: {status}"))
        .to_string();
    let text = run(cluster.synod(), &["status"]);
    let table = String::from_utf8_lossy(&text.stdout);
    assert!(table.contains("ROLE") && table.contains("LAG"), "{table}");
    assert!(
        table.contains(&format!("cluster identity {identity}")),
        "{table}"
    );

    let leader = json(&cluster, &["leader", "/elections/db"]);
    assert_eq!(leader["leader"], Value::Null);
    let help = json(&cluster, &["help", "lock"]);
    assert_eq!(help["command"], "lock");

    // Errors: plain messages, non-zero status.
    let (code, message) = fails(&cluster, &["get", "/missing"]);
    assert_eq!(code, 1);
    assert!(message.contains("/missing does not exist"), "{message}");
    let (code, message) = fails(&cluster, &["frobnicate"]);
    assert_eq!(code, 2);
    assert!(message.contains("unknown command"), "{message}");
    let (code, message) = fails(&cluster, &["get"]);
    assert_eq!(code, 2);
    assert!(message.contains("usage: get PATH"), "{message}");
    let (_, message) = fails(&cluster, &["rm", "/app"]);
    assert!(message.contains("rm -r /app"), "{message}");
    let removed = json(&cluster, &["rm", "-r", "/app"]);
    assert_eq!(removed["deleted"].as_array().map(Vec::len), Some(2));

    // With no config anywhere, the message says how to get a cluster.
    let empty_home = tempfile::tempdir().expect("home");
    let output = run(synod_with_home(empty_home.path()), &["ls", "/"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("synod dev"));

    // The connection may come from environment variables instead.
    let client_config = std::fs::read_to_string(cluster.data.path().join("client.toml"))
        .expect("synod dev writes client.toml");
    let endpoints = client_config
        .lines()
        .find_map(|line| line.strip_prefix("endpoints = "))
        .expect("endpoints line")
        .trim_matches(|c| c == '[' || c == ']')
        .replace(['"', ' '], "");
    let certs_dir = cluster.data.path().join("certs");
    let mut command = synod_with_home(empty_home.path());
    command
        .env("SYNOD_ENDPOINTS", &endpoints)
        .env("SYNOD_CA", certs_dir.join("ca.pem"))
        .env("SYNOD_CERT", certs_dir.join("client.pem"))
        .env("SYNOD_KEY", certs_dir.join("client-key.pem"));
    let output = run(command, &["--json", "ls", "/"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(listed["path"], "/");
    assert!(listed["children"].is_array());

    // Certificates for replicas and clients.
    let certs = empty_home.path().join("certs");
    let certs_arg = certs.display().to_string();
    let output = run(
        synod_with_home(empty_home.path()),
        &[
            "certs",
            "--dir",
            &certs_arg,
            "--node",
            "1=localhost,127.0.0.1",
            "--client",
            "app",
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for file in [
        "ca.pem",
        "ca-key.pem",
        "node-1.pem",
        "node-1-key.pem",
        "app.pem",
        "app-key.pem",
    ] {
        assert!(certs.join(file).exists(), "{file} missing");
    }
    let ca_before = std::fs::read(certs.join("ca.pem")).expect("ca.pem");
    let again = run(
        synod_with_home(empty_home.path()),
        &["certs", "--dir", &certs_arg, "--client", "app"],
    );
    assert!(!again.status.success(), "an existing certificate is kept");
    assert!(String::from_utf8_lossy(&again.stderr).contains("pass --force"));
    assert_eq!(
        std::fs::read(certs.join("ca.pem")).expect("ca.pem"),
        ca_before,
        "the CA is kept"
    );

    // A client certificate issued today from the running cluster's CA is
    // accepted by the cluster.
    let cluster_certs = certs_dir.display().to_string();
    let output = run(
        synod_with_home(empty_home.path()),
        &[
            "certs",
            "--dir",
            &cluster_certs,
            "--client",
            "ops",
            "--days",
            "30",
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("issuing from the CA"), "{stdout}");
    let mut command = synod_with_home(empty_home.path());
    command
        .env("SYNOD_ENDPOINTS", &endpoints)
        .env("SYNOD_CA", certs_dir.join("ca.pem"))
        .env("SYNOD_CERT", certs_dir.join("ops.pem"))
        .env("SYNOD_KEY", certs_dir.join("ops-key.pem"));
    let output = run(command, &["--json", "create", "/ops-was-here", "yes"]);
    assert!(
        output.status.success(),
        "the new certificate is accepted: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // A replica's certificate replaced with one from the same CA is taken
    // on SIGHUP, without a restart, and the replica goes on serving.
    let output = run(
        synod_with_home(empty_home.path()),
        &[
            "certs",
            "--dir",
            &cluster_certs,
            "--node",
            "1=127.0.0.1,localhost",
            "--force",
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pids = std::fs::read_to_string(cluster.data.path().join("pids")).expect("pids");
    let replica_1: i32 = pids
        .lines()
        .find_map(|line| line.strip_prefix("1 "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .expect("replica 1's pid");
    kill(Pid::from_raw(replica_1), Signal::SIGHUP).expect("replica 1 signalled");
    let log = cluster.data.path().join("node-1.log");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let reloaded = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().any(|line| {
            line.contains("TLS certificate reloaded") && line.contains("on_request=true")
        }) {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(reloaded, "replica 1 logs the reload on SIGHUP");
    let (code, stderr) = status_exit(&cluster);
    assert_eq!(code, 0, "every replica still serves: {stderr}");

    // Flags a command does not use are refused, not dropped.
    let output = run(
        synod_with_home(empty_home.path()),
        &["certs", "--dir", &certs_arg, "--endpoints", "127.0.0.1:1"],
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--endpoints"), "{stderr}");
    assert!(stderr.contains("synod certs"), "{stderr}");

    // A second `synod dev` on the same data finds what the first one kept.
    json(&cluster, &["create", "/kept", "yes"]);
    let stopped = cluster.stop();
    assert!(String::from_utf8_lossy(&stopped.stdout).contains("stopped the dev cluster"));
    cluster.start_again();
    let kept = json(&cluster, &["get", "/kept"]);
    assert_eq!(kept["data"], "yes");

    // Every replica up: `status` succeeds (scripts read its exit code).
    let (code, stderr) = status_exit(&cluster);
    assert_eq!(code, 0, "{stderr}");

    // With two replicas down there is no quorum and no session can open,
    // but `status` still reports every member, and exits non-zero.
    let pids = std::fs::read_to_string(cluster.data.path().join("pids")).expect("pids");
    for line in pids.lines().filter(|line| !line.starts_with("1 ")) {
        let pid: i32 = line
            .split_whitespace()
            .nth(1)
            .and_then(|pid| pid.parse().ok())
            .expect("pid");
        kill(Pid::from_raw(pid), Signal::SIGTERM).expect("replica signalled");
    }
    let output = run(cluster.synod(), &["--json", "status"]);
    assert_eq!(
        output.status.code(),
        Some(1),
        "status without a quorum fails"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no quorum"), "{stderr}");
    let status: Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    assert_eq!(status["quorum"], false, "{status}");
    let replicas = status["replicas"].as_array().expect("replicas");
    let reachable: Vec<bool> = replicas
        .iter()
        .map(|r| r["reachable"].as_bool().unwrap_or(false))
        .collect();
    assert_eq!(reachable, vec![true, false, false], "{status}");
    // The replica left says why it serves nothing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let waiting = loop {
        let output = run(cluster.synod(), &["--json", "status"]);
        let status: Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
        let waiting = status["replicas"][0]["waiting"].as_str().map(String::from);
        if waiting
            .as_deref()
            .is_some_and(|reason| reason.contains("no connection to members 2, 3"))
            || std::time::Instant::now() > deadline
        {
            break waiting;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let waiting = waiting.expect("replica 1 says why it waits");
    assert!(
        waiting.starts_with("no quorum: no connection to members 2, 3"),
        "{waiting}"
    );
    let output = run(cluster.synod(), &["status"]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("replica 1: no quorum"), "{text}");
}
