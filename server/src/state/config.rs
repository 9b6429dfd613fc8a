//! Limits of the state machine. Every replica of a cluster must use the same
//! values, since they decide whether a command succeeds.

/// Named bounds on what the state machine accepts. `Default` gives the
/// documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateConfig {
    /// Largest node data, in bytes (default 1 MiB).
    pub data_bytes_max: u64,
    /// Longest path, in bytes (default 4096).
    pub path_bytes_max: u64,
    /// Shortest session timeout; shorter requests are raised to it (default 2 s).
    pub session_timeout_min_ms: u64,
    /// Longest session timeout; longer requests are lowered to it (default 60 s).
    pub session_timeout_max_ms: u64,
    /// Longest lock-delay; longer requests are lowered to it (default 60 s).
    pub lock_delay_max_ms: u64,
    /// Most operations in one multi (default 1000).
    pub multi_ops_max: u64,
    /// Most sessions open at once for one client identity, over the whole
    /// cluster (default 10,000).
    pub sessions_per_identity_max: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            data_bytes_max: 1024 * 1024,
            path_bytes_max: 4096,
            session_timeout_min_ms: 2_000,
            session_timeout_max_ms: 60_000,
            lock_delay_max_ms: 60_000,
            multi_ops_max: 1_000,
            sessions_per_identity_max: 10_000,
        }
    }
}

impl StateConfig {
    /// The timeout a session asking for `requested_ms` gets: clamped to
    /// `[session_timeout_min_ms, session_timeout_max_ms]`.
    pub fn clamp_session_timeout_ms(&self, requested_ms: u64) -> u64 {
        requested_ms
            .max(self.session_timeout_min_ms)
            .min(self.session_timeout_max_ms.max(self.session_timeout_min_ms))
    }
}
