//! The cluster's identity, as the peer transport checks it in every
//! handshake.
//!
//! # Why a cluster identity
//!
//! The `cluster_id` of the configuration is a name an operator chose, and
//! two clusters may well share it (two test clusters, a staging copy of
//! production). Without more, a database of one cluster started among the
//! replicas of another would be used silently, and a member whose data
//! directory was wiped and that was restarted with `--bootstrap` would vote
//! with promises it no longer remembers. So a cluster also has an identity
//! no operator chose: a random `u128` minted once, held in every replica's
//! state machine, and compared in every peer handshake.
//!
//! # Minting without agreeing first
//!
//! Every founding member starts with `--bootstrap` on its own, so none can
//! mint the identity alone: three founders would mint three. Instead the
//! identity is replicated state:
//! 1. The first leader whose state holds no identity proposes
//!    `MintClusterIdentity` with a value it drew from the operating system.
//!    The value travels in the log, so the state machine stays
//!    deterministic; the first one applied is kept for good and later ones
//!    (from leaders that raced, or whose state lagged) are ignored.
//! 2. Every replica that holds the identity and is not rejoining proposes
//!    once `MemberConfirmed(itself)` (one election timeout after it first
//!    holds it; see below). The state machine records the set of
//!    members that confirmed, so every replica knows, from replicated state,
//!    which members have ever held the cluster's state.
//! 3. Both are part of the state snapshot, and a replica replays its chosen
//!    log before its transport starts, so the identity is known before the
//!    first handshake.
//!
//! # What a handshake checks
//!
//! A peer's hello carries its identity (or none) and whether it is
//! rejoining. The replica, if it holds an identity itself, refuses:
//! - a different identity: the peer's database belongs to another cluster
//!   ([`IdentityConflict::OtherCluster`]);
//! - no identity, not rejoining, from a member its state lists as confirmed:
//!   that member held the cluster's state and now presents a fresh database,
//!   so it lost its data directory and must be restarted with `--join`
//!   ([`IdentityConflict::LostData`]).
//!
//! A peer without an identity that is rejoining, or that never confirmed (a
//! founding member that starts late), is welcome and learns the identity by
//! catching up. A replica without an identity welcomes everyone: it cannot
//! tell which side is right, and the peers that hold one judge it when it
//! dials them (each pair of replicas holds a connection each way, so every
//! pair is judged by both sides).
//!
//! # Who stops
//!
//! A replica refused for [`IdentityConflict::LostData`] stops at once: a
//! peer's replicated state says it forgot what it voted for, and only an
//! operator can make it safe (`--join`). Conflicts of
//! [`IdentityConflict::OtherCluster`] are counted per peer, in both
//! directions (refused by it, or refusing it): a replica that disagrees with
//! a majority of the members stops, since it is the odd one out; one that
//! disagrees only with a minority keeps running and logs an error, since
//! the odd one is the other. (If a majority of the data directories were
//! swapped, the majority wins: the identity cannot tell which set an
//! operator meant.)
//!
//! # The residual window
//!
//! A member wiped after it applied the identity but before its
//! confirmation was applied cannot be told from a founding member that
//! starts late: both present no identity and are not listed as confirmed,
//! so both are welcome. The window is short (about one election timeout
//! plus a round trip through the log after the member first learns the
//! identity, normally right after the cluster's bootstrap), and a member
//! wiped within it has voted in at most the slots of that window.
//!
//! The confirmation waits one election timeout after the identity is first
//! seen for a reason: a replica restarts with the identity only if its
//! chosen prefix through the minting slot was durable, and a replica that
//! crashed just before that would otherwise restart without the identity
//! while listed as confirmed, and be taken for one that lost its data.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, RwLock};

use synod_paxos::NodeId;
use synod_proto::wire::IdentityConflict;

/// What the transport needs to know of the state machine's identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityView {
    /// The cluster's identity, once minted.
    pub cluster: Option<u128>,
    /// Members that confirmed they hold the cluster's state.
    pub confirmed: BTreeSet<NodeId>,
    /// Whether this replica is rejoining and has not caught up.
    pub joining: bool,
}

/// Shared by the replica's event loop, which publishes what its state
/// machine holds, and the peer transport, which judges hellos with it and
/// records conflicts. [`ClusterIdentity::fatal`] says when the replica must
/// stop.
#[derive(Debug)]
pub struct ClusterIdentity {
    node_id: NodeId,
    members: usize,
    view: RwLock<IdentityView>,
    /// Peers known to hold another identity, with theirs.
    disagreeing: Mutex<BTreeMap<NodeId, u128>>,
    fatal: Mutex<Option<String>>,
}

/// Formats an identity the way `status` shows it: 32 hex digits.
pub fn identity_hex(identity: u128) -> String {
    format!("{identity:032x}")
}

impl ClusterIdentity {
    /// For replica `node_id` of a cluster of `members` members, starting
    /// with what its state holds.
    pub fn new(node_id: NodeId, members: usize, view: IdentityView) -> ClusterIdentity {
        ClusterIdentity {
            node_id,
            members,
            view: RwLock::new(view),
            disagreeing: Mutex::new(BTreeMap::new()),
            fatal: Mutex::new(None),
        }
    }

    /// One that never refuses anyone (no identity held), for transports
    /// used without a state machine.
    pub fn unchecked(node_id: NodeId, members: usize) -> ClusterIdentity {
        ClusterIdentity::new(node_id, members, IdentityView::default())
    }

    /// What the transport currently believes.
    pub fn view(&self) -> IdentityView {
        self.view
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Replaces the view (the event loop calls this after applying).
    pub fn publish(&self, view: IdentityView) {
        *self
            .view
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = view;
    }

    /// Why this replica must stop, once it must.
    pub fn fatal(&self) -> Option<String> {
        lock(&self.fatal).clone()
    }

    /// Judges the identity in a peer's hello (see the module docs).
    ///
    /// # Errors
    /// A reason for a person and the conflict, when the peer is refused.
    pub fn judge(
        &self,
        peer: NodeId,
        theirs: Option<u128>,
        joining: bool,
    ) -> Result<(), (String, IdentityConflict)> {
        let view = self.view();
        let Some(ours) = view.cluster else {
            return Ok(());
        };
        match theirs {
            Some(theirs) if theirs == ours => {
                self.agreed(peer);
                Ok(())
            }
            Some(theirs) => {
                let reason = format!(
                    "node {peer} presents a database of cluster identity {}, but this replica \
                     (node {}) belongs to cluster identity {}: the same cluster name, another \
                     cluster. Node {peer}'s data directory belongs to another cluster: give it \
                     its own data directory back, or empty it and restart it with --join",
                    identity_hex(theirs),
                    self.node_id,
                    identity_hex(ours),
                );
                self.disagree(peer, theirs);
                Err((reason, IdentityConflict::OtherCluster { theirs: ours }))
            }
            None if !joining && view.confirmed.contains(&peer) => {
                let reason = format!(
                    "node {peer} already took part in cluster {} but presents a fresh \
                     database: it lost its data directory. Restart it with --join (not \
                     --bootstrap) on an empty data directory",
                    identity_hex(ours),
                );
                Err((reason, IdentityConflict::LostData { theirs: ours }))
            }
            None => Ok(()),
        }
    }

    /// Records that `peer` refused this replica's identity.
    pub fn refused_by(&self, peer: NodeId, conflict: IdentityConflict, reason: &str) {
        match conflict {
            IdentityConflict::LostData { theirs } => {
                self.stop(format!(
                    "node {peer} (cluster identity {}) refused this replica: {reason}",
                    identity_hex(theirs),
                ));
            }
            IdentityConflict::OtherCluster { theirs } => self.disagree(peer, theirs),
        }
    }

    /// Records that `peer` and this replica agree (or cannot disagree).
    pub fn agreed(&self, peer: NodeId) {
        lock(&self.disagreeing).remove(&peer);
    }

    fn disagree(&self, peer: NodeId, theirs: u128) {
        let ours = self.view().cluster;
        let (newly, others) = {
            let mut disagreeing = lock(&self.disagreeing);
            let newly = disagreeing.insert(peer, theirs) != Some(theirs);
            (newly, disagreeing.clone())
        };
        let majority = self.members / 2 + 1;
        let ours = ours.map_or_else(|| "none".to_string(), identity_hex);
        if others.len() >= majority {
            let peers: Vec<String> = others
                .iter()
                .map(|(node, identity)| format!("node {node} holds {}", identity_hex(*identity)))
                .collect();
            self.stop(format!(
                "this replica's database (node {}) belongs to cluster identity {ours}, but a \
                 majority of the members disagree ({}): this data directory belongs to \
                 another cluster with the same name. Give this replica its own data \
                 directory back, or empty it and start it with --join",
                self.node_id,
                peers.join(", "),
            ));
        } else if newly {
            tracing::error!(
                node = self.node_id,
                peer,
                ours = %ours,
                theirs = %identity_hex(theirs),
                "peer's database belongs to another cluster with the same name; not talking to it"
            );
        }
    }

    fn stop(&self, reason: String) {
        let mut fatal = lock(&self.fatal);
        if fatal.is_none() {
            tracing::error!(node = self.node_id, %reason, "refused by the cluster; stopping");
            *fatal = Some(reason);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holding(identity: u128, confirmed: &[NodeId]) -> ClusterIdentity {
        ClusterIdentity::new(
            1,
            3,
            IdentityView {
                cluster: Some(identity),
                confirmed: confirmed.iter().copied().collect(),
                joining: false,
            },
        )
    }

    #[test]
    fn hellos_are_judged_by_identity_and_confirmation() {
        let identity = holding(7, &[1, 2]);
        assert!(identity.judge(2, Some(7), false).is_ok());
        // A late founding member, and a member rejoining.
        assert!(identity.judge(3, None, false).is_ok());
        assert!(identity.judge(2, None, true).is_ok());
        let (reason, conflict) = identity.judge(2, None, false).expect_err("lost data");
        assert_eq!(conflict, IdentityConflict::LostData { theirs: 7 });
        assert!(reason.contains("--join"), "{reason}");
        let (reason, conflict) = identity.judge(3, Some(8), false).expect_err("other");
        assert_eq!(conflict, IdentityConflict::OtherCluster { theirs: 7 });
        assert!(reason.contains("another cluster"), "{reason}");
        // One of three disagreeing is a minority: keep running.
        assert_eq!(identity.fatal(), None);
        // A replica with no identity welcomes everyone.
        let fresh = ClusterIdentity::unchecked(1, 3);
        assert!(fresh.judge(2, Some(7), false).is_ok());
        assert!(fresh.judge(2, None, false).is_ok());
    }

    #[test]
    fn disagreeing_with_a_majority_or_losing_data_stops_the_replica() {
        let identity = holding(7, &[]);
        identity.refused_by(2, IdentityConflict::OtherCluster { theirs: 8 }, "no");
        assert_eq!(identity.fatal(), None);
        identity.agreed(2);
        identity.refused_by(3, IdentityConflict::OtherCluster { theirs: 8 }, "no");
        assert_eq!(identity.fatal(), None, "node 2 agreed again");
        let _ = identity.judge(2, Some(8), false);
        let fatal = identity.fatal().expect("a majority disagrees");
        assert!(fatal.contains("--join"), "{fatal}");

        let wiped = ClusterIdentity::unchecked(3, 3);
        wiped.refused_by(
            1,
            IdentityConflict::LostData { theirs: 7 },
            "restart it with --join",
        );
        let fatal = wiped.fatal().expect("lost data");
        assert!(
            fatal.contains("node 1") && fatal.contains("restart it with --join"),
            "{fatal}"
        );
    }
}
