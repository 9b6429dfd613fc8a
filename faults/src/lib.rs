//! Synod's fault suite: a real cluster of `synod-server` processes, each
//! on its own loopback address with its data on disk, under concurrent
//! clients (linearizable reads, unique writes, compare-and-set, sequential
//! creates, watches, locks fencing a resource) while a nemesis kills,
//! pauses, partitions, wipes and skews replicas and cuts clients off. Every
//! call is recorded ([`history`]) and the history is judged by independent
//! checkers ([`check`]): linearizability per register, lock safety and
//! fencing, sequential names, watch delivery, durability across a restart
//! of every replica, session expiry and catch-up.
//!
//! Run it with `synod-faults run` (one run) or `synod-faults soak` (runs
//! for as long as asked); `synod-faults check DIR` judges a saved history
//! again. The default test suite runs a short version
//! (`faults/tests/short_run.rs`).

pub mod check;
pub mod cluster;
pub mod history;
pub mod nemesis;
pub mod net;
pub mod recorder;
pub mod report;
pub mod run;
pub mod workload;
