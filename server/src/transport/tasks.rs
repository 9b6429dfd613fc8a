//! Tracking of the tasks a listener spawns, for a graceful shutdown: every
//! task holds a clone of [`Tasks`]; shutdown signals them and waits until
//! every clone is gone (the mini-redis pattern).

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Mutex};

/// Handed to every task: spawns more tasks and tells when to stop.
#[derive(Clone, Debug)]
pub(crate) struct Tasks {
    alive: mpsc::Sender<()>,
    shutdown: watch::Receiver<bool>,
}

impl Tasks {
    /// Spawns `future` as a tracked task.
    pub(crate) fn spawn<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let alive = self.alive.clone();
        tokio::spawn(async move {
            future.await;
            drop(alive);
        });
    }

    /// A receiver of the shutdown signal, for [`cancelled`].
    pub(crate) fn shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }
}

/// Completes once shutdown is signalled (or its sender is gone).
pub(crate) async fn cancelled(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Owned by the listener: signals shutdown and waits for the tasks.
#[derive(Debug)]
pub(crate) struct Supervisor {
    shutdown: watch::Sender<bool>,
    done: Mutex<mpsc::Receiver<()>>,
}

impl Supervisor {
    /// A supervisor and the first handle to give to tasks.
    pub(crate) fn new() -> (Supervisor, Tasks) {
        let (shutdown, shutdown_receiver) = watch::channel(false);
        let (alive, done) = mpsc::channel(1);
        (
            Supervisor {
                shutdown,
                done: Mutex::new(done),
            },
            Tasks {
                alive,
                shutdown: shutdown_receiver,
            },
        )
    }

    /// Tells every task to stop.
    pub(crate) fn signal(&self) {
        self.shutdown.send_replace(true);
    }

    /// Waits until every task ended, at most `timeout`; `false` if some
    /// were still running then. May be called again.
    pub(crate) async fn wait(&self, timeout: Duration) -> bool {
        // No task ever sends, so `recv` returns `None` once every `Tasks`
        // clone is dropped (and at once on later calls).
        let wait = async { self.done.lock().await.recv().await };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}
