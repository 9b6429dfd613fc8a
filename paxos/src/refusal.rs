//! Why an election did not move forward: the reasons a replica refused a
//! pre-vote or a promise, declined to stand for election, or put off leading.
//!
//! Elections fail quietly by design (a refused pre-vote is only a `granted:
//! false`, a withheld promise is no message at all), so a cluster that elects
//! nobody would give no clue. The core reports every refusal in
//! [`Ready::refusals`](crate::Ready::refusals); the driver logs them at debug
//! level. They change nothing in the protocol.

use std::fmt;

use crate::types::{Ballot, NodeId, Slot};

/// One refusal, by this replica, to help `candidate` become leader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The replica that wanted to lead (this replica itself for
    /// [`ElectionStep::Candidacy`] and [`ElectionStep::Leadership`]).
    pub candidate: NodeId,
    /// The step of the election that was refused.
    pub step: ElectionStep,
    /// Why.
    pub reason: RefusalReason,
}

/// The step of an election a [`Refusal`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElectionStep {
    /// This replica's election timeout passed, and it did not stand.
    Candidacy,
    /// It refused another replica's pre-vote for `round`.
    PreVote {
        /// The round the candidate asked about.
        round: u64,
    },
    /// It did not promise another replica's (or its own) prepare.
    Promise {
        /// The ballot of the prepare.
        ballot: Ballot,
    },
    /// It won its election but must catch up before it may lead.
    Leadership {
        /// The ballot it was elected with.
        ballot: Ballot,
    },
}

/// Why a [`Refusal`] was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// This replica is rejoining after losing its disk and votes in nothing
    /// until it has caught up.
    Joining,
    /// It started recently and promises nothing for one lease duration, in
    /// case it acknowledged a leader's heartbeat just before it went down.
    RecentlyStarted {
        /// When it may promise again, on its own clock.
        until_ms: u64,
    },
    /// It granted a lease to another leader that has not run out.
    LeaseGranted {
        /// The leader holding the lease.
        to: NodeId,
        /// When the lease runs out, on this replica's clock.
        until_ms: u64,
    },
    /// The candidate's ballot is not above the one this replica promised.
    BallotNotHigher {
        /// The ballot this replica promised.
        promised: Ballot,
    },
    /// The candidate knows fewer chosen slots than this replica.
    CandidateBehind {
        /// The candidate's chosen prefix.
        candidate_chosen_through: Slot,
        /// This replica's chosen prefix.
        own_chosen_through: Slot,
    },
    /// This replica leads itself.
    Leading,
    /// A promiser knows chosen slots beyond what its promise could carry;
    /// this replica catches up from it instead of leading.
    PromiserKnowsMore {
        /// The promiser.
        promiser: NodeId,
        /// Its chosen prefix.
        chosen_through: Slot,
        /// This replica's chosen prefix.
        own_chosen_through: Slot,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.step {
            ElectionStep::Candidacy => write!(f, "did not stand for election: ")?,
            ElectionStep::PreVote { round } => {
                write!(
                    f,
                    "refused the pre-vote of {} for round {round}: ",
                    self.candidate
                )?;
            }
            ElectionStep::Promise { ballot } => {
                write!(f, "did not promise ballot {ballot}: ")?;
            }
            ElectionStep::Leadership { ballot } => {
                write!(f, "elected with ballot {ballot} but does not lead yet: ")?;
            }
        }
        write!(f, "{}", self.reason)
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RefusalReason::Joining => write!(f, "rejoining after a lost disk"),
            RefusalReason::RecentlyStarted { until_ms } => {
                write!(
                    f,
                    "started less than a lease ago (promises again at {until_ms} ms)"
                )
            }
            RefusalReason::LeaseGranted { to, until_ms } => {
                write!(f, "lease granted to {to} until {until_ms} ms")
            }
            RefusalReason::BallotNotHigher { promised } => {
                write!(f, "already promised ballot {promised}")
            }
            RefusalReason::CandidateBehind {
                candidate_chosen_through,
                own_chosen_through,
            } => write!(
                f,
                "the candidate knows slots chosen through {candidate_chosen_through}, \
                 this replica through {own_chosen_through}"
            ),
            RefusalReason::Leading => write!(f, "leading"),
            RefusalReason::PromiserKnowsMore {
                promiser,
                chosen_through,
                own_chosen_through,
            } => write!(
                f,
                "promiser {promiser} knows slots chosen through {chosen_through}, \
                 this replica through {own_chosen_through}: catching up from it first"
            ),
        }
    }
}
