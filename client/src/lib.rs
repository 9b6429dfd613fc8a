//! Async client library for Synod: sessions, watches, locks with fencing
//! tokens and leader election.

pub use synod_proto::PROTOCOL_VERSION;
