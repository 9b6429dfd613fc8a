//! What one client connection may make the replica hold, in requests and
//! bytes, shared by the connection's reader and writer tasks and the
//! replica's event loop.
//!
//! Two budgets, each a named bound of `[limits]`:
//!
//! - **Pending requests** (`pending_requests_per_connection_max` in count,
//!   `pending_request_bytes_per_connection_max` in bytes): every frame the
//!   reader takes from the client is charged from the moment it is read
//!   until the event loop settles it: at once for keep-alives, watch
//!   changes and status; when answered for requests, session opens and
//!   resumes. A request, open or resume that does not fit is answered by the
//!   reader with an error naming the limit and never reaches the event loop;
//!   any other frame that does not fit waits (the reader stops reading, and
//!   QUIC flow control stops the client).
//! - **Queued replies** (`reply_queue_bytes_per_connection_max`): encoded
//!   frames waiting for the writer. At half the bound the reader stops
//!   reading from the client and the event loop holds back reads for it
//!   (they are served as the queue drains), so a client that does not read
//!   its replies stops being read rather than being queued for. Frames that
//!   cannot wait (events, answers to writes) are queued past that; a queue
//!   that reaches the whole bound belongs to a client that reads nothing,
//!   and its connection is closed with a reason naming the limit.
//!
//! Every charge is an atomic add on the connection's own counters: nothing
//! is shared between connections, so one client's budget never touches
//! another's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use synod_proto::wire::{encode_frame, ServerFrame};
use tokio::sync::{mpsc, Notify};

/// Bytes charged per queued reply beyond its encoding: the channel node and
/// vector header it costs in memory.
pub const REPLY_OVERHEAD_BYTES: u64 = 64;

/// Bytes charged per pending frame beyond its encoding: the decoded
/// frame's headers and the event loop's record of it.
pub const PENDING_OVERHEAD_BYTES: u64 = 256;

/// The bounds of one connection's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionBounds {
    /// Requests, session opens and resumes waiting for an answer.
    pub pending_requests_max: u64,
    /// Bytes of frames read and not yet settled.
    pub pending_bytes_max: u64,
    /// Bytes of replies queued for the writer.
    pub reply_bytes_max: u64,
}

impl Default for ConnectionBounds {
    fn default() -> Self {
        ConnectionBounds {
            pending_requests_max: 4096,
            pending_bytes_max: 16 << 20,
            reply_bytes_max: 16 << 20,
        }
    }
}

/// Why a frame was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Too many requests pending; answer the request with this error.
    Requests(synod_proto::Error),
    /// Not enough pending bytes left; a request is answered with this
    /// error, another frame waits for room.
    Bytes(synod_proto::Error),
}

/// One connection's counters. See the module docs.
#[derive(Debug)]
pub struct ConnectionBudget {
    bounds: ConnectionBounds,
    pending_requests: AtomicU64,
    pending_bytes: AtomicU64,
    reply_bytes: AtomicU64,
    /// Woken when pending frames are settled or replies written.
    room: Notify,
    /// Set once: the connection must close, with this reason.
    closing: Mutex<Option<String>>,
    closed: Notify,
}

impl ConnectionBudget {
    /// A fresh budget with nothing charged.
    pub fn new(bounds: ConnectionBounds) -> Arc<ConnectionBudget> {
        Arc::new(ConnectionBudget {
            bounds,
            pending_requests: AtomicU64::new(0),
            pending_bytes: AtomicU64::new(0),
            reply_bytes: AtomicU64::new(0),
            room: Notify::new(),
            closing: Mutex::new(None),
            closed: Notify::new(),
        })
    }

    /// The bounds in force.
    pub fn bounds(&self) -> ConnectionBounds {
        self.bounds
    }

    /// Requests pending now.
    pub fn pending_requests(&self) -> u64 {
        self.pending_requests.load(Ordering::Acquire)
    }

    /// Bytes pending now.
    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes.load(Ordering::Acquire)
    }

    /// Bytes of replies queued now.
    pub fn reply_bytes(&self) -> u64 {
        self.reply_bytes.load(Ordering::Acquire)
    }

    /// Whether replies are backed up past half the bound: the reader stops
    /// reading and reads are held back until the writer drains them.
    pub fn replies_backlogged(&self) -> bool {
        self.reply_bytes() >= self.bounds.reply_bytes_max / 2
    }

    /// Charges a frame of `cost` bytes read from the client; `request` for
    /// requests, opens and resumes, which also count against the pending
    /// requests bound.
    ///
    /// # Errors
    /// [`Refusal`] naming the bound that would be passed; nothing is charged.
    pub fn admit(&self, cost: u64, request: bool) -> Result<(), Refusal> {
        let cost = cost + PENDING_OVERHEAD_BYTES;
        let bounds = self.bounds;
        if request {
            let pending = self.pending_requests.fetch_add(1, Ordering::AcqRel);
            if pending >= bounds.pending_requests_max {
                self.pending_requests.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::Requests(synod_proto::Error::limit_exceeded(
                    "pending_requests_per_connection_max",
                    bounds.pending_requests_max,
                    format!(
                        "this connection already has {pending} requests waiting for an \
                         answer; wait for some before sending more"
                    ),
                )));
            }
        }
        let bytes = self.pending_bytes.fetch_add(cost, Ordering::AcqRel);
        if bytes.saturating_add(cost) > bounds.pending_bytes_max {
            self.pending_bytes.fetch_sub(cost, Ordering::AcqRel);
            if request {
                self.pending_requests.fetch_sub(1, Ordering::AcqRel);
            }
            return Err(Refusal::Bytes(synod_proto::Error::limit_exceeded(
                "pending_request_bytes_per_connection_max",
                bounds.pending_bytes_max,
                format!(
                    "this connection already has {bytes} bytes of requests waiting for an \
                     answer; wait for some before sending more"
                ),
            )));
        }
        Ok(())
    }

    /// Returns what [`ConnectionBudget::admit`] charged for a frame of
    /// `cost` bytes, once the event loop is done with it.
    pub fn settle(&self, cost: u64, request: bool) {
        let cost = cost + PENDING_OVERHEAD_BYTES;
        if request {
            saturating_sub(&self.pending_requests, 1);
        }
        saturating_sub(&self.pending_bytes, cost);
        self.room.notify_waiters();
    }

    /// Waits until `ready` holds, rechecking it whenever pending frames
    /// are settled or replies written (no wake-up is lost between the check
    /// and the wait).
    pub async fn wait_until(&self, ready: impl Fn(&ConnectionBudget) -> bool) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if ready(self) {
                return;
            }
            notified.await;
        }
    }

    /// Called by the writer after `bytes` of queued replies went out.
    pub fn replies_written(&self, bytes: u64) {
        saturating_sub(&self.reply_bytes, bytes);
        self.room.notify_waiters();
    }

    /// Asks the connection's writer to close it with `reason` (the first
    /// reason given wins).
    pub fn close(&self, reason: String) {
        if let Ok(mut closing) = self.closing.lock() {
            if closing.is_none() {
                *closing = Some(reason);
            }
        }
        self.closed.notify_waiters();
    }

    /// The reason the connection must close, once [`ConnectionBudget::close`]
    /// was called.
    pub fn closing_reason(&self) -> Option<String> {
        self.closing.lock().ok().and_then(|closing| closing.clone())
    }

    /// Resolves once [`ConnectionBudget::close`] was called.
    pub async fn closed(&self) {
        loop {
            let notified = self.closed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.closing_reason().is_some() {
                return;
            }
            notified.await;
        }
    }
}

fn saturating_sub(counter: &AtomicU64, amount: u64) {
    let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |value| {
        Some(value.saturating_sub(amount))
    });
}

/// One encoded frame for the writer, with what it was charged.
#[derive(Debug)]
pub struct QueuedReply {
    /// The frame, length prefix included.
    pub bytes: Vec<u8>,
    /// Bytes charged to the reply budget.
    pub cost: u64,
}

/// The event loop's end of a connection's reply queue: frames are encoded
/// here and charged to the connection's reply budget.
#[derive(Debug, Clone)]
pub struct ReplySender {
    queue: mpsc::UnboundedSender<QueuedReply>,
    budget: Arc<ConnectionBudget>,
}

/// The reply queue is full, or the connection is gone: the client does not
/// read what it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyQueueFull;

impl ReplySender {
    /// A queue charging `budget`, drained by the writer from `receiver`.
    pub fn new(
        budget: Arc<ConnectionBudget>,
    ) -> (ReplySender, mpsc::UnboundedReceiver<QueuedReply>) {
        let (queue, receiver) = mpsc::unbounded_channel();
        (ReplySender { queue, budget }, receiver)
    }

    /// The connection's budget.
    pub fn budget(&self) -> &Arc<ConnectionBudget> {
        &self.budget
    }

    /// Encodes and queues a frame.
    ///
    /// # Errors
    /// [`ReplyQueueFull`] when it would take the queue past its bound (the
    /// caller should close the connection) or the writer is gone.
    pub fn send(&self, frame: &ServerFrame) -> Result<(), ReplyQueueFull> {
        enqueue(&self.queue, &self.budget, frame)
    }

    /// A sender that does not keep the queue open: the session ends when
    /// the event loop drops its senders, whoever else holds a weak one.
    pub fn downgrade(&self) -> WeakReplySender {
        WeakReplySender {
            queue: self.queue.downgrade(),
            budget: self.budget.clone(),
        }
    }
}

/// A [`ReplySender`] that does not keep the session open (the reader's,
/// for its own answers to requests over the budget).
#[derive(Debug, Clone)]
pub struct WeakReplySender {
    queue: mpsc::WeakUnboundedSender<QueuedReply>,
    budget: Arc<ConnectionBudget>,
}

impl WeakReplySender {
    /// As [`ReplySender::send`]; also fails once the session ended.
    ///
    /// # Errors
    /// [`ReplyQueueFull`].
    pub fn send(&self, frame: &ServerFrame) -> Result<(), ReplyQueueFull> {
        let queue = self.queue.upgrade().ok_or(ReplyQueueFull)?;
        enqueue(&queue, &self.budget, frame)
    }
}

fn enqueue(
    queue: &mpsc::UnboundedSender<QueuedReply>,
    budget: &ConnectionBudget,
    frame: &ServerFrame,
) -> Result<(), ReplyQueueFull> {
    let bytes = encode_frame(frame);
    let cost = bytes.len() as u64 + REPLY_OVERHEAD_BYTES;
    let queued = budget.reply_bytes.fetch_add(cost, Ordering::AcqRel);
    if queued.saturating_add(cost) > budget.bounds.reply_bytes_max {
        saturating_sub(&budget.reply_bytes, cost);
        return Err(ReplyQueueFull);
    }
    queue.send(QueuedReply { bytes, cost }).map_err(|_| {
        saturating_sub(&budget.reply_bytes, cost);
        ReplyQueueFull
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> ConnectionBounds {
        ConnectionBounds {
            pending_requests_max: 2,
            pending_bytes_max: 3 * PENDING_OVERHEAD_BYTES + 100,
            reply_bytes_max: 1000,
        }
    }

    #[test]
    fn pending_requests_are_bounded_in_count_and_bytes() {
        let budget = ConnectionBudget::new(bounds());
        budget.admit(10, true).expect("first");
        budget.admit(10, true).expect("second");
        assert!(matches!(budget.admit(10, true), Err(Refusal::Requests(_))));
        budget.admit(10, false).expect("a keep-alive still fits");
        assert!(matches!(budget.admit(500, false), Err(Refusal::Bytes(_))));
        budget.settle(10, true);
        budget.admit(10, true).expect("room again");
        assert_eq!(budget.pending_requests(), 2);
        for request in [true, true, false] {
            budget.settle(10, request);
        }
        assert_eq!((budget.pending_requests(), budget.pending_bytes()), (0, 0));
    }

    #[test]
    fn replies_are_bounded_in_bytes() {
        let budget = ConnectionBudget::new(bounds());
        let (sender, mut receiver) = ReplySender::new(budget.clone());
        let frame = ServerFrame::Unavailable {
            reason: "x".repeat(300),
        };
        sender.send(&frame).expect("one fits");
        assert!(!budget.replies_backlogged());
        sender.send(&frame).expect("two fit");
        assert!(budget.replies_backlogged());
        assert_eq!(sender.send(&frame), Err(ReplyQueueFull));
        let written = receiver.try_recv().expect("queued");
        budget.replies_written(written.cost);
        assert!(!budget.replies_backlogged());
        let error = synod_proto::Error::limit_exceeded("x", 1, "y");
        assert!(error.to_string().contains("limits.x"));
    }
}
