//! Hostile clients holding valid certificates, against three real replicas
//! over QUIC on 127.0.0.1, speaking the raw protocol through `synod-proto`
//! (no client library to keep them polite).
//!
//! Each test plays one attack from issue 9 and checks three things: the
//! attack is refused or bounded with an error naming the limit; a
//! well-behaved client on the same replica keeps working during it; and the
//! process's resident memory (`VmRSS` in `/proc/self/status`, which holds
//! all three replicas) grows by less than a stated bound. The memory tests
//! take a lock so that they run one at a time within this binary and each
//! measures only its own attack.

mod cluster;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::{eventually, Cluster};
use synod_proto::tls::{self, Handshaken, TlsMaterial};
use synod_proto::wire::{ClientFrame, ReadConsistency, ServerFrame, WatchRegistration};
use synod_proto::{
    CreateMode, Error, LockMode, Op, OpResult, Request, SessionId, SessionSecret, WatchKind,
};

/// Serialises the tests that measure the process's memory.
static MEMORY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Resident memory of this process, in bytes.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|value| value.parse().ok())
        .expect("VmRSS value");
    kib * 1024
}

const MIB: u64 = 1 << 20;

/// A client certificate with common name `name`, issued by the cluster's CA.
fn issue_client(cluster: &Cluster, name: &str) -> TlsMaterial {
    let dir = &cluster.certs.dir;
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).expect("ca.pem");
    let ca_key = std::fs::read_to_string(cluster.certs.ca_key()).expect("ca-key.pem");
    let ca_key = rcgen::KeyPair::from_pem(&ca_key).expect("CA key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("CA");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let key = rcgen::KeyPair::generate().expect("key");
    let certificate = params.signed_by(&key, &issuer).expect("signed");
    TlsMaterial::from_pem(
        name,
        ca_pem.as_bytes(),
        certificate.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
    )
    .expect("material")
}

/// One raw client connection.
struct Raw {
    link: Handshaken,
    next_sequence: u64,
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(30).try_into().expect("idle")));
    Arc::new(transport)
}

impl Raw {
    async fn connect(material: &TlsMaterial, address: SocketAddr) -> Result<Raw, String> {
        let endpoint =
            tls::client_endpoint(material, "127.0.0.1:0".parse().expect("bind"), transport())
                .expect("endpoint");
        let link = tls::connect(
            &endpoint,
            address,
            "localhost",
            8 << 20,
            Duration::from_secs(5),
        )
        .await
        .map_err(|error| error.to_string())?;
        Ok(Raw {
            link,
            next_sequence: 1,
        })
    }

    async fn send(&mut self, frame: &ClientFrame) {
        self.link
            .send
            .write_all(&synod_proto::wire::encode_frame(frame))
            .await
            .expect("write");
    }

    /// The next frame within 10 s; `None` when the stream or connection ends.
    async fn next(&mut self) -> Option<ServerFrame> {
        tokio::time::timeout(
            Duration::from_secs(10),
            self.link.frames.next::<ServerFrame>(),
        )
        .await
        .expect("a frame within 10 s")
        .ok()
        .flatten()
    }

    async fn open(&mut self) -> (SessionId, SessionSecret) {
        self.send(&ClientFrame::OpenSession { timeout_ms: 10_000 })
            .await;
        match self.next().await {
            Some(ServerFrame::SessionReady {
                session, secret, ..
            }) => (session, secret),
            other => panic!("session not opened: {other:?}"),
        }
    }

    async fn resume(&mut self, session: SessionId, secret: SessionSecret) -> ServerFrame {
        self.send(&ClientFrame::ResumeSession {
            session,
            secret,
            last_revision: 0,
            watches: vec![WatchRegistration {
                path: "/victim".into(),
                kind: WatchKind::PersistentRecursive,
            }],
        })
        .await;
        self.next().await.expect("an answer to the resume")
    }

    fn request_frame(&mut self, session: SessionId, op: Op) -> ClientFrame {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        ClientFrame::Request {
            request: Request {
                session,
                sequence,
                op,
            },
            consistency: ReadConsistency::Linearizable,
            watch: None,
        }
    }

    /// Sends one request and waits for its answer, skipping other frames.
    async fn call(&mut self, session: SessionId, op: Op) -> Result<OpResult, Error> {
        let frame = self.request_frame(session, op);
        let ClientFrame::Request { request, .. } = &frame else {
            unreachable!("a request frame");
        };
        let sequence = request.sequence;
        self.send(&frame).await;
        loop {
            match self.next().await {
                Some(ServerFrame::Response {
                    sequence: answered,
                    response,
                }) if answered == sequence => return response.result,
                Some(_) => continue,
                None => panic!("connection ended before the answer"),
            }
        }
    }
}

/// A cluster of three with a leader, configured by `tweak`, and an attacker
/// identity `name` connected to replica 0.
async fn attacked(
    name: &str,
    tweak: impl Fn(&mut synod_server::config::ReplicaConfig),
) -> (Cluster, TlsMaterial, Raw) {
    let cluster = Cluster::start(3, tweak).await;
    assert!(cluster.leader(Duration::from_secs(10)).await.is_some());
    let material = issue_client(&cluster, name);
    let raw = Raw::connect(&material, cluster.client_address(0))
        .await
        .expect("the attacker connects");
    (cluster, material, raw)
}

/// Runs `op` for a well-behaved client through the library and asserts it
/// succeeds: the replica still serves others.
async fn others_still_served(cluster: &Cluster, replica: usize, tag: &str) {
    let client = cluster.client(replica).await;
    let path = format!("/bystander-{tag}");
    client
        .create(&path, b"ok", CreateMode::Persistent)
        .await
        .expect("a bystander creates");
    let (data, _) = client.get(&path).await.expect("a bystander reads");
    assert_eq!(data, b"ok");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_identity_cannot_resume_release_watch_or_read_through_a_session() {
    let cluster = Cluster::start(3, |_| {}).await;
    assert!(cluster.leader(Duration::from_secs(10)).await.is_some());
    let alice_material = issue_client(&cluster, "alice");
    let mallory_material = issue_client(&cluster, "mallory");
    let mut alice = Raw::connect(&alice_material, cluster.client_address(0))
        .await
        .expect("alice connects");
    let (session, secret) = alice.open().await;
    let granted = alice
        .call(
            session,
            Op::AcquireLock {
                path: "/locks/a".into(),
                mode: LockMode::Exclusive,
                wait: false,
                lock_delay_ms: 0,
            },
        )
        .await;
    let Ok(OpResult::LockAcquired { sequencer }) = granted else {
        panic!("alice holds the lock: {granted:?}");
    };
    alice
        .call(
            session,
            Op::Create {
                path: "/victim".into(),
                data: b"alice".to_vec(),
                mode: CreateMode::Ephemeral,
            },
        )
        .await
        .expect("alice's ephemeral node");

    for replica in 0..3 {
        let address = cluster.client_address(replica);
        // Resume with the right secret but another identity.
        let mut mallory = Raw::connect(&mallory_material, address)
            .await
            .expect("mallory connects");
        match mallory.resume(session, secret).await {
            ServerFrame::SessionRefused { reason, .. } => {
                assert!(reason.contains("another client identity"), "{reason}");
            }
            other => panic!("replica {replica} let mallory resume: {other:?}"),
        }
        // A release and a read naming alice's session, and a watch.
        let release = Op::ReleaseLock {
            path: "/locks/a".into(),
        };
        let read = Op::GetData {
            path: "/victim".into(),
        };
        for op in [release, read] {
            let answer = mallory.call(session, op).await;
            assert!(
                matches!(answer, Err(Error::SessionExpired { .. })),
                "replica {replica}: {answer:?}"
            );
        }
        mallory
            .send(&ClientFrame::AddWatch(WatchRegistration {
                path: "/victim".into(),
                kind: WatchKind::Data,
            }))
            .await;
        match mallory.next().await {
            Some(ServerFrame::WatchRefused { error, .. }) => {
                assert!(error.to_string().contains("no session"), "{error}");
            }
            other => panic!("replica {replica} let mallory watch: {other:?}"),
        }
        // Alice's own identity with a guessed secret is refused too.
        let mut guesser = Raw::connect(&alice_material, address)
            .await
            .expect("a second alice connection");
        match guesser.resume(session, secret ^ 1).await {
            ServerFrame::SessionRefused { reason, .. } => {
                assert!(reason.contains("wrong secret"), "{reason}");
            }
            other => panic!("replica {replica} accepted a guessed secret: {other:?}"),
        }
    }

    // Alice keeps her session, lock and node, and hears of changes.
    let check = alice
        .call(
            session,
            Op::CheckSequencer {
                sequencer: sequencer.clone(),
            },
        )
        .await;
    assert_eq!(check, Ok(OpResult::SequencerCurrent));
    alice
        .call(
            session,
            Op::SetData {
                path: "/victim".into(),
                data: b"still alice".to_vec(),
                expected_version: None,
            },
        )
        .await
        .expect("alice still writes through her session");
    // And a resume with her identity and secret works on another replica.
    let mut elsewhere = Raw::connect(&alice_material, cluster.client_address(1))
        .await
        .expect("alice elsewhere");
    match elsewhere.resume(session, secret).await {
        ServerFrame::SessionReady {
            session: resumed, ..
        } => assert_eq!(resumed, session),
        other => panic!("alice could not resume her own session: {other:?}"),
    }
    let check = elsewhere
        .call(session, Op::CheckSequencer { sequencer })
        .await;
    assert_eq!(check, Ok(OpResult::SequencerCurrent));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watches_with_oversize_paths_are_refused_and_hold_nothing() {
    let _one_at_a_time = MEMORY.lock().await;
    let (cluster, material, mut raw) = attacked("watcher", |_| {}).await;
    let (session, secret) = raw.open().await;
    let before = resident_bytes();
    let huge = format!("/{}", "w".repeat(MIB as usize));
    for index in 0..400 {
        raw.send(&ClientFrame::AddWatch(WatchRegistration {
            path: format!("{huge}{index}"),
            kind: WatchKind::PersistentRecursive,
        }))
        .await;
    }
    let mut refused = 0;
    while refused < 400 {
        match raw.next().await {
            Some(ServerFrame::WatchRefused { error, .. }) => {
                assert!(error.to_string().contains("exceeds the limit"), "{error}");
                refused += 1;
            }
            other => panic!("unexpected answer to a huge watch: {other:?}"),
        }
    }
    // Resumed watches go through the same checks.
    let mut again = Raw::connect(&material, cluster.client_address(1))
        .await
        .expect("connects");
    again
        .send(&ClientFrame::ResumeSession {
            session,
            secret,
            last_revision: 0,
            watches: vec![WatchRegistration {
                path: huge.clone(),
                kind: WatchKind::Data,
            }],
        })
        .await;
    assert!(matches!(
        again.next().await,
        Some(ServerFrame::SessionReady { .. })
    ));
    assert!(matches!(
        again.next().await,
        Some(ServerFrame::WatchRefused { .. })
    ));
    others_still_served(&cluster, 0, "watches").await;
    let grown = resident_bytes().saturating_sub(before);
    println!("resident memory grew by {} MiB", grown / MIB);
    assert!(grown < 64 * MIB, "grew by {grown} bytes");
    let status = cluster.replicas[0].as_ref().expect("up").status();
    assert_eq!(status.replica.watches, 0, "no watch registered");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_reads_no_replies_is_no_longer_read_and_memory_stays_bounded() {
    let _one_at_a_time = MEMORY.lock().await;
    let cluster = Cluster::start(3, |_| {}).await;
    assert!(cluster.leader(Duration::from_secs(10)).await.is_some());
    let setup = cluster.client(0).await;
    setup
        .create("/big", &vec![7u8; MIB as usize], CreateMode::Persistent)
        .await
        .expect("a 1 MiB node");
    let material = issue_client(&cluster, "hoarder");
    let mut raw = Raw::connect(&material, cluster.client_address(0))
        .await
        .expect("connects");
    let (session, _) = raw.open().await;
    let before = resident_bytes();
    // 3,000 reads of the 1 MiB node (3 GiB of replies), never read.
    let frames: Vec<ClientFrame> = (0..3_000)
        .map(|_| {
            let mut frame = raw.request_frame(
                session,
                Op::GetData {
                    path: "/big".into(),
                },
            );
            if let ClientFrame::Request { consistency, .. } = &mut frame {
                *consistency = ReadConsistency::Sequential;
            }
            frame
        })
        .collect();
    let bytes = synod_proto::tls::encode_frames(&frames);
    let mut send = raw.link.send;
    let writer = tokio::spawn(async move {
        // Blocks once the replica stops reading; bounded by the timeout.
        let _ = tokio::time::timeout(Duration::from_secs(8), send.write_all(&bytes)).await;
        send
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    others_still_served(&cluster, 0, "replies").await;
    let grown = resident_bytes().saturating_sub(before);
    println!("resident memory grew by {} MiB", grown / MIB);
    assert!(
        grown < 160 * MIB,
        "grew by {} MiB while a client read no replies",
        grown / MIB
    );
    let _ = writer.await;
    setup.close().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pending_requests_beyond_the_bound_are_refused_naming_it() {
    let _one_at_a_time = MEMORY.lock().await;
    let (cluster, _, mut raw) = attacked("impatient", |config| {
        config.limits.pending_requests_per_connection_max = 1_000;
    })
    .await;
    let (session, _) = raw.open().await;
    let before = resident_bytes();
    // Reads that can never be served: a revision far in the future.
    let frames: Vec<ClientFrame> = (0..5_000)
        .map(|_| {
            let mut frame = raw.request_frame(session, Op::GetData { path: "/".into() });
            if let ClientFrame::Request { consistency, .. } = &mut frame {
                *consistency = ReadConsistency::AtLeast(u64::MAX / 2);
            }
            frame
        })
        .collect();
    raw.link
        .send
        .write_all(&synod_proto::tls::encode_frames(&frames))
        .await
        .expect("write");
    let mut refused = 0;
    let deadline = Instant::now() + Duration::from_secs(8);
    while refused < 4_000 && Instant::now() < deadline {
        match raw.next().await {
            Some(ServerFrame::Response { response, .. }) => match response.result {
                Err(Error::LimitExceeded { limit, .. }) => {
                    assert_eq!(limit, "limits.pending_requests_per_connection_max");
                    refused += 1;
                }
                other => panic!("unexpected answer: {other:?}"),
            },
            other => panic!("unexpected frame: {other:?}"),
        }
    }
    assert_eq!(refused, 4_000, "every request past the bound is refused");
    others_still_served(&cluster, 0, "pending").await;
    let grown = resident_bytes().saturating_sub(before);
    println!("resident memory grew by {} MiB", grown / MIB);
    assert!(grown < 64 * MIB, "grew by {grown} bytes");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_per_identity_are_bounded_cluster_wide() {
    let _one_at_a_time = MEMORY.lock().await;
    let (cluster, material, mut raw) = attacked("greedy", |config| {
        config.limits.sessions_per_identity_max = 500;
    })
    .await;
    let before = resident_bytes();
    let frames: Vec<ClientFrame> = (0..3_000)
        .map(|_| ClientFrame::OpenSession { timeout_ms: 60_000 })
        .collect();
    raw.link
        .send
        .write_all(&synod_proto::tls::encode_frames(&frames))
        .await
        .expect("write");
    let (mut opened, mut refused) = (0, 0);
    while opened + refused < 3_000 {
        match raw.next().await {
            Some(ServerFrame::SessionReady { .. }) => opened += 1,
            Some(ServerFrame::Unavailable { reason }) => {
                assert!(
                    reason.contains("limits.sessions_per_identity_max"),
                    "{reason}"
                );
                refused += 1;
            }
            other => panic!("unexpected frame: {other:?}"),
        }
    }
    assert_eq!(opened, 500);
    // Through another replica too: the bound is the cluster's.
    let mut elsewhere = Raw::connect(&material, cluster.client_address(1))
        .await
        .expect("connects");
    elsewhere
        .send(&ClientFrame::OpenSession { timeout_ms: 60_000 })
        .await;
    assert!(matches!(
        elsewhere.next().await,
        Some(ServerFrame::Unavailable { .. })
    ));
    // Another identity is unaffected.
    others_still_served(&cluster, 1, "sessions").await;
    let grown = resident_bytes().saturating_sub(before);
    println!("resident memory grew by {} MiB", grown / MIB);
    assert!(grown < 64 * MIB, "grew by {grown} bytes");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_per_identity_are_bounded_and_idle_ones_closed() {
    let cluster = Cluster::start(3, |config| {
        config.limits.client_connections_per_identity_max = 4;
        config.timeouts.session_timeout_max_ms = 4_000;
        config.limits.client_idle_timeout_ms = 2_000;
    })
    .await;
    assert!(cluster.leader(Duration::from_secs(10)).await.is_some());
    let material = issue_client(&cluster, "hog");
    let address = cluster.client_address(0);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(
            Raw::connect(&material, address)
                .await
                .expect("within the bound"),
        );
    }
    let refused = Raw::connect(&material, address)
        .await
        .err()
        .expect("a fifth connection is refused");
    assert!(
        refused.contains("limits.client_connections_per_identity_max"),
        "{refused}"
    );
    // Others are unaffected.
    others_still_served(&cluster, 0, "connections").await;
    // Idle connections (no session, nothing sent) are closed, freeing room.
    let started = Instant::now();
    for raw in &mut held {
        assert!(raw.next().await.is_none_or(|frame| matches!(
            frame,
            ServerFrame::Unavailable { ref reason } if reason.contains("client_idle_timeout_ms")
        )));
    }
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(
        eventually(Duration::from_secs(5), || async {
            Raw::connect(&material, address).await.is_ok()
        })
        .await,
        "room again once the idle connections closed"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_open_connections_are_bounded_and_dropped() {
    let (cluster, material, _raw) = attacked("lurker", |config| {
        config.limits.client_handshakes_max = 3;
        config.limits.handshake_timeout_ms = 1_000;
    })
    .await;
    // `attacked` connected once and said hello; these finish TLS and then
    // say nothing, each holding a handshake slot.
    let address = cluster.client_address(0);
    let endpoint =
        tls::client_endpoint(&material, "127.0.0.1:0".parse().expect("bind"), transport())
            .expect("endpoint");
    let mut lurking = Vec::new();
    for _ in 0..3 {
        let connection = endpoint
            .connect(address, "localhost")
            .expect("connect")
            .await
            .expect("TLS completes");
        lurking.push(connection);
    }
    // A fourth handshake finds no slot and is refused at once.
    let started = Instant::now();
    let refused = endpoint
        .connect(address, "localhost")
        .expect("connect")
        .await;
    assert!(refused.is_err(), "a handshake past the bound is refused");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );
    // The lurkers are dropped within the handshake timeout ...
    for connection in &lurking {
        tokio::time::timeout(Duration::from_secs(3), connection.closed())
            .await
            .expect("a half-open connection is dropped");
    }
    // ... and others connect again.
    others_still_served(&cluster, 0, "half-open").await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_leaves_with_replies_backed_up_leaves_nothing_behind() {
    let _one_at_a_time = MEMORY.lock().await;
    let (cluster, material, raw) = attacked("leaver", |_| {}).await;
    drop(raw);
    let setup = cluster.client(0).await;
    setup
        .create("/big", &vec![7u8; MIB as usize], CreateMode::Persistent)
        .await
        .expect("a 1 MiB node");
    let before = resident_bytes();
    // Each round backs up about 8-16 MiB of replies, then goes away.
    for round in 0..8 {
        let mut raw = Raw::connect(&material, cluster.client_address(0))
            .await
            .expect("connects");
        let (session, _) = raw.open().await;
        let frames: Vec<ClientFrame> = (0..100)
            .map(|_| {
                let mut frame = raw.request_frame(
                    session,
                    Op::GetData {
                        path: "/big".into(),
                    },
                );
                if let ClientFrame::Request { consistency, .. } = &mut frame {
                    *consistency = ReadConsistency::Sequential;
                }
                frame
            })
            .collect();
        let bytes = synod_proto::tls::encode_frames(&frames);
        let _ = tokio::time::timeout(Duration::from_secs(2), raw.link.send.write_all(&bytes)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        raw.link.connection.close(0u32.into(), b"leaving");
        println!("round {round}: {} MiB", resident_bytes() / MIB);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    others_still_served(&cluster, 0, "leavers").await;
    let grown = resident_bytes().saturating_sub(before);
    println!("resident memory grew by {} MiB over 8 rounds", grown / MIB);
    assert!(grown < 64 * MIB, "grew by {} MiB", grown / MIB);
    setup.close().await;
    cluster.shutdown().await;
}
