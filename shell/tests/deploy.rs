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
//! tool is installed. The Kubernetes manifests, rendered by `kubectl
//! kustomize` with certificates made as their guide says, pass a strict
//! schema check (`kubernetes-validate`), and the replica configs they carry
//! are valid; their pods' command lines, run as processes in mount
//! namespaces of their own with the pods' names mapped to loopback
//! addresses, form a cluster that serves under those names and takes a
//! restarted pod back (this one needs root, for the mounts).

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

/// Makes the pods' certificates into `dir` as the Kubernetes guide says,
/// with a client certificate `app`.
fn pod_certificates(dir: &Path) {
    let mut certs = Command::new(SYNOD);
    certs
        .arg("certs")
        .arg("--dir")
        .arg(dir)
        .args(["--client", "app"]);
    for id in 1..=3 {
        certs
            .arg("--node")
            .arg(format!("{id}=synod-{}.synod-peers", id - 1));
    }
    let output = run_bounded(certs, COMMAND_TIMEOUT);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_kubernetes_manifests_pass_a_schema_check() {
    // The guide's steps on a copy: certificates from `synod certs`, then
    // the resources kustomize renders from the directory.
    let dir = tempfile::tempdir().expect("temp dir");
    let source = root().join("deploy/kubernetes");
    for entry in std::fs::read_dir(&source).expect("deploy/kubernetes") {
        let path = entry.expect("an entry").path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().expect("a name")))
                .expect("copied");
        }
    }
    pod_certificates(&dir.path().join("certs"));

    // Each replica's config is valid as the replica reads it.
    for id in 1..=3 {
        let path = dir.path().join(format!("node-{id}.toml"));
        let config = synod_server::config::ReplicaConfig::load(&path).expect("a valid config");
        assert_eq!(config.id, id);
        assert!(config.me().peer_address.is_name(), "members are named");
    }

    // Every file kustomize is told to put in the ConfigMap or the Secret
    // is there.
    let kustomization =
        std::fs::read_to_string(dir.path().join("kustomization.yaml")).expect("kustomization");
    let listed: Vec<&str> = kustomization
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- "))
        .filter(|item| {
            [".toml", ".sh", ".pem"]
                .iter()
                .any(|end| item.ends_with(end))
        })
        .collect();
    assert_eq!(listed.len(), 11, "{listed:?}");
    for file in &listed {
        assert!(dir.path().join(file).is_file(), "{file} is there");
    }
    let mut expected = vec![
        "kind: StatefulSet",
        "kind: PodDisruptionBudget",
        "clusterIP: None",
        "path: /readyz",
        "path: /livez",
    ];
    let manifests = match Command::new("kubectl")
        .arg("kustomize")
        .arg(dir.path())
        .output()
    {
        Ok(rendered) => {
            assert!(
                rendered.status.success(),
                "{}",
                String::from_utf8_lossy(&rendered.stderr)
            );
            let manifests = dir.path().join("rendered.yaml");
            std::fs::write(&manifests, &rendered.stdout).expect("written");
            expected.extend(["kind: ConfigMap", "kind: Secret"]);
            manifests
        }
        Err(_) => {
            eprintln!(
                "kubectl is not installed here: synod.yaml is checked without the ConfigMap and \
                 Secret kustomize generates"
            );
            dir.path().join("synod.yaml")
        }
    };
    let text = std::fs::read_to_string(&manifests).expect("the manifests");
    for kind in expected {
        assert!(text.contains(kind), "the manifests hold {kind}");
    }
    let checked = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .arg("--quiet")
        .arg(&manifests)
        .output()
        .expect("python3 runs kubernetes-validate (pip install kubernetes-validate; .ci/run does)");
    assert!(
        checked.status.success(),
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

/// A pod run as Kubernetes would run it, as a process: killed when
/// dropped.
struct Pod(std::process::Child);

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts pod `ordinal`'s command line (the manifest's `command`, with its
/// environment) in a mount namespace of its own where `etc` is `/etc` (the
/// ConfigMap and the Secret under `/etc/synod`, and a hosts file mapping
/// the pods' names to loopback addresses) and `var_lib` is `/var/lib` (the
/// pod's volume at `/var/lib/synod`).
fn start_pod(ordinal: u32, etc: &Path, var_lib: &Path, log: &Path) -> Pod {
    let log = std::fs::File::create(log).expect("a log file");
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount --bind \"$1\" /etc && mount --bind \"$2\" /var/lib && \
             exec /bin/sh /etc/synod/config/start.sh",
        )
        .arg("pod")
        .arg(etc)
        .arg(var_lib)
        .env("PATH", path)
        .env("HOSTNAME", format!("synod-{ordinal}"))
        .env("POD_IP", format!("127.0.0.{}", 11 + ordinal))
        .env("SYNOD_INITIAL_CLUSTER_STATE", "new")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("a log file"))
        .stderr(log)
        .spawn()
        .expect("unshare starts");
    Pod(child)
}

#[test]
fn the_kubernetes_pod_commands_start_a_cluster_under_their_names() {
    let root_user = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0");
    let namespaces = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !root_user || !namespaces {
        eprintln!("not root, or no mount namespaces: the pods cannot be run here");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    // /etc as the pods see it: the ConfigMap's files, the Secret's, and a
    // hosts file naming the pods as the headless Service would.
    let etc = dir.path().join("etc");
    let config = etc.join("synod/config");
    std::fs::create_dir_all(&config).expect("a config directory");
    let source = root().join("deploy/kubernetes");
    for name in ["node-1.toml", "node-2.toml", "node-3.toml", "start.sh"] {
        std::fs::copy(source.join(name), config.join(name)).expect("copied");
    }
    let tls = etc.join("synod/tls");
    pod_certificates(&tls);
    let mut hosts = String::from("127.0.0.1 localhost\n::1 localhost\n");
    for ordinal in 0..3 {
        hosts.push_str(&format!(
            "127.0.0.{} synod-{ordinal}.synod-peers\n",
            11 + ordinal
        ));
    }
    std::fs::write(etc.join("hosts"), hosts).expect("hosts");
    for name in [
        "nsswitch.conf",
        "host.conf",
        "resolv.conf",
        "passwd",
        "group",
    ] {
        let _ = std::fs::copy(Path::new("/etc").join(name), etc.join(name));
    }
    let volume = |ordinal: u32| {
        let var_lib = dir.path().join(format!("var-lib-{ordinal}"));
        std::fs::create_dir_all(var_lib.join("synod")).expect("a volume");
        var_lib
    };
    let log = |ordinal: u32| dir.path().join(format!("pod-{ordinal}.log"));
    let mut pods: Vec<Option<Pod>> = (0..3)
        .map(|ordinal| Some(start_pod(ordinal, &etc, &volume(ordinal), &log(ordinal))))
        .collect();
    let http = |ordinal: u32| -> SocketAddr {
        format!("127.0.0.{}:7201", 11 + ordinal)
            .parse()
            .expect("an address")
    };
    let logs = || {
        (0..3)
            .map(|ordinal| std::fs::read_to_string(log(ordinal)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    for ordinal in 0..3 {
        let ready = eventually(Duration::from_secs(60), || {
            get(http(ordinal), "/readyz").is_some_and(|(status, _)| status == 200)
        });
        assert!(ready, "pod synod-{ordinal} becomes ready:\n{}", logs());
    }

    // A client in the cluster: it resolves the names the replicas give
    // (a leader is named by its client address), so it sees the same /etc.
    let synod = |args: &[&str]| {
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount --bind \"$1\" /etc && shift && exec \"$@\"")
            .arg("client")
            .arg(&etc)
            .arg(SYNOD)
            .arg("--endpoints")
            .arg("synod-0.synod-peers:7101,synod-1.synod-peers:7101,synod-2.synod-peers:7101")
            .arg("--ca")
            .arg(tls.join("ca.pem"))
            .arg("--cert")
            .arg(tls.join("app.pem"))
            .arg("--key")
            .arg(tls.join("app-key.pem"))
            .args(args);
        run_bounded(command, COMMAND_TIMEOUT)
    };
    let output = synod(&["create", "/on-kubernetes", "yes"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = synod(&["--json", "status"]);
    let status = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{status}");
    assert!(
        status.contains("synod-2.synod-peers:7101"),
        "members by name: {status}"
    );

    // A pod that restarts finds its volume and rejoins without a flag.
    if let Some(mut pod) = pods[1].take() {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pod.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("signalled");
        let _ = pod.0.wait();
    }
    pods[1] = Some(start_pod(
        1,
        &etc,
        &volume(1),
        &dir.path().join("pod-1-again.log"),
    ));
    let ready = eventually(Duration::from_secs(60), || {
        get(http(1), "/readyz").is_some_and(|(status, _)| status == 200)
    });
    assert!(ready, "the restarted pod is ready again:\n{}", logs());
    let output = synod(&["get", "/on-kubernetes"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Stop the pods as the kubelet would: SIGTERM, then wait.
    for pod in pods.iter_mut().filter_map(Option::as_mut) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pod.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    for pod in pods.iter_mut().filter_map(Option::as_mut) {
        let status = pod.0.wait().expect("the pod ends");
        assert!(status.success(), "a pod stops cleanly on SIGTERM: {status}");
    }
}
