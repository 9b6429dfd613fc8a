//! Leader election, built on the cluster's native elections: candidates
//! queue behind the leader (FIFO), the leader holds a fencing token like a
//! lock holder, and every change of leader fires `LeaderChanged` at the
//! election's name.
//!
//! [`Client::campaign`] resolves once this client leads. Unlike a queued
//! lock, a queued campaign needs no re-acquire after a failover: the
//! election's leader can be read ([`Client::leader`]), so the client checks
//! whether it was elected while the grant could not reach it, and keeps its
//! place in the queue otherwise.

use std::future::Future;
use std::time::Duration;

use synod_proto::wire::WatchRegistration;
use synod_proto::{
    Error, Event, LeaderInfo, Op, OpResult, Revision, Sequencer, SessionId, WatchKind,
};
use tokio::sync::{broadcast, watch as state_watch};
use tokio::time::Instant;

use crate::lock::{wait_for_grant, Pending, Standing, Waited};
use crate::{Claim, Client, ClientError, Result, SessionState};

/// Attempts of one campaign, each after a lost answer.
const CAMPAIGN_ATTEMPTS_MAX: u32 = 32;

/// This client's leadership of an election. Resign with
/// [`Leadership::resign`]; dropping it resigns too, without waiting.
///
/// ```no_run
/// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
/// let leadership = client.campaign("/elections/scheduler", b"10.0.0.7:8080").await?;
/// println!("leading with token {}", leadership.token().generation);
/// tokio::select! {
///     lost = leadership.lost() => eprintln!("no longer leading: {lost}"),
///     _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
/// }
/// leadership.resign().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Leadership {
    claim: Option<Claim>,
    sequencer: Sequencer,
    value: Vec<u8>,
    standing: Standing,
}

impl Leadership {
    /// The leader's fencing token.
    ///
    /// ```no_run
    /// # fn example(leadership: &synod_client::Leadership) {
    /// println!("{}", leadership.token().generation);
    /// # }
    /// ```
    pub fn token(&self) -> &Sequencer {
        &self.sequencer
    }

    /// The election's name.
    ///
    /// ```no_run
    /// # fn example(leadership: &synod_client::Leadership) {
    /// println!("leading {}", leadership.name());
    /// # }
    /// ```
    pub fn name(&self) -> &str {
        &self.sequencer.path
    }

    /// The value this client campaigned with.
    ///
    /// ```no_run
    /// # fn example(leadership: &synod_client::Leadership) {
    /// println!("{:?}", leadership.value());
    /// # }
    /// ```
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// Whether this client still leads as far as it knows: the session has
    /// not ended, nor been suspended long enough that the cluster may have
    /// expired it.
    ///
    /// ```no_run
    /// # fn example(leadership: &synod_client::Leadership) {
    /// assert!(leadership.is_leader());
    /// # }
    /// ```
    pub fn is_leader(&self) -> bool {
        self.standing.stands()
    }

    /// Resolves with [`ClientError::LockLost`] as soon as the leadership
    /// may be lost: the session ended, or has been suspended past the point
    /// where the cluster may expire it (before any other candidate can be
    /// elected). Stop acting as leader then.
    ///
    /// ```no_run
    /// # async fn example(leadership: &synod_client::Leadership) {
    /// let error = leadership.lost().await;
    /// eprintln!("{error}");
    /// # }
    /// ```
    pub fn lost(&self) -> impl Future<Output = ClientError> + Send + 'static {
        self.standing.clone().lost(self.sequencer.path.clone())
    }

    /// Stops leading; the next candidate is elected.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// let leadership = client.campaign("/elections/a", b"me").await?;
    /// leadership.resign().await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`ClientError::LockLost`] when the session ended first; a failure of
    /// the session.
    pub async fn resign(mut self) -> Result<()> {
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
            .resign(&claim.path)
            .await
            .map_err(|error| match error.kind() {
                crate::ErrorKind::SessionExpired => ClientError::LockLost {
                    path: claim.path.clone(),
                },
                _ => error,
            })
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        if let Some(claim) = self.claim.take() {
            claim.client.request_soon(Op::Resign {
                path: claim.path.clone(),
            });
        }
    }
}

/// The leaders of an election, as they change; see [`Client::observe`].
///
/// ```no_run
/// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
/// let mut leaders = client.observe("/elections/scheduler").await?;
/// while let Ok(leader) = leaders.next().await {
///     match leader {
///         Some(leader) => println!("leader: {}", String::from_utf8_lossy(&leader.value)),
///         None => println!("nobody leads"),
///     }
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct LeaderStream {
    client: Client,
    name: String,
    events: broadcast::Receiver<Event>,
    state: state_watch::Receiver<SessionState>,
    after: Revision,
    first: Option<Option<LeaderInfo>>,
    last: Option<(SessionId, u64)>,
}

impl LeaderStream {
    /// The leader now when the stream was made, then each new leader (or
    /// `None` when nobody leads), in order. Changes that come faster than
    /// the leader can be read are coalesced: the stream never goes back,
    /// never repeats a leader, and always ends on the current one.
    ///
    /// ```no_run
    /// # async fn example(mut leaders: synod_client::LeaderStream) {
    /// if let Ok(Some(leader)) = leaders.next().await {
    ///     println!("session {} leads", leader.session);
    /// }
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`ClientError::SessionExpired`] or [`ClientError::Closed`] when the
    /// session ends; a failure of a read.
    pub async fn next(&mut self) -> Result<Option<LeaderInfo>> {
        if let Some(first) = self.first.take() {
            self.last = identity(&first);
            return Ok(first);
        }
        for _ in 0..u32::MAX {
            let event = crate::watch::next_event(
                &mut self.events,
                &mut self.state,
                &self.name,
                WatchKind::Leader,
                self.after,
            )
            .await?;
            self.after = self.after.max(event.revision);
            let leader = self.client.leader_patiently(&self.name).await?;
            let now = identity(&leader);
            if now != self.last {
                self.last = now;
                return Ok(leader);
            }
        }
        Err(ClientError::Closed)
    }
}

impl Drop for LeaderStream {
    fn drop(&mut self) {
        self.client.remove_watch_soon(WatchRegistration {
            path: self.name.clone(),
            kind: WatchKind::Leader,
        });
    }
}

fn identity(leader: &Option<LeaderInfo>) -> Option<(SessionId, u64)> {
    leader
        .as_ref()
        .map(|leader| (leader.session, leader.sequencer.generation))
}

impl Client {
    /// Runs for leader of the election `name` with `value` (for example
    /// this instance's address) and resolves once this client leads.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// let leadership = client.campaign("/elections/scheduler", b"10.0.0.7:8080").await?;
    /// println!("leading, token {}", leadership.token().generation);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `LockAlreadyRequested` when this client already campaigns there;
    /// `BadArgument` when `name` is a plain lock; [`ClientError::SessionExpired`].
    pub async fn campaign(&self, name: &str, value: &[u8]) -> Result<Leadership> {
        let mut pending = Pending::new(self.claim(name)?, Op::Resign { path: name.into() });
        let mut state = self.state();
        let check_every = Duration::from_millis((self.session_timeout_ms() / 2).clamp(200, 2000));
        for attempt in 0..CAMPAIGN_ATTEMPTS_MAX {
            let mut grants = self.grants();
            let mut connections = self.connections();
            connections.borrow_and_update();
            let op = Op::Campaign {
                path: name.into(),
                value: value.to_vec(),
            };
            let queued = match self.request(op, None, None).await.map(|r| r.result) {
                Ok(Ok(OpResult::Elected { sequencer })) => {
                    return Ok(self.leadership(pending.complete()?, sequencer, value));
                }
                Ok(Ok(OpResult::CampaignQueued { candidates_ahead })) => {
                    tracing::debug!(name, candidates_ahead, "queued for leadership");
                    true
                }
                Ok(Ok(other)) => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected result {other:?}"
                    )))
                }
                // An earlier attempt of ours, whose answer was lost, is
                // queued or leads.
                Ok(Err(Error::LockAlreadyRequested { .. })) => true,
                Ok(Err(Error::Unavailable { .. }))
                | Err(ClientError::OutcomeUnknown | ClientError::Timeout(_)) => false,
                Ok(Err(error)) => return Err(ClientError::Refused(error)),
                Err(error) => return Err(error),
            };
            if let Some(leader) = self.leader_if_me(name).await? {
                return Ok(self.leadership(pending.complete()?, leader.sequencer, value));
            }
            if !queued {
                tracing::debug!(name, attempt, "campaign outcome unknown; asking again");
                continue;
            }
            loop {
                let deadline = Some(Instant::now() + check_every);
                match wait_for_grant(
                    &mut grants,
                    &mut connections,
                    &mut state,
                    name,
                    true,
                    deadline,
                )
                .await
                {
                    Waited::Granted(sequencer) => {
                        return Ok(self.leadership(pending.complete()?, sequencer, value))
                    }
                    Waited::Ended(error) => return Err(error),
                    // A grant may have been lost, or is just slow: look.
                    Waited::Moved | Waited::TimedOut => {
                        if let Some(leader) = self.leader_if_me(name).await? {
                            return Ok(self.leadership(
                                pending.complete()?,
                                leader.sequencer,
                                value,
                            ));
                        }
                    }
                }
            }
        }
        Err(ClientError::ConnectionLost(format!(
            "could not campaign in {name} in {CAMPAIGN_ATTEMPTS_MAX} attempts"
        )))
    }

    async fn leader_if_me(&self, name: &str) -> Result<Option<LeaderInfo>> {
        let leader = self.leader_patiently(name).await?;
        Ok(leader.filter(|leader| leader.session == self.session_id()))
    }

    /// [`Client::leader`], retried while the failure is transient.
    async fn leader_patiently(&self, name: &str) -> Result<Option<LeaderInfo>> {
        let mut last_error = None;
        for _ in 0..CAMPAIGN_ATTEMPTS_MAX {
            match self.leader(name).await {
                Ok(leader) => return Ok(leader),
                Err(error) if error.is_transient() => last_error = Some(error),
                Err(error) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            ClientError::ConnectionLost(format!("could not read the leader of {name}"))
        }))
    }

    fn leadership(&self, claim: Claim, sequencer: Sequencer, value: &[u8]) -> Leadership {
        Leadership {
            claim: Some(claim),
            sequencer,
            value: value.to_vec(),
            standing: Standing::of(self),
        }
    }

    /// Who leads the election `name` now, if anyone.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// if let Some(leader) = client.leader("/elections/scheduler").await? {
    ///     println!("{} leads", String::from_utf8_lossy(&leader.value));
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `BadArgument` when `name` is a plain lock; a failure of the session.
    pub async fn leader(&self, name: &str) -> Result<Option<LeaderInfo>> {
        match self.call_read(Op::GetLeader { path: name.into() }).await? {
            OpResult::Leader { leader } => Ok(leader),
            other => Err(ClientError::Protocol(format!(
                "unexpected result {other:?}"
            ))),
        }
    }

    /// The leaders of the election `name` as a stream: the current one,
    /// then every change, in order.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// let mut leaders = client.observe("/elections/scheduler").await?;
    /// let current = leaders.next().await?;
    /// # let _ = current;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `BadArgument` when `name` is a plain lock; a failure of the session.
    pub async fn observe(&self, name: &str) -> Result<LeaderStream> {
        let events = self.events();
        let state = self.state();
        self.add_watch(name, WatchKind::Leader).await?;
        let mut stream = LeaderStream {
            client: self.clone(),
            name: name.to_string(),
            events,
            state,
            after: 0,
            first: None,
            last: None,
        };
        // Answered after the watch is registered: changes after this read
        // fire the watch.
        let response = self
            .request(Op::GetLeader { path: name.into() }, None, None)
            .await?;
        match response.result? {
            OpResult::Leader { leader } => {
                stream.after = response.revision;
                stream.first = Some(leader);
                Ok(stream)
            }
            other => Err(ClientError::Protocol(format!(
                "unexpected result {other:?}"
            ))),
        }
    }

    /// Stops leading the election `name`, or stops campaigning there.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// client.resign("/elections/scheduler").await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `LockNotHeld` when this session neither leads nor campaigns there.
    pub async fn resign(&self, name: &str) -> Result<()> {
        let mut unknown = false;
        for _ in 0..CAMPAIGN_ATTEMPTS_MAX {
            match self
                .request(Op::Resign { path: name.into() }, None, None)
                .await
                .map(|r| r.result)
            {
                Ok(Ok(_)) => return Ok(()),
                // After a lost answer, "not held" means the resign went through.
                Ok(Err(Error::LockNotHeld { .. })) if unknown => return Ok(()),
                Ok(Err(Error::Unavailable { .. }))
                | Err(ClientError::OutcomeUnknown | ClientError::Timeout(_)) => unknown = true,
                Ok(Err(error)) => return Err(ClientError::Refused(error)),
                Err(error) => return Err(error),
            }
        }
        Err(ClientError::ConnectionLost(format!(
            "could not resign {name}"
        )))
    }

    async fn call_read(&self, op: Op) -> Result<OpResult> {
        Ok(self.request(op, None, None).await?.result?)
    }
}
