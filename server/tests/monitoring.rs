//! The HTTP listener for metrics and health checks, on a real 3-replica
//! cluster: every replica becomes ready, its metrics parse as Prometheus
//! text, the request, commit and apply series move when clients write,
//! links and lock waiters are shown, the survivors count a leader change
//! after the leader stops, and the listener holds to its connection bound
//! and header timeout.

mod cluster;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use cluster::http::{get, scrape, value};
use cluster::{eventually, Cluster};
use prometheus_parse::Sample;
use synod_proto::CreateMode;

/// The count of the histogram `name` with all of `labels` (0 when absent).
fn histogram_count(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    value(samples, &format!("{name}_count"), labels)
        .or_else(|| value(samples, name, labels))
        .unwrap_or(0.0)
}

/// Sums a series over every replica's scrape.
fn total(scrapes: &BTreeMap<usize, Vec<Sample>>, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrapes
        .values()
        .map(|samples| value(samples, name, labels).unwrap_or(0.0))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_and_health_follow_writes_and_a_leader_change() {
    let mut cluster = Cluster::start(3, |config| {
        config.monitoring.http_address = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let addresses: Vec<SocketAddr> = cluster
        .replicas
        .iter()
        .map(|replica| {
            replica
                .as_ref()
                .and_then(|replica| replica.http_address())
                .expect("an HTTP listener")
        })
        .collect();

    for &address in &addresses {
        let (status, body) = get(address, "/livez").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"live\":true"), "{body}");
        let ready = eventually(Duration::from_secs(10), || async move {
            get(address, "/readyz").await.0 == 200
        })
        .await;
        let (_, body) = get(address, "/readyz").await;
        assert!(ready, "replica at {address} never became ready: {body}");
        assert!(body.contains("\"ready\":true"), "{body}");
    }
    let leader = cluster
        .leader(Duration::from_secs(10))
        .await
        .expect("a leader");

    let mut before = BTreeMap::new();
    for (index, &address) in addresses.iter().enumerate() {
        before.insert(index, scrape(address).await);
    }
    for (index, samples) in &before {
        let leading = value(samples, "synod_role", &[("role", "leader")]);
        assert_eq!(leading, Some(if *index == leader { 1.0 } else { 0.0 }));
        assert!(value(samples, "synod_ballot_round", &[]).is_some_and(|round| round >= 1.0));
    }

    const WRITES: usize = 50;
    let client = cluster.client(0).await;
    for index in 0..WRITES {
        client
            .create(&format!("/m{index}"), b"x", CreateMode::Persistent)
            .await
            .expect("create");
    }
    let _ = client.get("/m0").await.expect("read");
    // Gauges are published every 50 ms.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut after = BTreeMap::new();
    for (index, &address) in addresses.iter().enumerate() {
        after.insert(index, scrape(address).await);
    }
    let creates = [("op", "create"), ("result", "ok")];
    let answered = total(&after, "synod_client_requests_total", &creates)
        - total(&before, "synod_client_requests_total", &creates);
    assert!(
        answered >= WRITES as f64,
        "{answered} creates counted for {WRITES} made"
    );
    let timed: f64 = after
        .values()
        .map(|samples| {
            histogram_count(samples, "synod_client_request_seconds", &[("op", "create")])
        })
        .sum();
    assert!(
        timed >= WRITES as f64,
        "{timed} create latencies for {WRITES} creates"
    );
    for index in 0..addresses.len() {
        let commits =
            |samples: &Vec<Sample>| histogram_count(samples, "synod_storage_commit_seconds", &[]);
        assert!(
            commits(&after[&index]) > commits(&before[&index]),
            "replica {index} counted no group commit for {WRITES} writes"
        );
        let applies = |samples: &Vec<Sample>| histogram_count(samples, "synod_apply_seconds", &[]);
        assert!(applies(&after[&index]) > applies(&before[&index]));
        let slots = |samples: &Vec<Sample>| histogram_count(samples, "synod_slot_commands", &[]);
        assert!(
            slots(&after[&index]) > slots(&before[&index]),
            "replica {index} counted no chosen slot's commands"
        );
        let nodes = value(&after[&index], "synod_nodes", &[]).unwrap_or(0.0);
        assert!(
            nodes >= WRITES as f64,
            "replica {index} shows {nodes} nodes"
        );
        assert!(value(&after[&index], "synod_database_bytes", &[]).is_some_and(|bytes| bytes > 0.0));
    }
    let leader_samples = &after[&leader];
    for (index, config) in cluster.configs.iter().enumerate() {
        let peer = config.id.to_string();
        assert!(
            value(leader_samples, "synod_peer_lag_slots", &[("peer", &peer)]).is_some(),
            "the leader reports no lag for member {index}"
        );
    }

    // Every replica's links to the others are up.
    for (index, samples) in &after {
        for config in &cluster.configs {
            if config.id != cluster.configs[*index].id {
                let peer = config.id.to_string();
                assert_eq!(
                    value(samples, "synod_peer_connected", &[("peer", &peer)]),
                    Some(1.0),
                    "replica {index} shows no link to member {peer}"
                );
            }
        }
    }

    // A session queued for a lock is counted as a waiter.
    let holder = cluster.client(0).await;
    let waiter = cluster.client(1).await;
    let held = holder
        .lock("/lock")
        .await
        .expect("the first lock is granted");
    let queued = tokio::spawn(async move {
        let granted = waiter.lock("/lock").await;
        (waiter, granted)
    });
    for &address in &addresses {
        let counted = eventually(Duration::from_secs(10), || async move {
            value(&scrape(address).await, "synod_lock_waiters", &[]) == Some(1.0)
        })
        .await;
        assert!(
            counted,
            "replica at {address} does not count the queued session as a lock waiter"
        );
    }
    held.release().await.expect("release");
    let (_waiter, granted) = queued.await.expect("the waiter ran");
    granted.expect("the waiter is granted the lock once it is released");
    for &address in &addresses {
        let cleared = eventually(Duration::from_secs(10), || async move {
            value(&scrape(address).await, "synod_lock_waiters", &[]) == Some(0.0)
        })
        .await;
        assert!(
            cleared,
            "replica at {address} still counts a lock waiter after the grant"
        );
    }

    // Stop the leader: the survivors elect another and count the change.
    let changes_before: BTreeMap<usize, f64> = after
        .iter()
        .map(|(index, samples)| {
            (
                *index,
                value(samples, "synod_leader_changes_total", &[]).unwrap_or(0.0),
            )
        })
        .collect();
    cluster.stop(leader).await;
    let survivors: Vec<usize> = (0..addresses.len())
        .filter(|&index| index != leader)
        .collect();
    for &index in &survivors {
        let address = addresses[index];
        let counted = changes_before[&index];
        let changed = eventually(Duration::from_secs(15), || async move {
            let samples = scrape(address).await;
            value(&samples, "synod_leader_changes_total", &[]).unwrap_or(0.0) > counted
                && value(&samples, "synod_leader", &[]).is_some_and(|leader| leader != 0.0)
        })
        .await;
        assert!(changed, "replica {index} counted no leader change");
        let leader_id = cluster.configs[leader].id.to_string();
        let down = eventually(Duration::from_secs(15), || {
            let leader_id = leader_id.clone();
            async move {
                value(
                    &scrape(address).await,
                    "synod_peer_connected",
                    &[("peer", &leader_id)],
                ) == Some(0.0)
            }
        })
        .await;
        assert!(
            down,
            "replica {index} still shows a link to the stopped leader"
        );
    }
    // The stopped replica's listener is gone with it.
    assert!(std::net::TcpStream::connect(addresses[leader]).is_err());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_http_listener_bounds_its_connections_and_closes_idle_ones() {
    const CONNECTIONS_MAX: u64 = 2;
    let cluster = Cluster::start(1, |config| {
        config.monitoring.http_address = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        config.limits.http_connections_max = CONNECTIONS_MAX;
        config.limits.http_header_timeout_ms = 500;
    })
    .await;
    let address = cluster.replicas[0]
        .as_ref()
        .and_then(|replica| replica.http_address())
        .expect("an HTTP listener");
    let outcome = tokio::task::spawn_blocking(move || {
        // Connections that never send a request hold the whole bound.
        let idle: Vec<std::net::TcpStream> = (0..CONNECTIONS_MAX)
            .map(|_| std::net::TcpStream::connect(address).expect("connect"))
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        // One more is closed at once, before it could ask anything.
        let mut extra = std::net::TcpStream::connect(address).expect("the kernel accepts");
        extra
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("a read timeout");
        let _ = extra.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut buffer = [0u8; 64];
        let refused = matches!(extra.read(&mut buffer), Ok(0) | Err(_));
        // The idle ones are closed after the header timeout.
        let closed = idle.into_iter().all(|mut stream| {
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("a read timeout");
            matches!(stream.read(&mut buffer), Ok(0))
        });
        (refused, closed)
    })
    .await
    .expect("the probe ran");
    assert_eq!(
        outcome,
        (true, true),
        "(extra connection refused, idle ones closed)"
    );
    // With the idle connections gone, it serves again, and counted the refusal.
    let samples = scrape(address).await;
    assert!(
        value(
            &samples,
            "synod_refused_total",
            &[("limit", "http_connections_max")]
        )
        .is_some_and(|refused| refused >= 1.0),
        "the refusal is not counted"
    );
    cluster.shutdown().await;
}
