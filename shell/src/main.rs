//! The `synod` command: the interactive shell, the same commands one at a
//! time from the command line (`synod ls /`, `synod --json get /a`), a local
//! development cluster (`synod dev`), benchmarks on a cluster of their own
//! (`synod bench fill`), backups (`synod snapshot save`) and certificates
//! (`synod certs`).
//!
//! `main` only parses arguments and dispatches: the commands are one table
//! (`table.rs`) read by completion, help and dispatch alike.

// First, so that its `say!` macro is visible in the modules below.
#[macro_use]
mod output;

mod bench;
mod certs;
mod cluster;
mod commands;
mod connect;
mod dev;
mod paths;
mod probe;
mod render;
mod repl;
mod snapshot;
mod table;

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use commands::{Interrupted, Shell};
use connect::ConnectArgs;
use table::UsageError;

/// Synod: a coordination service with locks, leader election and watches.
///
/// Without a command, opens the interactive shell on the cluster named by
/// the connection flags, the SYNOD_* environment variables, or the config
/// file `synod dev` writes.
#[derive(Parser)]
#[command(name = "synod", version, disable_help_subcommand = true)]
struct Cli {
    #[command(flatten)]
    connection: ConnectArgs,
    /// Print results as JSON, one document per line, for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Option<TopCommand>,
}

#[derive(Subcommand)]
enum TopCommand {
    /// Start a local 3-replica cluster on 127.0.0.1 and open the shell on it.
    Dev(dev::DevArgs),
    /// Make a CA and certificates for replicas and clients.
    Certs(certs::CertsArgs),
    /// Start a local 3-replica cluster of its own, measure it, and print
    /// the figures against their targets.
    Bench(bench::BenchArgs),
    /// Back up a live cluster to a file, or check a backup file.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Open the interactive shell (what `synod` alone does).
    Shell,
    /// Any shell command, run once (see the list below).
    #[command(external_subcommand)]
    Command(Vec<String>),
}

fn main() -> ExitCode {
    let after_help = format!(
        "Shell commands, also run one at a time as `synod COMMAND ...` (add --json for scripts):\n{}",
        table::overview()
    );
    let matches = Cli::command().after_help(after_help).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    if let Some(refusal) = unused_flag(&matches) {
        eprintln!("synod: {refusal}");
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is::<Interrupted>() => ExitCode::from(130),
        Err(error) if error.is::<UsageError>() => {
            eprintln!("synod: {error}");
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("synod: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The global flags that commands which connect to no cluster would
/// ignore, by command: given on the command line, they are refused rather
/// than silently dropped (set in the environment, they are not looked at).
const UNUSED_FLAGS: &[(&str, &[&str])] = &[
    ("dev", &["endpoints", "ca", "cert", "key", "config", "json"]),
    (
        "certs",
        &["endpoints", "ca", "cert", "key", "config", "json"],
    ),
    ("bench", &["endpoints", "ca", "cert", "key", "config"]),
];

/// Why the command line is refused: a flag its command does not use.
fn unused_flag(matches: &clap::ArgMatches) -> Option<String> {
    let (command, sub_matches) = matches.subcommand()?;
    let (_, unused) = UNUSED_FLAGS.iter().find(|(name, _)| *name == command)?;
    let given = |id: &str, matches: &clap::ArgMatches| {
        matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
    };
    let flag = unused
        .iter()
        .find(|id| given(id, matches) || given(id, sub_matches))?;
    let doing = match command {
        "dev" => "it starts a cluster of its own",
        "certs" => "it makes certificates and connects to no cluster",
        _ => "it measures a cluster of its own",
    };
    Some(format!(
        "synod {command} does not use --{flag} ({doing}); leave it out"
    ))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Some(TopCommand::Dev(args)) => dev::run(&runtime, &args),
        Some(TopCommand::Certs(args)) => certs::run(&args),
        Some(TopCommand::Bench(args)) => bench::run(&runtime, &args, cli.json),
        Some(TopCommand::Snapshot(command)) => {
            snapshot::run(&runtime, &cli.connection, &command, cli.json)
        }
        None | Some(TopCommand::Shell) => {
            let config = cli.connection.resolve()?;
            let client = runtime.block_on(connect::connect(&config))?;
            say!(
                "connected to {}; `help` lists the commands, Ctrl-D leaves",
                config.endpoints.join(", ")
            );
            let mut shell = Shell::new(Some(client), Some(config), true);
            shell.json = cli.json;
            repl::run(&runtime, &mut shell)
        }
        Some(TopCommand::Command(words)) => {
            let spec = words
                .first()
                .and_then(|name| table::find(name))
                .ok_or_else(|| {
                    UsageError(format!(
                        "unknown command `{}`; `synod --help` lists the commands",
                        words.first().map(String::as_str).unwrap_or("")
                    ))
                })?;
            let (client, config) = if spec.needs_cluster {
                let config = cli.connection.resolve()?;
                let client = runtime.block_on(connect::connect(&config))?;
                (Some(client), Some(config))
            } else {
                // `status` and `help` need no session; `status` needs to
                // know where the cluster is.
                (None, cli.connection.resolve().ok())
            };
            let mut shell = Shell::new(client.clone(), config, false);
            shell.json = cli.json;
            let result = runtime.block_on(shell.execute(&words));
            if let Some(client) = client {
                runtime.block_on(client.close());
            }
            result.map(|_| ())
        }
    }
}
