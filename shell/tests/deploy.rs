//! The files in `deploy/`, used as an operator would use them. The local
//! 3-replica configs, copied to a temporary directory with free ports in
//! place of theirs (nothing else changed), are started from the release
//! binaries by `deploy/local.sh`; each replica tells the service manager it
//! is ready (`READY=1` on `$NOTIFY_SOCKET`, as under systemd's
//! `Type=notify`) and answers `/readyz`; its `/metrics` parse as Prometheus
//! text, the write and latency series move when clients write, and the
//! survivors count a leader change after the leader is stopped; then
//! `deploy/local.sh stop` stops everything and each replica says it is
//! stopping. The systemd unit passes `systemd-analyze verify` where that
//! tool is installed.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{run_bounded, COMMAND_TIMEOUT, SYNOD};
use prometheus_parse::{Sample, Scrape, Value};

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

/// Where the release binaries are (`synod` and `synod-server` beside it).
fn bin_dir() -> PathBuf {
    Path::new(SYNOD)
        .parent()
        .expect("a directory")
        .to_path_buf()
}

/// A free port on 127.0.0.1 for UDP (QUIC) or TCP (HTTP).
fn free_port(tcp: bool) -> u16 {
    if tcp {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free TCP port")
            .port()
    } else {
        UdpSocket::bind("127.0.0.1:0")
            .and_then(|socket| socket.local_addr())
            .expect("a free UDP port")
            .port()
    }
}

/// Copies `deploy/local-3`'s configs into `dir`, each fixed port replaced
/// by a free one (the same replacement in every file); returns the HTTP
/// addresses by node id.
fn copy_configs(dir: &Path) -> BTreeMap<u64, SocketAddr> {
    let source = root().join("deploy/local-3");
    let mut texts: Vec<(String, String)> = std::fs::read_dir(&source)
        .expect("deploy/local-3")
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            (name.starts_with("node-") && name.ends_with(".toml")).then_some(name)
        })
        .map(|name| {
            let text = std::fs::read_to_string(source.join(&name)).expect("a config");
            (name, text)
        })
        .collect();
    texts.sort();
    assert_eq!(texts.len(), 3, "three replicas in deploy/local-3");
    let mut ports = BTreeMap::new();
    for (_, text) in &texts {
        for (at, _) in text.match_indices("127.0.0.1:") {
            let digits: String = text[at + 10..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            let port: u16 = digits.parse().expect("a port");
            let http = text[..at].ends_with("http_address = \"");
            ports.entry(port).or_insert_with(|| free_port(http));
        }
    }
    let mut http = BTreeMap::new();
    for (name, text) in &texts {
        let mut copied = text.clone();
        for (old, new) in &ports {
            copied = copied.replace(&format!("127.0.0.1:{old}\""), &format!("127.0.0.1:{new}\""));
        }
        let id: u64 = name
            .trim_start_matches("node-")
            .trim_end_matches(".toml")
            .parse()
            .expect("node-<id>.toml");
        let line = copied
            .lines()
            .find_map(|line| line.strip_prefix("http_address = \""))
            .expect("an HTTP address");
        http.insert(id, line.trim_end_matches('"').parse().expect("an address"));
        std::fs::write(dir.join(name), copied).expect("written");
    }
    http
}

/// Runs `deploy/local.sh ACTION DIR`, with `NOTIFY_SOCKET` set.
fn local_sh(action: &str, dir: &Path, notify: &Path) -> std::process::Output {
    let mut command = Command::new(root().join("deploy/local.sh"));
    command
        .arg(action)
        .arg(dir)
        .env("SYNOD_BIN_DIR", bin_dir())
        .env("NOTIFY_SOCKET", notify);
    run_bounded(command, Duration::from_secs(240))
}

/// Stops the cluster in `dir` when dropped, whatever happened.
struct Running<'a> {
    dir: &'a Path,
    notify: &'a Path,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let _ = local_sh("stop", self.dir, self.notify);
    }
}

/// One `GET` over HTTP/1.1: the status code and the body.
fn get(address: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

fn scrape(address: SocketAddr) -> Vec<Sample> {
    let (status, body) = get(address, "/metrics").expect("the metrics answer");
    assert_eq!(status, 200, "{body}");
    Scrape::parse(body.lines().map(|line| Ok(line.to_string())))
        .expect("the metrics parse as Prometheus text")
        .samples
}

/// The value of the sample `name` with all of `labels` (0 when absent).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|sample| sample.metric == name)
        .find(|sample| {
            labels
                .iter()
                .all(|(label, wanted)| sample.labels.get(label) == Some(*wanted))
        })
        .map_or(0.0, |sample| match &sample.value {
            Value::Counter(value) | Value::Gauge(value) | Value::Untyped(value) => *value,
            Value::Histogram(buckets) => buckets.last().map_or(0.0, |bucket| bucket.count),
            Value::Summary(_) => f64::NAN,
        })
}

/// Waits up to `within` for `check`.
fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// The notifications received so far, one string per datagram.
fn notifications(socket: &UnixDatagram) -> Vec<String> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while let Ok(length) = socket.recv(&mut buffer) {
        received.push(String::from_utf8_lossy(&buffer[..length]).to_string());
    }
    received
}

#[test]
fn the_local_configs_run_from_the_release_binaries_and_report_metrics() {
    let dir = tempfile::tempdir().expect("temp dir");
    let http = copy_configs(dir.path());
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("a notify socket");
    notify.set_nonblocking(true).expect("non-blocking");

    let started = local_sh("start", dir.path(), &notify_path);
    let running = Running {
        dir: dir.path(),
        notify: &notify_path,
    };
    assert!(
        started.status.success(),
        "deploy/local.sh start:\n{}\n{}",
        String::from_utf8_lossy(&started.stdout),
        String::from_utf8_lossy(&started.stderr)
    );
    let mut told = Vec::new();
    let ready = eventually(Duration::from_secs(10), || {
        told.extend(notifications(&notify));
        told.iter().filter(|text| text.contains("READY=1")).count() == 3
    });
    assert!(ready, "every replica notifies READY=1: {told:?}");
    for (id, &address) in &http {
        let answered = eventually(Duration::from_secs(30), || {
            get(address, "/readyz").is_some_and(|(status, _)| status == 200)
        });
        assert!(answered, "replica {id} becomes ready");
    }

    let before: BTreeMap<u64, Vec<Sample>> = http
        .iter()
        .map(|(&id, &address)| (id, scrape(address)))
        .collect();
    let synod = |args: &[&str]| {
        let mut command = Command::new(SYNOD);
        command
            .current_dir(dir.path())
            .arg("--config")
            .arg(dir.path().join("client.toml"))
            .args(args);
        run_bounded(command, COMMAND_TIMEOUT)
    };
    for i in 0..20 {
        let output = synod(&["create", &format!("/deployed-{i}"), "x"]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let after: BTreeMap<u64, Vec<Sample>> = http
        .iter()
        .map(|(&id, &address)| (id, scrape(address)))
        .collect();
    let sum = |scrapes: &BTreeMap<u64, Vec<Sample>>, name: &str, labels: &[(&str, &str)]| {
        scrapes
            .values()
            .map(|samples| value(samples, name, labels))
            .sum::<f64>()
    };
    let creates = [("op", "create"), ("result", "ok")];
    assert!(
        sum(&after, "synod_client_requests_total", &creates)
            >= sum(&before, "synod_client_requests_total", &creates) + 20.0,
        "the creates are counted"
    );
    let create_latency = [("op", "create")];
    assert!(
        sum(&after, "synod_client_request_seconds", &create_latency)
            >= sum(&before, "synod_client_request_seconds", &create_latency) + 20.0,
        "their latencies are recorded"
    );
    for id in http.keys() {
        assert!(
            value(&after[id], "synod_storage_commit_seconds", &[])
                > value(&before[id], "synod_storage_commit_seconds", &[]),
            "replica {id} committed the log"
        );
    }

    // Stop the leader: the survivors count a leader change.
    let leader = *after
        .iter()
        .find(|(_, samples)| value(samples, "synod_role", &[("role", "leader")]) == 1.0)
        .expect("a leader")
        .0;
    let pid: i32 = std::fs::read_to_string(dir.path().join(format!("data/node-{leader}.pid")))
        .expect("the leader's pid file")
        .trim()
        .parse()
        .expect("a pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("the leader signalled");
    let survivors_before: f64 = after
        .iter()
        .filter(|(&id, _)| id != leader)
        .map(|(_, samples)| value(samples, "synod_leader_changes_total", &[]))
        .sum();
    let counted = eventually(Duration::from_secs(30), || {
        let survivors: BTreeMap<u64, Vec<Sample>> = http
            .iter()
            .filter(|(&id, _)| id != leader)
            .map(|(&id, &address)| (id, scrape(address)))
            .collect();
        let changes = sum(&survivors, "synod_leader_changes_total", &[]);
        let led = survivors
            .values()
            .any(|samples| value(samples, "synod_role", &[("role", "leader")]) == 1.0);
        led && changes > survivors_before
    });
    assert!(counted, "a survivor leads and the change is counted");
    let output = synod(&["get", "/deployed-19"]);
    assert!(
        output.status.success(),
        "the survivors serve: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    drop(running);
    let stopping = eventually(Duration::from_secs(10), || {
        told.extend(notifications(&notify));
        told.iter()
            .filter(|text| text.contains("STOPPING=1"))
            .count()
            == 3
    });
    assert!(stopping, "every replica notifies STOPPING=1: {told:?}");
    for id in http.keys() {
        assert!(
            !dir.path().join(format!("data/node-{id}.pid")).exists(),
            "replica {id} is stopped"
        );
    }
}

#[test]
fn the_systemd_unit_verifies() {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze is not installed here; the unit is not checked");
        return;
    };
    assert!(version.status.success());
    // Only the command's path changes, to an executable that exists here
    // (verify refuses a unit whose command is missing; it does not run it).
    let unit = std::fs::read_to_string(root().join("deploy/systemd/synod-server.service"))
        .expect("the unit");
    assert!(unit.contains("Type=notify"), "readiness from the replica");
    let here = unit.replace("/usr/local/bin/synod-server", SYNOD);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("synod-server.service");
    std::fs::write(&path, here).expect("written");
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.trim().is_empty(), "no warning: {stderr}");
}
