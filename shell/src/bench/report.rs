//! What `synod bench fill` measured, the targets each figure is checked
//! against, and the two ways it is printed: a text report for people and
//! one JSON document for scripts (the same figures).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Creates per second the whole fill must reach.
pub const FILL_RATE_MIN_PER_SEC: f64 = 20_000.0;
/// The last slice's rate over the first slice's must be at least this.
pub const SLICE_RATIO_MIN: f64 = 0.8;
/// Steady writes at full size over the baseline must be at least this.
pub const STEADY_RATIO_MIN: f64 = 0.8;
/// Steady writes' p99 latency at full size must be below this.
pub const STEADY_P99_MAX_MS: f64 = 25.0;
/// Each replica's resident memory after the fill must be at most this.
pub const RSS_MAX_MB: f64 = 400.0;
/// Each replica's peak resident memory over its steady one must be at most this.
pub const PEAK_TO_STEADY_MAX: f64 = 1.2;
/// A restarted replica must serve within this.
pub const RESTART_SERVING_MAX_MS: f64 = 2_000.0;

/// A phase of the benchmark, for the figures counted per phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Starting the cluster and waiting for a leader.
    Start,
    /// Steady writes on an empty tree.
    Baseline,
    /// Stopping the lagging replica, creating the parents and the nodes.
    Fill,
    /// Steady writes on the filled tree.
    FullSize,
    /// The lagging replica catching up under steady writes.
    CatchUp,
    /// Stopping and restarting a follower.
    Restart,
}

impl Phase {
    /// Every phase, in the order they run.
    pub const ALL: [Phase; 6] = [
        Phase::Start,
        Phase::Baseline,
        Phase::Fill,
        Phase::FullSize,
        Phase::CatchUp,
        Phase::Restart,
    ];

    /// The phase's name, as in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Start => "start",
            Phase::Baseline => "baseline",
            Phase::Fill => "fill",
            Phase::FullSize => "full_size",
            Phase::CatchUp => "catch_up",
            Phase::Restart => "restart",
        }
    }
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Slowest.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

impl Latency {
    /// The percentiles of a histogram of microseconds (zeros when empty).
    pub fn of(histogram: &Histogram<u64>) -> Latency {
        if histogram.is_empty() {
            return Latency::default();
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Latency {
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p90_ms: ms(histogram.value_at_quantile(0.90)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
            mean_ms: histogram.mean() / 1000.0,
        }
    }
}

/// Steady writes: clients each setting their own node, one request in
/// flight per client.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SteadyResult {
    /// Clients writing.
    pub clients: u64,
    /// How long they wrote.
    pub secs: f64,
    /// Writes that succeeded.
    pub ops: u64,
    /// Successful writes per second.
    pub ops_per_sec: f64,
    /// Latency of the successful writes.
    pub latency: Latency,
    /// Failed writes by error kind (timeouts apart).
    pub errors: BTreeMap<String, u64>,
    /// Writes without an answer within the request timeout.
    pub timeouts: u64,
}

/// One slice of the fill.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Slice {
    /// Creates done (answered) at the end of the slice.
    pub creates_done: u64,
    /// Creates per second within the slice.
    pub rate_per_sec: f64,
    /// Seconds since the fill started, at the end of the slice.
    pub elapsed_secs: f64,
    /// CPU time (user and system) the running replicas used per create in
    /// the slice, in microseconds, when they are local processes. Steadier
    /// than the rate on a shared machine.
    pub cpu_us_per_create: Option<f64>,
}

/// The fill: creates under the parents from many sessions.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FillResult {
    /// Creates asked for.
    pub nodes: u64,
    /// Parent nodes they are spread under.
    pub parents: u64,
    /// Bytes of data per node.
    pub data_bytes: u64,
    /// Sessions creating.
    pub sessions: u64,
    /// Creates in flight per session.
    pub in_flight: u64,
    /// Seconds to create the parents (not in the rates).
    pub parents_secs: f64,
    /// Creates answered, whatever the answer.
    pub creates_done: u64,
    /// Creates that succeeded.
    pub created: u64,
    /// Creates refused or failed, timeouts apart.
    pub failed: u64,
    /// Failed creates by error kind.
    pub errors: BTreeMap<String, u64>,
    /// Creates without an answer within the request timeout.
    pub timed_out: u64,
    /// Whether the fill stopped at its time bound before all creates.
    pub stopped_at_time_bound: bool,
    /// Seconds from the first create to the last answer.
    pub secs: f64,
    /// Successful creates per second over the whole fill.
    pub rate_per_sec: f64,
    /// The first slice's rate.
    pub first_slice_rate_per_sec: f64,
    /// The last slice's rate.
    pub last_slice_rate_per_sec: f64,
    /// The last slice's rate over the first's.
    pub last_to_first_ratio: f64,
    /// Creates per slice.
    pub slice_creates: u64,
    /// Every slice.
    pub slices: Vec<Slice>,
    /// Latency of the successful creates.
    pub latency: Latency,
}

/// A replica catching up under steady writes after missing the fill.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CatchUpResult {
    /// The replica that was stopped during the fill.
    pub replica: u64,
    /// The leader's applied slot when the replica started again.
    pub target_applied_through: u64,
    /// Milliseconds from start until the replica first answered status.
    pub first_status_ms: Option<f64>,
    /// Milliseconds from start until it had applied the target slot.
    pub reached_target_ms: Option<f64>,
    /// Milliseconds from start until it was within the lag bound of the
    /// leader (it had applied what the leader had applied that long before).
    pub caught_up_ms: Option<f64>,
    /// The lag bound, in milliseconds.
    pub lag_bound_ms: u64,
    /// Slots it was behind the leader when last seen together.
    pub lag_slots_at_end: Option<u64>,
    /// Whether it caught up within the time bound.
    pub caught_up: bool,
    /// The writes that ran meanwhile.
    pub writes: SteadyResult,
    /// Leader changes during the catch-up.
    pub leader_changes: u64,
}

/// A follower stopped and started again.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RestartResult {
    /// The follower.
    pub replica: u64,
    /// Milliseconds from SIGTERM until it exited.
    pub stop_ms: f64,
    /// Milliseconds from start until its client port was bound.
    pub port_bound_ms: Option<f64>,
    /// Milliseconds from start until a session through it answered status,
    /// sync and get.
    pub serving_ms: Option<f64>,
    /// Whether it served within the time bound.
    pub served: bool,
    /// Leader changes during the restart.
    pub leader_changes: u64,
}

/// One replica's resident memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplicaMemory {
    /// The replica.
    pub replica: u64,
    /// Resident memory after the fill (and the catch-up), in MB.
    pub steady_rss_mb: Option<f64>,
    /// The highest resident memory seen in each phase it ran in, in MB.
    pub peak_rss_mb_by_phase: BTreeMap<Phase, f64>,
    /// The highest of those.
    pub peak_rss_mb: f64,
}

/// One replica's data directory.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplicaDisk {
    /// The replica.
    pub replica: u64,
    /// The sum of its files' sizes, in MB.
    pub data_dir_mb: f64,
}

/// A change of the leader (or its ballot) that a majority of the replicas
/// agreed on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeaderChange {
    /// The phase it happened in.
    pub phase: Phase,
    /// Seconds since the benchmark started.
    pub at_secs: f64,
    /// The leader and ballot before, as `leader@ballot`.
    pub from: String,
    /// The leader and ballot after.
    pub to: String,
}

/// A figure checked against its target.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// What is checked.
    pub name: String,
    /// The figure.
    pub value: f64,
    /// The figure as shown, with its unit.
    pub shown: String,
    /// The target, as text.
    pub target: String,
    /// Whether the figure meets it.
    pub pass: bool,
}

/// Where and how the benchmark ran.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Setup {
    /// The data directory.
    pub data_dir: String,
    /// Whether the data directory is kept.
    pub kept: bool,
    /// The replicas' client addresses.
    pub endpoints: Vec<String>,
    /// The leader when the benchmark started.
    pub leader: u64,
    /// The replica stopped during the fill, if any.
    pub lagging_replica: Option<u64>,
    /// The per-request timeout, in milliseconds.
    pub request_timeout_ms: u64,
}

/// Everything `synod bench fill` measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FillReport {
    /// Where and how it ran.
    pub setup: Setup,
    /// Steady writes on the empty tree.
    pub baseline: SteadyResult,
    /// The fill.
    pub fill: FillResult,
    /// Steady writes on the filled tree.
    pub full_size: SteadyResult,
    /// Full-size writes per second over the baseline's.
    pub full_size_to_baseline_ratio: f64,
    /// The catch-up, when it ran.
    pub catch_up: Option<CatchUpResult>,
    /// The restart of a follower.
    pub restart: RestartResult,
    /// Each replica's memory.
    pub memory: Vec<ReplicaMemory>,
    /// Each replica's data directory, at the end.
    pub disk: Vec<ReplicaDisk>,
    /// Leader changes per phase.
    pub leader_changes: BTreeMap<Phase, u64>,
    /// Every leader change seen.
    pub leader_change_events: Vec<LeaderChange>,
    /// Seconds the whole benchmark took.
    pub total_secs: f64,
    /// The figures against their targets.
    pub checks: Vec<Check>,
    /// Whether every check passed.
    pub passed: bool,
}

/// Milliseconds in a duration, as a float.
pub fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Divides, giving 0 for a zero divisor.
pub fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator > 0.0 {
        numerator / denominator
    } else {
        0.0
    }
}

fn check(name: &str, value: f64, shown: String, target: &str, pass: bool) -> Check {
    Check {
        name: name.into(),
        value,
        shown,
        target: target.into(),
        pass,
    }
}

impl super::Report for FillReport {
    fn to_text(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_text(&mut out);
        out
    }
}

impl FillReport {
    /// Fills in `checks` and `passed` from the figures.
    pub fn evaluate(&mut self) {
        let mut checks = Vec::new();
        let fill_changes = self.leader_changes.get(&Phase::Fill).copied().unwrap_or(0);
        checks.push(check(
            "leader changes during the fill",
            fill_changes as f64,
            fill_changes.to_string(),
            "= 0",
            fill_changes == 0,
        ));
        let fill = &self.fill;
        let complete = fill.created == fill.nodes;
        checks.push(check(
            "failed creates",
            fill.failed as f64,
            format!(
                "{}{}",
                fill.failed,
                if complete { "" } else { " (fill incomplete)" }
            ),
            "= 0",
            fill.failed == 0 && complete,
        ));
        checks.push(check(
            "timed-out creates",
            fill.timed_out as f64,
            fill.timed_out.to_string(),
            "= 0",
            fill.timed_out == 0,
        ));
        checks.push(check(
            "last slice / first slice rate",
            fill.last_to_first_ratio,
            format!("{:.2}", fill.last_to_first_ratio),
            &format!(">= {SLICE_RATIO_MIN:.2}"),
            fill.last_to_first_ratio >= SLICE_RATIO_MIN,
        ));
        checks.push(check(
            "fill rate",
            fill.rate_per_sec,
            format!("{:.0} creates/s", fill.rate_per_sec),
            &format!(">= {FILL_RATE_MIN_PER_SEC:.0} creates/s"),
            fill.rate_per_sec >= FILL_RATE_MIN_PER_SEC,
        ));
        checks.push(check(
            "steady writes at full size / baseline",
            self.full_size_to_baseline_ratio,
            format!("{:.2}", self.full_size_to_baseline_ratio),
            &format!(">= {STEADY_RATIO_MIN:.2}"),
            self.full_size_to_baseline_ratio >= STEADY_RATIO_MIN,
        ));
        let p99 = self.full_size.latency.p99_ms;
        checks.push(check(
            "steady write p99 at full size",
            p99,
            format!("{p99:.1} ms"),
            &format!("< {STEADY_P99_MAX_MS:.0} ms"),
            self.full_size.ops > 0 && p99 < STEADY_P99_MAX_MS,
        ));
        for memory in &self.memory {
            let steady = memory.steady_rss_mb.unwrap_or(0.0);
            checks.push(check(
                &format!("replica {} RSS after the fill", memory.replica),
                steady,
                format!("{steady:.0} MB"),
                &format!("<= {RSS_MAX_MB:.0} MB"),
                memory.steady_rss_mb.is_some() && steady <= RSS_MAX_MB,
            ));
            let peak_ratio = ratio(memory.peak_rss_mb, steady);
            checks.push(check(
                &format!("replica {} peak / steady RSS", memory.replica),
                peak_ratio,
                format!("{peak_ratio:.2} ({:.0} MB)", memory.peak_rss_mb),
                &format!("<= {PEAK_TO_STEADY_MAX:.1}"),
                memory.steady_rss_mb.is_some() && peak_ratio <= PEAK_TO_STEADY_MAX,
            ));
        }
        let serving = self.restart.serving_ms;
        checks.push(check(
            &format!("replica {} restart to serving", self.restart.replica),
            serving.unwrap_or(0.0),
            serving.map_or_else(|| "never".into(), |ms| format!("{ms:.0} ms")),
            &format!("<= {RESTART_SERVING_MAX_MS:.0} ms"),
            serving.is_some_and(|ms| ms <= RESTART_SERVING_MAX_MS),
        ));
        if let Some(catch_up) = &self.catch_up {
            checks.push(check(
                &format!("replica {} catch-up, leader changes", catch_up.replica),
                catch_up.leader_changes as f64,
                if catch_up.caught_up {
                    catch_up.leader_changes.to_string()
                } else {
                    format!("{} (did not catch up)", catch_up.leader_changes)
                },
                "caught up, = 0",
                catch_up.caught_up && catch_up.leader_changes == 0,
            ));
        }
        self.passed = checks.iter().all(|check| check.pass);
        self.checks = checks;
    }

    fn write_text(&self, out: &mut String) -> std::fmt::Result {
        let setup = &self.setup;
        writeln!(
            out,
            "synod bench fill: 3 replicas on {} (leader {} at the start), data in {}{}",
            setup.endpoints.join(", "),
            setup.leader,
            setup.data_dir,
            if setup.kept { " (kept)" } else { " (removed)" }
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "Baseline: {} clients set their own node on an empty tree",
            self.baseline.clients
        )?;
        write_steady(out, &self.baseline)?;
        writeln!(out)?;

        let fill = &self.fill;
        writeln!(
            out,
            "Fill: {} creates of {} bytes under {} parents, {} sessions x {} in flight{}",
            fill.nodes,
            fill.data_bytes,
            fill.parents,
            fill.sessions,
            fill.in_flight,
            match setup.lagging_replica {
                Some(id) => format!(" (replica {id} stopped)"),
                None => String::new(),
            }
        )?;
        writeln!(out, "  parents created in {:.1} s", fill.parents_secs)?;
        writeln!(
            out,
            "  {:>12}  {:>14}  {:>9}  {:>22}",
            "creates done", "slice creates/s", "elapsed s", "replica CPU us/create"
        )?;
        for slice in &fill.slices {
            let cpu = slice
                .cpu_us_per_create
                .map_or_else(|| "-".to_string(), |us| format!("{us:.1}"));
            writeln!(
                out,
                "  {:>12}  {:>15.0}  {:>9.1}  {:>22}",
                slice.creates_done, slice.rate_per_sec, slice.elapsed_secs, cpu
            )?;
        }
        writeln!(
            out,
            "  overall {:.0} creates/s in {:.1} s; first slice {:.0}/s, last slice {:.0}/s (last/first {:.2})",
            fill.rate_per_sec,
            fill.secs,
            fill.first_slice_rate_per_sec,
            fill.last_slice_rate_per_sec,
            fill.last_to_first_ratio
        )?;
        writeln!(
            out,
            "  created {} of {}, failed {}{}, timed out {}{}",
            fill.created,
            fill.nodes,
            fill.failed,
            errors_text(&fill.errors),
            fill.timed_out,
            if fill.stopped_at_time_bound {
                "; stopped at the time bound"
            } else {
                ""
            }
        )?;
        writeln!(out, "  create latency {}", latency_text(&fill.latency))?;
        writeln!(out)?;

        writeln!(
            out,
            "At full size: {} clients set nodes of the filled tree",
            self.full_size.clients
        )?;
        write_steady(out, &self.full_size)?;
        writeln!(
            out,
            "  {:.2} x the baseline's rate",
            self.full_size_to_baseline_ratio
        )?;
        writeln!(out)?;

        if let Some(catch_up) = &self.catch_up {
            let ms = |value: Option<f64>| {
                value.map_or_else(|| "never".into(), |ms| format!("{ms:.0} ms"))
            };
            writeln!(
                out,
                "Catch-up: replica {} started again under steady writes",
                catch_up.replica
            )?;
            writeln!(
                out,
                "  first status after {}; applied the leader's slot {} after {}; within {} ms of the leader after {}{}",
                ms(catch_up.first_status_ms),
                catch_up.target_applied_through,
                ms(catch_up.reached_target_ms),
                catch_up.lag_bound_ms,
                ms(catch_up.caught_up_ms),
                catch_up
                    .lag_slots_at_end
                    .map(|lag| format!(" ({lag} slots behind when last seen)"))
                    .unwrap_or_default()
            )?;
            write_steady(out, &catch_up.writes)?;
            writeln!(
                out,
                "  leader changes during the catch-up: {}",
                catch_up.leader_changes
            )?;
            writeln!(out)?;
        }

        let restart = &self.restart;
        writeln!(
            out,
            "Restart: replica {} stopped in {:.0} ms; after its start, client port bound in {}, serving (status, sync, get) in {}",
            restart.replica,
            restart.stop_ms,
            restart
                .port_bound_ms
                .map_or_else(|| "never".into(), |ms| format!("{ms:.0} ms")),
            restart
                .serving_ms
                .map_or_else(|| "never".into(), |ms| format!("{ms:.0} ms")),
        )?;
        writeln!(out)?;

        writeln!(out, "Memory (resident, MB) and data directories")?;
        let mut header = format!("  {:>7}  {:>7}", "replica", "steady");
        for phase in Phase::ALL {
            let _ = write!(header, "  {:>9}", phase.name());
        }
        let _ = write!(header, "  {:>7}  {:>8}", "peak", "disk MB");
        writeln!(out, "{header}")?;
        for memory in &self.memory {
            let mut line = format!(
                "  {:>7}  {:>7}",
                memory.replica,
                memory
                    .steady_rss_mb
                    .map_or_else(|| "-".into(), |mb| format!("{mb:.0}"))
            );
            for phase in Phase::ALL {
                let cell = memory
                    .peak_rss_mb_by_phase
                    .get(&phase)
                    .map_or_else(|| "-".into(), |mb| format!("{mb:.0}"));
                let _ = write!(line, "  {cell:>9}");
            }
            let disk = self
                .disk
                .iter()
                .find(|disk| disk.replica == memory.replica)
                .map_or_else(|| "-".into(), |disk| format!("{:.1}", disk.data_dir_mb));
            let _ = write!(line, "  {:>7.0}  {disk:>8}", memory.peak_rss_mb);
            writeln!(out, "{line}")?;
        }
        writeln!(out)?;

        let changes: Vec<String> = Phase::ALL
            .iter()
            .map(|phase| {
                format!(
                    "{} {}",
                    phase.name(),
                    self.leader_changes.get(phase).copied().unwrap_or(0)
                )
            })
            .collect();
        writeln!(out, "Leader changes: {}", changes.join(", "))?;
        for change in &self.leader_change_events {
            writeln!(
                out,
                "  at {:.1} s ({}): {} -> {}",
                change.at_secs,
                change.phase.name(),
                change.from,
                change.to
            )?;
        }
        writeln!(out)?;

        writeln!(out, "Summary ({:.0} s in all)", self.total_secs)?;
        let width = self
            .checks
            .iter()
            .map(|check| check.name.len())
            .max()
            .unwrap_or(0);
        for check in &self.checks {
            writeln!(
                out,
                "  {:<width$}  {:>22}  target {:<22}  {}",
                check.name,
                check.shown,
                check.target,
                if check.pass { "PASS" } else { "FAIL" }
            )?;
        }
        let failed = self.checks.iter().filter(|check| !check.pass).count();
        if failed == 0 {
            writeln!(out, "  all {} targets met", self.checks.len())?;
        } else {
            writeln!(out, "  {failed} of {} targets missed", self.checks.len())?;
        }
        Ok(())
    }
}

fn write_steady(out: &mut String, result: &SteadyResult) -> std::fmt::Result {
    writeln!(
        out,
        "  {:.0} writes/s over {:.1} s ({} writes); latency {}; errors {}{}, timeouts {}",
        result.ops_per_sec,
        result.secs,
        result.ops,
        latency_text(&result.latency),
        result.errors.values().sum::<u64>(),
        errors_text(&result.errors),
        result.timeouts
    )
}

fn latency_text(latency: &Latency) -> String {
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        latency.p50_ms, latency.p99_ms, latency.p999_ms, latency.max_ms
    )
}

fn errors_text(errors: &BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = errors
        .iter()
        .map(|(kind, count)| format!("{kind} {count}"))
        .collect();
    format!(" ({})", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Report;

    fn passing_report() -> FillReport {
        let steady = SteadyResult {
            clients: 4,
            secs: 1.0,
            ops: 1000,
            ops_per_sec: 1000.0,
            latency: Latency {
                p99_ms: 5.0,
                ..Latency::default()
            },
            ..SteadyResult::default()
        };
        FillReport {
            baseline: steady.clone(),
            full_size: steady,
            full_size_to_baseline_ratio: 1.0,
            fill: FillResult {
                nodes: 100,
                created: 100,
                creates_done: 100,
                rate_per_sec: 30_000.0,
                last_to_first_ratio: 0.9,
                slices: vec![Slice {
                    creates_done: 100,
                    rate_per_sec: 30_000.0,
                    elapsed_secs: 0.1,
                    cpu_us_per_create: Some(60.0),
                }],
                ..FillResult::default()
            },
            memory: vec![ReplicaMemory {
                replica: 1,
                steady_rss_mb: Some(100.0),
                peak_rss_mb_by_phase: BTreeMap::from([(Phase::Fill, 110.0)]),
                peak_rss_mb: 110.0,
            }],
            restart: RestartResult {
                replica: 2,
                serving_ms: Some(500.0),
                served: true,
                ..RestartResult::default()
            },
            catch_up: Some(CatchUpResult {
                replica: 3,
                caught_up: true,
                ..CatchUpResult::default()
            }),
            ..FillReport::default()
        }
    }

    #[test]
    fn every_target_is_checked_and_a_miss_fails_only_its_check() {
        let mut report = passing_report();
        report.evaluate();
        assert!(report.passed, "{:#?}", report.checks);
        // 7 cluster-wide checks, 2 per replica, restart, catch-up.
        assert_eq!(report.checks.len(), 7 + 2 + 1 + 1);

        report.fill.timed_out = 1;
        report.restart.serving_ms = Some(2_500.0);
        report.memory[0].peak_rss_mb = 130.0;
        report.leader_changes.insert(Phase::Fill, 1);
        report.evaluate();
        let failed: Vec<&str> = report
            .checks
            .iter()
            .filter(|check| !check.pass)
            .map(|check| check.name.as_str())
            .collect();
        assert_eq!(
            failed,
            [
                "leader changes during the fill",
                "timed-out creates",
                "replica 1 peak / steady RSS",
                "replica 2 restart to serving"
            ]
        );
        assert!(!report.passed);
    }

    #[test]
    fn an_incomplete_fill_or_a_missing_figure_fails() {
        let mut report = passing_report();
        report.fill.created = 99;
        report.memory[0].steady_rss_mb = None;
        report.restart.serving_ms = None;
        report.evaluate();
        let failed = report.checks.iter().filter(|check| !check.pass).count();
        assert_eq!(failed, 4);
    }

    #[test]
    fn the_text_names_every_figure_and_the_json_has_the_same() {
        let mut report = passing_report();
        report.evaluate();
        let text = report.to_text();
        for needle in [
            "Baseline:",
            "slice creates/s",
            "At full size:",
            "Catch-up: replica 3",
            "Restart: replica 2",
            "Summary",
            "PASS",
            "all 11 targets met",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        let json = serde_json::to_value(&report).expect("serialises");
        assert_eq!(json["fill"]["created"], 100);
        assert_eq!(json["memory"][0]["peak_rss_mb_by_phase"]["fill"], 110.0);
        assert_eq!(json["checks"].as_array().map(Vec::len), Some(11));
    }

    #[test]
    fn latency_percentiles_are_in_milliseconds() {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
        for micros in 1..=1000u64 {
            histogram.record(micros * 10).expect("in range");
        }
        let latency = Latency::of(&histogram);
        assert!((latency.p50_ms - 5.0).abs() < 0.05, "{latency:?}");
        assert!((latency.max_ms - 10.0).abs() < 0.05, "{latency:?}");
        assert_eq!(
            Latency::of(&Histogram::new(3).expect("new")),
            Latency::default()
        );
    }
}
