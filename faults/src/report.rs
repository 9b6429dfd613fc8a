//! The run's report: what was done (operations by outcome, faults by
//! kind), the verdicts, and the availability figures: how long writes
//! stalled after each kind of fault.
//!
//! A fault's stall is the longest stretch without a successful write
//! (a register write, a compare-and-set, a sequential create, an accepted
//! fenced write) completing anywhere, from the fault's injection until
//! five seconds after its heal (or the next fault, if sooner).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::check::Verdict;
use crate::history::{Call, History, Outcome, Record};
use crate::run::RunOptions;

/// How long after a heal the stall is still counted.
const AFTER_HEAL_NS: u64 = 5_000_000_000;

/// The stall after one fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    /// The fault's kind.
    pub kind: String,
    /// What was done.
    pub description: String,
    /// The longest stretch without a successful write, in ms.
    pub stall_ms: u64,
}

/// The stall after every fault of the history.
pub fn stalls(history: &History) -> Vec<Stall> {
    let mut writes: Vec<u64> = history
        .operations()
        .filter(|operation| {
            matches!(
                operation.outcome,
                Outcome::Written { .. } | Outcome::Created { .. } | Outcome::FenceAccepted
            ) && !matches!(operation.call, Call::Read { .. })
        })
        .filter_map(|operation| operation.completed_ns)
        .collect();
    writes.sort_unstable();
    let faults: Vec<(u64, &str, &str)> = history
        .records
        .iter()
        .filter_map(|record| match record {
            Record::Fault {
                description,
                kind,
                at_ns,
            } => Some((*at_ns, kind.as_str(), description.as_str())),
            _ => None,
        })
        .collect();
    let mut stalls = Vec::new();
    for (index, &(start, kind, description)) in faults.iter().enumerate() {
        if description.starts_with("heal") || kind == "crash" || kind == "heal" {
            continue;
        }
        let heal = faults[index + 1..]
            .iter()
            .find(|(_, other, text)| *other == kind && text.starts_with("heal"))
            .map_or(start, |(at, _, _)| *at);
        let next_fault = faults[index + 1..]
            .iter()
            .find(|(at, _, text)| *at > heal && !text.starts_with("heal"))
            .map_or(u64::MAX, |(at, _, _)| *at);
        let end = (heal + AFTER_HEAL_NS).min(next_fault);
        let mut longest = 0;
        let mut previous = start;
        for &at in writes.iter().filter(|&&at| at > start && at <= end) {
            longest = longest.max(at - previous);
            previous = at;
        }
        if previous < end && end != u64::MAX {
            longest = longest.max(end.min(history_end(history)) - previous);
        }
        stalls.push(Stall {
            kind: kind.to_string(),
            description: description.to_string(),
            stall_ms: longest / 1_000_000,
        });
    }
    stalls
}

fn history_end(history: &History) -> u64 {
    history
        .operations()
        .filter_map(|operation| operation.completed_ns)
        .max()
        .unwrap_or(0)
}

fn median(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

/// The report, as printed at the end of a run and saved as `report.txt`.
pub fn render(
    options: &RunOptions,
    history: &History,
    verdicts: &[Verdict],
    fault_counts: &BTreeMap<&'static str, u32>,
    expiry_ms: &[u64],
    caught_up: Option<Duration>,
    sessions_by_replica: &BTreeMap<u64, usize>,
) -> String {
    let mut out = String::new();
    let faults: Vec<&str> = options.faults.iter().map(|kind| kind.name()).collect();
    let _ = writeln!(
        out,
        "seed {} · {} replicas · {} s of faults · reads {:?} · {}",
        options.seed,
        options.replicas,
        options.duration.as_secs(),
        options.consistency,
        options.dir.display()
    );
    let _ = writeln!(
        out,
        "re-run: synod-faults run --seed {} --secs {} --replicas {} --faults {}",
        options.seed,
        options.duration.as_secs(),
        options.replicas,
        faults.join(",")
    );
    let _ = writeln!(
        out,
        "re-check: synod-faults check {}",
        options.dir.display()
    );
    let mut by_call: BTreeMap<&str, [u64; 3]> = BTreeMap::new();
    for operation in history.operations() {
        let name = match operation.call {
            Call::Create { .. } => "create",
            Call::Read { .. } => "read",
            Call::Write { .. } => "write",
            Call::CompareAndSet { .. } => "compare-and-set",
            Call::CreateSequential { .. } => "create-sequential",
            Call::Acquire { .. } => "acquire",
            Call::Release { .. } => "release",
            Call::FencedWrite { .. } => "fenced-write",
        };
        let slot = match operation.outcome {
            Outcome::Failed { .. } => 1,
            Outcome::Indeterminate { .. } => 2,
            _ => 0,
        };
        by_call.entry(name).or_default()[slot] += 1;
    }
    let total: [u64; 3] = by_call.values().fold([0; 3], |sum, counts| {
        [sum[0] + counts[0], sum[1] + counts[1], sum[2] + counts[2]]
    });
    let _ = writeln!(
        out,
        "operations: {} ok, {} failed, {} indeterminate",
        total[0], total[1], total[2]
    );
    for (name, [ok, failed, unknown]) in &by_call {
        let _ = writeln!(
            out,
            "  {name:<18} {ok:>7} ok {failed:>6} failed {unknown:>6} indeterminate"
        );
    }
    let watch_events = history
        .records
        .iter()
        .filter(|record| matches!(record, Record::WatchEvent { .. }))
        .count();
    let _ = writeln!(out, "  watch events       {watch_events:>7}");
    let injected: u32 = fault_counts.values().sum();
    let _ = writeln!(out, "faults: {injected}");
    let mut stalls_by_kind: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for stall in stalls(history) {
        stalls_by_kind
            .entry(stall.kind)
            .or_default()
            .push(stall.stall_ms);
    }
    for (kind, count) in fault_counts {
        let mut figures = stalls_by_kind.get(*kind).cloned().unwrap_or_default();
        let max = figures.iter().max().copied().unwrap_or(0);
        let median = median(&mut figures);
        let _ = writeln!(
            out,
            "  {kind:<22} {count:>3} × · writes stalled: median {median} ms, max {max} ms"
        );
    }
    if !expiry_ms.is_empty() {
        let mut figures = expiry_ms.to_vec();
        let median = median(&mut figures);
        let max = figures.iter().max().copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "dead clients' sessions expired after {median} ms (median), {max} ms (max); timeout {} ms",
            crate::run::SESSION_TIMEOUT_MS
        );
    }
    if !sessions_by_replica.is_empty() {
        let spread: Vec<String> = sessions_by_replica
            .iter()
            .map(|(replica, count)| format!("{replica}: {count}"))
            .collect();
        let _ = writeln!(
            out,
            "workers' sessions by replica once the faults healed: {}",
            spread.join(", ")
        );
    }
    if let Some(caught_up) = caught_up {
        let _ = writeln!(
            out,
            "every replica caught up {} ms after the final restart's leader",
            caught_up.as_millis()
        );
    }
    let failed = verdicts.iter().filter(|verdict| !verdict.passed).count();
    let _ = writeln!(
        out,
        "verdicts: {}",
        if failed == 0 {
            "every checker passed".to_string()
        } else {
            format!("{failed} FAILED")
        }
    );
    for verdict in verdicts {
        let _ = writeln!(out, "  {verdict}");
    }
    out
}
