//! Three real replicas over QUIC on 127.0.0.1 (ephemeral ports, redb in
//! temporary directories), driven through `synod-client`: writes through any
//! replica are read back linearizably through any other; concurrent
//! sequential creators get unique, ordered names; ephemeral nodes vanish
//! after their session expires and not before; killing the leader elects a
//! new one within 2 s and loses no acknowledged write; a full stop and
//! restart from disk keeps every acknowledged write, live sessions' ephemeral
//! nodes and lock holders; a replica kept down through 10,000 writes and
//! compaction catches up by snapshot; an empty data directory is refused
//! without `--bootstrap`, and a replica that lost its disk rejoins with
//! `--join` and votes only once caught up; malformed and oversize frames and
//! a certificate from another CA are refused while the cluster keeps serving.

mod cluster;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cluster::{eventually, Cluster};
use synod_client::{ClientError, CreateMode, LockMode, Op, OpResult};
use synod_proto::Error;
use synod_server::replica::{Replica, ReplicaError, StartOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_through_any_replica_are_read_through_any_other() {
    let cluster = Cluster::start(3, |_| {}).await;
    let clients = [
        cluster.client(0).await,
        cluster.client(1).await,
        cluster.client(2).await,
    ];
    for (writer, client) in clients.iter().enumerate() {
        let path = format!("/from-{writer}");
        client
            .create(
                &path,
                format!("v{writer}").as_bytes(),
                CreateMode::Persistent,
            )
            .await
            .expect("create");
        for (reader, other) in clients.iter().enumerate() {
            let (data, stat) = other.get(&path).await.unwrap_or_else(|error| {
                panic!("replica {reader} reads {path} written through {writer}: {error}")
            });
            assert_eq!(data, format!("v{writer}").as_bytes());
            assert_eq!(stat.version, 0);
        }
    }
    clients[1]
        .set("/from-0", b"changed", Some(0))
        .await
        .expect("set");
    let (data, _) = clients[2].get("/from-0").await.expect("get");
    assert_eq!(data, b"changed");
    let error = clients[0]
        .set("/from-0", b"stale", Some(0))
        .await
        .expect_err("stale version");
    assert!(matches!(
        error,
        ClientError::Refused(Error::BadVersion { .. })
    ));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sequential_creators_get_unique_ordered_names() {
    let cluster = Cluster::start(3, |_| {}).await;
    let setup = cluster.client(0).await;
    setup
        .create("/queue", b"", CreateMode::Persistent)
        .await
        .expect("parent");
    let mut tasks = Vec::new();
    for index in 0..3 {
        let client = cluster.client(index).await;
        tasks.push(tokio::spawn(async move {
            let mut names = Vec::new();
            for _ in 0..20 {
                let name = client
                    .create("/queue/item-", b"", CreateMode::PersistentSequential)
                    .await
                    .expect("sequential create");
                names.push(name);
            }
            names
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        let names = task.await.expect("task");
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "one client's names come in increasing order");
        all.extend(names);
    }
    let unique: BTreeSet<String> = all.iter().cloned().collect();
    assert_eq!(unique.len(), 60, "every name is unique");
    let children = setup.children("/queue").await.expect("children");
    assert_eq!(children.len(), 60);
    assert!(children.iter().all(|c| c.len() == "item-".len() + 10));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ephemeral_nodes_vanish_after_their_session_expires_and_not_before() {
    let cluster = Cluster::start(3, |_| {}).await;
    let observer = cluster.client(1).await;
    let owner = cluster.client_with(2, 2000).await;
    owner
        .create("/worker", b"alive", CreateMode::Ephemeral)
        .await
        .expect("ephemeral");
    // While the owner keeps its session alive, the node stays.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert!(observer.exists("/worker").await.expect("exists").is_some());
    // The owner dies silently: no close, no more keep-alives.
    let died_at = Instant::now();
    drop(owner);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        observer.exists("/worker").await.expect("exists").is_some(),
        "still there within the session timeout"
    );
    let gone = eventually(Duration::from_secs(10), || async {
        observer.exists("/worker").await.ok().flatten().is_none()
    })
    .await;
    assert!(
        gone,
        "the ephemeral node is deleted after the session expires"
    );
    // The timeout runs from the last keep-alive heard (sent every third of
    // it), so expiry comes between two thirds of the timeout and the whole
    // of it after the death, never sooner.
    let expired_after = died_at.elapsed();
    assert!(
        expired_after >= Duration::from_millis(1300),
        "expired {expired_after:?} after the owner died"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_elects_another_and_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let leader = cluster
        .leader(Duration::from_secs(10))
        .await
        .expect("a leader");
    let survivor = (leader + 1) % 3;
    let client = cluster.client(survivor).await;
    let mut acknowledged = Vec::new();
    for i in 0..50 {
        let path = format!("/before-{i}");
        client
            .create(&path, b"x", CreateMode::Persistent)
            .await
            .expect("write");
        acknowledged.push(path);
    }
    let killed_at = Instant::now();
    cluster.kill(leader).await;
    let new_leader = cluster
        .leader(Duration::from_secs(5))
        .await
        .expect("a new leader");
    let elected_after = killed_at.elapsed();
    assert_ne!(new_leader, leader);
    println!("new leader {elected_after:?} after the old one was killed");
    assert!(
        elected_after < Duration::from_secs(2),
        "new leader after {elected_after:?}"
    );
    // The same client session goes on.
    for i in 0..20 {
        let path = format!("/after-{i}");
        client
            .create(&path, b"y", CreateMode::Persistent)
            .await
            .expect("write after failover");
        acknowledged.push(path);
    }
    for path in &acknowledged {
        assert!(
            client.exists(path).await.expect("read").is_some(),
            "{path} lost"
        );
    }
    cluster.restart(leader).await;
    let returned = cluster.client(leader).await;
    let caught_up = eventually(Duration::from_secs(10), || async {
        returned.exists("/after-19").await.ok().flatten().is_some()
    })
    .await;
    assert!(caught_up, "the restarted replica catches up");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_restart_from_disk_keeps_writes_sessions_and_locks() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let client = cluster.client_with(0, 30_000).await;
    for i in 0..30 {
        client
            .create(&format!("/durable-{i}"), b"d", CreateMode::Persistent)
            .await
            .expect("write");
    }
    client
        .create("/live-ephemeral", b"e", CreateMode::Ephemeral)
        .await
        .expect("ephemeral");
    let grant = client
        .request(
            Op::AcquireLock {
                path: "/locks/a".into(),
                mode: LockMode::Exclusive,
                wait: false,
                lock_delay_ms: 0,
            },
            None,
            None,
        )
        .await
        .expect("lock")
        .result
        .expect("granted");
    let OpResult::LockAcquired { sequencer } = grant else {
        panic!("expected a grant, got {grant:?}");
    };
    for index in 0..3 {
        cluster.stop(index).await;
    }
    for index in 0..3 {
        cluster.restart(index).await;
    }
    // The session, within its timeout, resumes on a restarted replica.
    for i in 0..30 {
        assert!(client
            .exists(&format!("/durable-{i}"))
            .await
            .expect("read after restart")
            .is_some());
    }
    assert!(client
        .exists("/live-ephemeral")
        .await
        .expect("read")
        .is_some());
    let check = client
        .request(Op::CheckSequencer { sequencer }, None, None)
        .await
        .expect("check")
        .result;
    assert_eq!(
        check,
        Ok(OpResult::SequencerCurrent),
        "the lock holder is intact"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_down_through_compaction_catches_up_by_snapshot() {
    let mut cluster = Cluster::start(3, |config| {
        config.limits.state_flush_interval_ms = 50;
        config.limits.log_retain_slots = 100;
    })
    .await;
    let leader = cluster
        .leader(Duration::from_secs(10))
        .await
        .expect("leader");
    let down = (leader + 1) % 3;
    let up = (leader + 2) % 3;
    cluster.kill(down).await;
    let client = cluster.client(up).await;
    let writers: Vec<_> = (0..8).map(|_| client.clone()).collect();
    let mut tasks = Vec::new();
    for (w, writer) in writers.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for i in 0..1250 {
                writer
                    .create(
                        &format!("/bulk-{w}-{i}"),
                        b"0123456789",
                        CreateMode::Persistent,
                    )
                    .await
                    .expect("bulk write");
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
    cluster.restart(down).await;
    let reader = cluster.client_with(down, 5000).await;
    let caught_up = eventually(Duration::from_secs(30), || async {
        reader
            .get_with("/bulk-7-1249", Some(synod_client::Consistency::Sequential))
            .await
            .is_ok()
    })
    .await;
    assert!(caught_up, "the returning replica serves the latest write");
    let children = reader.children("/").await.expect("children");
    assert_eq!(children.len(), 10_000);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_data_directory_is_refused_without_bootstrap() {
    let cluster = Cluster::start(3, |_| {}).await;
    let mut config = cluster.configs[0].clone();
    config.data_dir = cluster.dir.path().join("empty");
    let error = Replica::start(config, StartOptions::default())
        .await
        .expect_err("refused");
    assert!(matches!(error, ReplicaError::NoDatabase(_)));
    assert!(error.to_string().contains("--bootstrap"));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_lost_its_disk_rejoins_only_when_told_and_votes_once_caught_up() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let leader = cluster
        .leader(Duration::from_secs(10))
        .await
        .expect("leader");
    let lost = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    // The cluster goes without a quorum for seconds below: a session long
    // enough to outlive that, so that the last write tests the quorum and
    // not the session's timeout.
    let client = cluster.client_with(leader, 60_000).await;
    for i in 0..100 {
        client
            .create(&format!("/kept-{i}"), b"k", CreateMode::Persistent)
            .await
            .expect("write");
    }
    // The disk of one replica is lost.
    cluster.kill(lost).await;
    std::fs::remove_dir_all(&cluster.configs[lost].data_dir).expect("wipe");
    // Without being told, it refuses to start.
    let refused = Replica::start(cluster.configs[lost].clone(), StartOptions::default()).await;
    assert!(matches!(refused, Err(ReplicaError::NoDatabase(_))));
    // Told to join while another member is down, it must not vote: it cannot
    // learn what it may have forgotten, so the two of them make no quorum.
    cluster.kill(other).await;
    cluster.restart_with(lost, true).await;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let status = cluster.replicas[lost].as_ref().expect("up").status();
    assert_eq!(status.replica.role, "joining", "it does not vote yet");
    // It says what it waits for.
    let other_id = cluster.configs[other].id;
    let waiting = status
        .replica
        .waiting
        .expect("a joining replica says why it waits");
    assert!(
        waiting.starts_with(&format!(
            "rejoining after a lost disk: waiting for member {other_id} to report"
        )),
        "{waiting}"
    );
    // Once every member answers, it catches up and votes again.
    cluster.restart(other).await;
    let joined = eventually(Duration::from_secs(15), || async {
        cluster.replicas[lost]
            .as_ref()
            .expect("up")
            .status()
            .replica
            .role
            != "joining"
    })
    .await;
    assert!(joined, "it rejoins once every other member answered");
    let waits_for_nothing = eventually(Duration::from_secs(10), || async {
        cluster.replicas[lost]
            .as_ref()
            .expect("up")
            .status()
            .replica
            .waiting
            .is_none()
    })
    .await;
    assert!(
        waits_for_nothing,
        "a voting member with a leader waits for nothing"
    );
    let reader = cluster.client(lost).await;
    let (data, _) = reader
        .get_with("/kept-99", Some(synod_client::Consistency::Sequential))
        .await
        .expect("the rejoined replica serves what was written before");
    assert_eq!(data, b"k");
    // It now counts in the quorum: with another replica down, writes go on.
    cluster.kill(other).await;
    client
        .create("/after-rejoin", b"r", CreateMode::Persistent)
        .await
        .expect("a write needs the rejoined replica's vote");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_frames_and_foreign_certificates_are_refused_while_the_cluster_serves() {
    use std::sync::Arc;
    use synod_proto::certgen::generate_dev_certs;
    use synod_proto::tls::{client_endpoint, connect};
    use synod_proto::wire::{ServerFrame, DEFAULT_MAX_FRAME_BYTES};

    let cluster = Cluster::start(3, |_| {}).await;
    let honest = cluster.client(0).await;
    honest
        .create("/serving", b"yes", CreateMode::Persistent)
        .await
        .expect("write");
    let address = cluster.client_address(0);
    let timeout = Duration::from_secs(5);
    let bind = "127.0.0.1:0".parse().expect("address");
    let transport = Arc::new(quinn::TransportConfig::default());

    // A client whose certificate another CA signed is refused in TLS.
    let foreign_dir = cluster.dir.path().join("foreign");
    let foreign =
        generate_dev_certs(&foreign_dir, &[1], &["127.0.0.1".to_string()]).expect("foreign certs");
    let material = foreign.client().load().expect("load");
    let endpoint = client_endpoint(&material, bind, transport.clone()).expect("endpoint");
    let refused = connect(
        &endpoint,
        address,
        "127.0.0.1",
        DEFAULT_MAX_FRAME_BYTES,
        timeout,
    )
    .await;
    assert!(
        refused.is_err(),
        "a foreign certificate must not get through"
    );

    // A malformed frame and an oversize frame close only their connection,
    // with a reason the client can read.
    let material = cluster.certs.client().load().expect("load");
    let endpoint = client_endpoint(&material, bind, transport).expect("endpoint");
    for garbage in [
        vec![3, 0, 0, 0, 0xff, 0xff, 0xff],
        (64u32 << 20).to_le_bytes().to_vec(),
    ] {
        let mut link = connect(
            &endpoint,
            address,
            "127.0.0.1",
            DEFAULT_MAX_FRAME_BYTES,
            timeout,
        )
        .await
        .expect("handshake");
        link.send.write_all(&garbage).await.expect("write garbage");
        let answer = tokio::time::timeout(timeout, link.frames.next::<ServerFrame>())
            .await
            .expect("an answer in time");
        match answer {
            Ok(Some(ServerFrame::Unavailable { reason })) => {
                assert!(
                    reason.contains("malformed") || reason.contains("exceeds"),
                    "reason: {reason}"
                );
            }
            other => panic!("expected a readable refusal, got {other:?}"),
        }
    }

    // Everyone else is still served.
    let (data, _) = honest.get("/serving").await.expect("still serving");
    assert_eq!(data, b"yes");
    let newcomer = cluster.client(0).await;
    assert!(newcomer.exists("/serving").await.expect("read").is_some());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_forwarded_to_a_dead_leader_complete_soon_after_a_new_one_leads() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let leader = cluster
        .leader(Duration::from_secs(10))
        .await
        .expect("leader");
    let follower = (leader + 1) % 3;
    // A long session timeout keeps the client on its replica: what is
    // measured is the replica's handling of writes it forwarded.
    let client = cluster.client_with(follower, 30_000).await;
    client
        .create("/inflight", b"", CreateMode::Persistent)
        .await
        .expect("parent");
    // The leader dies; the follower still believes in it for a moment and
    // forwards these writes into the void.
    cluster.kill(leader).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            client
                .create(&format!("/inflight/w-{i}"), b"x", CreateMode::Persistent)
                .await
                .map(|_| Instant::now())
        }));
    }
    let mut slowest = Duration::ZERO;
    for task in tasks {
        let done = task.await.expect("task").expect("write completes");
        slowest = slowest.max(done - started);
    }
    println!("every write forwarded to the dead leader completed within {slowest:?}");
    // They are proposed again as soon as a new leader is known (about
    // 1-2 s), not after the 10 s request timeout.
    assert!(
        slowest < Duration::from_secs(6),
        "slowest write took {slowest:?}"
    );
    assert_eq!(
        client.children("/inflight").await.expect("children").len(),
        20
    );
    cluster.shutdown().await;
}
