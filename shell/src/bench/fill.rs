//! `synod bench fill`, phase by phase:
//!
//! 1. Start three replicas (default settings, data on disk) and wait for a
//!    leader; start the [`Monitor`] (status of each replica every 250 ms,
//!    leader changes, memory) and open the pool of sessions, each with its
//!    own client certificate so that the per-identity bounds of the
//!    default settings hold, each connected to the leader first.
//! 2. Baseline: `--clients` sessions each `set` their own node of an empty
//!    tree, one request in flight, for `--steady-secs`.
//! 3. With catch-up on (the default): stop a follower (replica 3 unless it
//!    leads) before the fill.
//! 4. Fill: create `--parents` parents, then `--nodes` nodes under them
//!    from `--sessions` sessions, `--in-flight` creates each; a rate per
//!    slice of 100,000 creates (or a tenth of the nodes).
//! 5. (Throughout: the monitor.)
//! 6. At full size: steady writes again, on nodes of the filled tree.
//! 7. Catch-up: start the stopped replica under steady writes; time until
//!    it has applied the leader's slot of the moment it started, and until
//!    it has applied what the leader had applied [`CAUGHT_UP_LAG_MS`]
//!    before.
//! 8. Restart: stop a follower (SIGTERM, wait), start it, time until a
//!    session through it alone answers `status`, `sync` and `get`; the
//!    size of each replica's data directory.
//! 9. The report, with each figure checked against its target.

use std::collections::{BTreeMap, VecDeque};
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::load::{self, Fill, Naming, SteadyWrites, FILL_ROOT};
use super::monitor::{self, Monitor, POLL_INTERVAL_MS};
use super::own_cluster;
use super::report::{
    millis, ratio, CatchUpResult, FillReport, FillResult, Phase, ReplicaDisk, ReplicaMemory,
    RestartResult, Setup, SteadyResult,
};
use super::FillArgs;
use crate::cluster::{self, LocalCluster, NODE_IDS};
use crate::connect;
use crate::probe::{self, Prober};
use synod_proto::tls::node_server_name;

/// Where the steady writers' nodes of the baseline live.
const STEADY_ROOT: &str = "/bench-steady";

/// The replica stopped during the fill, unless it leads.
const PREFERRED_LAGGING_REPLICA: u64 = 3;

/// Creates per slice of the rate table (or a tenth of the nodes, if fewer).
const SLICE_CREATES_MAX: u64 = 100_000;

/// Parents and steady nodes created at once.
const SETUP_CREATES_IN_FLIGHT: usize = 64;

/// Longest wait for the monitor to see a leader a majority agrees on.
const MONITOR_READY_TIMEOUT_MS: u64 = 15_000;

/// A caught-up replica has applied what the leader had applied this long
/// before.
const CAUGHT_UP_LAG_MS: u64 = 500;

/// Steady writes before the lagging replica starts again.
const CATCH_UP_WARMUP_MS: u64 = 500;

/// How often the catch-up and restart phases look.
const WATCH_INTERVAL_MS: u64 = 50;

/// How often a restarted replica's port is looked at.
const PORT_WATCH_INTERVAL_MS: u64 = 5;

/// Longest a restarted replica may take to serve before the phase gives up.
const RESTART_TIMEOUT_MS: u64 = 300_000;

/// Longest one serving probe of a restarted replica may take.
const PROBE_TIMEOUT_MS: u64 = 2_000;

/// Leader samples kept while waiting for the catch-up.
const LEADER_HISTORY_MAX: usize = 10_000;

/// Time to let memory settle after the writes, before the steady sample.
const SETTLE_MS: u64 = 1_000;

/// Most files counted in a data directory.
const DATA_DIR_FILES_MAX: usize = 100_000;

/// Longest the pool's sessions may take to close.
const CLOSE_TIMEOUT_MS: u64 = 5_000;

fn note(arguments: std::fmt::Arguments<'_>) {
    eprintln!("bench: {arguments}");
}

fn steady_line(result: &SteadyResult) -> String {
    format!(
        "{:.0} writes/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {} errors, {} timeouts",
        result.ops_per_sec,
        result.latency.p50_ms,
        result.latency.p99_ms,
        result.latency.max_ms,
        result.errors.values().sum::<u64>(),
        result.timeouts
    )
}

/// Runs the benchmark on `cluster` (an empty data directory; `kept` says
/// whether it stays afterwards) and returns the report.
///
/// # Errors
/// The cluster could not start or be reached, or a phase's setup (its
/// nodes, its sessions, a replica's stop or start) failed.
pub async fn run(
    cluster: &mut LocalCluster,
    args: &FillArgs,
    kept: bool,
) -> anyhow::Result<FillReport> {
    let began = Instant::now();
    let clients = usize::try_from(args.clients).context("--clients")?;
    let sessions = usize::try_from(args.sessions).context("--sessions")?;
    let pool_names = own_cluster::client_names(clients.max(sessions));

    // 1. The cluster, the monitor and the pool.
    let own_cluster::Started {
        leader: first_leader,
        server,
    } = own_cluster::start(cluster, args.cluster.server.as_deref(), &pool_names).await?;
    let monitor = Monitor::start(
        NODE_IDS
            .iter()
            .map(|&id| (id, cluster.client_config_for(&[id], "client")))
            .collect(),
        NODE_IDS
            .iter()
            .filter_map(|&id| Some((id, cluster.pid(id)?)))
            .collect(),
    );
    let leader = wait_for_leader(&monitor, cluster).await?;
    let mut order = vec![leader];
    order.extend(NODE_IDS.iter().filter(|&&id| id != leader));
    let pool = load::connect_pool(
        pool_names
            .iter()
            .map(|name| cluster.client_config_for(&order, name))
            .collect(),
        load::SESSION_TIMEOUT_MS,
        args.request_timeout_ms,
    )
    .await?;
    note(format_args!(
        "leader is replica {leader}; {} sessions open",
        pool.len()
    ));
    let data = Arc::new(
        (0..args.data_bytes)
            .map(|index| b'a' + (index % 26) as u8)
            .collect::<Vec<u8>>(),
    );
    let request_timeout = Duration::from_millis(args.request_timeout_ms);
    let steady_duration = Duration::from_secs(args.steady_secs);

    // 2. Baseline.
    monitor.enter(Phase::Baseline);
    let steady_paths: Vec<String> = (0..clients)
        .map(|index| format!("{STEADY_ROOT}/c{index:04}"))
        .collect();
    let mut setup_paths = vec![STEADY_ROOT.to_string()];
    setup_paths.extend(steady_paths.iter().cloned());
    load::create_all(
        &pool,
        setup_paths,
        Arc::new(Vec::new()),
        SETUP_CREATES_IN_FLIGHT,
        request_timeout,
    )
    .await?;
    let baseline_writers = SteadyWrites {
        clients: pool[..clients].to_vec(),
        paths: steady_paths.clone(),
        data: data.clone(),
        request_timeout,
    };
    note(format_args!(
        "baseline: {clients} clients writing for {} s",
        args.steady_secs
    ));
    let baseline = baseline_writers
        .run(steady_duration, Arc::new(AtomicBool::new(false)))
        .await?;
    note(format_args!("baseline: {}", steady_line(&baseline)));

    // 3. The lagging replica.
    monitor.enter(Phase::Fill);
    let lagging = if args.catch_up_enabled() {
        let leader = monitor.leader().unwrap_or(leader);
        let id = if leader == PREFERRED_LAGGING_REPLICA {
            NODE_IDS
                .iter()
                .rev()
                .copied()
                .find(|&id| id != leader)
                .unwrap_or(PREFERRED_LAGGING_REPLICA)
        } else {
            PREFERRED_LAGGING_REPLICA
        };
        note(format_args!("stopping replica {id} for the fill"));
        monitor.set_live(id, None);
        tokio::task::block_in_place(|| cluster.stop_replica(id))?;
        Some(id)
    } else {
        None
    };

    // 4. The fill.
    let naming = Naming {
        nodes: args.nodes,
        parents: args.parents,
    };
    let parents_started = Instant::now();
    let mut parents = vec![FILL_ROOT.to_string()];
    parents.extend((0..args.parents).map(|parent| naming.parent_path(parent)));
    load::create_all(
        &pool[..sessions],
        parents,
        Arc::new(Vec::new()),
        SETUP_CREATES_IN_FLIGHT,
        request_timeout,
    )
    .await?;
    let parents_secs = parents_started.elapsed().as_secs_f64();
    let slice_creates = SLICE_CREATES_MAX.min((args.nodes / 10).max(1));
    note(format_args!(
        "fill: {} creates from {sessions} sessions x {} in flight",
        args.nodes, args.in_flight
    ));
    let progress = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::with_draw_target(Some(args.nodes), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{bar:40} {pos}/{len} creates, {per_sec}, {elapsed} elapsed, eta {eta}",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let outcome = Fill {
        sessions: pool[..sessions].to_vec(),
        naming,
        in_flight: args.in_flight,
        data: data.clone(),
        request_timeout,
        time_bound: Duration::from_secs(args.fill_secs_max),
        slice_creates,
        cpu_clock: Some(replicas_cpu_clock(cluster, lagging)),
    }
    .run(&progress)
    .await?;
    progress.finish_and_clear();
    let failed: u64 = outcome.errors.values().sum();
    let secs = outcome.elapsed.as_secs_f64();
    let first_rate = outcome
        .slices
        .first()
        .map_or(0.0, |slice| slice.rate_per_sec);
    let last_rate = outcome
        .slices
        .last()
        .map_or(0.0, |slice| slice.rate_per_sec);
    let fill = FillResult {
        nodes: args.nodes,
        parents: args.parents,
        data_bytes: args.data_bytes,
        sessions: args.sessions,
        in_flight: args.in_flight,
        parents_secs,
        creates_done: outcome.creates_done,
        created: outcome.created,
        failed,
        errors: outcome.errors,
        timed_out: outcome.timed_out,
        stopped_at_time_bound: outcome.stopped_at_time_bound,
        secs,
        rate_per_sec: ratio(outcome.created as f64, secs),
        first_slice_rate_per_sec: first_rate,
        last_slice_rate_per_sec: last_rate,
        last_to_first_ratio: ratio(last_rate, first_rate),
        slice_creates,
        slices: outcome.slices,
        latency: outcome.latency,
    };
    note(format_args!(
        "fill: {} created in {:.1} s ({:.0}/s), {} failed, {} timed out",
        fill.created, fill.secs, fill.rate_per_sec, fill.failed, fill.timed_out
    ));

    // 6. At full size.
    monitor.enter(Phase::FullSize);
    let full_paths: Vec<String> = (0..args.clients)
        .map(|index| naming.node_path(index * args.nodes / args.clients))
        .collect();
    let full_writers = SteadyWrites {
        clients: pool[..clients].to_vec(),
        paths: full_paths,
        data: data.clone(),
        request_timeout,
    };
    note(format_args!(
        "full size: {clients} clients writing for {} s",
        args.steady_secs
    ));
    let full_size = full_writers
        .run(steady_duration, Arc::new(AtomicBool::new(false)))
        .await?;
    note(format_args!("full size: {}", steady_line(&full_size)));

    // 7. Catch-up.
    let catch_up = match lagging {
        Some(id) => {
            monitor.enter(Phase::CatchUp);
            note(format_args!(
                "catch-up: starting replica {id} under steady writes"
            ));
            let result = catch_up(
                cluster,
                &server,
                &monitor,
                &baseline_writers,
                id,
                Duration::from_secs(args.catch_up_secs_max),
            )
            .await?;
            note(format_args!(
                "catch-up: reached the target after {}, caught up after {}; writes {}",
                shown_ms(result.reached_target_ms),
                shown_ms(result.caught_up_ms),
                steady_line(&result.writes)
            ));
            Some(result)
        }
        None => None,
    };

    // Memory after the fill, once every replica holds the full tree.
    tokio::time::sleep(Duration::from_millis(SETTLE_MS)).await;
    let steady_kb: BTreeMap<u64, u64> = NODE_IDS
        .iter()
        .filter_map(|&id| Some((id, monitor.sample_memory(id)?.rss_kb)))
        .collect();

    // 8. Restart.
    monitor.enter(Phase::Restart);
    let leader_now = monitor.leader().unwrap_or(leader);
    let restarted = NODE_IDS
        .iter()
        .copied()
        .find(|&id| id != leader_now && Some(id) != lagging)
        .or_else(|| NODE_IDS.iter().copied().find(|&id| id != leader_now))
        .context("no follower to restart")?;
    note(format_args!(
        "restart: stopping and starting replica {restarted}"
    ));
    let restart = restart(cluster, &server, &monitor, restarted, &steady_paths[0]).await?;
    note(format_args!(
        "restart: serving after {}",
        shown_ms(restart.serving_ms)
    ));
    let disk: Vec<ReplicaDisk> = NODE_IDS
        .iter()
        .map(|&id| ReplicaDisk {
            replica: id,
            data_dir_mb: dir_bytes(&cluster.node_dir(id)) as f64 / MB,
        })
        .collect();

    // 9. The report.
    let memory: Vec<ReplicaMemory> = NODE_IDS
        .iter()
        .map(|&id| {
            let peaks: BTreeMap<Phase, f64> = monitor
                .peaks_kb(id)
                .into_iter()
                .map(|(phase, kb)| (phase, kb as f64 / KB_PER_MB))
                .collect();
            ReplicaMemory {
                replica: id,
                steady_rss_mb: steady_kb.get(&id).map(|&kb| kb as f64 / KB_PER_MB),
                peak_rss_mb: peaks.values().copied().fold(0.0, f64::max),
                peak_rss_mb_by_phase: peaks,
            }
        })
        .collect();
    let (leader_changes, leader_change_events) = monitor.leader_changes();
    load::close_all(pool, Duration::from_millis(CLOSE_TIMEOUT_MS)).await;
    monitor.stop().await;
    let mut report = FillReport {
        setup: Setup {
            data_dir: cluster.data().display().to_string(),
            kept,
            endpoints: NODE_IDS
                .iter()
                .map(|&id| cluster.client_address(id))
                .collect(),
            leader: first_leader,
            lagging_replica: lagging,
            request_timeout_ms: args.request_timeout_ms,
        },
        full_size_to_baseline_ratio: ratio(full_size.ops_per_sec, baseline.ops_per_sec),
        baseline,
        fill,
        full_size,
        catch_up,
        restart,
        memory,
        disk,
        leader_changes,
        leader_change_events,
        total_secs: began.elapsed().as_secs_f64(),
        checks: Vec::new(),
        passed: false,
    };
    report.evaluate();
    Ok(report)
}

/// kB per MB, for `/proc`'s figures.
const KB_PER_MB: f64 = 1024.0;

/// Bytes per MB.
const MB: f64 = 1024.0 * 1024.0;

fn shown_ms(value: Option<f64>) -> String {
    value.map_or_else(|| "never".into(), |ms| format!("{ms:.0} ms"))
}

/// Waits until the monitor sees a leader that a majority agrees on.
/// Reads the CPU time the replicas running the fill (all but `lagging`)
/// have used so far; `None` once one of them is gone.
fn replicas_cpu_clock(cluster: &LocalCluster, lagging: Option<u64>) -> load::CpuClock {
    let pids: Vec<u32> = NODE_IDS
        .iter()
        .filter(|&&id| Some(id) != lagging)
        .filter_map(|&id| cluster.pid(id))
        .collect();
    Arc::new(move || pids.iter().map(|&pid| monitor::read_cpu_time(pid)).sum())
}

async fn wait_for_leader(monitor: &Monitor, cluster: &mut LocalCluster) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_millis(MONITOR_READY_TIMEOUT_MS);
    loop {
        if let Some(leader) = monitor.leader() {
            return Ok(leader);
        }
        cluster.check_alive()?;
        if Instant::now() >= deadline {
            bail!("no leader a majority agrees on after {MONITOR_READY_TIMEOUT_MS} ms");
        }
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
}

/// Phase 7: starts `lagging` again while `writers` write, and times its
/// catch-up (within `bound`).
async fn catch_up(
    cluster: &mut LocalCluster,
    server: &Path,
    monitor: &Monitor,
    writers: &SteadyWrites,
    lagging: u64,
    bound: Duration,
) -> anyhow::Result<CatchUpResult> {
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writers.run(
        bound + Duration::from_millis(CATCH_UP_WARMUP_MS),
        stop.clone(),
    );
    let watch = async {
        let watched = watch_catch_up(cluster, server, monitor, lagging, bound).await;
        stop.store(true, Ordering::Relaxed);
        watched
    };
    let (writes, watched) = tokio::join!(writes, watch);
    let mut result = watched?;
    result.writes = writes?;
    result.leader_changes = monitor.leader_changes_in(Phase::CatchUp);
    Ok(result)
}

async fn watch_catch_up(
    cluster: &mut LocalCluster,
    server: &Path,
    monitor: &Monitor,
    lagging: u64,
    bound: Duration,
) -> anyhow::Result<CatchUpResult> {
    tokio::time::sleep(Duration::from_millis(CATCH_UP_WARMUP_MS)).await;
    // Probes without a session: a session through the lagging replica
    // opens only once it has applied the open, which would hide its
    // progress until it has caught up.
    let material = cluster
        .client_config()
        .tls()
        .load()
        .context("cannot load the client's TLS files")?;
    let lagging_address = cluster.client_address(lagging);
    let lagging_name = node_server_name(lagging);
    let lagging_port: u16 = port_of(&lagging_address)?;
    let prober = Prober::new(
        &material,
        probe::resolve(&lagging_address)?,
        Duration::from_millis(PROBE_TIMEOUT_MS),
    )?;
    let mut leader = monitor.leader().context("no leader before the catch-up")?;
    let target = prober
        .status(&cluster.client_address(leader), &node_server_name(leader))
        .await
        .context("cannot read the leader's status")?
        .replica
        .applied_through;
    // The leader's applied slot over time, to tell how far behind it the
    // lagging replica is.
    let mut history: VecDeque<(Instant, u64)> = VecDeque::from([(Instant::now(), target)]);
    let started = Instant::now();
    tokio::task::block_in_place(|| cluster.start(server, &[lagging], &[]))?;
    monitor.set_live(lagging, cluster.pid(lagging));
    let deadline = started + bound;
    let lag = Duration::from_millis(CAUGHT_UP_LAG_MS);
    let mut result = CatchUpResult {
        replica: lagging,
        target_applied_through: target,
        lag_bound_ms: CAUGHT_UP_LAG_MS,
        ..CatchUpResult::default()
    };
    while Instant::now() < deadline {
        cluster.check_alive()?;
        leader = monitor.leader().unwrap_or(leader);
        let leader_address = cluster.client_address(leader);
        let leader_name = node_server_name(leader);
        let (leader_status, lagging_status) =
            tokio::join!(prober.status(&leader_address, &leader_name), async {
                if cluster::udp_port_bound(lagging_port) {
                    prober.status(&lagging_address, &lagging_name).await.ok()
                } else {
                    None
                }
            });
        let now = Instant::now();
        let leader_applied = leader_status
            .ok()
            .map(|status| status.replica.applied_through);
        if let Some(applied) = leader_applied {
            history.push_back((now, applied));
            if history.len() > LEADER_HISTORY_MAX {
                history.pop_front();
            }
        }
        if let Some(status) = lagging_status {
            let applied = status.replica.applied_through;
            let since_start = millis(now - started);
            result.first_status_ms.get_or_insert(since_start);
            if let Some(leader_applied) = leader_applied {
                result.lag_slots_at_end = Some(leader_applied.saturating_sub(applied));
            }
            if applied >= target {
                result.reached_target_ms.get_or_insert(since_start);
                // What the leader had applied `lag` before now.
                let reference = history
                    .iter()
                    .rev()
                    .find(|&&(at, _)| at + lag <= now)
                    .map(|&(_, applied)| applied);
                if reference.is_some_and(|reference| applied >= reference) {
                    result.caught_up_ms = Some(since_start);
                    result.caught_up = true;
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(WATCH_INTERVAL_MS)).await;
    }
    Ok(result)
}

fn port_of(address: &str) -> anyhow::Result<u16> {
    address
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .with_context(|| format!("{address} has no port"))
}

/// Phase 8: stops follower `id`, starts it again, and times until it serves
/// (`probe_path` is read through it).
async fn restart(
    cluster: &mut LocalCluster,
    server: &Path,
    monitor: &Monitor,
    id: u64,
    probe_path: &str,
) -> anyhow::Result<RestartResult> {
    monitor.set_live(id, None);
    let stopping = Instant::now();
    tokio::task::block_in_place(|| cluster.stop_replica(id))?;
    let stop_ms = millis(stopping.elapsed());
    let port = port_of(&cluster.client_address(id))?;
    let config = cluster.client_config_for(&[id], "client");
    let started = Instant::now();
    tokio::task::block_in_place(|| cluster.start(server, &[id], &[]))?;
    monitor.set_live(id, cluster.pid(id));
    let deadline = started + Duration::from_millis(RESTART_TIMEOUT_MS);
    let mut result = RestartResult {
        replica: id,
        stop_ms,
        ..RestartResult::default()
    };
    while Instant::now() < deadline {
        cluster.check_alive()?;
        if cluster::udp_port_bound(port) {
            result.port_bound_ms = Some(millis(started.elapsed()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(PORT_WATCH_INTERVAL_MS)).await;
    }
    while result.port_bound_ms.is_some() && Instant::now() < deadline {
        cluster.check_alive()?;
        if let Ok(client) = connect::connect_within(&config, PROBE_TIMEOUT_MS).await {
            let probe = async {
                client.status().await?;
                client.sync().await?;
                client.get(probe_path).await?;
                Ok::<(), synod_client::ClientError>(())
            };
            let served = tokio::time::timeout(Duration::from_millis(PROBE_TIMEOUT_MS), probe).await;
            let at = started.elapsed();
            client.close().await;
            if matches!(served, Ok(Ok(()))) {
                result.serving_ms = Some(millis(at));
                result.served = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(WATCH_INTERVAL_MS)).await;
    }
    result.leader_changes = monitor.leader_changes_in(Phase::Restart);
    Ok(result)
}

/// The sum of the sizes of the files under `dir` (at most
/// [`DATA_DIR_FILES_MAX`] entries are looked at).
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![dir.to_owned()];
    let mut seen = 0usize;
    while let Some(path) = stack.pop() {
        seen += 1;
        if seen > DATA_DIR_FILES_MAX {
            break;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|entry| entry.path()));
            }
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_size_sums_its_files() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("a"), [0u8; 1000]).expect("write");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/b"), [0u8; 24]).expect("write");
        assert_eq!(dir_bytes(dir.path()), 1024);
        assert_eq!(dir_bytes(&dir.path().join("missing")), 0);
    }
}
