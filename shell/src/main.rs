//! The `synod` command.

use clap::{Parser, Subcommand};

/// Synod: a coordination service with locks, leader election and watches.
#[derive(Parser)]
#[command(name = "synod", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local 3-replica cluster with the shell attached.
    Dev,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Dev => {
            println!(
                "synod {} (protocol {}): the replica binary and the shell are not built yet.",
                env!("CARGO_PKG_VERSION"),
                synod_client::PROTOCOL_VERSION
            );
            println!("What exists: the Multi-Paxos core (crate synod-paxos) and its simulator;");
            println!("run `cargo test -p synod-paxos --release` to exercise it.");
            Ok(())
        }
    }
}
