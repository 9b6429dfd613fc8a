//! The deterministic coordination state machine (DESIGN.md section 2).
//!
//! [`StateMachine::apply`] is a pure function of the state and one
//! [`Command`]: no clocks (time comes stamped in the command by the leader),
//! no randomness, no I/O, and no iteration over unordered maps. Replicas
//! that apply the same commands in the same order hold byte-identical
//! snapshots.
//!
//! Every command that changes the state takes the next revision; all its
//! effects (nodes, stats, events) carry that one revision, as a ZooKeeper
//! transaction shares one zxid. Commands that change nothing leave the
//! revision as it was.
//!
//! What the replica does with the output of each applied command:
//! 1. answer the client with [`Applied::response`] (for client commands and
//!    session opens);
//! 2. hand [`Applied::events`] to its watch registry ([`watch`]) and record
//!    them in its bounded event history for reconnecting clients;
//! 3. wake the sessions in [`Applied::grants`], which were waiting for a lock
//!    or an election;
//! 4. drop the watches of [`Applied::ended_sessions`].
//!
//! The leader's duties, outside the state machine: stamp each command with
//! its clock (`now_ms`), track keep-alives and commit
//! [`Command::ExpireSessions`], periodically commit
//! [`Command::CheckpointSessions`], and commit [`Command::Tick`] often enough
//! (for example every 100 ms while [`StateMachine::next_lock_delay_end_ms`] is
//! set) that a lock-delay ends on time.

pub mod config;
mod lock;
pub mod path;
pub mod records;
mod session;
pub mod snapshot;
mod tree;
pub mod watch;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use synod_proto::{
    Error, Event, LockMode, MultiOp, MultiResult, Op, OpResult, Request, Response, Revision,
    SessionId, SessionSecret, Stat,
};

pub use config::StateConfig;
pub use lock::LockGrant;
pub use session::SessionRemaining;

use lock::{Acquired, LockEffects, LockKind, LockTable};
use path::validate_path;
use session::Session;
use tree::{Effects, Tree, Undo};

/// One entry of the replicated log, as the replica decodes it (postcard)
/// from a chosen Paxos value. Every command carries the leader's time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A client request.
    Client {
        /// The request, with its `(session, sequence)`.
        request: Request,
        /// Leader-stamped time, ms since the Unix epoch.
        now_ms: u64,
    },
    /// Open a new session; its identifier is assigned here.
    OpenSession {
        /// The timeout the client asked for (clamped to the configured bounds).
        timeout_ms: u64,
        /// The client identity (certificate subject) that asked; refused
        /// when it already holds `sessions_per_identity_max` sessions.
        owner: String,
        /// The secret the owner must show to resume the session, drawn at
        /// random by the replica the client asked (so every replica applies
        /// the same one).
        secret: SessionSecret,
        /// Leader-stamped time, ms since the Unix epoch.
        now_ms: u64,
    },
    /// The leader decided these sessions expired: end them as if closed,
    /// starting their locks' lock-delays.
    ExpireSessions {
        /// The sessions; unknown ones are ignored.
        sessions: Vec<SessionId>,
        /// Leader-stamped time, ms since the Unix epoch.
        now_ms: u64,
    },
    /// The leader's record of every session's remaining time, from which a
    /// new leader resumes.
    CheckpointSessions {
        /// Remaining time per session; unknown sessions are ignored.
        remaining: Vec<SessionRemaining>,
        /// Leader-stamped time, ms since the Unix epoch.
        now_ms: u64,
    },
    /// Only advances time: ends lock-delays that are over.
    Tick {
        /// Leader-stamped time, ms since the Unix epoch.
        now_ms: u64,
    },
    /// Gives the cluster its identity: the first one applied is kept for
    /// good, later ones are ignored (see
    /// [`StateMachine::cluster_identity`]). The random value was drawn by
    /// the proposing leader and travels in the log, so every replica keeps
    /// the same one.
    MintClusterIdentity {
        /// The identity.
        identity: u128,
        /// Leader-stamped time, ms since the Unix epoch.
        now_ms: u64,
    },
    /// A member says it holds the cluster's state (it applied the identity
    /// and is not rejoining): recorded in
    /// [`StateMachine::confirmed_members`]. Ignored before an identity is
    /// minted.
    MemberConfirmed {
        /// The member.
        node: u64,
        /// Leader-stamped time, ms since the Unix epoch.
        now_ms: u64,
    },
}

impl Command {
    /// The leader-stamped time of the command.
    pub fn now_ms(&self) -> u64 {
        match self {
            Command::Client { now_ms, .. }
            | Command::OpenSession { now_ms, .. }
            | Command::ExpireSessions { now_ms, .. }
            | Command::CheckpointSessions { now_ms, .. }
            | Command::Tick { now_ms } => *now_ms,
            Command::MintClusterIdentity { now_ms, .. }
            | Command::MemberConfirmed { now_ms, .. } => *now_ms,
        }
    }

    /// The command's log encoding (postcard).
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("encoding a command into memory cannot fail")
    }

    /// Decodes a command from its log encoding.
    ///
    /// # Errors
    /// A message saying why the bytes are not a command.
    pub fn decode(bytes: &[u8]) -> Result<Command, String> {
        postcard::from_bytes(bytes).map_err(|error| format!("malformed command: {error}"))
    }
}

/// What applying one command produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Applied {
    /// The revision after the command.
    pub revision: Revision,
    /// The answer, for `Client` and `OpenSession` commands.
    pub response: Option<Response>,
    /// Events fired, in order, all at `revision`.
    pub events: Vec<Event>,
    /// Locks granted to waiting sessions, in grant order.
    pub grants: Vec<LockGrant>,
    /// Sessions that ended (closed or expired), in order.
    pub ended_sessions: Vec<SessionId>,
}

/// The coordination state: namespace, sessions, locks and elections.
///
/// Methods, by role:
/// - construction: [`new`](Self::new) (empty) and
///   [`restore`](Self::restore) (from a snapshot);
/// - getters, which never change the state: [`revision`](Self::revision),
///   [`now_ms`](Self::now_ms), [`node_count`](Self::node_count),
///   [`sessions`](Self::sessions), [`stat`](Self::stat),
///   [`read`](Self::read) (local reads), and for the leader
///   [`next_lock_delay_end_ms`](Self::next_lock_delay_end_ms) and
///   [`session_deadlines_ms`](Self::session_deadlines_ms);
/// - the one input: [`apply`](Self::apply), in log order, whose
///   [`Applied`] output the replica dispatches (see the module docs);
/// - output of the whole state: [`snapshot`](Self::snapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateMachine {
    config: StateConfig,
    revision: Revision,
    now_ms: u64,
    tree: Tree,
    sessions: BTreeMap<SessionId, Session>,
    /// Open sessions per owner: derived from `sessions` (rebuilt on
    /// restore), so that the per-identity bound costs no scan.
    sessions_per_owner: BTreeMap<String, u64>,
    next_session_id: SessionId,
    locks: LockTable,
    cluster_identity: Option<u128>,
    confirmed_members: std::collections::BTreeSet<u64>,
    /// Sessions changed since the last [`StateMachine::take_delta`].
    dirty_sessions: records::DirtyKeys<SessionId>,
}

/// The accumulating output of one command.
struct Output {
    events: Vec<Event>,
    grants: Vec<crate::state::LockGrant>,
    ended_sessions: Vec<SessionId>,
    mutated: bool,
}

impl StateMachine {
    /// An empty state: the root node only, no sessions, revision 0.
    pub fn new(config: StateConfig) -> Self {
        StateMachine {
            config,
            revision: 0,
            now_ms: 0,
            tree: Tree::new(),
            sessions: BTreeMap::new(),
            sessions_per_owner: BTreeMap::new(),
            next_session_id: 1,
            locks: LockTable::new(),
            cluster_identity: None,
            confirmed_members: std::collections::BTreeSet::new(),
            dirty_sessions: records::DirtyKeys::default(),
        }
    }

    /// The cluster's identity, minted by its first leader
    /// ([`Command::MintClusterIdentity`]); `None` until then. It never
    /// changes once set.
    pub fn cluster_identity(&self) -> Option<u128> {
        self.cluster_identity
    }

    /// The members that confirmed they hold the cluster's state
    /// ([`Command::MemberConfirmed`]): a member listed here that presents
    /// an empty database lost its data directory.
    pub fn confirmed_members(&self) -> &std::collections::BTreeSet<u64> {
        &self.confirmed_members
    }

    // Getters.

    /// The limits in force.
    pub fn config(&self) -> &StateConfig {
        &self.config
    }

    /// The revision of the last mutation.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// The latest leader-stamped time seen (time never goes backwards here,
    /// even if a new leader's clock is behind).
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Number of nodes, the root included.
    pub fn node_count(&self) -> u64 {
        self.tree.len()
    }

    /// How many sessions are open.
    pub fn session_count(&self) -> u64 {
        self.sessions.len() as u64
    }

    /// How many locks are held or waited for.
    pub fn lock_count(&self) -> u64 {
        self.locks.parts().0.len() as u64
    }

    /// Sessions queued for a lock (or an election), over all locks.
    pub fn lock_waiter_count(&self) -> u64 {
        self.locks.waiter_count()
    }

    /// Forgets the cluster's identity and which members confirmed it, for
    /// a state restored into a new cluster (which mints its own).
    pub fn forget_cluster_identity(&mut self) {
        self.cluster_identity = None;
        self.confirmed_members.clear();
    }

    /// Open sessions, ascending.
    pub fn sessions(&self) -> Vec<SessionId> {
        self.sessions.keys().copied().collect()
    }

    /// The timeout granted to an open session, or `None` when it is not open.
    pub fn session_timeout_ms(&self, session: SessionId) -> Option<u64> {
        self.sessions.get(&session).map(|s| s.timeout_ms)
    }

    /// Whether `identity`, presenting `secret`, may use an open session:
    /// `Ok(timeout_ms)` when it owns it, `Err` saying why not otherwise
    /// (`SessionExpired` when the session is not open). The secret is
    /// compared in constant time.
    ///
    /// # Errors
    /// [`Error::SessionExpired`], or [`Error::BadArgument`] naming which of
    /// identity and secret did not match.
    pub fn check_session_owner(
        &self,
        session: SessionId,
        identity: &str,
        secret: SessionSecret,
    ) -> Result<u64, Error> {
        let Some(record) = self.sessions.get(&session) else {
            return Err(Error::SessionExpired { session });
        };
        if record.owner != identity {
            return Err(Error::bad_argument(format!(
                "session {session} belongs to another client identity; a client can use only \
                 the sessions its own certificate opened"
            )));
        }
        if (record.secret ^ secret) != 0 {
            return Err(Error::bad_argument(format!(
                "wrong secret for session {session}; resume with the secret the session was \
                 opened with"
            )));
        }
        Ok(record.timeout_ms)
    }

    /// Sessions open for the client identity `owner`.
    pub fn sessions_of_owner(&self, owner: &str) -> u64 {
        self.sessions_per_owner.get(owner).copied().unwrap_or(0)
    }

    /// The earliest end of a running lock-delay: the leader should commit a
    /// [`Command::Tick`] at or after it.
    pub fn next_lock_delay_end_ms(&self) -> Option<u64> {
        self.locks.next_delay_end_ms()
    }

    /// For a new leader: each session's deadline on the leader's own clock,
    /// resumed from the last checkpoint. The time that passed since the
    /// checkpoint (on the old leader's clock, as stamped in the log) is
    /// deducted, then `grace_ms` is added so clients can find the new leader.
    pub fn session_deadlines_ms(&self, local_now_ms: u64, grace_ms: u64) -> Vec<(SessionId, u64)> {
        self.sessions
            .iter()
            .map(|(id, session)| {
                let elapsed_ms = self.now_ms.saturating_sub(session.checkpoint_time_ms);
                let remaining_ms = session.remaining_ms.saturating_sub(elapsed_ms);
                (
                    *id,
                    local_now_ms
                        .saturating_add(remaining_ms)
                        .saturating_add(grace_ms),
                )
            })
            .collect()
    }

    /// Answers a read-only op from local state without going through the
    /// log (a "sequential" read): `GetData`, `Exists`, `GetChildren`,
    /// `GetLeader`, `CheckSequencer` and `Sync`.
    ///
    /// # Errors
    /// The op's own errors, or `BadArgument` for a write.
    pub fn read(&self, op: &Op) -> Result<OpResult, Error> {
        let config = &self.config;
        match op {
            Op::GetData { path } => {
                let node = self.tree.check(config, path, None)?;
                Ok(OpResult::Data {
                    data: node.data().to_vec(),
                    stat: node.stat(),
                })
            }
            Op::Exists { path } => {
                validate_path(path, config.path_bytes_max)?;
                Ok(OpResult::Exists {
                    stat: self.tree.get(path).map(|node| node.stat()),
                })
            }
            Op::GetChildren { path } => {
                let node = self.tree.check(config, path, None)?;
                Ok(OpResult::Children {
                    children: self.tree.children(path),
                    stat: node.stat(),
                })
            }
            Op::GetLeader { path } => {
                validate_path(path, config.path_bytes_max)?;
                Ok(OpResult::Leader {
                    leader: self.locks.leader(path)?,
                })
            }
            Op::CheckSequencer { sequencer } => {
                if self.locks.is_current(sequencer) {
                    Ok(OpResult::SequencerCurrent)
                } else {
                    Err(stale(sequencer))
                }
            }
            Op::Sync => Ok(OpResult::Synced),
            _ => Err(Error::bad_argument(
                "this op is a write; send it through the log, not as a local read",
            )),
        }
    }

    /// Every node in path order with its stat and data: for tests and
    /// diagnostic tools (it copies the whole namespace).
    pub fn dump_nodes(&self) -> Vec<(String, Stat, Vec<u8>)> {
        self.tree
            .nodes()
            .iter()
            .map(|(path, node)| (path.to_string(), node.stat(), node.data().to_vec()))
            .collect()
    }

    /// The stat of the node at `path`, if there is one.
    pub fn stat(&self, path: &str) -> Option<Stat> {
        self.tree.get(path).map(|node| node.stat())
    }

    // Input.

    /// Applies one command from the log and returns what it produced.
    /// Never panics on any command content: bad input is answered with an
    /// error in the response.
    pub fn apply(&mut self, command: &Command) -> Applied {
        self.now_ms = self.now_ms.max(command.now_ms());
        let revision = self.revision + 1;
        let mut out = Output {
            events: Vec::new(),
            grants: Vec::new(),
            ended_sessions: Vec::new(),
            mutated: false,
        };
        {
            let mut fx = self.lock_effects(revision, &mut out);
            self.locks.advance_time(&mut fx);
        }
        let result = match command {
            Command::Client { request, .. } => {
                Some(self.apply_request(request, revision, &mut out))
            }
            Command::OpenSession {
                timeout_ms,
                owner,
                secret,
                ..
            } => Some(self.open_session(*timeout_ms, owner, *secret, &mut out)),
            Command::ExpireSessions { sessions, .. } => {
                let mut sessions = sessions.clone();
                sessions.sort_unstable();
                sessions.dedup();
                for session in sessions {
                    if self.sessions.contains_key(&session) {
                        self.end_session(session, true, revision, &mut out);
                    }
                }
                None
            }
            Command::CheckpointSessions { remaining, .. } => {
                for entry in remaining {
                    if let Some(session) = self.sessions.get_mut(&entry.session) {
                        self.dirty_sessions.mark(entry.session);
                        session.remaining_ms = entry.remaining_ms.min(session.timeout_ms);
                        session.checkpoint_time_ms = self.now_ms;
                        out.mutated = true;
                    }
                }
                None
            }
            Command::Tick { .. } => None,
            // Identity commands change no node, so they take no revision:
            // revisions stay what clients see of the namespace.
            Command::MintClusterIdentity { identity, .. } => {
                if self.cluster_identity.is_none() {
                    self.cluster_identity = Some(*identity);
                }
                None
            }
            Command::MemberConfirmed { node, .. } => {
                if self.cluster_identity.is_some() {
                    self.confirmed_members.insert(*node);
                }
                None
            }
        };
        if out.mutated {
            self.revision = revision;
        }
        let response = result.map(|result| Response {
            revision: self.revision,
            result,
        });
        if let (Command::Client { request, .. }, Some(response)) = (command, &response) {
            if let Some(session) = self.sessions.get_mut(&request.session) {
                if request.sequence > session.last_sequence {
                    self.dirty_sessions.mark(request.session);
                    session.last_sequence = request.sequence;
                    session.last_response = Some(response.clone());
                }
            }
        }
        Applied {
            revision: self.revision,
            response,
            events: out.events,
            grants: out.grants,
            ended_sessions: out.ended_sessions,
        }
    }

    /// Applies a client request, or replays its recorded result.
    fn apply_request(
        &mut self,
        request: &Request,
        revision: Revision,
        out: &mut Output,
    ) -> Result<OpResult, Error> {
        let session_id = request.session;
        let Some(session) = self.sessions.get(&session_id) else {
            return Err(Error::SessionExpired {
                session: session_id,
            });
        };
        if request.sequence <= session.last_sequence {
            if request.sequence == session.last_sequence {
                if let Some(response) = &session.last_response {
                    // A retry: the original result, not a second application.
                    return response.result.clone();
                }
            }
            return Err(Error::StaleRequestSequence {
                session: session_id,
                sequence: request.sequence,
                last_sequence: session.last_sequence,
            });
        }
        self.execute(session_id, &request.op, revision, out)
    }

    fn execute(
        &mut self,
        session: SessionId,
        op: &Op,
        revision: Revision,
        out: &mut Output,
    ) -> Result<OpResult, Error> {
        let config = &self.config;
        match op {
            Op::Create { path, data, mode } => {
                let mut fx = Effects {
                    revision,
                    now_ms: self.now_ms,
                    events: &mut out.events,
                    undo: None,
                };
                let path = self
                    .tree
                    .create(config, path, data, *mode, session, &mut fx)?;
                out.mutated = true;
                let stat = self
                    .tree
                    .get(&path)
                    .map(|node| node.stat())
                    .unwrap_or_default();
                Ok(OpResult::Created { path, stat })
            }
            Op::Delete {
                path,
                expected_version,
            } => {
                let mut fx = Effects {
                    revision,
                    now_ms: self.now_ms,
                    events: &mut out.events,
                    undo: None,
                };
                self.tree.delete(config, path, *expected_version, &mut fx)?;
                out.mutated = true;
                Ok(OpResult::Deleted)
            }
            Op::SetData {
                path,
                data,
                expected_version,
            } => {
                let mut fx = Effects {
                    revision,
                    now_ms: self.now_ms,
                    events: &mut out.events,
                    undo: None,
                };
                let stat = self
                    .tree
                    .set(config, path, data, *expected_version, &mut fx)?;
                out.mutated = true;
                Ok(OpResult::DataSet { stat })
            }
            Op::Multi { ops } => self.execute_multi(session, ops, revision, out),
            Op::CloseSession => {
                self.end_session(session, false, revision, out);
                Ok(OpResult::SessionClosed)
            }
            Op::AcquireLock {
                path,
                mode,
                wait,
                lock_delay_ms,
            } => {
                validate_path(path, config.path_bytes_max)?;
                let lock_delay_ms = (*lock_delay_ms).min(config.lock_delay_max_ms);
                let mut fx = self.lock_effects(revision, out);
                let acquired = self.locks.acquire(
                    session,
                    path,
                    LockKind::Lock,
                    *mode,
                    *wait,
                    lock_delay_ms,
                    &[],
                    &mut fx,
                )?;
                Ok(match acquired {
                    Acquired::Granted(sequencer) => OpResult::LockAcquired { sequencer },
                    Acquired::Queued { waiters_ahead } => OpResult::LockQueued { waiters_ahead },
                })
            }
            Op::ReleaseLock { path } => {
                validate_path(path, config.path_bytes_max)?;
                let mut fx = self.lock_effects(revision, out);
                self.locks.release(session, path, LockKind::Lock, &mut fx)?;
                Ok(OpResult::LockReleased)
            }
            Op::Campaign { path, value } => {
                validate_path(path, config.path_bytes_max)?;
                if value.len() as u64 > config.data_bytes_max {
                    return Err(Error::DataTooLarge {
                        size_bytes: value.len() as u64,
                        max_bytes: config.data_bytes_max,
                    });
                }
                let mut fx = self.lock_effects(revision, out);
                let acquired = self.locks.acquire(
                    session,
                    path,
                    LockKind::Election,
                    LockMode::Exclusive,
                    true,
                    0,
                    value,
                    &mut fx,
                )?;
                Ok(match acquired {
                    Acquired::Granted(sequencer) => OpResult::Elected { sequencer },
                    Acquired::Queued { waiters_ahead } => OpResult::CampaignQueued {
                        candidates_ahead: waiters_ahead,
                    },
                })
            }
            Op::Resign { path } => {
                validate_path(path, config.path_bytes_max)?;
                let mut fx = self.lock_effects(revision, out);
                self.locks
                    .release(session, path, LockKind::Election, &mut fx)?;
                Ok(OpResult::Resigned)
            }
            Op::GetData { .. }
            | Op::Exists { .. }
            | Op::GetChildren { .. }
            | Op::GetLeader { .. }
            | Op::CheckSequencer { .. }
            | Op::Sync => self.read(op),
        }
    }

    /// Applies a multi: every op in order; on the first failure, undoes the
    /// earlier ones and names the failed op.
    fn execute_multi(
        &mut self,
        session: SessionId,
        ops: &[MultiOp],
        revision: Revision,
        out: &mut Output,
    ) -> Result<OpResult, Error> {
        if ops.len() as u64 > self.config.multi_ops_max {
            return Err(Error::bad_argument(format!(
                "a multi of {} ops exceeds the limit of {}; split it",
                ops.len(),
                self.config.multi_ops_max
            )));
        }
        let mut undo: Vec<Undo> = Vec::new();
        let mut events: Vec<Event> = Vec::new();
        let mut results = Vec::with_capacity(ops.len());
        let mut wrote = false;
        for (index, op) in ops.iter().enumerate() {
            let mut fx = Effects {
                revision,
                now_ms: self.now_ms,
                events: &mut events,
                undo: Some(&mut undo),
            };
            let config = &self.config;
            let result = match op {
                MultiOp::Check {
                    path,
                    expected_version,
                } => self
                    .tree
                    .check(config, path, *expected_version)
                    .map(|_| MultiResult::Checked),
                MultiOp::CheckSequencer { sequencer } => {
                    if self.locks.is_current(sequencer) {
                        Ok(MultiResult::Checked)
                    } else {
                        Err(stale(sequencer))
                    }
                }
                MultiOp::Create { path, data, mode } => self
                    .tree
                    .create(config, path, data, *mode, session, &mut fx)
                    .map(|path| MultiResult::Created { path }),
                MultiOp::Delete {
                    path,
                    expected_version,
                } => self
                    .tree
                    .delete(config, path, *expected_version, &mut fx)
                    .map(|()| MultiResult::Deleted),
                MultiOp::SetData {
                    path,
                    data,
                    expected_version,
                } => self
                    .tree
                    .set(config, path, data, *expected_version, &mut fx)
                    .map(|stat| MultiResult::DataSet { stat }),
            };
            match result {
                Ok(result) => {
                    wrote |= !matches!(result, MultiResult::Checked);
                    results.push(result);
                }
                Err(cause) => {
                    self.tree.rollback(undo);
                    return Err(Error::MultiOpFailed {
                        index: index as u64,
                        cause: Box::new(cause),
                    });
                }
            }
        }
        out.events.append(&mut events);
        out.mutated |= wrote;
        Ok(OpResult::Multi { results })
    }

    /// Ends a session atomically: deletes its ephemeral nodes (in path
    /// order), releases its locks and cancels its waits.
    fn open_session(
        &mut self,
        timeout_ms: u64,
        owner: &str,
        secret: SessionSecret,
        out: &mut Output,
    ) -> Result<OpResult, Error> {
        let max = self.config.sessions_per_identity_max;
        if self.sessions_of_owner(owner) >= max {
            return Err(Error::limit_exceeded(
                "sessions_per_identity_max",
                max,
                format!(
                    "client identity {owner:?} already has {max} open sessions; close some, \
                     or let idle ones expire"
                ),
            ));
        }
        let session = self.next_session_id;
        self.next_session_id += 1;
        let timeout_ms = self.config.clamp_session_timeout_ms(timeout_ms);
        self.sessions.insert(
            session,
            Session {
                timeout_ms,
                remaining_ms: timeout_ms,
                checkpoint_time_ms: self.now_ms,
                last_sequence: 0,
                last_response: None,
                owner: owner.to_owned(),
                secret,
            },
        );
        *self.sessions_per_owner.entry(owner.to_owned()).or_insert(0) += 1;
        self.dirty_sessions.mark(session);
        out.mutated = true;
        Ok(OpResult::SessionOpened {
            session,
            timeout_ms,
        })
    }

    fn end_session(
        &mut self,
        session: SessionId,
        expired: bool,
        revision: Revision,
        out: &mut Output,
    ) {
        self.dirty_sessions.mark(session);
        if let Some(record) = self.sessions.remove(&session) {
            if let Some(count) = self.sessions_per_owner.get_mut(&record.owner) {
                *count -= 1;
                if *count == 0 {
                    self.sessions_per_owner.remove(&record.owner);
                }
            }
        }
        out.mutated = true;
        out.ended_sessions.push(session);
        let mut fx = Effects {
            revision,
            now_ms: self.now_ms,
            events: &mut out.events,
            undo: None,
        };
        for path in self.tree.ephemerals_of(session) {
            self.tree.remove_node(&path, &mut fx);
        }
        let mut fx = self.lock_effects(revision, out);
        self.locks.end_session(session, expired, &mut fx);
    }

    fn lock_effects<'a>(&self, revision: Revision, out: &'a mut Output) -> LockEffects<'a> {
        LockEffects {
            revision,
            now_ms: self.now_ms,
            events: &mut out.events,
            grants: &mut out.grants,
            mutated: &mut out.mutated,
        }
    }
}

fn stale(sequencer: &synod_proto::Sequencer) -> Error {
    Error::StaleSequencer {
        path: sequencer.path.clone(),
        mode: sequencer.mode,
        generation: sequencer.generation,
    }
}
