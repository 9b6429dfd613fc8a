//! The checkers that judge a recorded [`History`]: each looks at the part of
//! the history it understands and returns a [`Verdict`] listing every rule
//! it found broken.
//!
//! - [`linearizable`]: the register operations, per key, against a
//!   sequential model of a versioned register.
//! - [`locks`]: lock tokens increase, no two clients believe they hold a
//!   lock at once, and the fenced resource never goes back to an older
//!   token.
//! - [`sequential`]: sequential names are children of their parent, unique,
//!   and their counters increase in real time.
//! - [`watches`]: every watch stream is in revision order and misses no
//!   acknowledged write below the watched path.
//!
//! The checkers never panic on odd input (a history is read from a file):
//! a record that makes no sense is reported as a problem, so it fails the
//! verdict rather than the process.

pub mod linearizable;
pub mod locks;
pub mod sequential;
pub mod watches;

use std::fmt;
use std::time::Duration;

use crate::history::{Call, History, Operation, Outcome, Record};

/// How many problems a [`Verdict`] prints before summarising the rest.
const PROBLEMS_PRINTED_MAX: usize = 20;

/// One checker's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The checker's name.
    pub checker: &'static str,
    /// Whether every rule held.
    pub passed: bool,
    /// How many items (operations, events) it judged.
    pub checked: usize,
    /// What was wrong, one entry per broken rule (empty when passed).
    pub problems: Vec<String>,
}

impl Verdict {
    /// A verdict that passed iff there are no problems.
    pub(crate) fn from_problems(
        checker: &'static str,
        checked: usize,
        problems: Vec<String>,
    ) -> Verdict {
        Verdict {
            checker,
            passed: problems.is_empty(),
            checked,
            problems,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.passed {
            return write!(f, "{}: ok ({} checked)", self.checker, self.checked);
        }
        write!(
            f,
            "{}: FAILED ({} checked, {} problems)",
            self.checker,
            self.checked,
            self.problems.len()
        )?;
        for problem in self.problems.iter().take(PROBLEMS_PRINTED_MAX) {
            let mut lines = problem.lines();
            write!(f, "\n    - {}", lines.next().unwrap_or_default())?;
            for line in lines {
                write!(f, "\n      {line}")?;
            }
        }
        let rest = self.problems.len().saturating_sub(PROBLEMS_PRINTED_MAX);
        if rest > 0 {
            write!(f, "\n    ... and {rest} more")?;
        }
        Ok(())
    }
}

/// Runs every checker; `budget` bounds the linearizability search per key.
pub fn check_all(history: &History, budget: Duration) -> Vec<Verdict> {
    vec![
        linearizable::check(history, budget),
        locks::check(history),
        sequential::check(history),
        watches::check(history),
    ]
}

/// A time on the run's clock, in seconds to the nanosecond.
pub(crate) fn format_ns(ns: u64) -> String {
    format!("{}.{:09}s", ns / 1_000_000_000, ns % 1_000_000_000)
}

/// One operation, readably: id, client, interval, call and outcome.
pub(crate) fn describe_operation(operation: &Operation) -> String {
    let completed = operation
        .completed_ns
        .map_or_else(|| "?".to_string(), format_ns);
    format!(
        "op {} (client {}, {} -> {}): {} => {}",
        operation.id,
        operation.client,
        format_ns(operation.invoked_ns),
        completed,
        describe_call(&operation.call),
        describe_outcome(&operation.outcome)
    )
}

/// What a call asked, readably.
pub(crate) fn describe_call(call: &Call) -> String {
    match call {
        Call::Create { key, value } => format!("create {key} = {value:?}"),
        Call::Read { key } => format!("read {key}"),
        Call::Write { key, value } => format!("write {key} = {value:?}"),
        Call::CompareAndSet {
            key,
            expected_version,
            value,
        } => format!("compare-and-set {key} if version {expected_version} to {value:?}"),
        Call::CreateSequential { parent } => format!("create sequential under {parent}"),
        Call::Acquire { lock } => format!("acquire {lock}"),
        Call::Release { lock, token } => format!("release {lock} token {token}"),
        Call::FencedWrite {
            lock,
            resource,
            token,
            value,
        } => format!("fenced write {resource} = {value:?} under {lock} token {token}"),
    }
}

/// What an outcome said, readably.
pub(crate) fn describe_outcome(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Read { value: None } => "no node".to_string(),
        Outcome::Read {
            value: Some((value, version)),
        } => format!("{value:?} version {version}"),
        Outcome::Written { version, revision } => {
            format!("written, version {version}, revision {revision}")
        }
        Outcome::VersionMismatch => "version mismatch".to_string(),
        Outcome::Created { path } => format!("created {path}"),
        Outcome::Granted { token } => format!("granted token {token}"),
        Outcome::Released => "released".to_string(),
        Outcome::FenceAccepted => "fence accepted".to_string(),
        Outcome::FenceRejected => "fence rejected".to_string(),
        Outcome::Failed { error } => format!("failed: {error}"),
        Outcome::Indeterminate { error } => format!("indeterminate: {error}"),
    }
}

/// The latest time anything in the history happened (0 for an empty one).
pub(crate) fn end_of_history(history: &History) -> u64 {
    history
        .records
        .iter()
        .map(|record| match record {
            Record::Operation(operation) => operation
                .completed_ns
                .unwrap_or(0)
                .max(operation.invoked_ns),
            Record::LockLost { at_ns, .. }
            | Record::WatchStarted { at_ns, .. }
            | Record::WatchEvent { at_ns, .. }
            | Record::WatchEnded { at_ns, .. }
            | Record::Fault { at_ns, .. } => *at_ns,
        })
        .max()
        .unwrap_or(0)
}

/// Whether `path` is `ancestor` or lies below it.
pub(crate) fn is_at_or_below(path: &str, ancestor: &str) -> bool {
    if ancestor == "/" {
        return path.starts_with('/');
    }
    match path.strip_prefix(ancestor) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Something that happened over a real-time interval and carries a number
/// that must grow with real time (a token, a sequence number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ordered {
    /// When it was invoked.
    pub invoked_ns: u64,
    /// When it completed.
    pub completed_ns: u64,
    /// The number that must grow.
    pub value: u64,
}

/// The pairs `(a, b)` of indexes into `items` where `a` completed before `b`
/// was invoked yet `value(a) > value(b)` (or `>=` when `strict`): for each
/// such `b`, the `a` with the greatest value among those that completed
/// before it, so each later item is reported at most once.
pub(crate) fn real_time_inversions(items: &[Ordered], strict: bool) -> Vec<(usize, usize)> {
    let mut by_completion: Vec<usize> = (0..items.len()).collect();
    by_completion.sort_by_key(|&index| (items[index].completed_ns, index));
    let mut by_invocation: Vec<usize> = (0..items.len()).collect();
    by_invocation.sort_by_key(|&index| (items[index].invoked_ns, index));
    let mut inversions = Vec::new();
    let mut completed = by_completion.iter().peekable();
    let mut greatest: Option<usize> = None;
    for &later in &by_invocation {
        while let Some(&&earlier) = completed.peek() {
            if items[earlier].completed_ns >= items[later].invoked_ns {
                break;
            }
            if greatest.is_none_or(|best| items[earlier].value > items[best].value) {
                greatest = Some(earlier);
            }
            completed.next();
        }
        if let Some(earlier) = greatest {
            let (before, after) = (items[earlier].value, items[later].value);
            if earlier != later && (before > after || (strict && before == after)) {
                inversions.push((earlier, later));
            }
        }
    }
    inversions
}

#[cfg(test)]
pub(crate) mod testing {
    //! Builders for hand-made histories.

    use crate::history::{Call, ClientId, Operation, Outcome, Record};

    /// An operation record.
    pub fn op(
        id: u64,
        client: ClientId,
        invoked_ns: u64,
        completed_ns: Option<u64>,
        call: Call,
        outcome: Outcome,
    ) -> Record {
        Record::Operation(Operation {
            id,
            client,
            invoked_ns,
            completed_ns,
            call,
            outcome,
        })
    }

    /// An indeterminate outcome.
    pub fn unknown() -> Outcome {
        Outcome::Indeterminate {
            error: "timeout".to_string(),
        }
    }

    /// A failed outcome.
    pub fn failed() -> Outcome {
        Outcome::Failed {
            error: "refused".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ordered(invoked_ns: u64, completed_ns: u64, value: u64) -> Ordered {
        Ordered {
            invoked_ns,
            completed_ns,
            value,
        }
    }

    #[test]
    fn inversions_need_real_time_order() {
        // 0 completes before 1 starts with a greater value: inversion.
        // 2 overlaps 0 and may carry any value.
        let items = [ordered(0, 10, 5), ordered(20, 30, 4), ordered(5, 25, 1)];
        assert_eq!(real_time_inversions(&items, false), vec![(0, 1)]);
        let equal = [ordered(0, 10, 5), ordered(20, 30, 5)];
        assert!(real_time_inversions(&equal, false).is_empty());
        assert_eq!(real_time_inversions(&equal, true), vec![(0, 1)]);
    }

    #[test]
    fn paths_at_or_below() {
        assert!(is_at_or_below("/a", "/a"));
        assert!(is_at_or_below("/a/b", "/a"));
        assert!(!is_at_or_below("/ab", "/a"));
        assert!(is_at_or_below("/ab", "/"));
    }

    #[test]
    fn display_prints_a_bounded_number_of_problems() {
        let ok = Verdict::from_problems("demo", 3, Vec::new());
        assert_eq!(ok.to_string(), "demo: ok (3 checked)");
        let problems = (0..25).map(|n| format!("problem {n}\ndetail")).collect();
        let failed = Verdict::from_problems("demo", 7, problems).to_string();
        assert!(failed.starts_with("demo: FAILED (7 checked, 25 problems)"));
        assert!(failed.contains("    - problem 19\n      detail"));
        assert!(!failed.contains("problem 20"));
        assert!(failed.ends_with("... and 5 more"));
    }

    #[test]
    fn check_all_runs_every_checker() {
        let verdicts = check_all(&History::default(), Duration::from_secs(1));
        let names: Vec<&str> = verdicts.iter().map(|verdict| verdict.checker).collect();
        assert_eq!(names, ["linearizable", "locks", "sequential", "watches"]);
        assert!(verdicts.iter().all(|verdict| verdict.passed));
    }

    #[test]
    fn formats_times() {
        assert_eq!(format_ns(1_234_567_890), "1.234567890s");
        assert_eq!(format_ns(5), "0.000000005s");
    }
}
