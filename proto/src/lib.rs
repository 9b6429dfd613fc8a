//! Wire types shared by the Synod client and server: requests, responses,
//! events, errors, framing and the protocol version.
//!
//! Every type here is serde-serializable and is encoded with postcard on the
//! wire and on disk. Sizes and counters are `u64`, never `usize`, so the
//! encoding is the same on every platform.

#[cfg(feature = "certgen")]
pub mod certgen;
mod error;
mod event;
mod request;
mod response;
pub mod tls;
pub mod wire;

pub use error::{Error, Result};
pub use event::{Event, EventType, WatchKind};
pub use request::{CreateMode, LockMode, MultiOp, Op, Request, Sequencer};
pub use response::{LeaderInfo, MultiResult, OpResult, Response, Stat};

/// Version of the client and peer protocol, exchanged in the handshake.
/// A peer speaking another version is refused with a clear error.
/// Version 2 added the cluster identity to the peer hello and session
/// secrets to opening and resuming sessions; version 3 added why a replica
/// waits to its status.
pub const PROTOCOL_VERSION: u64 = 3;

/// A session's identifier, assigned by the state machine; `0` is never a
/// session and means "no owner" in [`Stat::ephemeral_owner`].
pub type SessionId = u64;

/// A session's secret: 128 random bits drawn by the replica that opened
/// it. With the owner's certificate identity it makes a session handle
/// unguessable: session ids are small counters, secrets are not.
pub type SessionSecret = u128;

/// A position in the totally ordered history of mutations (like ZooKeeper's
/// zxid): every applied mutation takes the next revision.
pub type Revision = u64;

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T>(value: &T) -> T
    where
        T: serde::Serialize + serde::de::DeserializeOwned,
    {
        let bytes = postcard::to_allocvec(value).expect("encodes");
        postcard::from_bytes(&bytes).expect("decodes")
    }

    #[test]
    fn requests_and_responses_round_trip_through_postcard() {
        let request = Request {
            session: 7,
            sequence: 1 << 40,
            op: Op::Multi {
                ops: vec![
                    MultiOp::CheckSequencer {
                        sequencer: Sequencer {
                            path: "/l".into(),
                            mode: LockMode::Shared,
                            generation: 9,
                        },
                    },
                    MultiOp::Create {
                        path: "/q/".into(),
                        data: vec![1, 2, 3],
                        mode: CreateMode::EphemeralSequential,
                    },
                ],
            },
        };
        assert_eq!(round_trip(&request), request);
        let response = Response {
            revision: 12,
            result: Err(Error::MultiOpFailed {
                index: 1,
                cause: Box::new(Error::NoNode { path: "/q".into() }),
            }),
        };
        assert_eq!(round_trip(&response), response);
        let event = Event {
            path: "/a".into(),
            event_type: EventType::LeaderChanged,
            revision: 3,
        };
        assert_eq!(round_trip(&event), event);
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let bytes = postcard::to_allocvec(&Op::Sync).expect("encodes");
        let request = postcard::to_allocvec(&Request {
            session: 1,
            sequence: 2,
            op: Op::GetData {
                path: "/abc".into(),
            },
        })
        .expect("encodes");
        for end in 0..request.len() {
            assert!(postcard::from_bytes::<Request>(&request[..end]).is_err());
        }
        assert!(postcard::from_bytes::<Op>(&bytes).is_ok());
    }
}
