//! `synod dev`: a local 3-replica cluster on 127.0.0.1 with the shell
//! attached.
//!
//! The replicas are child processes of the `synod-server` binary, started
//! and stopped by [`LocalCluster`] (see `cluster.rs`). Everything lives in
//! the data directory:
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

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tokio::runtime::Runtime;

use crate::cluster::{self, LocalCluster, Notices, NODE_IDS};
use crate::commands::{interrupted, Shell};
use crate::connect::{self, ClientConfig, DEV_MARKER};
use crate::repl;

/// Peer ports are `base + id`, client ports `base + 100 + id`, HTTP ports
/// (metrics and health) `base + 200 + id`.
pub const DEFAULT_PORT_BASE: u16 = 7000;

/// `synod dev` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Where the cluster's certificates, configs, databases and logs live.
    #[arg(long, default_value = "synod-dev", value_name = "DIR")]
    pub data: PathBuf,
    /// Peer ports are BASE+1..BASE+3, client ports BASE+101..BASE+103,
    /// HTTP ports (metrics, health) BASE+201..BASE+203 (default 7000, then
    /// whatever the first run used).
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
    if !cluster::port_base_fits(base) {
        bail!("--port-base {base} leaves no room for the HTTP ports (base + 203)");
    }
    std::fs::write(&file, format!("# synod dev\nport_base = {base}\n"))
        .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(base)
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
        return cluster::stop_recorded(&data);
    }
    let base = port_base(&data, args.port_base)?;
    let mut cluster = LocalCluster::new(&data, base, "synod-dev", Notices::Stdout);
    cluster.ensure_dev_certs()?;
    let client_file = cluster.write_configs()?;
    let client_config = cluster.client_config();

    let running = cluster::running_replicas(&data);
    let missing: Vec<u64> = NODE_IDS
        .into_iter()
        .filter(|id| !running.iter().any(|(running_id, _)| running_id == id))
        .collect();
    if missing.is_empty() {
        say!(
            "a dev cluster is already running from {}; attaching to it",
            data.display()
        );
    } else {
        cluster.check_ports_free(&missing)?;
        let server = cluster.server_binary(args.server.as_deref())?;
        let detached = if running.is_empty() {
            let fresh = !cluster.node_dir(1).join("synod.redb").exists();
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
        cluster.set_detached(detached);
        cluster.start(&server, &missing, &running)?;
    }
    let client = runtime.block_on(async {
        tokio::select! {
            client = cluster.wait_ready(&client_config) => client,
            () = interrupted() => bail!("interrupted while waiting for a leader"),
        }
    })?;
    let user_config = write_user_config(&client_config);
    let certs = cluster.certs();
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
            .map(|&id| cluster.peer_address(id))
            .collect::<Vec<_>>()
            .join(", ")
    );
    say!(
        "  metrics and health  {}",
        NODE_IDS
            .iter()
            .map(|&id| format!("http://{}/metrics", cluster.http_address(id)))
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
    let detached = !cluster.started_any() || cluster.is_detached();
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
    drop(cluster);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_base_sticks() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert_eq!(port_base(dir.path(), Some(9000)).expect("records"), 9000);
        assert_eq!(port_base(dir.path(), None).expect("reads"), 9000);
        assert!(port_base(dir.path(), Some(9100)).is_err());
        assert!(port_base(tempfile::tempdir().expect("dir").path(), Some(65_500)).is_err());
    }
}
