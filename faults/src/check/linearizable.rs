//! Linearizability of the register operations (`Create`, `Read`, `Write`,
//! `CompareAndSet`), checked per key: linearizability is compositional, so
//! the history is linearizable iff each key's sub-history is.
//!
//! Each key's operations must fit one sequential order that respects real
//! time (an operation that completed before another was invoked comes
//! first) and the model of a versioned register. The state is the node,
//! `None` when there is none, else its value and version:
//!
//! - `Create` on no node makes it `(value, 0)`; its answer `Written` must
//!   say version 0. (A create that found the node was answered `Failed`.)
//! - `Read` returns exactly the state.
//! - `Write` on a node sets the value and version + 1, the version its
//!   answer must say; a write on no node cannot succeed.
//! - `CompareAndSet` applies iff the node's version is the expected one
//!   (answer `Written` with version expected + 1); it is refused
//!   (`VersionMismatch`) iff the node exists with another version.
//!
//! `Failed` operations certainly did not take effect and are dropped. An
//! `Indeterminate` one never returned: it may take effect at any moment
//! after its invocation, or never, so the search may place it anywhere
//! after its invocation or leave it out (an indeterminate read tells
//! nothing and is dropped). A key is linearizable when every operation with
//! a completion has been placed.
//!
//! The search is Wing and Gong's, with Lowe's memoisation, as in porcupine:
//! call and return entries in time order in a doubly linked list; at each
//! step, linearize some pending call whose model step succeeds and whose
//! (set of linearized operations, state) pair is new, or, on reaching a
//! return entry, backtrack. Three sound reductions keep it fast when
//! operations time out: values no read observed share one id (they are
//! indistinguishable to the model); pending operations that never returned
//! and do the same thing are linearized in invocation order only (any
//! other order is a swap away); and a configuration is abandoned as soon as
//! its version has passed what some operation still to be linearized
//! answered (versions never go down). A key whose search outlasts the
//! budget is reported as undecided, which fails the verdict.
//!
//! A violation report names the key, the end of the longest linearizable
//! prefix found, the register's state after it, and the operations none of
//! which could come next.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

use super::{describe_operation, format_ns, Verdict};
use crate::history::{Call, History, Operation, Outcome};

/// This checker's name in its verdict.
pub const CHECKER: &str = "linearizable";

/// How many search steps run between two looks at the clock.
const STEPS_PER_CLOCK_CHECK: u64 = 256;

/// The most memory the cache of visited configurations may take for one
/// key; a key that needs more is undecided.
const CACHE_BYTES_MAX: usize = 1 << 30;

/// How many operations of the longest linearizable prefix a violation
/// report shows.
const PREFIX_TAIL_SHOWN: usize = 8;

/// How many candidate operations a violation report shows.
const CANDIDATES_SHOWN: usize = 12;

/// Checks every key's register operations; `budget` bounds the search of
/// each key. `checked` counts the operations that entered a search (those
/// that may have taken effect).
pub fn check(history: &History, budget: Duration) -> Verdict {
    let mut problems = Vec::new();
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for operation in history.operations() {
        if let Some(key) = register_key(&operation.call) {
            by_key.entry(key).or_default().push(operation);
        }
    }
    let mut checked = 0;
    for (key, operations) in by_key {
        let register = Register::new(key, &operations, &mut problems);
        checked += register.operations.len();
        match register.search(budget) {
            SearchResult::Linearizable => {}
            SearchResult::NotLinearizable(deepest) => {
                problems.push(register.describe_violation(&deepest));
            }
            SearchResult::Undecided { steps, reason } => problems.push(format!(
                "key {key}: undecided within budget ({reason} after {steps} search steps, \
                 {} operations); counted as a failure",
                register.operations.len()
            )),
        }
    }
    Verdict::from_problems(CHECKER, checked, problems)
}

/// The register a call is about, if it is a register call.
fn register_key(call: &Call) -> Option<&str> {
    match call {
        Call::Create { key, .. }
        | Call::Read { key }
        | Call::Write { key, .. }
        | Call::CompareAndSet { key, .. } => Some(key),
        Call::CreateSequential { .. }
        | Call::Acquire { .. }
        | Call::Release { .. }
        | Call::FencedWrite { .. } => None,
    }
}

/// A value, interned: the index of its text in [`Register::values`].
type ValueId = u32;

/// The register's state: no node, or its value and version.
type State = Option<(ValueId, u64)>;

/// The one id of every value no read observed: such values only differ in
/// what a read would see, so they can share an id, which lets the cache
/// merge states that differ only by them.
const UNOBSERVED: ValueId = 0;

/// How a state holding an [`UNOBSERVED`] value is described.
const UNOBSERVED_TEXT: &str = "(a value no read observed)";

/// The interning of one key's values.
#[derive(Debug)]
struct Values<'h> {
    /// The values some read returned.
    observed: HashSet<&'h str>,
    ids: HashMap<&'h str, ValueId>,
    /// The texts by id; [`UNOBSERVED`] first.
    texts: Vec<&'h str>,
}

impl<'h> Values<'h> {
    fn intern(&mut self, text: &'h str) -> ValueId {
        if !self.observed.contains(text) {
            return UNOBSERVED;
        }
        let texts = &mut self.texts;
        *self.ids.entry(text).or_insert_with(|| {
            texts.push(text);
            ValueId::try_from(texts.len() - 1).unwrap_or(ValueId::MAX)
        })
    }
}

/// What one operation does to the model, with what its answer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Effect {
    /// Makes the node; `version` is the answered version (`None`: no
    /// answer).
    Create {
        value: ValueId,
        version: Option<u64>,
    },
    /// Returns exactly `observed`.
    Read { observed: State },
    /// Sets the value and bumps the version to `version` (`None`: no
    /// answer).
    Write {
        value: ValueId,
        version: Option<u64>,
    },
    /// Sets the value if the version is `expected`; the answer said it did,
    /// with `version` (`None`: no answer).
    CompareAndSetApplied {
        expected: u64,
        value: ValueId,
        version: Option<u64>,
    },
    /// The answer said the node's version was not `expected`.
    CompareAndSetRefused { expected: u64 },
}

impl Effect {
    /// Whether it sets the register's value when it takes effect.
    fn writes(self) -> bool {
        !matches!(
            self,
            Effect::Read { .. } | Effect::CompareAndSetRefused { .. }
        )
    }

    /// The state after this operation from `state`, or `None` if the
    /// operation and its answer cannot happen in `state`.
    fn step(self, state: State) -> Option<State> {
        let answered = |version: Option<u64>, actual: u64| version.is_none_or(|v| v == actual);
        match (self, state) {
            (Effect::Create { value, version }, None) => {
                answered(version, 0).then_some(Some((value, 0)))
            }
            (Effect::Create { .. }, Some(_)) => None,
            (Effect::Read { observed }, state) => (observed == state).then_some(state),
            (Effect::Write { value, version }, Some((_, current))) => {
                let next = current.checked_add(1)?;
                answered(version, next).then_some(Some((value, next)))
            }
            (
                Effect::CompareAndSetApplied {
                    expected,
                    value,
                    version,
                },
                Some((_, current)),
            ) => {
                let next = current.checked_add(1)?;
                (current == expected && answered(version, next)).then_some(Some((value, next)))
            }
            (Effect::CompareAndSetRefused { expected }, Some((_, current))) => {
                (current != expected).then_some(state)
            }
            (
                Effect::Write { .. }
                | Effect::CompareAndSetApplied { .. }
                | Effect::CompareAndSetRefused { .. },
                None,
            ) => None,
        }
    }
}

/// One operation as the search sees it.
#[derive(Debug, Clone, Copy)]
struct SearchOperation<'h> {
    operation: &'h Operation,
    effect: Effect,
    /// When it was invoked.
    invoked_ns: u64,
    /// When it returned; `None` when it never did (it may take effect at
    /// any moment after its invocation, or never).
    returned_ns: Option<u64>,
}

/// One key's operations, ready for the search.
#[derive(Debug)]
struct Register<'h> {
    key: &'h str,
    operations: Vec<SearchOperation<'h>>,
    /// The interned values' texts.
    values: Vec<&'h str>,
}

impl<'h> Register<'h> {
    /// Turns the key's operations into search operations, dropping those
    /// that certainly did not take effect and reporting odd ones.
    fn new(key: &'h str, history: &[&'h Operation], problems: &mut Vec<String>) -> Register<'h> {
        let observed: HashSet<&str> = history
            .iter()
            .filter_map(|operation| match &operation.outcome {
                Outcome::Read {
                    value: Some((text, _)),
                } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        let mut values = Values {
            observed,
            ids: HashMap::new(),
            texts: vec![UNOBSERVED_TEXT],
        };
        let mut operations = Vec::new();
        for &operation in history {
            let odd = |problems: &mut Vec<String>, why: &str| {
                problems.push(format!(
                    "key {key}: {why}: {}",
                    describe_operation(operation)
                ));
            };
            let Some(effect) = Self::effect_of(operation, &mut values) else {
                if !matches!(
                    (&operation.call, &operation.outcome),
                    (_, Outcome::Failed { .. })
                        | (Call::Read { .. }, Outcome::Indeterminate { .. })
                ) {
                    odd(problems, "an answer that does not fit the call");
                }
                continue;
            };
            let indeterminate = !operation.is_determinate();
            let returned_ns = match (indeterminate, operation.completed_ns) {
                (true, _) => None,
                (false, None) => {
                    odd(
                        problems,
                        "a determinate answer without a completion time (checked as pending)",
                    );
                    None
                }
                (false, Some(completed)) if completed < operation.invoked_ns => {
                    odd(
                        problems,
                        "completed before it was invoked (checked as completing at its invocation)",
                    );
                    Some(operation.invoked_ns)
                }
                (false, Some(completed)) => Some(completed),
            };
            operations.push(SearchOperation {
                operation,
                effect,
                invoked_ns: operation.invoked_ns,
                returned_ns,
            });
        }
        Register {
            key,
            operations,
            values: values.texts,
        }
    }

    /// What `operation` does to the model, or `None` if it certainly did
    /// nothing (or its answer does not fit its call).
    fn effect_of(operation: &'h Operation, values: &mut Values<'h>) -> Option<Effect> {
        let answered = |version: &u64| operation.is_determinate().then_some(*version);
        let effect = match (&operation.call, &operation.outcome) {
            (Call::Read { .. }, Outcome::Read { value }) => Effect::Read {
                observed: value
                    .as_ref()
                    .map(|(text, version)| (values.intern(text), *version)),
            },
            (Call::Create { value, .. }, Outcome::Written { version, .. }) => Effect::Create {
                value: values.intern(value),
                version: answered(version),
            },
            (Call::Create { value, .. }, Outcome::Indeterminate { .. }) => Effect::Create {
                value: values.intern(value),
                version: None,
            },
            (Call::Write { value, .. }, Outcome::Written { version, .. }) => Effect::Write {
                value: values.intern(value),
                version: answered(version),
            },
            (Call::Write { value, .. }, Outcome::Indeterminate { .. }) => Effect::Write {
                value: values.intern(value),
                version: None,
            },
            (
                Call::CompareAndSet {
                    expected_version,
                    value,
                    ..
                },
                Outcome::Written { version, .. },
            ) => Effect::CompareAndSetApplied {
                expected: *expected_version,
                value: values.intern(value),
                version: answered(version),
            },
            (
                Call::CompareAndSet {
                    expected_version,
                    value,
                    ..
                },
                Outcome::Indeterminate { .. },
            ) => Effect::CompareAndSetApplied {
                expected: *expected_version,
                value: values.intern(value),
                version: None,
            },
            (
                Call::CompareAndSet {
                    expected_version, ..
                },
                Outcome::VersionMismatch,
            ) => Effect::CompareAndSetRefused {
                expected: *expected_version,
            },
            _ => return None,
        };
        Some(effect)
    }

    /// The Wing-Gong-Lowe search over this key's operations.
    fn search(&self, budget: Duration) -> SearchResult {
        let deadline = Instant::now().checked_add(budget);
        let mut list = EntryList::new(&self.operations);
        let mut interchangeable = Interchangeable::new(&self.operations);
        let mut ceilings = Ceilings::default();
        for operation in 0..self.operations.len() {
            ceilings.insert(self.ceiling_of(operation));
        }
        let required = self
            .operations
            .iter()
            .filter(|operation| operation.returned_ns.is_some())
            .count();
        let words = self.operations.len().div_ceil(64);
        let cache_entry_bytes = words * 8 + std::mem::size_of::<(Vec<u64>, State)>() + 16;
        let mut linearized = Bitset::new(self.operations.len());
        let mut cache: HashSet<(Vec<u64>, State), BuildHasherDefault<WordHasher>> =
            HashSet::default();
        // The linearized operations in order, each with the state before it.
        let mut stack: Vec<(usize, State)> = Vec::new();
        let mut state: State = None;
        let mut required_linearized = 0;
        let mut deepest: Option<Deepest> = None;
        let mut entry = list.first();
        let mut steps: u64 = 0;
        loop {
            if required_linearized == required {
                return SearchResult::Linearizable;
            }
            steps += 1;
            if steps.is_multiple_of(STEPS_PER_CLOCK_CHECK) {
                if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    return SearchResult::Undecided {
                        steps,
                        reason: "the time budget ran out",
                    };
                }
                if cache.len().saturating_mul(cache_entry_bytes) > CACHE_BYTES_MAX {
                    return SearchResult::Undecided {
                        steps,
                        reason: "the cache of visited states outgrew its memory bound",
                    };
                }
            }
            match entry {
                Some(call) if list.is_call(call) => {
                    let operation = list.operation_of(call);
                    let next_state = interchangeable
                        .allows(operation)
                        .then(|| self.operations[operation].effect.step(state))
                        .flatten();
                    if let Some(next_state) = next_state {
                        let ceiling = self.ceiling_of(operation);
                        ceilings.remove(ceiling);
                        if ceilings.admit(rank(next_state)) {
                            linearized.set(operation);
                            if cache.insert((linearized.words.clone(), next_state)) {
                                stack.push((operation, state));
                                state = next_state;
                                if self.operations[operation].returned_ns.is_some() {
                                    required_linearized += 1;
                                }
                                interchangeable.linearize(operation);
                                list.lift(call);
                                entry = list.first();
                                continue;
                            }
                            linearized.clear(operation);
                        }
                        ceilings.insert(ceiling);
                    }
                    entry = list.next(call);
                }
                _ => {
                    // A return entry (or, defensively, the end): the
                    // operation returning here cannot be linearized before
                    // it returns, so undo the last choice.
                    if deepest
                        .as_ref()
                        .is_none_or(|deepest| stack.len() > deepest.depth)
                    {
                        let candidates = list.calls_before(entry);
                        deepest = Some(Deepest {
                            depth: stack.len(),
                            tail: stack
                                .iter()
                                .rev()
                                .take(PREFIX_TAIL_SHOWN)
                                .rev()
                                .map(|&(operation, _)| operation)
                                .collect(),
                            state,
                            last_writer: stack
                                .iter()
                                .rev()
                                .map(|&(operation, _)| operation)
                                .find(|&operation| self.operations[operation].effect.writes()),
                            blocked: entry.map(|entry| list.operation_of(entry)),
                            held_back_by: ceilings.holding_back(rank(state), &candidates),
                            candidates,
                        });
                    }
                    let Some((operation, previous)) = stack.pop() else {
                        return SearchResult::NotLinearizable(deepest.unwrap_or_default());
                    };
                    state = previous;
                    linearized.clear(operation);
                    if self.operations[operation].returned_ns.is_some() {
                        required_linearized -= 1;
                    }
                    interchangeable.unlinearize(operation);
                    ceilings.insert(self.ceiling_of(operation));
                    let call = list.call_entry_of(operation);
                    list.unlift(call);
                    entry = list.next(call);
                }
            }
        }
    }

    /// The highest [`rank`] of state from which `operation` can still be
    /// linearized, if it must be linearized (it returned) and its answer
    /// bounds it.
    fn ceiling_of(&self, index: usize) -> Option<(u64, usize)> {
        let operation = self.operations.get(index)?;
        operation.returned_ns?;
        let ceiling = match operation.effect {
            Effect::Create {
                version: Some(_), ..
            } => 0,
            Effect::Read { observed } => rank(observed),
            Effect::Write {
                version: Some(version),
                ..
            }
            | Effect::CompareAndSetApplied {
                version: Some(version),
                ..
            } => version,
            Effect::Create { version: None, .. }
            | Effect::Write { version: None, .. }
            | Effect::CompareAndSetApplied { version: None, .. }
            | Effect::CompareAndSetRefused { .. } => return None,
        };
        Some((ceiling, index))
    }

    /// A violation report: the longest linearizable prefix found and the
    /// operations none of which could follow it.
    fn describe_violation(&self, deepest: &Deepest) -> String {
        let mut report = format!(
            "key {}: not linearizable ({} operations). The longest linearizable prefix found \
             has {} operations",
            self.key,
            self.operations.len(),
            deepest.depth
        );
        if deepest.tail.is_empty() {
            report.push('.');
        } else {
            report.push_str(", ending with:");
            for &operation in &deepest.tail {
                report.push_str(&format!("\n  {}", self.describe(operation)));
            }
        }
        report.push_str(&format!(
            "\nafter it the register is {}, and none of these can come next:",
            self.describe_state(deepest.state, deepest.last_writer)
        ));
        for &operation in deepest.candidates.iter().take(CANDIDATES_SHOWN) {
            report.push_str(&format!("\n  {}", self.describe(operation)));
        }
        let hidden = deepest.candidates.len().saturating_sub(CANDIDATES_SHOWN);
        if hidden > 0 {
            report.push_str(&format!("\n  ... and {hidden} more"));
        }
        if let Some(held_back_by) = deepest.held_back_by {
            report.push_str(&format!(
                "\nno change can come next, as this one must still take effect and needs \
                 the register as it is or earlier:\n  {}",
                self.describe(held_back_by)
            ));
        }
        if let Some(blocked) = deepest.blocked {
            let returned = self.operations[blocked]
                .returned_ns
                .map_or_else(|| "?".to_string(), format_ns);
            report.push_str(&format!(
                "\nop {} had to take effect by {returned}, when it returned",
                self.operations[blocked].operation.id
            ));
        }
        report
    }

    fn describe(&self, operation: usize) -> String {
        describe_operation(self.operations[operation].operation)
    }

    /// The state, with the value's text taken from the operation that
    /// wrote it (the state itself may hold [`UNOBSERVED`]).
    fn describe_state(&self, state: State, last_writer: Option<usize>) -> String {
        let Some((value, version)) = state else {
            return "absent".to_string();
        };
        let written = last_writer.and_then(|writer| {
            let operation = self.operations[writer].operation;
            let text = match &operation.call {
                Call::Create { value, .. }
                | Call::Write { value, .. }
                | Call::CompareAndSet { value, .. } => value.as_str(),
                Call::Read { .. }
                | Call::CreateSequential { .. }
                | Call::Acquire { .. }
                | Call::Release { .. }
                | Call::FencedWrite { .. } => return None,
            };
            Some(format!(
                "{text:?} at version {version} (written by op {})",
                operation.id
            ))
        });
        written.unwrap_or_else(|| {
            let text = self.values.get(value as usize).copied().unwrap_or("?");
            format!("{text:?} at version {version}")
        })
    }
}

/// Where a state lies in the order every model step respects: no node is
/// 0, version v is v + 1. No step lowers it (there is no delete), so a
/// configuration whose state ranks above what some operation that must
/// still be linearized can start from is dead.
fn rank(state: State) -> u64 {
    state.map_or(0, |(_, version)| version.saturating_add(1))
}

/// The ceilings ([`Register::ceiling_of`]) of the operations not yet
/// linearized, with their operations.
#[derive(Debug, Default)]
struct Ceilings {
    ceilings: BTreeSet<(u64, usize)>,
}

impl Ceilings {
    fn insert(&mut self, ceiling: Option<(u64, usize)>) {
        if let Some(ceiling) = ceiling {
            self.ceilings.insert(ceiling);
        }
    }

    fn remove(&mut self, ceiling: Option<(u64, usize)>) {
        if let Some(ceiling) = ceiling {
            self.ceilings.remove(&ceiling);
        }
    }

    /// The lowest ceiling and its operation, if any bounds the state.
    fn lowest(&self) -> Option<(u64, usize)> {
        self.ceilings.first().copied()
    }

    /// An operation other than `candidates` that needs a state of at most
    /// `rank`, so forbids every change from a state of that rank.
    fn holding_back(&self, rank: u64, candidates: &[usize]) -> Option<usize> {
        self.ceilings
            .iter()
            .take_while(|&&(ceiling, _)| ceiling <= rank)
            .map(|&(_, operation)| operation)
            .find(|operation| !candidates.contains(operation))
    }

    /// Whether a state of `rank` leaves every operation still to come
    /// possible.
    fn admit(&self, rank: u64) -> bool {
        self.lowest().is_none_or(|(ceiling, _)| rank <= ceiling)
    }
}

/// How a key's search ended.
#[derive(Debug)]
enum SearchResult {
    Linearizable,
    NotLinearizable(Deepest),
    Undecided { steps: u64, reason: &'static str },
}

/// The deepest point the search reached before it had to backtrack.
#[derive(Debug, Default)]
struct Deepest {
    /// How many operations were linearized.
    depth: usize,
    /// The last few of them, in order.
    tail: Vec<usize>,
    /// The state after them.
    state: State,
    /// The operation that set the value in that state.
    last_writer: Option<usize>,
    /// The operation whose return forced the backtrack.
    blocked: Option<usize>,
    /// The operations that could have come next, none of which fit.
    candidates: Vec<usize>,
    /// An operation still to come that needs the register as it is now or
    /// earlier, which forbids every change from here.
    held_back_by: Option<usize>,
}

/// Groups of operations that never returned and do exactly the same thing
/// (the same effect, once the values no read observed are merged). If a
/// linearization places a later-invoked member of a group where an
/// earlier-invoked one is still pending, swapping the two gives another
/// valid linearization, so the search linearizes each group's members in
/// invocation order only. Without this, k writes that timed out and never
/// took effect would be tried in all 2^k subsets at every point of the
/// history.
#[derive(Debug)]
struct Interchangeable {
    group_of: Vec<Option<usize>>,
    /// Each group's members in invocation order (the entry list's order).
    members: Vec<Vec<usize>>,
    /// How many of each group's members are linearized.
    linearized: Vec<usize>,
}

impl Interchangeable {
    fn new(operations: &[SearchOperation<'_>]) -> Interchangeable {
        let mut pending: Vec<usize> = (0..operations.len())
            .filter(|&index| operations[index].returned_ns.is_none())
            .collect();
        pending.sort_by_key(|&index| (operations[index].invoked_ns, index));
        let mut groups: HashMap<Effect, usize> = HashMap::new();
        let mut interchangeable = Interchangeable {
            group_of: vec![None; operations.len()],
            members: Vec::new(),
            linearized: Vec::new(),
        };
        for index in pending {
            let next_group = groups.len();
            let group = *groups.entry(operations[index].effect).or_insert(next_group);
            if group == interchangeable.members.len() {
                interchangeable.members.push(Vec::new());
                interchangeable.linearized.push(0);
            }
            interchangeable.members[group].push(index);
            interchangeable.group_of[index] = Some(group);
        }
        interchangeable
    }

    /// Whether `operation` is the next of its group to linearize.
    fn allows(&self, operation: usize) -> bool {
        match self.group_of.get(operation).copied().flatten() {
            None => true,
            Some(group) => {
                self.members[group].get(self.linearized[group]).copied() == Some(operation)
            }
        }
    }

    fn linearize(&mut self, operation: usize) {
        if let Some(group) = self.group_of.get(operation).copied().flatten() {
            self.linearized[group] += 1;
        }
    }

    fn unlinearize(&mut self, operation: usize) {
        if let Some(group) = self.group_of.get(operation).copied().flatten() {
            self.linearized[group] = self.linearized[group].saturating_sub(1);
        }
    }
}

/// A fixed-size set of operation indexes.
#[derive(Debug, Clone)]
struct Bitset {
    words: Vec<u64>,
}

impl Bitset {
    fn new(bits: usize) -> Bitset {
        Bitset {
            words: vec![0; bits.div_ceil(64)],
        }
    }

    fn set(&mut self, bit: usize) {
        if let Some(word) = self.words.get_mut(bit / 64) {
            *word |= 1 << (bit % 64);
        }
    }

    fn clear(&mut self, bit: usize) {
        if let Some(word) = self.words.get_mut(bit / 64) {
            *word &= !(1 << (bit % 64));
        }
    }
}

/// The value that means "no entry" in [`EntryList`]'s links.
const NONE: usize = usize::MAX;

/// The call and return entries of a key's operations in time order (calls
/// before returns at the same instant, so touching operations count as
/// concurrent), as a doubly linked list in arrays from which a linearized
/// operation's two entries are lifted and later put back.
///
/// Entry `i` is the call (`i < n`) or the return (`i >= n`) of operation
/// `i % n`; index `2n` is the head sentinel.
#[derive(Debug)]
struct EntryList {
    operations: usize,
    next: Vec<usize>,
    previous: Vec<usize>,
    has_return: Vec<bool>,
}

impl EntryList {
    fn new(operations: &[SearchOperation<'_>]) -> EntryList {
        let count = operations.len();
        let head = 2 * count;
        // (time, returns after calls, operation index) orders the entries.
        let mut entries: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * count);
        for (index, operation) in operations.iter().enumerate() {
            entries.push((operation.invoked_ns, false, index));
            if let Some(returned) = operation.returned_ns {
                entries.push((returned, true, index));
            }
        }
        entries.sort_unstable();
        let mut list = EntryList {
            operations: count,
            next: vec![NONE; head + 1],
            previous: vec![NONE; head + 1],
            has_return: operations
                .iter()
                .map(|operation| operation.returned_ns.is_some())
                .collect(),
        };
        let mut last = head;
        for (_, is_return, index) in entries {
            let entry = if is_return { index + count } else { index };
            list.next[last] = entry;
            list.previous[entry] = last;
            last = entry;
        }
        list
    }

    fn head(&self) -> usize {
        2 * self.operations
    }

    fn first(&self) -> Option<usize> {
        self.link(self.next[self.head()])
    }

    fn next(&self, entry: usize) -> Option<usize> {
        self.link(self.next[entry])
    }

    fn link(&self, entry: usize) -> Option<usize> {
        (entry != NONE).then_some(entry)
    }

    fn is_call(&self, entry: usize) -> bool {
        entry < self.operations
    }

    fn operation_of(&self, entry: usize) -> usize {
        entry % self.operations.max(1)
    }

    fn call_entry_of(&self, operation: usize) -> usize {
        operation
    }

    fn return_entry_of(&self, operation: usize) -> Option<usize> {
        self.has_return
            .get(operation)
            .copied()
            .unwrap_or(false)
            .then_some(operation + self.operations)
    }

    /// The operations whose calls are still in the list before `end` (all
    /// of them, if `end` is `None`).
    fn calls_before(&self, end: Option<usize>) -> Vec<usize> {
        let mut calls = Vec::new();
        let mut entry = self.first();
        while let Some(current) = entry {
            if Some(current) == end {
                break;
            }
            if self.is_call(current) {
                calls.push(self.operation_of(current));
            }
            entry = self.next(current);
        }
        calls
    }

    fn unlink(&mut self, entry: usize) {
        let (previous, next) = (self.previous[entry], self.next[entry]);
        self.next[previous] = next;
        if next != NONE {
            self.previous[next] = previous;
        }
    }

    fn relink(&mut self, entry: usize) {
        let (previous, next) = (self.previous[entry], self.next[entry]);
        self.next[previous] = entry;
        if next != NONE {
            self.previous[next] = entry;
        }
    }

    /// Removes an operation's call entry and its return entry.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        if let Some(ret) = self.return_entry_of(self.operation_of(call)) {
            self.unlink(ret);
        }
    }

    /// Puts back what the latest [`EntryList::lift`] of `call` removed.
    fn unlift(&mut self, call: usize) {
        if let Some(ret) = self.return_entry_of(self.operation_of(call)) {
            self.relink(ret);
        }
        self.relink(call);
    }
}

/// A fast hasher for the cache's keys (words of a bitset and a small
/// state); the keys are not chosen by an adversary, so it need not resist
/// collisions by design.
#[derive(Debug, Default)]
struct WordHasher {
    hash: u64,
}

impl WordHasher {
    const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

    fn mix(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(Self::MULTIPLIER);
    }
}

impl Hasher for WordHasher {
    fn finish(&self) -> u64 {
        self.hash ^ (self.hash >> 29)
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
        for &byte in chunks.remainder() {
            self.mix(u64::from(byte));
        }
    }

    fn write_u8(&mut self, value: u8) {
        self.mix(u64::from(value));
    }

    fn write_u32(&mut self, value: u32) {
        self.mix(u64::from(value));
    }

    fn write_u64(&mut self, value: u64) {
        self.mix(value);
    }

    fn write_usize(&mut self, value: usize) {
        self.mix(value as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::testing::{failed, op, unknown};
    use crate::history::{ClientId, Record};

    const KEY: &str = "/r/k";

    fn written(version: u64) -> Outcome {
        Outcome::Written {
            version,
            revision: 100 + version,
        }
    }

    fn create(
        id: u64,
        client: ClientId,
        span: (u64, Option<u64>),
        value: &str,
        outcome: Outcome,
    ) -> Record {
        let call = Call::Create {
            key: KEY.into(),
            value: value.into(),
        };
        op(id, client, span.0, span.1, call, outcome)
    }

    fn write(
        id: u64,
        client: ClientId,
        span: (u64, Option<u64>),
        value: &str,
        outcome: Outcome,
    ) -> Record {
        let call = Call::Write {
            key: KEY.into(),
            value: value.into(),
        };
        op(id, client, span.0, span.1, call, outcome)
    }

    fn cas(
        id: u64,
        client: ClientId,
        span: (u64, Option<u64>),
        expected: u64,
        value: &str,
        outcome: Outcome,
    ) -> Record {
        let call = Call::CompareAndSet {
            key: KEY.into(),
            expected_version: expected,
            value: value.into(),
        };
        op(id, client, span.0, span.1, call, outcome)
    }

    fn read(id: u64, client: ClientId, span: (u64, u64), value: Option<(&str, u64)>) -> Record {
        let outcome = Outcome::Read {
            value: value.map(|(text, version)| (text.to_string(), version)),
        };
        op(
            id,
            client,
            span.0,
            Some(span.1),
            Call::Read { key: KEY.into() },
            outcome,
        )
    }

    fn verdict(records: Vec<Record>) -> Verdict {
        check(&History { records }, Duration::from_secs(10))
    }

    #[test]
    fn accepts_a_sequential_history() {
        let verdict = verdict(vec![
            read(1, 1, (0, 1), None),
            create(2, 1, (2, Some(3)), "a", written(0)),
            read(3, 2, (4, 5), Some(("a", 0))),
            write(4, 2, (6, Some(7)), "b", written(1)),
            cas(5, 1, (8, Some(9)), 1, "c", written(2)),
            cas(6, 2, (10, Some(11)), 1, "d", Outcome::VersionMismatch),
            read(7, 1, (12, 13), Some(("c", 2))),
            // Failed operations did nothing.
            create(8, 3, (14, Some(15)), "e", failed()),
            write(9, 3, (14, Some(15)), "f", failed()),
        ]);
        assert!(verdict.passed, "{verdict}");
        assert_eq!(verdict.checked, 7);
    }

    #[test]
    fn accepts_concurrent_operations_in_a_different_order() {
        // The write of "b" and the reads overlap: the first read may see
        // the old value although it completed after the write was invoked,
        // and the second may see the new one although it started before
        // the write completed.
        let verdict = verdict(vec![
            create(1, 1, (0, Some(1)), "a", written(0)),
            write(2, 1, (10, Some(50)), "b", written(1)),
            read(3, 2, (12, 20), Some(("a", 0))),
            read(4, 3, (15, 30), Some(("b", 1))),
            read(5, 2, (21, 40), Some(("b", 1))),
        ]);
        assert!(verdict.passed, "{verdict}");
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_reported() {
        let verdict = verdict(vec![
            create(1, 1, (0, Some(1)), "a", written(0)),
            write(2, 1, (10, Some(20)), "b", written(1)),
            read(3, 2, (30, 40), Some(("a", 0))),
        ]);
        assert!(!verdict.passed);
        assert_eq!(verdict.problems.len(), 1, "{verdict}");
        let problem = &verdict.problems[0];
        assert!(problem.contains("key /r/k: not linearizable"), "{problem}");
        assert!(
            problem.contains("longest linearizable prefix found has 1 operations"),
            "{problem}"
        );
        assert!(
            problem.contains("the register is \"a\" at version 0 (written by op 1)"),
            "{problem}"
        );
        assert!(
            problem.contains("op 2 (client 1, 0.000000010s -> 0.000000020s): write /r/k"),
            "{problem}"
        );
        assert!(problem.contains("needs the register as it is or earlier:\n  op 3 (client 2, 0.000000030s -> 0.000000040s): read /r/k => \"a\" version 0"), "{problem}");
        assert!(
            problem.contains("op 2 had to take effect by 0.000000020s"),
            "{problem}"
        );
    }

    #[test]
    fn a_read_of_a_value_never_written_is_reported() {
        let verdict = verdict(vec![
            create(1, 1, (0, Some(1)), "a", written(0)),
            read(2, 2, (5, 6), Some(("z", 0))),
        ]);
        assert!(!verdict.passed, "{verdict}");
    }

    #[test]
    fn a_lost_acknowledged_write_is_reported() {
        // The write of "b" was acknowledged, yet a later write and read
        // build on "a" as if it never happened.
        let verdict = verdict(vec![
            create(1, 1, (0, Some(1)), "a", written(0)),
            write(2, 1, (10, Some(20)), "b", written(1)),
            cas(3, 2, (30, Some(40)), 0, "c", written(1)),
            read(4, 2, (50, 60), Some(("c", 1))),
        ]);
        assert!(!verdict.passed, "{verdict}");
    }

    #[test]
    fn wrong_versions_and_refusals_are_reported() {
        let wrong_version = verdict(vec![
            create(1, 1, (0, Some(1)), "a", written(0)),
            write(2, 1, (10, Some(20)), "b", written(5)),
        ]);
        assert!(!wrong_version.passed, "{wrong_version}");
        let wrong_refusal = verdict(vec![
            create(1, 1, (0, Some(1)), "a", written(0)),
            cas(2, 1, (10, Some(20)), 0, "b", Outcome::VersionMismatch),
        ]);
        assert!(!wrong_refusal.passed, "{wrong_refusal}");
        let write_without_node = verdict(vec![write(1, 1, (0, Some(1)), "a", written(1))]);
        assert!(!write_without_node.passed, "{write_without_node}");
        let second_create = verdict(vec![
            create(1, 1, (0, Some(1)), "a", written(0)),
            create(2, 2, (5, Some(6)), "b", written(0)),
        ]);
        assert!(!second_create.passed, "{second_create}");
    }

    #[test]
    fn a_read_may_observe_an_indeterminate_write() {
        let verdict = verdict(vec![
            create(1, 1, (0, Some(1)), "a", written(0)),
            write(2, 1, (10, None), "b", unknown()),
            read(3, 2, (1_000, 1_010), Some(("b", 1))),
            write(4, 2, (1_020, Some(1_030)), "c", written(2)),
        ]);
        assert!(verdict.passed, "{verdict}");
    }

    #[test]
    fn an_indeterminate_write_may_never_happen_or_happen_late() {
        let never = verdict(vec![
            create(1, 1, (0, Some(1)), "a", written(0)),
            write(2, 1, (10, None), "b", unknown()),
            cas(3, 1, (20, None), 0, "x", unknown()),
            read(4, 2, (1_000, 1_010), Some(("a", 0))),
        ]);
        assert!(never.passed, "{never}");
        let late = verdict(vec![
            create(1, 1, (0, Some(1)), "a", written(0)),
            write(2, 1, (10, None), "b", unknown()),
            read(3, 2, (1_000, 1_010), Some(("a", 0))),
            read(4, 2, (2_000, 2_010), Some(("b", 1))),
        ]);
        assert!(late.passed, "{late}");
        let create_unknown = verdict(vec![
            create(1, 1, (0, None), "a", unknown()),
            read(2, 2, (10, 20), None),
            read(3, 2, (30, 40), Some(("a", 0))),
        ]);
        assert!(create_unknown.passed, "{create_unknown}");
    }

    #[test]
    fn an_indeterminate_write_cannot_take_effect_before_its_invocation() {
        let verdict = verdict(vec![
            create(1, 1, (0, Some(1)), "a", written(0)),
            read(2, 2, (10, 20), Some(("b", 1))),
            write(3, 1, (30, None), "b", unknown()),
        ]);
        assert!(!verdict.passed, "{verdict}");
    }

    #[test]
    fn odd_answers_are_problems_not_panics() {
        let verdict = verdict(vec![
            op(1, 1, 0, Some(1), Call::Read { key: KEY.into() }, written(0)),
            op(
                2,
                1,
                5,
                Some(2),
                Call::Read { key: KEY.into() },
                Outcome::Read { value: None },
            ),
            op(
                3,
                1,
                6,
                None,
                Call::Read { key: KEY.into() },
                Outcome::Read { value: None },
            ),
        ]);
        assert!(!verdict.passed);
        assert_eq!(verdict.problems.len(), 3, "{verdict}");
    }

    /// A tiny deterministic generator for the generated histories.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, bound: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % bound.max(1)
        }
    }

    /// A valid history of `count` operations on one key by `clients`
    /// clients, each of which has one operation in flight at a time; about
    /// `indeterminate_percent` of the writes time out (half of those take
    /// effect).
    fn generated_history(
        count: usize,
        clients: u32,
        indeterminate_percent: u64,
        seed: u64,
    ) -> History {
        let mut rng = Rng(seed | 1);
        // (linearization point, client, invoked, completed)
        let mut planned = Vec::new();
        let mut next_free = vec![0u64; clients as usize];
        for index in 0..count {
            let client = index as u32 % clients;
            let invoked = next_free[client as usize] + rng.below(50);
            let point = invoked + 1 + rng.below(100);
            let completed = point + 1 + rng.below(100);
            next_free[client as usize] = completed + 1;
            planned.push((point * 64 + u64::from(client), client, invoked, completed));
        }
        planned.sort_unstable();
        let mut state: Option<(String, u64)> = None;
        let mut records = Vec::new();
        for (id, (_, client, invoked, completed)) in planned.into_iter().enumerate() {
            let id = id as u64;
            let value = format!("v{id}");
            let choice = rng.below(10);
            let times_out = rng.below(100) < indeterminate_percent;
            let takes_effect = !times_out || rng.below(2) == 0;
            let read_completed = completed;
            let completed = (!times_out).then_some(completed);
            let record = match (&mut state, choice) {
                (None, 0..=3) => op(
                    id,
                    client,
                    invoked,
                    Some(read_completed),
                    Call::Read { key: KEY.into() },
                    Outcome::Read { value: None },
                ),
                (None, _) => {
                    if takes_effect {
                        state = Some((value.clone(), 0));
                    }
                    let outcome = if times_out { unknown() } else { written(0) };
                    create(id, client, (invoked, completed), &value, outcome)
                }
                (Some(current), 0..=3) => {
                    let observed = Some(current.clone());
                    op(
                        id,
                        client,
                        invoked,
                        Some(read_completed),
                        Call::Read { key: KEY.into() },
                        Outcome::Read { value: observed },
                    )
                }
                (Some(current), 4..=6) => {
                    let version = current.1 + 1;
                    if takes_effect {
                        *current = (value.clone(), version);
                    }
                    let outcome = if times_out {
                        unknown()
                    } else {
                        written(version)
                    };
                    write(id, client, (invoked, completed), &value, outcome)
                }
                (Some(current), _) => {
                    let expected = current.1.saturating_sub(rng.below(2));
                    let outcome = if expected != current.1 {
                        if times_out {
                            unknown()
                        } else {
                            Outcome::VersionMismatch
                        }
                    } else {
                        let version = current.1 + 1;
                        if takes_effect {
                            *current = (value.clone(), version);
                        }
                        if times_out {
                            unknown()
                        } else {
                            written(version)
                        }
                    };
                    cas(id, client, (invoked, completed), expected, &value, outcome)
                }
            };
            records.push(record);
        }
        History { records }
    }

    #[test]
    fn a_long_concurrent_history_checks_quickly() {
        let history = generated_history(5_000, 10, 0, 7);
        let started = Instant::now();
        let verdict = check(&history, Duration::from_secs(30));
        let elapsed = started.elapsed();
        println!("5000 operations, 10 clients: {elapsed:?}");
        assert!(verdict.passed, "{verdict}");
        assert_eq!(verdict.checked, 5_000);
        if !cfg!(debug_assertions) {
            assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
        }
    }

    #[test]
    fn a_long_history_with_timeouts_checks_quickly() {
        let history = generated_history(5_000, 10, 2, 11);
        let started = Instant::now();
        let verdict = check(&history, Duration::from_secs(30));
        let elapsed = started.elapsed();
        println!("5000 operations, 10 clients, 2% timeouts: {elapsed:?}");
        assert!(verdict.passed, "{verdict}");
        if !cfg!(debug_assertions) {
            assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
        }
    }

    #[test]
    fn a_corrupted_long_history_is_reported() {
        let mut history = generated_history(2_000, 10, 0, 5);
        // Make one read in the middle return a value from long ago.
        let mut reads = history
            .records
            .iter_mut()
            .filter_map(|record| match record {
                Record::Operation(Operation {
                    outcome: Outcome::Read { value: Some(value) },
                    ..
                }) => Some(value),
                _ => None,
            });
        let early = reads.nth(10).cloned();
        let late = reads.nth(400);
        if let (Some(early), Some(late)) = (early, late) {
            *late = early;
        }
        let verdict = check(&history, Duration::from_secs(30));
        assert!(!verdict.passed, "{verdict}");
        assert!(
            verdict.problems[0].contains("not linearizable"),
            "{verdict}"
        );
    }

    /// The register model straight from calls and answers, for the brute
    /// force: the state after `operation`, or `None` if it cannot happen.
    fn model_step(
        state: &Option<(String, u64)>,
        operation: &Operation,
    ) -> Option<Option<(String, u64)>> {
        let determinate = operation.is_determinate();
        match (&operation.call, &operation.outcome, state) {
            (Call::Read { .. }, Outcome::Read { value }, state) => {
                (value == state).then(|| state.clone())
            }
            (
                Call::Create { value, .. },
                Outcome::Written { version: 0, .. } | Outcome::Indeterminate { .. },
                None,
            ) => Some(Some((value.clone(), 0))),
            (Call::Write { value, .. }, outcome, Some((_, current))) => match outcome {
                Outcome::Written { version, .. } if *version == current + 1 => {
                    Some(Some((value.clone(), current + 1)))
                }
                Outcome::Indeterminate { .. } => Some(Some((value.clone(), current + 1))),
                _ => None,
            },
            (
                Call::CompareAndSet {
                    expected_version,
                    value,
                    ..
                },
                outcome,
                Some((_, current)),
            ) => match outcome {
                Outcome::Written { version, .. }
                    if current == expected_version && *version == current + 1 =>
                {
                    Some(Some((value.clone(), current + 1)))
                }
                Outcome::Indeterminate { .. } if current == expected_version && !determinate => {
                    Some(Some((value.clone(), current + 1)))
                }
                Outcome::VersionMismatch if current != expected_version => Some(state.clone()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether some order of (a subset of the indeterminate) operations
    /// explains the history, by trying them all.
    fn brute_force(
        operations: &[Operation],
        placed: &mut Vec<bool>,
        state: &Option<(String, u64)>,
    ) -> bool {
        let pending_required = |placed: &[bool], index: usize| {
            !placed[index] && operations[index].completed_ns.is_some()
        };
        if !(0..operations.len()).any(|index| pending_required(placed, index)) {
            return true;
        }
        for next in 0..operations.len() {
            if placed[next] {
                continue;
            }
            let invoked = operations[next].invoked_ns;
            let blocked = (0..operations.len()).any(|other| {
                other != next
                    && pending_required(placed, other)
                    && operations[other].completed_ns < Some(invoked)
            });
            if blocked {
                continue;
            }
            if let Some(after) = model_step(state, &operations[next]) {
                placed[next] = true;
                let found = brute_force(operations, placed, &after);
                placed[next] = false;
                if found {
                    return true;
                }
            }
        }
        false
    }

    /// A small random history: mostly plausible answers, often wrong ones.
    fn random_small_history(rng: &mut Rng) -> Vec<Operation> {
        let count = 2 + rng.below(6) as usize;
        let values = ["a", "b", "c"];
        (0..count)
            .map(|index| {
                let invoked = rng.below(30);
                let indeterminate = rng.below(5) == 0;
                let completed = (!indeterminate).then(|| invoked + rng.below(15));
                let value = values[rng.below(3) as usize].to_string();
                let version = rng.below(3);
                let written = Outcome::Written {
                    version,
                    revision: 0,
                };
                let (call, outcome) = match rng.below(4) {
                    0 => (
                        Call::Create {
                            key: KEY.into(),
                            value,
                        },
                        if rng.below(4) == 0 {
                            failed()
                        } else {
                            written.clone()
                        },
                    ),
                    1 => {
                        let observed = (rng.below(4) != 0)
                            .then(|| (values[rng.below(3) as usize].to_string(), rng.below(3)));
                        (
                            Call::Read { key: KEY.into() },
                            Outcome::Read { value: observed },
                        )
                    }
                    2 => (
                        Call::Write {
                            key: KEY.into(),
                            value,
                        },
                        written.clone(),
                    ),
                    _ => {
                        let outcome = if rng.below(3) == 0 {
                            Outcome::VersionMismatch
                        } else {
                            written.clone()
                        };
                        (
                            Call::CompareAndSet {
                                key: KEY.into(),
                                expected_version: rng.below(3),
                                value,
                            },
                            outcome,
                        )
                    }
                };
                let outcome = if indeterminate && !matches!(call, Call::Read { .. }) {
                    unknown()
                } else {
                    outcome
                };
                let completed = if matches!(call, Call::Read { .. }) {
                    Some(completed.unwrap_or(invoked + 3))
                } else {
                    completed
                };
                Operation {
                    id: index as u64,
                    client: index as u32,
                    invoked_ns: invoked,
                    completed_ns: completed,
                    call,
                    outcome,
                }
            })
            .collect()
    }

    #[test]
    fn agrees_with_brute_force_on_small_histories() {
        let mut rng = Rng(0x5eed);
        let (mut linearizable, mut not) = (0, 0);
        for round in 0..20_000 {
            let operations = if round % 2 == 0 {
                random_small_history(&mut rng)
            } else {
                let count = 3 + rng.below(6) as usize;
                let seed = rng.below(u64::MAX);
                let history = generated_history(count, 3, 25, seed);
                let mut operations: Vec<Operation> = history.operations().cloned().collect();
                let (first, second) = (
                    rng.below(count as u64) as usize,
                    rng.below(count as u64) as usize,
                );
                if rng.below(2) == 0
                    && operations[first].is_determinate() == operations[second].is_determinate()
                {
                    let outcome = operations[first].outcome.clone();
                    operations[first].outcome = operations[second].outcome.clone();
                    operations[second].outcome = outcome;
                }
                operations
            };
            let searched: Vec<Operation> = operations
                .iter()
                .filter(|operation| !matches!(operation.outcome, Outcome::Failed { .. }))
                .cloned()
                .collect();
            let expected = brute_force(&searched, &mut vec![false; searched.len()], &None);
            let history = History {
                records: operations.iter().cloned().map(Record::Operation).collect(),
            };
            let verdict = check(&history, Duration::from_secs(10));
            assert_eq!(verdict.passed, expected, "{verdict}\n{operations:#?}");
            if expected {
                linearizable += 1
            } else {
                not += 1
            }
        }
        assert!(
            linearizable > 1_000 && not > 1_000,
            "{linearizable} linearizable, {not} not"
        );
    }

    /// Many concurrent writes with distinct observed values, all pending,
    /// then a read no order of them explains: every subset and order is
    /// worth trying.
    fn pathological(writes: u64) -> History {
        let mut records = vec![create(0, 0, (0, Some(1)), "start", written(0))];
        for id in 1..=writes {
            let outcome = unknown();
            records.push(write(
                id,
                id as u32,
                (10 + id, None),
                &format!("w{id}"),
                outcome,
            ));
            // Each value is observed, so the writes are all different.
            records.push(read(
                1_000 + id,
                0,
                (5_000 + 2 * id, 5_001 + 2 * id),
                Some((&format!("w{id}"), writes + 7)),
            ));
        }
        History { records }
    }

    #[test]
    fn an_undecided_key_is_a_failure() {
        let verdict = check(&pathological(20), Duration::ZERO);
        assert!(!verdict.passed);
        assert!(
            verdict.problems[0].contains("undecided within budget"),
            "{verdict}"
        );
        let verdict = check(&pathological(20), Duration::from_micros(50));
        assert!(!verdict.passed);
        assert!(
            verdict.problems[0].contains("undecided within budget"),
            "{verdict}"
        );
    }

    #[test]
    fn a_small_hard_key_is_decided() {
        let verdict = check(&pathological(6), Duration::from_secs(10));
        assert!(!verdict.passed);
        assert!(
            verdict.problems[0].contains("not linearizable"),
            "{verdict}"
        );
    }
}
