//! The core's invariants, checked after every input, in the manner of
//! TigerBeetle's assertions: a broken one stops the replica (and the
//! simulator, at the event where it broke) instead of letting corrupt
//! protocol state reach the log or a peer.
//!
//! Every check here is O(1) or O(log n) in the log, never proportional to
//! it, so the checks stay on in release builds. A failure is always a bug in
//! this crate: the inputs (messages, the caller's reports, time) are
//! validated or tolerated where they arrive, so no peer or caller can make
//! one of these fail.

use super::{Node, RoleState};

impl Node {
    /// Panics if the core's state is inconsistent.
    pub(super) fn check_invariants(&self) {
        // Applying follows choosing, and the log keeps what is not applied.
        assert!(
            self.log_start <= self.apply_next,
            "log starts at {} but slot {} is not applied yet",
            self.log_start,
            self.apply_next
        );
        assert!(
            self.apply_next <= self.chosen_through + 1,
            "slot {} handed out for applying but only {} chosen",
            self.apply_next - 1,
            self.chosen_through
        );
        // Nothing is durable that was not issued, and nothing waits for a
        // write that is durable already.
        assert!(
            self.durable_through < self.building.id,
            "batch {} durable but only {} issued",
            self.durable_through,
            self.building.id - 1
        );
        if let Some((&first_held, _)) = self.held.first_key_value() {
            assert!(
                first_held > self.durable_through,
                "messages wait for batch {first_held}, durable through {}",
                self.durable_through
            );
        }
        assert!(
            self.self_bit == self.member_bit(self.id()) && self.self_bit != 0,
            "membership bit {:#b} does not match this replica's place",
            self.self_bit
        );
        // Lease promises run from a receipt or a heartbeat, never further.
        assert!(
            self.lease_granted_until_ms <= self.now_ms + self.config.lease_ms,
            "lease granted until {} ms, beyond {} + one lease",
            self.lease_granted_until_ms,
            self.now_ms
        );
        if let Some(joining) = &self.joining {
            assert!(
                matches!(self.role, RoleState::Follower),
                "a rejoining replica stands for election"
            );
            if let Some((_, slot)) = joining.target {
                assert!(
                    self.chosen_through < slot,
                    "still rejoining with the chosen prefix at {} past its target {slot}",
                    self.chosen_through
                );
            }
        }
        if !matches!(self.role, RoleState::Leader(_)) {
            assert_ne!(
                self.leader_hint,
                Some(self.id()),
                "a follower names itself leader"
            );
        }
        match &self.role {
            RoleState::Follower | RoleState::PreCandidate(_) => {}
            RoleState::Candidate(candidate) => {
                assert_eq!(
                    candidate.ballot, self.promised,
                    "a candidate runs under a ballot it has not promised itself"
                );
            }
            RoleState::Leader(leader) => {
                assert_eq!(
                    leader.ballot, self.promised,
                    "a leader leads under a ballot other than its promise"
                );
                assert_eq!(self.leader_hint, Some(self.id()), "a leader names another");
                // The in-flight window starts right after the chosen prefix
                // and covers every slot assigned since.
                assert_eq!(
                    leader.inflight_base,
                    self.chosen_through + 1,
                    "in-flight window misaligned with the chosen prefix"
                );
                assert_eq!(
                    leader.inflight_base + leader.inflight.len() as u64,
                    leader.next_slot,
                    "in-flight window does not end at the next slot"
                );
                assert!(
                    leader.inflight.front().is_none_or(|front| !front.chosen),
                    "a chosen slot left at the front of the window"
                );
                assert!(
                    leader.barrier_slot < leader.next_slot,
                    "the barrier slot {} was never assigned",
                    leader.barrier_slot
                );
                assert!(
                    leader.announced_chosen_through <= self.chosen_through,
                    "announced slots chosen that are not"
                );
                // A lease runs from a heartbeat's send time, less the drift
                // margin; it can never reach past a full lease from now.
                let lease = self.config.lease_ms - self.config.clock_drift_margin_ms;
                assert!(
                    leader.lease_until_ms <= self.now_ms + lease,
                    "leader lease until {} ms, more than a lease less the margin past {}",
                    leader.lease_until_ms,
                    self.now_ms
                );
            }
        }
    }
}
