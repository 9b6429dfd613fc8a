//! The leader's record of session liveness. Keep-alives never enter the
//! log: each replica collects those of its clients and passes them to the
//! leader, which keeps a deadline per session, commits the expiry of
//! sessions past their deadline, and periodically commits a checkpoint of
//! every session's remaining time. A new leader resumes from the last
//! checkpoint plus a grace period ([`crate::state::StateMachine::session_deadlines_ms`]),
//! so a change of leader never keeps a dead client's session alive for long.

use std::collections::{BTreeMap, BTreeSet};

use synod_proto::SessionId;

use crate::state::{SessionRemaining, StateMachine};

/// Deadlines of every open session, on the leader's clock.
#[derive(Debug, Default)]
pub struct SessionTracker {
    deadlines_ms: BTreeMap<SessionId, u64>,
    /// Sessions whose expiry was proposed and not yet applied.
    expiring: BTreeSet<SessionId>,
    last_checkpoint_ms: u64,
}

impl SessionTracker {
    /// A tracker for a replica that just became leader: every open session
    /// gets its checkpointed remaining time plus `grace_ms`.
    pub fn resume(state: &StateMachine, now_ms: u64, grace_ms: u64) -> SessionTracker {
        SessionTracker {
            deadlines_ms: state
                .session_deadlines_ms(now_ms, grace_ms)
                .into_iter()
                .collect(),
            expiring: BTreeSet::new(),
            last_checkpoint_ms: now_ms,
        }
    }

    /// Number of sessions tracked.
    pub fn len(&self) -> usize {
        self.deadlines_ms.len()
    }

    /// Whether no session is tracked.
    pub fn is_empty(&self) -> bool {
        self.deadlines_ms.is_empty()
    }

    /// A keep-alive (or any request) from `session`, whose timeout is
    /// `timeout_ms`, seen at `now_ms`: its deadline moves to `now + timeout`.
    pub fn keep_alive(&mut self, session: SessionId, timeout_ms: u64, now_ms: u64) {
        if self.expiring.contains(&session) {
            return;
        }
        let deadline = now_ms.saturating_add(timeout_ms);
        let entry = self.deadlines_ms.entry(session).or_insert(deadline);
        *entry = (*entry).max(deadline);
    }

    /// A session opened (applied): it starts with a full timeout.
    pub fn opened(&mut self, session: SessionId, timeout_ms: u64, now_ms: u64) {
        self.deadlines_ms
            .insert(session, now_ms.saturating_add(timeout_ms));
    }

    /// Sessions ended (applied): forget them.
    pub fn ended(&mut self, sessions: &[SessionId]) {
        for session in sessions {
            self.deadlines_ms.remove(session);
            self.expiring.remove(session);
        }
    }

    /// Sessions past their deadline that were not yet proposed for expiry;
    /// they are marked as expiring.
    pub fn take_expired(&mut self, now_ms: u64) -> Vec<SessionId> {
        let expired: Vec<SessionId> = self
            .deadlines_ms
            .iter()
            .filter(|(session, &deadline)| deadline <= now_ms && !self.expiring.contains(session))
            .map(|(&session, _)| session)
            .collect();
        self.expiring.extend(expired.iter().copied());
        expired
    }

    /// Allows an expiry that was proposed but may have been lost (leadership
    /// changes) to be proposed again.
    pub fn retry_expiring(&mut self) {
        self.expiring.clear();
    }

    /// Every `interval_ms`, the remaining time of every session to commit.
    pub fn checkpoint_due(
        &mut self,
        now_ms: u64,
        interval_ms: u64,
    ) -> Option<Vec<SessionRemaining>> {
        if now_ms < self.last_checkpoint_ms.saturating_add(interval_ms)
            || self.deadlines_ms.is_empty()
        {
            return None;
        }
        self.last_checkpoint_ms = now_ms;
        Some(
            self.deadlines_ms
                .iter()
                .map(|(&session, &deadline)| SessionRemaining {
                    session,
                    remaining_ms: deadline.saturating_sub(now_ms),
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_move_with_keep_alives_and_expire_once() {
        let mut tracker = SessionTracker::default();
        tracker.opened(1, 1000, 0);
        tracker.opened(2, 1000, 0);
        tracker.keep_alive(2, 1000, 800);
        assert_eq!(tracker.take_expired(1000), vec![1]);
        assert!(tracker.take_expired(1500).is_empty(), "proposed once");
        assert_eq!(tracker.take_expired(1800), vec![2]);
        tracker.ended(&[1, 2]);
        assert!(tracker.is_empty());
    }

    #[test]
    fn checkpoints_report_remaining_time() {
        let mut tracker = SessionTracker::default();
        tracker.opened(7, 5000, 0);
        assert!(tracker.checkpoint_due(500, 1000).is_none());
        let remaining = tracker.checkpoint_due(1000, 1000).expect("due");
        assert_eq!(
            remaining,
            vec![SessionRemaining {
                session: 7,
                remaining_ms: 4000
            }]
        );
    }
}
