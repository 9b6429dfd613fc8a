//! The replica's configuration: a TOML file with sensible defaults,
//! validated before anything starts, with errors that name the bad field.
//!
//! ```toml
//! cluster_id = "prod-east"
//! id = 1
//! data_dir = "/var/lib/synod"
//!
//! [tls]
//! ca = "/etc/synod/ca.pem"
//! cert = "/etc/synod/node-1.pem"
//! key = "/etc/synod/node-1-key.pem"
//! reload_check_ms = 5000   # optional: a replaced file is reloaded (or on SIGHUP)
//!
//! [[members]]
//! id = 1
//! peer_address = "10.0.0.1:7001"     # or a DNS name: "db1.example.com:7001"
//! client_address = "10.0.0.1:7101"
//! # ... one [[members]] table per replica
//!
//! [listen]            # optional: where to bind, when not the member address
//! peer = "0.0.0.0:7001"
//! client = "0.0.0.0:7101"
//!
//! [timeouts]          # all optional
//! heartbeat_interval_ms = 50
//!
//! [limits]            # all optional
//! data_bytes_max = 1048576
//!
//! [log]               # optional; RUST_LOG, when set, overrides the level
//! level = "info"      # a tracing filter: "warn", "info,synod_server=debug"
//! format = "text"     # or "json", one object per line
//!
//! [monitoring]        # optional: without it, no HTTP listener
//! http_address = "10.0.0.1:7201"   # /metrics, /livez, /readyz (plain HTTP)
//! ready_lag_slots_max = 1000
//! ```
//!
//! # Ranges
//!
//! Every numeric field has a range, checked by [`ReplicaConfig::validate`]
//! (so by `synod-server --check` and at every start) with an error naming
//! the field. The bounds are what the replica can actually run with: counts
//! become semaphore permits and channel capacities, sizes become frame
//! bounds under the frames' `u32` length prefix (a peer frame is eight
//! client frames), and times become QUIC idle timeouts and deadlines.
//! Beyond its range, each field is also checked against the others (an
//! election timeout at least the lease, and so on).
//!
//! | field | range | default |
//! |---|---|---|
//! | `id`, `members[].id` | 1..=4,294,967,295 | (required) |
//! | `timeouts.heartbeat_interval_ms` | 1..=10,000 | 50 |
//! | `timeouts.election_timeout_min_ms` | 2..=300,000 | 300 |
//! | `timeouts.election_timeout_max_ms` | 3..=600,000 | 450 |
//! | `timeouts.lease_ms` | 2..=300,000 | 300 |
//! | `timeouts.clock_drift_margin_ms` | 0..=60,000 | 100 |
//! | `timeouts.session_timeout_min_ms` | 2..=3,600,000 | 1,000 |
//! | `timeouts.session_timeout_max_ms` | 2..=86,400,000 | 120,000 |
//! | `timeouts.session_grace_ms` | 0..=600,000 | 2,000 |
//! | `timeouts.session_checkpoint_interval_ms` | 1..=3,600,000 | 1,000 |
//! | `timeouts.request_timeout_ms` | 1..=3,600,000 | 10,000 |
//! | `limits.data_bytes_max` | 1..=67,108,864 (64 MiB) | 1,048,576 |
//! | `limits.path_bytes_max` | 1..=65,536 | 4,096 |
//! | `limits.frame_bytes_max` | 4,096..=268,435,456 (256 MiB) | 2,097,152 |
//! | `limits.watches_per_session_max` | 1..=1,000,000 | 10,000 |
//! | `limits.client_connections_max` | 1..=1,000,000 | 10,000 |
//! | `limits.pending_requests_per_connection_max` | 1..=100,000 | 4,096 |
//! | `limits.pending_request_bytes_per_connection_max` | 8,192..=1 GiB | 16 MiB |
//! | `limits.reply_queue_bytes_per_connection_max` | 16,384..=2 GiB | 16 MiB |
//! | `limits.watch_path_bytes_per_session_max` | 1..=1 GiB | 4 MiB |
//! | `limits.client_connections_per_identity_max` | 1..=1,000,000 | 16 |
//! | `limits.client_handshakes_max` | 1..=100,000 | 256 |
//! | `limits.client_idle_timeout_ms` | 1,000..=86,400,000 | 60,000 |
//! | `limits.handshake_timeout_ms` | 100..=60,000 | 5,000 |
//! | `limits.sessions_per_identity_max` | 1..=10,000,000 | 10,000 |
//! | `limits.event_history_max` | 0..=10,000,000 | 100,000 |
//! | `limits.state_flush_interval_ms` | 10..=60,000 | 2,000 |
//! | `limits.state_flush_bytes_max` | 1 MiB..=4 GiB | 64 MiB |
//! | `limits.log_retain_slots` | 0..=10,000,000 | 10,000 |
//! | `limits.snapshot_bytes_max` | 1 MiB..=1 TiB | 8 GiB |
//! | `limits.backups_max` | 1..=64 | 2 |
//! | `limits.backup_timeout_ms` | 1,000..=86,400,000 | 3,600,000 |
//! | `limits.http_connections_max` | 1..=100,000 | 64 |
//! | `limits.http_header_timeout_ms` | 100..=600,000 | 10,000 |
//! | `monitoring.ready_lag_slots_max` | 0..=100,000,000 | 1,000 |
//! | `tls.reload_check_ms` (0: on SIGHUP only) | 0..=3,600,000 | 5,000 |

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::address::HostPort;
use crate::state::StateConfig;

/// One replica's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    /// Names the cluster; replicas of another cluster are refused.
    pub cluster_id: String,
    /// This replica's id; must be one of `members`.
    /// Range: 1..=4,294,967,295.
    pub id: u64,
    /// Where the database lives (created if missing).
    pub data_dir: PathBuf,
    /// Certificates for mutual TLS.
    pub tls: TlsConfig,
    /// Every voting member, this replica included.
    pub members: Vec<MemberConfig>,
    /// Protocol timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Size and count bounds.
    #[serde(default)]
    pub limits: Limits,
    /// Metrics and health checks over HTTP.
    #[serde(default)]
    pub monitoring: Monitoring,
    /// What the replica logs, and how.
    #[serde(default)]
    pub log: LogConfig,
    /// Where this replica binds its ports, when not where its member entry
    /// says others reach it.
    #[serde(default)]
    pub listen: Listen,
}

/// Where a replica binds its peer and client ports. Each defaults to the
/// replica's own member address when that is an IP address, and to that
/// port on every IPv4 interface (`0.0.0.0`) when it is a DNS name (a name
/// is what others dial; the replica need not resolve its own).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Where to bind the peer port, e.g. `0.0.0.0:7001`.
    pub peer: Option<SocketAddr>,
    /// Where to bind the client port, e.g. `0.0.0.0:7101`.
    pub client: Option<SocketAddr>,
}

/// The replica's log, on standard error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter (`info`, `warn,synod_server::replica=debug`); the
    /// `RUST_LOG` environment variable, when set, replaces it.
    /// Default `info`.
    pub level: String,
    /// `text` (coloured only on a terminal) or `json` (one object per
    /// line). Default `text`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The HTTP listener for metrics and health checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Monitoring {
    /// Where to serve `/metrics` (Prometheus' text format), `/livez` and
    /// `/readyz`, over plain HTTP; none when absent. Port 0 picks a free
    /// port (tests).
    pub http_address: Option<SocketAddr>,
    /// `/readyz` answers ready only while the replica's applied slot trails
    /// the highest chosen slot it has heard of by at most this many.
    /// Range: 0..=100,000,000; default 1,000.
    pub ready_lag_slots_max: u64,
}

impl Default for Monitoring {
    fn default() -> Monitoring {
        Monitoring {
            http_address: None,
            ready_lag_slots_max: 1_000,
        }
    }
}

/// PEM files for mutual TLS against the cluster CA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// This replica's certificate, signed by the CA.
    pub cert: PathBuf,
    /// This replica's private key.
    pub key: PathBuf,
    /// How often the replica looks whether the three files changed, and
    /// reloads them if so (a replaced certificate is used without a
    /// restart); 0 looks only on SIGHUP. Range 0..=3,600,000, default 5,000.
    #[serde(default = "default_tls_reload_check_ms")]
    pub reload_check_ms: u64,
}

/// How often TLS files are looked at by default: every 5 s.
pub const DEFAULT_TLS_RELOAD_CHECK_MS: u64 = 5_000;

fn default_tls_reload_check_ms() -> u64 {
    DEFAULT_TLS_RELOAD_CHECK_MS
}

/// A voting member and where to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// The member's id.
    pub id: u64,
    /// Where replicas reach it: `host:port`, the host an IP address or a
    /// DNS name (resolved at every dial).
    pub peer_address: HostPort,
    /// Where clients reach it, as for `peer_address`; told to clients as
    /// it is written.
    pub client_address: HostPort,
}

/// Protocol timeouts, in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// How often the leader sends heartbeats.
    /// Range: 1..=10,000; default 50.
    pub heartbeat_interval_ms: u64,
    /// Lower end of the randomised election timeout; at least `lease_ms`.
    /// Range: 2..=300,000; default 300.
    pub election_timeout_min_ms: u64,
    /// Upper end of the randomised election timeout; above the lower end.
    /// Five times this (at least 5 s) is the QUIC idle timeout.
    /// Range: 3..=600,000; default 450.
    pub election_timeout_max_ms: u64,
    /// The leader's lease, as acceptors promise it; at least two heartbeats.
    /// Range: 2..=300,000; default 300.
    pub lease_ms: u64,
    /// Subtracted from the lease for clock-rate differences; below the lease.
    /// Range: 0..=60,000; default 100.
    pub clock_drift_margin_ms: u64,
    /// Shortest session timeout a client may ask for; at least two
    /// heartbeats. Range: 2..=3,600,000; default 1,000.
    pub session_timeout_min_ms: u64,
    /// Longest session timeout a client may ask for; at least the shortest.
    /// Range: 2..=86,400,000; default 120,000.
    pub session_timeout_max_ms: u64,
    /// Time a new leader adds to every session's checkpointed remaining
    /// time, so clients can find it before their sessions expire.
    /// Range: 0..=600,000; default 2,000.
    pub session_grace_ms: u64,
    /// How often the leader commits a checkpoint of sessions' remaining time.
    /// Range: 1..=3,600,000; default 1,000.
    pub session_checkpoint_interval_ms: u64,
    /// A request not answered within this long fails with a timeout.
    /// Range: 1..=3,600,000; default 10,000.
    pub request_timeout_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            // A killed or hung leader is replaced within half a second: the
            // followers stop hearing it for 300-450 ms, by when the lease
            // it held (300 ms from its last heartbeat) has run out, and
            // elect a new one in a round trip.
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 450,
            lease_ms: 300,
            clock_drift_margin_ms: 100,
            session_timeout_min_ms: 1000,
            session_timeout_max_ms: 120_000,
            session_grace_ms: 2000,
            session_checkpoint_interval_ms: 1000,
            request_timeout_ms: 10_000,
        }
    }
}

/// Size and count bounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest node value. Range: 1..=67,108,864 (64 MiB); default 1,048,576.
    pub data_bytes_max: u64,
    /// Longest path. Range: 1..=65,536; default 4,096.
    pub path_bytes_max: u64,
    /// Largest frame on any connection; holds the largest value and path
    /// plus 1 KiB. Peer frames may be eight times larger, and must stay
    /// under the `u32` length prefix. Range: 4,096..=268,435,456 (256 MiB);
    /// default 2,097,152.
    pub frame_bytes_max: u64,
    /// Most watches one session may hold on a replica.
    /// Range: 1..=1,000,000; default 10,000.
    pub watches_per_session_max: u64,
    /// Most bytes of watched paths one session may hold on a replica.
    /// Range: 1..=1,073,741,824 (1 GiB); default 4 MiB.
    pub watch_path_bytes_per_session_max: u64,
    /// Most client connections a replica serves at once.
    /// Range: 1..=1,000,000; default 10,000.
    pub client_connections_max: u64,
    /// Most client connections one client identity (certificate subject)
    /// may hold on a replica at once. Range: 1..=1,000,000; default 16.
    pub client_connections_per_identity_max: u64,
    /// Most TLS handshakes in progress at once on the client port.
    /// Range: 1..=100,000; default 256.
    pub client_handshakes_max: u64,
    /// A client connection that sends nothing for this long is closed
    /// (clients with a session send keep-alives well within it); at least
    /// half of `timeouts.session_timeout_max_ms`.
    /// Range: 1,000..=86,400,000; default 60,000.
    pub client_idle_timeout_ms: u64,
    /// Longest a connection (client or peer) may take over its TLS
    /// handshake and hello; a half-open connection is dropped after it.
    /// Range: 100..=60,000; default 5,000.
    pub handshake_timeout_ms: u64,
    /// Most requests one connection may have waiting for an answer (over
    /// it, requests are refused with an error naming this limit).
    /// Range: 1..=100,000; default 4,096.
    pub pending_requests_per_connection_max: u64,
    /// Most bytes of requests one connection may have waiting for an
    /// answer; at least `frame_bytes_max` plus 4 KiB.
    /// Range: 8,192..=1,073,741,824 (1 GiB); default 16 MiB.
    pub pending_request_bytes_per_connection_max: u64,
    /// Most bytes of replies queued for one connection: at half of it the
    /// replica stops reading from the client and holds its reads back; a
    /// connection whose queue reaches it (it reads nothing) is closed. At
    /// least twice `frame_bytes_max` plus 4 KiB.
    /// Range: 16,384..=2,147,483,648 (2 GiB); default 16 MiB.
    pub reply_queue_bytes_per_connection_max: u64,
    /// Most sessions open at once for one client identity, cluster-wide.
    /// Every replica must use the same value.
    /// Range: 1..=10,000,000; default 10,000.
    pub sessions_per_identity_max: u64,
    /// Events kept for clients that reconnect and ask for what they missed.
    /// Range: 0..=10,000,000; default 100,000.
    pub event_history_max: u64,
    /// Longest time a change to the state machine waits before it is
    /// written to its tables (changes wait to be written together; the log
    /// holds them meanwhile, and a restart replays at most this much). A
    /// longer interval writes each hot B-tree page less often: filling
    /// 1,000,000 nodes ran about 10% faster at 2 s than at 1 s.
    /// Range: 10..=60,000; default 2,000.
    pub state_flush_interval_ms: u64,
    /// Changes to the state machine waiting to be written are written once
    /// they hold this many bytes, however soon.
    /// Range: 1,048,576..=4,294,967,296 (1 MiB to 4 GiB); default 64 MiB.
    pub state_flush_bytes_max: u64,
    /// Chosen slots kept in the log below the saved state, so that a
    /// replica slightly behind catches up without a snapshot.
    /// Range: 0..=10,000,000; default 10,000.
    pub log_retain_slots: u64,
    /// Largest snapshot accepted from another replica.
    /// Range: 1,048,576..=1,099,511,627,776 (1 MiB to 1 TiB); default 8 GiB.
    pub snapshot_bytes_max: u64,
    /// Most backups (`synod snapshot save`) a replica streams at once; one
    /// more is refused with a reason naming this limit. Each holds a read
    /// transaction on the saved state while it streams.
    /// Range: 1..=64; default 2.
    pub backups_max: u64,
    /// Longest a backup may take to stream; a client reading slower is cut
    /// off (the read transaction it holds keeps the database from reusing
    /// pages). Range: 1,000..=86,400,000; default 3,600,000 (an hour).
    pub backup_timeout_ms: u64,
    /// Most connections open at once to the HTTP listener for metrics and
    /// health (`monitoring.http_address`); one more is closed on accept.
    /// Range: 1..=100,000; default 64.
    pub http_connections_max: u64,
    /// An HTTP connection that takes longer than this to send a request's
    /// headers, or is idle this long between requests, is closed.
    /// Range: 100..=600,000; default 10,000.
    pub http_header_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            data_bytes_max: 1 << 20,
            path_bytes_max: 4096,
            frame_bytes_max: synod_proto::wire::DEFAULT_MAX_FRAME_BYTES,
            watches_per_session_max: 10_000,
            watch_path_bytes_per_session_max: 4 << 20,
            client_connections_max: 10_000,
            client_connections_per_identity_max: 16,
            client_handshakes_max: 256,
            client_idle_timeout_ms: 60_000,
            handshake_timeout_ms: 5_000,
            pending_requests_per_connection_max: 4_096,
            pending_request_bytes_per_connection_max: 16 << 20,
            reply_queue_bytes_per_connection_max: 16 << 20,
            sessions_per_identity_max: 10_000,
            event_history_max: 100_000,
            state_flush_interval_ms: 2_000,
            state_flush_bytes_max: 64 << 20,
            log_retain_slots: 10_000,
            snapshot_bytes_max: 8 << 30,
            backups_max: 2,
            backup_timeout_ms: 3_600_000,
            http_connections_max: 64,
            http_header_timeout_ms: 10_000,
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the line and field.
        message: String,
    },
    /// A field has a value that cannot work.
    #[error("config field `{field}`: {reason}")]
    Invalid {
        /// The field, as written in the file.
        field: String,
        /// Why it is refused.
        reason: String,
    },
}

/// One numeric field's documented range, as [`ReplicaConfig::validate`]
/// checks it.
#[derive(Clone, Copy)]
struct NumericField {
    /// The field as written in the file (`limits.frame_bytes_max`).
    name: &'static str,
    /// The smallest value accepted.
    min: u64,
    /// The largest value accepted.
    max: u64,
    /// Reads the field.
    get: fn(&ReplicaConfig) -> u64,
    /// Writes the field, so tests can set each in turn.
    #[cfg(test)]
    set: fn(&mut ReplicaConfig, u64),
}

/// A row of [`NUMERIC_FIELDS`]: the field's path in the config and its
/// inclusive bounds.
macro_rules! numeric {
    ($section:ident . $field:ident, $min:expr, $max:expr) => {
        NumericField {
            name: concat!(stringify!($section), ".", stringify!($field)),
            min: $min,
            max: $max,
            get: |config| config.$section.$field,
            #[cfg(test)]
            set: |config, value| config.$section.$field = value,
        }
    };
    ($field:ident, $min:expr, $max:expr) => {
        NumericField {
            name: stringify!($field),
            min: $min,
            max: $max,
            get: |config| config.$field,
            #[cfg(test)]
            set: |config, value| config.$field = value,
        }
    };
}

/// The largest node id, for `id` and `members[].id`.
const NODE_ID_MAX: u64 = u32::MAX as u64;

/// The range of every numeric field, one row each; the module docs' table
/// and each field's doc comment say the same. A new numeric field gets a
/// row here (the tests then check its bounds on their own).
const NUMERIC_FIELDS: &[NumericField] = &[
    numeric!(id, 1, NODE_ID_MAX),
    numeric!(timeouts.heartbeat_interval_ms, 1, 10_000),
    numeric!(timeouts.election_timeout_min_ms, 2, 300_000),
    numeric!(timeouts.election_timeout_max_ms, 3, 600_000),
    numeric!(timeouts.lease_ms, 2, 300_000),
    numeric!(timeouts.clock_drift_margin_ms, 0, 60_000),
    numeric!(timeouts.session_timeout_min_ms, 2, 3_600_000),
    numeric!(timeouts.session_timeout_max_ms, 2, 86_400_000),
    numeric!(timeouts.session_grace_ms, 0, 600_000),
    numeric!(timeouts.session_checkpoint_interval_ms, 1, 3_600_000),
    numeric!(timeouts.request_timeout_ms, 1, 3_600_000),
    numeric!(limits.data_bytes_max, 1, 64 << 20),
    numeric!(limits.path_bytes_max, 1, 64 << 10),
    // Peer frames are eight client frames and must fit the u32 length
    // prefix with room to spare.
    numeric!(limits.frame_bytes_max, 4096, 256 << 20),
    numeric!(limits.watches_per_session_max, 1, 1_000_000),
    numeric!(limits.client_connections_max, 1, 1_000_000),
    numeric!(limits.pending_requests_per_connection_max, 1, 100_000),
    numeric!(
        limits.pending_request_bytes_per_connection_max,
        8192,
        1 << 30
    ),
    numeric!(limits.reply_queue_bytes_per_connection_max, 16_384, 2 << 30),
    numeric!(limits.watch_path_bytes_per_session_max, 1, 1 << 30),
    numeric!(limits.client_connections_per_identity_max, 1, 1_000_000),
    numeric!(limits.client_handshakes_max, 1, 100_000),
    numeric!(limits.client_idle_timeout_ms, 1_000, 86_400_000),
    numeric!(limits.handshake_timeout_ms, 100, 60_000),
    numeric!(limits.sessions_per_identity_max, 1, 10_000_000),
    numeric!(limits.event_history_max, 0, 10_000_000),
    numeric!(limits.state_flush_interval_ms, 10, 60_000),
    numeric!(limits.state_flush_bytes_max, 1 << 20, 4 << 30),
    numeric!(limits.log_retain_slots, 0, 10_000_000),
    numeric!(limits.snapshot_bytes_max, 1 << 20, 1 << 40),
    numeric!(limits.backups_max, 1, 64),
    numeric!(limits.backup_timeout_ms, 1_000, 86_400_000),
    numeric!(limits.http_connections_max, 1, 100_000),
    numeric!(limits.http_header_timeout_ms, 100, 600_000),
    numeric!(monitoring.ready_lag_slots_max, 0, 100_000_000),
    numeric!(tls.reload_check_ms, 0, 3_600_000),
];

/// Where to bind for a member address: the address itself when it is an
/// IP address, its port on every IPv4 interface when it is a name.
fn listen_default(address: &HostPort) -> SocketAddr {
    address
        .socket_addr()
        .unwrap_or_else(|| SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, address.port())))
}

/// Refuses `value` for `field` unless it is within `min..=max`.
fn check_range(field: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("must be between {min} and {max} (got {value})"),
        ))
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

impl ReplicaConfig {
    /// Reads and validates a TOML file.
    ///
    /// # Errors
    /// An unreadable file, bad TOML, an unknown field, or an invalid value.
    pub fn load(path: &Path) -> Result<ReplicaConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = ReplicaConfig::parse(&text).map_err(|error| match error {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses and validates TOML text.
    ///
    /// # Errors
    /// Bad TOML, an unknown field, or an invalid value.
    pub fn parse(text: &str) -> Result<ReplicaConfig, ConfigError> {
        let config: ReplicaConfig = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: error.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks every field and the relations between them.
    ///
    /// # Errors
    /// The first invalid field, named.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_ranges()?;
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(invalid(
                "log.level",
                format!("is not a tracing filter: {error}"),
            ));
        }
        if self.cluster_id.trim().is_empty() {
            return Err(invalid("cluster_id", "must not be empty"));
        }
        if self.members.is_empty() {
            return Err(invalid("members", "list at least one member"));
        }
        let mut ids = BTreeSet::new();
        let mut addresses = BTreeSet::new();
        for (index, member) in self.members.iter().enumerate() {
            check_range(&format!("members[{index}].id"), member.id, 1, NODE_ID_MAX)?;
            if !ids.insert(member.id) {
                return Err(invalid(
                    &format!("members[{index}].id"),
                    format!("id {} appears twice", member.id),
                ));
            }
            for (field, address) in [
                ("peer_address", &member.peer_address),
                ("client_address", &member.client_address),
            ] {
                if address.port() != 0 && !addresses.insert(address.clone()) {
                    return Err(invalid(
                        &format!("members[{index}].{field}"),
                        format!("{address} is used twice"),
                    ));
                }
            }
        }
        if self.members.len() > synod_paxos::MAX_MEMBERS {
            return Err(invalid("members", "at most 64 members"));
        }
        if !ids.contains(&self.id) {
            return Err(invalid(
                "id",
                format!("{} is not among the members {:?}", self.id, ids),
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        self.paxos_config(0)
            .validate()
            .map_err(|error| match error {
                synod_paxos::ConfigError::Invalid { field, reason } => {
                    invalid(&format!("timeouts.{field}"), reason)
                }
                other => invalid("timeouts", other.to_string()),
            })?;
        let t = &self.timeouts;
        if t.session_timeout_max_ms < t.session_timeout_min_ms {
            return Err(invalid(
                "timeouts.session_timeout_max_ms",
                "must be at least session_timeout_min_ms",
            ));
        }
        if t.session_timeout_min_ms < t.heartbeat_interval_ms.saturating_mul(2) {
            return Err(invalid(
                "timeouts.session_timeout_min_ms",
                "must be at least two heartbeat intervals",
            ));
        }
        let l = &self.limits;
        if l.pending_request_bytes_per_connection_max < l.frame_bytes_max + 4096 {
            return Err(invalid(
                "limits.pending_request_bytes_per_connection_max",
                "must hold the largest frame (frame_bytes_max) plus 4 KiB",
            ));
        }
        if l.reply_queue_bytes_per_connection_max < 2 * (l.frame_bytes_max + 4096) {
            return Err(invalid(
                "limits.reply_queue_bytes_per_connection_max",
                "must hold two of the largest frames (2 * frame_bytes_max) plus 8 KiB",
            ));
        }
        if l.client_idle_timeout_ms < t.session_timeout_max_ms / 2
            || l.client_idle_timeout_ms < 2 * t.heartbeat_interval_ms
        {
            return Err(invalid(
                "limits.client_idle_timeout_ms",
                "must be at least half of timeouts.session_timeout_max_ms, so that a client's \
                 keep-alives keep its connection open",
            ));
        }
        if l.frame_bytes_max < l.data_bytes_max + l.path_bytes_max + 1024 {
            return Err(invalid(
                "limits.frame_bytes_max",
                "must hold the largest value and path plus 1 KiB of framing",
            ));
        }
        Ok(())
    }

    /// Checks every numeric field against its range in [`NUMERIC_FIELDS`].
    ///
    /// # Errors
    /// The first field out of its range, named, with the range.
    fn validate_ranges(&self) -> Result<(), ConfigError> {
        for field in NUMERIC_FIELDS {
            check_range(field.name, (field.get)(self), field.min, field.max)?;
        }
        Ok(())
    }

    /// A three-member configuration with every numeric field at the low
    /// end of its range (`upper == false`) or at the high end, for tests
    /// that the derived settings hold up at the extremes. It is valid.
    #[cfg(test)]
    pub(crate) fn at_range_ends(upper: bool) -> ReplicaConfig {
        let member = |id: u64| MemberConfig {
            id,
            peer_address: SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16)).into(),
            client_address: SocketAddr::from(([127, 0, 0, 1], 7100 + id as u16)).into(),
        };
        let mut config = ReplicaConfig {
            cluster_id: "range-ends".into(),
            id: 1,
            data_dir: PathBuf::from("/tmp/synod-range-ends"),
            tls: TlsConfig {
                ca: "ca.pem".into(),
                cert: "node-1.pem".into(),
                key: "node-1-key.pem".into(),
                reload_check_ms: DEFAULT_TLS_RELOAD_CHECK_MS,
            },
            members: vec![member(1), member(2), member(3)],
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            monitoring: Monitoring::default(),
            log: Default::default(),
            listen: Listen::default(),
        };
        for field in NUMERIC_FIELDS {
            (field.set)(&mut config, if upper { field.max } else { field.min });
        }
        config.members[0].id = config.id;
        config
    }

    /// Where this replica's TLS files are.
    pub fn tls_files(&self) -> synod_proto::tls::TlsFiles {
        synod_proto::tls::TlsFiles {
            ca: self.tls.ca.clone(),
            cert: self.tls.cert.clone(),
            key: self.tls.key.clone(),
        }
    }

    /// Loads the TLS files and checks them for this replica: the
    /// certificate chains to the CA, names `node-<id>.synod`, and the key
    /// is its own (see [`synod_proto::tls::check_node_material`]).
    ///
    /// # Errors
    /// The [`TlsError`](synod_proto::tls::TlsError), naming the file and
    /// the problem.
    pub fn load_tls(&self) -> Result<synod_proto::tls::TlsMaterial, synod_proto::tls::TlsError> {
        self.tls_files().load_for_node(self.id)
    }

    /// Checks that the data directory can be used: the replica creates it
    /// and any missing parents at start, so what exists of the path must
    /// be directories.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `data_dir`.
    pub fn check_data_dir(&self) -> Result<(), ConfigError> {
        let existing = self.data_dir.ancestors().find(|path| path.exists());
        match existing {
            Some(path) if !path.is_dir() => Err(invalid(
                "data_dir",
                format!(
                    "{} cannot be created: {} is not a directory",
                    self.data_dir.display(),
                    path.display()
                ),
            )),
            _ => Ok(()),
        }
    }

    /// This replica's own member entry.
    pub fn me(&self) -> &MemberConfig {
        self.members
            .iter()
            .find(|member| member.id == self.id)
            .unwrap_or(&self.members[0])
    }

    /// Binds every port of this replica (peer, client, HTTP) on `ip`,
    /// keeping each one's port.
    pub fn listen_on(&mut self, ip: std::net::IpAddr) {
        self.listen.peer = Some(SocketAddr::new(ip, self.peer_listen_address().port()));
        self.listen.client = Some(SocketAddr::new(ip, self.client_listen_address().port()));
        if let Some(http) = &mut self.monitoring.http_address {
            http.set_ip(ip);
        }
    }

    /// Where this replica binds its peer port (see [`Listen`]).
    pub fn peer_listen_address(&self) -> SocketAddr {
        self.listen
            .peer
            .unwrap_or_else(|| listen_default(&self.me().peer_address))
    }

    /// Where this replica binds its client port (see [`Listen`]).
    pub fn client_listen_address(&self) -> SocketAddr {
        self.listen
            .client
            .unwrap_or_else(|| listen_default(&self.me().client_address))
    }

    /// The Paxos core's configuration, with `seed` for its randomness.
    pub fn paxos_config(&self, seed: u64) -> synod_paxos::Config {
        let t = &self.timeouts;
        let mut config = synod_paxos::Config::new(self.id, seed);
        config.heartbeat_interval_ms = t.heartbeat_interval_ms;
        config.election_timeout_min_ms = t.election_timeout_min_ms;
        config.election_timeout_max_ms = t.election_timeout_max_ms;
        config.lease_ms = t.lease_ms;
        config.clock_drift_margin_ms = t.clock_drift_margin_ms;
        config.retransmit_interval_ms = t.heartbeat_interval_ms.saturating_mul(2).max(20);
        config.catch_up_retry_ms = t.heartbeat_interval_ms.saturating_mul(2).max(20);
        config.read_timeout_ms = t.request_timeout_ms;
        config.max_slot_bytes =
            usize::try_from(self.limits.frame_bytes_max / 2).unwrap_or(usize::MAX);
        config.log_retain_slots = self.limits.log_retain_slots;
        config
    }

    /// The state machine's configuration.
    pub fn state_config(&self) -> StateConfig {
        StateConfig {
            data_bytes_max: self.limits.data_bytes_max,
            path_bytes_max: self.limits.path_bytes_max,
            session_timeout_min_ms: self.timeouts.session_timeout_min_ms,
            session_timeout_max_ms: self.timeouts.session_timeout_max_ms,
            sessions_per_identity_max: self.limits.sessions_per_identity_max,
            ..StateConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
cluster_id = "test"
id = 2
data_dir = "/tmp/synod-2"

[tls]
ca = "ca.pem"
cert = "node-2.pem"
key = "node-2-key.pem"

[[members]]
id = 1
peer_address = "127.0.0.1:7001"
client_address = "127.0.0.1:7101"

[[members]]
id = 2
peer_address = "127.0.0.1:7002"
client_address = "127.0.0.1:7102"

[[members]]
id = 3
peer_address = "127.0.0.1:7003"
client_address = "127.0.0.1:7103"
"#;

    #[test]
    fn members_may_be_named_and_listen_elsewhere() {
        let named = VALID
            .replace("127.0.0.1:7002", "synod-1.synod-peers.prod.svc:7002")
            .replace("127.0.0.1:7102", "synod-1.synod.prod.svc:7102");
        let config: ReplicaConfig = toml::from_str(&named).expect("parses");
        config.validate().expect("valid");
        assert!(config.me().peer_address.is_name());
        assert_eq!(
            config.peer_listen_address(),
            "0.0.0.0:7002".parse::<SocketAddr>().expect("address"),
            "a name binds its port on every interface"
        );
        let listening = format!("{named}\n[listen]\npeer = \"10.1.2.3:9000\"\n");
        let config: ReplicaConfig = toml::from_str(&listening).expect("parses");
        assert_eq!(
            config.peer_listen_address(),
            "10.1.2.3:9000".parse::<SocketAddr>().expect("address")
        );
        assert_eq!(config.client_listen_address().port(), 7102);
        let mut on_pod = config.clone();
        on_pod.monitoring.http_address = Some("0.0.0.0:7201".parse().expect("address"));
        let pod_ip: std::net::IpAddr = "10.9.9.9".parse().expect("an IP");
        on_pod.listen_on(pod_ip);
        assert_eq!(on_pod.peer_listen_address(), SocketAddr::new(pod_ip, 9000));
        assert_eq!(
            on_pod.client_listen_address(),
            SocketAddr::new(pod_ip, 7102)
        );
        assert_eq!(
            on_pod.monitoring.http_address,
            Some(SocketAddr::new(pod_ip, 7201))
        );
        let bad = VALID.replace("127.0.0.1:7002", "not a host:7002");
        let error = toml::from_str::<ReplicaConfig>(&bad).expect_err("refused");
        assert!(
            error
                .to_string()
                .contains("neither an IP address nor a DNS name"),
            "{error}"
        );
    }

    #[test]
    fn a_minimal_file_gets_defaults() {
        let config = ReplicaConfig::parse(VALID).expect("valid");
        assert_eq!(config.me().client_address.port(), 7102);
        assert_eq!(
            config.client_listen_address(),
            "127.0.0.1:7102".parse::<SocketAddr>().expect("address")
        );
        assert_eq!(config.timeouts, Timeouts::default());
        assert_eq!(config.limits.data_bytes_max, 1 << 20);
        let again = ReplicaConfig::parse(&config.to_toml()).expect("round trip");
        assert_eq!(again, config);
    }

    fn error_of(text: &str) -> String {
        ReplicaConfig::parse(text).expect_err("invalid").to_string()
    }

    #[test]
    fn bad_fields_are_named() {
        assert!(
            error_of(&VALID.replace("\nid = 2\ndata_dir", "\nid = 9\ndata_dir")).contains("`id`")
        );
        assert!(error_of(&VALID.replace("7003", "7002")).contains("members[2].peer_address"));
        assert!(
            error_of(&VALID.replace("cluster_id = \"test\"", "cluster_id = \"\""))
                .contains("cluster_id")
        );
        let unknown = format!("{VALID}\n[timeouts]\nheartbeat_ms = 5\n");
        assert!(error_of(&unknown).contains("heartbeat_ms"));
        let lease = format!("{VALID}\n[timeouts]\nlease_ms = 5000\n");
        assert!(error_of(&lease).contains("timeouts.election_timeout_min_ms"));
        let frame = format!("{VALID}\n[limits]\nframe_bytes_max = 1000\n");
        assert!(error_of(&frame).contains("limits.frame_bytes_max"));
        assert!(error_of("id = [").contains("TOML") || error_of("id = [").contains("line"));
    }

    /// The field an `Invalid` error names, and its reason.
    fn refusal(config: &ReplicaConfig) -> (String, String) {
        match config.validate() {
            Err(ConfigError::Invalid { field, reason }) => (field, reason),
            other => panic!("expected a refused field, got {other:?}"),
        }
    }

    #[test]
    fn every_numeric_field_refuses_values_outside_its_range() {
        let base = ReplicaConfig::parse(VALID).expect("valid");
        for field in NUMERIC_FIELDS {
            let mut outside = vec![u64::MAX, i64::MAX as u64];
            outside.extend(field.max.checked_add(1));
            if field.min > 0 {
                outside.extend([0, field.min - 1]);
            }
            for value in outside {
                let mut config = base.clone();
                (field.set)(&mut config, value);
                let (named, reason) = refusal(&config);
                assert_eq!(named, field.name, "{value} refused under another name");
                assert_eq!(
                    reason,
                    format!(
                        "must be between {} and {} (got {value})",
                        field.min, field.max
                    )
                );
            }
            for value in [field.min, field.max] {
                let mut config = base.clone();
                (field.set)(&mut config, value);
                assert!(
                    config.validate_ranges().is_ok(),
                    "{} = {value} is within its range",
                    field.name
                );
            }
        }
    }

    #[test]
    fn out_of_range_values_in_the_file_are_named() {
        let connections = format!("{VALID}\n[limits]\nclient_connections_max = {}\n", i64::MAX);
        assert_eq!(
            error_of(&connections),
            "config field `limits.client_connections_max`: must be between 1 and 1000000 \
             (got 9223372036854775807)"
        );
        let frame = format!("{VALID}\n[limits]\nframe_bytes_max = {}\n", 8u64 << 30);
        assert!(error_of(&frame).contains("`limits.frame_bytes_max`"));
        let election = format!(
            "{VALID}\n[timeouts]\nelection_timeout_max_ms = {}\n",
            i64::MAX
        );
        assert!(error_of(&election).contains("`timeouts.election_timeout_max_ms`"));
        let member = VALID.replace("id = 3", "id = 0");
        assert!(error_of(&member).contains("`members[2].id`: must be between 1 and"));
    }

    #[test]
    fn a_data_dir_under_a_file_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = ReplicaConfig::parse(VALID).expect("valid");
        config.data_dir = dir.path().join("missing").join("data");
        config
            .check_data_dir()
            .expect("missing parents are created");
        let file = dir.path().join("file");
        std::fs::write(&file, b"").expect("write");
        config.data_dir = file.join("data");
        let error = config.check_data_dir().expect_err("under a file");
        assert!(error.to_string().contains("`data_dir`"), "{error}");
    }

    #[test]
    fn both_ends_of_every_range_make_a_valid_config() {
        for upper in [false, true] {
            let config = ReplicaConfig::at_range_ends(upper);
            config
                .validate()
                .unwrap_or_else(|error| panic!("range ends (upper: {upper}): {error}"));
            let again = ReplicaConfig::parse(&config.to_toml()).expect("round trip");
            assert_eq!(again, config);
        }
    }
}
