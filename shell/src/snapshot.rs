//! `synod snapshot`: backups of a live cluster, and what a backup holds.
//!
//! `save FILE` asks a replica (the first of the connection's endpoints
//! that answers) to stream its saved state, which it does from one read
//! transaction off its event loop, and writes it with its SHA-256 (see
//! `synod_server::backup` for the file). `inspect FILE` checks a backup
//! through and through, rebuilding its state, and prints what it holds.
//! Restoring is `synod-server restore --config FILE --from BACKUP` on each
//! replica of the new cluster.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use synod_client::Client;
use synod_server::backup::{self, BackupSummary, BackupWriter};

use crate::connect::{ConnectArgs, REQUEST_TIMEOUT_MS};

/// `synod snapshot` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum SnapshotCommand {
    /// Take a consistent backup of a live cluster into FILE (never
    /// overwritten), without stalling it.
    Save {
        /// The backup file to write.
        file: PathBuf,
    },
    /// Check a backup file through and through and print what it holds.
    Inspect {
        /// The backup file.
        file: PathBuf,
    },
}

/// What `save` and `inspect` print with `--json`.
#[derive(Serialize)]
struct Report<'a> {
    file: &'a Path,
    replica: Option<u64>,
    through_slot: u64,
    revision: u64,
    time_ms: u64,
    nodes: u64,
    sessions: u64,
    locks: u64,
    records: u64,
    members: &'a [u64],
    cluster_identity: Option<String>,
    bytes: u64,
    sha256: &'a str,
    seconds: f64,
}

/// Runs a `synod snapshot` command.
///
/// # Errors
/// The cluster cannot be reached or refuses, or the file cannot be
/// written, read, or is damaged.
pub fn run(
    runtime: &tokio::runtime::Runtime,
    connection: &ConnectArgs,
    command: &SnapshotCommand,
    json: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    match command {
        SnapshotCommand::Save { file } => {
            let config = connection.resolve()?;
            let (replica, summary) = runtime.block_on(save(&config, file))?;
            print_report(file, Some(replica), &summary, started, json);
        }
        SnapshotCommand::Inspect { file } => {
            let read = backup::read_backup(file, backup::any_state_config())?;
            print_report(file, None, &read.summary, started, json);
        }
    }
    Ok(())
}

async fn save(
    config: &crate::connect::ClientConfig,
    file: &Path,
) -> anyhow::Result<(u64, BackupSummary)> {
    // Refuse an existing file before asking the cluster for anything.
    let mut writer = BackupWriter::create(file)?;
    let mut download = Client::builder()
        .endpoints(config.endpoints.clone())
        .tls(config.tls())
        .request_timeout_ms(REQUEST_TIMEOUT_MS)
        .fetch_snapshot()
        .await
        .with_context(|| format!("cannot take a backup from {}", config.endpoints.join(", ")))?;
    let replica = download.node_id();
    while let Some(chunk) = download.next_chunk().await? {
        writer.chunk(&chunk)?;
    }
    writer.finish()?;
    // Read back what was written: the checksum and every record.
    let summary = backup::scan_backup(file)?;
    Ok((replica, summary))
}

fn print_report(
    file: &Path,
    replica: Option<u64>,
    summary: &BackupSummary,
    started: Instant,
    json: bool,
) {
    let report = Report {
        file,
        replica,
        through_slot: summary.through_slot,
        revision: summary.revision,
        time_ms: summary.time_ms,
        nodes: summary.nodes,
        sessions: summary.sessions,
        locks: summary.locks,
        records: summary.records,
        members: &summary.members,
        cluster_identity: summary.cluster_identity.map(|id| format!("{id:032x}")),
        bytes: summary.file_bytes,
        sha256: &summary.sha256,
        seconds: started.elapsed().as_secs_f64(),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string(&report).unwrap_or_else(|_| "{}".to_string())
        );
        return;
    }
    match replica {
        Some(replica) => println!(
            "saved {} from replica {replica} in {:.1} s",
            file.display(),
            report.seconds
        ),
        None => println!("{}: a valid backup", file.display()),
    }
    println!("  revision       {}", report.revision);
    println!("  through slot   {}", report.through_slot);
    println!("  state time     {} ms since the epoch", report.time_ms);
    println!("  nodes          {}", report.nodes);
    println!("  sessions       {} (closed by a restore)", report.sessions);
    println!("  locks          {}", report.locks);
    println!(
        "  members        {}",
        report
            .members
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  cluster        {}",
        report
            .cluster_identity
            .as_deref()
            .unwrap_or("(no identity yet)")
    );
    println!("  size           {} bytes", report.bytes);
    println!("  sha256         {}", report.sha256);
}
