//! The Synod replica: the deterministic coordination state machine, redb
//! storage, and QUIC transport for peers and clients.

pub mod address;
pub mod backup;
pub mod config;
pub mod http;
pub mod metrics;
pub mod replica;
pub mod state;
pub mod storage;
pub mod transport;
