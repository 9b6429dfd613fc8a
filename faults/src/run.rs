//! One fault run, start to verdict:
//!
//! 1. start the cluster (separate `synod-server` processes) and the
//!    firewall table, and the client workers;
//! 2. inject faults from the seed's schedule until the run's time is up,
//!    killing a client process that holds an ephemeral node now and then;
//! 3. heal everything and stop the workers; kill client processes in the
//!    quiet and time how long their sessions take to expire;
//! 4. kill -9 every replica, restart them, wait until every one has caught
//!    up, and read every register and the sequential nodes again (the final
//!    reads join the history, so a lost acknowledged write is a
//!    linearizability violation);
//! 5. save the history, run the checkers, print and save the report.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use synod_client::{Client, Consistency, ErrorKind};
use tokio::sync::watch;

use crate::check::{self, Verdict};
use crate::cluster::{AddressPlan, Cluster, Timeouts};
use crate::history::{Call, History, Outcome};
use crate::nemesis::{FaultKind, Nemesis};
use crate::net::{self, Firewall};
use crate::recorder::Recorder;
use crate::report;
use crate::workload::{self, ClientSettings, WorkerContext, EPHEMERALS, SEQUENCE_PARENT};

/// The session timeout of the run's clients.
pub const SESSION_TIMEOUT_MS: u64 = 3000;
/// How much later than its timeout a dead client's session may expire when
/// no fault is under way: the new leader's grace for sessions to find it
/// (`session_grace_ms`, 2 s) plus a second of checkpoints and polling.
pub const EXPIRY_SLACK_MS: u64 = 3000;

/// What a run does.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The schedule's seed.
    pub seed: u64,
    /// How long faults are injected.
    pub duration: Duration,
    /// The number of replicas (3 or 5).
    pub replicas: u64,
    /// The kinds of fault, taken in a shuffled rotation.
    pub faults: Vec<FaultKind>,
    /// The run's directory (history, logs, data, report).
    pub dir: PathBuf,
    /// Register workers.
    pub register_clients: u32,
    /// Lock workers.
    pub lock_clients: u32,
    /// Registers.
    pub keys: u32,
    /// The consistency of register reads (linearizable unless testing the
    /// checker).
    pub consistency: Consistency,
    /// The `synod-server` binary.
    pub server_binary: PathBuf,
    /// The `synod-faults` binary (it runs the killed client processes).
    pub own_binary: PathBuf,
    /// The linearizability search's budget per register.
    pub check_budget: Duration,
    /// Tells runs of one process apart (their addresses and tables).
    pub run_number: u32,
}

/// What a run found.
#[derive(Debug)]
pub struct RunResult {
    /// Every verdict.
    pub verdicts: Vec<Verdict>,
    /// The printed report.
    pub report: String,
}

impl RunResult {
    /// Whether every verdict passed.
    pub fn passed(&self) -> bool {
        self.verdicts.iter().all(|verdict| verdict.passed)
    }
}

/// The `synod-server` binary beside `own` (in `target/<profile>/`, or one
/// level up for a test binary in `deps/`).
pub fn server_binary_beside(own: &Path) -> PathBuf {
    let dir = own.parent().unwrap_or(Path::new("."));
    let beside = dir.join("synod-server");
    if beside.is_file() {
        return beside;
    }
    dir.parent()
        .map_or(beside.clone(), |up| up.join("synod-server"))
}

/// A client process holding an ephemeral node, killed with `SIGKILL`.
struct KilledHolder {
    path: String,
    killed_at: Instant,
    /// Whether faults were under way when it was killed.
    during_faults: bool,
}

fn spawn_holder(
    options: &RunOptions,
    settings: &ClientSettings,
    index: u32,
    path: &str,
) -> Result<Child> {
    let mut child = Command::new(&options.own_binary)
        .arg("hold-ephemeral")
        .arg("--endpoints")
        .arg(settings.endpoints.join(","))
        .arg("--certs")
        .arg(&settings.certs)
        .arg("--local")
        .arg(settings.plan.client(index).to_string())
        .arg("--path")
        .arg(path)
        .arg("--session-timeout-ms")
        .arg(SESSION_TIMEOUT_MS.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {}", options.own_binary.display()))?;
    let stdout = child.stdout.take().context("the holder's output")?;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = sender.send(line);
    });
    match receiver.recv_timeout(Duration::from_secs(15)) {
        Ok(line) if line.starts_with("held") => Ok(child),
        other => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the holder of {path} did not create it: {other:?}")
        }
    }
}

/// Kills one more ephemeral holder, if it starts (a holder that cannot
/// connect during a fault is skipped).
fn kill_a_holder(
    options: &RunOptions,
    settings: &ClientSettings,
    holders: &mut Vec<KilledHolder>,
    during_faults: bool,
) {
    let number = holders.len() as u32;
    let path = format!("{EPHEMERALS}/holder-{number}");
    match spawn_holder(options, settings, 140 + number % 10, &path) {
        Ok(mut child) => {
            let _ = child.kill();
            let killed_at = Instant::now();
            let _ = child.wait();
            holders.push(KilledHolder {
                path,
                killed_at,
                during_faults,
            });
        }
        Err(error) => tracing::info!(%error, "no holder this time"),
    }
}

/// Runs one fault run to its verdict.
///
/// # Errors
/// The cluster or the firewall could not be set up, or the history could
/// not be saved; a violation is a verdict, not an error.
pub async fn run(options: &RunOptions) -> Result<RunResult> {
    std::fs::create_dir_all(&options.dir)?;
    println!(
        "fault run: seed {}, {} replicas, {} s, faults {}, in {}",
        options.seed,
        options.replicas,
        options.duration.as_secs(),
        options
            .faults
            .iter()
            .map(|kind| kind.name())
            .collect::<Vec<_>>()
            .join(","),
        options.dir.display()
    );
    let needs_firewall = options.faults.iter().any(|kind| kind.needs_firewall());
    if needs_firewall && !net::available() {
        bail!("these faults need nftables (`nft`, run as root): leave out the partitions and client-cut-off");
    }
    let plan = AddressPlan::for_process(options.run_number);
    let timeouts = Timeouts::default();
    let mut cluster = Cluster::start(
        &options.dir,
        options.replicas,
        plan,
        &options.server_binary,
        timeouts,
    )?;
    let mut firewall = if needs_firewall {
        Some(Firewall::new(options.run_number)?)
    } else {
        None
    };
    if cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .is_none()
    {
        bail!(
            "no leader within 30 s of the start (see {})",
            cluster.log_path(1).display()
        );
    }
    let recorder = Arc::new(Recorder::new());
    let settings = ClientSettings {
        endpoints: cluster.client_endpoints(),
        certs: cluster.certs_dir().to_path_buf(),
        plan,
        session_timeout_ms: SESSION_TIMEOUT_MS,
        request_timeout_ms: 2000,
        consistency: options.consistency,
    };
    // The harness's own checks read linearizably whatever the workload does.
    let checking = ClientSettings {
        consistency: Consistency::Linearizable,
        ..settings.clone()
    };
    let admin = connect_retrying(&checking, 149, Duration::from_secs(30)).await?;
    workload::prepare(&admin).await?;

    let (stop_sender, stop) = watch::channel(false);
    let attachments = Arc::new(Mutex::new(HashMap::new()));
    let context = WorkerContext {
        settings: settings.clone(),
        recorder: recorder.clone(),
        stop,
        attachments: Arc::clone(&attachments),
        keys: options.keys,
    };
    let mut tasks = Vec::new();
    let mut next_client = 1u32;
    for _ in 0..options.register_clients {
        let seed = options.seed ^ u64::from(next_client) << 32;
        tasks.push(tokio::spawn(workload::register_worker(
            context.clone(),
            next_client,
            seed,
        )));
        next_client += 1;
    }
    tasks.push(tokio::spawn(workload::sequence_worker(
        context.clone(),
        next_client,
    )));
    next_client += 1;
    let mut lock_clients = Vec::new();
    for _ in 0..options.lock_clients {
        let seed = options.seed ^ u64::from(next_client) << 40;
        lock_clients.push(next_client);
        tasks.push(tokio::spawn(workload::lock_worker(
            context.clone(),
            next_client,
            seed,
        )));
        next_client += 1;
    }
    tasks.push(tokio::spawn(workload::watch_worker(
        context.clone(),
        next_client,
    )));

    // Faults.
    let mut holders = Vec::new();
    let mut crashes = Vec::new();
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let nemesis_rng = ChaCha8Rng::seed_from_u64(rng.random());
    let mut nemesis = Nemesis {
        cluster: &mut cluster,
        firewall: firewall.as_mut(),
        recorder: recorder.clone(),
        lock_clients,
        attachments: Arc::clone(&attachments),
        rng: nemesis_rng,
        skew_ppm_max: (timeouts.clock_drift_margin_ms * 1_000_000 / timeouts.lease_ms) as i64 / 2,
    };
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut rotation: Vec<FaultKind> = Vec::new();
    let mut fault_counts: BTreeMap<&'static str, u32> = BTreeMap::new();
    while started.elapsed() < options.duration && !options.faults.is_empty() {
        if rotation.is_empty() {
            rotation = options.faults.clone();
            rotation.shuffle(&mut rng);
        }
        let Some(kind) = rotation.pop() else { break };
        *fault_counts.entry(kind.name()).or_default() += 1;
        nemesis.inject(kind).await?;
        for (id, status) in nemesis.cluster.reap_exited() {
            let message = format!(
                "replica {id} exited by itself ({status}); see {}",
                nemesis.cluster.log_path(id).display()
            );
            recorder.fault("crash", message.clone());
            crashes.push(message);
            nemesis.cluster.restart(id)?;
        }
        if rng.random_range(0..3) == 0 {
            kill_a_holder(options, &settings, &mut holders, true);
        }
        let quiet = Duration::from_millis(rng.random_range(1000..=3000));
        tokio::time::sleep(quiet).await;
    }
    nemesis.heal_all()?;
    recorder.fault("heal", "every fault healed".into());
    drop(nemesis);
    let leader_after_heal = cluster.wait_for_leader(Duration::from_secs(30)).await;
    // Long enough for sessions that failed over to move back home.
    tokio::time::sleep(Duration::from_millis(
        workload::REBALANCE_AFTER_MS * 3 / 2 + 1000,
    ))
    .await;
    let sessions_by_replica = sessions_by_replica(&attachments);
    let _ = stop_sender.send(true);
    for task in tasks {
        if tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .is_err()
        {
            crashes.push("a client worker did not stop within 20 s of the stop".into());
        }
    }
    for (id, status) in cluster.reap_exited() {
        crashes.push(format!("replica {id} exited by itself ({status})"));
        cluster.restart(id)?;
    }

    // The harness's own session may have expired during the faults (a
    // stall longer than its timeout): the expiry check reads with a fresh
    // one, opened before the quiet's holders are killed.
    admin.close().await;
    let admin = connect_retrying(&checking, 149, Duration::from_secs(30)).await?;

    // Dead clients' sessions, in the quiet.
    for _ in 0..3 {
        kill_a_holder(options, &settings, &mut holders, false);
    }
    let expiry = check_expiry(&admin, &holders).await;
    admin.close().await;

    // Every replica killed and restarted: nothing acknowledged may be lost.
    recorder.fault(
        "kill-all",
        "final: kill -9 every replica and restart".into(),
    );
    for id in cluster.ids() {
        cluster.kill(id)?;
    }
    for id in cluster.ids() {
        cluster.restart(id)?;
    }
    let leader_after_restart = cluster.wait_for_leader(Duration::from_secs(30)).await;
    let reader = connect_retrying(&checking, 148, Duration::from_secs(30)).await?;
    let final_client = 1000;
    for key in 0..options.keys {
        let path = workload::register_path(key);
        let invoked = recorder.now_ns();
        let outcome = match reader.get(&path).await {
            Ok((data, stat)) => Outcome::Read {
                value: Some((String::from_utf8_lossy(&data).into_owned(), stat.version)),
            },
            Err(error) if error.kind() == ErrorKind::NoNode => Outcome::Read { value: None },
            Err(error) => Outcome::Failed {
                error: error.to_string(),
            },
        };
        recorder.operation(final_client, invoked, Call::Read { key: path }, outcome);
    }
    let sequence_children = reader.children(SEQUENCE_PARENT).await.ok();
    reader.close().await;
    let caught_up = cluster.wait_all_caught_up(Duration::from_secs(60)).await;

    // Verdicts.
    let history = recorder.history();
    history.save(&options.dir.join("history.jsonl"))?;
    let mut verdicts = check::check_all(&history, options.check_budget);
    verdicts.push(Verdict {
        checker: "replicas",
        passed: crashes.is_empty() && leader_after_heal.is_some() && leader_after_restart.is_some(),
        checked: cluster.ids().len(),
        problems: crashes
            .into_iter()
            .chain(
                leader_after_heal
                    .is_none()
                    .then(|| "no leader within 30 s after the faults healed".to_string()),
            )
            .chain(
                leader_after_restart
                    .is_none()
                    .then(|| "no leader within 30 s of the final restart".to_string()),
            )
            .collect(),
    });
    verdicts.push(Verdict {
        checker: "catch-up",
        passed: caught_up.is_some(),
        checked: cluster.ids().len(),
        problems: if caught_up.is_some() {
            Vec::new()
        } else {
            vec!["some replica did not catch up within 60 s of the final restart".into()]
        },
    });
    verdicts.push(durable_sequence(&history, sequence_children.as_deref()));
    verdicts.push(expiry.verdict);
    cluster.stop_all();
    drop(firewall);

    let report = report::render(
        options,
        &history,
        &verdicts,
        &fault_counts,
        &expiry.figures,
        caught_up,
        &sessions_by_replica,
    );
    std::fs::write(options.dir.join("report.txt"), &report)?;
    Ok(RunResult { verdicts, report })
}

/// How many of the workers' sessions each replica serves now.
fn sessions_by_replica(attachments: &workload::Attachments) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    let clients = attachments.lock().unwrap_or_else(|e| e.into_inner());
    for client in clients.values() {
        if let synod_client::SessionState::Connected { node_id, .. } = *client.state().borrow() {
            *counts.entry(node_id).or_default() += 1;
        }
    }
    counts
}

async fn connect_retrying(
    settings: &ClientSettings,
    index: u32,
    within: Duration,
) -> Result<Client> {
    let deadline = Instant::now() + within;
    loop {
        match settings.connect(index).await {
            Ok(client) => return Ok(client),
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(%error, "connect failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => return Err(error).context("connect a client"),
        }
    }
}

/// Every sequential node acknowledged is still there after the final
/// restart.
fn durable_sequence(history: &History, children: Option<&[String]>) -> Verdict {
    let created: Vec<&str> = history
        .operations()
        .filter_map(|operation| match &operation.outcome {
            Outcome::Created { path } => Some(path.as_str()),
            _ => None,
        })
        .collect();
    let mut problems = Vec::new();
    match children {
        None => problems.push(format!(
            "{SEQUENCE_PARENT} could not be listed after the final restart"
        )),
        Some(children) => {
            let present: std::collections::HashSet<String> = children
                .iter()
                .map(|child| format!("{SEQUENCE_PARENT}/{child}"))
                .collect();
            for path in &created {
                if !present.contains(*path) {
                    problems.push(format!(
                        "acknowledged {path} is missing after the final restart"
                    ));
                }
            }
        }
    }
    Verdict {
        checker: "durability",
        passed: problems.is_empty(),
        checked: created.len(),
        problems,
    }
}

/// How the sessions of killed client processes expired.
pub struct Expiry {
    /// The verdict.
    pub verdict: Verdict,
    /// Milliseconds from the kill to the node's disappearance, of the
    /// holders killed in the quiet.
    pub figures: Vec<u64>,
}

async fn check_expiry(admin: &Client, holders: &[KilledHolder]) -> Expiry {
    let bound = Duration::from_millis(SESSION_TIMEOUT_MS + EXPIRY_SLACK_MS);
    let heal = Instant::now();
    // A holder killed during the faults may have waited for a leader; its
    // bound counts from the heal, with 5 s more for the cluster to settle.
    let deadline_of = |holder: &KilledHolder| {
        if holder.during_faults {
            heal.max(holder.killed_at) + bound + Duration::from_secs(5)
        } else {
            holder.killed_at + bound
        }
    };
    let mut pending: Vec<&KilledHolder> = holders.iter().collect();
    let mut problems = Vec::new();
    let mut figures = Vec::new();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for holder in pending {
            let answer = admin.exists(&holder.path).await;
            let gone = matches!(answer, Ok(None));
            let last_error = answer.err().map(|error| error.to_string());
            let now = Instant::now();
            if gone {
                if !holder.during_faults {
                    figures.push(now.duration_since(holder.killed_at).as_millis() as u64);
                }
            } else if now >= deadline_of(holder) {
                problems.push(format!(
                    "the session holding {} (its client killed {}) did not expire within {} ms{}",
                    holder.path,
                    if holder.during_faults {
                        "during the faults"
                    } else {
                        "in the quiet"
                    },
                    bound.as_millis(),
                    last_error
                        .map(|error| format!(" (the last check failed: {error})"))
                        .unwrap_or_default()
                ));
            } else {
                still.push(holder);
            }
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Expiry {
        verdict: Verdict {
            checker: "session-expiry",
            passed: problems.is_empty(),
            checked: holders.len(),
            problems,
        },
        figures,
    }
}
