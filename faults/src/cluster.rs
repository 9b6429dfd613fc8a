//! A cluster of `synod-server` processes on this machine, each replica on
//! its own loopback address (`127.<a>.<b>.<id>`) so the firewall can cut
//! the links between them one by one, with its data on disk in the run's
//! directory and its output in `node-<id>.log` there.
//!
//! The harness kills (`SIGKILL`), pauses (`SIGSTOP`/`SIGCONT`), restarts,
//! wipes (a lost disk, restarted with `--join`) and skews the clock of
//! replicas. Dropping the cluster kills every process it started.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use prometheus_parse::{Sample, Scrape, Value};
use synod_proto::certgen::{generate_dev_certs, DevCerts};

/// The port every replica's peer endpoint listens on (at its own address).
pub const PEER_PORT: u16 = 7001;
/// The port every replica's client endpoint listens on.
pub const CLIENT_PORT: u16 = 7101;
/// The port of every replica's HTTP listener (metrics).
pub const HTTP_PORT: u16 = 7201;

/// The loopback addresses of one run: replicas at `.1`..`.N`, clients from
/// `.100` up, in a `/24` of `127.0.0.0/8` chosen so that parallel runs do
/// not meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressPlan {
    prefix: [u8; 3],
}

impl AddressPlan {
    /// A `/24` for this process: `127.<a>.<b>.0` with `a`, `b` from the
    /// process id and `run`.
    pub fn for_process(run: u32) -> AddressPlan {
        let key = std::process::id().wrapping_mul(31).wrapping_add(run);
        AddressPlan {
            prefix: [127, 100 + (key % 100) as u8, ((key / 100) % 250) as u8 + 1],
        }
    }

    /// Replica `id`'s address.
    pub fn replica(&self, id: u64) -> Ipv4Addr {
        let [a, b, c] = self.prefix;
        Ipv4Addr::new(a, b, c, id as u8)
    }

    /// Client worker `index`'s address.
    pub fn client(&self, index: u32) -> Ipv4Addr {
        let [a, b, c] = self.prefix;
        Ipv4Addr::new(a, b, c, 100 + (index % 150) as u8)
    }
}

/// How a replica process is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// A founding member's first start.
    Bootstrap,
    /// Every later start, from its data directory.
    Restart,
    /// After its disk was lost: an empty database that rejoins.
    Join,
}

/// A deliberate clock error of one replica (`--test-clock-*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skew {
    /// Milliseconds added to the wall clock at the start.
    pub offset_ms: i64,
    /// Parts per million the clock runs fast (negative: slow).
    pub rate_ppm: i64,
}

/// The cluster's timeouts, written into every replica's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// The leader's lease.
    pub lease_ms: u64,
    /// The lower bound of the election timeout.
    pub election_timeout_min_ms: u64,
    /// Its upper bound.
    pub election_timeout_max_ms: u64,
    /// The clock-rate margin the lease assumes.
    pub clock_drift_margin_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            lease_ms: 1000,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 1600,
            clock_drift_margin_ms: 100,
        }
    }
}

struct ReplicaProcess {
    id: u64,
    config: PathBuf,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    paused: bool,
    skew: Skew,
}

/// The cluster's processes.
pub struct Cluster {
    plan: AddressPlan,
    dir: PathBuf,
    server_binary: PathBuf,
    certs: DevCerts,
    timeouts: Timeouts,
    replicas: Vec<ReplicaProcess>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.dir)
            .field("replicas", &self.replicas.len())
            .finish()
    }
}

impl Cluster {
    /// Writes certificates and configurations for `size` replicas under
    /// `dir` and starts them (bootstrapping).
    ///
    /// # Errors
    /// Files that cannot be written, or a process that does not start.
    pub fn start(
        dir: &Path,
        size: u64,
        plan: AddressPlan,
        server_binary: &Path,
        timeouts: Timeouts,
    ) -> Result<Cluster> {
        if !server_binary.is_file() {
            bail!(
                "no synod-server at {} (build it: cargo build --release --bins)",
                server_binary.display()
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let ids: Vec<u64> = (1..=size).collect();
        let hosts: Vec<String> = ids.iter().map(|&id| plan.replica(id).to_string()).collect();
        let certs = generate_dev_certs(&dir.join("certs"), &ids, &hosts)?;
        let mut cluster = Cluster {
            plan,
            dir: dir.to_path_buf(),
            server_binary: server_binary.to_path_buf(),
            certs,
            timeouts,
            replicas: Vec::new(),
        };
        for &id in &ids {
            let config = dir.join(format!("node-{id}.toml"));
            let data = dir.join(format!("data-{id}"));
            std::fs::write(&config, cluster.config_text(id, &data))
                .with_context(|| format!("write {}", config.display()))?;
            cluster.replicas.push(ReplicaProcess {
                id,
                config,
                data,
                log: dir.join(format!("node-{id}.log")),
                child: None,
                paused: false,
                skew: Skew::default(),
            });
        }
        for &id in &ids {
            cluster.spawn(id, StartMode::Bootstrap)?;
        }
        Ok(cluster)
    }

    fn config_text(&self, id: u64, data: &Path) -> String {
        let tls = self.certs.node(id);
        let t = self.timeouts;
        let mut text = format!(
            "cluster_id = \"faults\"\nid = {id}\ndata_dir = {data:?}\n\n\
             [tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\n\
             [monitoring]\nhttp_address = \"{ip}:{HTTP_PORT}\"\n\n\
             [timeouts]\nlease_ms = {lease}\nelection_timeout_min_ms = {emin}\n\
             election_timeout_max_ms = {emax}\nclock_drift_margin_ms = {drift}\n\
             session_timeout_min_ms = 1000\n\n\
             [limits]\nclient_connections_per_identity_max = 10000\n\n\
             [log]\nlevel = {log_level:?}\n",
            log_level = server_log_level(),
            ca = tls.ca,
            cert = tls.cert,
            key = tls.key,
            ip = self.plan.replica(id),
            lease = t.lease_ms,
            emin = t.election_timeout_min_ms,
            emax = t.election_timeout_max_ms,
            drift = t.clock_drift_margin_ms,
        );
        for member in 1..=self.size() {
            let ip = self.plan.replica(member);
            text.push_str(&format!(
                "\n[[members]]\nid = {member}\npeer_address = \"{ip}:{PEER_PORT}\"\n\
                 client_address = \"{ip}:{CLIENT_PORT}\"\n"
            ));
        }
        text
    }

    /// The number of members (configured, whether running or not).
    pub fn size(&self) -> u64 {
        self.replicas.len().max(self.certs.node_ids.len()) as u64
    }

    /// The members' ids.
    pub fn ids(&self) -> Vec<u64> {
        (1..=self.size()).collect()
    }

    /// The run's addresses.
    pub fn plan(&self) -> AddressPlan {
        self.plan
    }

    /// Every replica's client address, in member order.
    pub fn client_endpoints(&self) -> Vec<String> {
        self.ids()
            .iter()
            .map(|&id| format!("{}:{CLIENT_PORT}", self.plan.replica(id)))
            .collect()
    }

    /// The directory of the client certificate (`ca.pem`, `client.pem`).
    pub fn certs_dir(&self) -> &Path {
        &self.certs.dir
    }

    fn replica(&mut self, id: u64) -> Result<&mut ReplicaProcess> {
        self.replicas
            .iter_mut()
            .find(|replica| replica.id == id)
            .with_context(|| format!("no replica {id}"))
    }

    fn spawn(&mut self, id: u64, mode: StartMode) -> Result<()> {
        let binary = self.server_binary.clone();
        let replica = self.replica(id)?;
        if replica.child.is_some() {
            bail!("replica {id} is already running");
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&replica.log)
            .with_context(|| format!("open {}", replica.log.display()))?;
        writeln!(
            log,
            "=== harness: start replica {id} ({mode:?}, {:?})",
            replica.skew
        )?;
        let mut command = Command::new(&binary);
        command
            .arg("--config")
            .arg(&replica.config)
            .arg(format!("--test-clock-offset-ms={}", replica.skew.offset_ms))
            .arg(format!("--test-clock-rate-ppm={}", replica.skew.rate_ppm))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        match mode {
            StartMode::Bootstrap => {
                command.arg("--bootstrap");
            }
            StartMode::Join => {
                command.arg("--join");
            }
            StartMode::Restart => {}
        }
        let child = command
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        replica.child = Some(child);
        replica.paused = false;
        Ok(())
    }

    /// Whether replica `id`'s process runs (possibly paused).
    pub fn is_running(&self, id: u64) -> bool {
        self.replicas
            .iter()
            .any(|replica| replica.id == id && replica.child.is_some())
    }

    /// Whether replica `id` is stopped by `SIGSTOP`.
    pub fn is_paused(&self, id: u64) -> bool {
        self.replicas
            .iter()
            .any(|replica| replica.id == id && replica.paused)
    }

    /// Kills replica `id` with `SIGKILL` and reaps it.
    ///
    /// # Errors
    /// No such replica.
    pub fn kill(&mut self, id: u64) -> Result<()> {
        let replica = self.replica(id)?;
        if let Some(mut child) = replica.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        replica.paused = false;
        Ok(())
    }

    /// Starts replica `id` again from its data directory.
    ///
    /// # Errors
    /// It runs already, or the process does not start.
    pub fn restart(&mut self, id: u64) -> Result<()> {
        self.spawn(id, StartMode::Restart)
    }

    /// Kills replica `id`, removes its data directory (a lost disk) and
    /// starts it with `--join`.
    ///
    /// # Errors
    /// The directory cannot be removed, or the process does not start.
    pub fn wipe_and_join(&mut self, id: u64) -> Result<()> {
        self.kill(id)?;
        let data = self.replica(id)?.data.clone();
        if data.exists() {
            std::fs::remove_dir_all(&data).with_context(|| format!("remove {}", data.display()))?;
        }
        self.spawn(id, StartMode::Join)
    }

    /// Restarts replica `id` with its clock skewed by `skew`.
    ///
    /// # Errors
    /// As [`Cluster::restart`].
    pub fn restart_skewed(&mut self, id: u64, skew: Skew) -> Result<()> {
        self.kill(id)?;
        self.replica(id)?.skew = skew;
        self.spawn(id, StartMode::Restart)
    }

    fn signal(&mut self, id: u64, signal: Signal) -> Result<()> {
        let replica = self.replica(id)?;
        let Some(child) = &replica.child else {
            return Ok(());
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).context("a pid")?);
        kill(pid, signal).with_context(|| format!("{signal} to replica {id}"))?;
        replica.paused = signal == Signal::SIGSTOP;
        Ok(())
    }

    /// Stops replica `id` with `SIGSTOP`.
    ///
    /// # Errors
    /// The signal cannot be sent.
    pub fn pause(&mut self, id: u64) -> Result<()> {
        self.signal(id, Signal::SIGSTOP)
    }

    /// Lets a paused replica `id` run again (`SIGCONT`).
    ///
    /// # Errors
    /// The signal cannot be sent.
    pub fn resume(&mut self, id: u64) -> Result<()> {
        self.signal(id, Signal::SIGCONT)
    }

    /// Notes any replica process that exited by itself (a crash, a refused
    /// start) and returns `(id, exit status)` for each.
    pub fn reap_exited(&mut self) -> Vec<(u64, String)> {
        let mut exited = Vec::new();
        for replica in &mut self.replicas {
            if let Some(child) = &mut replica.child {
                if let Ok(Some(status)) = child.try_wait() {
                    exited.push((replica.id, status.to_string()));
                    replica.child = None;
                    replica.paused = false;
                }
            }
        }
        exited
    }

    /// Replica `id`'s metrics, if its HTTP listener answers within a second.
    pub async fn metrics(&self, id: u64) -> Option<Vec<Sample>> {
        let address = SocketAddr::from((self.plan.replica(id), HTTP_PORT));
        let body = http_get(address, "/metrics").await?;
        let lines = body.lines().map(|line| Ok(line.to_string()));
        Scrape::parse(lines).ok().map(|scrape| scrape.samples)
    }

    /// Replica `id`'s answer to `/readyz` (JSON; with a `reason` when it is
    /// not ready), if its HTTP listener answers within a second.
    pub async fn readiness(&self, id: u64) -> Option<serde_json::Value> {
        let address = SocketAddr::from((self.plan.replica(id), HTTP_PORT));
        let (_, body) = http_get_any(address, "/readyz").await?;
        serde_json::from_str(&body).ok()
    }

    /// The replica that says it leads, among the running, unpaused ones.
    pub async fn leader(&self) -> Option<u64> {
        for id in self.ids() {
            if !self.is_running(id) || self.is_paused(id) {
                continue;
            }
            if let Some(samples) = self.metrics(id).await {
                if gauge(&samples, "synod_role", &[("role", "leader")]) == Some(1.0) {
                    return Some(id);
                }
            }
        }
        None
    }

    /// Each running, unpaused replica's applied slot.
    pub async fn applied_slots(&self) -> Vec<(u64, Option<u64>)> {
        let mut slots = Vec::new();
        for id in self.ids() {
            let slot = if self.is_running(id) && !self.is_paused(id) {
                self.metrics(id)
                    .await
                    .and_then(|samples| gauge(&samples, "synod_applied_slot", &[]))
                    .map(|value| value as u64)
            } else {
                None
            };
            slots.push((id, slot));
        }
        slots
    }

    /// Waits until some replica leads, for at most `within`.
    pub async fn wait_for_leader(&self, within: Duration) -> Option<u64> {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if let Some(leader) = self.leader().await {
                return Some(leader);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Waits until replica `id` has applied what the most advanced replica
    /// had applied when the wait began, for at most `within`.
    pub async fn wait_caught_up(&self, id: u64, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let target = self
            .applied_slots()
            .await
            .into_iter()
            .filter_map(|(_, slot)| slot)
            .max()
            .unwrap_or(0);
        while tokio::time::Instant::now() < deadline {
            let slots = self.applied_slots().await;
            let applied = slots
                .iter()
                .find(|(replica, _)| *replica == id)
                .and_then(|(_, slot)| *slot);
            if applied.is_some_and(|slot| slot >= target) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    /// Waits until every replica has applied what the most advanced one
    /// had applied when the wait began, for at most `within`; how long it
    /// took, or `None` when some replica did not get there.
    pub async fn wait_all_caught_up(&self, within: Duration) -> Option<Duration> {
        let started = tokio::time::Instant::now();
        let target = self
            .applied_slots()
            .await
            .into_iter()
            .filter_map(|(_, slot)| slot)
            .max()?;
        while started.elapsed() < within {
            let slots = self.applied_slots().await;
            if slots
                .iter()
                .all(|(_, slot)| slot.is_some_and(|slot| slot >= target))
            {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }

    /// Replica `id`'s log file.
    pub fn log_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node-{id}.log"))
    }

    /// Kills every process (resuming paused ones first).
    pub fn stop_all(&mut self) {
        for id in self.ids() {
            let _ = self.resume(id);
            let _ = self.kill(id);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// The value of the gauge `name` with all of `labels`.
pub fn gauge(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .filter(|sample| sample.metric == name)
        .find(|sample| {
            labels
                .iter()
                .all(|(label, wanted)| sample.labels.get(label) == Some(*wanted))
        })
        .and_then(|sample| match &sample.value {
            Value::Counter(value) | Value::Gauge(value) | Value::Untyped(value) => Some(*value),
            _ => None,
        })
}

/// One `GET` over HTTP/1.1 with a one-second budget: the body of a `200`.
async fn http_get(address: SocketAddr, path: &str) -> Option<String> {
    let (ok, body) = http_get_any(address, path).await?;
    ok.then_some(body)
}

/// The body of `GET path`, and whether the answer was 200 OK.
async fn http_get_any(address: SocketAddr, path: &str) -> Option<(bool, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.ok()?;
        let (head, body) = answer.split_once("\r\n\r\n")?;
        Some((head.starts_with("HTTP/1.1 200"), body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(1), exchange)
        .await
        .ok()
        .flatten()
}

/// The replicas' log filter: elections' refusals at debug level, or what
/// `SYNOD_FAULTS_SERVER_LOG` says (a tracing filter, to dig into a run).
fn server_log_level() -> String {
    std::env::var("SYNOD_FAULTS_SERVER_LOG")
        .unwrap_or_else(|_| "info,synod_server::election=debug".to_string())
}
