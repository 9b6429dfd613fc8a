//! Certificate rotation on a running 3-replica cluster. A replica whose
//! certificate is replaced on disk by one issued today from the cluster's
//! CA presents the new one to new connections without a restart, counts
//! the reload and reports the new expiry in its metrics; the cluster keeps
//! working through it (a client writes through the rotated replica, and a
//! peer restarted after the rotation is dialled and accepted again).
//! Files that do not pass (a certificate without its key) are refused, and
//! the certificate in use stays until the files are whole.

mod cluster;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cluster::http::{scrape, value};
use cluster::{eventually, Cluster};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use synod_proto::certgen::{write_pair, CertificateAuthority, IssuedCertificate};
use synod_proto::tls::{self, node_server_name, TlsMaterial};
use synod_proto::CreateMode;

/// The leaf certificate replica `node` presents on `address` to a new
/// connection.
async fn presented_leaf(client: &TlsMaterial, address: SocketAddr, node: u64) -> Vec<u8> {
    let endpoint = tls::client_endpoint(
        client,
        "127.0.0.1:0".parse().expect("address"),
        Arc::new(quinn::TransportConfig::default()),
    )
    .expect("client endpoint");
    let connection = endpoint
        .connect(address, &node_server_name(node))
        .expect("connect")
        .await
        .expect("TLS handshake");
    let chain = tls::peer_certificates(&connection).expect("the replica's chain");
    connection.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    chain[0].to_vec()
}

fn leaf_der(issued: &IssuedCertificate) -> Vec<u8> {
    CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())
        .expect("a PEM certificate")
        .to_vec()
}

/// The value of the sample `name` in a replica's metrics.
async fn metric(address: SocketAddr, name: &str) -> f64 {
    value(&scrape(address).await, name, &[]).unwrap_or_else(|| panic!("no {name} in the metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replaced_certificate_is_used_without_a_restart() {
    let mut cluster = Cluster::start(3, |config| {
        config.tls.reload_check_ms = 100;
        config.monitoring.http_address = Some("127.0.0.1:0".parse().expect("address"));
    })
    .await;
    let client_material = cluster.certs.client().load().expect("client files");
    let address = cluster.client_address(0);
    let http = cluster.replicas[0]
        .as_ref()
        .and_then(|replica| replica.http_address())
        .expect("an HTTP listener");
    let first = presented_leaf(&client_material, address, 1).await;
    assert_eq!(metric(http, "synod_tls_reloads_total").await, 0.0);
    let year = 365.0 * 86_400.0;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs_f64();
    let expiry = metric(http, "synod_tls_certificate_expiry_seconds").await;
    assert!((expiry - (now + year)).abs() < 120.0, "{expiry} vs {now}");

    // A new certificate for replica 1, issued today from the cluster's CA,
    // valid for 30 days, written over the old files.
    let ca = CertificateAuthority::load(&cluster.certs.ca_cert(), &cluster.certs.ca_key())
        .expect("the cluster's CA");
    let rotated = ca
        .issue_node(1, &["localhost".into(), "127.0.0.1".into()], 30)
        .expect("issued");
    let files = cluster.certs.node(1);
    write_pair(&files.cert, &files.key, &rotated).expect("written");
    let new_leaf = leaf_der(&rotated);
    assert_ne!(first, new_leaf);
    let presented = eventually(Duration::from_secs(10), || async {
        presented_leaf(&client_material, address, 1).await == new_leaf
    })
    .await;
    assert!(presented, "replica 1 presents its new certificate");
    assert_eq!(metric(http, "synod_tls_reloads_total").await, 1.0);
    let expiry = metric(http, "synod_tls_certificate_expiry_seconds").await;
    assert!(
        (expiry - (now + 30.0 * 86_400.0)).abs() < 120.0,
        "{expiry} vs {now}"
    );

    // Sessions go on through the rotated replica.
    let client = cluster.client(0).await;
    client
        .create("/rotated", b"yes", CreateMode::Persistent)
        .await
        .expect("a write through replica 1");

    // A peer restarted after the rotation is dialled with the new
    // certificate and accepts it: it catches up on what was written.
    cluster.stop(1).await;
    client
        .set("/rotated", b"while 2 was down", None)
        .await
        .expect("written with replicas 1 and 3");
    cluster.restart(1).await;
    cluster.stop(2).await;
    let written = eventually(Duration::from_secs(15), || async {
        client.set("/rotated", b"with 2", None).await.is_ok()
    })
    .await;
    assert!(written, "replicas 1 and 2 form a quorum after the rotation");
    cluster.restart(2).await;

    // A certificate without its key is refused; the one in use stays.
    let half = ca
        .issue_node(1, &["localhost".into(), "127.0.0.1".into()], 10)
        .expect("issued");
    let failures = metric(http, "synod_tls_reload_failures_total").await;
    std::fs::write(&files.cert, &half.cert_pem).expect("certificate only");
    let refused = eventually(Duration::from_secs(10), || async {
        metric(http, "synod_tls_reload_failures_total").await > failures
    })
    .await;
    assert!(refused, "the mismatched files are refused");
    assert_eq!(
        presented_leaf(&client_material, address, 1).await,
        new_leaf,
        "the certificate in use stays"
    );
    // Once the key follows, the pair is taken.
    std::fs::write(&files.key, &half.key_pem).expect("its key");
    let half_leaf = leaf_der(&half);
    let taken = eventually(Duration::from_secs(10), || async {
        presented_leaf(&client_material, address, 1).await == half_leaf
    })
    .await;
    assert!(taken, "the whole pair is taken");
    assert_eq!(metric(http, "synod_tls_reloads_total").await, 2.0);
    drop(client);
    cluster.shutdown().await;
}
