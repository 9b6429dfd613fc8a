//! Robustness of snapshot restore against damaged input: a snapshot of a
//! busy state is truncated, has bytes flipped, or has bytes flipped and its
//! checksum recomputed (so the damage reaches the decoder and the invariant
//! checks). Restore must return an error or a valid state, never panic, and
//! a state it accepts must round-trip through its own snapshot. (Keys out of
//! order or repeated are refused; postcard accepts over-long varints, so an
//! accepted snapshot is not always byte-canonical.)

use proptest::prelude::*;
use synod_proto::{CreateMode, LockMode, Op, OpResult, Request};
use synod_server::state::{Command, StateConfig, StateMachine};

/// A state with nodes, ephemerals, sessions, a held lock, a queued waiter,
/// an election and a lock-delay in progress.
fn busy_state() -> StateMachine {
    let mut state = StateMachine::new(StateConfig::default());
    let mut sessions = Vec::new();
    for now_ms in 1..=3 {
        let applied = state.apply(&Command::OpenSession {
            owner: "CN=test".into(),
            secret: 1,
            timeout_ms: 5_000,
            now_ms,
        });
        if let Some(Ok(OpResult::SessionOpened { session, .. })) =
            applied.response.map(|r| r.result)
        {
            sessions.push(session);
        }
    }
    let ops = [
        (
            0,
            Op::Create {
                path: "/a".into(),
                data: b"x".to_vec(),
                mode: CreateMode::Persistent,
            },
        ),
        (
            1,
            Op::Create {
                path: "/a/e".into(),
                data: vec![],
                mode: CreateMode::Ephemeral,
            },
        ),
        (
            0,
            Op::Create {
                path: "/a/s-".into(),
                data: vec![1, 2],
                mode: CreateMode::PersistentSequential,
            },
        ),
        (
            0,
            Op::AcquireLock {
                path: "/l".into(),
                mode: LockMode::Exclusive,
                wait: false,
                lock_delay_ms: 5_000,
            },
        ),
        (
            1,
            Op::AcquireLock {
                path: "/l".into(),
                mode: LockMode::Exclusive,
                wait: true,
                lock_delay_ms: 0,
            },
        ),
        (
            2,
            Op::Campaign {
                path: "/e".into(),
                value: b"me".to_vec(),
            },
        ),
        (
            2,
            Op::AcquireLock {
                path: "/m".into(),
                mode: LockMode::Shared,
                wait: false,
                lock_delay_ms: 9_000,
            },
        ),
    ];
    for (sequence, (index, op)) in ops.into_iter().enumerate() {
        state.apply(&Command::Client {
            request: Request {
                session: sessions[index],
                sequence: sequence as u64 + 1,
                op,
            },
            now_ms: 10,
        });
    }
    state.apply(&Command::ExpireSessions {
        sessions: vec![sessions[2]],
        now_ms: 20,
    });
    state
}

fn reseal(bytes: &mut [u8]) {
    let end = bytes.len() - 4;
    let checksum = crc32fast::hash(&bytes[..end]).to_le_bytes();
    bytes[end..].copy_from_slice(&checksum);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn damaged_snapshots_are_refused_or_valid_never_a_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        truncate in any::<prop::sample::Index>(),
        mode in 0u8..3,
    ) {
        let original = busy_state().snapshot();
        let mut bytes = original.clone();
        match mode {
            0 => bytes.truncate(truncate.index(bytes.len())),
            1 => {
                for (at, mask) in &flips {
                    let at = at.index(bytes.len());
                    bytes[at] ^= mask;
                }
            }
            _ => {
                // Damage only the body, then make the checksum agree.
                let body = 24..bytes.len() - 4;
                for (at, mask) in &flips {
                    let at = body.start + at.index(body.len());
                    bytes[at] ^= mask;
                }
                reseal(&mut bytes);
            }
        }
        match StateMachine::restore(StateConfig::default(), &bytes) {
            Ok(state) => {
                // Accepted damage (say, an over-long varint that still decodes
                // to a valid value) must yield a state that round-trips.
                let again = StateMachine::restore(StateConfig::default(), &state.snapshot())
                    .map_err(|error| TestCaseError::fail(error.to_string()))?;
                prop_assert_eq!(again, state);
            }
            Err(error) => prop_assert!(!error.to_string().is_empty()),
        }
    }
}

#[test]
fn the_busy_state_round_trips() {
    let state = busy_state();
    assert_eq!(state.sessions().len(), 2);
    assert!(state.next_lock_delay_end_ms().is_some());
    let bytes = state.snapshot();
    let restored = StateMachine::restore(StateConfig::default(), &bytes).expect("restores");
    assert_eq!(restored, state);
}
