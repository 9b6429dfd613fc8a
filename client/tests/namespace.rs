//! The namespace API and the blocking facade against a real cluster of
//! three `synod-server` processes (see `support/mod.rs`). Checks create,
//! get, set, delete, exists, children, multi and sync through different
//! replicas; that refusals come back as typed errors with ZooKeeper's
//! meanings and messages that say what to do; that bad configurations are
//! refused before connecting; and that the blocking facade locks, campaigns
//! and reads from a plain thread with no runtime of its own.

mod support;

use std::time::Duration;

use support::{init_logging, ProcessCluster};
use synod_client::{Client, ClientError, CreateMode, ErrorKind, MultiOp, MultiResult};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_operations_and_typed_errors() {
    init_logging();
    let no_endpoints = Client::builder().tls_dir("/nonexistent").connect().await;
    assert_eq!(
        no_endpoints.map(|_| ()).map_err(|e| e.kind()),
        Err(ErrorKind::Config)
    );
    let no_tls = Client::builder().endpoints(["127.0.0.1:1"]).connect().await;
    let error = no_tls.expect_err("no TLS files");
    assert!(error.to_string().contains("tls"), "{error}");

    let cluster = ProcessCluster::start().await;
    let a = cluster.client(0, 3000).await;
    let b = cluster.client(2, 3000).await;
    assert_eq!(
        a.create("/app", b"v0", CreateMode::Persistent).await,
        Ok("/app".to_string())
    );
    let (data, stat) = b.get("/app").await.expect("read through another replica");
    assert_eq!((data.as_slice(), stat.version), (b"v0".as_slice(), 0));
    let stat = b.set("/app", b"v1", Some(0)).await.expect("set");
    assert_eq!(stat.version, 1);
    let error = a
        .set("/app", b"v2", Some(0))
        .await
        .expect_err("stale version");
    assert_eq!(error.kind(), ErrorKind::BadVersion);
    assert!(error.to_string().contains("re-read"), "{error}");
    let error = a
        .create("/app", b"", CreateMode::Persistent)
        .await
        .expect_err("exists");
    assert_eq!(error.kind(), ErrorKind::NodeExists);
    let error = a.get("/missing").await.expect_err("no node");
    assert_eq!(error.kind(), ErrorKind::NoNode);
    assert!(matches!(
        error,
        ClientError::Refused(synod_proto::Error::NoNode { .. })
    ));
    let first = a
        .create("/app/job-", b"", CreateMode::PersistentSequential)
        .await
        .expect("sequential");
    let second = b
        .create("/app/job-", b"", CreateMode::EphemeralSequential)
        .await
        .expect("sequential");
    assert!(first < second, "{first} then {second}");
    let error = a.delete("/app", None).await.expect_err("not empty");
    assert_eq!(error.kind(), ErrorKind::NotEmpty);
    let error = a
        .create(&format!("{second}/child"), b"", CreateMode::Persistent)
        .await
        .expect_err("ephemeral parent");
    assert_eq!(error.kind(), ErrorKind::NoChildrenForEphemerals);
    assert_eq!(a.children("/app").await.expect("children").len(), 2);

    let results = a
        .multi(vec![
            MultiOp::Check {
                path: "/app".into(),
                expected_version: Some(1),
            },
            MultiOp::Create {
                path: "/app/config".into(),
                data: b"c".to_vec(),
                mode: CreateMode::Persistent,
            },
        ])
        .await
        .expect("multi");
    assert!(matches!(results[1], MultiResult::Created { .. }));
    let error = a
        .multi(vec![
            MultiOp::Delete {
                path: "/app/config".into(),
                expected_version: None,
            },
            MultiOp::Check {
                path: "/app".into(),
                expected_version: Some(7),
            },
        ])
        .await
        .expect_err("all or none");
    assert_eq!(error.kind(), ErrorKind::MultiOpFailed);
    assert!(a.exists("/app/config").await.expect("exists").is_some());

    // The ephemeral node goes with its session, at once on close.
    b.close().await;
    a.sync().await.expect("sync");
    assert!(a.exists(&second).await.expect("exists").is_none());
    let error = b.get("/app").await.expect_err("closed");
    assert_eq!(error.kind(), ErrorKind::Closed);
    a.delete(&first, None).await.expect("delete");
    a.delete("/app/config", None).await.expect("delete");
    a.delete("/app", Some(1)).await.expect("delete");
    assert_eq!(a.exists("/app").await, Ok(None));
    let status = a.status().await.expect("status");
    assert_eq!(status.members.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_blocking_facade_locks_and_campaigns_from_a_plain_thread() {
    init_logging();
    let cluster = ProcessCluster::start().await;
    let endpoints = cluster.endpoints(1);
    let tls = cluster.certs.client();
    let thread = std::thread::spawn(move || {
        let connect = || {
            Client::builder()
                .endpoints(endpoints.clone())
                .tls(tls.clone())
                .session_timeout_ms(3000)
                .connect_blocking()
                .expect("connect")
        };
        let client = connect();
        let other = connect();
        client
            .create("/blocking", b"hello", CreateMode::Persistent)
            .expect("create");
        assert_eq!(other.get("/blocking").expect("get").0, b"hello");
        let guard = client.lock("/locks/blocking").expect("lock");
        let busy = other.try_lock("/locks/blocking").expect_err("busy");
        assert_eq!(busy.kind(), ErrorKind::LockBusy);
        let token = guard.token().clone();
        assert!(other.check_sequencer(&token).expect("check"));
        guard.release().expect("release");
        let next = other
            .lock_timeout("/locks/blocking", Duration::from_secs(3))
            .expect("lock");
        assert!(next.token().generation > token.generation);
        assert!(!other.check_sequencer(&token).expect("check"));
        drop(next);
        let leadership = client
            .campaign("/elections/blocking", b"me")
            .expect("campaign");
        let leader = other.leader("/elections/blocking").expect("leader");
        assert_eq!(leader.map(|l| l.value), Some(b"me".to_vec()));
        leadership.resign().expect("resign");
        assert_eq!(other.leader("/elections/blocking").expect("leader"), None);
        client.close();
        other.close();
    });
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .expect("join")
        .expect("the blocking thread succeeds");
}
