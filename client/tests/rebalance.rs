//! Sessions spread across replicas stay spread: a session that failed over
//! when its home replica (the one that opened it) died moves back once that
//! replica is back, without losing the session, its ephemeral nodes or its
//! requests; with rebalancing off it stays where it went. Against a real
//! cluster of three `synod-server` processes (see `support/mod.rs`).

mod support;

use std::time::Duration;

use support::{eventually, ProcessCluster};
use synod_client::{Client, CreateMode};

async fn client_at(cluster: &ProcessCluster, first: usize, rebalance_after_ms: u64) -> Client {
    Client::builder()
        .endpoints(cluster.endpoints(first))
        .tls(cluster.certs.client())
        .session_timeout_ms(3_000)
        .request_timeout_ms(8_000)
        .rebalance_after_ms(rebalance_after_ms)
        .connect()
        .await
        .expect("client connects")
}

#[tokio::test]
async fn a_session_that_failed_over_moves_back_to_its_home_replica() {
    support::init_logging();
    let mut cluster = ProcessCluster::start().await;
    let moving = client_at(&cluster, 0, 1_000).await;
    let staying = client_at(&cluster, 0, 0).await;
    assert_eq!(cluster.serving(&moving), Some(0));
    assert_eq!(cluster.serving(&staying), Some(0));
    let session = moving.session_id();
    moving
        .create("/mover", b"", CreateMode::Ephemeral)
        .await
        .expect("create an ephemeral node");

    cluster.kill(0);
    let away = || async {
        matches!(cluster.serving(&moving), Some(index) if index != 0)
            && matches!(cluster.serving(&staying), Some(index) if index != 0)
    };
    assert!(
        eventually(Duration::from_secs(15), away).await,
        "the sessions did not fail over"
    );
    moving
        .set("/mover", b"while away", None)
        .await
        .expect("a write while away");

    cluster.restart(0);
    let home = || async { cluster.serving(&moving) == Some(0) };
    assert!(
        eventually(Duration::from_secs(20), home).await,
        "the session did not move back home (serving: {:?})",
        cluster.serving(&moving)
    );
    assert_eq!(
        moving.session_id(),
        session,
        "the move opened a new session"
    );
    let (data, _) = moving.get("/mover").await.expect("read after the move");
    assert_eq!(data, b"while away");
    assert_ne!(
        cluster.serving(&staying),
        Some(0),
        "with rebalancing off the session stays where it failed over to"
    );
}
