//! Watches live on the replica that serves a client, not in the log. This
//! module is that per-replica registry: which sessions watch what, which
//! watches an applied command's events fire, and what a reconnecting client
//! missed, computed from a bounded history of events.
//!
//! Semantics follow ZooKeeper (see [`synod_proto::EventType`] for the table):
//! data, exists and children watches are one-shot and are removed when they
//! fire; persistent recursive and leader watches stay until removed. A
//! session gets at most one notification per event, however many of its
//! watches match it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use synod_proto::{Error, Event, EventType, Revision, SessionId, WatchKind};

use super::path::{parent, validate_path};

/// An event to deliver to one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The session to deliver to.
    pub session: SessionId,
    /// The event.
    pub event: Event,
}

/// The watches registered on one replica, per session, with bounds per
/// session in count and in path bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchRegistry {
    watchers: BTreeMap<(String, WatchKind), BTreeSet<SessionId>>,
    by_session: BTreeMap<SessionId, BTreeSet<(String, WatchKind)>>,
    path_bytes_by_session: BTreeMap<SessionId, u64>,
    watches_per_session_max: u64,
    path_bytes_per_session_max: u64,
    path_bytes_max: u64,
}

impl WatchRegistry {
    /// An empty registry allowing each session `watches_per_session_max`
    /// watches whose paths add up to at most `path_bytes_per_session_max`
    /// bytes, each a valid path of at most `path_bytes_max` bytes.
    pub fn new(
        watches_per_session_max: u64,
        path_bytes_per_session_max: u64,
        path_bytes_max: u64,
    ) -> Self {
        WatchRegistry {
            watchers: BTreeMap::new(),
            by_session: BTreeMap::new(),
            path_bytes_by_session: BTreeMap::new(),
            watches_per_session_max,
            path_bytes_per_session_max,
            path_bytes_max,
        }
    }

    /// Bytes of watched paths held for `session`.
    pub fn path_bytes_of(&self, session: SessionId) -> u64 {
        self.path_bytes_by_session
            .get(&session)
            .copied()
            .unwrap_or(0)
    }

    /// The number of watches registered, over all sessions.
    pub fn len(&self) -> u64 {
        self.by_session.values().map(|set| set.len() as u64).sum()
    }

    /// Whether no watch is registered.
    pub fn is_empty(&self) -> bool {
        self.by_session.values().all(|set| set.is_empty())
    }

    /// Registers a watch (registering the same watch twice is one watch).
    ///
    /// # Errors
    /// `BadArgument` for a path that is not valid (the checks every request
    /// gets), `LimitExceeded` when the session already has the maximum
    /// number of watches, or the path would take its watched path bytes past
    /// the bound.
    pub fn add(&mut self, session: SessionId, path: &str, kind: WatchKind) -> Result<(), Error> {
        validate_path(path, self.path_bytes_max)?;
        let mine = self.by_session.entry(session).or_default();
        let key = (path.to_owned(), kind);
        if mine.contains(&key) {
            return Ok(());
        }
        let max = self.watches_per_session_max;
        if mine.len() as u64 >= max {
            return Err(Error::limit_exceeded(
                "watches_per_session_max",
                max,
                format!("session {session} already has {max} watches; remove some first"),
            ));
        }
        let bytes = self.path_bytes_by_session.entry(session).or_insert(0);
        let max = self.path_bytes_per_session_max;
        if bytes.saturating_add(path.len() as u64) > max {
            return Err(Error::limit_exceeded(
                "watch_path_bytes_per_session_max",
                max,
                format!(
                    "session {session} already watches paths of {bytes} bytes in all; \
                     remove some watches first"
                ),
            ));
        }
        *bytes += path.len() as u64;
        mine.insert(key.clone());
        self.watchers.entry(key).or_default().insert(session);
        Ok(())
    }

    /// Removes a watch; returns whether it was registered.
    pub fn remove(&mut self, session: SessionId, path: &str, kind: WatchKind) -> bool {
        let key = (path.to_owned(), kind);
        let removed = self
            .by_session
            .get_mut(&session)
            .is_some_and(|mine| mine.remove(&key));
        if removed {
            self.forget(session, &key);
            if self
                .by_session
                .get(&session)
                .is_some_and(|mine| mine.is_empty())
            {
                self.by_session.remove(&session);
            }
        }
        removed
    }

    /// Removes every watch of a session (it ended or disconnected).
    pub fn remove_session(&mut self, session: SessionId) {
        for key in self.by_session.remove(&session).unwrap_or_default() {
            self.forget(session, &key);
        }
    }

    /// The watches of a session, sorted.
    pub fn watches_of(&self, session: SessionId) -> Vec<(String, WatchKind)> {
        self.by_session
            .get(&session)
            .map(|mine| mine.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Which sessions the events notify, in event order (sessions ascending
    /// within an event). One-shot watches that fire are removed.
    pub fn dispatch(&mut self, events: &[Event]) -> Vec<Notification> {
        let mut notifications = Vec::new();
        for event in events {
            let mut sessions: BTreeSet<SessionId> = BTreeSet::new();
            let mut fired_one_shot: Vec<(SessionId, (String, WatchKind))> = Vec::new();
            for kind in [
                WatchKind::Data,
                WatchKind::Exists,
                WatchKind::Children,
                WatchKind::Leader,
            ] {
                if !kind.fires_on(&event.path, &event.path, event.event_type) {
                    continue;
                }
                let key = (event.path.clone(), kind);
                if let Some(watchers) = self.watchers.get(&key) {
                    for session in watchers {
                        sessions.insert(*session);
                        if !kind.is_persistent() {
                            fired_one_shot.push((*session, key.clone()));
                        }
                    }
                }
            }
            if WatchKind::PersistentRecursive.fires_on(&event.path, &event.path, event.event_type) {
                let mut ancestor = Some(event.path.as_str());
                while let Some(path) = ancestor {
                    let key = (path.to_owned(), WatchKind::PersistentRecursive);
                    if let Some(watchers) = self.watchers.get(&key) {
                        sessions.extend(watchers.iter().copied());
                    }
                    ancestor = parent(path);
                }
            }
            for (session, key) in fired_one_shot {
                self.remove(session, &key.0, key.1);
            }
            notifications.extend(sessions.into_iter().map(|session| Notification {
                session,
                event: event.clone(),
            }));
        }
        notifications
    }

    /// Drops `key` from the watchers of `session`, which no longer holds it.
    fn forget(&mut self, session: SessionId, key: &(String, WatchKind)) {
        if let Some(bytes) = self.path_bytes_by_session.get_mut(&session) {
            *bytes = bytes.saturating_sub(key.0.len() as u64);
            if *bytes == 0 || !self.by_session.contains_key(&session) {
                self.path_bytes_by_session.remove(&session);
            }
        }
        if let Some(watchers) = self.watchers.get_mut(key) {
            watchers.remove(&session);
            if watchers.is_empty() {
                self.watchers.remove(key);
            }
        }
    }
}

/// A bounded history of recent events, in revision order, kept by a replica
/// so a reconnecting client can be sent what it missed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventHistory {
    events: VecDeque<Event>,
    events_max: u64,
    /// The highest revision of any event dropped from the history.
    compacted_through: Revision,
}

/// What a reconnecting client must be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missed {
    /// Events to deliver at once, in order. A single `HistoryCompacted`
    /// event when the history no longer reaches back to the client.
    pub events: Vec<Event>,
    /// The watches still registered after those events (fired one-shot
    /// watches are gone; all stay after `HistoryCompacted`).
    pub watches: Vec<(String, WatchKind)>,
}

impl EventHistory {
    /// An empty history keeping at most `events_max` events.
    pub fn new(events_max: u64) -> Self {
        EventHistory {
            events: VecDeque::new(),
            events_max,
            compacted_through: 0,
        }
    }

    /// Appends the events of an applied command, dropping the oldest beyond
    /// the bound.
    pub fn record(&mut self, events: &[Event]) {
        self.events.extend(events.iter().cloned());
        while self.events.len() as u64 > self.events_max {
            if let Some(dropped) = self.events.pop_front() {
                self.compacted_through = self.compacted_through.max(dropped.revision);
            }
        }
    }

    /// What a client that saw everything up to `last_seen_revision` missed,
    /// for the watches it re-registers.
    pub fn missed(&self, watches: &[(String, WatchKind)], last_seen_revision: Revision) -> Missed {
        if last_seen_revision < self.compacted_through {
            return Missed {
                events: vec![Event {
                    path: "/".into(),
                    event_type: EventType::HistoryCompacted,
                    revision: self.compacted_through,
                }],
                watches: watches.to_vec(),
            };
        }
        // Watches indexed by path, and the history searched for its first
        // missed event, so that the cost is the missed events times their
        // depth, whatever the number of watches or the history's length.
        let mut live = vec![true; watches.len()];
        let mut by_path: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (index, (path, _)) in watches.iter().enumerate() {
            by_path.entry(path.as_str()).or_default().push(index);
        }
        let first_missed = self
            .events
            .partition_point(|event| event.revision <= last_seen_revision);
        let mut events = Vec::new();
        for event in self.events.range(first_missed..) {
            let mut fired = false;
            // Only a watch on the event's path or an ancestor can fire.
            let mut candidate = Some(event.path.as_str());
            while let Some(path) = candidate {
                for &index in by_path.get(path).into_iter().flatten() {
                    let (watch_path, kind) = &watches[index];
                    if live[index] && kind.fires_on(watch_path, &event.path, event.event_type) {
                        fired = true;
                        live[index] = kind.is_persistent();
                    }
                }
                candidate = parent(path);
            }
            if fired {
                events.push(event.clone());
            }
        }
        Missed {
            events,
            watches: watches
                .iter()
                .zip(live)
                .filter(|(_, live)| *live)
                .map(|(watch, _)| watch.clone())
                .collect(),
        }
    }
}
