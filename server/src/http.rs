//! The replica's HTTP listener (`monitoring.http_address`), plain HTTP for
//! Prometheus, load balancers and Kubernetes probes:
//!
//! - `GET /metrics`: every metric of [`Metrics`], in Prometheus' text
//!   format (OpenMetrics);
//! - `GET /livez`: 200 while the replica's event loop runs;
//! - `GET /readyz`: 200 when the replica knows a leader, is not joining
//!   (rejoining after a lost disk), and its applied slot trails the highest
//!   chosen slot it has heard of by at most
//!   `monitoring.ready_lag_slots_max`; 503 otherwise.
//!
//! The health answers carry a short JSON body saying why. Everything they
//! read is what the event loop last published to the metrics (every 50 ms),
//! so a scrape or a probe never waits for the event loop and never slows
//! it down.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::metrics::{gauge_value, Metrics};

/// What the handlers read.
struct Shared {
    node: u64,
    metrics: Arc<Metrics>,
    database: PathBuf,
    ready_lag_slots_max: u64,
    /// Set while the event loop runs: `/livez` fails once it has stopped.
    running: watch::Receiver<bool>,
}

/// A running HTTP listener.
#[derive(Debug)]
pub struct HttpServer {
    address: SocketAddr,
    task: JoinHandle<()>,
}

impl HttpServer {
    /// Binds `address` and serves until `shutdown` turns true. `running`
    /// says whether the event loop still runs.
    ///
    /// # Errors
    /// The address could not be bound.
    pub async fn start(
        address: SocketAddr,
        node: u64,
        metrics: Arc<Metrics>,
        database: PathBuf,
        ready_lag_slots_max: u64,
        running: watch::Receiver<bool>,
        mut shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<HttpServer> {
        let listener = tokio::net::TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared {
            node,
            metrics,
            database,
            ready_lag_slots_max,
            running,
        });
        let app = Router::new()
            .route("/metrics", get(serve_metrics))
            .route("/livez", get(livez))
            .route("/readyz", get(readyz))
            .with_state(shared);
        let task = tokio::spawn(async move {
            let stopped = async move {
                while !*shutdown.borrow_and_update() {
                    if shutdown.changed().await.is_err() {
                        return;
                    }
                }
            };
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
            {
                tracing::warn!(node, %error, "the HTTP listener stopped");
            }
        });
        tracing::info!(node, %address, "HTTP listener for metrics and health serving");
        Ok(HttpServer { address, task })
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Waits until it has stopped (after the shutdown it was given).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

async fn serve_metrics(State(shared): State<Arc<Shared>>) -> Response {
    if let Ok(metadata) = std::fs::metadata(&shared.database) {
        shared
            .metrics
            .database_bytes
            .set(gauge_value(metadata.len()));
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.render(),
    )
        .into_response()
}

/// The body of `/livez`.
#[derive(Serialize)]
struct Liveness {
    live: bool,
    node: u64,
}

async fn livez(State(shared): State<Arc<Shared>>) -> Response {
    let live = *shared.running.borrow();
    let status = if live {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(
        status,
        &Liveness {
            live,
            node: shared.node,
        },
    )
}

/// The body of `/readyz`.
#[derive(Serialize)]
struct Readiness {
    ready: bool,
    node: u64,
    role: &'static str,
    leader: Option<u64>,
    applied_slot: u64,
    lag_slots: u64,
    /// Why it is not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let readiness = readiness(&shared);
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, &readiness)
}

fn readiness(shared: &Shared) -> Readiness {
    let metrics = &shared.metrics;
    let role = metrics.role();
    let leader = u64::try_from(metrics.leader.get())
        .ok()
        .filter(|&leader| leader != 0);
    let applied = u64::try_from(metrics.applied_slot.get()).unwrap_or(0);
    let known = u64::try_from(metrics.known_chosen_slot.get()).unwrap_or(0);
    let lag = known.saturating_sub(applied);
    let reason = if !*shared.running.borrow() {
        Some("the replica has stopped".to_string())
    } else if role == "joining" {
        Some("rejoining after a lost disk: not voting until caught up".to_string())
    } else if leader.is_none() {
        Some("no leader is known".to_string())
    } else if lag > shared.ready_lag_slots_max {
        Some(format!(
            "{lag} slots behind the cluster (limit `monitoring.ready_lag_slots_max` is {})",
            shared.ready_lag_slots_max
        ))
    } else {
        None
    };
    Readiness {
        ready: reason.is_none(),
        node: shared.node,
        role,
        leader,
        applied_slot: applied,
        lag_slots: lag,
        reason,
    }
}

fn json(status: StatusCode, body: &impl Serialize) -> Response {
    let text = serde_json::to_string(body).unwrap_or_else(|_| "{}".to_string());
    (status, [(header::CONTENT_TYPE, "application/json")], text).into_response()
}
