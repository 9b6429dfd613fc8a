//! `synod bench suite`: the standard rows (one writer's latency; writes,
//! linearizable and sequential reads at 16, 64 and 256 clients; lock
//! hand-offs at 16 and 64 contenders; the leader killed and paused under
//! writes), each measured `--repeat` times on fresh clusters, printed as a
//! markdown table of medians with every run's figure beside them.
//!
//! Each repetition starts one cluster for the load rows, measured in turn
//! with sessions of their own, and one more for each failover (a failover
//! leaves a cluster with a replica killed or just resumed). Rows for more
//! clients than `--clients-max` are left out.

use std::fmt::Write as _;

use anyhow::Context;
use serde::Serialize;

use super::failover::Fault;
use super::measure::{self, ReadMode, Spec};
use super::own_cluster;
use super::workload::{LoadFigures, OpKind};
use super::{FailoverArgs, LoadArgs, Report, SuiteArgs};
use tokio::runtime::Runtime;

/// Writers in each failover row.
const FAILOVER_WRITERS: u64 = 16;

/// The longest a failover row waits for every writer, in seconds.
const FAILOVER_RECOVERY_SECS_MAX: u64 = 30;

/// The writers' session timeout in the failover rows (the client's default).
const FAILOVER_SESSION_TIMEOUT_MS: u64 = 10_000;

/// The per-request timeout of every row.
const REQUEST_TIMEOUT_MS: u64 = 10_000;

/// Bytes per value in every row.
const VALUE_BYTES: u64 = 100;

/// Nodes the read and write rows pick from.
const KEYS: u64 = 1_000;

/// What a row measures.
#[derive(Debug, Clone, Copy)]
enum Measure {
    /// The median latency of a load, in milliseconds.
    P50 { spec: Spec, clients: u64 },
    /// The successful operations per second of a load.
    Rate { spec: Spec, clients: u64 },
    /// The seconds to the first write and to every writer after a fault.
    Failover { fault: Fault },
}

/// A row of the suite.
struct Row {
    label: &'static str,
    measure: Measure,
    target: &'static str,
}

const SET: Spec = Spec::Write { create: false };
const LINEARIZABLE: Spec = Spec::Read {
    consistency: ReadMode::Linearizable,
};
const SEQUENTIAL: Spec = Spec::Read {
    consistency: ReadMode::Sequential,
};
const ONE_LOCK: Spec = Spec::Lock { locks: 1 };

/// The rows, in the order they run. The write targets are 1.5 times the
/// better of ZooKeeper 3.8 and etcd 3.4 measured on this machine class
/// (see the README's performance section).
const ROWS: &[Row] = &[
    Row {
        label: "one writer, p50 (via leader)",
        measure: Measure::P50 {
            spec: SET,
            clients: 1,
        },
        target: "at most 0.5 ms",
    },
    Row {
        label: "writes/s, 16 clients",
        measure: Measure::Rate {
            spec: SET,
            clients: 16,
        },
        target: "at least 9,504",
    },
    Row {
        label: "writes/s, 64 clients",
        measure: Measure::Rate {
            spec: SET,
            clients: 64,
        },
        target: "at least 16,925",
    },
    Row {
        label: "writes/s, 256 clients",
        measure: Measure::Rate {
            spec: SET,
            clients: 256,
        },
        target: "at least 26,271",
    },
    Row {
        label: "linearizable reads/s, 16 clients",
        measure: Measure::Rate {
            spec: LINEARIZABLE,
            clients: 16,
        },
        target: "",
    },
    Row {
        label: "linearizable reads/s, 64 clients",
        measure: Measure::Rate {
            spec: LINEARIZABLE,
            clients: 64,
        },
        target: "",
    },
    Row {
        label: "linearizable reads/s, 256 clients",
        measure: Measure::Rate {
            spec: LINEARIZABLE,
            clients: 256,
        },
        target: "at least 50,000, no drop from 64",
    },
    Row {
        label: "sequential reads/s, 16 clients",
        measure: Measure::Rate {
            spec: SEQUENTIAL,
            clients: 16,
        },
        target: "",
    },
    Row {
        label: "sequential reads/s, 64 clients",
        measure: Measure::Rate {
            spec: SEQUENTIAL,
            clients: 64,
        },
        target: "",
    },
    Row {
        label: "sequential reads/s, 256 clients",
        measure: Measure::Rate {
            spec: SEQUENTIAL,
            clients: 256,
        },
        target: "no drop from 64",
    },
    Row {
        label: "lock hand-offs/s, 16 contenders",
        measure: Measure::Rate {
            spec: ONE_LOCK,
            clients: 16,
        },
        target: "at least 1,750",
    },
    Row {
        label: "lock hand-offs/s, 64 contenders",
        measure: Measure::Rate {
            spec: ONE_LOCK,
            clients: 64,
        },
        target: "at least 1,750",
    },
    Row {
        label: "kill -9 of the leader: first write ok / every writer ok",
        measure: Measure::Failover { fault: Fault::Kill },
        target: "0.5 s / 1 s",
    },
    Row {
        label: "SIGSTOP of the leader: first write ok / every writer ok",
        measure: Measure::Failover { fault: Fault::Stop },
        target: "0.5 s / 1 s",
    },
];

impl Measure {
    fn clients(self) -> u64 {
        match self {
            Measure::P50 { clients, .. } | Measure::Rate { clients, .. } => clients,
            Measure::Failover { .. } => FAILOVER_WRITERS,
        }
    }

    fn unit(self) -> Unit {
        match self {
            Measure::P50 { .. } => Unit::Ms,
            Measure::Rate { .. } => Unit::OpsPerSec,
            Measure::Failover { .. } => Unit::Secs,
        }
    }
}

/// One run of a row.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunFigure {
    /// The row's figure: milliseconds for a p50, operations per second for
    /// a rate, seconds to the first write for a failover (none when it
    /// never came).
    pub value: Option<f64>,
    /// For a failover, seconds until every writer had succeeded again.
    pub every_writer_secs: Option<f64>,
    /// The p99 latency of the row's operations, in milliseconds.
    pub p99_ms: Option<f64>,
    /// Operations that failed or timed out.
    pub failed: u64,
}

/// A row's runs and medians.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SuiteRow {
    /// What it measures.
    pub label: String,
    /// Its target.
    pub target: String,
    /// What its figures count.
    pub unit: Unit,
    /// Each run.
    pub runs: Vec<RunFigure>,
    /// The median of the runs' figures.
    pub median: Option<f64>,
    /// For a failover, the median of the runs' every-writer seconds.
    pub median_every_writer_secs: Option<f64>,
    /// The median of the runs' p99 latencies.
    pub median_p99_ms: Option<f64>,
}

/// What `synod bench suite` measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SuiteReport {
    /// Fresh clusters per row.
    pub repeat: u64,
    /// Seconds each load row was measured.
    pub duration_secs: u64,
    /// Seconds of warm-up before each.
    pub warmup_secs: u64,
    /// Cores this machine has.
    pub cores: usize,
    /// The rows.
    pub rows: Vec<SuiteRow>,
}

/// The median of the values present (the mean of the middle two for an
/// even count); none when none is.
pub fn median(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let mut present: Vec<f64> = values.into_iter().flatten().collect();
    if present.is_empty() {
        return None;
    }
    present.sort_by(f64::total_cmp);
    let middle = present.len() / 2;
    Some(if present.len() % 2 == 1 {
        present[middle]
    } else {
        (present[middle - 1] + present[middle]) / 2.0
    })
}

/// The figures of the row's kind of operation.
fn of_kind(figures: &LoadFigures, spec: Spec) -> RunFigure {
    let kind = match spec {
        Spec::Write { create: false } => OpKind::Write,
        Spec::Write { create: true } => OpKind::Create,
        Spec::Read { .. } | Spec::Mixed { .. } => OpKind::Read,
        Spec::Lock { .. } => OpKind::Lock,
        Spec::Election { .. } => OpKind::Election,
    };
    let op = figures.by_kind.get(&kind);
    RunFigure {
        value: op.map(|op| op.ops_per_sec),
        every_writer_secs: None,
        p99_ms: op.map(|op| op.latency.p99_ms),
        failed: figures.failed,
    }
}

/// Runs the suite.
///
/// # Errors
/// A cluster or a row's setup failed, or it was interrupted.
pub fn run(runtime: &Runtime, args: &SuiteArgs) -> anyhow::Result<SuiteReport> {
    let rows: Vec<&Row> = ROWS
        .iter()
        .filter(|row| row.measure.clients() <= args.clients_max)
        .collect();
    let mut report = SuiteReport {
        repeat: args.repeat,
        duration_secs: args.duration_secs,
        warmup_secs: args.warmup_secs,
        cores: std::thread::available_parallelism().map_or(0, usize::from),
        rows: rows
            .iter()
            .map(|row| SuiteRow {
                label: row.label.to_string(),
                target: row.target.to_string(),
                unit: row.measure.unit(),
                ..SuiteRow::default()
            })
            .collect(),
    };
    let clients_max = rows
        .iter()
        .map(|row| row.measure.clients())
        .max()
        .unwrap_or(1);
    let names = own_cluster::client_names(usize::try_from(clients_max).context("clients")?);
    for repetition in 1..=args.repeat {
        eprintln!("bench: suite: repetition {repetition} of {}", args.repeat);
        let loads: Vec<(usize, RunFigure)> = own_cluster::on_fresh_cluster(
            runtime,
            &args.cluster,
            Some(&format!("run-{repetition}")),
            async |cluster, _kept| {
                let leader = own_cluster::start(cluster, args.cluster.server.as_deref(), &names)
                    .await?
                    .leader;
                let mut figures = Vec::new();
                for (index, row) in rows.iter().enumerate() {
                    let (spec, clients, p50) = match row.measure {
                        Measure::P50 { spec, clients } => (spec, clients, true),
                        Measure::Rate { spec, clients } => (spec, clients, false),
                        Measure::Failover { .. } => continue,
                    };
                    let load = load_args(args, clients);
                    let measured = measure::measure_on(cluster, leader, spec, &load).await?;
                    let mut figure = of_kind(&measured.figures, spec);
                    if p50 {
                        figure.value = measured
                            .figures
                            .by_kind
                            .values()
                            .next()
                            .map(|op| op.latency.p50_ms);
                    }
                    figures.push((index, figure));
                }
                Ok(figures)
            },
        )?;
        for (index, figure) in loads {
            report.rows[index].runs.push(figure);
        }
        for (index, row) in rows.iter().enumerate() {
            let Measure::Failover { fault } = row.measure else {
                continue;
            };
            let failover_args = FailoverArgs {
                fault,
                clients: FAILOVER_WRITERS,
                warmup_secs: args.warmup_secs,
                recovery_secs_max: FAILOVER_RECOVERY_SECS_MAX,
                value_bytes: VALUE_BYTES,
                session_timeout_ms: FAILOVER_SESSION_TIMEOUT_MS,
                request_timeout_ms: REQUEST_TIMEOUT_MS,
                cluster: args.cluster.clone(),
            };
            let failover = own_cluster::on_fresh_cluster(
                runtime,
                &args.cluster,
                Some(&format!("run-{repetition}-{}", fault.name())),
                async |cluster, _kept| {
                    let leader =
                        own_cluster::start(cluster, args.cluster.server.as_deref(), &names)
                            .await?
                            .leader;
                    measure::failover_on(cluster, leader, &failover_args).await
                },
            )?;
            let figures = &failover.figures;
            report.rows[index].runs.push(RunFigure {
                value: figures.first_write_ok_ms.map(|ms| ms / 1000.0),
                every_writer_secs: figures.every_writer_ok_ms.map(|ms| ms / 1000.0),
                p99_ms: Some(figures.latency_after.p99_ms),
                failed: figures.errors_after.values().sum::<u64>() + figures.timeouts_after,
            });
        }
    }
    for row in &mut report.rows {
        row.median = median(row.runs.iter().map(|run| run.value));
        row.median_every_writer_secs = median(row.runs.iter().map(|run| run.every_writer_secs));
        row.median_p99_ms = median(row.runs.iter().map(|run| run.p99_ms));
    }
    Ok(report)
}

/// The load of a row with `clients` clients.
fn load_args(args: &SuiteArgs, clients: u64) -> LoadArgs {
    LoadArgs {
        clients,
        in_flight: 1,
        duration_secs: args.duration_secs,
        ops: None,
        warmup_secs: args.warmup_secs,
        value_bytes: VALUE_BYTES,
        keys: KEYS,
        connect: None,
        request_timeout_ms: REQUEST_TIMEOUT_MS,
        seed: 1,
    }
}

/// A figure as the table shows it: seconds and milliseconds with two
/// decimals, rates whole with thousands separated.
fn shown(value: Option<f64>, unit: Unit) -> String {
    let Some(value) = value else {
        return "none".to_string();
    };
    match unit {
        Unit::Ms => format!("{value:.2} ms"),
        Unit::Secs => format!("{value:.2} s"),
        Unit::OpsPerSec => thousands(value.round() as u64),
    }
}

/// What a row's figures count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Milliseconds of latency.
    Ms,
    /// Seconds to recover.
    Secs,
    /// Operations per second.
    #[default]
    OpsPerSec,
}

/// `12345` as `12,345`.
fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

impl Report for SuiteReport {
    fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "synod bench suite: 3 replicas on loopback, data on disk, default settings; {} fresh \
             cluster(s) per row, {} s measured after {} s of warm-up; {} cores",
            self.repeat, self.duration_secs, self.warmup_secs, self.cores
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "| workload | median | p99 (median) | runs | target |");
        let _ = writeln!(out, "|---|---|---|---|---|");
        for row in &self.rows {
            let unit = row.unit;
            let failover = unit == Unit::Secs;
            let median = if failover {
                format!(
                    "{} / {}",
                    shown(row.median, unit),
                    shown(row.median_every_writer_secs, unit)
                )
            } else {
                shown(row.median, unit)
            };
            let runs: Vec<String> = row
                .runs
                .iter()
                .map(|run| {
                    let figure = if failover {
                        format!(
                            "{} / {}",
                            shown(run.value, unit),
                            shown(run.every_writer_secs, unit)
                        )
                    } else {
                        shown(run.value, unit)
                    };
                    if run.failed > 0 {
                        format!("{figure} ({} failed)", run.failed)
                    } else {
                        figure
                    }
                })
                .collect();
            let _ = writeln!(
                out,
                "| {} | {median} | {} | {} | {} |",
                row.label,
                shown(row.median_p99_ms, Unit::Ms),
                runs.join("; "),
                row.target
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_take_the_middle_and_skip_missing_runs() {
        assert_eq!(median([Some(3.0), Some(1.0), Some(2.0)]), Some(2.0));
        assert_eq!(
            median([Some(4.0), None, Some(1.0), Some(2.0), Some(3.0)]),
            Some(2.5)
        );
        assert_eq!(median([None, None]), None);
        assert_eq!(median([Some(5.0)]), Some(5.0));
    }

    #[test]
    fn rates_are_shown_with_thousands_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(26_271), "26,271");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(shown(Some(0.456), Unit::Ms), "0.46 ms");
        assert_eq!(shown(None, Unit::Secs), "none");
    }

    #[test]
    fn the_table_has_a_row_per_measurement_with_its_runs() {
        let report = SuiteReport {
            repeat: 2,
            duration_secs: 1,
            warmup_secs: 0,
            cores: 2,
            rows: vec![
                SuiteRow {
                    label: "writes/s, 16 clients".into(),
                    target: "at least 9,504".into(),
                    unit: Unit::OpsPerSec,
                    runs: vec![
                        RunFigure {
                            value: Some(7_000.4),
                            p99_ms: Some(3.0),
                            ..RunFigure::default()
                        },
                        RunFigure {
                            value: Some(8_000.0),
                            p99_ms: Some(5.0),
                            failed: 2,
                            ..RunFigure::default()
                        },
                    ],
                    median: Some(7_500.2),
                    median_p99_ms: Some(4.0),
                    ..SuiteRow::default()
                },
                SuiteRow {
                    label: "kill -9 of the leader: first write ok / every writer ok".into(),
                    target: "0.5 s / 1 s".into(),
                    unit: Unit::Secs,
                    runs: vec![RunFigure {
                        value: Some(1.2),
                        every_writer_secs: None,
                        ..RunFigure::default()
                    }],
                    median: Some(1.2),
                    ..SuiteRow::default()
                },
            ],
        };
        let text = report.to_text();
        assert!(
            text.contains(
                "| writes/s, 16 clients | 7,500 | 4.00 ms | 7,000; 8,000 (2 failed) | at least 9,504 |"
            ),
            "{text}"
        );
        assert!(text.contains("| 1.20 s / none |"), "{text}");
    }
}
