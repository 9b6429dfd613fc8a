//! Locks with fencing tokens.
//!
//! Locks are native to the cluster's state machine: an acquire either
//! succeeds at once or queues the session (FIFO); the grant then arrives as
//! a notification on the session's stream. A [`LockGuard`] holds the grant's
//! fencing token ([`Sequencer`]); hand [`LockGuard::token`] to the services
//! the lock protects, and have them call [`Client::check_sequencer`] (or
//! write with [`Client::set_fenced`]) so a paused former holder is refused.
//!
//! Correctness across failovers: a grant made while the session was between
//! replicas is not delivered again (the replica has no connection to send
//! it to), and an acquire whose answer was lost cannot be asked about (the
//! cluster has no "who holds this lock" read). So when the session moves to
//! another replica while waiting, or an acquire's outcome is unknown, the
//! client releases whatever the session may hold or wait for at that path
//! and acquires again. The lock is never held without the client knowing
//! its token, at the price of the place in the queue.
//!
//! The cluster takes the lock away only when the session ends (expired or
//! closed). [`LockGuard::lost`] resolves as soon as that may have happened:
//! when the session ended, or when it has been suspended (see
//! [`crate::SessionState`]) past the point where the cluster may expire it,
//! which is before the cluster could grant the lock to anyone else. Stop
//! the protected work then; if the session resumes after all,
//! [`LockGuard::check`] says whether the lock is still held.

use std::future::Future;
use std::time::Duration;

use synod_proto::{Error, LockMode, MultiOp, MultiResult, Op, OpResult, Sequencer, Stat};
use tokio::sync::{broadcast, watch as state_watch};
use tokio::time::Instant;

use crate::session::Grant;
use crate::{Claim, Client, ClientError, Result, SessionState};

/// Attempts of one acquire, each after a lost answer or a failover.
const ACQUIRE_ATTEMPTS_MAX: u32 = 32;

/// How to acquire a lock.
///
/// ```no_run
/// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
/// use std::time::Duration;
/// use synod_client::LockOptions;
///
/// let options = LockOptions::exclusive()
///     .timeout(Duration::from_secs(5))
///     .lock_delay_ms(1_000);
/// let guard = client.lock_with("/locks/report", options).await?;
/// # let _ = guard;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockOptions {
    mode: LockMode,
    wait: Wait,
    lock_delay_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Forever,
    Until(Duration),
    Never,
}

impl LockOptions {
    /// One holder at a time; wait as long as it takes.
    ///
    /// ```
    /// let options = synod_client::LockOptions::exclusive();
    /// # let _ = options;
    /// ```
    pub fn exclusive() -> LockOptions {
        LockOptions {
            mode: LockMode::Exclusive,
            wait: Wait::Forever,
            lock_delay_ms: 0,
        }
    }

    /// Any number of shared holders, and no exclusive one; wait as long as
    /// it takes.
    ///
    /// ```
    /// let options = synod_client::LockOptions::shared();
    /// # let _ = options;
    /// ```
    pub fn shared() -> LockOptions {
        LockOptions {
            mode: LockMode::Shared,
            ..LockOptions::exclusive()
        }
    }

    /// Fail with `LockBusy` instead of waiting.
    ///
    /// ```
    /// let options = synod_client::LockOptions::exclusive().try_once();
    /// # let _ = options;
    /// ```
    pub fn try_once(mut self) -> LockOptions {
        self.wait = Wait::Never;
        self
    }

    /// Wait at most this long, then fail with [`ClientError::Timeout`]
    /// (the place in the queue is given up).
    ///
    /// ```
    /// let options = synod_client::LockOptions::exclusive().timeout(std::time::Duration::from_secs(2));
    /// # let _ = options;
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> LockOptions {
        self.wait = Wait::Until(timeout);
        self
    }

    fn wait_ms(&self) -> u64 {
        match self.wait {
            Wait::Until(timeout) => u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            _ => 0,
        }
    }

    /// After this session ends while holding the lock (but not after an
    /// explicit release), nobody gets it for this long: time for the work
    /// a dead holder started to drain (clamped by the cluster).
    ///
    /// ```
    /// let options = synod_client::LockOptions::exclusive().lock_delay_ms(500);
    /// # let _ = options;
    /// ```
    pub fn lock_delay_ms(mut self, lock_delay_ms: u64) -> LockOptions {
        self.lock_delay_ms = lock_delay_ms;
        self
    }
}

/// A held lock. Release it with [`LockGuard::release`]; dropping the guard
/// releases it too, without waiting. The session stays alive while the
/// guard lives.
///
/// ```no_run
/// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
/// let guard = client.lock("/locks/report").await?;
/// let token = guard.token().clone(); // send it with every protected write
/// tokio::select! {
///     lost = guard.lost() => eprintln!("stopping: {lost}"),
///     _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {
///         println!("work done under token {}", token.generation);
///     }
/// }
/// guard.release().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct LockGuard {
    claim: Option<Claim>,
    sequencer: Sequencer,
    standing: Standing,
}

/// Whether a session still stands: not ended, and not suspended past the
/// point where the cluster may expire it.
#[derive(Debug, Clone)]
pub(crate) struct Standing {
    state: state_watch::Receiver<SessionState>,
    jeopardy: state_watch::Receiver<Option<Instant>>,
}

impl Standing {
    pub(crate) fn of(client: &Client) -> Standing {
        Standing {
            state: client.state(),
            jeopardy: client.jeopardy(),
        }
    }

    pub(crate) fn ended(&self) -> bool {
        self.state.borrow().is_ended()
    }

    pub(crate) fn stands(&self) -> bool {
        let in_jeopardy = self
            .jeopardy
            .borrow()
            .is_some_and(|at| Instant::now() >= at);
        !self.ended() && !in_jeopardy
    }

    /// Resolves when the session no longer stands.
    pub(crate) async fn lost(mut self, path: String) -> ClientError {
        for _ in 0..u32::MAX {
            if self.state.borrow_and_update().is_ended() {
                break;
            }
            let jeopardy = *self.jeopardy.borrow_and_update();
            let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
            tokio::select! {
                changed = self.state.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                changed = self.jeopardy.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(jeopardy.unwrap_or(far)) => {
                    if jeopardy.is_some() {
                        break;
                    }
                }
            }
        }
        ClientError::LockLost { path }
    }
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim").field("path", &self.path).finish()
    }
}

impl LockGuard {
    /// The fencing token: path, mode, and a generation that strictly
    /// increases across every grant of the lock.
    ///
    /// ```no_run
    /// # async fn example(guard: &synod_client::LockGuard) {
    /// println!("token {}", guard.token().generation);
    /// # }
    /// ```
    pub fn token(&self) -> &Sequencer {
        &self.sequencer
    }

    /// The lock's path.
    ///
    /// ```no_run
    /// # async fn example(guard: &synod_client::LockGuard) {
    /// println!("holding {}", guard.path());
    /// # }
    /// ```
    pub fn path(&self) -> &str {
        &self.sequencer.path
    }

    /// Whether the lock is still held as far as this client knows: the
    /// session has not ended, nor been suspended long enough that the
    /// cluster may have expired it.
    ///
    /// ```no_run
    /// # async fn example(guard: &synod_client::LockGuard) {
    /// if !guard.is_held() { println!("lost it"); }
    /// # }
    /// ```
    pub fn is_held(&self) -> bool {
        self.standing.stands()
    }

    /// Resolves with [`ClientError::LockLost`] as soon as the lock may be
    /// lost: the session ended (expired or closed), or has been suspended
    /// past the point where the cluster may expire it, which comes before
    /// the cluster could grant the lock to anyone else. The future owns what
    /// it needs, so it can be spawned or raced with the protected work.
    ///
    /// ```no_run
    /// # async fn example(guard: &synod_client::LockGuard) {
    /// let lost = guard.lost();
    /// tokio::spawn(async move {
    ///     let error = lost.await;
    ///     eprintln!("{error}");
    /// });
    /// # }
    /// ```
    pub fn lost(&self) -> impl Future<Output = ClientError> + Send + 'static {
        self.standing.clone().lost(self.sequencer.path.clone())
    }

    /// Checks with the cluster that the token is still current.
    ///
    /// ```no_run
    /// # async fn example(guard: &synod_client::LockGuard) -> synod_client::Result<()> {
    /// guard.check().await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`ClientError::LockLost`] when it is not; a failure of the session.
    pub async fn check(&self) -> Result<()> {
        let Some(claim) = &self.claim else {
            return Err(ClientError::LockLost {
                path: self.sequencer.path.clone(),
            });
        };
        if claim.client.check_sequencer(&self.sequencer).await? {
            Ok(())
        } else {
            Err(ClientError::LockLost {
                path: self.sequencer.path.clone(),
            })
        }
    }

    /// Releases the lock and waits for the cluster to confirm; the next
    /// waiter is granted it.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// let guard = client.lock("/locks/a").await?;
    /// guard.release().await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`ClientError::LockLost`] when the session ended first (the lock is
    /// released anyway); a failure of the session.
    pub async fn release(mut self) -> Result<()> {
        let Some(claim) = self.claim.take() else {
            return Ok(());
        };
        if self.standing.ended() {
            return Err(ClientError::LockLost {
                path: self.sequencer.path.clone(),
            });
        }
        claim
            .client
            .cancel_lock(&claim.path)
            .await
            .map_err(|error| match error.kind() {
                crate::ErrorKind::SessionExpired => ClientError::LockLost {
                    path: claim.path.clone(),
                },
                _ => error,
            })
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(claim) = self.claim.take() {
            claim.client.request_soon(Op::ReleaseLock {
                path: claim.path.clone(),
            });
        }
    }
}

/// An acquire or campaign in progress. If it is abandoned (its future
/// dropped, say by a timeout around it, or it failed), whatever the session
/// may hold or wait for at the path is given up, so a grant that arrives
/// later is not held by nobody until the session ends.
pub(crate) struct Pending {
    claim: Option<Claim>,
    give_up: Option<Op>,
}

impl Pending {
    pub(crate) fn new(claim: Claim, give_up: Op) -> Pending {
        Pending {
            claim: Some(claim),
            give_up: Some(give_up),
        }
    }

    /// The acquire succeeded: the claim moves to the guard.
    pub(crate) fn complete(&mut self) -> Result<Claim> {
        self.give_up = None;
        self.claim
            .take()
            .ok_or_else(|| ClientError::Protocol("an acquire completed twice".into()))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let (Some(claim), Some(op)) = (&self.claim, self.give_up.take()) {
            claim.client.request_soon(op);
        }
    }
}

/// How waiting for a grant ended.
pub(crate) enum Waited {
    Granted(Sequencer),
    /// The session moved to another replica (or grants were missed): a
    /// grant may have been lost.
    Moved,
    TimedOut,
    Ended(ClientError),
}

/// Waits for a grant of `path` (of the election kind when `election`).
pub(crate) async fn wait_for_grant(
    grants: &mut broadcast::Receiver<Grant>,
    connections: &mut state_watch::Receiver<u64>,
    state: &mut state_watch::Receiver<SessionState>,
    path: &str,
    election: bool,
    deadline: Option<Instant>,
) -> Waited {
    let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let sleep = tokio::time::sleep_until(deadline.unwrap_or(far));
    tokio::pin!(sleep);
    loop {
        let current = *state.borrow_and_update();
        if current.is_ended() {
            return Waited::Ended(match current {
                SessionState::Closed => ClientError::Closed,
                _ => ClientError::SessionExpired,
            });
        }
        tokio::select! {
            biased;
            grant = grants.recv() => match grant {
                Ok(grant) if grant.election == election && grant.sequencer.path == path => {
                    return Waited::Granted(grant.sequencer);
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => return Waited::Moved,
                Err(broadcast::error::RecvError::Closed) => return Waited::Ended(ClientError::Closed),
            },
            changed = connections.changed() => {
                if changed.is_err() {
                    return Waited::Ended(ClientError::Closed);
                }
                return Waited::Moved;
            }
            changed = state.changed() => {
                if changed.is_err() {
                    return Waited::Ended(ClientError::Closed);
                }
            }
            _ = &mut sleep => return Waited::TimedOut,
        }
    }
}

impl Client {
    /// Acquires an exclusive lock, waiting as long as it takes.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// let guard = client.lock("/locks/a").await?;
    /// println!("token {}", guard.token().generation);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `LockAlreadyRequested` when this client already holds or waits for
    /// it; [`ClientError::SessionExpired`]; a failure of the session.
    pub async fn lock(&self, path: &str) -> Result<LockGuard> {
        self.lock_with(path, LockOptions::exclusive()).await
    }

    /// Acquires an exclusive lock if it is free now.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// use synod_client::ErrorKind;
    /// match client.try_lock("/locks/a").await {
    ///     Ok(guard) => println!("got it: {}", guard.token().generation),
    ///     Err(error) if error.kind() == ErrorKind::LockBusy => println!("busy"),
    ///     Err(error) => return Err(error),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `LockBusy` when another session holds it, someone waits for it, or
    /// it is in a lock-delay; as [`Client::lock`].
    pub async fn try_lock(&self, path: &str) -> Result<LockGuard> {
        self.lock_with(path, LockOptions::exclusive().try_once())
            .await
    }

    /// Acquires an exclusive lock, waiting at most `timeout`.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// let guard = client.lock_timeout("/locks/a", std::time::Duration::from_secs(3)).await?;
    /// # let _ = guard;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`ClientError::Timeout`] when it was not granted in time; as
    /// [`Client::lock`].
    pub async fn lock_timeout(&self, path: &str, timeout: Duration) -> Result<LockGuard> {
        self.lock_with(path, LockOptions::exclusive().timeout(timeout))
            .await
    }

    /// Acquires a shared lock, waiting as long as it takes.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// let reader = client.lock_shared("/locks/table").await?;
    /// # let _ = reader;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`Client::lock`].
    pub async fn lock_shared(&self, path: &str) -> Result<LockGuard> {
        self.lock_with(path, LockOptions::shared()).await
    }

    /// Acquires a lock as `options` say.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// use synod_client::LockOptions;
    /// let guard = client.lock_with("/locks/a", LockOptions::shared().try_once()).await?;
    /// # let _ = guard;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`Client::lock`], [`Client::try_lock`] and [`Client::lock_timeout`].
    pub async fn lock_with(&self, path: &str, options: LockOptions) -> Result<LockGuard> {
        let mut pending = Pending::new(self.claim(path)?, Op::ReleaseLock { path: path.into() });
        let deadline = match options.wait {
            Wait::Until(timeout) => Some(Instant::now() + timeout),
            _ => None,
        };
        let mut state = self.state();
        for attempt in 0..ACQUIRE_ATTEMPTS_MAX {
            // Subscribe before asking, so the grant cannot slip between.
            let mut grants = self.grants();
            let mut connections = self.connections();
            connections.borrow_and_update();
            let op = Op::AcquireLock {
                path: path.into(),
                mode: options.mode,
                wait: options.wait != Wait::Never,
                lock_delay_ms: options.lock_delay_ms,
            };
            let answer = self.request(op, None, None).await;
            let queued = match answer.map(|response| response.result) {
                Ok(Ok(OpResult::LockAcquired { sequencer })) => {
                    return Ok(self.guard(pending.complete()?, sequencer));
                }
                Ok(Ok(OpResult::LockQueued { waiters_ahead })) => {
                    tracing::debug!(path, waiters_ahead, "queued for the lock");
                    true
                }
                Ok(Ok(other)) => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected result {other:?}"
                    )))
                }
                Ok(Err(Error::LockAlreadyRequested { .. })) => {
                    // This client claimed the path, so the session's
                    // request is an earlier attempt whose answer was lost.
                    false
                }
                Ok(Err(Error::Unavailable { .. }))
                | Err(ClientError::OutcomeUnknown | ClientError::Timeout(_)) => false,
                Ok(Err(error)) => return Err(ClientError::Refused(error)),
                Err(error) => return Err(error),
            };
            if queued {
                match wait_for_grant(
                    &mut grants,
                    &mut connections,
                    &mut state,
                    path,
                    false,
                    deadline,
                )
                .await
                {
                    Waited::Granted(sequencer) => {
                        return Ok(self.guard(pending.complete()?, sequencer))
                    }
                    Waited::Ended(error) => return Err(error),
                    Waited::TimedOut => {
                        self.cancel_lock(path).await?;
                        return Err(ClientError::Timeout(options.wait_ms()));
                    }
                    Waited::Moved => {
                        tracing::debug!(
                            path,
                            attempt,
                            "session moved while queued; acquiring again"
                        );
                    }
                }
            }
            // Whatever the session holds or waits for here, it does not know
            // the token of: give it up and ask again.
            self.cancel_lock(path).await?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(ClientError::Timeout(options.wait_ms()));
            }
        }
        Err(ClientError::ConnectionLost(format!(
            "could not acquire {path} in {ACQUIRE_ATTEMPTS_MAX} attempts across failovers"
        )))
    }

    fn guard(&self, claim: Claim, sequencer: Sequencer) -> LockGuard {
        LockGuard {
            claim: Some(claim),
            sequencer,
            standing: Standing::of(self),
        }
    }

    /// Releases the lock at `path` or stops waiting for it, whichever the
    /// session does; nothing when it does neither.
    pub(crate) async fn cancel_lock(&self, path: &str) -> Result<()> {
        for _ in 0..ACQUIRE_ATTEMPTS_MAX {
            let op = Op::ReleaseLock { path: path.into() };
            match self.request(op, None, None).await.map(|r| r.result) {
                Ok(Ok(_)) | Ok(Err(Error::LockNotHeld { .. })) => return Ok(()),
                Ok(Err(Error::Unavailable { .. }))
                | Err(ClientError::OutcomeUnknown | ClientError::Timeout(_)) => continue,
                Ok(Err(error)) => return Err(ClientError::Refused(error)),
                Err(error) => return Err(error),
            }
        }
        Err(ClientError::ConnectionLost(format!(
            "could not release {path}"
        )))
    }

    /// Whether a fencing token is still current: its holder has neither
    /// released the lock nor lost its session. Downstream services call it
    /// before acting on a request that carries a token.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client, token: synod_client::Sequencer) -> synod_client::Result<()> {
    /// if !client.check_sequencer(&token).await? {
    ///     println!("refusing a request from a former holder");
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// A failure of the session.
    pub async fn check_sequencer(&self, sequencer: &Sequencer) -> Result<bool> {
        let op = Op::CheckSequencer {
            sequencer: sequencer.clone(),
        };
        match self.request(op, None, None).await?.result {
            Ok(OpResult::SequencerCurrent) => Ok(true),
            Ok(other) => Err(ClientError::Protocol(format!(
                "unexpected result {other:?}"
            ))),
            Err(Error::StaleSequencer { .. }) => Ok(false),
            Err(error) => Err(ClientError::Refused(error)),
        }
    }

    /// Sets a node's data only if the fencing token is current, atomically:
    /// a former holder's write is refused with `StaleSequencer`.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// let guard = client.lock("/locks/report").await?;
    /// client.set_fenced("/report", b"done", guard.token()).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `StaleSequencer` (as [`ClientError::kind`]), `NoNode`; a failure of
    /// the session.
    pub async fn set_fenced(&self, path: &str, data: &[u8], sequencer: &Sequencer) -> Result<Stat> {
        let ops = vec![
            MultiOp::CheckSequencer {
                sequencer: sequencer.clone(),
            },
            MultiOp::SetData {
                path: path.into(),
                data: data.to_vec(),
                expected_version: None,
            },
        ];
        let results = match self.multi(ops).await {
            Ok(results) => results,
            Err(ClientError::Refused(Error::MultiOpFailed { cause, .. })) => {
                return Err(ClientError::Refused(*cause))
            }
            Err(error) => return Err(error),
        };
        match results.get(1) {
            Some(MultiResult::DataSet { stat }) => Ok(*stat),
            other => Err(ClientError::Protocol(format!(
                "unexpected result {other:?}"
            ))),
        }
    }
}
