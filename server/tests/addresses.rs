//! Members named by DNS names: a 3-replica cluster whose configuration
//! gives every peer and client address as `localhost:PORT` forms, serves a
//! client that knows it by those names, tells clients the names, and finds
//! a restarted member again by resolving its name anew.

mod cluster;

use std::time::Duration;

use cluster::{eventually, Cluster};
use synod_proto::CreateMode;
use synod_server::address::HostPort;

/// `localhost` with the port of `address`.
fn by_name(address: &HostPort) -> HostPort {
    format!("localhost:{}", address.port())
        .parse()
        .expect("a name and a port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_named_by_dns_names_form_a_cluster() {
    let mut cluster = Cluster::start(3, |config| {
        for member in &mut config.members {
            member.peer_address = by_name(&member.peer_address);
            member.client_address = by_name(&member.client_address);
        }
    })
    .await;
    let leader = cluster
        .leader(Duration::from_secs(10))
        .await
        .expect("the members elect a leader");
    let status = cluster.replicas[leader].as_ref().expect("up").status();
    assert!(
        status
            .members
            .iter()
            .all(|(_, address)| address.starts_with("localhost:")),
        "clients are told the names: {:?}",
        status.members
    );
    let endpoints: Vec<String> = cluster.configs[0]
        .members
        .iter()
        .map(|member| member.client_address.to_string())
        .collect();
    let client = synod_client::Client::builder()
        .endpoints(endpoints)
        .tls(cluster.certs.client())
        .session_timeout_ms(10_000)
        .request_timeout_ms(10_000)
        .connect()
        .await
        .expect("a client connects by name");
    client
        .create("/named", b"1", CreateMode::Persistent)
        .await
        .expect("a write");

    // A member that restarts is dialled by name again and catches up.
    let follower = (leader + 1) % 3;
    cluster.stop(follower).await;
    client
        .set("/named", b"2", None)
        .await
        .expect("written by the other two");
    cluster.restart(follower).await;
    let other = (leader + 2) % 3;
    cluster.stop(other).await;
    let written = eventually(Duration::from_secs(15), || async {
        client.set("/named", b"3", None).await.is_ok()
    })
    .await;
    assert!(written, "the restarted member votes again");
    drop(client);
    cluster.shutdown().await;
}
