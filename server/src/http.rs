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
//!
//! Bounds: at most `limits.http_connections_max` connections at once (one
//! more is closed as soon as it is accepted, and counted in
//! `synod_refused_total{limit="http_connections_max"}`), and a connection
//! that takes longer than `limits.http_header_timeout_ms` to send a
//! request's headers, or sits idle that long between requests, is closed.
//! HTTP/1.1 only (hyper), with keep-alive.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use synod_proto::wire::ClusterStatus;

use crate::metrics::{gauge_value, Metrics};
use crate::storage::DatabasePaths;
use crate::transport::cancelled;

/// What the handlers read.
struct Shared {
    node: u64,
    metrics: Arc<Metrics>,
    databases: DatabasePaths,
    ready_lag_slots_max: u64,
    /// Set while the event loop runs: `/livez` fails once it has stopped.
    running: watch::Receiver<bool>,
    /// The replica's status, for what it waits for when it is not ready.
    status: watch::Receiver<ClusterStatus>,
}

/// How an [`HttpServer`] is set up.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Where to listen (port 0 picks one; see [`HttpServer::address`]).
    pub address: SocketAddr,
    /// The replica, named in the health answers.
    pub node: u64,
    /// The replica's database files, whose size `/metrics` reports.
    pub databases: DatabasePaths,
    /// `monitoring.ready_lag_slots_max`.
    pub ready_lag_slots_max: u64,
    /// `limits.http_connections_max`.
    pub connections_max: usize,
    /// `limits.http_header_timeout_ms`.
    pub header_timeout: Duration,
}

/// A running HTTP listener.
#[derive(Debug)]
pub struct HttpServer {
    address: SocketAddr,
    task: JoinHandle<()>,
}

impl HttpServer {
    /// Binds `settings.address` and serves until `shutdown` turns true.
    /// `running` says whether the event loop still runs; `status` is the
    /// replica's latest status (its `waiting` explains an unready replica).
    ///
    /// # Errors
    /// The address could not be bound.
    pub async fn start(
        settings: HttpSettings,
        metrics: Arc<Metrics>,
        running: watch::Receiver<bool>,
        status: watch::Receiver<ClusterStatus>,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<HttpServer> {
        let listener = TcpListener::bind(settings.address).await?;
        let address = listener.local_addr()?;
        let node = settings.node;
        let shared = Arc::new(Shared {
            node,
            metrics,
            databases: settings.databases.clone(),
            ready_lag_slots_max: settings.ready_lag_slots_max,
            running,
            status,
        });
        let task = tokio::spawn(accept(listener, settings, shared, shutdown));
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

/// Accepts connections until `shutdown`, within the connection bound, then
/// ends the open ones gracefully.
async fn accept(
    listener: TcpListener,
    settings: HttpSettings,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(shared.clone());
    let permits = Arc::new(Semaphore::new(settings.connections_max));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = cancelled(&mut shutdown) => break,
            accepted = listener.accept() => accepted,
        };
        while connections.try_join_next().is_some() {}
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors, most likely: wait for some to close.
                tracing::warn!(node = settings.node, %error, "cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shared.metrics.refused("http_connections_max").inc();
            tracing::info!(
                node = settings.node,
                %remote,
                "HTTP connection refused: `limits.http_connections_max` ({}) are open",
                settings.connections_max
            );
            drop(stream);
            continue;
        };
        connections.spawn(serve_connection(
            stream,
            permit,
            app.clone(),
            settings.header_timeout,
            shutdown.clone(),
        ));
    }
    while connections.join_next().await.is_some() {}
}

/// Serves one connection, holding its permit, until it closes, times out,
/// or the listener shuts down.
async fn serve_connection(
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    app: Router,
    header_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%error, "HTTP connection ended with an error");
            }
        }
        () = cancelled(&mut shutdown) => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(header_timeout, connection).await;
        }
    }
}

async fn serve_metrics(State(shared): State<Arc<Shared>>) -> Response {
    shared
        .metrics
        .database_bytes
        .set(gauge_value(shared.databases.bytes()));
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
    let waiting = shared.status.borrow().replica.waiting.clone();
    let reason = if !*shared.running.borrow() {
        Some("the replica has stopped".to_string())
    } else if leader.is_none() && waiting.is_some() {
        waiting
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
