//! The session task: one per client, owning the connection to the replica
//! it is attached to.
//!
//! Requests are numbered by the session's sequence and pipelined on the
//! session stream; answers are matched by sequence. Events and lock grants
//! arrive on the same ordered stream and go to their subscribers. When the
//! connection fails, the task tries the other endpoints until the session
//! timeout runs out, resumes the session there (re-registering watches with
//! the last revision seen, so missed events are replayed), and sends again
//! every request not yet answered: the replica's state machine answers a
//! repeated `(session, sequence)` with its original result.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use synod_proto::tls::{connect, FrameReader, Handshaken};
use synod_proto::wire::{
    encode_frame, ClientFrame, ClusterStatus, ReadConsistency, ServerFrame, WatchRegistration,
};
use synod_proto::{Event, Op, Request, Response, Revision, Sequencer, SessionId, WatchKind};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::error::ClientError;

/// The session's state, observable as a stream with [`crate::Client::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Attached to a replica.
    Connected {
        /// The session.
        session: SessionId,
        /// The replica serving it.
        node_id: u64,
    },
    /// The connection failed; looking for another replica.
    Suspended,
    /// The session is gone for good.
    Expired,
    /// The client was closed.
    Closed,
}

/// A lock grant that arrived for a queued acquire or campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The fencing token.
    pub sequencer: Sequencer,
    /// Whether it is the leadership of an election.
    pub election: bool,
}

/// What callers ask of the session task.
pub(crate) enum Call {
    Request {
        op: Op,
        consistency: ReadConsistency,
        watch: Option<WatchKind>,
        reply: oneshot::Sender<Result<Response, ClientError>>,
    },
    AddWatch {
        registration: WatchRegistration,
    },
    RemoveWatch {
        registration: WatchRegistration,
    },
    Status {
        reply: oneshot::Sender<Result<ClusterStatus, ClientError>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// Settings of the session task.
#[derive(Clone)]
pub(crate) struct SessionSettings {
    pub endpoints: Vec<(SocketAddr, String)>,
    pub endpoint: quinn::Endpoint,
    pub session_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub frame_bytes_max: u64,
}

struct Outstanding {
    request: Request,
    consistency: ReadConsistency,
    watch: Option<WatchKind>,
    reply: oneshot::Sender<Result<Response, ClientError>>,
    sent_at: Instant,
}

pub(crate) struct Shared {
    pub events: broadcast::Sender<Event>,
    pub grants: broadcast::Sender<Grant>,
    pub state: watch::Sender<SessionState>,
}

/// Opens a session on the first replica that answers, and starts the task.
pub(crate) async fn start(
    settings: SessionSettings,
    shared: Arc<Shared>,
) -> Result<mpsc::Sender<Call>, ClientError> {
    let mut last_error = String::from("no endpoints");
    let deadline = Instant::now() + Duration::from_millis(settings.session_timeout_ms.max(2000));
    while Instant::now() < deadline {
        for (address, name) in &settings.endpoints {
            match open(&settings, *address, name).await {
                Ok((link, session, timeout_ms, revision)) => {
                    let (calls, receiver) = mpsc::channel(1024);
                    let task = SessionTask {
                        settings: settings.clone(),
                        shared: shared.clone(),
                        session,
                        timeout_ms,
                        next_sequence: 1,
                        last_revision: revision,
                        outstanding: BTreeMap::new(),
                        watches: BTreeSet::new(),
                        status_waiters: Vec::new(),
                        endpoint_index: 0,
                    };
                    let _ = shared.state.send(SessionState::Connected {
                        session,
                        node_id: link.node_id,
                    });
                    tokio::spawn(task.run(link, receiver));
                    return Ok(calls);
                }
                Err(error) => last_error = format!("{address}: {error}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(ClientError::ConnectionLost(last_error))
}

struct Link {
    send: quinn::SendStream,
    frames: FrameReader,
    node_id: u64,
    connection: quinn::Connection,
}

async fn dial(settings: &SessionSettings, address: SocketAddr, name: &str) -> Result<Link, String> {
    let timeout = Duration::from_millis(settings.request_timeout_ms.min(5000));
    let Handshaken {
        connection,
        send,
        frames,
        node_id,
        ..
    } = connect(
        &settings.endpoint,
        address,
        name,
        settings.frame_bytes_max,
        timeout,
    )
    .await
    .map_err(|error| error.to_string())?;
    Ok(Link {
        send,
        frames,
        node_id,
        connection,
    })
}

async fn open(
    settings: &SessionSettings,
    address: SocketAddr,
    name: &str,
) -> Result<(Link, SessionId, u64, Revision), String> {
    let mut link = dial(settings, address, name).await?;
    let frame = ClientFrame::OpenSession {
        timeout_ms: settings.session_timeout_ms,
    };
    link.send
        .write_all(&encode_frame(&frame))
        .await
        .map_err(|error| error.to_string())?;
    let timeout = Duration::from_millis(settings.request_timeout_ms);
    let answer = tokio::time::timeout(timeout, link.frames.next::<ServerFrame>())
        .await
        .map_err(|_| "no answer to opening a session".to_string())?
        .map_err(|error| error.to_string())?;
    match answer {
        Some(ServerFrame::SessionReady {
            session,
            timeout_ms,
            revision,
        }) => Ok((link, session, timeout_ms, revision)),
        Some(ServerFrame::Unavailable { reason }) => Err(reason),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

struct SessionTask {
    settings: SessionSettings,
    shared: Arc<Shared>,
    session: SessionId,
    timeout_ms: u64,
    next_sequence: u64,
    last_revision: Revision,
    outstanding: BTreeMap<u64, Outstanding>,
    watches: BTreeSet<WatchRegistration>,
    status_waiters: Vec<oneshot::Sender<Result<ClusterStatus, ClientError>>>,
    endpoint_index: usize,
}

enum Exit {
    Closed,
    Expired,
    Disconnected,
}

impl SessionTask {
    async fn run(mut self, mut link: Link, mut calls: mpsc::Receiver<Call>) {
        loop {
            let exit = self.serve(&mut link, &mut calls).await;
            link.connection.close(0u32.into(), b"client leaving");
            match exit {
                Exit::Closed => {
                    let _ = self.shared.state.send(SessionState::Closed);
                    self.fail_all(ClientError::Closed);
                    return;
                }
                Exit::Expired => {
                    let _ = self.shared.state.send(SessionState::Expired);
                    self.fail_all(ClientError::SessionExpired);
                    return;
                }
                Exit::Disconnected => {
                    let _ = self.shared.state.send(SessionState::Suspended);
                    match self.reconnect(&mut calls).await {
                        Some(new_link) => link = new_link,
                        None => {
                            let _ = self.shared.state.send(SessionState::Expired);
                            self.fail_all(ClientError::SessionExpired);
                            return;
                        }
                    }
                }
            }
        }
    }

    fn fail_all(&mut self, error: ClientError) {
        for (_, outstanding) in std::mem::take(&mut self.outstanding) {
            let _ = outstanding.reply.send(Err(error.clone()));
        }
        for waiter in self.status_waiters.drain(..) {
            let _ = waiter.send(Err(error.clone()));
        }
    }

    async fn write(&self, link: &mut Link, frame: &ClientFrame) -> bool {
        link.send.write_all(&encode_frame(frame)).await.is_ok()
    }

    async fn serve(&mut self, link: &mut Link, calls: &mut mpsc::Receiver<Call>) -> Exit {
        let keep_alive_every = Duration::from_millis((self.timeout_ms / 3).max(50));
        let mut keep_alive = tokio::time::interval(keep_alive_every);
        let mut timeouts = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                call = calls.recv() => {
                    let Some(call) = call else { return Exit::Closed };
                    match call {
                        Call::Request { op, consistency, watch, reply } => {
                            let sequence = self.next_sequence;
                            self.next_sequence += 1;
                            let request = Request { session: self.session, sequence, op };
                            let frame = ClientFrame::Request {
                                request: request.clone(),
                                consistency,
                                watch,
                            };
                            self.outstanding.insert(sequence, Outstanding {
                                request,
                                consistency,
                                watch,
                                reply,
                                sent_at: Instant::now(),
                            });
                            if !self.write(link, &frame).await {
                                return Exit::Disconnected;
                            }
                        }
                        Call::AddWatch { registration } => {
                            self.watches.insert(registration.clone());
                            if !self.write(link, &ClientFrame::AddWatch(registration)).await {
                                return Exit::Disconnected;
                            }
                        }
                        Call::RemoveWatch { registration } => {
                            self.watches.remove(&registration);
                            if !self.write(link, &ClientFrame::RemoveWatch(registration)).await {
                                return Exit::Disconnected;
                            }
                        }
                        Call::Status { reply } => {
                            self.status_waiters.push(reply);
                            if !self.write(link, &ClientFrame::Status).await {
                                return Exit::Disconnected;
                            }
                        }
                        Call::Close { reply } => {
                            let sequence = self.next_sequence;
                            self.next_sequence += 1;
                            let frame = ClientFrame::Request {
                                request: Request { session: self.session, sequence, op: Op::CloseSession },
                                consistency: ReadConsistency::Linearizable,
                                watch: None,
                            };
                            if self.write(link, &frame).await {
                                let wait = Duration::from_millis(self.settings.request_timeout_ms);
                                let _ = tokio::time::timeout(wait, async {
                                    while let Ok(Some(frame)) = link.frames.next::<ServerFrame>().await {
                                        if matches!(&frame, ServerFrame::Response { sequence: s, .. } if *s == sequence) {
                                            break;
                                        }
                                        self.on_frame(frame);
                                    }
                                }).await;
                            }
                            let _ = reply.send(());
                            return Exit::Closed;
                        }
                    }
                }
                frame = link.frames.next::<ServerFrame>() => {
                    match frame {
                        Ok(Some(ServerFrame::SessionExpired { .. })) => return Exit::Expired,
                        Ok(Some(frame)) => self.on_frame(frame),
                        Ok(None) | Err(_) => return Exit::Disconnected,
                    }
                }
                _ = keep_alive.tick() => {
                    if !self.write(link, &ClientFrame::KeepAlive).await {
                        return Exit::Disconnected;
                    }
                }
                _ = timeouts.tick() => self.expire_requests(),
            }
        }
    }

    fn expire_requests(&mut self) {
        let limit = Duration::from_millis(self.settings.request_timeout_ms);
        let expired: Vec<u64> = self
            .outstanding
            .iter()
            .filter(|(_, o)| o.sent_at.elapsed() > limit)
            .map(|(&sequence, _)| sequence)
            .collect();
        for sequence in expired {
            if let Some(outstanding) = self.outstanding.remove(&sequence) {
                let _ = outstanding
                    .reply
                    .send(Err(ClientError::Timeout(self.settings.request_timeout_ms)));
            }
        }
    }

    fn on_frame(&mut self, frame: ServerFrame) {
        match frame {
            ServerFrame::Response { sequence, response } => {
                self.last_revision = self.last_revision.max(response.revision);
                if let Some(outstanding) = self.outstanding.remove(&sequence) {
                    let result = match &response.result {
                        Err(synod_proto::Error::StaleRequestSequence { .. }) => {
                            Err(ClientError::OutcomeUnknown)
                        }
                        _ => Ok(response),
                    };
                    let _ = outstanding.reply.send(result);
                }
            }
            ServerFrame::Event(event) => {
                self.last_revision = self.last_revision.max(event.revision);
                // One-shot watches are gone once they fire.
                self.watches.retain(|w| {
                    w.kind.is_persistent()
                        || !w.kind.fires_on(&w.path, &event.path, event.event_type)
                });
                let _ = self.shared.events.send(event);
            }
            ServerFrame::LockGranted {
                sequencer,
                election,
            } => {
                let _ = self.shared.grants.send(Grant {
                    sequencer,
                    election,
                });
            }
            ServerFrame::Status(status) => {
                if !self.status_waiters.is_empty() {
                    let waiter = self.status_waiters.remove(0);
                    let _ = waiter.send(Ok(status));
                }
            }
            ServerFrame::SessionReady { revision, .. } => {
                self.last_revision = self.last_revision.max(revision);
            }
            ServerFrame::Unavailable { reason } => {
                tracing::debug!(%reason, "replica unavailable");
            }
            ServerFrame::SessionExpired { .. } => {}
        }
    }

    /// Finds another replica within the session timeout and resumes there.
    async fn reconnect(&mut self, calls: &mut mpsc::Receiver<Call>) -> Option<Link> {
        let give_up = Instant::now() + Duration::from_millis(self.timeout_ms);
        let count = self.settings.endpoints.len();
        let mut delay = Duration::from_millis(20);
        while Instant::now() < give_up {
            self.endpoint_index = (self.endpoint_index + 1) % count.max(1);
            let (address, name) = self.settings.endpoints[self.endpoint_index].clone();
            if let Ok(mut link) = dial(&self.settings, address, &name).await {
                let frame = ClientFrame::ResumeSession {
                    session: self.session,
                    last_revision: self.last_revision,
                    watches: self.watches.iter().cloned().collect(),
                };
                if self.write(&mut link, &frame).await {
                    let wait = Duration::from_millis(self.settings.request_timeout_ms.min(3000));
                    match tokio::time::timeout(wait, link.frames.next::<ServerFrame>()).await {
                        Ok(Ok(Some(ServerFrame::SessionReady { revision, .. }))) => {
                            self.last_revision = self.last_revision.max(revision);
                            let _ = self.shared.state.send(SessionState::Connected {
                                session: self.session,
                                node_id: link.node_id,
                            });
                            if self.resend(&mut link).await {
                                return Some(link);
                            }
                        }
                        Ok(Ok(Some(ServerFrame::SessionExpired { .. }))) => return None,
                        _ => {}
                    }
                }
                link.connection.close(0u32.into(), b"resume failed");
            }
            // Callers that gave up meanwhile are answered as usual; new
            // calls wait for the connection.
            self.expire_requests();
            if calls.is_closed() {
                return None;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
        None
    }

    /// Sends every unanswered request again, in order, with its sequence.
    async fn resend(&mut self, link: &mut Link) -> bool {
        let frames: Vec<ClientFrame> = self
            .outstanding
            .values()
            .map(|o| ClientFrame::Request {
                request: o.request.clone(),
                consistency: o.consistency,
                watch: o.watch,
            })
            .collect();
        for frame in frames {
            if !self.write(link, &frame).await {
                return false;
            }
        }
        true
    }
}
