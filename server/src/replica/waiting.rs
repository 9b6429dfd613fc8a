//! Why a replica is not part of a working quorum, in words for a person:
//! shown by `status` (`ReplicaStatus::waiting`) and logged when it starts,
//! changes or ends, so that an operator looking at a replica that serves
//! nothing learns what it waits for.

use std::collections::BTreeSet;
use std::fmt;

use synod_paxos::{JoinProgress, Role, Status};

/// What a replica waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// Rejoining after a lost disk, it needs every other member's report.
    RejoinReports {
        /// The members that have not reported yet.
        members: Vec<u64>,
    },
    /// Rejoining after a lost disk, it learns the log before it votes.
    RejoinCatchUp {
        /// The slot its chosen prefix must reach.
        slot: u64,
        /// Its chosen prefix now.
        chosen_through: u64,
    },
    /// Too many members lost their disks at once: the rejoining ones vote
    /// only once every other member has reported, so too few voters are
    /// left to elect a leader, ever. The cluster must be recovered from a
    /// survivor or a backup.
    MajorityLost {
        /// The members rejoining after a lost disk (this one included, if
        /// it is one).
        rejoining: Vec<u64>,
        /// Members that still remember the log.
        voters: usize,
        /// Members a quorum needs.
        needed: usize,
        /// Members in all.
        members: usize,
    },
    /// No leader, and too few members reachable to elect one.
    NoQuorum {
        /// The members it has no connection to.
        unreachable: Vec<u64>,
        /// Members a quorum needs.
        needed: usize,
        /// Members in all.
        members: usize,
    },
    /// No leader yet, with a quorum reachable: an election is under way.
    Electing {
        /// The ballot it promised, as `round.node`.
        ballot: String,
    },
}

impl Waiting {
    /// What a replica with this core status, join progress and links to
    /// its peers (`connected`, other members only) waits for, if anything.
    pub fn of(
        me: u64,
        core: &Status,
        join: Option<JoinProgress>,
        members: &BTreeSet<u64>,
        connected: &BTreeSet<u64>,
    ) -> Option<Waiting> {
        let needed = members.len() / 2 + 1;
        let rejoining: Vec<u64> = members
            .iter()
            .copied()
            .filter(|&member| (member == me && join.is_some()) || core.rejoining.contains(&member))
            .collect();
        let voters = members.len() - rejoining.len();
        let leaderless = core.leader.is_none() && core.role != Role::Leader;
        if leaderless && !rejoining.is_empty() && voters < needed {
            return Some(Waiting::MajorityLost {
                rejoining,
                voters,
                needed,
                members: members.len(),
            });
        }
        if let Some(join) = join {
            return Some(match join {
                JoinProgress::WaitingFor(members) => Waiting::RejoinReports { members },
                JoinProgress::CatchingUp {
                    slot,
                    chosen_through,
                } => Waiting::RejoinCatchUp {
                    slot,
                    chosen_through,
                },
            });
        }
        if !leaderless {
            return None;
        }
        let unreachable: Vec<u64> = members
            .iter()
            .copied()
            .filter(|&member| member != me && !connected.contains(&member))
            .collect();
        let reachable = members.len() - unreachable.len();
        if reachable < needed {
            return Some(Waiting::NoQuorum {
                unreachable,
                needed,
                members: members.len(),
            });
        }
        Some(Waiting::Electing {
            ballot: core.promised.to_string(),
        })
    }

    /// Whether `other` says the same thing but for progress numbers: a
    /// change worth a log line.
    pub fn same_kind(&self, other: &Waiting) -> bool {
        match (self, other) {
            (Waiting::RejoinReports { members: a }, Waiting::RejoinReports { members: b })
            | (
                Waiting::MajorityLost { rejoining: a, .. },
                Waiting::MajorityLost { rejoining: b, .. },
            ) => a == b,
            (Waiting::RejoinCatchUp { .. }, Waiting::RejoinCatchUp { .. })
            | (Waiting::Electing { .. }, Waiting::Electing { .. }) => true,
            (
                Waiting::NoQuorum { unreachable: a, .. },
                Waiting::NoQuorum { unreachable: b, .. },
            ) => a == b,
            _ => false,
        }
    }
}

/// `2, 3`.
fn list(members: &[u64]) -> String {
    members
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// "member 2" or "members 2, 3".
fn members(ids: &[u64]) -> String {
    match ids {
        [one] => format!("member {one}"),
        many => format!("members {}", list(many)),
    }
}

impl fmt::Display for Waiting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Waiting::RejoinReports { members: ids } => write!(
                f,
                "rejoining after a lost disk: waiting for {} to report what they promised \
                 and accepted (every other member must, before this one votes)",
                members(ids)
            ),
            Waiting::RejoinCatchUp {
                slot,
                chosen_through,
            } => write!(
                f,
                "rejoining after a lost disk: learning the log through slot {slot} (at \
                 {chosen_through}) before voting"
            ),
            Waiting::MajorityLost {
                rejoining,
                voters,
                needed,
                members: total,
            } => write!(
                f,
                "no leader can be elected: {} lost their disks and are rejoining, and a \
                 rejoining member votes only once every other member has told it what it may \
                 have forgotten; {voters} of the {total} members remember the log and electing \
                 a leader needs {needed}. The cluster lost its majority for good: recover it \
                 from a survivor or a backup (README: Backup, restore and disaster recovery)",
                members(rejoining)
            ),
            Waiting::NoQuorum {
                unreachable,
                needed,
                members: total,
            } => write!(
                f,
                "no quorum: no connection to {}; electing a leader needs {needed} of the \
                 {total} members",
                members(unreachable)
            ),
            Waiting::Electing { ballot } => {
                write!(
                    f,
                    "no leader yet: an election is under way (ballot {ballot})"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use synod_paxos::Ballot;

    fn status(role: Role, leader: Option<u64>) -> Status {
        Status {
            id: 1,
            role,
            leader,
            promised: Ballot::ZERO,
            chosen_through: 0,
            known_chosen_through: 0,
            apply_next: 1,
            log_start: 1,
            pending_commands: 0,
            inflight_slots: 0,
            next_slot: 1,
            peers: Vec::new(),
            rejoining: Vec::new(),
        }
    }

    #[test]
    fn says_what_a_replica_waits_for() {
        let members: BTreeSet<u64> = [1, 2, 3].into();
        let none = BTreeSet::new();
        let two: BTreeSet<u64> = [2].into();
        let follower = status(Role::Follower, None);

        let waiting = Waiting::of(1, &follower, None, &members, &none).expect("waits");
        assert_eq!(
            waiting.to_string(),
            "no quorum: no connection to members 2, 3; electing a leader needs 2 of the 3 members"
        );
        let waiting = Waiting::of(1, &follower, None, &members, &two).expect("waits");
        assert!(matches!(waiting, Waiting::Electing { .. }), "{waiting}");
        let led = status(Role::Follower, Some(2));
        assert_eq!(Waiting::of(1, &led, None, &members, &two), None);

        let join = Some(JoinProgress::WaitingFor(vec![2, 3]));
        let waiting = Waiting::of(1, &led, join, &members, &two).expect("waits");
        assert!(
            waiting
                .to_string()
                .starts_with("rejoining after a lost disk: waiting for members 2, 3 to report"),
            "{waiting}"
        );
        let mut lost = status(Role::Follower, None);
        lost.rejoining = vec![3];
        let join = Some(JoinProgress::WaitingFor(vec![2, 3]));
        let waiting = Waiting::of(2, &lost, join.clone(), &members, &two).expect("waits");
        assert!(
            waiting.to_string().starts_with(
                "no leader can be elected: members 2, 3 lost their disks and are rejoining"
            ),
            "{waiting}"
        );
        let waiting = Waiting::of(1, &lost, None, &members, &two).expect("waits");
        assert!(
            matches!(waiting, Waiting::Electing { .. }),
            "one rejoining member of three leaves a majority: {waiting}"
        );
        lost.rejoining = vec![2, 3];
        let waiting = Waiting::of(1, &lost, None, &members, &two).expect("waits");
        assert!(
            waiting.to_string().contains(
                "members 2, 3 lost their disks and are rejoining, and a rejoining member votes \
                 only once every other member has told it what it may have forgotten; 1 of the \
                 3 members remember the log and electing a leader needs 2"
            ),
            "{waiting}"
        );
        let led_while_rejoining = Status {
            leader: Some(1),
            ..lost.clone()
        };
        assert_eq!(
            Waiting::of(1, &led_while_rejoining, None, &members, &two),
            None
        );
        let later = Waiting::RejoinReports { members: vec![3] };
        assert!(!waiting.same_kind(&later));
        assert!(
            later.to_string().contains("waiting for member 3 to"),
            "{later}"
        );
    }
}
