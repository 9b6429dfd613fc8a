//! Native locks and the elections built on them.
//!
//! A lock is named by a path (no node needs to exist there). Holders are
//! exclusive or shared; waiters queue in arrival order and only the head of
//! the queue is considered at each release, so one release wakes one
//! exclusive waiter (or a run of shared ones that can all hold together).
//! Each grant takes the next value of one global generation counter, which
//! is replicated state: a lock's generations strictly increase across
//! holders, restarts and leader changes.
//!
//! An election is a lock in its own kind: candidates queue as exclusive
//! waiters carrying a value, the holder is the leader, and every change of
//! holder fires `LeaderChanged` at the election's path.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use synod_proto::{Error, Event, EventType, LeaderInfo, LockMode, Revision, Sequencer, SessionId};

use super::path::PathKey;
use super::records::DirtyKeys;

/// What a lock's path is used for; a path serves one kind at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum LockKind {
    /// A plain lock.
    Lock,
    /// An election.
    Election,
}

/// A session holding a lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Holder {
    pub session: SessionId,
    pub mode: LockMode,
    pub generation: u64,
    pub lock_delay_ms: u64,
    pub value: Box<[u8]>,
}

/// A session waiting for a lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Waiter {
    pub session: SessionId,
    pub mode: LockMode,
    pub lock_delay_ms: u64,
    pub value: Box<[u8]>,
}

/// One lock's state. It exists while it has holders, waiters, or a
/// lock-delay that has not ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LockState {
    pub kind: LockKind,
    pub holders: Vec<Holder>,
    pub waiters: VecDeque<Waiter>,
    /// Nobody is granted the lock before this time.
    pub delayed_until_ms: u64,
}

/// A grant made to a session that was waiting: the replica wakes that
/// session's client with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockGrant {
    /// The session granted the lock.
    pub session: SessionId,
    /// Its fencing token.
    pub sequencer: Sequencer,
    /// Whether the lock is an election (the session now leads it).
    pub election: bool,
}

/// How an acquire ended.
pub(crate) enum Acquired {
    Granted(Sequencer),
    Queued { waiters_ahead: u64 },
}

/// What lock operations need from the command and produce.
pub(crate) struct LockEffects<'a> {
    pub revision: Revision,
    pub now_ms: u64,
    pub events: &'a mut Vec<Event>,
    pub grants: &'a mut Vec<LockGrant>,
    pub mutated: &'a mut bool,
}

/// All locks and elections.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct LockTable {
    locks: BTreeMap<PathKey, LockState>,
    /// The generation the next grant takes.
    next_generation: u64,
    /// Derived: (session, path) for every holder and waiter.
    by_session: BTreeSet<(SessionId, PathKey)>,
    /// Derived: (delayed_until_ms, path) for every lock in a lock-delay.
    delayed: BTreeSet<(u64, PathKey)>,
    /// Derived: waiters queued over all locks.
    waiter_count: u64,
    /// Locks changed since the last [`LockTable::take_dirty`].
    dirty: DirtyKeys<PathKey>,
}

impl LockTable {
    /// An empty table whose first grant has generation 1.
    pub fn new() -> Self {
        LockTable {
            next_generation: 1,
            ..LockTable::default()
        }
    }

    /// Rebuilds a table from its replicated parts, recomputing the indexes.
    pub fn from_parts(
        locks: BTreeMap<PathKey, LockState>,
        next_generation: u64,
    ) -> Result<Self, String> {
        let mut table = LockTable {
            locks,
            next_generation,
            by_session: BTreeSet::new(),
            delayed: BTreeSet::new(),
            waiter_count: 0,
            dirty: DirtyKeys::default(),
        };
        for (path, state) in &table.locks {
            for holder in &state.holders {
                if holder.generation >= next_generation {
                    return Err(format!("lock {path} has a generation from the future"));
                }
                table.by_session.insert((holder.session, path.clone()));
            }
            for waiter in &state.waiters {
                table.by_session.insert((waiter.session, path.clone()));
            }
            table.waiter_count += state.waiters.len() as u64;
            if state.holders.is_empty() && state.waiters.is_empty() && state.delayed_until_ms == 0 {
                return Err(format!("lock {path} is empty"));
            }
            if state.delayed_until_ms != 0 {
                table.delayed.insert((state.delayed_until_ms, path.clone()));
            }
        }
        Ok(table)
    }

    /// The locks changed since the last call, in path order.
    pub fn take_dirty(&mut self) -> Vec<PathKey> {
        self.dirty.take()
    }

    /// Marks every lock changed (a new state saves all of them).
    pub fn mark_all_dirty(&mut self) {
        for path in self.locks.keys() {
            self.dirty.mark(path.as_str());
        }
    }

    /// Waiters queued over all locks.
    pub fn waiter_count(&self) -> u64 {
        self.waiter_count
    }

    /// The lock at a path, if it is in use.
    pub fn get(&self, path: &str) -> Option<&LockState> {
        self.locks.get(path)
    }

    /// The replicated parts: the locks and the next generation.
    pub fn parts(&self) -> (&BTreeMap<PathKey, LockState>, u64) {
        (&self.locks, self.next_generation)
    }

    /// Sessions appearing as holders or waiters.
    pub fn sessions(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.by_session.iter().map(|(session, _)| *session)
    }

    /// Acquires a lock (or joins an election, for `LockKind::Election`).
    ///
    /// # Errors
    /// `BadArgument` when the path is used by the other kind,
    /// `LockAlreadyRequested`, and `LockBusy` when `wait` is false and the
    /// lock cannot be granted now.
    #[allow(clippy::too_many_arguments)]
    pub fn acquire(
        &mut self,
        session: SessionId,
        path: &str,
        kind: LockKind,
        mode: LockMode,
        wait: bool,
        lock_delay_ms: u64,
        value: &[u8],
        fx: &mut LockEffects<'_>,
    ) -> Result<Acquired, Error> {
        if let Some(state) = self.locks.get(path) {
            check_kind(path, state.kind, kind)?;
            let requested = state.holders.iter().any(|h| h.session == session)
                || state.waiters.iter().any(|w| w.session == session);
            if requested {
                return Err(Error::LockAlreadyRequested { path: path.into() });
            }
            let grantable = state.waiters.is_empty()
                && state.delayed_until_ms <= fx.now_ms
                && compatible(&state.holders, mode);
            if !grantable && !wait {
                return Err(Error::LockBusy { path: path.into() });
            }
        }
        let key: PathKey = PathKey::from(path);
        let state = self.locks.entry(key.clone()).or_insert_with(|| LockState {
            kind,
            holders: Vec::new(),
            waiters: VecDeque::new(),
            delayed_until_ms: 0,
        });
        *fx.mutated = true;
        self.dirty.mark(key.as_str());
        self.by_session.insert((session, key));
        let grantable = state.waiters.is_empty()
            && state.delayed_until_ms <= fx.now_ms
            && compatible(&state.holders, mode);
        if grantable {
            let generation = self.next_generation;
            self.next_generation += 1;
            state.holders.push(Holder {
                session,
                mode,
                generation,
                lock_delay_ms,
                value: Box::from(value),
            });
            if kind == LockKind::Election {
                fx.events.push(Event {
                    path: path.into(),
                    event_type: EventType::LeaderChanged,
                    revision: fx.revision,
                });
            }
            return Ok(Acquired::Granted(Sequencer {
                path: path.into(),
                mode,
                generation,
            }));
        }
        let waiters_ahead = state.waiters.len() as u64;
        self.waiter_count += 1;
        state.waiters.push_back(Waiter {
            session,
            mode,
            lock_delay_ms,
            value: Box::from(value),
        });
        Ok(Acquired::Queued { waiters_ahead })
    }

    /// Releases a held lock or cancels a wait, then grants the lock to the
    /// next waiters if they can have it now.
    ///
    /// # Errors
    /// `BadArgument` when the path is used by the other kind, `LockNotHeld`
    /// when the session neither holds nor waits for it.
    pub fn release(
        &mut self,
        session: SessionId,
        path: &str,
        kind: LockKind,
        fx: &mut LockEffects<'_>,
    ) -> Result<(), Error> {
        let Some(state) = self.locks.get_mut(path) else {
            return Err(Error::LockNotHeld { path: path.into() });
        };
        check_kind(path, state.kind, kind)?;
        let leader_before = leader_identity(state);
        if let Some(index) = state.holders.iter().position(|h| h.session == session) {
            state.holders.remove(index);
        } else if let Some(index) = state.waiters.iter().position(|w| w.session == session) {
            state.waiters.remove(index);
            self.waiter_count -= 1;
        } else {
            return Err(Error::LockNotHeld { path: path.into() });
        }
        *fx.mutated = true;
        let key: PathKey = PathKey::from(path);
        self.dirty.mark(key.as_str());
        self.by_session.remove(&(session, key.clone()));
        self.serve(&key, leader_before, fx);
        Ok(())
    }

    /// Releases every lock the session holds and cancels its waits. When
    /// `expired`, a holder's lock-delay starts now.
    pub fn end_session(&mut self, session: SessionId, expired: bool, fx: &mut LockEffects<'_>) {
        let start: (SessionId, PathKey) = (session, PathKey::default());
        let paths: Vec<PathKey> = self
            .by_session
            .range(start..)
            .take_while(|(owner, _)| *owner == session)
            .map(|(_, path)| path.clone())
            .collect();
        for path in paths {
            self.by_session.remove(&(session, path.clone()));
            let Some(state) = self.locks.get_mut(&path) else {
                continue;
            };
            *fx.mutated = true;
            self.dirty.mark(path.as_str());
            let leader_before = leader_identity(state);
            if let Some(index) = state.holders.iter().position(|h| h.session == session) {
                let holder = state.holders.remove(index);
                if expired && holder.lock_delay_ms > 0 {
                    let until_ms = fx.now_ms.saturating_add(holder.lock_delay_ms);
                    if until_ms > state.delayed_until_ms {
                        self.delayed.remove(&(state.delayed_until_ms, path.clone()));
                        state.delayed_until_ms = until_ms;
                        self.delayed.insert((until_ms, path.clone()));
                    }
                }
            }
            let waiting = state.waiters.len();
            state.waiters.retain(|w| w.session != session);
            self.waiter_count -= (waiting - state.waiters.len()) as u64;
            self.serve(&path, leader_before, fx);
        }
    }

    /// Ends every lock-delay that is over at `fx.now_ms` and grants those
    /// locks to their waiters.
    pub fn advance_time(&mut self, fx: &mut LockEffects<'_>) {
        while let Some((until_ms, path)) = self.delayed.first().cloned() {
            if until_ms > fx.now_ms {
                break;
            }
            self.delayed.remove(&(until_ms, path.clone()));
            *fx.mutated = true;
            self.dirty.mark(path.as_str());
            let leader_before = match self.locks.get_mut(&path) {
                Some(state) => {
                    state.delayed_until_ms = 0;
                    leader_identity(state)
                }
                None => continue,
            };
            self.serve(&path, leader_before, fx);
        }
    }

    /// Grants the lock to waiters at the head of the queue while they are
    /// compatible with the holders, reports a change of leader, and drops the
    /// lock's state once it is unused.
    fn serve(
        &mut self,
        path: &str,
        leader_before: Option<(SessionId, u64)>,
        fx: &mut LockEffects<'_>,
    ) {
        let Some(state) = self.locks.get_mut(path) else {
            return;
        };
        if state.delayed_until_ms <= fx.now_ms {
            while let Some(head) = state.waiters.front() {
                if !compatible(&state.holders, head.mode) {
                    break;
                }
                let Some(waiter) = state.waiters.pop_front() else {
                    break;
                };
                self.waiter_count -= 1;
                let generation = self.next_generation;
                self.next_generation += 1;
                let sequencer = Sequencer {
                    path: path.to_string(),
                    mode: waiter.mode,
                    generation,
                };
                fx.grants.push(LockGrant {
                    session: waiter.session,
                    sequencer,
                    election: state.kind == LockKind::Election,
                });
                state.holders.push(Holder {
                    session: waiter.session,
                    mode: waiter.mode,
                    generation,
                    lock_delay_ms: waiter.lock_delay_ms,
                    value: waiter.value,
                });
            }
        }
        if state.kind == LockKind::Election && leader_identity(state) != leader_before {
            fx.events.push(Event {
                path: path.to_string(),
                event_type: EventType::LeaderChanged,
                revision: fx.revision,
            });
        }
        if state.holders.is_empty()
            && state.waiters.is_empty()
            && state.delayed_until_ms <= fx.now_ms
        {
            if state.delayed_until_ms != 0 {
                self.delayed
                    .remove(&(state.delayed_until_ms, PathKey::from(path)));
            }
            self.locks.remove(path);
        }
    }

    /// Whether the token names a current grant: a session holds the lock at
    /// that generation and mode.
    pub fn is_current(&self, sequencer: &Sequencer) -> bool {
        self.locks
            .get(sequencer.path.as_str())
            .is_some_and(|state| {
                state
                    .holders
                    .iter()
                    .any(|h| h.generation == sequencer.generation && h.mode == sequencer.mode)
            })
    }

    /// The leader of an election, if any.
    ///
    /// # Errors
    /// `BadArgument` when the path is a plain lock.
    pub fn leader(&self, path: &str) -> Result<Option<LeaderInfo>, Error> {
        let Some(state) = self.locks.get(path) else {
            return Ok(None);
        };
        check_kind(path, state.kind, LockKind::Election)?;
        Ok(state.holders.first().map(|holder| LeaderInfo {
            session: holder.session,
            value: holder.value.to_vec(),
            sequencer: Sequencer {
                path: path.into(),
                mode: holder.mode,
                generation: holder.generation,
            },
        }))
    }
}

/// Whether a request in `mode` can hold the lock beside `holders`.
fn compatible(holders: &[Holder], mode: LockMode) -> bool {
    holders.is_empty()
        || (mode == LockMode::Shared && holders.iter().all(|h| h.mode == LockMode::Shared))
}

fn leader_identity(state: &LockState) -> Option<(SessionId, u64)> {
    state.holders.first().map(|h| (h.session, h.generation))
}

fn check_kind(path: &str, actual: LockKind, wanted: LockKind) -> Result<(), Error> {
    match (actual, wanted) {
        (LockKind::Lock, LockKind::Election) => Err(Error::bad_argument(format!(
            "{path} is a lock, not an election; use acquire/release on it, or campaign on another path"
        ))),
        (LockKind::Election, LockKind::Lock) => Err(Error::bad_argument(format!(
            "{path} is an election, not a lock; use campaign/resign on it, or lock another path"
        ))),
        _ => Ok(()),
    }
}

impl LockTable {
    /// The earliest end of a running lock-delay.
    pub fn next_delay_end_ms(&self) -> Option<u64> {
        self.delayed.first().map(|(until_ms, _)| *until_ms)
    }
}
