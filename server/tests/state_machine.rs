//! Scenario tests of the coordination state machine: one test per error case
//! of DESIGN.md section 2, plus sessions (timeouts, expiry, at-most-once
//! retries, checkpoints), watches (which op fires which event, reconnect),
//! locks (FIFO fairness with one wake-up per release, lock-delay on expiry,
//! strictly increasing tokens, a multi guarded by a stale token), elections,
//! and snapshots (determinism and corruption). Each test drives a
//! `StateMachine` through `Command`s exactly as the replica will, with a
//! hand-advanced leader clock.

use synod_proto::{
    CreateMode, Error, Event, EventType, LockMode, MultiOp, MultiResult, Op, OpResult, Request,
    Sequencer, SessionId, WatchKind,
};
use synod_server::state::snapshot::SnapshotError;
use synod_server::state::watch::{EventHistory, WatchRegistry};
use synod_server::state::{Applied, Command, SessionRemaining, StateConfig, StateMachine};
use synod_server::storage::StateTable;

/// Drives a state machine with a leader clock and per-session sequence numbers.
struct Harness {
    state: StateMachine,
    now_ms: u64,
    sequences: std::collections::BTreeMap<SessionId, u64>,
}

impl Harness {
    fn new() -> Self {
        Self::with_config(StateConfig::default())
    }

    fn with_config(config: StateConfig) -> Self {
        Harness {
            state: StateMachine::new(config),
            now_ms: 1_000,
            sequences: Default::default(),
        }
    }

    fn open(&mut self) -> SessionId {
        let applied = self.state.apply(&Command::OpenSession {
            owner: "CN=test".into(),
            secret: 1,
            timeout_ms: 10_000,
            now_ms: self.now_ms,
        });
        match applied.response.map(|r| r.result) {
            Some(Ok(OpResult::SessionOpened { session, .. })) => session,
            other => panic!("open failed: {other:?}"),
        }
    }

    fn apply(&mut self, session: SessionId, op: Op) -> Applied {
        let sequence = self.sequences.entry(session).or_insert(0);
        *sequence += 1;
        let request = Request {
            session,
            sequence: *sequence,
            op,
        };
        self.state.apply(&Command::Client {
            request,
            now_ms: self.now_ms,
        })
    }

    fn ok(&mut self, session: SessionId, op: Op) -> OpResult {
        let applied = self.apply(session, op.clone());
        match applied.response.map(|r| r.result) {
            Some(Ok(result)) => result,
            other => panic!("{op:?} failed: {other:?}"),
        }
    }

    fn err(&mut self, session: SessionId, op: Op) -> Error {
        let applied = self.apply(session, op.clone());
        match applied.response.map(|r| r.result) {
            Some(Err(error)) => error,
            other => panic!("{op:?} should fail: {other:?}"),
        }
    }

    fn create(&mut self, session: SessionId, path: &str, mode: CreateMode) -> String {
        match self.ok(session, create(path, mode)) {
            OpResult::Created { path, .. } => path,
            other => panic!("{other:?}"),
        }
    }

    fn expire(&mut self, sessions: &[SessionId]) -> Applied {
        self.state.apply(&Command::ExpireSessions {
            sessions: sessions.to_vec(),
            now_ms: self.now_ms,
        })
    }

    fn tick(&mut self, now_ms: u64) -> Applied {
        self.now_ms = now_ms;
        self.state.apply(&Command::Tick { now_ms })
    }
}

fn create(path: &str, mode: CreateMode) -> Op {
    Op::Create {
        path: path.into(),
        data: b"d".to_vec(),
        mode,
    }
}

fn set(path: &str, expected_version: Option<u64>) -> Op {
    Op::SetData {
        path: path.into(),
        data: b"new".to_vec(),
        expected_version,
    }
}

fn delete(path: &str, expected_version: Option<u64>) -> Op {
    Op::Delete {
        path: path.into(),
        expected_version,
    }
}

fn lock(path: &str, mode: LockMode, wait: bool) -> Op {
    Op::AcquireLock {
        path: path.into(),
        mode,
        wait,
        lock_delay_ms: 0,
    }
}

fn event(path: &str, event_type: EventType, revision: u64) -> Event {
    Event {
        path: path.into(),
        event_type,
        revision,
    }
}

fn acquired(result: OpResult) -> Sequencer {
    match result {
        OpResult::LockAcquired { sequencer } | OpResult::Elected { sequencer } => sequencer,
        other => panic!("not granted: {other:?}"),
    }
}

use CreateMode::{Ephemeral, EphemeralSequential, Persistent, PersistentSequential};

#[test]
fn create_requires_parent_and_refuses_duplicates() {
    let mut h = Harness::new();
    let s = h.open();
    assert_eq!(
        h.err(s, create("/a/b", Persistent)),
        Error::NoNode { path: "/a".into() }
    );
    h.create(s, "/a", Persistent);
    assert_eq!(
        h.err(s, create("/a", Persistent)),
        Error::NodeExists { path: "/a".into() }
    );
    assert_eq!(
        h.err(s, create("/", Persistent)),
        Error::NodeExists { path: "/".into() }
    );
    h.create(s, "/a/b", Persistent);
}

#[test]
fn ephemeral_nodes_cannot_have_children() {
    let mut h = Harness::new();
    let s = h.open();
    h.create(s, "/e", Ephemeral);
    assert_eq!(
        h.err(s, create("/e/child", Persistent)),
        Error::NoChildrenForEphemerals { path: "/e".into() }
    );
    assert_eq!(h.state.stat("/e").map(|s| s.ephemeral_owner), Some(s));
}

#[test]
fn sequential_nodes_take_the_parents_counter() {
    let mut h = Harness::new();
    let s = h.open();
    h.create(s, "/q", Persistent);
    assert_eq!(
        h.create(s, "/q/n-", PersistentSequential),
        "/q/n-0000000000"
    );
    assert_eq!(h.create(s, "/q/n-", EphemeralSequential), "/q/n-0000000001");
    h.ok(s, delete("/q/n-0000000000", None));
    // The counter counts deletions too (it is the child version), so names never repeat.
    assert_eq!(h.create(s, "/q/", PersistentSequential), "/q/0000000003");
    assert_eq!(h.create(s, "/top", PersistentSequential), "/top0000000001");
}

#[test]
fn delete_checks_version_and_children() {
    let mut h = Harness::new();
    let s = h.open();
    h.create(s, "/a", Persistent);
    h.create(s, "/a/b", Persistent);
    assert_eq!(
        h.err(s, delete("/a", None)),
        Error::NotEmpty { path: "/a".into() }
    );
    assert_eq!(
        h.err(s, delete("/a/b", Some(3))),
        Error::BadVersion {
            path: "/a/b".into(),
            expected_version: 3,
            actual_version: 0
        }
    );
    assert_eq!(
        h.err(s, delete("/nope", None)),
        Error::NoNode {
            path: "/nope".into()
        }
    );
    assert!(matches!(
        h.err(s, delete("/", None)),
        Error::BadArgument { .. }
    ));
    h.ok(s, delete("/a/b", Some(0)));
    h.ok(s, delete("/a", None));
}

#[test]
fn set_checks_version_and_updates_stat() {
    let mut h = Harness::new();
    let s = h.open();
    h.create(s, "/a", Persistent);
    let created = h.state.stat("/a").expect("exists");
    h.now_ms += 5;
    let stat = match h.ok(s, set("/a", Some(0))) {
        OpResult::DataSet { stat } => stat,
        other => panic!("{other:?}"),
    };
    assert_eq!(stat.version, 1);
    assert_eq!(stat.data_length, 3);
    assert_eq!(stat.created_revision, created.created_revision);
    assert!(stat.modified_revision > created.modified_revision);
    assert_eq!(stat.modified_time_ms, created.created_time_ms + 5);
    assert_eq!(
        h.err(s, set("/a", Some(0))),
        Error::BadVersion {
            path: "/a".into(),
            expected_version: 0,
            actual_version: 1
        }
    );
    assert_eq!(
        h.err(s, set("/b", None)),
        Error::NoNode { path: "/b".into() }
    );
}

#[test]
fn bad_paths_and_oversized_data_are_refused_with_reasons() {
    let config = StateConfig {
        data_bytes_max: 8,
        path_bytes_max: 16,
        ..StateConfig::default()
    };
    let mut h = Harness::with_config(config);
    let s = h.open();
    for path in [
        "",
        "a",
        "/a/",
        "//a",
        "/a/./b",
        "/a/../b",
        "/a\u{7}",
        "/0123456789abcdefg",
    ] {
        let error = h.err(s, create(path, Persistent));
        assert!(
            matches!(error, Error::BadArgument { .. }),
            "{path}: {error}"
        );
    }
    assert!(matches!(
        h.err(s, Op::GetData { path: "x".into() }),
        Error::BadArgument { .. }
    ));
    let error = h.err(
        s,
        Op::Create {
            path: "/big".into(),
            data: vec![0; 9],
            mode: Persistent,
        },
    );
    assert_eq!(
        error,
        Error::DataTooLarge {
            size_bytes: 9,
            max_bytes: 8
        }
    );
    assert!(error.to_string().contains("exceeds"));
}

#[test]
fn children_are_sorted_names_and_skip_grandchildren() {
    let mut h = Harness::new();
    let s = h.open();
    for path in [
        "/a", "/a/b", "/a/b/x", "/a/b!", "/a/b-c", "/a/b/x/y", "/a/c", "/ab",
    ] {
        h.create(s, path, Persistent);
    }
    match h.ok(s, Op::GetChildren { path: "/a".into() }) {
        OpResult::Children { children, stat } => {
            assert_eq!(children, ["b", "b!", "b-c", "c"]);
            assert_eq!(stat.children_count, 4);
        }
        other => panic!("{other:?}"),
    }
    match h.ok(s, Op::GetChildren { path: "/".into() }) {
        OpResult::Children { children, .. } => assert_eq!(children, ["a", "ab"]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn operations_fire_zookeeper_events() {
    let mut h = Harness::new();
    let s = h.open();
    let applied = h.apply(s, create("/a", Persistent));
    let r = applied.revision;
    assert_eq!(
        applied.events,
        [
            event("/a", EventType::NodeCreated, r),
            event("/", EventType::NodeChildrenChanged, r)
        ]
    );
    let applied = h.apply(s, set("/a", None));
    assert_eq!(
        applied.events,
        [event("/a", EventType::NodeDataChanged, r + 1)]
    );
    let applied = h.apply(s, delete("/a", None));
    assert_eq!(
        applied.events,
        [
            event("/a", EventType::NodeDeleted, r + 2),
            event("/", EventType::NodeChildrenChanged, r + 2)
        ]
    );
    // Reads and failures fire nothing and take no revision.
    let applied = h.apply(s, Op::GetData { path: "/a".into() });
    assert!(applied.events.is_empty());
    assert_eq!(applied.revision, r + 2);
}

#[test]
fn watch_registry_fires_the_right_watches_once() {
    let mut watches = WatchRegistry::new(10, 1 << 20, 4096);
    watches.add(1, "/a", WatchKind::Data).expect("room");
    watches.add(2, "/a", WatchKind::Exists).expect("room");
    watches.add(3, "/", WatchKind::Children).expect("room");
    watches
        .add(4, "/", WatchKind::PersistentRecursive)
        .expect("room");
    let fired = watches.dispatch(&[event("/a", EventType::NodeDataChanged, 5)]);
    let sessions: Vec<_> = fired.iter().map(|n| n.session).collect();
    assert_eq!(sessions, [1, 2, 4]);
    // One-shot watches are gone; the persistent one stays.
    let fired = watches.dispatch(&[
        event("/a", EventType::NodeDeleted, 6),
        event("/", EventType::NodeChildrenChanged, 6),
    ]);
    let sessions: Vec<_> = fired.iter().map(|n| n.session).collect();
    assert_eq!(sessions, [4, 3]);
    assert!(watches.watches_of(1).is_empty());
    assert_eq!(
        watches.watches_of(4),
        [("/".to_string(), WatchKind::PersistentRecursive)]
    );
    for path in [
        "/w0", "/w1", "/w2", "/w3", "/w4", "/w5", "/w6", "/w7", "/w8", "/w9",
    ] {
        watches.add(9, path, WatchKind::Data).expect("room");
    }
    assert!(matches!(
        watches.add(9, "/w10", WatchKind::Data),
        Err(Error::LimitExceeded { ref limit, .. }) if limit == "limits.watches_per_session_max"
    ));
    // Path bytes are bounded too, and removing a watch gives its bytes back.
    let mut watches = WatchRegistry::new(100, 10, 4096);
    watches.add(1, "/abcd", WatchKind::Data).expect("5 bytes");
    watches
        .add(1, "/efgh", WatchKind::Exists)
        .expect("10 bytes");
    assert!(matches!(
        watches.add(1, "/i", WatchKind::Data),
        Err(Error::LimitExceeded { ref limit, .. })
            if limit == "limits.watch_path_bytes_per_session_max"
    ));
    assert!(watches.remove(1, "/abcd", WatchKind::Data));
    assert_eq!(watches.path_bytes_of(1), 5);
    watches.add(1, "/i", WatchKind::Data).expect("room again");
    watches.remove_session(1);
    assert_eq!(watches.path_bytes_of(1), 0);
}

#[test]
fn a_registry_whose_watches_are_all_gone_holds_nothing() {
    let fresh = WatchRegistry::new(10, 100, 4096);
    let mut watches = fresh.clone();
    assert!(watches.is_empty());
    watches.add(1, "/a", WatchKind::Data).expect("room");
    watches.add(2, "/b", WatchKind::Exists).expect("room");
    watches.add(2, "/c", WatchKind::Children).expect("room");
    assert!(!watches.is_empty());
    assert_eq!(watches.len(), 3);
    // By removal, by session, and by firing: nothing is left behind.
    assert!(watches.remove(1, "/a", WatchKind::Data));
    watches.remove_session(2);
    assert_eq!(watches, fresh);
    watches.add(3, "/d", WatchKind::Data).expect("room");
    watches.dispatch(&[event("/d", EventType::NodeDataChanged, 7)]);
    assert_eq!(watches, fresh);
}

#[test]
fn a_history_drops_its_oldest_events_past_its_bound_however_they_come() {
    let everything = [("/".to_string(), WatchKind::PersistentRecursive)];
    let mut history = EventHistory::new(3);
    history.record(&[event("/a", EventType::NodeCreated, 1)]);
    history.record(&[
        event("/b", EventType::NodeCreated, 2),
        event("/c", EventType::NodeCreated, 3),
    ]);
    // At the bound: nothing dropped.
    assert_eq!(history.missed(&everything, 0).events.len(), 3);
    history.record(&[
        event("/d", EventType::NodeCreated, 4),
        event("/e", EventType::NodeCreated, 5),
        event("/f", EventType::NodeCreated, 6),
        event("/g", EventType::NodeCreated, 7),
    ]);
    let compacted = history.missed(&everything, 3).events;
    assert_eq!(compacted.len(), 1);
    assert_eq!(compacted[0].event_type, EventType::HistoryCompacted);
    assert_eq!(compacted[0].revision, 4, "the last revision dropped");
    let kept: Vec<synod_proto::Revision> = history
        .missed(&everything, 4)
        .events
        .iter()
        .map(|event| event.revision)
        .collect();
    assert_eq!(kept, [5, 6, 7]);
}

#[test]
fn reconnect_delivers_missed_events_or_says_history_is_compacted() {
    let mut history = EventHistory::new(4);
    history.record(&[
        event("/a", EventType::NodeCreated, 1),
        event("/", EventType::NodeChildrenChanged, 1),
    ]);
    history.record(&[event("/a", EventType::NodeDataChanged, 2)]);
    history.record(&[event("/a", EventType::NodeDataChanged, 3)]);
    let watches = vec![
        ("/a".to_string(), WatchKind::Data),
        ("/".to_string(), WatchKind::PersistentRecursive),
    ];
    let missed = history.missed(&watches, 1);
    assert_eq!(
        missed.events,
        [
            event("/a", EventType::NodeDataChanged, 2),
            event("/a", EventType::NodeDataChanged, 3)
        ]
    );
    assert_eq!(
        missed.watches,
        [("/".to_string(), WatchKind::PersistentRecursive)]
    );
    history.record(&[event("/b", EventType::NodeCreated, 4)]);
    let missed = history.missed(&watches, 0);
    assert_eq!(missed.events[0].event_type, EventType::HistoryCompacted);
    assert_eq!(history.missed(&watches, 4).events, []);
}

#[test]
fn sessions_are_clamped_and_end_atomically() {
    let config = StateConfig::default();
    let mut h = Harness::new();
    let applied = h.state.apply(&Command::OpenSession {
        owner: "CN=test".into(),
        secret: 1,
        timeout_ms: 1,
        now_ms: 1,
    });
    assert!(matches!(
        applied.response.map(|r| r.result),
        Some(Ok(OpResult::SessionOpened { timeout_ms, .. })) if timeout_ms == config.session_timeout_min_ms
    ));
    let s = h.open();
    let other = h.open();
    h.create(s, "/p", Persistent);
    h.create(s, "/p/e1", Ephemeral);
    h.create(s, "/e2", Ephemeral);
    acquired(h.ok(s, lock("/l", LockMode::Exclusive, false)));
    h.ok(other, lock("/l", LockMode::Exclusive, true));
    let applied = h.expire(&[s]);
    let r = applied.revision;
    assert_eq!(
        applied.events,
        [
            event("/e2", EventType::NodeDeleted, r),
            event("/", EventType::NodeChildrenChanged, r),
            event("/p/e1", EventType::NodeDeleted, r),
            event("/p", EventType::NodeChildrenChanged, r),
        ]
    );
    assert_eq!(applied.grants.len(), 1);
    assert_eq!(applied.grants[0].session, other);
    assert_eq!(applied.ended_sessions, [s]);
    assert!(h.state.stat("/p").is_some());
    assert_eq!(h.err(s, Op::Sync), Error::SessionExpired { session: s });
    // Closing works the same, and a closed session is gone.
    assert_eq!(h.ok(other, Op::CloseSession), OpResult::SessionClosed);
    assert_eq!(
        h.err(other, Op::Sync),
        Error::SessionExpired { session: other }
    );
}

#[test]
fn only_the_owner_presenting_its_secret_may_use_a_session() {
    let mut h = Harness::new();
    let s = h.open();
    let timeout_ms = h.state.session_timeout_ms(s).expect("the session is open");
    assert_eq!(h.state.check_session_owner(s, "CN=test", 1), Ok(timeout_ms));
    let another_identity = h
        .state
        .check_session_owner(s, "CN=intruder", 1)
        .expect_err("another identity");
    assert!(
        matches!(&another_identity, Error::BadArgument { message } if message.contains("another client identity")),
        "{another_identity}"
    );
    let wrong_secret = h
        .state
        .check_session_owner(s, "CN=test", 2)
        .expect_err("a wrong secret");
    assert!(
        matches!(&wrong_secret, Error::BadArgument { message } if message.contains("wrong secret")),
        "{wrong_secret}"
    );
    assert_eq!(
        h.state.check_session_owner(s + 1, "CN=test", 1),
        Err(Error::SessionExpired { session: s + 1 })
    );
    assert_eq!(h.state.session_timeout_ms(s + 1), None);
    h.ok(s, Op::CloseSession);
    assert_eq!(
        h.state.check_session_owner(s, "CN=test", 1),
        Err(Error::SessionExpired { session: s })
    );
    assert_eq!(h.state.session_timeout_ms(s), None);
}

#[test]
fn the_state_counts_what_it_holds() {
    let mut h = Harness::new();
    assert_eq!(
        (
            h.state.revision(),
            h.state.node_count(),
            h.state.lock_count()
        ),
        (0, 1, 0),
        "a new state holds the root alone"
    );
    let [a, b] = [h.open(), h.open()];
    assert_eq!(h.state.session_timeout_ms(a), Some(10_000));
    assert_eq!(h.state.session_count(), 2);
    assert_eq!(h.state.sessions_of_owner("CN=test"), 2);
    assert_eq!(h.state.sessions_of_owner("CN=other"), 0);
    h.create(a, "/x", Persistent);
    h.create(a, "/x/y", Persistent);
    let created = h.state.revision();
    assert_eq!(h.state.node_count(), 3);
    acquired(h.ok(a, lock("/l1", LockMode::Exclusive, false)));
    acquired(h.ok(a, lock("/l2", LockMode::Exclusive, false)));
    h.ok(b, lock("/l2", LockMode::Exclusive, true));
    assert_eq!(h.state.lock_count(), 2);
    assert_eq!(h.state.lock_waiter_count(), 1);
    h.ok(a, delete("/x/y", None));
    assert!(h.state.revision() > created, "a deletion takes a revision");
    assert_eq!(h.state.node_count(), 2);
}

#[test]
fn the_state_keeps_the_latest_leader_time_and_saves_everything_anew_when_asked() {
    let mut h = Harness::new();
    let a = h.open();
    assert_eq!(h.state.now_ms(), 1_000, "the time of the last command");
    h.tick(5_000);
    assert_eq!(h.state.now_ms(), 5_000);
    h.tick(3_000);
    assert_eq!(
        h.state.now_ms(),
        5_000,
        "a new leader's clock behind the last one's never moves time back"
    );
    h.create(a, "/x", Persistent);
    acquired(h.ok(a, lock("/l", LockMode::Exclusive, false)));
    let membership = synod_paxos::Membership::new(&[1, 2, 3]).expect("membership");
    let tables = |delta: &synod_server::storage::StateDelta| {
        let mut tables: Vec<StateTable> = delta.changes.keys().map(|(table, _)| *table).collect();
        tables.dedup();
        tables
    };
    let first = h.state.take_delta(1, &membership);
    assert_eq!(
        tables(&first),
        vec![StateTable::Nodes, StateTable::Sessions, StateTable::Locks]
    );
    assert!(h.state.take_delta(2, &membership).changes.is_empty());
    h.state.mark_all_dirty();
    let anew = h.state.take_delta(3, &membership);
    assert_eq!(
        anew.changes.keys().collect::<Vec<_>>(),
        first.changes.keys().collect::<Vec<_>>(),
        "every node, session and lock is saved again"
    );
}

#[test]
fn retried_requests_are_applied_once_with_the_original_result() {
    let mut h = Harness::new();
    let s = h.open();
    let request = Request {
        session: s,
        sequence: 7,
        op: create("/q/", PersistentSequential),
    };
    let command = Command::Client { request, now_ms: 5 };
    let first = h.state.apply(&command);
    let revision = h.state.revision();
    let membership = synod_paxos::Membership::new(&[1, 2, 3]).expect("membership");
    assert!(!h.state.take_delta(1, &membership).changes.is_empty());
    let retry = h.state.apply(&command);
    assert_eq!(retry.response, first.response);
    assert_eq!(h.state.revision(), revision, "the retry changed nothing");
    assert!(retry.events.is_empty());
    assert_eq!(
        h.state.take_delta(2, &membership).changes,
        Default::default(),
        "the retry left nothing to save"
    );
    let older = Command::Client {
        request: Request {
            session: s,
            sequence: 6,
            op: Op::Sync,
        },
        now_ms: 5,
    };
    assert!(matches!(
        h.state.apply(&older).response.map(|r| r.result),
        Some(Err(Error::StaleRequestSequence {
            sequence: 6,
            last_sequence: 7,
            ..
        }))
    ));
}

#[test]
fn checkpoints_let_a_new_leader_resume_session_deadlines() {
    let mut h = Harness::new();
    let s = h.open();
    h.now_ms = 5_000;
    h.state.apply(&Command::CheckpointSessions {
        remaining: vec![SessionRemaining {
            session: s,
            remaining_ms: 3_000,
        }],
        now_ms: 5_000,
    });
    h.tick(6_000);
    // 1 s passed since the checkpoint: 2 s left, plus the grace.
    assert_eq!(h.state.session_deadlines_ms(100_000, 500), [(s, 102_500)]);
}

#[test]
fn multi_is_all_or_nothing_and_names_the_failed_op() {
    let mut h = Harness::new();
    let s = h.open();
    h.create(s, "/a", Persistent);
    let before = (h.state.revision(), h.state.dump_nodes());
    let error = h.err(
        s,
        Op::Multi {
            ops: vec![
                MultiOp::Create {
                    path: "/a/x".into(),
                    data: vec![],
                    mode: PersistentSequential,
                },
                MultiOp::SetData {
                    path: "/a".into(),
                    data: b"v".to_vec(),
                    expected_version: None,
                },
                MultiOp::Delete {
                    path: "/a".into(),
                    expected_version: None,
                },
            ],
        },
    );
    assert_eq!(
        error,
        Error::MultiOpFailed {
            index: 2,
            cause: Box::new(Error::NotEmpty { path: "/a".into() })
        }
    );
    assert_eq!(
        (h.state.revision(), h.state.dump_nodes()),
        before,
        "a failed multi changes nothing"
    );
    let result = h.ok(
        s,
        Op::Multi {
            ops: vec![
                MultiOp::Check {
                    path: "/a".into(),
                    expected_version: Some(0),
                },
                MultiOp::Create {
                    path: "/a/x".into(),
                    data: vec![],
                    mode: Persistent,
                },
                MultiOp::Delete {
                    path: "/a/x".into(),
                    expected_version: None,
                },
            ],
        },
    );
    assert_eq!(
        result,
        OpResult::Multi {
            results: vec![
                MultiResult::Checked,
                MultiResult::Created {
                    path: "/a/x".into()
                },
                MultiResult::Deleted
            ]
        }
    );
}

#[test]
fn exclusive_waiters_are_granted_in_arrival_order_one_per_release() {
    let mut h = Harness::new();
    let holder = h.open();
    let waiters: Vec<SessionId> = (0..5).map(|_| h.open()).collect();
    let mut last = acquired(h.ok(holder, lock("/l", LockMode::Exclusive, true))).generation;
    for (ahead, waiter) in waiters.iter().enumerate() {
        assert_eq!(
            h.ok(*waiter, lock("/l", LockMode::Exclusive, true)),
            OpResult::LockQueued {
                waiters_ahead: ahead as u64
            }
        );
    }
    let mut current = holder;
    for waiter in &waiters {
        let applied = h.apply(current, Op::ReleaseLock { path: "/l".into() });
        assert_eq!(applied.grants.len(), 1, "exactly one wake-up per release");
        assert_eq!(applied.grants[0].session, *waiter);
        assert!(
            applied.grants[0].sequencer.generation > last,
            "tokens strictly increase"
        );
        last = applied.grants[0].sequencer.generation;
        current = *waiter;
    }
    let applied = h.apply(current, Op::ReleaseLock { path: "/l".into() });
    assert!(applied.grants.is_empty());
}

#[test]
fn shared_holders_coexist_and_an_exclusive_waiter_blocks_newcomers() {
    let mut h = Harness::new();
    let [a, b, c, d] = [h.open(), h.open(), h.open(), h.open()];
    acquired(h.ok(a, lock("/l", LockMode::Shared, false)));
    acquired(h.ok(b, lock("/l", LockMode::Shared, false)));
    assert_eq!(
        h.err(c, lock("/l", LockMode::Exclusive, false)),
        Error::LockBusy { path: "/l".into() }
    );
    h.ok(c, lock("/l", LockMode::Exclusive, true));
    // A shared request queues behind the exclusive waiter: no writer starvation.
    assert_eq!(
        h.ok(d, lock("/l", LockMode::Shared, true)),
        OpResult::LockQueued { waiters_ahead: 1 }
    );
    assert!(h
        .apply(a, Op::ReleaseLock { path: "/l".into() })
        .grants
        .is_empty());
    let applied = h.apply(b, Op::ReleaseLock { path: "/l".into() });
    assert_eq!(
        applied.grants.iter().map(|g| g.session).collect::<Vec<_>>(),
        [c]
    );
    let applied = h.apply(c, Op::ReleaseLock { path: "/l".into() });
    assert_eq!(
        applied.grants.iter().map(|g| g.session).collect::<Vec<_>>(),
        [d]
    );
}

#[test]
fn lock_errors() {
    let mut h = Harness::new();
    let [a, b] = [h.open(), h.open()];
    assert_eq!(
        h.err(a, Op::ReleaseLock { path: "/l".into() }),
        Error::LockNotHeld { path: "/l".into() }
    );
    acquired(h.ok(a, lock("/l", LockMode::Exclusive, false)));
    assert_eq!(
        h.err(a, lock("/l", LockMode::Exclusive, true)),
        Error::LockAlreadyRequested { path: "/l".into() }
    );
    assert_eq!(
        h.err(b, Op::ReleaseLock { path: "/l".into() }),
        Error::LockNotHeld { path: "/l".into() }
    );
    assert!(matches!(
        h.err(
            b,
            Op::Campaign {
                path: "/l".into(),
                value: vec![]
            }
        ),
        Error::BadArgument { .. }
    ));
    assert!(matches!(
        h.err(b, lock("bad", LockMode::Shared, false)),
        Error::BadArgument { .. }
    ));
}

#[test]
fn lock_is_released_on_expiry_after_its_lock_delay() {
    let mut h = Harness::new();
    let [holder, waiter, late] = [h.open(), h.open(), h.open()];
    acquired(h.ok(
        holder,
        Op::AcquireLock {
            path: "/l".into(),
            mode: LockMode::Exclusive,
            wait: false,
            lock_delay_ms: 2_000,
        },
    ));
    h.ok(waiter, lock("/l", LockMode::Exclusive, true));
    let applied = h.expire(&[holder]);
    assert!(applied.grants.is_empty(), "no grant during the lock-delay");
    assert_eq!(h.state.next_lock_delay_end_ms(), Some(h.now_ms + 2_000));
    h.now_ms += 1_000;
    assert_eq!(
        h.err(late, lock("/l", LockMode::Exclusive, false)),
        Error::LockBusy { path: "/l".into() }
    );
    assert!(h.tick(2_999).grants.is_empty());
    let applied = h.tick(3_000);
    assert_eq!(applied.grants.len(), 1);
    assert_eq!(applied.grants[0].session, waiter);
    assert_eq!(h.state.next_lock_delay_end_ms(), None);
    // A clean close starts no lock-delay.
    h.ok(waiter, Op::CloseSession);
    acquired(h.ok(late, lock("/l", LockMode::Exclusive, false)));
}

#[test]
fn tokens_increase_across_restarts_and_stale_tokens_fence_writes() {
    let mut h = Harness::new();
    let [a, b] = [h.open(), h.open()];
    h.create(a, "/data", Persistent);
    let old = acquired(h.ok(a, lock("/l", LockMode::Exclusive, false)));
    assert_eq!(
        h.ok(
            b,
            Op::CheckSequencer {
                sequencer: old.clone()
            }
        ),
        OpResult::SequencerCurrent
    );
    h.ok(a, Op::ReleaseLock { path: "/l".into() });
    // Restart from a snapshot: the generation counter survives.
    h.state = StateMachine::restore(StateConfig::default(), &h.state.snapshot()).expect("restores");
    let new = acquired(h.ok(b, lock("/l", LockMode::Exclusive, false)));
    assert!(new.generation > old.generation);
    assert!(matches!(
        h.err(
            a,
            Op::CheckSequencer {
                sequencer: old.clone()
            }
        ),
        Error::StaleSequencer { .. }
    ));
    let before = (h.state.revision(), h.state.dump_nodes());
    let guarded = |sequencer: Sequencer| Op::Multi {
        ops: vec![
            MultiOp::CheckSequencer { sequencer },
            MultiOp::SetData {
                path: "/data".into(),
                data: b"x".to_vec(),
                expected_version: None,
            },
        ],
    };
    let error = h.err(a, guarded(old.clone()));
    assert_eq!(
        error,
        Error::MultiOpFailed {
            index: 0,
            cause: Box::new(Error::StaleSequencer {
                path: "/l".into(),
                mode: LockMode::Exclusive,
                generation: old.generation
            })
        }
    );
    assert_eq!(
        (h.state.revision(), h.state.dump_nodes()),
        before,
        "the stale-guarded multi changed nothing"
    );
    h.ok(b, guarded(new));
}

#[test]
fn election_campaign_resign_and_leader_events() {
    let mut h = Harness::new();
    let [a, b] = [h.open(), h.open()];
    let applied = h.apply(
        a,
        Op::Campaign {
            path: "/e".into(),
            value: b"a:1".to_vec(),
        },
    );
    assert_eq!(
        applied.events,
        [event("/e", EventType::LeaderChanged, applied.revision)]
    );
    assert_eq!(
        h.ok(
            b,
            Op::Campaign {
                path: "/e".into(),
                value: b"b:2".to_vec()
            }
        ),
        OpResult::CampaignQueued {
            candidates_ahead: 0
        }
    );
    match h.ok(b, Op::GetLeader { path: "/e".into() }) {
        OpResult::Leader {
            leader: Some(leader),
        } => {
            assert_eq!((leader.session, leader.value.as_slice()), (a, &b"a:1"[..]))
        }
        other => panic!("{other:?}"),
    }
    let applied = h.apply(a, Op::Resign { path: "/e".into() });
    assert_eq!(
        applied.events,
        [event("/e", EventType::LeaderChanged, applied.revision)]
    );
    assert!(applied.grants[0].election);
    let applied = h.expire(&[b]);
    assert_eq!(
        applied.events,
        [event("/e", EventType::LeaderChanged, applied.revision)]
    );
    assert_eq!(
        h.ok(a, Op::GetLeader { path: "/e".into() }),
        OpResult::Leader { leader: None }
    );
}

#[test]
fn snapshots_are_deterministic_and_corruption_is_reported() {
    let build = || {
        let mut h = Harness::new();
        let s = h.open();
        h.create(s, "/a", Persistent);
        h.create(s, "/a/e", Ephemeral);
        acquired(h.ok(s, lock("/l", LockMode::Shared, false)));
        h.state
    };
    let (one, two) = (build(), build());
    let bytes = one.snapshot();
    assert_eq!(bytes, two.snapshot());
    let restored = StateMachine::restore(StateConfig::default(), &bytes).expect("restores");
    assert_eq!(restored, one);

    let config = StateConfig::default;
    assert!(matches!(
        StateMachine::restore(config(), &bytes[..10]),
        Err(SnapshotError::Truncated { .. })
    ));
    assert!(matches!(
        StateMachine::restore(config(), &bytes[..bytes.len() - 1]),
        Err(SnapshotError::Truncated { .. })
    ));
    let mut flipped = bytes.clone();
    flipped[30] ^= 0x40;
    assert!(matches!(
        StateMachine::restore(config(), &flipped),
        Err(SnapshotError::ChecksumMismatch { .. })
    ));
    let mut magic = bytes.clone();
    magic[0] = b'X';
    assert_eq!(
        StateMachine::restore(config(), &magic),
        Err(SnapshotError::BadMagic)
    );
    let mut version = bytes.clone();
    version[8] = 9;
    assert!(matches!(
        StateMachine::restore(config(), &version),
        Err(SnapshotError::UnsupportedVersion { found: 9, .. })
    ));
    // A whole snapshot with an empty body is not truncated: its body is
    // what is wrong.
    let mut empty = bytes[..16].to_vec();
    empty.extend_from_slice(&0u64.to_le_bytes());
    let checksum = crc32fast::hash(&empty);
    empty.extend_from_slice(&checksum.to_le_bytes());
    assert!(matches!(
        StateMachine::restore(config(), &empty),
        Err(SnapshotError::Malformed(_))
    ));
}

#[test]
fn commands_round_trip_through_the_log_encoding() {
    let command = Command::Client {
        request: Request {
            session: 3,
            sequence: 9,
            op: create("/a", Ephemeral),
        },
        now_ms: 42,
    };
    assert_eq!(Command::decode(&command.encode()), Ok(command));
    assert!(Command::decode(&[0xff, 0xff]).is_err());
}

#[test]
fn multi_refuses_too_many_ops() {
    let config = StateConfig {
        multi_ops_max: 2,
        ..StateConfig::default()
    };
    let mut h = Harness::with_config(config);
    let s = h.open();
    let check = MultiOp::Check {
        path: "/".into(),
        expected_version: None,
    };
    let error = h.err(
        s,
        Op::Multi {
            ops: vec![check.clone(), check.clone(), check],
        },
    );
    assert!(matches!(error, Error::BadArgument { ref message } if message.contains("limit")));
}

#[test]
fn error_messages_say_what_to_do() {
    let messages = [
        Error::NoNode { path: "/a".into() }.to_string(),
        Error::NotEmpty { path: "/a".into() }.to_string(),
        Error::SessionExpired { session: 3 }.to_string(),
        Error::StaleSequencer {
            path: "/l".into(),
            mode: LockMode::Exclusive,
            generation: 4,
        }
        .to_string(),
    ];
    assert!(messages[0].contains("create it"));
    assert!(messages[1].contains("delete them first"));
    assert!(messages[2].contains("open a new session"));
    assert!(messages[3].contains("re-acquire"));
}
