//! The QUIC transport over real sockets on 127.0.0.1, with certificates
//! generated into a temporary directory for each test.
//!
//! Peers: three `PeerNetwork`s on ephemeral ports exchange envelopes between
//! every pair (including a burst that must arrive whole and in order);
//! `send` drops envelopes to a full queue or above the frame bound instead
//! of blocking; a
//! replica that restarts on the same port is redialled; a peer of another
//! cluster, one whose certificate does not name the node it claims, a
//! client certificate posing as a replica and a certificate from another CA
//! are all refused, and envelopes from a refused replica never arrive; a
//! replica never uses a peer it dialled whose certificate lacks the
//! replica-only identity, even if it names the node;
//! envelopes naming another sender are dropped, and a malformed or oversize
//! frame closes only the connection it came on; a snapshot of a few MiB
//! streams across, and a missing or oversize one is an error. Clients: a client completes the handshake through
//! `synod_proto::tls::connect` and exchanges frames in order (and a
//! keep-alive datagram); a wrong protocol version or a replica's hello is
//! refused with a readable reason; a session the replica ends is closed
//! cleanly after its last frame; a malformed frame and an oversize frame each close only their
//! own connection after an `Unavailable` explaining why, and a certificate
//! from another CA is refused, while another client keeps working. Every
//! wait is bounded, and every endpoint is shut down.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use synod_paxos::{Ballot, Commit, Envelope, Forward, Message, NodeId};
use synod_proto::certgen::{generate_dev_certs, DevCerts};
use synod_proto::tls::{
    self, connect, handshake, node_server_name, HandshakeError, Handshaken, TlsMaterial,
};
use synod_proto::wire::{encode_frame, ClientFrame, Hello, ServerFrame, DEFAULT_MAX_FRAME_BYTES};
use synod_proto::PROTOCOL_VERSION;
use synod_server::address::HostPort;
use synod_server::transport::{
    ClientConnection, ClientListener, ClientListenerConfig, ClusterIdentity, PeerNetwork,
    PeerNetworkConfig, RefusalSink, SnapshotPiece, SnapshotSource, TransportError, TransportLimits,
    CLOSE_NORMAL, CLOSE_PROTOCOL_ERROR,
};
use tokio::sync::mpsc;
use tokio::time::timeout;

const CLUSTER: &str = "test-cluster";
/// Bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

fn hosts() -> Vec<String> {
    vec!["localhost".to_string(), "127.0.0.1".to_string()]
}

fn certificates() -> (tempfile::TempDir, DevCerts) {
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = generate_dev_certs(dir.path(), &[1, 2, 3], &hosts()).expect("certificates");
    (dir, certs)
}

fn limits() -> TransportLimits {
    TransportLimits {
        reconnect_backoff_min: Duration::from_millis(20),
        reconnect_backoff_max: Duration::from_millis(200),
        handshake_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(5),
        keep_alive_interval: Duration::from_millis(500),
        shutdown_drain_timeout: Duration::from_millis(100),
        ..TransportLimits::default()
    }
}

fn load(certs: &DevCerts, node: NodeId) -> TlsMaterial {
    certs.node(node).load().expect("node material")
}

fn envelope(from: NodeId, to: NodeId, sequence: u64) -> Envelope {
    Envelope {
        from,
        to,
        message: Message::Commit(Commit {
            ballot: Ballot::new(1, from),
            chosen_through: sequence,
        }),
    }
}

fn sequence_of(envelope: &Envelope) -> u64 {
    match &envelope.message {
        Message::Commit(commit) => commit.chosen_through,
        other => panic!("unexpected message {other:?}"),
    }
}

/// A replica's peer transport and what it received.
struct Node {
    network: PeerNetwork,
    inbox: mpsc::Receiver<Envelope>,
}

/// The members as a replica's configuration gives them.
fn by_address(members: &BTreeMap<NodeId, SocketAddr>) -> BTreeMap<NodeId, HostPort> {
    members
        .iter()
        .map(|(&id, &address)| (id, address.into()))
        .collect()
}

fn start_node(
    node_id: NodeId,
    cluster: &str,
    socket: UdpSocket,
    members: &BTreeMap<NodeId, SocketAddr>,
    material: TlsMaterial,
) -> Node {
    let (delivered, inbox) = mpsc::channel(8192);
    let config = PeerNetworkConfig {
        node_id,
        cluster_id: cluster.to_string(),
        listen: "127.0.0.1:0".parse().expect("address"),
        members: by_address(members),
        tls: material,
        limits: limits(),
        identity: Arc::new(ClusterIdentity::unchecked(node_id, members.len())),
    };
    let network = PeerNetwork::start_on(socket, config, delivered).expect("peer network starts");
    Node { network, inbox }
}

fn bind_local() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")
}

/// Three replicas on ephemeral ports.
fn start_cluster(certs: &DevCerts) -> (BTreeMap<NodeId, Node>, BTreeMap<NodeId, SocketAddr>) {
    let sockets: BTreeMap<NodeId, UdpSocket> = (1..=3).map(|id| (id, bind_local())).collect();
    let members: BTreeMap<NodeId, SocketAddr> = sockets
        .iter()
        .map(|(&id, socket)| (id, socket.local_addr().expect("local address")))
        .collect();
    let nodes = sockets
        .into_iter()
        .map(|(id, socket)| {
            (
                id,
                start_node(id, CLUSTER, socket, &members, load(certs, id)),
            )
        })
        .collect();
    (nodes, members)
}

async fn shutdown_all(nodes: BTreeMap<NodeId, Node>) {
    for node in nodes.values() {
        node.network.shutdown().await;
    }
}

async fn receive(inbox: &mut mpsc::Receiver<Envelope>) -> Envelope {
    timeout(WAIT, inbox.recv())
        .await
        .expect("an envelope within the wait")
        .expect("inbox open")
}

/// Asserts nothing arrives for a while.
async fn assert_silent(inbox: &mut mpsc::Receiver<Envelope>, wait: Duration) {
    if let Ok(Some(envelope)) = timeout(wait, inbox.recv()).await {
        panic!("unexpected envelope {envelope:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_flow_between_every_pair() {
    let (_dir, certs) = certificates();
    let (mut nodes, _) = start_cluster(&certs);
    for from in 1..=3u64 {
        let envelopes = (1..=3u64)
            .filter(|&to| to != from)
            .map(|to| envelope(from, to, from * 10 + to))
            .collect();
        nodes[&from].network.send(envelopes);
    }
    for to in 1..=3u64 {
        let node = nodes.get_mut(&to).expect("node");
        let mut senders = Vec::new();
        for _ in 0..2 {
            let received = receive(&mut node.inbox).await;
            assert_eq!(received.to, to);
            assert_eq!(sequence_of(&received), received.from * 10 + to);
            senders.push(received.from);
        }
        senders.sort_unstable();
        let expected: Vec<u64> = (1..=3).filter(|&id| id != to).collect();
        assert_eq!(senders, expected, "node {to} heard from every other node");
    }

    // A burst (sent before anyone reads) arrives whole and in order: it is
    // batched into few writes on one stream.
    let burst = 2000u64;
    nodes[&1].network.send(
        (0..burst)
            .map(|sequence| envelope(1, 2, sequence))
            .collect(),
    );
    let node2 = nodes.get_mut(&2).expect("node 2");
    for expected in 0..burst {
        assert_eq!(sequence_of(&receive(&mut node2.inbox).await), expected);
    }
    assert_eq!(nodes[&1].network.dropped_envelopes(), 0);

    // Envelopes to oneself are delivered locally; to strangers, dropped.
    nodes[&3]
        .network
        .send(vec![envelope(3, 3, 7), envelope(3, 9, 8)]);
    let node3 = nodes.get_mut(&3).expect("node 3");
    assert_eq!(sequence_of(&receive(&mut node3.inbox).await), 7);
    assert_eq!(nodes[&3].network.dropped_envelopes(), 1);
    shutdown_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_is_redialled() {
    let (_dir, certs) = certificates();
    let (mut nodes, members) = start_cluster(&certs);
    nodes[&1].network.send(vec![envelope(1, 3, 1)]);
    let node3 = nodes.get_mut(&3).expect("node 3");
    assert_eq!(sequence_of(&receive(&mut node3.inbox).await), 1);
    assert!(nodes[&1].network.is_connected(3));

    let old = nodes.remove(&3).expect("node 3");
    old.network.shutdown().await;
    drop(old);

    // The port is free once the old endpoint's connections have drained
    // (three probe timeouts); rebinding may need a moment.
    let address = members[&3];
    let mut socket = None;
    for _ in 0..400 {
        match UdpSocket::bind(address) {
            Ok(bound) => {
                socket = Some(bound);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let socket = socket.expect("node 3's port can be bound again");
    let mut restarted = start_node(3, CLUSTER, socket, &members, load(&certs, 3));

    // Node 1 redials with backoff; keep sending until something arrives.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut sequence = 100;
    let received = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node 1 never reached the restarted node 3"
        );
        nodes[&1].network.send(vec![envelope(1, 3, sequence)]);
        sequence += 1;
        if let Ok(Some(envelope)) =
            timeout(Duration::from_millis(100), restarted.inbox.recv()).await
        {
            break envelope;
        }
    };
    assert_eq!(received.from, 1);
    assert!(sequence_of(&received) >= 100);
    nodes.insert(3, restarted);
    shutdown_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_drops_rather_than_blocks() {
    let (_dir, certs) = certificates();
    // Node 2 is not running, so node 1's queue to it only fills.
    let sockets: Vec<UdpSocket> = (0..2).map(|_| bind_local()).collect();
    let members: BTreeMap<NodeId, SocketAddr> = sockets
        .iter()
        .enumerate()
        .map(|(index, socket)| (index as u64 + 1, socket.local_addr().expect("address")))
        .collect();
    let mut sockets = sockets.into_iter();
    let (delivered, _inbox) = mpsc::channel(16);
    let queue = 10;
    let network = PeerNetwork::start_on(
        sockets.next().expect("socket"),
        PeerNetworkConfig {
            node_id: 1,
            cluster_id: CLUSTER.to_string(),
            listen: "127.0.0.1:0".parse().expect("address"),
            members: by_address(&members),
            tls: load(&certs, 1),
            limits: TransportLimits {
                peer_queue_envelopes_max: queue,
                peer_frame_bytes_max: 1024,
                ..limits()
            },
            identity: Arc::new(ClusterIdentity::unchecked(1, members.len())),
        },
        delivered,
    )
    .expect("starts");
    network.send((0..25).map(|sequence| envelope(1, 2, sequence)).collect());
    assert_eq!(network.dropped_envelopes(), 25 - queue as u64);
    network.shutdown().await;
    drop(network);

    // An envelope above the frame bound is dropped by its sender, and the
    // link carries on.
    let mut node2 = start_node(
        2,
        CLUSTER,
        sockets.next().expect("socket"),
        &members,
        load(&certs, 2),
    );
    // A fresh socket for the new node 1: node 2 checks a peer's identity,
    // not its address.
    let socket = bind_local();
    let mut members = members;
    members.insert(1, socket.local_addr().expect("address"));
    let (delivered, _inbox) = mpsc::channel(16);
    let node1 = PeerNetwork::start_on(
        socket,
        PeerNetworkConfig {
            node_id: 1,
            cluster_id: CLUSTER.to_string(),
            listen: "127.0.0.1:0".parse().expect("address"),
            members: by_address(&members),
            tls: load(&certs, 1),
            limits: TransportLimits {
                peer_frame_bytes_max: 1024,
                ..limits()
            },
            identity: Arc::new(ClusterIdentity::unchecked(1, 3)),
        },
        delivered,
    )
    .expect("starts");
    let large = Envelope {
        from: 1,
        to: 2,
        message: Message::Forward(Forward {
            commands: vec![Bytes::from(vec![7u8; 4096])].into(),
        }),
    };
    node1.send(vec![large, envelope(1, 2, 5)]);
    let received = receive(&mut node2.inbox).await;
    assert_eq!(sequence_of(&received), 5);
    assert_eq!(node1.dropped_envelopes(), 1);
    node1.shutdown().await;
    node2.network.shutdown().await;
}

/// A raw QUIC client presenting `material`, for speaking to a peer port.
fn raw_endpoint(material: &TlsMaterial) -> quinn::Endpoint {
    tls::client_endpoint(
        material,
        "127.0.0.1:0".parse().expect("address"),
        Arc::new(quinn::TransportConfig::default()),
    )
    .expect("client endpoint")
}

async fn raw_hello(
    endpoint: &quinn::Endpoint,
    address: SocketAddr,
    server_name: &str,
    hello: Hello,
) -> Result<Handshaken, HandshakeError> {
    let connecting = endpoint.connect(address, server_name)?;
    let connection = timeout(WAIT, connecting).await.expect("bounded")?;
    handshake(connection, &hello, 4096, WAIT).await
}

fn expect_refused(result: Result<Handshaken, HandshakeError>, words: &str) {
    match result {
        Err(HandshakeError::Refused { reason }) => {
            assert!(
                reason.contains(words),
                "reason {reason:?} mentions {words:?}"
            )
        }
        Err(other) => panic!("expected a refusal mentioning {words:?}, got {other}"),
        Ok(_) => panic!("expected a refusal mentioning {words:?}, was welcomed"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_by_peers() {
    let (_dir, certs) = certificates();
    let (mut nodes, members) = start_cluster(&certs);
    let node2 = members[&2];
    let name2 = node_server_name(2);
    let peer_hello = |cluster: &str, node_id| Hello::Peer {
        protocol_version: PROTOCOL_VERSION,
        cluster_id: cluster.to_string(),
        node_id,
        cluster_identity: None,
        joining: false,
    };

    // Node 1's own certificate, but another cluster.
    let as_node1 = raw_endpoint(&load(&certs, 1));
    expect_refused(
        raw_hello(&as_node1, node2, &name2, peer_hello("other-cluster", 1)).await,
        "cluster",
    );
    // Node 1's certificate claiming to be node 3.
    expect_refused(
        raw_hello(&as_node1, node2, &name2, peer_hello(CLUSTER, 3)).await,
        "node-3.synod",
    );
    // A node that is not a member.
    expect_refused(
        raw_hello(&as_node1, node2, &name2, peer_hello(CLUSTER, 7)).await,
        "not another member",
    );
    // Another protocol version.
    expect_refused(
        raw_hello(
            &as_node1,
            node2,
            &name2,
            Hello::Peer {
                protocol_version: PROTOCOL_VERSION + 1,
                cluster_id: CLUSTER.to_string(),
                node_id: 1,
                cluster_identity: None,
                joining: false,
            },
        )
        .await,
        "protocol version",
    );
    // A client hello on the peer port.
    expect_refused(
        raw_hello(
            &as_node1,
            node2,
            &name2,
            Hello::Client {
                protocol_version: PROTOCOL_VERSION,
            },
        )
        .await,
        "peer port",
    );
    // A client certificate (signed by the CA, but naming no node).
    let as_client = raw_endpoint(&certs.client().load().expect("client material"));
    expect_refused(
        raw_hello(&as_client, node2, &name2, peer_hello(CLUSTER, 1)).await,
        "node-1.synod",
    );
    // The right node id and cluster from a certificate of another CA: TLS
    // refuses it before any hello.
    let foreign_dir = tempfile::tempdir().expect("temp dir");
    let foreign = generate_dev_certs(foreign_dir.path(), &[1], &hosts()).expect("foreign certs");
    let foreign_material = foreign.node(1).load().expect("foreign material");
    let as_foreign = raw_endpoint(&foreign_material);
    match raw_hello(&as_foreign, node2, &name2, peer_hello(CLUSTER, 1)).await {
        Ok(_) => panic!("a certificate from another CA was welcomed"),
        Err(HandshakeError::Refused { reason }) => {
            panic!("refused by a hello ({reason}), not by TLS")
        }
        Err(_) => {}
    }
    // And the welcome, for contrast.
    let welcomed = raw_hello(&as_node1, node2, &name2, peer_hello(CLUSTER, 1))
        .await
        .expect("node 1 is welcome");
    assert_eq!(welcomed.node_id, 2);
    welcomed.connection.close(0u32.into(), b"done");
    for endpoint in [&as_node1, &as_client, &as_foreign] {
        endpoint.close(0u32.into(), b"done");
    }

    // Whole replicas that are refused: one of another cluster, one with a
    // certificate of another CA. Both claim to be node 1 and talk to node
    // 2; nothing they send arrives, while the real node 1 still gets through.
    let mut impostors = Vec::new();
    for (cluster, material) in [
        ("other-cluster", load(&certs, 1)),
        (CLUSTER, foreign_material),
    ] {
        let mut impostor_members = members.clone();
        let socket = bind_local();
        impostor_members.insert(1, socket.local_addr().expect("address"));
        impostors.push(start_node(1, cluster, socket, &impostor_members, material));
    }
    for impostor in &impostors {
        impostor.network.send(vec![envelope(1, 2, 666)]);
    }
    let node2_state = nodes.get_mut(&2).expect("node 2");
    assert_silent(&mut node2_state.inbox, Duration::from_millis(500)).await;
    for impostor in &impostors {
        assert!(!impostor.network.is_connected(2));
    }
    nodes[&1].network.send(vec![envelope(1, 2, 1)]);
    let node2_state = nodes.get_mut(&2).expect("node 2");
    assert_eq!(sequence_of(&receive(&mut node2_state.inbox).await), 1);
    for impostor in impostors {
        impostor.network.shutdown().await;
    }
    as_node1.wait_idle().await;
    shutdown_all(nodes).await;
}

/// Waits for `connection` to be closed by the other side with `code`.
async fn expect_closed_with(connection: &quinn::Connection, code: u32) {
    match timeout(WAIT, connection.closed()).await.expect("closed") {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, code.into())
        }
        other => panic!("expected an application close, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peer_frames_close_only_that_connection() {
    let (_dir, certs) = certificates();
    // Nodes 2 and 3 run; node 1 is played by hand, over raw QUIC with node
    // 1's certificate (a running node 1 would supersede the raw connection).
    let sockets: BTreeMap<NodeId, UdpSocket> = (1..=3).map(|id| (id, bind_local())).collect();
    let members: BTreeMap<NodeId, SocketAddr> = sockets
        .iter()
        .map(|(&id, socket)| (id, socket.local_addr().expect("address")))
        .collect();
    let mut nodes: BTreeMap<NodeId, Node> = sockets
        .into_iter()
        .filter(|(id, _)| *id != 1)
        .map(|(id, socket)| {
            (
                id,
                start_node(id, CLUSTER, socket, &members, load(&certs, id)),
            )
        })
        .collect();
    let as_node1 = raw_endpoint(&load(&certs, 1));
    let name2 = node_server_name(2);
    let hello = Hello::Peer {
        protocol_version: PROTOCOL_VERSION,
        cluster_id: CLUSTER.to_string(),
        node_id: 1,
        cluster_identity: None,
        joining: false,
    };

    // Envelopes whose sender or recipient is not the connection's are
    // dropped; the stream goes on.
    let welcomed = raw_hello(&as_node1, members[&2], &name2, hello.clone())
        .await
        .expect("welcomed");
    let mut stream = welcomed.connection.open_uni().await.expect("stream");
    let envelopes = [envelope(3, 2, 1), envelope(1, 3, 2), envelope(1, 2, 3)];
    stream
        .write_all(&tls::encode_frames(envelopes.iter()))
        .await
        .expect("written");
    let node2 = nodes.get_mut(&2).expect("node 2");
    let received = receive(&mut node2.inbox).await;
    assert_eq!((received.from, sequence_of(&received)), (1, 3));

    // A malformed frame closes the connection.
    let mut garbage = 3u32.to_le_bytes().to_vec();
    garbage.extend_from_slice(&[0xff, 0xff, 0xff]);
    stream.write_all(&garbage).await.expect("written");
    expect_closed_with(&welcomed.connection, CLOSE_PROTOCOL_ERROR).await;

    // So does an oversize one, refused from its length prefix.
    let welcomed = raw_hello(&as_node1, members[&2], &name2, hello)
        .await
        .expect("welcomed");
    let mut stream = welcomed.connection.open_uni().await.expect("stream");
    let header = ((limits().peer_frame_bytes_max + 1) as u32).to_le_bytes();
    stream.write_all(&header).await.expect("written");
    expect_closed_with(&welcomed.connection, CLOSE_PROTOCOL_ERROR).await;

    // Node 3's link to node 2 never noticed.
    nodes[&3].network.send(vec![envelope(3, 2, 9)]);
    let node2 = nodes.get_mut(&2).expect("node 2");
    let received = receive(&mut node2.inbox).await;
    assert_eq!((received.from, sequence_of(&received)), (3, 9));
    assert_silent(&mut node2.inbox, Duration::from_millis(100)).await;
    as_node1.close(0u32.into(), b"done");
    shutdown_all(nodes).await;
}

/// A source streaming `data` in 64 KiB chunks, failing after `fail_after`
/// chunks when given.
fn chunked_source(
    through_slot: u64,
    data: Bytes,
    fail_after: Option<usize>,
) -> Arc<dyn SnapshotSource> {
    Arc::new(move || {
        let (pieces, receiver) = mpsc::channel(4);
        let data = data.clone();
        tokio::spawn(async move {
            let _ = pieces.send(SnapshotPiece::Start { through_slot }).await;
            for (index, start) in (0..data.len()).step_by(64 << 10).enumerate() {
                if fail_after == Some(index) {
                    let _ = pieces
                        .send(SnapshotPiece::Failed("the disk went away".into()))
                        .await;
                    return;
                }
                let end = (start + (64 << 10)).min(data.len());
                if pieces
                    .send(SnapshotPiece::Chunk(data.slice(start..end)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = pieces.send(SnapshotPiece::End).await;
        });
        receiver
    })
}

/// Fetches a whole snapshot into memory: its slot and bytes.
async fn fetch_all(
    network: &PeerNetwork<Envelope>,
    from: NodeId,
) -> Result<(u64, Vec<u8>), TransportError> {
    let (chunks, mut arriving) = mpsc::channel::<Bytes>(4);
    let collect = tokio::spawn(async move {
        let mut data = Vec::new();
        while let Some(chunk) = arriving.recv().await {
            data.extend_from_slice(&chunk);
        }
        data
    });
    let through = network.fetch_snapshot(from, chunks).await;
    let data = collect.await.expect("collector");
    through.map(|through| (through, data))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_streams_across() {
    let (_dir, certs) = certificates();
    let (nodes, _) = start_cluster(&certs);

    // Nothing registered yet: a readable error, not a hang.
    match fetch_all(&nodes[&2].network, 1).await {
        Err(TransportError::SnapshotUnavailable { from: 1, .. }) => {}
        other => panic!("expected SnapshotUnavailable, got {other:?}"),
    }

    // A few MiB with a pattern that catches reordering or loss.
    let data: Vec<u8> = (0..(5u32 << 20) + 12345)
        .map(|index| (index.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let data = Bytes::from(data);
    nodes[&1]
        .network
        .register_snapshot_source(chunked_source(4242, data.clone(), None));
    let started = std::time::Instant::now();
    let (through, fetched) = fetch_all(&nodes[&2].network, 1)
        .await
        .expect("snapshot fetched");
    let elapsed = started.elapsed();
    assert_eq!(through, 4242);
    assert_eq!(fetched.len(), data.len());
    assert!(fetched == data, "snapshot bytes differ");
    eprintln!("{} bytes of snapshot in {elapsed:?}", data.len());

    // A source that fails part-way is an error, not a short snapshot.
    nodes[&1]
        .network
        .register_snapshot_source(chunked_source(4242, data.clone(), Some(3)));
    match fetch_all(&nodes[&2].network, 1).await {
        Err(TransportError::SnapshotUnavailable { from: 1, reason }) => {
            assert!(reason.contains("the disk went away"), "{reason}")
        }
        other => panic!("expected SnapshotUnavailable, got {other:?}"),
    }

    // Unknown peers are an error at once.
    assert!(matches!(
        fetch_all(&nodes[&2].network, 9).await,
        Err(TransportError::UnknownPeer(9))
    ));
    shutdown_all(nodes).await;

    // A fetcher with a smaller bound refuses once the bytes pass it.
    let sockets: Vec<UdpSocket> = (0..2).map(|_| bind_local()).collect();
    let members: BTreeMap<NodeId, SocketAddr> = sockets
        .iter()
        .enumerate()
        .map(|(index, socket)| (index as u64 + 1, socket.local_addr().expect("address")))
        .collect();
    let mut sockets = sockets.into_iter();
    let server = start_node(
        1,
        CLUSTER,
        sockets.next().expect("socket"),
        &members,
        load(&certs, 1),
    );
    server
        .network
        .register_snapshot_source(chunked_source(4242, data, None));
    let (delivered, _inbox) = mpsc::channel::<Envelope>(16);
    let small = PeerNetwork::start_on(
        sockets.next().expect("socket"),
        PeerNetworkConfig {
            node_id: 2,
            cluster_id: CLUSTER.to_string(),
            listen: "127.0.0.1:0".parse().expect("address"),
            members: by_address(&members),
            tls: load(&certs, 2),
            limits: TransportLimits {
                snapshot_bytes_max: 1 << 20,
                ..limits()
            },
            identity: Arc::new(ClusterIdentity::unchecked(2, 3)),
        },
        delivered,
    )
    .expect("starts");
    match fetch_all(&small, 1).await {
        Err(TransportError::SnapshotTooLarge {
            from: 1,
            max,
            bytes,
        }) => {
            assert_eq!(max, 1 << 20);
            assert!(bytes > max && bytes <= max + (64 << 10), "{bytes}");
        }
        other => panic!("expected SnapshotTooLarge, got {other:?}"),
    }
    small.shutdown().await;
    server.network.shutdown().await;
}

// ---------------------------------------------------------------------------
// Clients.

/// A stand-in for the replica: answers `OpenSession { timeout_ms }` with
/// `SessionReady { session: connection id, timeout_ms, revision: n }` (n
/// counting the connection's frames) and `KeepAlive` with
/// `SessionExpired { session: 0 }`, and ends the session on `Status`.
async fn echo_replica(mut connections: mpsc::Receiver<ClientConnection>) {
    while let Some(mut connection) = connections.recv().await {
        tokio::spawn(async move {
            let mut count = 0;
            while let Some(inbound) = connection.frames.recv().await {
                count += 1;
                let budget = connection.replies.budget();
                budget.settle(inbound.cost, inbound.is_request());
                let reply = match inbound.frame {
                    ClientFrame::OpenSession { timeout_ms } => ServerFrame::SessionReady {
                        session: connection.id,
                        secret: 0,
                        timeout_ms,
                        revision: count,
                    },
                    ClientFrame::KeepAlive => ServerFrame::SessionExpired { session: 0 },
                    ClientFrame::Status => break,
                    _ => ServerFrame::Unavailable {
                        reason: "unexpected".into(),
                    },
                };
                if connection.replies.send(&reply).is_err() {
                    break;
                }
            }
        });
    }
}

fn start_listener(certs: &DevCerts) -> ClientListener {
    let (connections, accepted) = mpsc::channel(64);
    tokio::spawn(echo_replica(accepted));
    ClientListener::start(
        ClientListenerConfig {
            node_id: 1,
            listen: "127.0.0.1:0".parse().expect("address"),
            tls: load(certs, 1),
            limits: limits(),
            refusals: RefusalSink::default(),
        },
        connections,
    )
    .expect("listener starts")
}

async fn connect_client(
    endpoint: &quinn::Endpoint,
    address: SocketAddr,
) -> Result<Handshaken, HandshakeError> {
    connect(
        endpoint,
        address,
        "localhost",
        DEFAULT_MAX_FRAME_BYTES,
        WAIT,
    )
    .await
}

async fn next_frame(session: &mut Handshaken) -> ServerFrame {
    timeout(WAIT, session.frames.next::<ServerFrame>())
        .await
        .expect("a frame within the wait")
        .expect("readable")
        .expect("stream open")
}

/// Sends `count` session openings and checks the answers come back in order.
async fn exchange(session: &mut Handshaken, count: u64) {
    let frames: Vec<ClientFrame> = (0..count)
        .map(|timeout_ms| ClientFrame::OpenSession { timeout_ms })
        .collect();
    session
        .send
        .write_all(&tls::encode_frames(frames.iter()))
        .await
        .expect("written");
    for expected in 0..count {
        match next_frame(session).await {
            ServerFrame::SessionReady { timeout_ms, .. } => assert_eq!(timeout_ms, expected),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Reads until the replica's `Unavailable`, then waits for the close.
async fn expect_unavailable_and_close(session: &mut Handshaken, words: &str) {
    match next_frame(session).await {
        ServerFrame::Unavailable { reason } => {
            assert!(
                reason.contains(words),
                "reason {reason:?} mentions {words:?}"
            )
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let error = timeout(WAIT, session.connection.closed())
        .await
        .expect("closed within the wait");
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, CLOSE_PROTOCOL_ERROR.into())
        }
        other => panic!("expected an application close, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_handshakes_and_exchanges_frames() {
    let (_dir, certs) = certificates();
    let listener = start_listener(&certs);
    let address = listener.local_addr().expect("address");
    let client = raw_endpoint(&certs.client().load().expect("client material"));
    let mut session = connect_client(&client, address).await.expect("welcomed");
    assert_eq!(session.node_id, 1);
    assert_eq!(session.protocol_version, PROTOCOL_VERSION);
    exchange(&mut session, 500).await;

    // A keep-alive as a datagram reaches the replica beside the stream.
    let datagram = encode_frame(&ClientFrame::KeepAlive);
    session
        .connection
        .send_datagram(Bytes::copy_from_slice(&datagram[4..]))
        .expect("datagram sent");
    assert_eq!(
        next_frame(&mut session).await,
        ServerFrame::SessionExpired { session: 0 }
    );

    // A wrong protocol version is refused with a reason a person can read.
    let connection = timeout(
        WAIT,
        client.connect(address, "localhost").expect("connecting"),
    )
    .await
    .expect("bounded")
    .expect("TLS accepted");
    let refused = handshake(
        connection,
        &Hello::Client {
            protocol_version: 99,
        },
        4096,
        WAIT,
    )
    .await;
    expect_refused(refused, "protocol version 99 is not supported");
    // So is a replica's hello on the client port.
    let connection = timeout(
        WAIT,
        client.connect(address, "localhost").expect("connecting"),
    )
    .await
    .expect("bounded")
    .expect("TLS accepted");
    let refused = handshake(
        connection,
        &Hello::Peer {
            protocol_version: PROTOCOL_VERSION,
            cluster_id: CLUSTER.to_string(),
            node_id: 2,
            cluster_identity: None,
            joining: false,
        },
        4096,
        WAIT,
    )
    .await;
    expect_refused(refused, "client port");

    // The first session is unaffected.
    exchange(&mut session, 10).await;

    // When the replica ends a session, what it wrote arrives, then the
    // stream ends and the connection closes normally.
    let mut ending = connect_client(&client, address).await.expect("welcomed");
    let frames = [
        ClientFrame::OpenSession { timeout_ms: 1 },
        ClientFrame::Status,
    ];
    ending
        .send
        .write_all(&tls::encode_frames(frames.iter()))
        .await
        .expect("written");
    assert!(matches!(
        next_frame(&mut ending).await,
        ServerFrame::SessionReady { timeout_ms: 1, .. }
    ));
    let end = timeout(WAIT, ending.frames.next::<ServerFrame>())
        .await
        .expect("bounded");
    assert!(matches!(end, Ok(None) | Err(_)), "got {end:?}");
    match timeout(WAIT, ending.connection.closed())
        .await
        .expect("closed")
    {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, CLOSE_NORMAL.into())
        }
        other => panic!("expected an application close, got {other}"),
    }
    exchange(&mut session, 10).await;
    session.connection.close(0u32.into(), b"done");
    client.close(0u32.into(), b"done");
    listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_and_foreign_certificates_affect_only_their_connection() {
    let (_dir, certs) = certificates();
    let listener = start_listener(&certs);
    let address = listener.local_addr().expect("address");
    let client_material = certs.client().load().expect("client material");
    let client = raw_endpoint(&client_material);
    let mut good = connect_client(&client, address).await.expect("welcomed");
    exchange(&mut good, 5).await;

    // Malformed: a well-sized frame whose bytes are no ClientFrame.
    let mut malformed = connect_client(&client, address).await.expect("welcomed");
    let mut garbage = 3u32.to_le_bytes().to_vec();
    garbage.extend_from_slice(&[0xff, 0xff, 0xff]);
    malformed.send.write_all(&garbage).await.expect("written");
    expect_unavailable_and_close(&mut malformed, "malformed").await;
    exchange(&mut good, 5).await;

    // Oversize: a length prefix above the bound, refused before any body.
    let mut oversize = connect_client(&client, address).await.expect("welcomed");
    let header = ((DEFAULT_MAX_FRAME_BYTES + 1) as u32).to_le_bytes();
    oversize.send.write_all(&header).await.expect("written");
    expect_unavailable_and_close(&mut oversize, "exceeds").await;
    exchange(&mut good, 5).await;

    // A client certificate from another CA fails in TLS.
    let foreign_dir = tempfile::tempdir().expect("temp dir");
    let foreign = generate_dev_certs(foreign_dir.path(), &[], &hosts()).expect("foreign certs");
    let stranger = raw_endpoint(&foreign.client().load().expect("foreign material"));
    // The stranger trusts only its own CA, so it would refuse the replica
    // too; give it the real CA as roots to be sure the replica is the one
    // refusing.
    let mut stranger_material = foreign.client().load().expect("foreign material");
    stranger_material.ca_certs = client_material.ca_certs.clone();
    let stranger_trusting = raw_endpoint(&stranger_material);
    for endpoint in [&stranger, &stranger_trusting] {
        match connect_client(endpoint, address).await {
            Ok(_) => panic!("a certificate from another CA was welcomed"),
            Err(HandshakeError::Refused { reason }) => {
                panic!("refused by a hello ({reason}), not by TLS")
            }
            Err(_) => {}
        }
    }
    exchange(&mut good, 5).await;

    for endpoint in [&client, &stranger, &stranger_trusting] {
        endpoint.close(0u32.into(), b"done");
    }
    listener.shutdown().await;
}

/// Node `node`'s certificate as an older build made it, signed by `certs`'s
/// CA: both usages and the DNS name `node-<id>.synod`, but no replica URI.
fn old_form_material(certs: &DevCerts, node: NodeId) -> TlsMaterial {
    let ca_pem = std::fs::read_to_string(certs.dir.join("ca.pem")).expect("ca.pem");
    let ca_key = std::fs::read_to_string(certs.ca_key()).expect("ca-key.pem");
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &ca_pem,
        rcgen::KeyPair::from_pem(&ca_key).expect("CA key"),
    )
    .expect("CA");
    let mut names = vec![node_server_name(node)];
    names.extend(hosts());
    let mut params = rcgen::CertificateParams::new(names).expect("params");
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let key = rcgen::KeyPair::generate().expect("key");
    let certificate = params.signed_by(&key, &issuer).expect("signed");
    TlsMaterial::from_pem(
        "old form",
        ca_pem.as_bytes(),
        certificate.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
    )
    .expect("material")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialled_peer_without_a_replica_certificate_is_never_used() {
    let (_dir, certs) = certificates();
    let sockets: BTreeMap<NodeId, UdpSocket> = (1..=2).map(|id| (id, bind_local())).collect();
    let members: BTreeMap<NodeId, SocketAddr> = sockets
        .iter()
        .map(|(&id, socket)| (id, socket.local_addr().expect("local address")))
        .collect();
    let mut sockets = sockets.into_values();
    let mut node1 = start_node(
        1,
        CLUSTER,
        sockets.next().expect("socket"),
        &members,
        load(&certs, 1),
    );
    // Node 2 passes TLS as a server for node-2.synod (serverAuth, the right
    // name, the cluster's CA), but is no replica by the new rule.
    let mut impostor = start_node(
        2,
        CLUSTER,
        sockets.next().expect("socket"),
        &members,
        old_form_material(&certs, 2),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !node1.network.is_connected(2),
        "node 1 refused what it dialled"
    );
    assert!(
        !impostor.network.is_connected(1),
        "node 1 refused the dialler"
    );
    node1.network.send(vec![envelope(1, 2, 1)]);
    impostor.network.send(vec![envelope(2, 1, 1)]);
    let nothing = timeout(Duration::from_millis(500), async {
        tokio::select! {
            got = node1.inbox.recv() => got,
            got = impostor.inbox.recv() => got,
        }
    })
    .await;
    assert!(nothing.is_err(), "no envelope crossed: {nothing:?}");
    node1.network.shutdown().await;
    impostor.network.shutdown().await;
}
