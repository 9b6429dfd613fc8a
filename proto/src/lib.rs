//! Wire types shared by the Synod client and server: requests, responses,
//! events, errors, framing and the protocol version.

/// Version of the client and peer protocol, exchanged in the handshake.
/// A peer speaking another version is refused with a clear error.
pub const PROTOCOL_VERSION: u64 = 1;
