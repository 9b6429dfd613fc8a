//! The Synod replica: the deterministic coordination state machine, redb
//! storage, and QUIC transport for peers and clients.

pub mod config;
pub mod replica;
pub mod state;
pub mod storage;
pub mod transport;
