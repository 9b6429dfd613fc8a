//! Configuration of one replica's core, validated before use.

use thiserror::Error;

use crate::types::NodeId;

/// Timeouts, bounds and the random seed of one replica. Times are in
/// milliseconds of the caller's clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// This replica's id; must be a member.
    pub id: NodeId,
    /// Seeds the only randomness in the core (election timeouts, request
    /// numbers). Drivers pass a fresh seed on every start of a replica (a
    /// replayed simulation derives it from the run's seed), so that replies
    /// addressed to an earlier incarnation are not mistaken for new ones.
    pub seed: u64,
    /// How often the leader sends heartbeats.
    pub heartbeat_interval_ms: u64,
    /// A follower that hears no leader for a random time in
    /// `[election_timeout_min_ms, election_timeout_max_ms)` campaigns.
    pub election_timeout_min_ms: u64,
    /// Upper end of the randomised election timeout.
    pub election_timeout_max_ms: u64,
    /// How long an acceptor that acknowledged a heartbeat promises no other
    /// ballot; the leader's lease lasts this minus the drift margin.
    pub lease_ms: u64,
    /// Subtracted from the leader's lease to cover clock-rate differences
    /// between replicas over one lease duration.
    pub clock_drift_margin_ms: u64,
    /// Accepts not acknowledged after this long are sent again.
    pub retransmit_interval_ms: u64,
    /// A follower whose catch-up request is unanswered asks again after this long.
    pub catch_up_retry_ms: u64,
    /// A read not answered within this long is aborted.
    pub read_timeout_ms: u64,
    /// Most slots the leader has proposed but not yet seen chosen.
    pub max_inflight_slots: u64,
    /// Most commands packed into one slot.
    pub max_commands_per_slot: usize,
    /// Most bytes of commands packed into one slot (a single larger command
    /// still gets a slot of its own).
    pub max_slot_bytes: usize,
    /// Most slots carried by one accept, promise or catch-up message.
    pub max_slots_per_message: usize,
    /// Most commands queued at the leader waiting for a slot.
    pub max_pending_commands: usize,
    /// Most reads waiting for a read index at once.
    pub max_pending_reads: usize,
    /// Chosen slots kept in the log below the compaction point, so that
    /// followers slightly behind catch up without a snapshot.
    pub log_retain_slots: u64,
}

impl Config {
    /// A configuration with the defaults used by the replica binary: 100 ms
    /// heartbeats, 1-2 s election timeouts, a 1 s lease with a 100 ms drift
    /// margin.
    pub fn new(id: NodeId, seed: u64) -> Config {
        Config {
            id,
            seed,
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            lease_ms: 1000,
            clock_drift_margin_ms: 100,
            retransmit_interval_ms: 200,
            catch_up_retry_ms: 200,
            read_timeout_ms: 5000,
            max_inflight_slots: 256,
            max_commands_per_slot: 4096,
            max_slot_bytes: 4 << 20,
            max_slots_per_message: 64,
            max_pending_commands: 100_000,
            max_pending_reads: 100_000,
            log_retain_slots: 10_000,
        }
    }

    /// Checks the relations between the settings.
    ///
    /// # Errors
    /// The first setting that is out of range, named.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
            ("lease_ms", self.lease_ms),
            ("retransmit_interval_ms", self.retransmit_interval_ms),
            ("catch_up_retry_ms", self.catch_up_retry_ms),
            ("read_timeout_ms", self.read_timeout_ms),
            ("max_inflight_slots", self.max_inflight_slots),
            ("max_commands_per_slot", self.max_commands_per_slot as u64),
            ("max_slot_bytes", self.max_slot_bytes as u64),
            ("max_slots_per_message", self.max_slots_per_message as u64),
            ("max_pending_commands", self.max_pending_commands as u64),
            ("max_pending_reads", self.max_pending_reads as u64),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    field,
                    reason: "must be greater than zero".into(),
                });
            }
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return Err(ConfigError::Invalid {
                field: "election_timeout_max_ms",
                reason: "must be greater than election_timeout_min_ms".into(),
            });
        }
        if self.heartbeat_interval_ms * 2 > self.lease_ms {
            return Err(ConfigError::Invalid {
                field: "heartbeat_interval_ms",
                reason: "must be at most half of lease_ms so leases are renewed in time".into(),
            });
        }
        if self.election_timeout_min_ms < self.lease_ms {
            return Err(ConfigError::Invalid {
                field: "election_timeout_min_ms",
                reason: "must be at least lease_ms: a follower may not campaign while it promised a lease"
                    .into(),
            });
        }
        if self.clock_drift_margin_ms >= self.lease_ms {
            return Err(ConfigError::Invalid {
                field: "clock_drift_margin_ms",
                reason: "must be less than lease_ms".into(),
            });
        }
        Ok(())
    }
}

/// A configuration or membership that cannot be used.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A setting is out of range.
    #[error("invalid setting {field}: {reason}")]
    Invalid {
        /// The setting's name.
        field: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// The member set is empty.
    #[error("the member set is empty")]
    NoMembers,
    /// A node id appears twice in the member set.
    #[error("the member set names a node twice")]
    DuplicateMember,
    /// More members than a quorum mask can hold.
    #[error("{0} members is more than the 64 supported")]
    TooManyMembers(usize),
    /// This replica is not in the member set.
    #[error("node {0} is not a member of the cluster")]
    NotAMember(NodeId),
    /// The durable state given at start-up contradicts itself.
    #[error("durable state is inconsistent: {0}")]
    InconsistentState(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Config::new(1, 7).validate(), Ok(()));
    }

    #[test]
    fn lease_must_fit_inside_election_timeout() {
        let mut config = Config::new(1, 7);
        config.lease_ms = 1500;
        let error = config
            .validate()
            .expect_err("lease longer than election timeout");
        assert!(error.to_string().contains("election_timeout_min_ms"));
    }

    #[test]
    fn drift_margin_must_be_smaller_than_lease() {
        let mut config = Config::new(1, 7);
        config.clock_drift_margin_ms = 1000;
        assert!(config.validate().is_err());
    }

    fn field_refused(config: &Config) -> Option<&'static str> {
        match config.validate() {
            Err(ConfigError::Invalid { field, .. }) => Some(field),
            _ => None,
        }
    }

    #[test]
    fn each_bound_is_checked_at_its_edge() {
        let defaults = Config::new(1, 7);
        let mut config = defaults.clone();
        config.heartbeat_interval_ms = config.lease_ms / 2;
        assert_eq!(field_refused(&config), None, "half the lease is allowed");
        config.heartbeat_interval_ms += 1;
        assert_eq!(field_refused(&config), Some("heartbeat_interval_ms"));

        let mut config = defaults.clone();
        config.election_timeout_min_ms = config.lease_ms;
        assert_eq!(field_refused(&config), None, "a timeout of one lease");
        config.election_timeout_min_ms -= 1;
        assert_eq!(field_refused(&config), Some("election_timeout_min_ms"));

        let mut config = defaults.clone();
        config.election_timeout_max_ms = config.election_timeout_min_ms;
        assert_eq!(field_refused(&config), Some("election_timeout_max_ms"));
        config.election_timeout_max_ms += 1;
        assert_eq!(field_refused(&config), None);

        let mut config = defaults.clone();
        config.clock_drift_margin_ms = config.lease_ms - 1;
        assert_eq!(field_refused(&config), None);
        config.clock_drift_margin_ms += 1;
        assert_eq!(field_refused(&config), Some("clock_drift_margin_ms"));
    }

    #[test]
    fn every_count_and_interval_must_be_positive() {
        type ZeroIt = fn(&mut Config);
        let setters: [(&str, ZeroIt); 11] = [
            ("heartbeat_interval_ms", |c| c.heartbeat_interval_ms = 0),
            ("lease_ms", |c| c.lease_ms = 0),
            ("retransmit_interval_ms", |c| c.retransmit_interval_ms = 0),
            ("catch_up_retry_ms", |c| c.catch_up_retry_ms = 0),
            ("read_timeout_ms", |c| c.read_timeout_ms = 0),
            ("max_inflight_slots", |c| c.max_inflight_slots = 0),
            ("max_commands_per_slot", |c| c.max_commands_per_slot = 0),
            ("max_slot_bytes", |c| c.max_slot_bytes = 0),
            ("max_slots_per_message", |c| c.max_slots_per_message = 0),
            ("max_pending_commands", |c| c.max_pending_commands = 0),
            ("max_pending_reads", |c| c.max_pending_reads = 0),
        ];
        for (field, set_zero) in setters {
            let mut config = Config::new(1, 7);
            set_zero(&mut config);
            assert_eq!(field_refused(&config), Some(field));
        }
    }
}
