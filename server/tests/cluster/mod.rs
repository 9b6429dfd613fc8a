//! A cluster of real replicas in this process, over QUIC on 127.0.0.1 with
//! ports bound before any replica starts, certificates from a fresh CA and
//! databases in a temporary directory, so tests run in parallel.

#![allow(dead_code)]

pub mod http;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use synod_client::Client;
use synod_proto::certgen::{generate_dev_certs, DevCerts};
use synod_server::config::{Limits, MemberConfig, Monitoring, ReplicaConfig, Timeouts, TlsConfig};
use synod_server::replica::{Replica, StartOptions};
use tempfile::TempDir;

/// A running test cluster.
pub struct Cluster {
    pub dir: TempDir,
    pub certs: DevCerts,
    pub configs: Vec<ReplicaConfig>,
    pub replicas: Vec<Option<Replica>>,
}

fn bind() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").expect("bind a loopback port")
}

impl Cluster {
    /// Starts `size` replicas with default timeouts, after `tweak` adjusts
    /// each configuration.
    pub async fn start(size: u64, tweak: impl Fn(&mut ReplicaConfig)) -> Cluster {
        Cluster::start_seeded(size, tweak, None).await
    }

    /// Starts `size` replicas whose data directories `seed` fills first
    /// (for instance from a backup); they start as existing members, not
    /// with `--bootstrap`.
    pub async fn start_from(
        size: u64,
        tweak: impl Fn(&mut ReplicaConfig),
        seed: impl Fn(&ReplicaConfig),
    ) -> Cluster {
        Cluster::start_seeded(size, tweak, Some(&seed)).await
    }

    async fn start_seeded(
        size: u64,
        tweak: impl Fn(&mut ReplicaConfig),
        seed: Option<&dyn Fn(&ReplicaConfig)>,
    ) -> Cluster {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("temp dir");
        let ids: Vec<u64> = (1..=size).collect();
        let hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let certs = generate_dev_certs(&dir.path().join("certs"), &ids, &hosts).expect("certs");
        let mut sockets = Vec::new();
        let mut members = Vec::new();
        for &id in &ids {
            let peer = bind();
            let client = bind();
            members.push(MemberConfig {
                id,
                peer_address: peer.local_addr().expect("address").into(),
                client_address: client.local_addr().expect("address").into(),
            });
            sockets.push((peer, client));
        }
        let mut configs = Vec::new();
        for &id in &ids {
            let files = certs.node(id);
            let mut config = ReplicaConfig {
                cluster_id: "test".into(),
                id,
                data_dir: dir.path().join(format!("node-{id}")),
                tls: TlsConfig {
                    ca: files.ca,
                    cert: files.cert,
                    key: files.key,
                    reload_check_ms: synod_server::config::DEFAULT_TLS_RELOAD_CHECK_MS,
                },
                members: members.clone(),
                timeouts: Timeouts::default(),
                limits: Limits::default(),
                monitoring: Monitoring::default(),
                log: Default::default(),
                listen: Default::default(),
            };
            tweak(&mut config);
            config.validate().expect("valid test config");
            configs.push(config);
        }
        if let Some(seed) = seed {
            for config in &configs {
                seed(config);
            }
        }
        let mut replicas = Vec::new();
        for (config, (peer, client)) in configs.iter().zip(sockets) {
            let options = StartOptions {
                bootstrap: seed.is_none(),
                peer_socket: Some(peer),
                client_socket: Some(client),
                ..StartOptions::default()
            };
            let replica = Replica::start(config.clone(), options)
                .await
                .expect("replica starts");
            replicas.push(Some(replica));
        }
        Cluster {
            dir,
            certs,
            configs,
            replicas,
        }
    }

    /// Client addresses, starting with replica `first` (0-based).
    pub fn endpoints(&self, first: usize) -> Vec<String> {
        let count = self.configs.len();
        (0..count)
            .map(|offset| {
                let index = (first + offset) % count;
                self.configs[0].members[index].client_address.to_string()
            })
            .collect()
    }

    /// A client that talks to replica `first` while it is up.
    pub async fn client(&self, first: usize) -> Client {
        self.client_with(first, 3000).await
    }

    /// A client with the given session timeout.
    pub async fn client_with(&self, first: usize, session_timeout_ms: u64) -> Client {
        Client::builder()
            .endpoints(self.endpoints(first))
            .tls(self.certs.client())
            .session_timeout_ms(session_timeout_ms)
            .request_timeout_ms(10_000)
            .connect()
            .await
            .expect("client connects")
    }

    /// The replica that leads, as every live replica agrees, waiting up to
    /// `within`.
    pub async fn leader(&self, within: Duration) -> Option<usize> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let statuses: Vec<(usize, String, Option<u64>)> = self
                .replicas
                .iter()
                .enumerate()
                .filter_map(|(i, r)| r.as_ref().map(|r| (i, r.status())))
                .map(|(i, s)| (i, s.replica.role, s.replica.leader))
                .collect();
            if let Some((index, _, _)) = statuses.iter().find(|(_, role, _)| role == "leader") {
                let id = self.configs[*index].id;
                if statuses.iter().all(|(_, _, leader)| *leader == Some(id)) {
                    return Some(*index);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Kills replica `index` abruptly.
    pub async fn kill(&mut self, index: usize) {
        if let Some(replica) = self.replicas[index].take() {
            replica.kill().await;
        }
    }

    /// Stops replica `index` cleanly.
    pub async fn stop(&mut self, index: usize) {
        if let Some(replica) = self.replicas[index].take() {
            replica.shutdown().await.expect("clean shutdown");
        }
    }

    /// Starts replica `index` again from its data directory, on its ports.
    pub async fn restart(&mut self, index: usize) {
        self.restart_with(index, false).await;
    }

    /// Starts replica `index` again; with `join`, on an emptied data
    /// directory, as a member that lost its disk.
    pub async fn restart_with(&mut self, index: usize, join: bool) {
        self.restart_as(index, false, join).await;
    }

    /// Starts replica `index` again on its ports with the given
    /// `--bootstrap` and `--join` flags.
    pub async fn restart_as(&mut self, index: usize, bootstrap: bool, join: bool) {
        let config = self.configs[index].clone();
        let mut last_error = None;
        for _ in 0..50 {
            let peer = UdpSocket::bind(config.peer_listen_address());
            let client = UdpSocket::bind(config.client_listen_address());
            match (peer, client) {
                (Ok(peer), Ok(client)) => {
                    let options = StartOptions {
                        bootstrap,
                        join,
                        peer_socket: Some(peer),
                        client_socket: Some(client),
                        ..StartOptions::default()
                    };
                    let replica = Replica::start(config, options).await.expect("restart");
                    self.replicas[index] = Some(replica);
                    return;
                }
                (peer, client) => {
                    last_error = Some(format!("{:?} {:?}", peer.err(), client.err()));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        panic!("cannot rebind the ports of replica {index}: {last_error:?}");
    }

    /// Stops every replica cleanly.
    pub async fn shutdown(mut self) {
        for index in 0..self.replicas.len() {
            self.stop(index).await;
        }
    }

    /// The client address of replica `index`.
    pub fn client_address(&self, index: usize) -> SocketAddr {
        self.configs[index].client_listen_address()
    }
}

/// Polls `check` until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
