//! Two disks lost in a 3-replica cluster: the designed, safe outcome is a
//! cluster that elects nobody (the two rejoining members vote only once
//! every other member has told them what they may have forgotten). Every
//! replica must say so plainly, and point at the recovery, instead of
//! claiming an election is under way.

mod support;

use std::time::{Duration, Instant};

use support::server_binary;
use synod_faults::cluster::{AddressPlan, Cluster, Timeouts};

/// What every replica's log must say, in part.
const STUCK: &str = "lost their disks and are rejoining";

#[tokio::test]
async fn a_second_disk_lost_while_a_first_rejoins_is_reported_by_every_replica() {
    let dir = tempfile::tempdir().expect("temp dir");
    let plan = AddressPlan::for_process(900);
    let mut cluster = Cluster::start(dir.path(), 3, plan, &server_binary(), Timeouts::default())
        .expect("cluster starts");
    assert!(
        cluster
            .wait_for_leader(Duration::from_secs(30))
            .await
            .is_some(),
        "no first leader"
    );
    cluster.kill(2).expect("kill 2");
    cluster.kill(3).expect("kill 3");
    cluster.wipe_and_join(2).expect("2 rejoins");
    cluster.wipe_and_join(3).expect("3 rejoins");

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut missing: Vec<u64> = cluster.ids();
    while !missing.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        missing.retain(|&id| {
            let log = std::fs::read_to_string(cluster.log_path(id)).unwrap_or_default();
            !log.lines()
                .any(|line| line.contains(STUCK) && line.contains("disaster recovery"))
        });
    }
    let mut unready = Vec::new();
    for id in cluster.ids() {
        let reason = cluster
            .readiness(id)
            .await
            .and_then(|answer| answer["reason"].as_str().map(str::to_string))
            .unwrap_or_default();
        if !reason.contains(STUCK) {
            unready.push(format!("replica {id}'s /readyz reason: {reason:?}"));
        }
    }
    let leader = cluster.leader().await;
    let logs: Vec<String> = missing
        .iter()
        .map(|&id| std::fs::read_to_string(cluster.log_path(id)).unwrap_or_default())
        .collect();
    cluster.stop_all();
    assert_eq!(
        leader, None,
        "a leader was elected without a majority that remembers"
    );
    assert!(
        missing.is_empty(),
        "replicas {missing:?} did not report the lost majority; their logs:\n{}",
        logs.join("\n----\n")
    );
    assert!(unready.is_empty(), "{unready:?}");
}
