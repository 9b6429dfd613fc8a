//! Watches as futures and streams, and the session's state as a stream.
//!
//! A [`Watch`] is a one-shot watch (data, exists or children): set
//! atomically with the read that returned the state it watches, it resolves
//! with the first event that changes that state. A [`WatchStream`] is a
//! persistent recursive watch: every creation, data change and deletion at
//! a path or below it, in order, until dropped. Both survive failovers: the
//! session re-registers them with the last revision it has fully seen, and
//! the replica replays what was missed, so nothing is skipped; if the
//! replica no longer has the history, they yield a `HistoryCompacted` event,
//! which says "re-read the state".

use std::future::{Future, IntoFuture};
use std::pin::Pin;

use synod_proto::wire::WatchRegistration;
use synod_proto::{Event, EventType, Op, OpResult, Revision, Stat, WatchKind};
use tokio::sync::{broadcast, watch as state_watch};

use crate::{Client, ClientError, Result, SessionState};

/// Why a watch ends: the session is over.
fn ended(state: SessionState) -> ClientError {
    match state {
        SessionState::Closed => ClientError::Closed,
        _ => ClientError::SessionExpired,
    }
}

/// An event telling a watcher it may have missed events and must re-read.
fn compacted(path: &str, revision: Revision) -> Event {
    Event {
        path: path.to_string(),
        event_type: EventType::HistoryCompacted,
        revision,
    }
}

/// Waits for the next event at or after `after` that fires a watch of
/// `kind` on `path`, or for the end of the session.
pub(crate) async fn next_event(
    events: &mut broadcast::Receiver<Event>,
    state: &mut state_watch::Receiver<SessionState>,
    path: &str,
    kind: WatchKind,
    after: Revision,
) -> Result<Event> {
    loop {
        let current = *state.borrow_and_update();
        if current.is_ended() {
            // Deliver what already arrived before saying the session ended.
            return match events.try_recv() {
                Ok(event) if fires(&event, path, kind, after) => Ok(event),
                Ok(_) => continue,
                Err(broadcast::error::TryRecvError::Lagged(_)) => Ok(compacted(path, after)),
                Err(_) => Err(ended(current)),
            };
        }
        tokio::select! {
            biased;
            received = events.recv() => match received {
                Ok(event) if fires(&event, path, kind, after) => return Ok(event),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(path, missed, "a watcher fell behind; it must re-read");
                    return Ok(compacted(path, after));
                }
                Err(broadcast::error::RecvError::Closed) => return Err(ClientError::Closed),
            },
            changed = state.changed() => {
                if changed.is_err() {
                    return Err(ClientError::Closed);
                }
            }
        }
    }
}

fn fires(event: &Event, path: &str, kind: WatchKind, after: Revision) -> bool {
    if event.event_type == EventType::HistoryCompacted {
        return true;
    }
    event.revision > after && kind.fires_on(path, &event.path, event.event_type)
}

/// A one-shot watch: `.await` it for the first event that changes what the
/// read that set it returned.
///
/// ```no_run
/// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
/// let (data, _stat, watch) = client.get_watch("/config").await?;
/// println!("config is {data:?}");
/// let event = watch.await?;
/// println!("config changed: {:?} at revision {}", event.event_type, event.revision);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Watch {
    path: String,
    kind: WatchKind,
    after: Revision,
    events: broadcast::Receiver<Event>,
    state: state_watch::Receiver<SessionState>,
}

impl Watch {
    /// The watched path.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// let (_, watch) = client.exists_watch("/ready").await?;
    /// assert_eq!(watch.path(), "/ready");
    /// # Ok(())
    /// # }
    /// ```
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The revision of the read that set the watch: the event that fires
    /// it comes after it.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// let (_, watch) = client.exists_watch("/ready").await?;
    /// println!("watching from revision {}", watch.revision());
    /// # Ok(())
    /// # }
    /// ```
    pub fn revision(&self) -> Revision {
        self.after
    }

    /// Waits for the event.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// let (_, watch) = client.children_watch("/workers").await?;
    /// let event = watch.fired().await?;
    /// # let _ = event;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`ClientError::SessionExpired`] or [`ClientError::Closed`] when the
    /// session ends first.
    pub async fn fired(mut self) -> Result<Event> {
        next_event(
            &mut self.events,
            &mut self.state,
            &self.path,
            self.kind,
            self.after,
        )
        .await
    }
}

impl IntoFuture for Watch {
    type Output = Result<Event>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Event>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.fired())
    }
}

/// A persistent recursive watch: every creation, data change and deletion
/// at its path or below, in order, across failovers. Dropping it removes
/// the watch.
///
/// ```no_run
/// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
/// let mut changes = client.watch("/config").await?;
/// while let Ok(event) = changes.next().await {
///     println!("{:?} {} at revision {}", event.event_type, event.path, event.revision);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct WatchStream {
    client: Client,
    registration: WatchRegistration,
    after: Revision,
    events: broadcast::Receiver<Event>,
    state: state_watch::Receiver<SessionState>,
}

impl WatchStream {
    /// The watched path.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// let changes = client.watch("/config").await?;
    /// assert_eq!(changes.path(), "/config");
    /// # Ok(())
    /// # }
    /// ```
    pub fn path(&self) -> &str {
        &self.registration.path
    }

    /// Every change after this revision is delivered, and none at or
    /// before it (a read at this revision already shows those).
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// let changes = client.watch("/config").await?;
    /// println!("complete from revision {}", changes.revision());
    /// # Ok(())
    /// # }
    /// ```
    pub fn revision(&self) -> Revision {
        self.after
    }

    /// The next change, in revision order.
    ///
    /// ```no_run
    /// # async fn example(mut changes: synod_client::WatchStream) {
    /// if let Ok(event) = changes.next().await {
    ///     println!("{event:?}");
    /// }
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`ClientError::SessionExpired`] or [`ClientError::Closed`] when the
    /// session ends; the stream is over then.
    pub async fn next(&mut self) -> Result<Event> {
        next_event(
            &mut self.events,
            &mut self.state,
            &self.registration.path,
            self.registration.kind,
            // Changes the replica sent between registering the watch and
            // answering the read that fixed `after` are older than the
            // stream's start: a caller that read the state at `after`
            // must not see them again.
            self.after,
        )
        .await
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.client.remove_watch_soon(self.registration.clone());
    }
}

/// Every transition of the session's state, in order; see
/// [`Client::state_changes`].
///
/// ```no_run
/// # async fn example(client: &synod_client::Client) {
/// use synod_client::SessionState;
/// let mut changes = client.state_changes();
/// while let Some(state) = changes.next().await {
///     if state == SessionState::Suspended {
///         println!("pausing work that is not fenced until the session is back");
///     }
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct StateStream {
    transitions: broadcast::Receiver<SessionState>,
    state: state_watch::Receiver<SessionState>,
    done: bool,
}

impl StateStream {
    pub(crate) fn new(
        transitions: broadcast::Receiver<SessionState>,
        state: state_watch::Receiver<SessionState>,
    ) -> StateStream {
        StateStream {
            transitions,
            state,
            done: false,
        }
    }

    /// The next state, or `None` after the session ended (the last state
    /// yielded is then `Expired` or `Closed`).
    ///
    /// ```no_run
    /// # async fn example(mut changes: synod_client::StateStream) {
    /// let next = changes.next().await;
    /// # let _ = next;
    /// # }
    /// ```
    pub async fn next(&mut self) -> Option<SessionState> {
        if self.done {
            return None;
        }
        let state = match self.transitions.recv().await {
            Ok(state) => state,
            // Fell behind: the current state is what matters now.
            Err(broadcast::error::RecvError::Lagged(_)) => *self.state.borrow(),
            Err(broadcast::error::RecvError::Closed) => {
                self.done = true;
                let last = *self.state.borrow();
                return last.is_ended().then_some(last);
            }
        };
        if state.is_ended() {
            self.done = true;
        }
        Some(state)
    }
}

impl Client {
    /// A node's data and stat, and a one-shot watch for its next data
    /// change or deletion, set atomically with the read.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// let (data, stat, watch) = client.get_watch("/config").await?;
    /// # let _ = (data, stat);
    /// let event = watch.await?;
    /// # let _ = event;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `NoNode` (no watch is left then; use [`Client::exists_watch`]).
    pub async fn get_watch(&self, path: &str) -> Result<(Vec<u8>, Stat, Watch)> {
        let (revision, result, watch) = self
            .read_watched(Op::GetData { path: path.into() }, path, WatchKind::Data)
            .await?;
        match result {
            OpResult::Data { data, stat } => Ok((data, stat, watch.at(revision))),
            other => Err(ClientError::Protocol(format!(
                "unexpected result {other:?}"
            ))),
        }
    }

    /// A node's stat (or `None`), and a one-shot watch for its creation,
    /// data change or deletion, set atomically with the read.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// let (stat, watch) = client.exists_watch("/ready").await?;
    /// if stat.is_none() {
    ///     watch.await?; // created (or changed) since
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// Bad paths, or a failure of the session.
    pub async fn exists_watch(&self, path: &str) -> Result<(Option<Stat>, Watch)> {
        let (revision, result, watch) = self
            .read_watched(Op::Exists { path: path.into() }, path, WatchKind::Exists)
            .await?;
        match result {
            OpResult::Exists { stat } => Ok((stat, watch.at(revision))),
            other => Err(ClientError::Protocol(format!(
                "unexpected result {other:?}"
            ))),
        }
    }

    /// A node's children, and a one-shot watch for the next creation or
    /// deletion of a child (or of the node), set atomically with the read.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// let (children, watch) = client.children_watch("/workers").await?;
    /// println!("{} workers", children.len());
    /// watch.await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `NoNode`.
    pub async fn children_watch(&self, path: &str) -> Result<(Vec<String>, Watch)> {
        let (revision, result, watch) = self
            .read_watched(
                Op::GetChildren { path: path.into() },
                path,
                WatchKind::Children,
            )
            .await?;
        match result {
            OpResult::Children { children, .. } => Ok((children, watch.at(revision))),
            other => Err(ClientError::Protocol(format!(
                "unexpected result {other:?}"
            ))),
        }
    }

    async fn read_watched(
        &self,
        op: Op,
        path: &str,
        kind: WatchKind,
    ) -> Result<(Revision, OpResult, Watch)> {
        // Subscribe before the read, so the event cannot slip between.
        let watch = Watch {
            path: path.to_string(),
            kind,
            after: 0,
            events: self.events(),
            state: self.state(),
        };
        let response = self.request(op, None, Some(kind)).await?;
        Ok((response.revision, response.result?, watch))
    }

    /// A persistent recursive watch on `path`: every creation, data change
    /// and deletion at it or below it, in order, until the stream is
    /// dropped. Returns once the watch is registered; every change after
    /// [`WatchStream::revision`] is delivered.
    ///
    /// ```no_run
    /// # async fn example(client: &synod_client::Client) -> synod_client::Result<()> {
    /// let mut changes = client.watch("/services").await?;
    /// let event = changes.next().await?;
    /// # let _ = event;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// A failure of the session.
    pub async fn watch(&self, path: &str) -> Result<WatchStream> {
        let registration = WatchRegistration {
            path: path.to_string(),
            kind: WatchKind::PersistentRecursive,
        };
        let events = self.events();
        let state = self.state();
        self.add_watch(path, WatchKind::PersistentRecursive).await?;
        let mut stream = WatchStream {
            client: self.clone(),
            registration,
            after: 0,
            events,
            state,
        };
        // The replica handles frames in order: once this read is answered,
        // the watch is registered there.
        let response = self
            .request(Op::Exists { path: path.into() }, None, None)
            .await?;
        response.result?;
        stream.after = response.revision;
        Ok(stream)
    }
}

impl Watch {
    fn at(mut self, revision: Revision) -> Watch {
        self.after = revision;
        self
    }
}
