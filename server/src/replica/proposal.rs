//! What a replica proposes to the log. A proposal carries no time: the
//! leader stamps each slot when it fills it ([`synod_paxos::Batch::stamp_ms`])
//! and every replica builds the state machine's [`Command`] from the
//! proposal and that stamp, so time in the state machine is always the
//! leader's.

use serde::{Deserialize, Serialize};
use synod_proto::{Request, SessionId, SessionSecret};

use crate::state::{Command, SessionRemaining};

/// Identifies the replica and the waiting client that asked to open a
/// session, so that the right connection gets the new session's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Origin {
    /// The replica that proposed.
    pub node: u64,
    /// Unique per proposal at that replica.
    pub token: u64,
}

/// One proposal, encoded with postcard as a Paxos command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Proposal {
    /// A client's write (or a read that goes through the log, like `Sync`).
    Client(Request),
    /// Open a session for a client waiting at `origin`.
    OpenSession {
        /// The timeout asked for.
        timeout_ms: u64,
        /// Who is waiting for the answer.
        origin: Origin,
        /// The client identity (certificate subject) that will own it.
        owner: String,
        /// The session's secret, drawn at random at the origin.
        secret: SessionSecret,
    },
    /// The leader decided these sessions expired.
    ExpireSessions(Vec<SessionId>),
    /// The leader's checkpoint of sessions' remaining time.
    CheckpointSessions(Vec<SessionRemaining>),
    /// Advances the state machine's time (ends lock-delays).
    Tick,
    /// The cluster's identity, drawn at random by a leader that found none.
    MintClusterIdentity(u128),
    /// This member holds the cluster's state.
    MemberConfirmed(u64),
}

impl Proposal {
    /// The proposal's log encoding.
    pub fn encode(&self) -> bytes::Bytes {
        bytes::Bytes::from(
            postcard::to_allocvec(self).expect("a proposal always encodes into memory"),
        )
    }

    /// Decodes a proposal from the log.
    ///
    /// # Errors
    /// A message when the bytes are not a proposal.
    pub fn decode(bytes: &[u8]) -> Result<Proposal, String> {
        postcard::from_bytes(bytes).map_err(|error| format!("malformed proposal: {error}"))
    }

    /// The state machine command for this proposal in a slot stamped `now_ms`.
    pub fn into_command(self, now_ms: u64) -> Command {
        match self {
            Proposal::Client(request) => Command::Client { request, now_ms },
            Proposal::OpenSession {
                timeout_ms,
                owner,
                secret,
                ..
            } => Command::OpenSession {
                timeout_ms,
                owner,
                secret,
                now_ms,
            },
            Proposal::ExpireSessions(sessions) => Command::ExpireSessions { sessions, now_ms },
            Proposal::CheckpointSessions(remaining) => {
                Command::CheckpointSessions { remaining, now_ms }
            }
            Proposal::Tick => Command::Tick { now_ms },
            Proposal::MintClusterIdentity(identity) => {
                Command::MintClusterIdentity { identity, now_ms }
            }
            Proposal::MemberConfirmed(node) => Command::MemberConfirmed { node, now_ms },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use synod_proto::Op;

    #[test]
    fn proposals_round_trip_and_take_the_slot_stamp() {
        let proposal = Proposal::Client(Request {
            session: 4,
            sequence: 2,
            op: Op::Sync,
        });
        let decoded = Proposal::decode(&proposal.encode()).expect("decodes");
        assert_eq!(decoded, proposal);
        assert_eq!(decoded.into_command(1234).now_ms(), 1234);
        assert!(Proposal::decode(&[0xff, 0xff]).is_err());
    }
}
