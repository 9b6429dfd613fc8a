//! Watches against a real cluster of three `synod-server` processes (see
//! `support/mod.rs`). Checks that a persistent recursive watcher sees every
//! change of a node, in order, exactly once, with no gap, while the replica
//! it is connected to is killed (SIGKILL) in the middle of a stream of
//! writes made through another replica; that a one-shot watch set before the
//! failover fires with a change made while the watcher was between
//! replicas; that a watcher that missed more events than the replicas keep
//! is told so with a `HistoryCompacted` event (never a silent gap) and its
//! watch goes on; and that one-shot data, exists and children watches fire
//! on the events ZooKeeper's would, once; and that a watch stream yields
//! no change from at or before its starting revision.

mod support;

use std::time::Duration;

use support::{init_logging, ProcessCluster};
use synod_client::{CreateMode, EventType, SessionState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_every_change_in_order_across_a_failover() {
    init_logging();
    let mut cluster = ProcessCluster::start().await;
    let writer_probe = cluster.client(0, 3000).await;
    let paxos_leader = cluster.leader(&writer_probe).await.expect("a leader");
    writer_probe.close().await;
    // The watcher sits on a follower, so writes go on while it moves.
    let watched = (paxos_leader + 1) % 3;
    let writer = cluster.client(paxos_leader, 3000).await;
    let watcher = cluster.client(watched, 3000).await;
    writer
        .create("/w", b"", CreateMode::Persistent)
        .await
        .expect("create");
    writer
        .create("/w/node", b"start", CreateMode::Persistent)
        .await
        .expect("create");
    writer
        .create("/w/once", b"start", CreateMode::Persistent)
        .await
        .expect("create");
    // Sync so the watch starts after the creates on the watcher's replica.
    watcher.sync().await.expect("sync");
    let mut stream = watcher.watch("/w/node").await.expect("watch");
    let (data, _, once) = watcher.get_watch("/w/once").await.expect("get and watch");
    assert_eq!(data, b"start");

    let writes = 60u64;
    let writing = {
        let writer = writer.clone();
        tokio::spawn(async move {
            let mut revisions = Vec::new();
            for i in 0..writes {
                let stat = writer
                    .set("/w/node", format!("v{i}").as_bytes(), Some(i))
                    .await
                    .expect("set");
                revisions.push(stat.modified_revision);
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            revisions
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill(watched);
    let once_revision = writer
        .set("/w/once", b"changed while the watcher moved", None)
        .await
        .expect("set")
        .modified_revision;
    let revisions = writing.await.expect("writer");
    let last = *revisions.last().expect("writes");

    let mut seen = Vec::new();
    let collected = tokio::time::timeout(Duration::from_secs(15), async {
        while seen.last().copied() != Some(last) {
            let event = stream.next().await.expect("event");
            assert_ne!(
                event.event_type,
                EventType::HistoryCompacted,
                "the history should cover a short failover"
            );
            assert_eq!(event.path, "/w/node");
            assert_eq!(event.event_type, EventType::NodeDataChanged);
            seen.push(event.revision);
        }
    })
    .await;
    assert!(
        collected.is_ok(),
        "saw {} of {} changes: {seen:?}",
        seen.len(),
        revisions.len()
    );
    assert_eq!(seen, revisions, "every change, in order, exactly once");
    let event = tokio::time::timeout(Duration::from_secs(5), once)
        .await
        .expect("the one-shot watch fires")
        .expect("event");
    assert_eq!(event.path, "/w/once");
    assert_eq!(event.event_type, EventType::NodeDataChanged);
    assert_eq!(event.revision, once_revision);
    match *watcher.state().borrow() {
        SessionState::Connected { node_id, .. } => {
            assert_ne!(cluster.index_of(node_id), watched, "the watcher moved")
        }
        other => panic!("watcher is {other:?}"),
    }
    // Nothing more arrives for the persistent watch.
    let extra = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(extra.is_err(), "an extra event: {extra:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_watches_fire_once_on_zookeepers_events() {
    init_logging();
    let cluster = ProcessCluster::start().await;
    let watcher = cluster.client(0, 3000).await;
    let writer = cluster.client(1, 3000).await;
    // Exists on a missing node fires on its creation.
    let (stat, created) = watcher.exists_watch("/x").await.expect("exists");
    assert!(stat.is_none());
    let (children, child_added) = {
        writer
            .create("/parent", b"", CreateMode::Persistent)
            .await
            .expect("create");
        watcher.children_watch("/parent").await.expect("children")
    };
    assert!(children.is_empty());
    writer
        .create("/x", b"1", CreateMode::Persistent)
        .await
        .expect("create");
    let event = created.await.expect("created");
    assert_eq!(
        (event.path.as_str(), event.event_type),
        ("/x", EventType::NodeCreated)
    );
    writer
        .create("/parent/child", b"", CreateMode::Ephemeral)
        .await
        .expect("create");
    let event = child_added.await.expect("child added");
    assert_eq!(
        (event.path.as_str(), event.event_type),
        ("/parent", EventType::NodeChildrenChanged)
    );
    // A data watch fires on deletion too; a watch fires once.
    let (_, _, changed) = watcher.get_watch("/x").await.expect("get");
    let mut events = watcher.events();
    writer.delete("/x", None).await.expect("delete");
    let event = changed.await.expect("deleted");
    assert_eq!(
        (event.path.as_str(), event.event_type),
        ("/x", EventType::NodeDeleted)
    );
    writer
        .create("/x", b"again", CreateMode::Persistent)
        .await
        .expect("create");
    writer.sync().await.expect("sync");
    watcher.sync().await.expect("sync");
    let delivered = events.recv().await.expect("the deletion");
    assert_eq!(delivered.event_type, EventType::NodeDeleted);
    assert!(
        events.try_recv().is_err(),
        "the fired watch is gone: no event for the re-creation"
    );
    // The ephemeral child goes with its session, and a children watch sees it.
    let (_, child_removed) = watcher.children_watch("/parent").await.expect("children");
    writer.close().await;
    let event = child_removed.await.expect("child removed");
    assert_eq!(event.event_type, EventType::NodeChildrenChanged);
    assert!(watcher
        .children("/parent")
        .await
        .expect("children")
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_missed_more_than_the_history_is_told_to_re_read() {
    init_logging();
    let mut cluster = ProcessCluster::start_with("[limits]\nevent_history_max = 5\n").await;
    let probe = cluster.client(0, 3000).await;
    let paxos_leader = cluster.leader(&probe).await.expect("a leader");
    let watched = (paxos_leader + 1) % 3;
    let writer = cluster.client(paxos_leader, 3000).await;
    let watcher = cluster.client(watched, 3000).await;
    writer
        .create("/h", b"0", CreateMode::Persistent)
        .await
        .expect("create");
    // The watcher's replica may not have applied the create yet; a watch
    // registered there now would see it. Sync first, so it starts after.
    watcher.sync().await.expect("sync");
    let mut stream = watcher.watch("/h").await.expect("watch");
    let mut revisions = Vec::new();
    for i in 0..3u64 {
        let stat = writer.set("/h", b"before", Some(i)).await.expect("set");
        revisions.push(stat.modified_revision);
    }
    for &revision in &revisions {
        let event = stream.next().await.expect("event");
        assert_eq!(event.revision, revision);
    }
    cluster.kill(watched);
    // Twenty changes while the watcher is between replicas: more than the
    // replicas keep.
    let mut last = 0;
    for i in 3..23u64 {
        last = writer
            .set("/h", b"while away", Some(i))
            .await
            .expect("set")
            .modified_revision;
    }
    let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the watcher hears of the gap")
        .expect("event");
    assert_eq!(
        event.event_type,
        EventType::HistoryCompacted,
        "an explicit gap, not a silent one: {event:?}"
    );
    // Re-reading gives the state after the gap, and the watch goes on.
    let (data, stat) = watcher.get("/h").await.expect("re-read");
    assert_eq!(
        (data.as_slice(), stat.modified_revision),
        (b"while away".as_slice(), last)
    );
    let next = writer.set("/h", b"after", None).await.expect("set");
    let event = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the watch goes on")
        .expect("event");
    assert_eq!(
        (event.event_type, event.revision),
        (EventType::NodeDataChanged, next.modified_revision)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_stream_delivers_nothing_from_before_its_revision() {
    init_logging();
    let cluster = ProcessCluster::start().await;
    let writer = cluster.client(0, 3000).await;
    // At a follower, the read that fixes the stream's revision waits for
    // the leader, while changes made meanwhile reach the new watch.
    let leader = cluster.leader(&writer).await.expect("a leader");
    let watcher = cluster.client((leader + 1) % 3, 3000).await;
    writer
        .create("/busy", b"", CreateMode::Persistent)
        .await
        .expect("create");
    // Several writers, so the follower applies changes in bursts.
    let writing: Vec<_> = (0..4)
        .map(|_| {
            let writer = writer.clone();
            tokio::spawn(async move {
                for i in 0..5_000u32 {
                    if writer
                        .set("/busy", i.to_string().as_bytes(), None)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            })
        })
        .collect();
    for attempt in 0..100 {
        let mut stream = watcher.watch("/busy").await.expect("watch");
        let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("an event within 5 s")
            .expect("an event");
        assert!(
            first.revision > stream.revision(),
            "attempt {attempt}: the stream from revision {} delivered a change of revision {}",
            stream.revision(),
            first.revision
        );
    }
    for writer in writing {
        writer.abort();
    }
}
