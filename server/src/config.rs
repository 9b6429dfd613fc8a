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
//!
//! [[members]]
//! id = 1
//! peer_address = "10.0.0.1:7001"
//! client_address = "10.0.0.1:7101"
//! # ... one [[members]] table per replica
//!
//! [timeouts]          # all optional
//! heartbeat_interval_ms = 100
//!
//! [limits]            # all optional
//! data_bytes_max = 1048576
//! ```

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::state::StateConfig;

/// One replica's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    /// Names the cluster; replicas of another cluster are refused.
    pub cluster_id: String,
    /// This replica's id; must be one of `members`.
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
}

/// A voting member and where to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// The member's id.
    pub id: u64,
    /// Where replicas reach it.
    pub peer_address: SocketAddr,
    /// Where clients reach it.
    pub client_address: SocketAddr,
}

/// Protocol timeouts, in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// How often the leader sends heartbeats.
    pub heartbeat_interval_ms: u64,
    /// Lower end of the randomised election timeout.
    pub election_timeout_min_ms: u64,
    /// Upper end of the randomised election timeout.
    pub election_timeout_max_ms: u64,
    /// The leader's lease, as acceptors promise it.
    pub lease_ms: u64,
    /// Subtracted from the lease for clock-rate differences.
    pub clock_drift_margin_ms: u64,
    /// Shortest session timeout a client may ask for.
    pub session_timeout_min_ms: u64,
    /// Longest session timeout a client may ask for.
    pub session_timeout_max_ms: u64,
    /// Time a new leader adds to every session's checkpointed remaining
    /// time, so clients can find it before their sessions expire.
    pub session_grace_ms: u64,
    /// How often the leader commits a checkpoint of sessions' remaining time.
    pub session_checkpoint_interval_ms: u64,
    /// A request not answered within this long fails with a timeout.
    pub request_timeout_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 1600,
            lease_ms: 1000,
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
    /// Largest node value.
    pub data_bytes_max: u64,
    /// Longest path.
    pub path_bytes_max: u64,
    /// Largest frame on any connection.
    pub frame_bytes_max: u64,
    /// Most watches one session may hold on a replica.
    pub watches_per_session_max: u64,
    /// Most bytes of watched paths one session may hold on a replica.
    pub watch_path_bytes_per_session_max: u64,
    /// Most client connections a replica serves at once.
    pub client_connections_max: u64,
    /// Most client connections one client identity (certificate subject)
    /// may hold on a replica at once.
    pub client_connections_per_identity_max: u64,
    /// Most TLS handshakes in progress at once on the client port.
    pub client_handshakes_max: u64,
    /// A client connection that sends nothing for this long is closed
    /// (clients with a session send keep-alives well within it).
    pub client_idle_timeout_ms: u64,
    /// Most requests one connection may have waiting for an answer (over
    /// it, requests are refused with an error naming this limit).
    pub pending_requests_per_connection_max: u64,
    /// Most bytes of requests one connection may have waiting for an answer.
    pub pending_request_bytes_per_connection_max: u64,
    /// Most bytes of replies queued for one connection: at half of it the
    /// replica stops reading from the client and holds its reads back; a
    /// connection whose queue reaches it (it reads nothing) is closed.
    pub reply_queue_bytes_per_connection_max: u64,
    /// Most sessions open at once for one client identity, cluster-wide.
    /// Every replica must use the same value.
    pub sessions_per_identity_max: u64,
    /// Events kept for clients that reconnect and ask for what they missed.
    pub event_history_max: u64,
    /// Applied slots between two saved snapshots of the state machine.
    pub snapshot_interval_slots: u64,
    /// Chosen slots kept in the log below the last snapshot, so that a
    /// replica slightly behind catches up without a snapshot.
    pub log_retain_slots: u64,
    /// Largest snapshot accepted from another replica.
    pub snapshot_bytes_max: u64,
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
            pending_requests_per_connection_max: 4_096,
            pending_request_bytes_per_connection_max: 16 << 20,
            reply_queue_bytes_per_connection_max: 16 << 20,
            sessions_per_identity_max: 10_000,
            event_history_max: 100_000,
            snapshot_interval_slots: 10_000,
            log_retain_slots: 10_000,
            snapshot_bytes_max: 8 << 30,
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
        if self.cluster_id.trim().is_empty() {
            return Err(invalid("cluster_id", "must not be empty"));
        }
        if self.members.is_empty() {
            return Err(invalid("members", "list at least one member"));
        }
        let mut ids = BTreeSet::new();
        let mut addresses = BTreeSet::new();
        for (index, member) in self.members.iter().enumerate() {
            if member.id == 0 {
                return Err(invalid(
                    &format!("members[{index}].id"),
                    "must be at least 1",
                ));
            }
            if !ids.insert(member.id) {
                return Err(invalid(
                    &format!("members[{index}].id"),
                    format!("id {} appears twice", member.id),
                ));
            }
            for (field, address) in [
                ("peer_address", member.peer_address),
                ("client_address", member.client_address),
            ] {
                if address.port() != 0 && !addresses.insert(address) {
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
        if t.session_timeout_min_ms == 0 || t.session_timeout_max_ms < t.session_timeout_min_ms {
            return Err(invalid(
                "timeouts.session_timeout_max_ms",
                "must be at least session_timeout_min_ms, which must be positive",
            ));
        }
        if t.session_timeout_min_ms < 2 * t.heartbeat_interval_ms {
            return Err(invalid(
                "timeouts.session_timeout_min_ms",
                "must be at least two heartbeat intervals",
            ));
        }
        if t.session_checkpoint_interval_ms == 0 || t.request_timeout_ms == 0 {
            return Err(invalid(
                "timeouts.session_checkpoint_interval_ms",
                "checkpoint interval and request timeout must be positive",
            ));
        }
        let l = &self.limits;
        let positive = [
            ("limits.data_bytes_max", l.data_bytes_max),
            ("limits.path_bytes_max", l.path_bytes_max),
            ("limits.watches_per_session_max", l.watches_per_session_max),
            ("limits.client_connections_max", l.client_connections_max),
            (
                "limits.pending_requests_per_connection_max",
                l.pending_requests_per_connection_max,
            ),
            ("limits.snapshot_interval_slots", l.snapshot_interval_slots),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(invalid(field, "must be positive"));
            }
        }
        for (field, value) in [
            (
                "limits.watch_path_bytes_per_session_max",
                l.watch_path_bytes_per_session_max,
            ),
            (
                "limits.client_connections_per_identity_max",
                l.client_connections_per_identity_max,
            ),
            ("limits.client_handshakes_max", l.client_handshakes_max),
            (
                "limits.sessions_per_identity_max",
                l.sessions_per_identity_max,
            ),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be positive"));
            }
        }
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

    /// This replica's own member entry.
    pub fn me(&self) -> &MemberConfig {
        self.members
            .iter()
            .find(|member| member.id == self.id)
            .unwrap_or(&self.members[0])
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
        config.retransmit_interval_ms = (2 * t.heartbeat_interval_ms).max(20);
        config.catch_up_retry_ms = (2 * t.heartbeat_interval_ms).max(20);
        config.read_timeout_ms = t.request_timeout_ms;
        config.max_slot_bytes = (self.limits.frame_bytes_max / 2) as usize;
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
    fn a_minimal_file_gets_defaults() {
        let config = ReplicaConfig::parse(VALID).expect("valid");
        assert_eq!(config.me().client_address.port(), 7102);
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
}
