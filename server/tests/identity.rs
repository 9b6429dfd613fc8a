//! Hostile peers and foreign databases, against real 3-replica clusters over
//! QUIC on 127.0.0.1 (ephemeral ports, redb in temporary directories):
//! - a certificate signed by the cluster's own CA (loaded from its PEM
//!   files, signed here with rcgen) that names `node-3.synod` but has only
//!   the clientAuth usage, or both usages but no replica URI, is refused on
//!   the peer port, while the cluster keeps serving;
//! - a replica whose data directory is wiped and that is restarted with
//!   `--bootstrap` is refused by its peers and stops with an error naming
//!   `--join`, while the other two keep serving writes; restarted with
//!   `--join` it is welcomed and catches up;
//! - a replica started on the database of another cluster that has the same
//!   `cluster_id` name stops with an error saying so, and the right cluster
//!   keeps serving.
//!
//! Each test stops every replica it started: at its end through
//! `Cluster::shutdown`, and on a failure by dropping the replicas, which
//! closes their shutdown channels and ends their event loops.

mod cluster;

use std::sync::Arc;
use std::time::Duration;

use cluster::{eventually, Cluster};
use synod_client::CreateMode;
use synod_proto::tls::{self, handshake, node_server_name, HandshakeError, TlsMaterial};
use synod_proto::wire::Hello;
use synod_proto::PROTOCOL_VERSION;
use synod_server::replica::ReplicaError;

/// Bound on any single wait.
const WAIT: Duration = Duration::from_secs(20);

/// Waits until every running replica shows the same cluster identity and
/// lists every member as confirmed; returns the identity.
async fn settled_identity(cluster: &Cluster) -> String {
    let members = cluster.configs.len();
    let settled = eventually(WAIT, || async {
        let statuses: Vec<_> = cluster
            .replicas
            .iter()
            .flatten()
            .map(|replica| replica.status().replica)
            .collect();
        let first = statuses[0].cluster_identity.clone();
        first.is_some()
            && statuses.iter().all(|status| {
                status.cluster_identity == first && status.confirmed_members.len() == members
            })
    })
    .await;
    assert!(settled, "the cluster identity settles on every replica");
    cluster.replicas[0]
        .as_ref()
        .expect("replica 0 runs")
        .status()
        .replica
        .cluster_identity
        .expect("an identity")
}

/// A certificate signed by `cluster`'s CA with the given names and usages.
fn signed_by_cluster_ca(
    cluster: &Cluster,
    names: Vec<String>,
    usages: Vec<rcgen::ExtendedKeyUsagePurpose>,
) -> TlsMaterial {
    let ca_pem = std::fs::read_to_string(cluster.certs.dir.join("ca.pem")).expect("ca.pem");
    let ca_key_pem = std::fs::read_to_string(cluster.certs.ca_key()).expect("ca-key.pem");
    let ca_key = rcgen::KeyPair::from_pem(&ca_key_pem).expect("CA key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("CA");
    let mut params = rcgen::CertificateParams::new(names.clone()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, names[0].clone());
    params.extended_key_usages = usages;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let key = rcgen::KeyPair::generate().expect("key");
    let certificate = params.signed_by(&key, &issuer).expect("signed");
    TlsMaterial::from_pem(
        "hostile",
        ca_pem.as_bytes(),
        certificate.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
    )
    .expect("material")
}

/// Dials replica `index`'s peer port with `material` and says it is node 3
/// of the cluster, with the cluster's identity.
async fn hello_as_node_3(
    cluster: &Cluster,
    index: usize,
    material: &TlsMaterial,
    identity: &str,
) -> Result<(), HandshakeError> {
    let endpoint = tls::client_endpoint(
        material,
        "127.0.0.1:0".parse().expect("address"),
        Arc::new(quinn::TransportConfig::default()),
    )
    .expect("endpoint");
    let target = &cluster.configs[index];
    let address = target.peer_listen_address();
    let connecting = endpoint
        .connect(address, &node_server_name(target.id))
        .expect("connecting");
    let result = async {
        let connection = tokio::time::timeout(WAIT, connecting)
            .await
            .map_err(|_| HandshakeError::TimedOut(WAIT))??;
        let hello = Hello::Peer {
            protocol_version: PROTOCOL_VERSION,
            cluster_id: target.cluster_id.clone(),
            node_id: 3,
            cluster_identity: u128::from_str_radix(identity, 16).ok(),
            joining: false,
        };
        let handshaken = handshake(connection, &hello, 4096, WAIT).await?;
        handshaken.connection.close(0u32.into(), b"done");
        Ok(())
    }
    .await;
    endpoint.close(0u32.into(), b"done");
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_certificate_naming_a_replica_is_refused_on_the_peer_port() {
    let cluster = Cluster::start(3, |_| {}).await;
    let identity = settled_identity(&cluster).await;
    let client = cluster.client(0).await;
    client
        .create("/before", b"1", CreateMode::Persistent)
        .await
        .expect("write before");

    // The cluster CA's signature and the name node-3.synod, but only the
    // clientAuth usage: a client's certificate.
    let client_only = signed_by_cluster_ca(
        &cluster,
        vec![node_server_name(3)],
        vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth],
    );
    // Both usages and the name, but not the replica-only URI.
    let no_replica_uri = signed_by_cluster_ca(
        &cluster,
        vec![node_server_name(3)],
        vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ],
    );
    for (material, words) in [
        (&client_only, "clientAuth"),
        (&no_replica_uri, "synod-replica://node-<id>"),
    ] {
        for index in [0, 1] {
            match hello_as_node_3(&cluster, index, material, &identity).await {
                Err(HandshakeError::Refused { reason }) => {
                    assert!(
                        reason.contains("not a replica certificate") && reason.contains(words),
                        "reason {reason:?} mentions {words:?}"
                    );
                }
                Err(other) => panic!("expected a refusal by the hello, got {other}"),
                Ok(()) => panic!("a certificate without the replica identity was welcomed"),
            }
        }
    }

    // The real node 3 is still a member in step, and the cluster serves.
    client
        .create("/after", b"2", CreateMode::Persistent)
        .await
        .expect("write after");
    let third = cluster.client(2).await;
    let (data, _) = third.get("/after").await.expect("read at node 3");
    assert_eq!(data, b"2");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_replica_restarted_with_bootstrap_is_refused_and_told_to_join() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let identity = settled_identity(&cluster).await;
    let client = cluster.client(0).await;
    client
        .create("/before", b"1", CreateMode::Persistent)
        .await
        .expect("write before");

    cluster.stop(2).await;
    let data_dir = cluster.configs[2].data_dir.clone();
    std::fs::remove_dir_all(&data_dir).expect("wipe node 3");
    cluster.restart_as(2, true, false).await;
    let wiped = cluster.replicas[2].take().expect("node 3 started");
    let stopped = tokio::time::timeout(WAIT, wiped.wait())
        .await
        .expect("node 3 stops by itself");
    match stopped {
        Err(ReplicaError::ClusterIdentity(reason)) => {
            assert!(reason.contains("--join"), "{reason}");
            assert!(reason.contains("lost its data directory"), "{reason}");
            assert!(reason.contains(&identity), "{reason}");
        }
        other => panic!("expected a cluster identity error, got {other:?}"),
    }

    // The other two serve writes meanwhile.
    client
        .create("/during", b"2", CreateMode::Persistent)
        .await
        .expect("write with node 3 down");

    // With --join, on an empty directory again, it is welcome and catches
    // up, and confirms once more.
    std::fs::remove_dir_all(&data_dir).expect("wipe node 3 again");
    cluster.restart_as(2, false, true).await;
    let caught_up = eventually(WAIT, || async {
        let leader_revision = cluster.replicas[0]
            .as_ref()
            .map_or(0, |replica| replica.status().replica.revision);
        let status = cluster.replicas[2]
            .as_ref()
            .expect("node 3 runs")
            .status()
            .replica;
        status.role != "joining"
            && status.revision >= leader_revision
            && status.cluster_identity.as_deref() == Some(identity.as_str())
    })
    .await;
    assert!(caught_up, "node 3 rejoined and caught up");
    let third = cluster.client(2).await;
    let (data, _) = third.get("/during").await.expect("read at node 3");
    assert_eq!(data, b"2");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_of_another_cluster_with_the_same_name_is_refused() {
    let mut right = Cluster::start(3, |_| {}).await;
    let mut other = Cluster::start(3, |_| {}).await;
    assert_eq!(right.configs[0].cluster_id, other.configs[0].cluster_id);
    let right_identity = settled_identity(&right).await;
    let other_identity = settled_identity(&other).await;
    assert_ne!(
        right_identity, other_identity,
        "two clusters, two identities"
    );
    let client = right.client(0).await;
    client
        .create("/right", b"1", CreateMode::Persistent)
        .await
        .expect("write before");

    // Node 3 of the right cluster gets node 3's database of the other.
    right.stop(2).await;
    other.stop(2).await;
    let target = right.configs[2].data_dir.clone();
    std::fs::remove_dir_all(&target).expect("remove node 3's directory");
    std::fs::rename(&other.configs[2].data_dir, &target).expect("swap in the other's");
    right.restart(2).await;
    let swapped = right.replicas[2].take().expect("node 3 started");
    let stopped = tokio::time::timeout(WAIT, swapped.wait())
        .await
        .expect("node 3 stops by itself");
    match stopped {
        Err(ReplicaError::ClusterIdentity(reason)) => {
            assert!(reason.contains("another cluster"), "{reason}");
            assert!(reason.contains(&other_identity), "{reason}");
            assert!(reason.contains(&right_identity), "{reason}");
        }
        other => panic!("expected a cluster identity error, got {other:?}"),
    }

    // The right cluster keeps serving, with the same identity, and its two
    // replicas kept running.
    client
        .create("/still", b"2", CreateMode::Persistent)
        .await
        .expect("write after");
    for index in [0, 1] {
        let status = right.replicas[index]
            .as_ref()
            .expect("still running")
            .status()
            .replica;
        assert_eq!(
            status.cluster_identity.as_deref(),
            Some(right_identity.as_str())
        );
    }
    right.shutdown().await;
    other.shutdown().await;
}
