//! Watch delivery. A watcher's span runs from its `WatchStarted` (watched
//! path P, starting after revision r0) to its `WatchEnded`, or to the end
//! of the history. Within a span, in the order received:
//!
//! - every event is about P or a node below it, has a revision above r0,
//!   and a revision above the previous event's (no duplicate, no
//!   reordering);
//! - no gap: every acknowledged write (an operation answered `Written`,
//!   which carries the command's revision) of P or a node below it whose
//!   revision is in (r0, the greatest revision the span received] has an
//!   event with that revision and path in the span. A span that ended
//!   because the history it needed was compacted skips this rule.
//!
//! Creates of sequential nodes and fenced writes are answered without a
//! revision, so they cannot be checked for gaps.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{describe_operation, format_ns, is_at_or_below, Verdict};
use crate::history::{Call, ClientId, History, Operation, Outcome, Record};

/// This checker's name in its verdict.
pub const CHECKER: &str = "watches";

/// Checks every watch span. `checked` counts the events received.
pub fn check(history: &History) -> Verdict {
    let writes = acknowledged_writes(history);
    let mut problems = Vec::new();
    let mut open: HashMap<ClientId, Span<'_>> = HashMap::new();
    let mut checked = 0;
    for record in &history.records {
        match record {
            Record::WatchStarted {
                client,
                path,
                revision,
                at_ns,
            } => {
                let span = Span {
                    client: *client,
                    path,
                    after_revision: *revision,
                    started_ns: *at_ns,
                    events: Vec::new(),
                };
                if let Some(previous) = open.insert(*client, span) {
                    problems.push(format!(
                        "{}: a new watch started at {} before it ended",
                        previous.describe(),
                        format_ns(*at_ns)
                    ));
                    previous.check_gaps(&writes, &mut problems);
                }
            }
            Record::WatchEvent {
                client,
                path,
                revision,
                at_ns,
                ..
            } => {
                checked += 1;
                match open.get_mut(client) {
                    Some(span) => span.receive(path, *revision, *at_ns, &mut problems),
                    None => problems.push(format!(
                        "client {client} received an event outside any watch: {path} at \
                         revision {revision} at {}",
                        format_ns(*at_ns)
                    )),
                }
            }
            Record::WatchEnded {
                client,
                path,
                compacted,
                ..
            } => match open.remove(client) {
                Some(span) => {
                    if span.path != path {
                        problems.push(format!("{}: ended as a watch on {path}", span.describe()));
                    }
                    if !compacted {
                        span.check_gaps(&writes, &mut problems);
                    }
                }
                None => problems.push(format!(
                    "client {client}: a watch on {path} ended that had not started"
                )),
            },
            Record::Operation(_) | Record::LockLost { .. } | Record::Fault { .. } => {}
        }
    }
    let mut still_open: Vec<Span<'_>> = open.into_values().collect();
    still_open.sort_by_key(|span| span.client);
    for span in still_open {
        span.check_gaps(&writes, &mut problems);
    }
    Verdict::from_problems(CHECKER, checked, problems)
}

/// The acknowledged writes by revision: each write's path and operation.
type Writes<'h> = BTreeMap<u64, Vec<(&'h str, &'h Operation)>>;

/// Every operation answered `Written`, by revision.
fn acknowledged_writes(history: &History) -> Writes<'_> {
    let mut writes: Writes<'_> = BTreeMap::new();
    for operation in history.operations() {
        let Outcome::Written { revision, .. } = operation.outcome else {
            continue;
        };
        let path = match &operation.call {
            Call::Create { key, .. }
            | Call::Write { key, .. }
            | Call::CompareAndSet { key, .. } => key,
            Call::FencedWrite { resource, .. } => resource,
            Call::Read { .. }
            | Call::CreateSequential { .. }
            | Call::Acquire { .. }
            | Call::Release { .. } => continue,
        };
        writes.entry(revision).or_default().push((path, operation));
    }
    writes
}

/// One watcher's stream, from its start to its end.
#[derive(Debug)]
struct Span<'h> {
    client: ClientId,
    path: &'h str,
    after_revision: u64,
    started_ns: u64,
    /// The events received, in order: path and revision.
    events: Vec<(&'h str, u64)>,
}

impl<'h> Span<'h> {
    fn describe(&self) -> String {
        format!(
            "client {}'s watch on {} (after revision {}, started {})",
            self.client,
            self.path,
            self.after_revision,
            format_ns(self.started_ns)
        )
    }

    /// Checks one event against the span and the events before it.
    fn receive(&mut self, path: &'h str, revision: u64, at_ns: u64, problems: &mut Vec<String>) {
        let event = format!(
            "event {path} at revision {revision} received {}",
            format_ns(at_ns)
        );
        if !is_at_or_below(path, self.path) {
            problems.push(format!(
                "{}: {event} is outside the watched path",
                self.describe()
            ));
        }
        if revision <= self.after_revision {
            problems.push(format!(
                "{}: {event} is not after the watch's start revision",
                self.describe()
            ));
        }
        if let Some(&(last_path, last_revision)) = self.events.last() {
            if revision == last_revision && path == last_path {
                problems.push(format!("{}: {event} was delivered twice", self.describe()));
            } else if revision <= last_revision {
                problems.push(format!(
                    "{}: {event} came after the event {last_path} at revision {last_revision}",
                    self.describe()
                ));
            }
        }
        self.events.push((path, revision));
    }

    /// Reports every acknowledged write in the span's range it has no event
    /// for.
    fn check_gaps(&self, writes: &Writes<'_>, problems: &mut Vec<String>) {
        let Some(greatest) = self.events.iter().map(|&(_, revision)| revision).max() else {
            return;
        };
        if greatest <= self.after_revision {
            return;
        }
        let received: HashSet<(&str, u64)> = self.events.iter().copied().collect();
        for (&revision, written) in writes.range(self.after_revision + 1..=greatest) {
            for &(path, operation) in written {
                if is_at_or_below(path, self.path) && !received.contains(&(path, revision)) {
                    problems.push(format!(
                        "{}: no event for the acknowledged write at revision {revision} \
                         (it received up to revision {greatest}): {}",
                        self.describe(),
                        describe_operation(operation)
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::testing::op;

    fn started(client: ClientId, revision: u64, at_ns: u64) -> Record {
        Record::WatchStarted {
            client,
            path: "/r".into(),
            revision,
            at_ns,
        }
    }

    fn event(client: ClientId, path: &str, revision: u64, at_ns: u64) -> Record {
        Record::WatchEvent {
            client,
            path: path.into(),
            kind: "NodeDataChanged".into(),
            revision,
            at_ns,
        }
    }

    fn ended(client: ClientId, compacted: bool, at_ns: u64) -> Record {
        Record::WatchEnded {
            client,
            path: "/r".into(),
            compacted,
            reason: "test".into(),
            at_ns,
        }
    }

    fn write(id: u64, key: &str, revision: u64) -> Record {
        op(
            id,
            9,
            id * 10,
            Some(id * 10 + 5),
            Call::Write {
                key: key.into(),
                value: format!("v{id}"),
            },
            Outcome::Written {
                version: 1,
                revision,
            },
        )
    }

    fn verdict(records: Vec<Record>) -> Verdict {
        check(&History { records })
    }

    #[test]
    fn accepts_complete_ordered_streams() {
        let verdict = verdict(vec![
            write(1, "/r/a", 3),
            started(1, 3, 40),
            write(2, "/r/a", 4),
            // Not below the watched path.
            write(3, "/other", 5),
            write(4, "/r/b/c", 6),
            event(1, "/r/a", 4, 50),
            event(1, "/r/b/c", 6, 70),
            // Acknowledged but above the last revision received: may still come.
            write(5, "/r/a", 7),
            ended(1, false, 80),
            // A compacted span is not checked for gaps.
            started(1, 3, 90),
            event(1, "/r/b/c", 6, 95),
            ended(1, true, 99),
        ]);
        assert!(verdict.passed, "{verdict}");
        assert_eq!(verdict.checked, 3);
    }

    #[test]
    fn a_missing_event_is_reported() {
        let verdict = verdict(vec![
            started(1, 3, 0),
            write(1, "/r/a", 4),
            write(2, "/r/b", 5),
            event(1, "/r/b", 5, 60),
        ]);
        assert!(!verdict.passed);
        assert_eq!(verdict.problems.len(), 1, "{verdict}");
        assert!(verdict.problems[0].contains("no event for the acknowledged write at revision 4"));
    }

    #[test]
    fn an_event_for_the_wrong_path_leaves_a_gap() {
        let verdict = verdict(vec![
            started(1, 3, 0),
            write(1, "/r/a", 4),
            event(1, "/r/b", 4, 60),
        ]);
        assert_eq!(verdict.problems.len(), 1, "{verdict}");
    }

    #[test]
    fn out_of_order_duplicate_and_stale_events_are_reported() {
        let verdict = verdict(vec![
            started(1, 3, 0),
            event(1, "/r/a", 5, 10),
            event(1, "/r/a", 4, 20),
            event(1, "/r/a", 4, 30),
            event(1, "/r/a", 2, 40),
            event(1, "/elsewhere", 9, 50),
            ended(1, true, 60),
        ]);
        let text = verdict.problems.join("\n");
        assert!(
            text.contains(
                "revision 4 received 0.000000020s came after the event /r/a at revision 5"
            ),
            "{text}"
        );
        assert!(text.contains("delivered twice"), "{text}");
        assert!(
            text.contains("not after the watch's start revision"),
            "{text}"
        );
        assert!(text.contains("outside the watched path"), "{text}");
        assert_eq!(verdict.problems.len(), 5, "{text}");
    }

    #[test]
    fn events_outside_a_span_are_reported() {
        let verdict = verdict(vec![event(1, "/r/a", 5, 10), ended(2, false, 20)]);
        assert_eq!(verdict.problems.len(), 2, "{verdict}");
    }
}
