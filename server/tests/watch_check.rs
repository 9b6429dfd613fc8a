//! Property tests of the per-replica watch machinery.
//!
//! 1. `WatchRegistry::dispatch` agrees with a naive model that, for each
//!    event, scans every registered watch with `WatchKind::fires_on`,
//!    notifies each matching session once, and drops fired one-shot watches.
//! 2. The reconnect computation agrees with live delivery: for one session,
//!    `EventHistory::missed(watches, last_seen)` returns exactly the events a
//!    registry holding those watches would have dispatched to it after
//!    `last_seen`, and leaves the same watches registered.
//! 3. Events from the state machine drive the registry end to end: an exists
//!    watch on a missing node fires on its creation, and a session's
//!    watches go when it ends.

use proptest::prelude::*;
use proptest::sample::select;
use synod_proto::{CreateMode, Event, EventType, Op, OpResult, Request, SessionId, WatchKind};
use synod_server::state::watch::{EventHistory, WatchRegistry};
use synod_server::state::{Command, StateConfig, StateMachine};

const PATHS: &[&str] = &["/", "/a", "/a/b", "/a/b/c", "/ab", "/b"];

fn kind() -> impl Strategy<Value = WatchKind> {
    select(vec![
        WatchKind::Data,
        WatchKind::Children,
        WatchKind::Exists,
        WatchKind::PersistentRecursive,
        WatchKind::Leader,
    ])
}

fn event_type() -> impl Strategy<Value = EventType> {
    select(vec![
        EventType::NodeCreated,
        EventType::NodeDeleted,
        EventType::NodeDataChanged,
        EventType::NodeChildrenChanged,
        EventType::LeaderChanged,
    ])
}

fn watch() -> impl Strategy<Value = (SessionId, String, WatchKind)> {
    (1u64..4, select(PATHS), kind()).prop_map(|(s, p, k)| (s, p.to_string(), k))
}

fn events() -> impl Strategy<Value = Vec<Event>> {
    prop::collection::vec((select(PATHS), event_type(), 0u64..3), 0..20).prop_map(|raw| {
        let mut revision = 0;
        raw.into_iter()
            .map(|(path, event_type, step)| {
                revision += step;
                Event {
                    path: path.to_string(),
                    event_type,
                    revision,
                }
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn dispatch_matches_a_naive_scan(watches in prop::collection::vec(watch(), 0..12), events in events()) {
        let mut registry = WatchRegistry::new(100, 1 << 20, 4096);
        let mut naive: Vec<(SessionId, String, WatchKind)> = Vec::new();
        for (session, path, kind) in &watches {
            registry.add(*session, path, *kind).map_err(|e| TestCaseError::fail(e.to_string()))?;
            if !naive.contains(&(*session, path.clone(), *kind)) {
                naive.push((*session, path.clone(), *kind));
            }
        }
        let mut expected = Vec::new();
        for event in &events {
            let mut sessions: Vec<SessionId> = naive
                .iter()
                .filter(|(_, path, kind)| kind.fires_on(path, &event.path, event.event_type))
                .map(|(session, _, _)| *session)
                .collect();
            sessions.sort();
            sessions.dedup();
            naive.retain(|(_, path, kind)| kind.is_persistent() || !kind.fires_on(path, &event.path, event.event_type));
            expected.extend(sessions.into_iter().map(|session| (session, event.clone())));
        }
        let actual: Vec<(SessionId, Event)> =
            registry.dispatch(&events).into_iter().map(|n| (n.session, n.event)).collect();
        prop_assert_eq!(actual, expected);
        for session in 1..4 {
            let mut left: Vec<(String, WatchKind)> = naive
                .iter()
                .filter(|(s, _, _)| *s == session)
                .map(|(_, p, k)| (p.clone(), *k))
                .collect();
            left.sort();
            prop_assert_eq!(registry.watches_of(session), left);
        }
    }

    #[test]
    fn reconnect_equals_live_delivery(
        watches in prop::collection::vec((select(PATHS), kind()), 0..8),
        events in events(),
        last_seen in 0u64..20,
    ) {
        let watches: Vec<(String, WatchKind)> = {
            let mut list: Vec<(String, WatchKind)> = watches.into_iter().map(|(p, k)| (p.to_string(), k)).collect();
            list.sort();
            list.dedup();
            list
        };
        let mut history = EventHistory::new(1_000);
        history.record(&events);
        let missed = history.missed(&watches, last_seen);

        let mut registry = WatchRegistry::new(100, 1 << 20, 4096);
        for (path, kind) in &watches {
            registry.add(1, path, *kind).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        let after: Vec<Event> = events.iter().filter(|e| e.revision > last_seen).cloned().collect();
        let live: Vec<Event> = registry.dispatch(&after).into_iter().map(|n| n.event).collect();
        prop_assert_eq!(missed.events, live);
        let mut remaining = missed.watches;
        remaining.sort();
        prop_assert_eq!(remaining, registry.watches_of(1));
    }
}

#[test]
fn state_machine_events_drive_the_registry() {
    let mut state = StateMachine::new(StateConfig::default());
    let open = state.apply(&Command::OpenSession {
        owner: "CN=test".into(),
        secret: 1,
        timeout_ms: 5_000,
        now_ms: 1,
    });
    let Some(Ok(OpResult::SessionOpened { session, .. })) = open.response.map(|r| r.result) else {
        panic!("open failed");
    };
    let mut registry = WatchRegistry::new(10, 1 << 20, 4096);
    let mut history = EventHistory::new(100);
    registry
        .add(session, "/cfg", WatchKind::Exists)
        .expect("room");
    registry.add(99, "/", WatchKind::Children).expect("room");
    let applied = state.apply(&Command::Client {
        request: Request {
            session,
            sequence: 1,
            op: Op::Create {
                path: "/cfg".into(),
                data: b"v1".to_vec(),
                mode: CreateMode::Ephemeral,
            },
        },
        now_ms: 2,
    });
    history.record(&applied.events);
    let fired: Vec<(SessionId, EventType)> = registry
        .dispatch(&applied.events)
        .into_iter()
        .map(|n| (n.session, n.event.event_type))
        .collect();
    assert_eq!(
        fired,
        [
            (session, EventType::NodeCreated),
            (99, EventType::NodeChildrenChanged)
        ]
    );
    registry
        .add(session, "/cfg", WatchKind::Data)
        .expect("room");
    let applied = state.apply(&Command::ExpireSessions {
        sessions: vec![session],
        now_ms: 3,
    });
    history.record(&applied.events);
    let fired: Vec<(SessionId, EventType)> = registry
        .dispatch(&applied.events)
        .into_iter()
        .map(|n| (n.session, n.event.event_type))
        .collect();
    assert_eq!(fired, [(session, EventType::NodeDeleted)]);
    for ended in applied.ended_sessions {
        registry.remove_session(ended);
    }
    assert!(registry.watches_of(session).is_empty());
    // A client that saw revision 1 (the open) missed both changes to /cfg.
    let missed = history.missed(&[("/cfg".to_string(), WatchKind::PersistentRecursive)], 1);
    assert_eq!(missed.events.len(), 2);
}
