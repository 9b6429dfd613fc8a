//! Wire types shared by the Synod client and server: requests, responses,
//! events, errors, framing and the protocol version.
//!
//! Every type here is serde-serializable and is encoded with postcard on the
//! wire and on disk. Sizes and counters are `u64`, never `usize`, so the
//! encoding is the same on every platform.

mod error;
mod event;
mod request;
mod response;

pub use error::{Error, Result};
pub use event::{Event, EventType, WatchKind};
pub use request::{CreateMode, LockMode, MultiOp, Op, Request, Sequencer};
pub use response::{LeaderInfo, MultiResult, OpResult, Response, Stat};

/// Version of the client and peer protocol, exchanged in the handshake.
/// A peer speaking another version is refused with a clear error.
pub const PROTOCOL_VERSION: u64 = 1;

/// A session's identifier, assigned by the state machine; `0` is never a
/// session and means "no owner" in [`Stat::ephemeral_owner`].
pub type SessionId = u64;

/// A position in the totally ordered history of mutations (like ZooKeeper's
/// zxid): every applied mutation takes the next revision.
pub type Revision = u64;
