//! Property test: random sequences of commands (sessions opening, expiring
//! and checkpointing, node writes and reads, `multi`, locks with lock-delays,
//! elections, retried and stale requests, a leader clock that sometimes runs
//! behind) are applied to the state machine and to `Model`, a deliberately
//! simple reference (vectors, linear scans, whole-copy rollback for `multi`,
//! child counts recomputed by scanning). Every response, fired event, lock
//! grant and ended session must be equal, and so must the final namespace
//! and session deadlines. The same run also checks that a twin applying the
//! same commands ends with byte-identical snapshots, and that snapshotting,
//! restoring and continuing gives the same outputs as continuing.
//!
//! The default suite runs 10,000 cases. A soak runs more:
//! `SYNOD_PROPTEST_CASES=200000 cargo test -p synod-server --release --test model_check`.

use proptest::prelude::*;
use proptest::sample::select;
use synod_proto::{
    CreateMode, Error, Event, EventType, LeaderInfo, LockMode, MultiOp, MultiResult, Op, OpResult,
    Request, Response, Sequencer, SessionId, Stat,
};
use synod_server::state::path::{parent, validate_path};
use synod_server::state::records::StateLoader;
use synod_server::state::{
    Applied, Command, LockGrant, SessionRemaining, StateConfig, StateMachine,
};
use synod_server::storage::{StateRecordRef, StateTable};

// ---------------------------------------------------------------------------
// The reference model.

#[derive(Debug, Clone)]
struct ModelNode {
    path: String,
    data: Vec<u8>,
    created_revision: u64,
    modified_revision: u64,
    created_time_ms: u64,
    modified_time_ms: u64,
    version: u64,
    child_version: u64,
    ephemeral_owner: u64,
    child_modified_revision: u64,
}

#[derive(Debug, Clone)]
struct ModelSession {
    id: SessionId,
    timeout_ms: u64,
    remaining_ms: u64,
    checkpoint_time_ms: u64,
    last_sequence: u64,
    last_result: Option<Result<OpResult, Error>>,
    owner: String,
}

#[derive(Debug, Clone)]
struct ModelHolder {
    session: SessionId,
    mode: LockMode,
    generation: u64,
    lock_delay_ms: u64,
    value: Vec<u8>,
}

#[derive(Debug, Clone)]
struct ModelLock {
    path: String,
    election: bool,
    holders: Vec<ModelHolder>,
    /// Waiters in arrival order (generation unused).
    waiters: Vec<ModelHolder>,
    delayed_until_ms: u64,
}

#[derive(Debug, Clone)]
struct Model {
    config: StateConfig,
    revision: u64,
    now_ms: u64,
    nodes: Vec<ModelNode>,
    sessions: Vec<ModelSession>,
    next_session_id: u64,
    locks: Vec<ModelLock>,
    next_generation: u64,
}

/// Output of one command, being built.
struct Out {
    revision: u64,
    events: Vec<Event>,
    grants: Vec<LockGrant>,
    ended: Vec<SessionId>,
    mutated: bool,
}

impl Out {
    fn event(&mut self, path: &str, event_type: EventType) {
        self.events.push(Event {
            path: path.into(),
            event_type,
            revision: self.revision,
        });
    }
}

impl Model {
    fn new(config: StateConfig) -> Self {
        Model {
            config,
            revision: 0,
            now_ms: 0,
            nodes: vec![ModelNode {
                path: "/".into(),
                data: vec![],
                created_revision: 0,
                modified_revision: 0,
                created_time_ms: 0,
                modified_time_ms: 0,
                version: 0,
                child_version: 0,
                ephemeral_owner: 0,
                child_modified_revision: 0,
            }],
            sessions: vec![],
            next_session_id: 1,
            locks: vec![],
            next_generation: 1,
        }
    }

    fn node(&self, path: &str) -> Option<&ModelNode> {
        self.nodes.iter().find(|n| n.path == path)
    }

    fn node_mut(&mut self, path: &str) -> Option<&mut ModelNode> {
        self.nodes.iter_mut().find(|n| n.path == path)
    }

    fn children_of(&self, path: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| parent(&n.path) == Some(path))
            .map(|n| n.path.rsplit('/').next().unwrap_or("").to_string())
            .collect();
        names.sort();
        names
    }

    fn stat(&self, node: &ModelNode) -> Stat {
        Stat {
            created_revision: node.created_revision,
            modified_revision: node.modified_revision,
            created_time_ms: node.created_time_ms,
            modified_time_ms: node.modified_time_ms,
            version: node.version,
            child_version: node.child_version,
            ephemeral_owner: node.ephemeral_owner,
            data_length: node.data.len() as u64,
            children_count: self.children_of(&node.path).len() as u64,
            child_modified_revision: node.child_modified_revision,
        }
    }

    fn session(&self, id: SessionId) -> Option<&ModelSession> {
        self.sessions.iter().find(|s| s.id == id)
    }

    fn lock_index(&self, path: &str) -> Option<usize> {
        self.locks.iter().position(|l| l.path == path)
    }

    fn apply(&mut self, command: &Command) -> Applied {
        self.now_ms = self.now_ms.max(command.now_ms());
        let mut out = Out {
            revision: self.revision + 1,
            events: vec![],
            grants: vec![],
            ended: vec![],
            mutated: false,
        };
        self.advance_time(&mut out);
        let result = match command {
            Command::Client { request, .. } => Some(self.request(request, &mut out)),
            Command::OpenSession {
                owner, timeout_ms, ..
            } => {
                let max = self.config.sessions_per_identity_max;
                if self.sessions.iter().filter(|s| &s.owner == owner).count() as u64 >= max {
                    Some(Err(Error::limit_exceeded(
                        "sessions_per_identity_max",
                        max,
                        format!(
                            "client identity {owner:?} already has {max} open sessions; \
                             close some, or let idle ones expire"
                        ),
                    )))
                } else {
                    let id = self.next_session_id;
                    self.next_session_id += 1;
                    let timeout_ms = (*timeout_ms)
                        .max(self.config.session_timeout_min_ms)
                        .min(self.config.session_timeout_max_ms);
                    self.sessions.push(ModelSession {
                        id,
                        timeout_ms,
                        remaining_ms: timeout_ms,
                        checkpoint_time_ms: self.now_ms,
                        last_sequence: 0,
                        last_result: None,
                        owner: owner.clone(),
                    });
                    out.mutated = true;
                    Some(Ok(OpResult::SessionOpened {
                        session: id,
                        timeout_ms,
                    }))
                }
            }
            Command::ExpireSessions { sessions, .. } => {
                let mut sorted = sessions.clone();
                sorted.sort();
                sorted.dedup();
                for id in sorted {
                    if self.session(id).is_some() {
                        self.end_session(id, true, &mut out);
                    }
                }
                None
            }
            Command::CheckpointSessions { remaining, .. } => {
                for entry in remaining {
                    let now_ms = self.now_ms;
                    if let Some(s) = self.sessions.iter_mut().find(|s| s.id == entry.session) {
                        s.remaining_ms = entry.remaining_ms.min(s.timeout_ms);
                        s.checkpoint_time_ms = now_ms;
                        out.mutated = true;
                    }
                }
                None
            }
            // The cluster identity is not part of the namespace the model
            // describes; the state machine's tests check it.
            Command::Tick { .. }
            | Command::MintClusterIdentity { .. }
            | Command::MemberConfirmed { .. } => None,
        };
        if out.mutated {
            self.revision += 1;
        }
        if let (Command::Client { request, .. }, Some(result)) = (command, &result) {
            if let Some(s) = self.sessions.iter_mut().find(|s| s.id == request.session) {
                if request.sequence > s.last_sequence {
                    s.last_sequence = request.sequence;
                    s.last_result = Some(result.clone());
                }
            }
        }
        Applied {
            revision: self.revision,
            response: result.map(|result| Response {
                revision: self.revision,
                result,
            }),
            events: out.events,
            grants: out.grants,
            ended_sessions: out.ended,
        }
    }

    fn request(&mut self, request: &Request, out: &mut Out) -> Result<OpResult, Error> {
        let Some(session) = self.session(request.session) else {
            return Err(Error::SessionExpired {
                session: request.session,
            });
        };
        if request.sequence <= session.last_sequence {
            if request.sequence == session.last_sequence {
                if let Some(result) = &session.last_result {
                    return result.clone();
                }
            }
            return Err(Error::StaleRequestSequence {
                session: request.session,
                sequence: request.sequence,
                last_sequence: session.last_sequence,
            });
        }
        self.op(request.session, &request.op, out)
    }

    fn op(&mut self, session: SessionId, op: &Op, out: &mut Out) -> Result<OpResult, Error> {
        match op {
            Op::Create { path, data, mode } => {
                let path = self.create(session, path, data, *mode, out)?;
                out.mutated = true;
                let stat = self.node(&path).map(|n| self.stat(n)).unwrap_or_default();
                Ok(OpResult::Created { path, stat })
            }
            Op::Delete {
                path,
                expected_version,
            } => {
                self.delete(path, *expected_version, out)?;
                out.mutated = true;
                Ok(OpResult::Deleted)
            }
            Op::SetData {
                path,
                data,
                expected_version,
            } => {
                let stat = self.set(path, data, *expected_version, out)?;
                out.mutated = true;
                Ok(OpResult::DataSet { stat })
            }
            Op::GetData { path } => {
                let node = self.check(path, None)?;
                Ok(OpResult::Data {
                    data: node.data.clone(),
                    stat: self.stat(node),
                })
            }
            Op::Exists { path } => {
                validate_path(path, self.config.path_bytes_max)?;
                Ok(OpResult::Exists {
                    stat: self.node(path).map(|n| self.stat(n)),
                })
            }
            Op::GetChildren { path } => {
                let node = self.check(path, None)?;
                Ok(OpResult::Children {
                    children: self.children_of(path),
                    stat: self.stat(node),
                })
            }
            Op::Multi { ops } => self.multi(session, ops, out),
            Op::Sync => Ok(OpResult::Synced),
            Op::CloseSession => {
                self.end_session(session, false, out);
                Ok(OpResult::SessionClosed)
            }
            Op::AcquireLock {
                path,
                mode,
                wait,
                lock_delay_ms,
            } => {
                validate_path(path, self.config.path_bytes_max)?;
                let delay = (*lock_delay_ms).min(self.config.lock_delay_max_ms);
                match self.acquire(session, path, false, *mode, *wait, delay, &[], out)? {
                    Ok(sequencer) => Ok(OpResult::LockAcquired { sequencer }),
                    Err(waiters_ahead) => Ok(OpResult::LockQueued { waiters_ahead }),
                }
            }
            Op::ReleaseLock { path } => {
                validate_path(path, self.config.path_bytes_max)?;
                self.release(session, path, false, out)?;
                Ok(OpResult::LockReleased)
            }
            Op::CheckSequencer { sequencer } => {
                if self.is_current(sequencer) {
                    Ok(OpResult::SequencerCurrent)
                } else {
                    Err(stale(sequencer))
                }
            }
            Op::Campaign { path, value } => {
                validate_path(path, self.config.path_bytes_max)?;
                if value.len() as u64 > self.config.data_bytes_max {
                    return Err(Error::DataTooLarge {
                        size_bytes: value.len() as u64,
                        max_bytes: self.config.data_bytes_max,
                    });
                }
                match self.acquire(
                    session,
                    path,
                    true,
                    LockMode::Exclusive,
                    true,
                    0,
                    value,
                    out,
                )? {
                    Ok(sequencer) => Ok(OpResult::Elected { sequencer }),
                    Err(ahead) => Ok(OpResult::CampaignQueued {
                        candidates_ahead: ahead,
                    }),
                }
            }
            Op::Resign { path } => {
                validate_path(path, self.config.path_bytes_max)?;
                self.release(session, path, true, out)?;
                Ok(OpResult::Resigned)
            }
            Op::GetLeader { path } => {
                validate_path(path, self.config.path_bytes_max)?;
                let Some(index) = self.lock_index(path) else {
                    return Ok(OpResult::Leader { leader: None });
                };
                let lock = &self.locks[index];
                if !lock.election {
                    return Err(Error::bad_argument(""));
                }
                Ok(OpResult::Leader {
                    leader: lock.holders.first().map(|h| LeaderInfo {
                        session: h.session,
                        value: h.value.clone(),
                        sequencer: Sequencer {
                            path: path.clone(),
                            mode: h.mode,
                            generation: h.generation,
                        },
                    }),
                })
            }
        }
    }

    fn check(&self, path: &str, expected_version: Option<u64>) -> Result<&ModelNode, Error> {
        validate_path(path, self.config.path_bytes_max)?;
        let node = self.node(path).ok_or(Error::NoNode { path: path.into() })?;
        if let Some(expected) = expected_version {
            if expected != node.version {
                return Err(Error::BadVersion {
                    path: path.into(),
                    expected_version: expected,
                    actual_version: node.version,
                });
            }
        }
        Ok(node)
    }

    fn check_data(&self, data: &[u8]) -> Result<(), Error> {
        if data.len() as u64 > self.config.data_bytes_max {
            return Err(Error::DataTooLarge {
                size_bytes: data.len() as u64,
                max_bytes: self.config.data_bytes_max,
            });
        }
        Ok(())
    }

    fn create(
        &mut self,
        session: SessionId,
        path: &str,
        data: &[u8],
        mode: CreateMode,
        out: &mut Out,
    ) -> Result<String, Error> {
        let max = self.config.path_bytes_max;
        let parent_path = if mode.is_sequential() {
            if !path.starts_with('/') {
                validate_path(path, max)?;
            }
            let parent_path = match path.rfind('/') {
                Some(0) | None => "/".to_string(),
                Some(end) => path[..end].to_string(),
            };
            validate_path(&parent_path, max)?;
            parent_path
        } else {
            validate_path(path, max)?;
            if path == "/" {
                return Err(Error::NodeExists { path: path.into() });
            }
            parent(path).unwrap_or("/").to_string()
        };
        self.check_data(data)?;
        let Some(parent_node) = self.node(&parent_path) else {
            return Err(Error::NoNode { path: parent_path });
        };
        if parent_node.ephemeral_owner != 0 {
            return Err(Error::NoChildrenForEphemerals { path: parent_path });
        }
        let full = if mode.is_sequential() {
            let full = format!("{path}{:010}", parent_node.child_version);
            validate_path(&full, max)?;
            full
        } else {
            path.to_string()
        };
        if self.node(&full).is_some() {
            return Err(Error::NodeExists { path: full });
        }
        let (revision, now_ms) = (out.revision, self.now_ms);
        self.nodes.push(ModelNode {
            path: full.clone(),
            data: data.to_vec(),
            created_revision: revision,
            modified_revision: revision,
            created_time_ms: now_ms,
            modified_time_ms: now_ms,
            version: 0,
            child_version: 0,
            ephemeral_owner: if mode.is_ephemeral() { session } else { 0 },
            child_modified_revision: revision,
        });
        if let Some(p) = self.node_mut(&parent_path) {
            p.child_version += 1;
            p.child_modified_revision = revision;
        }
        out.event(&full, EventType::NodeCreated);
        out.event(&parent_path, EventType::NodeChildrenChanged);
        Ok(full)
    }

    fn delete(
        &mut self,
        path: &str,
        expected_version: Option<u64>,
        out: &mut Out,
    ) -> Result<(), Error> {
        validate_path(path, self.config.path_bytes_max)?;
        if path == "/" {
            return Err(Error::bad_argument(""));
        }
        self.check(path, expected_version)?;
        if !self.children_of(path).is_empty() {
            return Err(Error::NotEmpty { path: path.into() });
        }
        self.remove(path, out);
        Ok(())
    }

    fn remove(&mut self, path: &str, out: &mut Out) {
        self.nodes.retain(|n| n.path != path);
        let parent_path = parent(path).unwrap_or("/").to_string();
        let revision = out.revision;
        if let Some(p) = self.node_mut(&parent_path) {
            p.child_version += 1;
            p.child_modified_revision = revision;
        }
        out.event(path, EventType::NodeDeleted);
        out.event(&parent_path, EventType::NodeChildrenChanged);
    }

    fn set(
        &mut self,
        path: &str,
        data: &[u8],
        expected_version: Option<u64>,
        out: &mut Out,
    ) -> Result<Stat, Error> {
        validate_path(path, self.config.path_bytes_max)?;
        self.check_data(data)?;
        self.check(path, expected_version)?;
        let (revision, now_ms) = (out.revision, self.now_ms);
        let node = self
            .node_mut(path)
            .ok_or(Error::NoNode { path: path.into() })?;
        node.data = data.to_vec();
        node.version += 1;
        node.modified_revision = revision;
        node.modified_time_ms = now_ms;
        out.event(path, EventType::NodeDataChanged);
        let node = self.node(path).ok_or(Error::NoNode { path: path.into() })?;
        Ok(self.stat(node))
    }

    fn multi(
        &mut self,
        session: SessionId,
        ops: &[MultiOp],
        out: &mut Out,
    ) -> Result<OpResult, Error> {
        if ops.len() as u64 > self.config.multi_ops_max {
            return Err(Error::bad_argument(""));
        }
        // Rollback by keeping a copy of the whole namespace.
        let saved_nodes = self.nodes.clone();
        let mut scratch = Out {
            revision: out.revision,
            events: vec![],
            grants: vec![],
            ended: vec![],
            mutated: false,
        };
        let mut results = vec![];
        for (index, op) in ops.iter().enumerate() {
            let result = match op {
                MultiOp::Check {
                    path,
                    expected_version,
                } => self
                    .check(path, *expected_version)
                    .map(|_| MultiResult::Checked),
                MultiOp::CheckSequencer { sequencer } => {
                    if self.is_current(sequencer) {
                        Ok(MultiResult::Checked)
                    } else {
                        Err(stale(sequencer))
                    }
                }
                MultiOp::Create { path, data, mode } => self
                    .create(session, path, data, *mode, &mut scratch)
                    .map(|path| MultiResult::Created { path }),
                MultiOp::Delete {
                    path,
                    expected_version,
                } => self
                    .delete(path, *expected_version, &mut scratch)
                    .map(|()| MultiResult::Deleted),
                MultiOp::SetData {
                    path,
                    data,
                    expected_version,
                } => self
                    .set(path, data, *expected_version, &mut scratch)
                    .map(|stat| MultiResult::DataSet { stat }),
            };
            match result {
                Ok(result) => results.push(result),
                Err(cause) => {
                    self.nodes = saved_nodes;
                    return Err(Error::MultiOpFailed {
                        index: index as u64,
                        cause: Box::new(cause),
                    });
                }
            }
        }
        if results.iter().any(|r| *r != MultiResult::Checked) {
            out.mutated = true;
        }
        out.events.extend(scratch.events);
        Ok(OpResult::Multi { results })
    }

    fn end_session(&mut self, session: SessionId, expired: bool, out: &mut Out) {
        self.sessions.retain(|s| s.id != session);
        out.mutated = true;
        out.ended.push(session);
        let mut ephemerals: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.ephemeral_owner == session)
            .map(|n| n.path.clone())
            .collect();
        ephemerals.sort();
        for path in ephemerals {
            self.remove(&path, out);
        }
        let mut paths: Vec<String> = self
            .locks
            .iter()
            .filter(|l| {
                l.holders.iter().any(|h| h.session == session)
                    || l.waiters.iter().any(|w| w.session == session)
            })
            .map(|l| l.path.clone())
            .collect();
        paths.sort();
        let now_ms = self.now_ms;
        for path in paths {
            let Some(index) = self.lock_index(&path) else {
                continue;
            };
            let lock = &mut self.locks[index];
            let before = leader(lock);
            if let Some(h) = lock.holders.iter().position(|h| h.session == session) {
                let holder = lock.holders.remove(h);
                if expired && holder.lock_delay_ms > 0 {
                    lock.delayed_until_ms =
                        lock.delayed_until_ms.max(now_ms + holder.lock_delay_ms);
                }
            }
            lock.waiters.retain(|w| w.session != session);
            self.serve(&path, before, out);
        }
    }

    fn advance_time(&mut self, out: &mut Out) {
        loop {
            let now_ms = self.now_ms;
            let due = self
                .locks
                .iter()
                .filter(|l| l.delayed_until_ms != 0 && l.delayed_until_ms <= now_ms)
                .map(|l| (l.delayed_until_ms, l.path.clone()))
                .min();
            let Some((_, path)) = due else {
                return;
            };
            out.mutated = true;
            let Some(index) = self.lock_index(&path) else {
                return;
            };
            self.locks[index].delayed_until_ms = 0;
            let before = leader(&self.locks[index]);
            self.serve(&path, before, out);
        }
    }

    fn serve(&mut self, path: &str, before: Option<(SessionId, u64)>, out: &mut Out) {
        let Some(index) = self.lock_index(path) else {
            return;
        };
        let now_ms = self.now_ms;
        let lock = &mut self.locks[index];
        if lock.delayed_until_ms <= now_ms {
            while !lock.waiters.is_empty() && compatible(&lock.holders, lock.waiters[0].mode) {
                let mut waiter = lock.waiters.remove(0);
                waiter.generation = self.next_generation;
                self.next_generation += 1;
                out.grants.push(LockGrant {
                    session: waiter.session,
                    sequencer: Sequencer {
                        path: path.into(),
                        mode: waiter.mode,
                        generation: waiter.generation,
                    },
                    election: lock.election,
                });
                lock.holders.push(waiter);
            }
        }
        if lock.election && leader(lock) != before {
            out.event(path, EventType::LeaderChanged);
        }
        if lock.holders.is_empty() && lock.waiters.is_empty() && lock.delayed_until_ms <= now_ms {
            self.locks.remove(index);
        }
    }

    /// `Ok(Ok(token))` when granted, `Ok(Err(ahead))` when queued.
    #[allow(clippy::too_many_arguments)]
    fn acquire(
        &mut self,
        session: SessionId,
        path: &str,
        election: bool,
        mode: LockMode,
        wait: bool,
        lock_delay_ms: u64,
        value: &[u8],
        out: &mut Out,
    ) -> Result<Result<Sequencer, u64>, Error> {
        let now_ms = self.now_ms;
        let index = match self.lock_index(path) {
            Some(index) => index,
            None => {
                self.locks.push(ModelLock {
                    path: path.into(),
                    election,
                    holders: vec![],
                    waiters: vec![],
                    delayed_until_ms: 0,
                });
                self.locks.len() - 1
            }
        };
        let lock = &mut self.locks[index];
        if lock.election != election {
            return Err(Error::bad_argument(""));
        }
        if lock
            .holders
            .iter()
            .chain(&lock.waiters)
            .any(|h| h.session == session)
        {
            return Err(Error::LockAlreadyRequested { path: path.into() });
        }
        let grantable = lock.waiters.is_empty()
            && lock.delayed_until_ms <= now_ms
            && compatible(&lock.holders, mode);
        out.mutated |= grantable || wait;
        let entry = ModelHolder {
            session,
            mode,
            generation: 0,
            lock_delay_ms,
            value: value.to_vec(),
        };
        if grantable {
            let generation = self.next_generation;
            self.next_generation += 1;
            lock.holders.push(ModelHolder {
                generation,
                ..entry
            });
            if election {
                out.event(path, EventType::LeaderChanged);
            }
            Ok(Ok(Sequencer {
                path: path.into(),
                mode,
                generation,
            }))
        } else if wait {
            lock.waiters.push(entry);
            Ok(Err(lock.waiters.len() as u64 - 1))
        } else {
            Err(Error::LockBusy { path: path.into() })
        }
    }

    fn release(
        &mut self,
        session: SessionId,
        path: &str,
        election: bool,
        out: &mut Out,
    ) -> Result<(), Error> {
        let Some(index) = self.lock_index(path) else {
            return Err(Error::LockNotHeld { path: path.into() });
        };
        let lock = &mut self.locks[index];
        if lock.election != election {
            return Err(Error::bad_argument(""));
        }
        let before = leader(lock);
        if let Some(h) = lock.holders.iter().position(|h| h.session == session) {
            lock.holders.remove(h);
        } else if let Some(w) = lock.waiters.iter().position(|w| w.session == session) {
            lock.waiters.remove(w);
        } else {
            return Err(Error::LockNotHeld { path: path.into() });
        }
        out.mutated = true;
        self.serve(path, before, out);
        Ok(())
    }

    fn is_current(&self, sequencer: &Sequencer) -> bool {
        self.locks.iter().any(|l| {
            l.path == sequencer.path
                && l.holders
                    .iter()
                    .any(|h| h.generation == sequencer.generation && h.mode == sequencer.mode)
        })
    }

    fn dump_nodes(&self) -> Vec<(String, Stat, Vec<u8>)> {
        let mut nodes: Vec<_> = self
            .nodes
            .iter()
            .map(|n| (n.path.clone(), self.stat(n), n.data.clone()))
            .collect();
        nodes.sort_by(|a, b| a.0.cmp(&b.0));
        nodes
    }

    fn next_lock_delay_end_ms(&self) -> Option<u64> {
        self.locks
            .iter()
            .filter(|l| l.delayed_until_ms != 0)
            .map(|l| l.delayed_until_ms)
            .min()
    }

    fn lock_waiter_count(&self) -> u64 {
        self.locks.iter().map(|l| l.waiters.len() as u64).sum()
    }

    fn session_deadlines_ms(&self, local_now_ms: u64, grace_ms: u64) -> Vec<(SessionId, u64)> {
        let mut deadlines: Vec<_> = self
            .sessions
            .iter()
            .map(|s| {
                let elapsed = self.now_ms.saturating_sub(s.checkpoint_time_ms);
                (
                    s.id,
                    local_now_ms + s.remaining_ms.saturating_sub(elapsed) + grace_ms,
                )
            })
            .collect();
        deadlines.sort();
        deadlines
    }
}

fn leader(lock: &ModelLock) -> Option<(SessionId, u64)> {
    lock.holders.first().map(|h| (h.session, h.generation))
}

fn compatible(holders: &[ModelHolder], mode: LockMode) -> bool {
    holders.is_empty()
        || (mode == LockMode::Shared && holders.iter().all(|h| h.mode == LockMode::Shared))
}

fn stale(sequencer: &Sequencer) -> Error {
    Error::StaleSequencer {
        path: sequencer.path.clone(),
        mode: sequencer.mode,
        generation: sequencer.generation,
    }
}

// ---------------------------------------------------------------------------
// Random commands.

#[derive(Debug, Clone, Copy)]
enum SequenceChoice {
    Next,
    Repeat,
    Stale,
}

#[derive(Debug, Clone)]
enum Step {
    Open {
        timeout_ms: u64,
    },
    Client {
        session: SessionId,
        sequence: SequenceChoice,
        op: Op,
    },
    Expire {
        sessions: Vec<SessionId>,
    },
    Checkpoint {
        entries: Vec<(SessionId, u64)>,
    },
    Tick,
}

const NODE_PATHS: &[&str] = &[
    "/a", "/a", "/a", "/b", "/b", "/a/x", "/a/y", "/b/x", "/a/x/z", "/a/", "/a/x-", "/a-", "/b/x/",
];
const BAD_PATHS: &[&str] = &["/", "a", "/a//x", "/a/..", "/a/\u{1}", ""];
const LOCK_PATHS: &[&str] = &["/l1", "/l2", "/e1", "/a"];

fn node_path() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => select(NODE_PATHS).prop_map(String::from),
        1 => select(BAD_PATHS).prop_map(String::from),
    ]
}

fn lock_path() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => Just("/l1".to_string()),
        5 => Just("/e1".to_string()),
        1 => select(LOCK_PATHS).prop_map(String::from),
        1 => Just("bad".to_string()),
    ]
}

fn data() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(0u8..4, 0..5)
}

fn version() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![2 => Just(None), 1 => (0u64..3).prop_map(Some)]
}

fn mode() -> impl Strategy<Value = CreateMode> {
    select(vec![
        CreateMode::Persistent,
        CreateMode::Ephemeral,
        CreateMode::PersistentSequential,
        CreateMode::EphemeralSequential,
    ])
}

fn lock_mode() -> impl Strategy<Value = LockMode> {
    select(vec![LockMode::Exclusive, LockMode::Shared])
}

fn sequencer() -> impl Strategy<Value = Sequencer> {
    (lock_path(), lock_mode(), 1u64..12).prop_map(|(path, mode, generation)| Sequencer {
        path,
        mode,
        generation,
    })
}

fn multi_op() -> impl Strategy<Value = MultiOp> {
    prop_oneof![
        (node_path(), version()).prop_map(|(path, expected_version)| MultiOp::Check {
            path,
            expected_version
        }),
        sequencer().prop_map(|sequencer| MultiOp::CheckSequencer { sequencer }),
        (node_path(), data(), mode()).prop_map(|(path, data, mode)| MultiOp::Create {
            path,
            data,
            mode
        }),
        (node_path(), version()).prop_map(|(path, expected_version)| MultiOp::Delete {
            path,
            expected_version
        }),
        (node_path(), data(), version()).prop_map(|(path, data, expected_version)| {
            MultiOp::SetData {
                path,
                data,
                expected_version,
            }
        }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (node_path(), data(), mode()).prop_map(|(path, data, mode)| Op::Create { path, data, mode }),
        3 => (node_path(), version()).prop_map(|(path, expected_version)| Op::Delete { path, expected_version }),
        3 => (node_path(), data(), version())
            .prop_map(|(path, data, expected_version)| Op::SetData { path, data, expected_version }),
        1 => node_path().prop_map(|path| Op::GetData { path }),
        1 => node_path().prop_map(|path| Op::Exists { path }),
        1 => node_path().prop_map(|path| Op::GetChildren { path }),
        3 => prop::collection::vec(multi_op(), 0..4).prop_map(|ops| Op::Multi { ops }),
        1 => Just(Op::Sync),
        1 => Just(Op::CloseSession),
        7 => (lock_path(), lock_mode(), prop_oneof![3 => Just(true), 1 => Just(false)], select(vec![0u64, 0, 700, 2_500]))
            .prop_map(|(path, mode, wait, lock_delay_ms)| Op::AcquireLock { path, mode, wait, lock_delay_ms }),
        5 => lock_path().prop_map(|path| Op::ReleaseLock { path }),
        1 => sequencer().prop_map(|sequencer| Op::CheckSequencer { sequencer }),
        4 => (lock_path(), data()).prop_map(|(path, value)| Op::Campaign { path, value }),
        2 => lock_path().prop_map(|path| Op::Resign { path }),
        1 => lock_path().prop_map(|path| Op::GetLeader { path }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let session = prop_oneof![10 => 0u64..2, 6 => 2u64..5, 1 => Just(5u64)];
    prop_oneof![
        2 => (0u64..20_000).prop_map(|timeout_ms| Step::Open { timeout_ms }),
        30 => (
            session.clone(),
            prop_oneof![18 => Just(SequenceChoice::Next), 1 => Just(SequenceChoice::Repeat), 1 => Just(SequenceChoice::Stale)],
            op()
        )
            .prop_map(|(session, sequence, op)| Step::Client { session, sequence, op }),
        1 => prop::collection::vec(session.clone(), 0..3).prop_map(|sessions| Step::Expire { sessions }),
        1 => prop::collection::vec((session, 0u64..30_000), 0..3).prop_map(|entries| Step::Checkpoint { entries }),
        2 => Just(Step::Tick),
    ]
}

/// A step with how the leader's clock moves before it (sometimes backwards,
/// as when a new leader's clock is behind).
fn timed_step() -> impl Strategy<Value = (Step, i64)> {
    (
        step(),
        prop_oneof![8 => 0i64..600, 1 => -300i64..0, 1 => 600i64..3_000],
    )
}

fn config() -> StateConfig {
    StateConfig {
        data_bytes_max: 4,
        path_bytes_max: 64,
        session_timeout_min_ms: 1_000,
        session_timeout_max_ms: 10_000,
        lock_delay_max_ms: 2_000,
        multi_ops_max: 3,
        sessions_per_identity_max: 3,
    }
}

/// The session a slot names, when `opened` sessions were opened so far.
fn id(slot: u64, opened: u64) -> SessionId {
    if slot >= 5 {
        1_000
    } else {
        opened.saturating_sub(slot).max(1)
    }
}

/// Turns steps into commands, as clients would send them: three sessions are
/// opened first, session slots become session identifiers (assigned in
/// order from 1), and each session's sequence numbers are tracked.
fn commands(steps: &[(Step, i64)]) -> Vec<Command> {
    let mut now_ms: u64 = 1_000_000;
    let mut last_sequence = std::collections::BTreeMap::<SessionId, u64>::new();
    let initial = (0..3).map(|_| (Step::Open { timeout_ms: 5_000 }, 0i64));
    let mut opened: u64 = 0;
    let steps: Vec<(Step, i64)> = initial.chain(steps.iter().cloned()).collect();
    steps
        .iter()
        .map(|(step, delta_ms)| {
            now_ms = now_ms.saturating_add_signed(*delta_ms);
            match step {
                Step::Open { timeout_ms } => {
                    opened += 1;
                    // Two identities, so the per-identity bound is reached.
                    Command::OpenSession {
                        timeout_ms: *timeout_ms,
                        owner: format!("CN=client-{}", opened % 2),
                        secret: u128::from(opened) << 64 | 7,
                        now_ms,
                    }
                }
                Step::Client {
                    session,
                    sequence,
                    op,
                } => {
                    let session = id(*session, opened);
                    let last = last_sequence.entry(session).or_insert(0);
                    let sequence = match sequence {
                        SequenceChoice::Next => {
                            *last += 1;
                            *last
                        }
                        SequenceChoice::Repeat => *last,
                        SequenceChoice::Stale => last.saturating_sub(1),
                    };
                    Command::Client {
                        request: Request {
                            session,
                            sequence,
                            op: op.clone(),
                        },
                        now_ms,
                    }
                }
                Step::Expire { sessions } => Command::ExpireSessions {
                    sessions: sessions.iter().map(|slot| id(*slot, opened)).collect(),
                    now_ms,
                },
                Step::Checkpoint { entries } => Command::CheckpointSessions {
                    remaining: entries
                        .iter()
                        .map(|(session, remaining_ms)| SessionRemaining {
                            session: id(*session, opened),
                            remaining_ms: *remaining_ms,
                        })
                        .collect(),
                    now_ms,
                },
                Step::Tick => Command::Tick { now_ms },
            }
        })
        .collect()
}

/// Blanks the free-text message of `BadArgument` errors: the model checks
/// that the error is a bad argument, not its wording.
fn normalized(mut applied: Applied) -> Applied {
    fn blank(error: &mut Error) {
        match error {
            Error::BadArgument { message } => message.clear(),
            Error::MultiOpFailed { cause, .. } => blank(cause),
            _ => {}
        }
    }
    if let Some(Response {
        result: Err(error), ..
    }) = &mut applied.response
    {
        blank(error);
    }
    applied
}

/// The state tables as the storage would hold them, fed by deltas.
#[derive(Default)]
struct SavedTables {
    records: std::collections::BTreeMap<(StateTable, Vec<u8>), Vec<u8>>,
    scalars: Vec<u8>,
}

impl SavedTables {
    /// Takes what changed in `state` since the last save.
    fn save(&mut self, state: &mut StateMachine, through: u64) {
        let membership = synod_paxos::Membership::new(&[1]).expect("membership");
        let delta = state.take_delta(through, &membership);
        for ((table, key), value) in delta.changes {
            match value {
                Some(value) => {
                    self.records.insert((table, key.to_vec()), value);
                }
                None => {
                    self.records.remove(&(table, key.to_vec()));
                }
            }
        }
        if let Some(header) = delta.header {
            self.scalars = header.scalars;
        }
    }

    /// The state the tables hold, loaded as at a restart.
    fn load(&self) -> Result<StateMachine, String> {
        let mut loader = StateLoader::new(config());
        for ((table, key), value) in &self.records {
            loader.record(StateRecordRef {
                table: *table,
                key,
                value,
            })?;
        }
        loader.finish(&self.scalars)
    }
}

fn cases() -> u32 {
    std::env::var("SYNOD_PROPTEST_CASES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(10_000)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn state_machine_matches_the_reference_model(
        steps in prop::collection::vec(timed_step(), 1..48),
        split in any::<prop::sample::Index>(),
        save_every in 1usize..6,
    ) {
        let commands = commands(&steps);
        let mut state = StateMachine::new(config());
        let mut twin = StateMachine::new(config());
        let mut model = Model::new(config());
        let split = split.index(commands.len());
        let mut restored: Option<StateMachine> = None;
        let mut loaded: Option<StateMachine> = None;
        // The saved tables, kept up to date from the deltas, as the
        // replica's writer keeps them.
        let mut disk = SavedTables::default();
        for (index, command) in commands.iter().enumerate() {
            if index == split {
                let bytes = state.snapshot();
                let copy = StateMachine::restore(config(), &bytes)
                    .map_err(|error| TestCaseError::fail(error.to_string()))?;
                prop_assert_eq!(copy.snapshot(), bytes.clone());
                restored = Some(copy);
                disk.save(&mut state, index as u64);
                let copy = disk.load().map_err(TestCaseError::fail)?;
                prop_assert_eq!(copy.snapshot(), bytes, "loaded from the saved tables");
                loaded = Some(copy);
            } else if index % save_every == 0 {
                disk.save(&mut state, index as u64);
            }
            let applied = state.apply(command);
            let expected = model.apply(command);
            prop_assert_eq!(normalized(applied.clone()), normalized(expected), "command {}: {:?}", index, command);
            prop_assert_eq!(state.next_lock_delay_end_ms(), model.next_lock_delay_end_ms());
            prop_assert_eq!(state.lock_waiter_count(), model.lock_waiter_count(), "lock waiters after command {}", index);
            prop_assert_eq!(&twin.apply(command), &applied);
            if let Some(copy) = restored.as_mut() {
                prop_assert_eq!(&copy.apply(command), &applied, "after restore, command {}", index);
            }
            if let Some(copy) = loaded.as_mut() {
                prop_assert_eq!(&copy.apply(command), &applied, "after load, command {}", index);
            }
        }
        disk.save(&mut state, commands.len() as u64);
        let reloaded = disk.load().map_err(TestCaseError::fail)?;
        prop_assert_eq!(reloaded.snapshot(), state.snapshot(), "the saved tables hold the state");
        prop_assert_eq!(state.dump_nodes(), model.dump_nodes());
        prop_assert_eq!(state.session_deadlines_ms(5, 7), model.session_deadlines_ms(5, 7));
        prop_assert_eq!(state.snapshot(), twin.snapshot());
        if let Some(copy) = restored {
            prop_assert_eq!(copy.snapshot(), state.snapshot());
        }
    }
}
