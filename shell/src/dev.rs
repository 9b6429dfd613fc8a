//! `synod dev`: a local 3-replica cluster on 127.0.0.1 with the shell
//! attached.
//!
//! The replicas are child processes of the `synod-server` binary (nothing
//! links the server), each in its own process group so that Ctrl-C in the
//! shell never reaches them. Everything lives in the data directory:
//!
//! ```text
//! synod-dev/
//!   dev.toml            the port base chosen on the first run
//!   certs/              CA, node-<id> and client certificates (first run, and
//!                       again when a node certificate is of an older form)
//!   node-<id>.toml      each replica's configuration
//!   node-<id>/          each replica's database
//!   node-<id>.log       each replica's log
//!   client.toml         where the cluster is, for `synod --config`
//!   pids                the running replicas' process ids
//! ```

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use synod_client::Client;
use tokio::runtime::Runtime;

use crate::commands::{interrupted, Shell};
use crate::connect::{self, ClientConfig, DEV_MARKER};
use crate::repl;

/// The replicas' ids.
const NODE_IDS: [u64; 3] = [1, 2, 3];

/// Peer ports are `base + id`, client ports `base + 100 + id`.
pub const DEFAULT_PORT_BASE: u16 = 7000;

/// Longest wait for a leader after starting the replicas.
const READY_TIMEOUT_MS: u64 = 60_000;

/// Longest wait for a replica to stop after SIGTERM before SIGKILL.
const STOP_TIMEOUT_MS: u64 = 10_000;

/// Longest wait for one connection attempt while the cluster starts.
const CONNECT_ATTEMPT_TIMEOUT_MS: u64 = 3_000;

/// `synod dev` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Where the cluster's certificates, configs, databases and logs live.
    #[arg(long, default_value = "synod-dev", value_name = "DIR")]
    pub data: PathBuf,
    /// Peer ports are BASE+1..BASE+3, client ports BASE+101..BASE+103
    /// (default 7000, then whatever the first run used).
    #[arg(long, value_name = "BASE")]
    pub port_base: Option<u16>,
    /// Leave the replicas running when the shell ends; `synod dev --stop`
    /// stops them.
    #[arg(long)]
    pub detach: bool,
    /// Stop a cluster left running with --detach.
    #[arg(long, conflicts_with = "detach")]
    pub stop: bool,
    /// Do not open the shell (with --detach: start the cluster and return).
    #[arg(long)]
    pub no_shell: bool,
    /// The synod-server binary (default: beside this binary; in a source
    /// checkout, built with cargo when missing or older than its sources).
    #[arg(long, env = "SYNOD_SERVER_BIN", value_name = "FILE")]
    pub server: Option<PathBuf>,
}

/// The replica processes this run started; stopped when dropped unless
/// detached, so an error on the way never leaves them behind.
struct Replicas {
    children: Vec<(u64, Child)>,
    data: PathBuf,
    detached: bool,
}

impl Drop for Replicas {
    fn drop(&mut self) {
        if self.detached || self.children.is_empty() {
            return;
        }
        say!("stopping the replicas...");
        for (_, child) in &self.children {
            signal(child.id(), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_millis(STOP_TIMEOUT_MS);
        for (id, child) in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        eprintln!("replica {id} did not stop in time; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        let _ = std::fs::remove_file(self.data.join("pids"));
        say!("cluster stopped; its data stays in {}", self.data.display());
    }
}

fn signal(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// Whether `pid` is a live (not zombie) `synod-server` process; only such a
/// process is ever signalled by `--stop`, so a reused pid is left alone.
fn is_live_replica(pid: u32) -> bool {
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
fn read_pids(data: &Path) -> Vec<(u64, u32)> {
    std::fs::read_to_string(data.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
        })
        .collect()
}

/// Stops the replicas recorded in `data/pids`.
fn stop(data: &Path) -> anyhow::Result<()> {
    let pids: Vec<u32> = read_pids(data)
        .into_iter()
        .map(|(_, pid)| pid)
        .filter(|&pid| is_live_replica(pid))
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

fn peer_address(base: u16, id: u64) -> String {
    format!("127.0.0.1:{}", u64::from(base) + id)
}

fn client_address(base: u16, id: u64) -> String {
    format!("127.0.0.1:{}", u64::from(base) + 100 + id)
}

/// Reads the port base of an earlier run, or records this one's. The
/// member addresses are part of the replicated state, so a data directory
/// keeps its ports.
fn port_base(data: &Path, asked: Option<u16>) -> anyhow::Result<u16> {
    let file = data.join("dev.toml");
    if let Ok(text) = std::fs::read_to_string(&file) {
        let recorded: u16 = text
            .lines()
            .find_map(|line| line.strip_prefix("port_base = "))
            .and_then(|value| value.trim().parse().ok())
            .with_context(|| format!("{} has no port_base line", file.display()))?;
        if let Some(asked) = asked.filter(|&asked| asked != recorded) {
            bail!(
                "{} was created with --port-base {recorded}; its replicas know each other by \
                 those ports, so it cannot move to {asked}: use another --data for other ports",
                data.display()
            );
        }
        return Ok(recorded);
    }
    let base = asked.unwrap_or(DEFAULT_PORT_BASE);
    if u32::from(base) + 100 + NODE_IDS.len() as u32 > u32::from(u16::MAX) {
        bail!("--port-base {base} leaves no room for the client ports (base + 103)");
    }
    std::fs::write(&file, format!("# synod dev\nport_base = {base}\n"))
        .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(base)
}

fn node_config(data: &Path, base: u16, id: u64) -> String {
    let certs = data.join("certs");
    let mut text = format!(
        "# written by `synod dev`\ncluster_id = \"synod-dev\"\nid = {id}\ndata_dir = {:?}\n\n\
         [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        data.join(format!("node-{id}")),
        certs.join("ca.pem"),
        certs.join(format!("node-{id}.pem")),
        certs.join(format!("node-{id}-key.pem")),
    );
    for member in NODE_IDS {
        text.push_str(&format!(
            "\n[[members]]\nid = {member}\npeer_address = \"{}\"\nclient_address = \"{}\"\n",
            peer_address(base, member),
            client_address(base, member)
        ));
    }
    text
}

/// Finds `synod-server`: the flag, beside this binary (built with cargo
/// first when this binary runs from a source checkout and the server is
/// missing or older than its sources), or on `PATH`.
fn server_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
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
    let in_checkout = workspace.join("server/Cargo.toml").exists() && exe.starts_with(&workspace);
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
        say!(
            "synod-server is missing or older than its sources: running `cargo build{} -p synod-server` in {}",
            if release { " --release" } else { "" },
            workspace.display()
        );
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

/// Most files looked at when comparing a binary with its sources.
const SOURCE_FILES_MAX: usize = 10_000;

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

fn check_ports_free(base: u16, ids: &[u64]) -> anyhow::Result<()> {
    for &id in ids {
        for address in [peer_address(base, id), client_address(base, id)] {
            if std::net::UdpSocket::bind(&address).is_err() {
                bail!(
                    "{address} is in use: is another cluster running? `synod dev --stop` stops \
                     a detached one; `--data DIR --port-base N` starts another elsewhere"
                );
            }
        }
    }
    Ok(())
}

/// Starts the replicas `ids`; `running` are the others, already running,
/// recorded in the pids file alongside.
fn start_replicas(
    data: &Path,
    server: &Path,
    ids: &[u64],
    running: &[(u64, u32)],
    detached: bool,
) -> anyhow::Result<Replicas> {
    let mut replicas = Replicas {
        children: Vec::new(),
        data: data.to_owned(),
        detached,
    };
    let mut pids: String = running
        .iter()
        .map(|(id, pid)| format!("{id} {pid}\n"))
        .collect();
    for &id in ids {
        let config = data.join(format!("node-{id}.toml"));
        let log_path = data.join(format!("node-{id}.log"));
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
        let bootstrap = !data.join(format!("node-{id}/synod.redb")).exists();
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
        pids.push_str(&format!("{id} {}\n", child.id()));
        replicas.children.push((id, child));
    }
    std::fs::write(data.join("pids"), pids).context("cannot record the replicas' pids")?;
    Ok(replicas)
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Waits until a session opens and the replica names a leader.
async fn wait_ready(
    config: &ClientConfig,
    replicas: &mut Option<Replicas>,
) -> anyhow::Result<Client> {
    let deadline = Instant::now() + Duration::from_millis(READY_TIMEOUT_MS);
    loop {
        if let Some(replicas) = replicas.as_mut() {
            for (id, child) in &mut replicas.children {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = replicas.data.join(format!("node-{id}.log"));
                    bail!(
                        "replica {id} exited ({status}); the end of {}:\n{}",
                        log.display(),
                        log_tail(&log)
                    );
                }
            }
        }
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

/// Writes the user's config file pointing at this cluster, unless a person
/// wrote that file.
fn write_user_config(client: &ClientConfig) -> Option<PathBuf> {
    let path = connect::user_config_path()?;
    if let Ok(existing) = std::fs::read_to_string(&path) {
        if !existing.starts_with(DEV_MARKER) {
            return None;
        }
    }
    std::fs::create_dir_all(path.parent()?).ok()?;
    std::fs::write(
        &path,
        client.to_toml(&format!("{DEV_MARKER}; later `synod dev` runs replace it")),
    )
    .ok()?;
    Some(path)
}

/// Runs `synod dev`.
///
/// # Errors
/// The cluster could not be set up, started or reached.
pub fn run(runtime: &Runtime, args: &DevArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("cannot create {}", args.data.display()))?;
    let data = args
        .data
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", args.data.display()))?;
    if args.stop {
        return stop(&data);
    }
    let base = port_base(&data, args.port_base)?;
    let certs = data.join("certs");
    let old_form = certs.join("ca.pem").exists() && !replica_certificates_current(&certs);
    if old_form {
        // Made by an older build: node certificates without the replica-only
        // identity, which replicas now refuse. Development certificates are
        // disposable, so they are made again (the CA too, so that every
        // certificate is of one generation); the databases do not depend on
        // them. Replicas still running hold the old ones, so stop first.
        let running = read_pids(&data)
            .into_iter()
            .any(|(_, pid)| is_live_replica(pid));
        if running {
            bail!(
                "{} holds certificates made by an older synod, and replicas are running with \
                 them: stop them with `synod dev --stop --data {}`, then run `synod dev` again to \
                 make new certificates",
                certs.display(),
                args.data.display()
            );
        }
        say!(
            "{} holds node certificates of an older form; making new ones",
            certs.display()
        );
    }
    if old_form || !certs.join("ca.pem").exists() {
        let hosts = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        synod_proto::tls::generate_dev_certs(&certs, &NODE_IDS, &hosts)
            .context("cannot generate the development certificates")?;
        say!("generated a CA and certificates in {}", certs.display());
    }
    for id in NODE_IDS {
        let path = data.join(format!("node-{id}.toml"));
        std::fs::write(&path, node_config(&data, base, id))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let client_config = ClientConfig {
        endpoints: NODE_IDS
            .iter()
            .map(|&id| client_address(base, id))
            .collect(),
        ca: certs.join("ca.pem"),
        cert: certs.join("client.pem"),
        key: certs.join("client-key.pem"),
    };
    let client_file = data.join("client.toml");
    std::fs::write(
        &client_file,
        client_config.to_toml("# written by `synod dev`: `synod --config` this file"),
    )
    .with_context(|| format!("cannot write {}", client_file.display()))?;

    let running: Vec<(u64, u32)> = read_pids(&data)
        .into_iter()
        .filter(|&(_, pid)| is_live_replica(pid))
        .collect();
    let missing: Vec<u64> = NODE_IDS
        .into_iter()
        .filter(|id| !running.iter().any(|(running_id, _)| running_id == id))
        .collect();
    let mut replicas = if missing.is_empty() {
        say!(
            "a dev cluster is already running from {}; attaching to it",
            data.display()
        );
        None
    } else {
        check_ports_free(base, &missing)?;
        let server = server_binary(args.server.as_deref())?;
        let detached = if running.is_empty() {
            let fresh = !data.join("node-1/synod.redb").exists();
            say!(
                "starting 3 replicas ({}) with {}",
                if fresh {
                    "new cluster"
                } else {
                    "reusing their data"
                },
                server.display()
            );
            args.detach
        } else {
            // The others were left running by an earlier `synod dev`: this
            // run adds the missing ones to them and leaves all running.
            say!(
                "replicas {:?} are running; starting the missing {:?} with {}",
                running.iter().map(|(id, _)| id).collect::<Vec<_>>(),
                missing,
                server.display()
            );
            true
        };
        Some(start_replicas(
            &data, &server, &missing, &running, detached,
        )?)
    };
    let client = runtime.block_on(async {
        tokio::select! {
            client = wait_ready(&client_config, &mut replicas) => client,
            () = interrupted() => bail!("interrupted while waiting for a leader"),
        }
    })?;
    let user_config = write_user_config(&client_config);
    say!();
    say!("Synod dev cluster is up: 3 replicas on 127.0.0.1");
    say!(
        "  clients connect to  {}",
        client_config.endpoints.join(", ")
    );
    say!(
        "  peers talk on       {}",
        NODE_IDS
            .iter()
            .map(|&id| peer_address(base, id))
            .collect::<Vec<_>>()
            .join(", ")
    );
    say!("  data and configs    {}", data.display());
    say!("  certificates        {}", certs.display());
    say!(
        "  replica logs        {}",
        data.join("node-<id>.log").display()
    );
    say!("  client config       {}", client_file.display());
    match &user_config {
        Some(path) => say!(
            "  also written to     {} (so `synod ls /` and friends find this cluster)",
            path.display()
        ),
        None => say!(
            "  connect with        synod --config {} ...",
            client_file.display()
        ),
    }
    let detached = replicas.as_ref().is_none_or(|replicas| replicas.detached);
    if detached {
        say!("The cluster keeps running after the shell; `synod dev --stop` stops it.");
    } else {
        say!("Leaving the shell (Ctrl-D or `exit`) stops the cluster.");
    }
    let outcome = if args.no_shell {
        runtime.block_on(client.close());
        Ok(())
    } else {
        say!("Type `help` for the commands.\n");
        let mut shell = Shell::new(Some(client), Some(client_config), true);
        repl::run(runtime, &mut shell)
    };
    drop(replicas);
    outcome
}

/// Whether every replica certificate in `certs` is of the current form (a
/// replica-only identity for its node; see `synod_proto::tls`). A missing
/// or unreadable one counts as not current, so it is made again.
fn replica_certificates_current(certs: &Path) -> bool {
    NODE_IDS.iter().all(|&id| {
        let files = synod_proto::tls::TlsFiles::in_dir(certs, &format!("node-{id}"));
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
    fn certificates_of_an_older_form_are_noticed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let hosts = vec!["127.0.0.1".to_string()];
        synod_proto::tls::generate_dev_certs(dir.path(), &NODE_IDS, &hosts).expect("certs");
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
    fn node_configs_name_every_member_and_the_port_base_sticks() {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = node_config(dir.path(), 7000, 2);
        assert!(text.contains("id = 2\n"));
        assert!(text.contains("peer_address = \"127.0.0.1:7003\""));
        assert!(text.contains("client_address = \"127.0.0.1:7101\""));
        assert_eq!(port_base(dir.path(), Some(9000)).expect("records"), 9000);
        assert_eq!(port_base(dir.path(), None).expect("reads"), 9000);
        assert!(port_base(dir.path(), Some(9100)).is_err());
    }
}
