//! The replica's two endpoints, as the event loop sees them: peer messages
//! out and in, client connections in, and snapshots served and fetched.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::driver::PeerMessage;
use super::snapshot::{Secrets, ServeTiming, StreamHolds};
use super::ReplicaError;
use crate::address::HostPort;
use crate::config::ReplicaConfig;
use crate::metrics::Metrics;
use crate::storage::StateReader;
use crate::transport::{
    ClientConnection, ClientListener, ClientListenerConfig, ClusterIdentity, ConnectionBounds,
    PeerNetwork, PeerNetworkConfig, RefusalSink, TlsReloader, TransportLimits,
};
use synod_proto::tls::TlsMaterial;

/// Where snapshots served to peers come from.
pub struct SnapshotServing {
    /// Reads the saved state.
    pub state: StateReader,
    /// Holds the log after a snapshot while it streams.
    pub holds: Arc<StreamHolds>,
    /// Where serving times are counted.
    pub metrics: Arc<Metrics>,
}

/// The peer network and the client listener of one replica.
pub struct Endpoints {
    peers: Arc<PeerNetwork<PeerMessage>>,
    clients: Option<ClientListener>,
    peer_address: SocketAddr,
    client_address: SocketAddr,
}

/// The transport's limits from the replica's configuration. Never panics,
/// even on a configuration that was not validated: products saturate and
/// counts are capped at what a semaphore or channel can hold (a validated
/// configuration stays well within both).
fn limits(config: &ReplicaConfig) -> TransportLimits {
    let limits = &config.limits;
    TransportLimits {
        client_frame_bytes_max: limits.frame_bytes_max,
        peer_frame_bytes_max: limits
            .frame_bytes_max
            .saturating_mul(8)
            .max(16 << 20)
            .min(u64::from(u32::MAX)),
        snapshot_bytes_max: limits.snapshot_bytes_max,
        client_connections_max: permit_count(limits.client_connections_max),
        client_connections_per_identity_max: permit_count(
            limits.client_connections_per_identity_max,
        ),
        client_handshakes_max: permit_count(limits.client_handshakes_max),
        backups_max: permit_count(limits.backups_max),
        backup_timeout: Duration::from_millis(limits.backup_timeout_ms),
        client_idle_timeout: Duration::from_millis(limits.client_idle_timeout_ms),
        handshake_timeout: Duration::from_millis(limits.handshake_timeout_ms),
        client_queue_frames_max: 1024,
        client_bounds: ConnectionBounds {
            pending_requests_max: limits.pending_requests_per_connection_max,
            pending_bytes_max: limits.pending_request_bytes_per_connection_max,
            reply_bytes_max: limits.reply_queue_bytes_per_connection_max,
        },
        idle_timeout: Duration::from_millis(
            config
                .timeouts
                .election_timeout_max_ms
                .saturating_mul(5)
                .max(5_000),
        ),
        // A peer link silent for an election timeout is as good as cut for
        // the protocol; dial it afresh.
        peer_idle_timeout: Duration::from_millis(
            config.timeouts.election_timeout_max_ms.max(1_000),
        ),
        ..TransportLimits::default()
    }
}

/// `count` as a semaphore permit count or channel capacity, capped at the
/// most tokio allows (more panics).
fn permit_count(count: u64) -> usize {
    usize::try_from(count)
        .unwrap_or(usize::MAX)
        .min(tokio::sync::Semaphore::MAX_PERMITS)
}

impl Endpoints {
    /// Binds both endpoints with `material` (checked for this replica).
    /// Peer messages arrive on `inbound`, client connections on
    /// `connections`; peers asking for a snapshot get the saved state,
    /// streamed as `snapshots` says. Peers are judged by the cluster
    /// identity in `identity`.
    ///
    /// # Errors
    /// An address that cannot be bound, or material no TLS configuration
    /// can be built from.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        config: &ReplicaConfig,
        material: TlsMaterial,
        peer_socket: Option<UdpSocket>,
        client_socket: Option<UdpSocket>,
        inbound: mpsc::Sender<PeerMessage>,
        connections: mpsc::Sender<ClientConnection>,
        snapshots: SnapshotServing,
        identity: Arc<ClusterIdentity>,
        refusals: RefusalSink,
    ) -> Result<Endpoints, ReplicaError> {
        let limits = limits(config);
        let members: BTreeMap<u64, HostPort> = config
            .members
            .iter()
            .map(|m| (m.id, m.peer_address.clone()))
            .collect();
        let peer_config = PeerNetworkConfig {
            node_id: config.id,
            cluster_id: config.cluster_id.clone(),
            listen: config.peer_listen_address(),
            members,
            tls: material.clone(),
            limits: limits.clone(),
            identity,
        };
        let peers = match peer_socket {
            Some(socket) => PeerNetwork::start_on(socket, peer_config, inbound)?,
            None => PeerNetwork::start(peer_config, inbound)?,
        };
        let SnapshotServing {
            state,
            holds,
            metrics,
        } = snapshots;
        let peer_timing = ServeTiming {
            seconds: metrics.snapshot_serve_seconds.clone(),
            failures: metrics.snapshot_serve_failures.clone(),
        };
        peers.register_snapshot_source(Arc::new({
            let state = state.clone();
            move || {
                super::snapshot::serve(
                    state.clone(),
                    Some(holds.clone()),
                    Secrets::Keep,
                    peer_timing.clone(),
                )
            }
        }));
        let client_config = ClientListenerConfig {
            node_id: config.id,
            listen: config.client_listen_address(),
            tls: material,
            limits,
            refusals,
        };
        let clients = match client_socket {
            Some(socket) => ClientListener::start_on(socket, client_config, connections)?,
            None => ClientListener::start(client_config, connections)?,
        };
        // A backup holds no log: nothing catches up from it.
        let backup_timing = ServeTiming {
            seconds: metrics.backup_seconds.clone(),
            failures: metrics.backup_failures.clone(),
        };
        clients.register_snapshot_source(Arc::new(move || {
            super::snapshot::serve(state.clone(), None, Secrets::Zero, backup_timing.clone())
        }));
        let peer_address = peers
            .local_addr()
            .map_err(|error| ReplicaError::Start(error.to_string()))?;
        let client_address = clients
            .local_addr()
            .map_err(|error| ReplicaError::Start(error.to_string()))?;
        Ok(Endpoints {
            peers: Arc::new(peers),
            clients: Some(clients),
            peer_address,
            client_address,
        })
    }

    /// Where peers reach this replica.
    pub fn peer_address(&self) -> SocketAddr {
        self.peer_address
    }

    /// What replaces the TLS material of both endpoints.
    pub fn tls_reloader(&self) -> TlsReloader {
        let peers = self.peers.tls_reloader();
        match &self.clients {
            Some(clients) => peers.and(clients.tls_reloader()),
            None => peers,
        }
    }

    /// Where clients reach this replica.
    pub fn client_address(&self) -> SocketAddr {
        self.client_address
    }

    /// Whether the connection to `peer` is up now.
    pub fn is_connected(&self, peer: u64) -> bool {
        self.peers.is_connected(peer)
    }

    /// Messages to peers dropped so far (full queue, unknown peer,
    /// oversize).
    pub fn dropped_messages(&self) -> u64 {
        self.peers.dropped_envelopes()
    }

    /// Queues messages for their peers; never blocks.
    pub fn send(&self, messages: Vec<(u64, PeerMessage)>) {
        self.peers
            .send(messages.into_iter().map(|(_, message)| message).collect());
    }

    /// Fetches the latest snapshot of peer `from`, handing its chunks to
    /// `chunks` as they arrive; resolves to the slot it covers.
    pub fn fetch_snapshot(
        &self,
        from: u64,
        chunks: mpsc::Sender<Bytes>,
    ) -> impl Future<Output = Result<u64, String>> + Send + 'static {
        let peers = self.peers.clone();
        async move {
            peers
                .fetch_snapshot(from, chunks)
                .await
                .map_err(|error| error.to_string())
        }
    }

    /// Closes both endpoints.
    pub async fn close(mut self) {
        if let Some(clients) = self.clients.take() {
            clients.shutdown().await;
        }
        self.peers.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_at_range_ends_builds_transport_and_paxos() {
        for upper in [false, true] {
            let config = ReplicaConfig::at_range_ends(upper);
            let transport = limits(&config);
            transport
                .validate()
                .unwrap_or_else(|error| panic!("upper: {upper}: {error}"));
            transport.quic_transport().expect("peer QUIC transport");
            transport
                .client_quic_transport()
                .expect("client QUIC transport");
            // The counts become a semaphore and channels, which panic
            // beyond their maximum.
            let _permits = tokio::sync::Semaphore::new(transport.client_connections_max);
            let _queue = mpsc::channel::<()>(transport.client_queue_frames_max);
            config
                .paxos_config(7)
                .validate()
                .unwrap_or_else(|error| panic!("upper: {upper}: {error}"));
            let _ = config.state_config();
        }
    }

    #[test]
    fn limits_never_panic_even_unvalidated() {
        let mut config = ReplicaConfig::at_range_ends(true);
        config.limits.frame_bytes_max = u64::MAX;
        config.limits.client_connections_max = u64::MAX;
        config.limits.pending_requests_per_connection_max = u64::MAX;
        config.timeouts.election_timeout_max_ms = u64::MAX;
        config.timeouts.heartbeat_interval_ms = u64::MAX;
        let transport = limits(&config);
        assert_eq!(transport.peer_frame_bytes_max, u64::from(u32::MAX));
        let _permits = tokio::sync::Semaphore::new(transport.client_connections_max);
        let _queue = mpsc::channel::<()>(transport.client_queue_frames_max);
        let _ = config.paxos_config(7);
    }
}
