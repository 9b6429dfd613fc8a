//! `synod-faults`: runs Synod's fault suite against real replica processes
//! (see the crate docs), judges saved histories again, and (internally)
//! plays a client process that is killed while it holds an ephemeral node.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use synod_client::{Client, Consistency, CreateMode};
use synod_faults::check;
use synod_faults::history::History;
use synod_faults::nemesis::FaultKind;
use synod_faults::run::{self, RunOptions};

/// Synod's fault suite.
#[derive(Parser, Debug)]
#[command(name = "synod-faults", version, about)]
struct Arguments {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone)]
struct RunArguments {
    /// The schedule's seed (random when absent; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds of faults.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Replicas: 3 or 5.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=5))]
    replicas: u64,
    /// Fault kinds, comma-separated (default: every kind).
    #[arg(long, value_delimiter = ',', value_parser = parse_fault)]
    faults: Vec<FaultKind>,
    /// Where runs keep their directories (one per run, kept after the run).
    #[arg(long, default_value = "synod-faults-runs")]
    out: PathBuf,
    /// Register clients.
    #[arg(long, default_value_t = 6)]
    register_clients: u32,
    /// Lock clients.
    #[arg(long, default_value_t = 3)]
    lock_clients: u32,
    /// Registers.
    #[arg(long, default_value_t = 6)]
    keys: u32,
    /// The consistency of register reads (`sequential` only to see the
    /// linearizability checker object).
    #[arg(long, value_enum, default_value_t = Reads::Linearizable)]
    reads: Reads,
    /// The synod-server binary (default: beside this one).
    #[arg(long)]
    server_binary: Option<PathBuf>,
    /// Seconds the linearizability search may spend per register.
    #[arg(long, default_value_t = 20)]
    check_budget_secs: u64,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum Reads {
    Linearizable,
    Sequential,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One run: start a cluster, inject faults, check the history.
    Run(RunArguments),
    /// Runs one after another, each with the next seed, for `--total-secs`.
    Soak {
        #[command(flatten)]
        run: RunArguments,
        /// Seconds the soak lasts (a run started is finished).
        #[arg(long, default_value_t = 3600)]
        total_secs: u64,
    },
    /// Judges a saved run again: `DIR/history.jsonl`.
    Check {
        /// The run's directory.
        dir: PathBuf,
        /// Seconds the linearizability search may spend per register.
        #[arg(long, default_value_t = 60)]
        check_budget_secs: u64,
    },
    /// A client process that holds an ephemeral node until killed (used by
    /// runs to kill clients).
    #[command(hide = true)]
    HoldEphemeral {
        #[arg(long, value_delimiter = ',')]
        endpoints: Vec<String>,
        #[arg(long)]
        certs: PathBuf,
        #[arg(long)]
        local: std::net::IpAddr,
        #[arg(long)]
        path: String,
        #[arg(long)]
        session_timeout_ms: u64,
    },
}

fn parse_fault(name: &str) -> Result<FaultKind, String> {
    name.parse()
}

fn options(arguments: &RunArguments, seed: u64, run_number: u32) -> Result<RunOptions> {
    let own_binary = std::env::current_exe().context("this binary's path")?;
    let server_binary = arguments
        .server_binary
        .clone()
        .unwrap_or_else(|| run::server_binary_beside(&own_binary));
    let faults = if arguments.faults.is_empty() {
        FaultKind::ALL.to_vec()
    } else {
        arguments.faults.clone()
    };
    Ok(RunOptions {
        seed,
        duration: Duration::from_secs(arguments.secs),
        replicas: arguments.replicas,
        faults,
        dir: arguments.out.join(format!("seed-{seed}")),
        register_clients: arguments.register_clients,
        lock_clients: arguments.lock_clients,
        keys: arguments.keys.max(1),
        consistency: match arguments.reads {
            Reads::Linearizable => Consistency::Linearizable,
            Reads::Sequential => Consistency::Sequential,
        },
        server_binary,
        own_binary,
        check_budget: Duration::from_secs(arguments.check_budget_secs),
        run_number,
    })
}

fn random_seed() -> u64 {
    rand::random::<u64>() >> 16
}

async fn main_async(arguments: Arguments) -> Result<bool> {
    match arguments.command {
        Command::Run(run_arguments) => {
            let seed = run_arguments.seed.unwrap_or_else(random_seed);
            let result = run::run(&options(&run_arguments, seed, 0)?).await?;
            print!("{}", result.report);
            Ok(result.passed())
        }
        Command::Soak {
            run: run_arguments,
            total_secs,
        } => {
            let started = std::time::Instant::now();
            let mut seed = run_arguments.seed.unwrap_or_else(random_seed);
            let (mut runs, mut failed) = (0u32, Vec::new());
            while started.elapsed() < Duration::from_secs(total_secs) {
                let result = run::run(&options(&run_arguments, seed, runs)?).await?;
                print!("{}", result.report);
                if !result.passed() {
                    failed.push(seed);
                }
                runs += 1;
                seed += 1;
            }
            println!(
                "soak: {runs} runs, {} failed (seeds {failed:?})",
                failed.len()
            );
            Ok(failed.is_empty())
        }
        Command::Check {
            dir,
            check_budget_secs,
        } => {
            let history = History::load(&dir.join("history.jsonl"))?;
            let verdicts = check::check_all(&history, Duration::from_secs(check_budget_secs));
            for verdict in &verdicts {
                println!("{verdict}");
            }
            Ok(verdicts.iter().all(|verdict| verdict.passed))
        }
        Command::HoldEphemeral {
            endpoints,
            certs,
            local,
            path,
            session_timeout_ms,
        } => {
            let client = Client::builder()
                .endpoints(endpoints)
                .tls_dir(certs)
                .local_address(local)
                .session_timeout_ms(session_timeout_ms)
                .request_timeout_ms(3000)
                .connect()
                .await?;
            client.create(&path, b"", CreateMode::Ephemeral).await?;
            println!("held {path} in session {}", client.session_id());
            // Bounded: a holder nobody kills leaves on its own.
            tokio::time::sleep(Duration::from_secs(600)).await;
            Ok(true)
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let arguments = Arguments::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("synod-faults: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_async(arguments)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("synod-faults: {error:#}");
            ExitCode::from(2)
        }
    }
}
