//! Lock safety, from the clients' point of view and from the fenced
//! resource's.
//!
//! 1. Tokens increase: the tokens granted for a lock are distinct, and a
//!    grant that completed before another was invoked has the smaller one.
//! 2. Mutual exclusion: client C holds a lock under token t from its grant's
//!    completion until the earliest of C's `LockLost` for t, the invocation
//!    of C's release of t, or (if neither exists) the end of the history.
//!    Another client's grant of that lock that completes strictly inside
//!    the hold means two clients believed they held it.
//! 3. Fencing: if an accepted fenced write under token t1 completed before
//!    an accepted fenced write to the same resource under t2 was invoked,
//!    then t2 >= t1: the resource never accepts a token older than one it
//!    had already accepted. Rejected writes are fine; indeterminate ones
//!    are ignored (they may not have been accepted).

use std::collections::{BTreeMap, HashMap};

use super::{
    describe_operation, end_of_history, format_ns, real_time_inversions, Ordered, Verdict,
};
use crate::history::{Call, ClientId, History, Operation, Outcome, Record};

/// This checker's name in its verdict.
pub const CHECKER: &str = "locks";

/// Checks the lock grants, holds and fenced writes. `checked` counts the
/// grants and the accepted fenced writes.
pub fn check(history: &History) -> Verdict {
    let mut problems = Vec::new();
    let mut grants: BTreeMap<&str, Vec<Grant<'_>>> = BTreeMap::new();
    let mut fenced: BTreeMap<&str, Vec<(&Operation, u64)>> = BTreeMap::new();
    let mut releases: HashMap<(ClientId, &str, u64), u64> = HashMap::new();
    for operation in history.operations() {
        match (&operation.call, &operation.outcome) {
            (Call::Acquire { lock }, Outcome::Granted { token }) => match operation.completed_ns {
                Some(completed_ns) => grants.entry(lock).or_default().push(Grant {
                    operation,
                    token: *token,
                    completed_ns,
                }),
                None => problems.push(format!(
                    "a grant without a completion time: {}",
                    describe_operation(operation)
                )),
            },
            (Call::Release { lock, token }, _) => {
                let invoked = releases
                    .entry((operation.client, lock.as_str(), *token))
                    .or_insert(operation.invoked_ns);
                *invoked = (*invoked).min(operation.invoked_ns);
            }
            (
                Call::FencedWrite {
                    resource, token, ..
                },
                Outcome::FenceAccepted,
            ) => {
                if operation.completed_ns.is_some() {
                    fenced
                        .entry(resource)
                        .or_default()
                        .push((operation, *token));
                } else {
                    problems.push(format!(
                        "an accepted fenced write without a completion time: {}",
                        describe_operation(operation)
                    ));
                }
            }
            (Call::Acquire { .. }, Outcome::Failed { .. } | Outcome::Indeterminate { .. })
            | (
                Call::FencedWrite { .. },
                Outcome::FenceRejected | Outcome::Failed { .. } | Outcome::Indeterminate { .. },
            ) => {}
            (Call::Acquire { .. } | Call::FencedWrite { .. }, _) => problems.push(format!(
                "an answer that does not fit the call: {}",
                describe_operation(operation)
            )),
            _ => {}
        }
    }
    let mut losses: HashMap<(ClientId, &str, u64), u64> = HashMap::new();
    for record in &history.records {
        if let Record::LockLost {
            client,
            lock,
            token,
            at_ns,
        } = record
        {
            let at = losses
                .entry((*client, lock.as_str(), *token))
                .or_insert(*at_ns);
            *at = (*at).min(*at_ns);
        }
    }
    let history_end = end_of_history(history);
    let mut checked = 0;
    for (lock, grants) in &grants {
        checked += grants.len();
        check_tokens(lock, grants, &mut problems);
        let holds: Vec<Hold<'_>> = grants
            .iter()
            .map(|grant| {
                let key = (grant.operation.client, *lock, grant.token);
                let lost = losses.get(&key).map(|&at| (at, "it was reported lost"));
                let released = releases
                    .get(&key)
                    .map(|&at| (at, "its release was invoked"));
                let (until_ns, ended_by) = match (lost, released) {
                    (Some(lost), Some(released)) => lost.min(released),
                    (Some(end), None) | (None, Some(end)) => end,
                    (None, None) => (history_end, "the history ended"),
                };
                Hold {
                    grant,
                    until_ns,
                    ended_by,
                }
            })
            .collect();
        check_exclusion(lock, grants, &holds, &mut problems);
    }
    for (resource, writes) in &fenced {
        checked += writes.len();
        check_fencing(resource, writes, &mut problems);
    }
    Verdict::from_problems(CHECKER, checked, problems)
}

/// A completed grant of a lock.
#[derive(Debug, Clone, Copy)]
struct Grant<'h> {
    operation: &'h Operation,
    token: u64,
    completed_ns: u64,
}

/// When a grant's holder believed it held the lock.
#[derive(Debug, Clone, Copy)]
struct Hold<'h> {
    grant: &'h Grant<'h>,
    /// The hold is `(grant.completed_ns, until_ns)`.
    until_ns: u64,
    /// What ended it, for the report.
    ended_by: &'static str,
}

/// Rule 1: distinct tokens, increasing in real time.
fn check_tokens(lock: &str, grants: &[Grant<'_>], problems: &mut Vec<String>) {
    let mut first_by_token: HashMap<u64, &Grant<'_>> = HashMap::new();
    for grant in grants {
        if let Some(first) = first_by_token.get(&grant.token) {
            problems.push(format!(
                "lock {lock}: token {} granted twice:\n  {}\n  {}",
                grant.token,
                describe_operation(first.operation),
                describe_operation(grant.operation)
            ));
        } else {
            first_by_token.insert(grant.token, grant);
        }
    }
    let ordered: Vec<Ordered> = grants
        .iter()
        .map(|grant| Ordered {
            invoked_ns: grant.operation.invoked_ns,
            completed_ns: grant.completed_ns,
            value: grant.token,
        })
        .collect();
    for (earlier, later) in real_time_inversions(&ordered, false) {
        problems.push(format!(
            "lock {lock}: token {} was granted after token {} had been granted:\n  {}\n  {}",
            grants[later].token,
            grants[earlier].token,
            describe_operation(grants[earlier].operation),
            describe_operation(grants[later].operation)
        ));
    }
}

/// Rule 2: no grant to another client completes inside a hold.
fn check_exclusion(
    lock: &str,
    grants: &[Grant<'_>],
    holds: &[Hold<'_>],
    problems: &mut Vec<String>,
) {
    let mut by_completion: Vec<&Grant<'_>> = grants.iter().collect();
    by_completion.sort_by_key(|grant| grant.completed_ns);
    for hold in holds {
        let from_ns = hold.grant.completed_ns;
        let first_after = by_completion.partition_point(|grant| grant.completed_ns <= from_ns);
        let overlapping = by_completion[first_after..]
            .iter()
            .take_while(|grant| grant.completed_ns < hold.until_ns)
            .filter(|grant| grant.operation.client != hold.grant.operation.client);
        for other in overlapping {
            problems.push(format!(
                "lock {lock}: two holders at once: client {} held token {} from {} until {} \
                 ({}), but client {} was granted token {} at {}:\n  {}\n  {}",
                hold.grant.operation.client,
                hold.grant.token,
                format_ns(from_ns),
                format_ns(hold.until_ns),
                hold.ended_by,
                other.operation.client,
                other.token,
                format_ns(other.completed_ns),
                describe_operation(hold.grant.operation),
                describe_operation(other.operation)
            ));
        }
    }
}

/// Rule 3: the resource never accepts an older token after a newer one.
fn check_fencing(resource: &str, writes: &[(&Operation, u64)], problems: &mut Vec<String>) {
    let ordered: Vec<Ordered> = writes
        .iter()
        .map(|&(operation, token)| Ordered {
            invoked_ns: operation.invoked_ns,
            completed_ns: operation.completed_ns.unwrap_or(u64::MAX),
            value: token,
        })
        .collect();
    for (earlier, later) in real_time_inversions(&ordered, false) {
        let (newer, newer_token) = writes[earlier];
        let (older, older_token) = writes[later];
        problems.push(format!(
            "resource {resource}: accepted a write under token {older_token} after it had \
             accepted one under token {newer_token}:\n  {}\n  {}",
            describe_operation(newer),
            describe_operation(older)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::testing::{failed, op, unknown};

    const LOCK: &str = "/locks/a";

    fn acquire(id: u64, client: ClientId, invoked: u64, completed: u64, token: u64) -> Record {
        op(
            id,
            client,
            invoked,
            Some(completed),
            Call::Acquire { lock: LOCK.into() },
            Outcome::Granted { token },
        )
    }

    fn release(id: u64, client: ClientId, invoked: u64, completed: u64, token: u64) -> Record {
        op(
            id,
            client,
            invoked,
            Some(completed),
            Call::Release {
                lock: LOCK.into(),
                token,
            },
            Outcome::Released,
        )
    }

    fn fenced(
        id: u64,
        client: ClientId,
        invoked: u64,
        completed: Option<u64>,
        token: u64,
        outcome: Outcome,
    ) -> Record {
        op(
            id,
            client,
            invoked,
            completed,
            Call::FencedWrite {
                lock: LOCK.into(),
                resource: "/fenced".into(),
                token,
                value: format!("v{id}"),
            },
            outcome,
        )
    }

    fn lost(client: ClientId, token: u64, at_ns: u64) -> Record {
        Record::LockLost {
            client,
            lock: LOCK.into(),
            token,
            at_ns,
        }
    }

    fn verdict(records: Vec<Record>) -> Verdict {
        check(&History { records })
    }

    #[test]
    fn accepts_handovers_by_release_and_by_loss() {
        let verdict = verdict(vec![
            acquire(1, 1, 0, 10, 1),
            fenced(2, 1, 11, Some(15), 1, Outcome::FenceAccepted),
            release(3, 1, 20, 25, 1),
            // Client 2 waited while client 1 held it.
            acquire(4, 2, 5, 22, 2),
            fenced(5, 2, 23, Some(30), 2, Outcome::FenceAccepted),
            lost(2, 2, 40),
            acquire(6, 3, 30, 45, 3),
            // Client 2's late write under its old token is refused.
            fenced(7, 2, 46, Some(50), 2, Outcome::FenceRejected),
            fenced(8, 3, 47, Some(52), 3, Outcome::FenceAccepted),
            // A failed and an indeterminate acquire hold nothing.
            op(
                9,
                4,
                50,
                Some(60),
                Call::Acquire { lock: LOCK.into() },
                failed(),
            ),
            op(
                10,
                5,
                50,
                None,
                Call::Acquire { lock: LOCK.into() },
                unknown(),
            ),
        ]);
        assert!(verdict.passed, "{verdict}");
        assert_eq!(verdict.checked, 6);
    }

    #[test]
    fn overlapping_holds_are_reported_with_both_holders() {
        let verdict = verdict(vec![
            acquire(1, 1, 0, 10, 1),
            acquire(2, 2, 5, 15, 2),
            release(3, 1, 20, 25, 1),
        ]);
        assert!(!verdict.passed);
        assert_eq!(verdict.problems.len(), 1, "{verdict}");
        let problem = &verdict.problems[0];
        assert!(problem.contains("client 1 held token 1"), "{problem}");
        assert!(
            problem.contains("client 2 was granted token 2"),
            "{problem}"
        );
        assert!(
            problem.contains("op 1 ") && problem.contains("op 2 "),
            "{problem}"
        );
    }

    #[test]
    fn a_hold_without_end_lasts_to_the_end_of_the_history() {
        let verdict = verdict(vec![
            acquire(1, 1, 0, 10, 1),
            acquire(2, 2, 5, 15, 2),
            Record::Fault {
                description: "kill 1".into(),
                kind: "kill".into(),
                at_ns: 100,
            },
        ]);
        assert!(!verdict.passed);
        assert!(
            verdict.problems[0].contains("the history ended"),
            "{verdict}"
        );
    }

    #[test]
    fn a_grant_right_after_a_loss_is_fine() {
        let verdict = verdict(vec![
            acquire(1, 1, 0, 10, 1),
            lost(1, 1, 12),
            acquire(2, 2, 5, 15, 2),
        ]);
        assert!(verdict.passed, "{verdict}");
    }

    #[test]
    fn decreasing_and_duplicate_tokens_are_reported() {
        let verdict = verdict(vec![
            acquire(1, 1, 0, 10, 5),
            release(2, 1, 11, 12, 5),
            acquire(3, 2, 20, 30, 4),
            release(4, 2, 31, 32, 4),
            acquire(5, 3, 40, 50, 4),
        ]);
        assert!(!verdict.passed);
        let text = verdict.problems.join("\n");
        assert!(text.contains("token 4 granted twice"), "{text}");
        assert!(
            text.contains("token 4 was granted after token 5 had been granted"),
            "{text}"
        );
    }

    #[test]
    fn concurrent_grants_may_complete_in_any_token_order() {
        // Grants whose calls overlap constrain nothing about their tokens;
        // only the holds matter, and these do not overlap.
        let verdict = verdict(vec![
            acquire(1, 1, 0, 10, 2),
            release(2, 1, 11, 12, 2),
            acquire(3, 2, 1, 13, 1),
        ]);
        assert!(verdict.passed, "{verdict}");
    }

    #[test]
    fn an_older_token_accepted_after_a_newer_one_is_reported() {
        let verdict = verdict(vec![
            fenced(1, 1, 0, Some(10), 3, Outcome::FenceAccepted),
            fenced(2, 2, 20, Some(30), 2, Outcome::FenceAccepted),
            // Overlapping with the first: no order is implied.
            fenced(3, 3, 5, Some(8), 1, Outcome::FenceAccepted),
            // Indeterminate: may not have been accepted.
            fenced(4, 4, 40, None, 1, unknown()),
        ]);
        assert!(!verdict.passed);
        assert_eq!(verdict.problems.len(), 1, "{verdict}");
        assert!(
            verdict.problems[0].contains("under token 2 after it had accepted one under token 3")
        );
    }

    #[test]
    fn odd_answers_are_problems_not_panics() {
        let verdict = verdict(vec![
            op(
                1,
                1,
                0,
                None,
                Call::Acquire { lock: LOCK.into() },
                Outcome::Granted { token: 1 },
            ),
            op(
                2,
                1,
                0,
                Some(3),
                Call::Acquire { lock: LOCK.into() },
                Outcome::Released,
            ),
        ]);
        assert!(!verdict.passed);
        assert_eq!(verdict.problems.len(), 2, "{verdict}");
    }
}
