//! Sequential creates: every name a `CreateSequential` under a parent was
//! answered with must be a child of that parent, unique among the parent's
//! sequential children, and carry a counter (the last run of ASCII digits
//! of its last segment: `/q/item-0000000012` has 12) that grows in real
//! time: if create A completed before create B was invoked, A's counter is
//! smaller than B's.

use std::collections::{BTreeMap, HashMap};

use super::{describe_operation, real_time_inversions, Ordered, Verdict};
use crate::history::{Call, History, Operation, Outcome};

/// This checker's name in its verdict.
pub const CHECKER: &str = "sequential";

/// Checks the sequential creates. `checked` counts the created nodes.
pub fn check(history: &History) -> Verdict {
    let mut problems = Vec::new();
    let mut by_parent: BTreeMap<&str, Vec<Created<'_>>> = BTreeMap::new();
    for operation in history.operations() {
        let Call::CreateSequential { parent } = &operation.call else {
            continue;
        };
        match &operation.outcome {
            Outcome::Created { path } => {
                let Some(completed_ns) = operation.completed_ns else {
                    problems.push(format!(
                        "a create without a completion time: {}",
                        describe_operation(operation)
                    ));
                    continue;
                };
                by_parent.entry(parent).or_default().push(Created {
                    operation,
                    path,
                    completed_ns,
                });
            }
            Outcome::Failed { .. } | Outcome::Indeterminate { .. } => {}
            _ => problems.push(format!(
                "an answer that does not fit the call: {}",
                describe_operation(operation)
            )),
        }
    }
    let mut checked = 0;
    for (parent, created) in &by_parent {
        checked += created.len();
        check_parent(parent, created, &mut problems);
    }
    Verdict::from_problems(CHECKER, checked, problems)
}

/// A sequential node a client was told it created.
#[derive(Debug, Clone, Copy)]
struct Created<'h> {
    operation: &'h Operation,
    path: &'h str,
    completed_ns: u64,
}

/// Checks the nodes created under one parent.
fn check_parent(parent: &str, created: &[Created<'_>], problems: &mut Vec<String>) {
    let mut first_by_path: HashMap<&str, &Created<'_>> = HashMap::new();
    let mut numbered: Vec<(&Created<'_>, u64)> = Vec::new();
    for node in created {
        let Some(name) = child_name(node.path, parent) else {
            problems.push(format!(
                "{} is not a child of {parent}: {}",
                node.path,
                describe_operation(node.operation)
            ));
            continue;
        };
        if let Some(first) = first_by_path.get(node.path) {
            problems.push(format!(
                "{} was created twice:\n  {}\n  {}",
                node.path,
                describe_operation(first.operation),
                describe_operation(node.operation)
            ));
        } else {
            first_by_path.insert(node.path, node);
        }
        match sequence_number(name) {
            Some(number) => numbered.push((node, number)),
            None => problems.push(format!(
                "{} has no sequence number: {}",
                node.path,
                describe_operation(node.operation)
            )),
        }
    }
    let ordered: Vec<Ordered> = numbered
        .iter()
        .map(|(node, number)| Ordered {
            invoked_ns: node.operation.invoked_ns,
            completed_ns: node.completed_ns,
            value: *number,
        })
        .collect();
    for (earlier, later) in real_time_inversions(&ordered, true) {
        let ((first, first_number), (second, second_number)) = (numbered[earlier], numbered[later]);
        if first.path == second.path {
            // Already reported as created twice.
            continue;
        }
        problems.push(format!(
            "under {parent}: {} (number {second_number}) was created after {} (number \
             {first_number}) had been:\n  {}\n  {}",
            second.path,
            first.path,
            describe_operation(first.operation),
            describe_operation(second.operation)
        ));
    }
}

/// The last segment of `path` if it is a direct child of `parent`.
fn child_name<'p>(path: &'p str, parent: &str) -> Option<&'p str> {
    let rest = path.strip_prefix(parent)?;
    let name = if parent.ends_with('/') {
        rest
    } else {
        rest.strip_prefix('/')?
    };
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

/// The number in the last run of ASCII digits of `name`, if any (and if it
/// fits a `u64`).
fn sequence_number(name: &str) -> Option<u64> {
    let end = name.rfind(|c: char| c.is_ascii_digit())? + 1;
    let start = name[..end]
        .rfind(|c: char| !c.is_ascii_digit())
        .map_or(0, |position| position + 1);
    name[start..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::testing::{failed, op, unknown};
    use crate::history::Record;

    const PARENT: &str = "/seq";

    fn create(id: u64, invoked: u64, completed: u64, path: &str) -> Record {
        op(
            id,
            id as u32,
            invoked,
            Some(completed),
            Call::CreateSequential {
                parent: PARENT.into(),
            },
            Outcome::Created { path: path.into() },
        )
    }

    fn verdict(records: Vec<Record>) -> Verdict {
        check(&History { records })
    }

    #[test]
    fn reads_the_last_run_of_digits() {
        assert_eq!(sequence_number("item-0000000012"), Some(12));
        assert_eq!(sequence_number("a1-b0000000007"), Some(7));
        assert_eq!(sequence_number("0000000003x"), Some(3));
        assert_eq!(sequence_number("item-"), None);
        assert_eq!(sequence_number("99999999999999999999999"), None);
        assert_eq!(child_name("/seq/n-1", "/seq"), Some("n-1"));
        assert_eq!(child_name("/seq/a/n-1", "/seq"), None);
        assert_eq!(child_name("/sequel/n-1", "/seq"), None);
        assert_eq!(child_name("/n-1", "/"), Some("n-1"));
    }

    #[test]
    fn accepts_increasing_and_concurrent_names() {
        let verdict = verdict(vec![
            create(1, 0, 10, "/seq/n-0000000001"),
            // 2 and 3 overlap, so either order of numbers is fine.
            create(2, 20, 40, "/seq/n-0000000003"),
            create(3, 25, 35, "/seq/n-0000000002"),
            create(4, 50, 60, "/seq/n-0000000010"),
            op(
                5,
                5,
                61,
                Some(62),
                Call::CreateSequential {
                    parent: PARENT.into(),
                },
                failed(),
            ),
            op(
                6,
                6,
                61,
                None,
                Call::CreateSequential {
                    parent: PARENT.into(),
                },
                unknown(),
            ),
        ]);
        assert!(verdict.passed, "{verdict}");
        assert_eq!(verdict.checked, 4);
    }

    #[test]
    fn a_duplicate_name_is_reported_once() {
        let verdict = verdict(vec![
            create(1, 0, 10, "/seq/n-0000000001"),
            create(2, 20, 30, "/seq/n-0000000001"),
        ]);
        assert!(!verdict.passed);
        assert_eq!(verdict.problems.len(), 1, "{verdict}");
        assert!(verdict.problems[0].contains("created twice"));
    }

    #[test]
    fn a_counter_going_back_is_reported() {
        let verdict = verdict(vec![
            create(1, 0, 10, "/seq/n-0000000005"),
            create(2, 20, 30, "/seq/n-0000000004"),
        ]);
        assert!(!verdict.passed);
        assert!(verdict.problems[0].contains("/seq/n-0000000004 (number 4) was created after"));
    }

    #[test]
    fn names_outside_the_parent_or_without_number_are_reported() {
        let verdict = verdict(vec![
            create(1, 0, 10, "/other/n-0000000001"),
            create(2, 20, 30, "/seq/n-"),
        ]);
        assert_eq!(verdict.problems.len(), 2, "{verdict}");
    }
}
