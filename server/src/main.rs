//! `synod-server`: one Synod replica.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sd_notify::NotifyState;
use synod_server::config::{LogConfig, LogFormat, ReplicaConfig};
use synod_server::replica::{ClockSkew, Replica, StartOptions};

/// The replica's heap holds the namespace, a large set of small blocks that
/// churns with every write: jemalloc keeps it compact and allocates fast
/// where the system allocator fragments (it spent a third of a loaded
/// follower's time in its free lists).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Runs one replica of a Synod cluster.
#[derive(Parser, Debug)]
#[command(
    name = "synod-server",
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Arguments {
    /// The replica's TOML configuration file.
    #[arg(long, value_name = "FILE", required = true)]
    config: Option<PathBuf>,
    /// Create the database if the data directory has none, as a founding
    /// member of a new cluster. Never use it for a replica that lost its disk.
    #[arg(long, conflicts_with = "join")]
    bootstrap: bool,
    /// Create an empty database if the data directory has none, for a
    /// member that lost its disk: it rejoins its cluster and votes only
    /// once every other member has told it what it may have forgotten.
    #[arg(long)]
    join: bool,
    /// Check the configuration and exit: every field, the TLS files (the
    /// certificate chains to the CA, names this node, and the key is its
    /// own) and the data directory.
    #[arg(long)]
    check: bool,
    /// Bind the peer, client and HTTP ports on this IP address, keeping
    /// their configured ports: what `[listen]` and `monitoring.http_address`
    /// say is replaced (for a pod that knows its IP only when it starts).
    #[arg(long, value_name = "IP")]
    listen_ip: Option<std::net::IpAddr>,
    /// For fault tests only: start the replica's clock this many ms away
    /// from the machine's wall clock.
    #[arg(
        long,
        value_name = "MS",
        hide = true,
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    test_clock_offset_ms: i64,
    /// For fault tests only: make the replica's clock run this many parts
    /// per million fast (negative: slow).
    #[arg(
        long,
        value_name = "PPM",
        hide = true,
        default_value_t = 0,
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(i64).range(-ClockSkew::RATE_PPM_MAX..=ClockSkew::RATE_PPM_MAX)
    )]
    test_clock_rate_ppm: i64,
    #[command(subcommand)]
    command: Option<ServerCommand>,
}

#[derive(Subcommand, Debug)]
enum ServerCommand {
    /// Seed this replica's empty data directory from a backup (`synod
    /// snapshot save`), for a new cluster, then exit. Run it on every
    /// replica of the new cluster with the same backup, then start them as
    /// usual (without --bootstrap): they hold the backup's tree, with every
    /// session closed, and mint a new cluster identity.
    Restore {
        /// The new replica's TOML configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The backup file.
        #[arg(long, value_name = "BACKUP")]
        from: PathBuf,
    },
    /// Write a stopped replica's state (its saved state with every chosen
    /// slot of its log applied) to a backup file, then exit: for a cluster
    /// that lost its majority for good, restore a new cluster from the
    /// survivor's export (see the README's disaster recovery steps).
    Export {
        /// The stopped replica's TOML configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The backup file to write (never overwritten).
        #[arg(long, value_name = "BACKUP")]
        to: PathBuf,
    },
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("synod-server: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to standard error as the config says: its filter unless
/// `RUST_LOG` is set, colour only on a terminal, or JSON lines.
fn init_logging(log: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

fn run() -> anyhow::Result<()> {
    let arguments = Arguments::parse();
    match &arguments.command {
        Some(ServerCommand::Restore { config, from }) => return restore(config, from),
        Some(ServerCommand::Export { config, to }) => {
            let config = ReplicaConfig::load(config)?;
            let exported = synod_server::backup::export(&config, to)?;
            println!(
                "exported replica {} to {}: revision {}, {} nodes, through slot {}, sha256 {}",
                config.id,
                to.display(),
                exported.revision,
                exported.nodes,
                exported.through_slot,
                exported.sha256
            );
            return Ok(());
        }
        None => {}
    }
    let Some(config_path) = arguments.config.clone() else {
        anyhow::bail!("--config FILE is required");
    };
    let mut config = ReplicaConfig::load(&config_path)?;
    if let Some(ip) = arguments.listen_ip {
        config.listen_on(ip);
    }
    init_logging(&config.log);
    if arguments.check {
        // The error names the file and says what is wrong; formatting it
        // here keeps anyhow from repeating its cause.
        config
            .load_tls()
            .map_err(|error| anyhow::anyhow!("{}: TLS files: {error}", config_path.display()))?;
        config.check_data_dir()?;
        println!("{}: valid", config_path.display());
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let options = StartOptions {
            bootstrap: arguments.bootstrap,
            join: arguments.join,
            reload_tls: Some(reload_on_hangup()),
            clock_skew: ClockSkew {
                offset_ms: arguments.test_clock_offset_ms,
                rate_ppm: arguments.test_clock_rate_ppm,
            },
            ..StartOptions::default()
        };
        let id = config.id;
        let replica = Replica::start(config, options)
            .await
            .context("replica failed to start")?;
        notify_service_manager(&[
            NotifyState::Ready,
            NotifyState::Status(&format!("node {id} serving")),
        ]);
        replica
            .run_until(async {
                shutdown_signal().await;
                notify_service_manager(&[NotifyState::Stopping]);
            })
            .await
            .context("replica stopped")
    })
}

/// `synod-server restore`: seeds the data directory and says what it holds.
fn restore(config_path: &std::path::Path, from: &std::path::Path) -> anyhow::Result<()> {
    let config = ReplicaConfig::load(config_path)?;
    let restored = synod_server::backup::restore(from, &config)?;
    println!(
        "restored {} into {}: revision {}, {} nodes, {} sessions closed; start the replica without --bootstrap",
        from.display(),
        restored.database.display(),
        restored.revision,
        restored.nodes,
        restored.sessions_closed
    );
    Ok(())
}

/// What SIGHUP notifies: the replica then reloads its TLS files. Taking
/// SIGHUP also keeps it from ending the process (its default action).
fn reload_on_hangup() -> Arc<tokio::sync::Notify> {
    let reload = Arc::new(tokio::sync::Notify::new());
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hangups) => {
                let reload = reload.clone();
                tokio::spawn(async move {
                    while hangups.recv().await.is_some() {
                        tracing::info!("SIGHUP: reloading the TLS files");
                        reload.notify_one();
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, "cannot take SIGHUP; TLS files reload on change only")
            }
        }
    }
    reload
}

/// Tells systemd (under `Type=notify`: `$NOTIFY_SOCKET` is set) how the
/// replica stands; without a service manager there is nothing to tell.
fn notify_service_manager(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(false, states) {
        tracing::warn!(%error, "cannot notify the service manager");
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
    tracing::info!("shutting down");
}
