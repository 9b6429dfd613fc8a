//! A local 3-replica cluster on 127.0.0.1, run as child processes of the
//! `synod-server` binary: what `synod dev` and `synod bench` both start.
//!
//! Nothing links the server. Each replica runs in its own process group, so
//! that Ctrl-C in the terminal reaches only the `synod` process, which then
//! stops the replicas itself. Everything lives in one data directory:
//!
//! ```text
//! DIR/
//!   certs/              CA, node-<id> and client certificates
//!   node-<id>.toml      each replica's configuration
//!   node-<id>/          each replica's database
//!   node-<id>.log       each replica's log
//!   client.toml         where the cluster is, for `synod --config`
//!   pids                the running replicas' process ids
//! ```
//!
//! [`LocalCluster`] is the guard for the processes one run started: they
//! are stopped (SIGTERM, then SIGKILL after [`STOP_TIMEOUT_MS`]) when it is
//! dropped, unless it was detached, so an error or an interruption on the
//! way never leaves replicas behind.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use synod_client::Client;
use synod_proto::certgen::{
    CertificateAuthority, IssuedCertificate, CA_VALIDITY_DAYS, LEAF_VALIDITY_DAYS,
};
use synod_proto::tls::TlsFiles;

use crate::connect::{self, ClientConfig};

/// The replicas' ids.
pub const NODE_IDS: [u64; 3] = [1, 2, 3];

/// Client ports are `base + CLIENT_PORT_OFFSET + id`; peer ports `base + id`.
const CLIENT_PORT_OFFSET: u16 = 100;

/// The replicas' HTTP ports (metrics and health, TCP) are
/// `base + HTTP_PORT_OFFSET + id`.
const HTTP_PORT_OFFSET: u16 = 200;

/// Longest wait for a leader after starting the replicas.
const READY_TIMEOUT_MS: u64 = 60_000;

/// Longest wait for a replica to stop after SIGTERM before SIGKILL.
pub const STOP_TIMEOUT_MS: u64 = 10_000;

/// Longest wait for one connection attempt while the cluster starts.
const CONNECT_ATTEMPT_TIMEOUT_MS: u64 = 3_000;

/// Most files looked at when comparing a binary with its sources.
const SOURCE_FILES_MAX: usize = 10_000;

/// Where a cluster's notices (starting, building, stopping) are printed:
/// `synod dev` talks to the person on standard output; `synod bench` keeps
/// standard output for its report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notices {
    /// On standard output, as the shell's own messages.
    Stdout,
    /// On standard error, so standard output stays for a report.
    Stderr,
}

impl Notices {
    /// Prints one notice line.
    pub fn say(self, arguments: std::fmt::Arguments<'_>) {
        match self {
            Notices::Stdout => crate::output::line(arguments),
            Notices::Stderr => eprintln!("{arguments}"),
        }
    }
}

/// A local cluster's directory and ports, and the replica processes this
/// run started. Dropping it stops those processes unless it is detached.
pub struct LocalCluster {
    data: PathBuf,
    port_base: u16,
    /// `cluster_id` in the replicas' configs, and the writer named in the
    /// files' header comments (`synod dev`, `synod bench`).
    name: &'static str,
    notices: Notices,
    /// Replicas started by this run, in start order.
    children: Vec<(u64, Child)>,
    /// Replicas already running that an earlier run started; recorded in
    /// the pids file beside this run's, never stopped by this guard.
    others: Vec<(u64, u32)>,
    detached: bool,
    /// Whether the data directory stays after the cluster stops (said when
    /// it stops).
    data_kept: bool,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if self.detached || self.children.is_empty() {
            return;
        }
        self.notices.say(format_args!("stopping the replicas..."));
        for (_, child) in &self.children {
            // A replica paused by a benchmark must run again to stop.
            signal(child.id(), Signal::SIGCONT);
            signal(child.id(), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_millis(STOP_TIMEOUT_MS);
        for (id, child) in &mut self.children {
            wait_or_kill(*id, child, deadline);
        }
        self.children.clear();
        let _ = std::fs::remove_file(self.data.join("pids"));
        if self.data_kept {
            self.notices.say(format_args!(
                "cluster stopped; its data stays in {}",
                self.data.display()
            ));
        } else {
            self.notices.say(format_args!("cluster stopped"));
        }
    }
}

/// Waits for `child` to exit until `deadline`, then kills it.
fn wait_or_kill(id: u64, child: &mut Child, deadline: Instant) {
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() >= deadline => {
                eprintln!("replica {id} did not stop in time; killing it");
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn signal(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// Whether `pid` is a live (not zombie) `synod-server` process; only such a
/// process is ever signalled by [`stop_recorded`], so a reused pid is left
/// alone.
pub fn is_live_replica(pid: u32) -> bool {
    let Ok(command_line) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    if !String::from_utf8_lossy(&command_line).contains("synod-server") {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => false,
    }
}

/// The `(node id, pid)` lines of `data/pids`.
pub fn read_pids(data: &Path) -> Vec<(u64, u32)> {
    std::fs::read_to_string(data.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
        })
        .collect()
}

/// The replicas recorded in `data/pids` that are still running.
pub fn running_replicas(data: &Path) -> Vec<(u64, u32)> {
    read_pids(data)
        .into_iter()
        .filter(|&(_, pid)| is_live_replica(pid))
        .collect()
}

/// Stops the replicas recorded in `data/pids` (started by an earlier,
/// detached run).
///
/// # Errors
/// None today; the signature leaves room for reporting a failed stop.
pub fn stop_recorded(data: &Path) -> anyhow::Result<()> {
    let pids: Vec<u32> = running_replicas(data)
        .into_iter()
        .map(|(_, pid)| pid)
        .collect();
    if pids.is_empty() {
        let _ = std::fs::remove_file(data.join("pids"));
        say!("no dev cluster is running from {}", data.display());
        return Ok(());
    }
    for &pid in &pids {
        signal(pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_millis(STOP_TIMEOUT_MS);
    while pids.iter().any(|&pid| is_live_replica(pid)) {
        if Instant::now() >= deadline {
            for &pid in pids.iter().filter(|&&pid| is_live_replica(pid)) {
                eprintln!("replica process {pid} did not stop in time; killing it");
                signal(pid, Signal::SIGKILL);
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_file(data.join("pids"));
    say!(
        "stopped the dev cluster in {} ({} replicas)",
        data.display(),
        pids.len()
    );
    Ok(())
}

/// Whether a port base leaves room for every peer, client and HTTP port.
pub fn port_base_fits(base: u16) -> bool {
    u32::from(base) + u32::from(HTTP_PORT_OFFSET) + NODE_IDS.len() as u32 <= u32::from(u16::MAX)
}

/// Finds a port base whose six ports are free on 127.0.0.1, trying bases
/// `step` apart from `first` upwards, at most `attempts` of them.
///
/// # Errors
/// No free base among those tried.
pub fn free_port_base(first: u16, step: u16, attempts: u16) -> anyhow::Result<u16> {
    for attempt in 0..attempts {
        let Some(base) = u16::try_from(u32::from(first) + u32::from(attempt) * u32::from(step))
            .ok()
            .filter(|&base| port_base_fits(base))
        else {
            break;
        };
        let all_free = NODE_IDS.iter().all(|&id| {
            [peer_address(base, id), client_address(base, id)]
                .iter()
                .all(|address| std::net::UdpSocket::bind(address).is_ok())
                && std::net::TcpListener::bind(http_address(base, id)).is_ok()
        });
        if all_free {
            return Ok(base);
        }
    }
    bail!("no free range of ports on 127.0.0.1 from {first} up ({attempts} tried, {step} apart)")
}

/// Whether a UDP socket is bound to `port` on this host (from
/// `/proc/net/udp` and `/proc/net/udp6`), without touching the port.
pub fn udp_port_bound(port: u16) -> bool {
    let wanted = format!(":{port:04X}");
    ["/proc/net/udp", "/proc/net/udp6"].iter().any(|table| {
        std::fs::read_to_string(table).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                line.split_whitespace()
                    .nth(1)
                    .is_some_and(|local| local.ends_with(&wanted))
            })
        })
    })
}

fn peer_address(base: u16, id: u64) -> String {
    format!("127.0.0.1:{}", u64::from(base) + id)
}

fn client_address(base: u16, id: u64) -> String {
    format!(
        "127.0.0.1:{}",
        u64::from(base) + u64::from(CLIENT_PORT_OFFSET) + id
    )
}

fn http_address(base: u16, id: u64) -> String {
    format!(
        "127.0.0.1:{}",
        u64::from(base) + u64::from(HTTP_PORT_OFFSET) + id
    )
}

impl LocalCluster {
    /// A cluster in `data` (an absolute path) on the ports of `port_base`,
    /// with no replica started yet. `name` is its `cluster_id` and the
    /// writer named in the files it writes (`synod-dev`, `synod-bench`).
    pub fn new(data: &Path, port_base: u16, name: &'static str, notices: Notices) -> LocalCluster {
        LocalCluster {
            data: data.to_owned(),
            port_base,
            name,
            notices,
            children: Vec::new(),
            others: Vec::new(),
            detached: false,
            data_kept: true,
        }
    }

    /// The data directory.
    pub fn data(&self) -> &Path {
        &self.data
    }

    /// The certificates' directory.
    pub fn certs(&self) -> PathBuf {
        self.data.join("certs")
    }

    /// A replica's database directory.
    pub fn node_dir(&self, id: u64) -> PathBuf {
        self.data.join(format!("node-{id}"))
    }

    /// A replica's log file.
    pub fn log_path(&self, id: u64) -> PathBuf {
        self.data.join(format!("node-{id}.log"))
    }

    /// Where replica `id` talks to its peers.
    pub fn peer_address(&self, id: u64) -> String {
        peer_address(self.port_base, id)
    }

    /// Where replica `id` serves clients.
    pub fn client_address(&self, id: u64) -> String {
        client_address(self.port_base, id)
    }

    /// Where replica `id` serves `/metrics`, `/livez` and `/readyz`.
    pub fn http_address(&self, id: u64) -> String {
        http_address(self.port_base, id)
    }

    /// The connection settings for every replica, with the `client`
    /// certificate.
    pub fn client_config(&self) -> ClientConfig {
        self.client_config_for(&NODE_IDS, "client")
    }

    /// The connection settings for the replicas `ids` in that order (the
    /// client tries them in order), with the client certificate `cert_name`
    /// in the certificates' directory.
    pub fn client_config_for(&self, ids: &[u64], cert_name: &str) -> ClientConfig {
        let files = TlsFiles::in_dir(&self.certs(), cert_name);
        ClientConfig {
            endpoints: ids.iter().map(|&id| self.client_address(id)).collect(),
            ca: files.ca,
            cert: files.cert,
            key: files.key,
        }
    }

    /// Makes development certificates (a CA, one per replica, `client`) on
    /// the first run, and again when the replica certificates are of an
    /// older form.
    ///
    /// # Errors
    /// The certificates are of an older form while replicas of an earlier
    /// run still use them, or they cannot be written.
    pub fn ensure_dev_certs(&self) -> anyhow::Result<()> {
        let certs = self.certs();
        let old_form = certs.join("ca.pem").exists() && !replica_certificates_current(&certs);
        if old_form {
            // Made by an older build: node certificates without the replica-only
            // identity, which replicas now refuse. Development certificates are
            // disposable, so they are made again (the CA too, so that every
            // certificate is of one generation); the databases do not depend on
            // them. Replicas still running hold the old ones, so stop first.
            if !running_replicas(&self.data).is_empty() {
                bail!(
                    "{} holds certificates made by an older synod, and replicas are running with \
                     them: stop them with `synod dev --stop --data {}`, then run `synod dev` again to \
                     make new certificates",
                    certs.display(),
                    self.data.display()
                );
            }
            self.notices.say(format_args!(
                "{} holds node certificates of an older form; making new ones",
                certs.display()
            ));
        }
        if old_form || !certs.join("ca.pem").exists() {
            let hosts = vec!["127.0.0.1".to_string(), "localhost".to_string()];
            synod_proto::certgen::generate_dev_certs(&certs, &NODE_IDS, &hosts)
                .context("cannot generate the development certificates")?;
            self.notices.say(format_args!(
                "generated a CA and certificates in {}",
                certs.display()
            ));
        }
        Ok(())
    }

    /// Makes a new CA, a certificate per replica, the `client` certificate
    /// and one more client certificate per name in `clients` (each its own
    /// identity, so that many clients stay within the replicas'
    /// per-identity bounds), replacing any there were.
    ///
    /// # Errors
    /// A certificate cannot be made or written.
    pub fn generate_certs(&self, clients: &[String]) -> anyhow::Result<()> {
        let certs = self.certs();
        std::fs::create_dir_all(&certs)
            .with_context(|| format!("cannot create {}", certs.display()))?;
        let ca = CertificateAuthority::generate(&format!("{} CA", self.name), CA_VALIDITY_DAYS)
            .context("cannot generate the CA")?;
        write_pair(&certs, "ca", &ca.certificate())?;
        let hosts = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        for id in NODE_IDS {
            let issued = ca
                .issue_node(id, &hosts, LEAF_VALIDITY_DAYS)
                .with_context(|| format!("cannot issue replica {id}'s certificate"))?;
            write_pair(&certs, &format!("node-{id}"), &issued)?;
        }
        let names = std::iter::once("client").chain(clients.iter().map(String::as_str));
        for name in names {
            let issued = ca
                .issue_client(&format!("{} {name}", self.name), LEAF_VALIDITY_DAYS)
                .with_context(|| format!("cannot issue the client certificate {name}"))?;
            write_pair(&certs, name, &issued)?;
        }
        Ok(())
    }

    /// Writes each replica's configuration (default settings but for the
    /// members, data directory and TLS files) and `client.toml`; returns
    /// the path of the latter.
    ///
    /// # Errors
    /// A file cannot be written.
    pub fn write_configs(&self) -> anyhow::Result<PathBuf> {
        for id in NODE_IDS {
            let path = self.data.join(format!("node-{id}.toml"));
            std::fs::write(&path, self.node_config(id))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        let client_file = self.data.join("client.toml");
        std::fs::write(
            &client_file,
            self.client_config().to_toml(&format!(
                "# written by `{}`: `synod --config` this file",
                self.writer()
            )),
        )
        .with_context(|| format!("cannot write {}", client_file.display()))?;
        Ok(client_file)
    }

    /// `synod dev` for the name `synod-dev`.
    fn writer(&self) -> String {
        self.name.replacen('-', " ", 1)
    }

    fn node_config(&self, id: u64) -> String {
        let certs = self.certs();
        let mut text = format!(
            "# written by `{}`\ncluster_id = \"{}\"\nid = {id}\ndata_dir = {:?}\n\n\
             [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            self.writer(),
            self.name,
            self.node_dir(id),
            certs.join("ca.pem"),
            certs.join(format!("node-{id}.pem")),
            certs.join(format!("node-{id}-key.pem")),
        );
        for member in NODE_IDS {
            text.push_str(&format!(
                "\n[[members]]\nid = {member}\npeer_address = \"{}\"\nclient_address = \"{}\"\n",
                self.peer_address(member),
                self.client_address(member)
            ));
        }
        text.push_str(&format!(
            "\n[monitoring]\nhttp_address = \"{}\"\n",
            self.http_address(id)
        ));
        text
    }

    /// Checks that the ports of the replicas `ids` are free.
    ///
    /// # Errors
    /// One is in use, naming it.
    pub fn check_ports_free(&self, ids: &[u64]) -> anyhow::Result<()> {
        for &id in ids {
            let http = self.http_address(id);
            let udp_free = |address: &String| std::net::UdpSocket::bind(address).is_ok();
            for (address, free) in [
                (self.peer_address(id), udp_free(&self.peer_address(id))),
                (self.client_address(id), udp_free(&self.client_address(id))),
                (http.clone(), std::net::TcpListener::bind(&http).is_ok()),
            ] {
                if !free {
                    bail!(
                        "{address} is in use: is another cluster running? `synod dev --stop` stops \
                         a detached one; `--data DIR --port-base N` starts another elsewhere"
                    );
                }
            }
        }
        Ok(())
    }

    /// Starts the replicas `ids` with `server`; `running` are replicas an
    /// earlier run left running, recorded in the pids file alongside (and
    /// never stopped by this guard). A replica that has no database yet is
    /// started with `--bootstrap`.
    ///
    /// # Errors
    /// A log file cannot be opened, a process cannot start, or the pids
    /// cannot be recorded.
    pub fn start(
        &mut self,
        server: &Path,
        ids: &[u64],
        running: &[(u64, u32)],
    ) -> anyhow::Result<()> {
        self.others = running.to_vec();
        for &id in ids {
            assert!(
                self.pid(id).is_none(),
                "replica {id} is started while it runs"
            );
            let config = self.data.join(format!("node-{id}.toml"));
            let log_path = self.log_path(id);
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .with_context(|| format!("cannot open {}", log_path.display()))?;
            let mut command = Command::new(server);
            command
                .arg("--config")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().context("cannot share the log file")?)
                .stderr(log);
            // Only a replica that never started founds the cluster; a later start
            // must find its database.
            let bootstrap = !self.node_dir(id).join("synod.redb").exists();
            if bootstrap {
                command.arg("--bootstrap");
            }
            #[cfg(unix)]
            {
                use std::os::unix::process::CommandExt;
                command.process_group(0);
            }
            let child = command
                .spawn()
                .with_context(|| format!("cannot start {}", server.display()))?;
            self.children.push((id, child));
        }
        self.record_pids()
    }

    /// Stops replica `id`, started by this run: SIGTERM, then SIGKILL after
    /// [`STOP_TIMEOUT_MS`]; returns once it has exited.
    ///
    /// # Errors
    /// This run did not start replica `id`, or the pids cannot be recorded.
    pub fn stop_replica(&mut self, id: u64) -> anyhow::Result<()> {
        let mut child = self.take_child(id)?;
        signal(child.id(), Signal::SIGTERM);
        wait_or_kill(
            id,
            &mut child,
            Instant::now() + Duration::from_millis(STOP_TIMEOUT_MS),
        );
        self.record_pids()
    }

    /// Takes replica `id`'s process out of those this run has running.
    fn take_child(&mut self, id: u64) -> anyhow::Result<Child> {
        let Some(index) = self
            .children
            .iter()
            .position(|(child_id, _)| *child_id == id)
        else {
            bail!("replica {id} is not running (or was not started by this run)");
        };
        Ok(self.children.remove(index).1)
    }

    /// Kills replica `id`, started by this run, with SIGKILL (no chance to
    /// flush or say goodbye, like a crash); returns once it has exited.
    ///
    /// # Errors
    /// This run did not start replica `id`, or the pids cannot be recorded.
    pub fn kill_replica(&mut self, id: u64) -> anyhow::Result<()> {
        let mut child = self.take_child(id)?;
        let _ = child.kill();
        let _ = child.wait();
        self.record_pids()
    }

    /// Pauses replica `id` with SIGSTOP (a hung process: its sockets stay
    /// open, it answers nothing) or lets it run again with SIGCONT.
    ///
    /// # Errors
    /// This run did not start replica `id`.
    pub fn set_paused(&self, id: u64, paused: bool) -> anyhow::Result<()> {
        let pid = self.pid(id).with_context(|| {
            format!("replica {id} is not running (or was not started by this run)")
        })?;
        signal(
            pid,
            if paused {
                Signal::SIGSTOP
            } else {
                Signal::SIGCONT
            },
        );
        Ok(())
    }

    /// Replica `id`'s process id, when this run started it and it has not
    /// been stopped.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.children
            .iter()
            .find(|(child_id, _)| *child_id == id)
            .map(|(_, child)| child.id())
    }

    /// Whether this run started any replica that still runs.
    pub fn started_any(&self) -> bool {
        !self.children.is_empty()
    }

    /// Whether the replicas are left running when this guard is dropped.
    pub fn is_detached(&self) -> bool {
        self.detached
    }

    /// Leaves the replicas running (or not) when this guard is dropped.
    pub fn set_detached(&mut self, detached: bool) {
        self.detached = detached;
    }

    /// Whether the data directory stays after the cluster stops (the
    /// default), for the notice when it stops.
    pub fn set_data_kept(&mut self, kept: bool) {
        self.data_kept = kept;
    }

    fn record_pids(&self) -> anyhow::Result<()> {
        let pids: String = self
            .others
            .iter()
            .copied()
            .chain(self.children.iter().map(|(id, child)| (*id, child.id())))
            .map(|(id, pid)| format!("{id} {pid}\n"))
            .collect();
        std::fs::write(self.data.join("pids"), pids).context("cannot record the replicas' pids")
    }

    /// Fails, with the end of its log, when a replica this run started has
    /// exited.
    ///
    /// # Errors
    /// A replica exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (id, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                let log = self.data.join(format!("node-{id}.log"));
                bail!(
                    "replica {id} exited ({status}); the end of {}:\n{}",
                    log.display(),
                    log_tail(&log)
                );
            }
        }
        Ok(())
    }

    /// Waits until a session opens through `config` and the replica serving
    /// it names a leader; returns that client.
    ///
    /// # Errors
    /// A replica this run started exited, or there was no leader within
    /// [`READY_TIMEOUT_MS`].
    pub async fn wait_ready(&mut self, config: &ClientConfig) -> anyhow::Result<Client> {
        let deadline = Instant::now() + Duration::from_millis(READY_TIMEOUT_MS);
        loop {
            self.check_alive()?;
            if Instant::now() >= deadline {
                bail!(
                    "the cluster has no leader after {READY_TIMEOUT_MS} ms; see the node-*.log files"
                );
            }
            if let Ok(client) = connect::connect_within(config, CONNECT_ATTEMPT_TIMEOUT_MS).await {
                if let Ok(status) = client.status().await {
                    if status.replica.leader.is_some() {
                        return Ok(client);
                    }
                }
                client.close().await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Finds `synod-server`: `explicit`, beside this binary (built with
    /// cargo first when this binary runs from a source checkout and the
    /// server is missing or older than its sources), or on `PATH`.
    ///
    /// # Errors
    /// It is nowhere, or building it failed.
    pub fn server_binary(&self, explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
        if let Some(path) = explicit {
            return Ok(path.to_owned());
        }
        let exe = std::env::current_exe().context("cannot find this program's path")?;
        let dir = exe.parent().context("this program has no directory")?;
        let beside = dir.join("synod-server");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default();
        let in_checkout =
            workspace.join("server/Cargo.toml").exists() && exe.starts_with(&workspace);
        // In a source checkout, a binary older than the sources (after a pull)
        // would run yesterday's replica: build it again.
        if beside.exists() && !(in_checkout && older_than_sources(&beside, &workspace)) {
            return Ok(beside);
        }
        if in_checkout {
            let release = dir.file_name().is_some_and(|name| name == "release");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut command = Command::new(cargo);
            command
                .args(["build", "-p", "synod-server"])
                .current_dir(&workspace);
            if release {
                command.arg("--release");
            }
            self.notices.say(format_args!(
                "synod-server is missing or older than its sources: running `cargo build{} -p synod-server` in {}",
                if release { " --release" } else { "" },
                workspace.display()
            ));
            let status = command.status().context("cannot run cargo")?;
            if !status.success() {
                bail!("building synod-server failed ({status})");
            }
            if beside.exists() {
                return Ok(beside);
            }
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                let candidate = dir.join("synod-server");
                if candidate.exists() {
                    return Ok(candidate);
                }
            }
        }
        bail!(
            "cannot find synod-server beside {} or on PATH; build it with \
             `cargo build --release -p synod-server`, or pass --server FILE",
            exe.display()
        )
    }
}

fn write_pair(dir: &Path, name: &str, issued: &IssuedCertificate) -> anyhow::Result<()> {
    let files = TlsFiles::in_dir(dir, name);
    Ok(synod_proto::certgen::write_pair(
        &files.cert,
        &files.key,
        issued,
    )?)
}

/// Whether any source of `synod-server` (the server, paxos and proto
/// crates) changed after `binary` was built.
fn older_than_sources(binary: &Path, workspace: &Path) -> bool {
    let Ok(built) = std::fs::metadata(binary).and_then(|meta| meta.modified()) else {
        return true;
    };
    let mut stack: Vec<PathBuf> = ["server/src", "paxos/src", "proto/src"]
        .iter()
        .map(|dir| workspace.join(dir))
        .collect();
    stack.extend(
        [
            "server/Cargo.toml",
            "paxos/Cargo.toml",
            "proto/Cargo.toml",
            "Cargo.lock",
        ]
        .iter()
        .map(|file| workspace.join(file)),
    );
    let mut seen = 0;
    while let Some(path) = stack.pop() {
        seen += 1;
        if seen > SOURCE_FILES_MAX {
            break;
        }
        if path.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|entry| entry.path()));
            }
        } else if let Ok(modified) = std::fs::metadata(&path).and_then(|meta| meta.modified()) {
            if modified > built {
                return true;
            }
        }
    }
    false
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Whether every replica certificate in `certs` is of the current form (a
/// replica-only identity for its node; see `synod_proto::tls`). A missing
/// or unreadable one counts as not current, so it is made again.
fn replica_certificates_current(certs: &Path) -> bool {
    NODE_IDS.iter().all(|&id| {
        let files = TlsFiles::in_dir(certs, &format!("node-{id}"));
        files.load().is_ok_and(|material| {
            material.cert_chain.first().is_some_and(|leaf| {
                synod_proto::tls::replica_certificate_node(leaf).is_ok_and(|named| named == id)
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_udp_port_is_seen_and_a_free_one_is_not() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = socket.local_addr().expect("address").port();
        assert!(udp_port_bound(port));
        drop(socket);
        assert!(!udp_port_bound(port));
    }

    #[test]
    fn certificates_of_an_older_form_are_noticed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let hosts = vec!["127.0.0.1".to_string()];
        synod_proto::certgen::generate_dev_certs(dir.path(), &NODE_IDS, &hosts).expect("certs");
        assert!(replica_certificates_current(dir.path()));
        // A certificate without the replica-only identity where node 2's
        // should be (a client's here; an older build's node certificate
        // lacks the replica URI the same way).
        std::fs::copy(dir.path().join("client.pem"), dir.path().join("node-2.pem")).expect("copy");
        assert!(!replica_certificates_current(dir.path()));
        std::fs::remove_file(dir.path().join("node-2.pem")).expect("remove");
        assert!(!replica_certificates_current(dir.path()));
    }

    #[test]
    fn node_configs_name_every_member() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cluster = LocalCluster::new(dir.path(), 7000, "synod-dev", Notices::Stderr);
        let text = cluster.node_config(2);
        assert!(text.starts_with("# written by `synod dev`\ncluster_id = \"synod-dev\"\n"));
        assert!(text.contains("id = 2\n"));
        assert!(text.contains("peer_address = \"127.0.0.1:7003\""));
        assert!(text.contains("client_address = \"127.0.0.1:7101\""));
        assert!(text.contains("[monitoring]\nhttp_address = \"127.0.0.1:7202\""));
    }

    #[test]
    fn generated_certificates_are_of_the_current_form_and_one_per_client() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cluster = LocalCluster::new(dir.path(), 7000, "synod-bench", Notices::Stderr);
        cluster
            .generate_certs(&["bench-0".into(), "bench-1".into()])
            .expect("certs");
        assert!(replica_certificates_current(&cluster.certs()));
        for name in ["client", "bench-0", "bench-1"] {
            let files = TlsFiles::in_dir(&cluster.certs(), name);
            let material = files.load().expect("loads");
            let leaf = material.cert_chain.first().expect("a leaf");
            assert_eq!(
                synod_proto::tls::client_identity(leaf).as_deref(),
                Some(format!("CN=synod-bench {name}").as_str())
            );
        }
        let config = cluster.client_config_for(&[3, 1], "bench-1");
        assert_eq!(config.endpoints, ["127.0.0.1:7103", "127.0.0.1:7101"]);
        assert!(config.cert.ends_with("bench-1.pem"));
    }
}
