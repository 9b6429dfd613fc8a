//! Backups on real clusters: a backup taken from a live 3-replica cluster
//! while a client writes holds exactly the writes acknowledged at or below
//! its revision; restored into a fresh cluster it gives the same tree node
//! by node (data, versions, revisions), with the old sessions closed (their
//! ephemeral nodes gone and their locks free) and a cluster identity of its
//! own. Damaged, cut-short and foreign files are refused, and a restore
//! refuses a data directory that holds a database.

mod cluster;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::{eventually, Cluster};
use synod_client::{Client, ClientError};
use synod_proto::CreateMode;
use synod_server::backup::{self, BackupError, BackupWriter};

/// Nodes written before the backup, left alone after.
const STILL_NODES: usize = 120;
/// Nodes the writer keeps setting while the backup is taken.
const HOT_NODES: usize = 20;
/// The subject of the test clients' certificate: who owns their sessions.
const CLIENT_IDENTITY: &str = "CN=synod client";

/// Every node under `root`, depth first: path -> (data, stat).
async fn dump(client: &Client, root: &str) -> BTreeMap<String, (Vec<u8>, synod_proto::Stat)> {
    let mut nodes = BTreeMap::new();
    let mut pending = vec![root.to_string()];
    while let Some(path) = pending.pop() {
        let (data, stat) = client.get(&path).await.expect("read a node");
        for child in client.children(&path).await.expect("list children") {
            pending.push(format!("{}/{child}", path.trim_end_matches('/')));
        }
        nodes.insert(path, (data, stat));
    }
    nodes
}

/// The cluster identity the first replica holds, if any.
fn cluster_identity(cluster: &Cluster) -> Option<String> {
    cluster.replicas[0]
        .as_ref()
        .expect("running")
        .status()
        .replica
        .cluster_identity
}

async fn take_backup(cluster: &Cluster, file: &std::path::Path) {
    let mut writer = BackupWriter::create(file).expect("a new backup file");
    let mut download = Client::builder()
        .endpoints(cluster.endpoints(1))
        .tls(cluster.certs.client())
        .request_timeout_ms(10_000)
        .fetch_snapshot()
        .await
        .expect("a replica starts the backup");
    while let Some(chunk) = download.next_chunk().await.expect("the backup streams") {
        writer.chunk(&chunk).expect("write the chunk");
    }
    writer.finish().expect("finish the backup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_under_writes_restores_into_a_new_cluster_node_by_node() {
    let fast_flush = |config: &mut synod_server::config::ReplicaConfig| {
        config.limits.state_flush_interval_ms = 100;
    };
    let source = Cluster::start(3, fast_flush).await;
    let client = source.client(0).await;
    client
        .create("/app", b"root of the app", CreateMode::Persistent)
        .await
        .expect("create");
    for index in 0..STILL_NODES {
        let parent = format!("/app/d{}", index % 6);
        if index < 6 {
            client
                .create(&parent, b"", CreateMode::Persistent)
                .await
                .expect("create a parent");
        }
        client
            .create(
                &format!("{parent}/k{index:04}"),
                format!("value {index}").as_bytes(),
                CreateMode::Persistent,
            )
            .await
            .expect("create");
    }
    client
        .set("/app/d0/k0000", b"changed once", None)
        .await
        .expect("set");
    client
        .create("/hot", b"", CreateMode::Persistent)
        .await
        .expect("create");
    for index in 0..HOT_NODES {
        client
            .create(&format!("/hot/n{index}"), b"v0", CreateMode::Persistent)
            .await
            .expect("create");
    }
    // A second session holds an ephemeral node and a lock: a restore
    // closes it.
    let owner = source.client(2).await;
    owner
        .create("/app/owned", b"by a session", CreateMode::Ephemeral)
        .await
        .expect("create an ephemeral node");
    let held = owner.lock("/locks/backup").await.expect("take a lock");

    // One writer keeps setting the hot nodes, noting each acknowledged
    // value's revision, while the backup is taken.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let client = source.client(1).await;
        let stop = stop.clone();
        async move {
            let mut acked: Vec<(String, Vec<u8>, u64)> = Vec::new();
            let started = Instant::now();
            let mut round = 1u64;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(30) {
                for index in 0..HOT_NODES {
                    let path = format!("/hot/n{index}");
                    let value = format!("v{round}").into_bytes();
                    let stat = client
                        .set(&path, &value, None)
                        .await
                        .expect("set under load");
                    acked.push((path, value, stat.modified_revision));
                }
                round += 1;
            }
            (client, acked)
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("cluster.backup");
    take_backup(&source, &file).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (writer_client, acked) = writer.await.expect("the writer ran");
    assert!(
        acked.len() > HOT_NODES,
        "the writer wrote during the backup"
    );

    let summary = backup::scan_backup(&file).expect("the backup checks out");
    assert!(
        summary.sessions >= 3,
        "the backup holds the open sessions: {summary:?}"
    );
    assert_eq!(summary.locks, 1, "{summary:?}");
    let full = backup::read_backup(&file, backup::any_state_config()).expect("the backup loads");
    assert_eq!(full.summary, summary, "scanning and loading agree");
    // A backup carries no session's secret: every session in it answers
    // to the zero secret, which no live session has.
    let sessions = full.state.state.sessions();
    assert!(sessions.len() >= 3, "{sessions:?}");
    for session in sessions {
        full.state
            .state
            .check_session_owner(session, CLIENT_IDENTITY, 0)
            .unwrap_or_else(|error| panic!("session {session} kept its secret: {error}"));
    }
    let revision = summary.revision;
    let last_acked = acked
        .iter()
        .map(|(_, _, revision)| *revision)
        .max()
        .unwrap_or(0);
    assert!(
        revision < last_acked,
        "the backup (revision {revision}) was taken while the writer wrote (up to {last_acked})"
    );

    // What the restored cluster must hold: the still nodes as they are now,
    // and each hot node as its last write at or below the backup's revision.
    let mut expected = dump(&client, "/app").await;
    expected.remove("/app/owned");
    let mut expected_hot: BTreeMap<String, Vec<u8>> = (0..HOT_NODES)
        .map(|index| (format!("/hot/n{index}"), b"v0".to_vec()))
        .collect();
    for (path, value, at) in &acked {
        if *at <= revision {
            expected_hot.insert(path.clone(), value.clone());
        }
    }
    let source_identity = cluster_identity(&source);
    drop(held);
    owner.close().await;
    writer_client.close().await;
    client.close().await;
    // Stopped, but its data directories kept for the export below.
    let mut source = source;
    for index in 0..source.replicas.len() {
        source.stop(index).await;
    }

    // Disaster recovery: a stopped replica's data, its log applied, as a
    // backup. It holds every write it learned was chosen, so at least the
    // backup's, and a consistent prefix of the writer's.
    let exported = dir.path().join("survivor.backup");
    let export = backup::export(&source.configs[0], &exported).expect("export the survivor");
    assert!(
        export.revision >= revision,
        "{export:?} against the backup's {revision}"
    );
    let survivor_state =
        backup::read_backup(&exported, backup::any_state_config()).expect("the export loads");
    assert_eq!(survivor_state.summary, export);
    assert!(
        acked
            .iter()
            .any(|(_, _, at)| *at > revision && *at <= export.revision)
            || export.revision == revision,
        "the export applied the log after the saved state"
    );

    let restored = Cluster::start_from(3, fast_flush, |config| {
        let summary = backup::restore(&file, config).expect("restore");
        assert_eq!(summary.sessions_closed, summary.backup.sessions);
        // A second restore into the same directory is refused.
        assert!(matches!(
            backup::restore(&file, config),
            Err(BackupError::DatabaseExists { .. })
        ));
    })
    .await;
    let reader = restored.client(0).await;
    let actual = dump(&reader, "/app").await;
    assert_eq!(
        actual.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "the same nodes under /app, without the closed session's ephemeral node"
    );
    for (path, (data, stat)) in &expected {
        let (restored_data, restored_stat) = &actual[path];
        assert_eq!(restored_data, data, "data of {path}");
        assert_eq!(
            restored_stat.created_revision, stat.created_revision,
            "{path}"
        );
        assert_eq!(
            restored_stat.modified_revision, stat.modified_revision,
            "{path}"
        );
        assert_eq!(restored_stat.version, stat.version, "{path}");
    }
    for (path, value) in &expected_hot {
        let (data, _) = reader.get(path).await.expect("a hot node");
        assert_eq!(
            String::from_utf8_lossy(&data),
            String::from_utf8_lossy(value),
            "{path} as of revision {revision}"
        );
    }
    // The old session is gone: its lock is free at once.
    let lock = reader
        .try_lock("/locks/backup")
        .await
        .expect("the closed session's lock is free");
    lock.release().await.expect("release");
    // New writes continue the revisions.
    let stat = reader
        .set("/app/d1/k0001", b"after", None)
        .await
        .expect("write");
    assert!(stat.modified_revision > revision);
    // The new cluster mints its own identity.
    let minted = eventually(Duration::from_secs(10), || {
        let identity = cluster_identity(&restored);
        async move { identity.is_some() }
    })
    .await;
    assert!(minted, "the restored cluster minted no identity");
    let identity = cluster_identity(&restored);
    assert_ne!(
        identity, source_identity,
        "the restored cluster is a new cluster"
    );
    reader.close().await;
    restored.shutdown().await;

    // Damage of every kind is refused, naming the file.
    let bytes = std::fs::read(&file).expect("read the backup");
    let mut flipped = bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x10;
    let damaged = dir.path().join("flipped.backup");
    std::fs::write(&damaged, &flipped).expect("write");
    let error = backup::scan_backup(&damaged).expect_err("a flipped bit");
    assert!(matches!(error, BackupError::Checksum { .. }), "{error}");
    assert!(error.to_string().contains("flipped.backup"), "{error}");
    let short = dir.path().join("short.backup");
    std::fs::write(&short, &bytes[..bytes.len() - 100]).expect("write");
    let error = backup::read_backup(&short, backup::any_state_config()).expect_err("cut short");
    assert!(matches!(error, BackupError::Checksum { .. }), "{error}");
    let foreign = dir.path().join("foreign.backup");
    std::fs::write(&foreign, b"SQLite format 3\0 and more bytes than a header").expect("write");
    let error = backup::scan_backup(&foreign).expect_err("not a backup");
    assert!(matches!(error, BackupError::NotABackup { .. }), "{error}");
    // A backup never overwrites a file.
    assert!(matches!(
        BackupWriter::create(&file),
        Err(BackupError::Exists { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backups_past_the_limit_are_refused_with_its_name() {
    let cluster = Cluster::start(1, |config| {
        config.limits.backups_max = 1;
        config.limits.state_flush_interval_ms = 100;
    })
    .await;
    let client = cluster.client(0).await;
    // More state than a stream's flow-control window, so that a backup
    // nobody reads stays open.
    for index in 0..600 {
        client
            .create(
                &format!("/n{index}"),
                &[7u8; 16_000],
                CreateMode::Persistent,
            )
            .await
            .expect("create");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let first = Client::builder()
        .endpoints(cluster.endpoints(0))
        .tls(cluster.certs.client())
        .fetch_snapshot()
        .await
        .expect("the first backup starts");
    let second = Client::builder()
        .endpoints(cluster.endpoints(0))
        .tls(cluster.certs.client())
        .fetch_snapshot()
        .await;
    match second {
        Err(ClientError::Refused(synod_proto::Error::Unavailable { reason })) => {
            assert!(reason.contains("limits.backups_max"), "{reason}");
        }
        other => panic!("a second backup at once was not refused: {other:?}"),
    }
    drop(first);
    client.close().await;
    cluster.shutdown().await;
}
