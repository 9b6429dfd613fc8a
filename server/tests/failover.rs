//! Failover as the clients of the replica that wins the election see it:
//! their linearizable reads go on as soon as it leads. A regression test
//! for reads a follower had forwarded to the old leader: the winner used to
//! leave them pending until the read timeout (10 s), and its clients
//! stalled for that long, or until they gave up on a healthy replica.

mod cluster;

use std::time::{Duration, Instant};

use cluster::Cluster;
use synod_proto::CreateMode;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_at_the_replica_that_wins_an_election_go_on_when_it_leads() {
    // Replica 3 stands for election long after the others, so that when
    // the leader goes, the other of replicas 1 and 2 wins.
    let mut cluster = Cluster::start(3, |config| {
        if config.id == 3 {
            config.timeouts.election_timeout_min_ms = 20_000;
            config.timeouts.election_timeout_max_ms = 25_000;
        }
    })
    .await;
    let leader = cluster
        .leader(Duration::from_secs(10))
        .await
        .expect("a leader");
    assert!(leader < 2, "replica 1 or 2 leads first");
    let winner = 1 - leader;
    // A session long enough that the client never gives up on the winner.
    let client = cluster.client_with(winner, 30_000).await;
    client
        .create("/probe", b"1", CreateMode::Persistent)
        .await
        .expect("a write");

    let reads = tokio::spawn({
        let client = client.clone();
        async move {
            let started = Instant::now();
            let mut slowest = Duration::ZERO;
            let mut served_late = 0;
            while started.elapsed() < Duration::from_secs(12) {
                let asked = Instant::now();
                let read = client.get("/probe").await;
                let took = asked.elapsed();
                slowest = slowest.max(took);
                if read.is_ok() && started.elapsed() > Duration::from_secs(8) {
                    served_late += 1;
                }
            }
            (slowest, served_late)
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.kill(leader).await;
    let (slowest, served_late) = reads.await.expect("the reads ran");
    eprintln!("slowest read across the failover: {slowest:?}");
    let now_leading = cluster
        .leader(Duration::from_secs(5))
        .await
        .expect("a new leader");
    assert_eq!(
        now_leading, winner,
        "the replica the client is attached to won"
    );
    assert!(served_late > 0, "reads are served after the failover");
    // An election takes 1-1.6 s to start and the old lease 1 s to run out.
    assert!(
        slowest < Duration::from_secs(5),
        "a read waited {slowest:?} across the failover"
    );
    drop(client);
    cluster.shutdown().await;
}
