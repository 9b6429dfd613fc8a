//! A real 3-replica cluster of `synod-server` processes on 127.0.0.1 for the
//! client's integration tests: ports are picked by binding UDP sockets on
//! port 0 and releasing them just before the replicas start, certificates
//! come from a fresh development CA, and configs, databases and logs live in
//! a temporary directory. Replicas are killed with SIGKILL on request and
//! always on drop, so no process outlives its test.
//!
//! The client crate cannot depend on `synod-server`, so the binary is found
//! at `<target>/release/synod-server` and built once per test process when
//! missing or older than its sources. Helper programs (the `lock` and `election` examples) are found
//! beside it in `<target>/release/examples/`.

#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use synod_client::{Client, ClientError};
use synod_proto::certgen::{generate_dev_certs, DevCerts};
use tempfile::TempDir;

/// The workspace's target directory.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the client crate lives in the workspace")
        .join("target")
}

fn cargo_build(args: &[&str]) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf();
    let status = Command::new(cargo)
        .args(args)
        .current_dir(workspace)
        .status()
        .expect("run cargo");
    assert!(status.success(), "cargo {args:?} failed");
}

/// The newest modification time of any file under `dir`.
fn newest_change(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut stack = vec![dir.to_path_buf()];
    for _ in 0..10_000 {
        let Some(dir) = stack.pop() else { break };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(modified) = entry.metadata().and_then(|m| m.modified()) {
                newest = newest.max(Some(modified));
            }
        }
    }
    newest
}

/// The `synod-server` binary, built once if missing or older than the
/// sources it is built from (CI's `cargo test --workspace` builds it
/// anyway).
pub fn server_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let path = target_dir().join("release").join("synod-server");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace")
            .to_path_buf();
        let sources = ["server/src", "paxos/src", "proto/src"]
            .iter()
            .filter_map(|dir| newest_change(&workspace.join(dir)))
            .max();
        let built = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if built.is_none() || built < sources {
            cargo_build(&["build", "--release", "-p", "synod-server"]);
        }
        assert!(path.is_file(), "{} was not built", path.display());
        path
    })
}

/// An example of this crate as a program, built once if missing.
pub fn example_binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let path = target_dir().join("release").join("examples").join(name);
    if !path.is_file() {
        BUILT.get_or_init(|| {
            cargo_build(&["build", "--release", "-p", "synod-client", "--examples"]);
        });
    }
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// One replica's addresses.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: u64,
    pub peer: SocketAddr,
    pub client: SocketAddr,
}

/// A running cluster of replica processes.
pub struct ProcessCluster {
    /// Extra TOML appended to every replica's configuration.
    extra_toml: String,
    pub dir: TempDir,
    pub certs: DevCerts,
    pub members: Vec<Member>,
    children: Vec<Option<Child>>,
}

fn free_port() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").expect("bind a loopback port")
}

impl ProcessCluster {
    /// Starts a 3-replica cluster and waits until it serves a write.
    pub async fn start() -> ProcessCluster {
        ProcessCluster::start_with("").await
    }

    /// As [`ProcessCluster::start`], appending `extra_toml` (tables such as
    /// `[limits]`) to every replica's configuration.
    pub async fn start_with(extra_toml: &str) -> ProcessCluster {
        let binary = server_binary().to_path_buf();
        let dir = tempfile::tempdir().expect("temp dir");
        let ids = [1u64, 2, 3];
        let hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let certs = generate_dev_certs(&dir.path().join("certs"), &ids, &hosts).expect("certs");
        let mut sockets = Vec::new();
        let mut members = Vec::new();
        for id in ids {
            let peer = free_port();
            let client = free_port();
            members.push(Member {
                id,
                peer: peer.local_addr().expect("address"),
                client: client.local_addr().expect("address"),
            });
            sockets.push((peer, client));
        }
        let mut cluster = ProcessCluster {
            extra_toml: extra_toml.to_string(),
            dir,
            certs,
            members,
            children: Vec::new(),
        };
        for id in ids {
            let text = cluster.config_text(id);
            std::fs::write(cluster.config_path(id), text).expect("write config");
        }
        // Release the ports just before the replicas bind them.
        drop(sockets);
        for index in 0..ids.len() {
            let child = cluster.spawn(&binary, index, true);
            cluster.children.push(Some(child));
        }
        cluster.wait_ready(Duration::from_secs(30)).await;
        cluster
    }

    fn config_path(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node-{id}.toml"))
    }

    fn config_text(&self, id: u64) -> String {
        let files = self.certs.node(id);
        let mut text = format!(
            "cluster_id = \"client-tests\"\nid = {id}\ndata_dir = {:?}\n\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\n",
            self.dir.path().join(format!("data-{id}")),
            files.ca,
            files.cert,
            files.key,
        );
        for member in &self.members {
            text.push_str(&format!(
                "[[members]]\nid = {}\npeer_address = \"{}\"\nclient_address = \"{}\"\n\n",
                member.id, member.peer, member.client
            ));
        }
        text.push_str(&self.extra_toml);
        text
    }

    fn spawn(&self, binary: &Path, index: usize, bootstrap: bool) -> Child {
        let id = self.members[index].id;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node-{id}.log")))
            .expect("log file");
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(self.config_path(id))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if bootstrap {
            command.arg("--bootstrap");
        }
        command.spawn().expect("start synod-server")
    }

    /// Waits until a client can open a session and write.
    async fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut last_error = None;
        while Instant::now() < deadline {
            match self.try_client(0, 3000).await {
                Ok(client) => match client.sync().await {
                    Ok(()) => {
                        client.close().await;
                        return;
                    }
                    Err(error) => last_error = Some(error),
                },
                Err(error) => last_error = Some(error),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "the cluster did not become ready in {within:?}: {last_error:?}; logs in {}",
            self.dir.path().display()
        );
    }

    /// Client addresses, starting with replica `first` (0-based).
    pub fn endpoints(&self, first: usize) -> Vec<String> {
        let count = self.members.len();
        (0..count)
            .map(|offset| self.members[(first + offset) % count].client.to_string())
            .collect()
    }

    /// A client that talks to replica `first` while it is up.
    pub async fn try_client(
        &self,
        first: usize,
        session_timeout_ms: u64,
    ) -> Result<Client, ClientError> {
        Client::builder()
            .endpoints(self.endpoints(first))
            .tls(self.certs.client())
            .session_timeout_ms(session_timeout_ms)
            .request_timeout_ms(8_000)
            .connect()
            .await
    }

    /// A client that talks to replica `first` while it is up.
    pub async fn client(&self, first: usize, session_timeout_ms: u64) -> Client {
        self.try_client(first, session_timeout_ms)
            .await
            .expect("client connects")
    }

    /// The index of the replica with this node id.
    pub fn index_of(&self, node_id: u64) -> usize {
        self.members
            .iter()
            .position(|m| m.id == node_id)
            .expect("a member")
    }

    /// The index of the replica a client is connected to.
    pub fn serving(&self, client: &Client) -> Option<usize> {
        match *client.state().borrow() {
            synod_client::SessionState::Connected { node_id, .. } => Some(self.index_of(node_id)),
            _ => None,
        }
    }

    /// The index of the replica that leads, as `client`'s replica sees it.
    pub async fn leader(&self, client: &Client) -> Option<usize> {
        for _ in 0..100 {
            if let Ok(status) = client.status().await {
                if let Some(leader) = status.replica.leader {
                    return Some(self.index_of(leader));
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Kills replica `index` with SIGKILL and reaps it.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.children[index].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts replica `index` again from its data directory.
    pub fn restart(&mut self, index: usize) {
        assert!(self.children[index].is_none(), "replica {index} is running");
        let child = self.spawn(server_binary(), index, false);
        self.children[index] = Some(child);
    }

    /// Environment for a helper program to reach this cluster.
    pub fn program(&self, binary: &Path, first: usize, session_timeout_ms: u64) -> Command {
        let mut command = Command::new(binary);
        command
            .env("SYNOD_ENDPOINTS", self.endpoints(first).join(","))
            .env("SYNOD_CERTS", &self.certs.dir)
            .env("SYNOD_SESSION_TIMEOUT_MS", session_timeout_ms.to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        command
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        for index in 0..self.children.len() {
            self.kill(index);
        }
    }
}

/// A helper process killed (SIGKILL) and reaped on drop.
pub struct Helper {
    pub child: Child,
}

impl Helper {
    /// Kills it now, as `kill -9` would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` every 50 ms until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Logs of the client library to the test's output, filtered by `RUST_LOG`
/// (default `warn`).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Lines a helper program prints, read on a thread of their own.
pub struct Lines {
    receiver: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Lines {
    /// Reads `child`'s stdout (which must be piped).
    pub fn of(child: &mut Child) -> Lines {
        let stdout = child.stdout.take().expect("stdout is piped");
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Lines { receiver }
    }

    /// The next line starting with `prefix`, within `within`.
    pub async fn expect(&mut self, prefix: &str, within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.receiver.recv()).await {
                Ok(Some(line)) if line.starts_with(prefix) => return line,
                Ok(Some(_)) => {}
                Ok(None) => panic!("the program ended before printing {prefix:?}"),
                Err(_) => panic!("no line {prefix:?} within {within:?}"),
            }
        }
    }
}

/// The number after `token ` in a line a helper program printed.
pub fn token_in(line: &str) -> u64 {
    line.rsplit_once("token ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|number| number.trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("no token in {line:?}"))
}
