//! Certificate rotation without a restart. A task of its own looks at the
//! replica's three TLS files every `tls.reload_check_ms`, and whenever it
//! is told to (`synod-server` tells it on SIGHUP). When the files changed
//! (their length, modification time or inode: a replaced file, or a
//! Kubernetes Secret's symlink swapped), or on every SIGHUP, it loads and
//! checks them as a start does (`ReplicaConfig::load_tls`: the certificate
//! chains to the CA, names this replica, and the key is its own) and puts
//! them in place on both endpoints ([`TlsReloader`]). Connections made from
//! then on use the new certificate; open ones keep theirs.
//!
//! Files that do not pass are refused with a warning saying why, counted
//! in `tls_reload_failures_total`, and the endpoints keep what they had; a
//! file written in several steps (the certificate first, then its key) is
//! taken once it is whole. Loading runs on a blocking thread, never on the
//! event loop. `tls_certificate_expiry_seconds` says when the certificate
//! in use expires, and a certificate within [`EXPIRY_WARNING_DAYS`] of its
//! end is warned about at every load.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use synod_proto::tls::{certificate_not_after, TlsMaterial};
use tokio::sync::{watch, Notify};

use crate::config::ReplicaConfig;
use crate::metrics::Metrics;
use crate::transport::{TlsReloader, TransportError};

/// A certificate this close to its end is warned about when loaded.
pub const EXPIRY_WARNING_DAYS: u64 = 30;

/// What one file looked like: its length, modification time and inode.
type FileLook = (u64, Option<SystemTime>, u64);

/// What the files looked like when last looked at: per file, its
/// [`FileLook`], or the error looking at it, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Fingerprint(Vec<Result<FileLook, String>>);

impl Fingerprint {
    /// Looks at `files` now (following symlinks).
    pub(super) fn of(files: &[PathBuf]) -> Fingerprint {
        Fingerprint(
            files
                .iter()
                .map(|path| {
                    std::fs::metadata(path)
                        .map(|meta| (meta.len(), meta.modified().ok(), inode(&meta)))
                        .map_err(|error| error.to_string())
                })
                .collect(),
        )
    }
}

#[cfg(unix)]
fn inode(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.ino()
}

#[cfg(not(unix))]
fn inode(_meta: &std::fs::Metadata) -> u64 {
    0
}

/// The files a replica's TLS material comes from, in a fixed order.
pub(super) fn watched_files(config: &ReplicaConfig) -> Vec<PathBuf> {
    vec![
        config.tls.ca.clone(),
        config.tls.cert.clone(),
        config.tls.key.clone(),
    ]
}

/// Records the certificate in use in the metrics, and warns when it ends
/// soon.
pub(super) fn note_certificate(node: u64, material: &TlsMaterial, metrics: &Metrics) {
    let Some(not_after) = material.cert_chain.first().and_then(certificate_not_after) else {
        return;
    };
    let seconds = not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    metrics
        .tls_certificate_expiry_seconds
        .set(i64::try_from(seconds).unwrap_or(i64::MAX));
    let left = not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    let days_left = left.as_secs() / 86_400;
    if days_left < EXPIRY_WARNING_DAYS {
        tracing::warn!(
            node,
            days_left,
            "this replica's TLS certificate expires soon: issue a new one (`synod certs`) \
             and replace the file; it is picked up without a restart"
        );
    }
}

/// The watch's settings and what it acts on.
pub(super) struct TlsWatch {
    pub(super) config: ReplicaConfig,
    pub(super) reloader: TlsReloader,
    pub(super) metrics: Arc<Metrics>,
    /// What the files looked like when the material in use was loaded.
    pub(super) loaded: Fingerprint,
    /// Notified to reload now (SIGHUP).
    pub(super) requests: Option<Arc<Notify>>,
    pub(super) shutdown: watch::Receiver<bool>,
}

/// Runs the watch until the replica shuts down or its endpoints stop.
pub(super) async fn run(mut watch: TlsWatch) {
    let node = watch.config.id;
    let check_every = Duration::from_millis(watch.config.tls.reload_check_ms);
    let requests = watch.requests.take().unwrap_or_default();
    let mut ticks = (!check_every.is_zero()).then(|| {
        let mut ticks = tokio::time::interval(check_every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks
    });
    loop {
        let asked = tokio::select! {
            _ = watch.shutdown.changed() => return,
            () = requests.notified() => true,
            () = tick(&mut ticks) => false,
        };
        let files = watched_files(&watch.config);
        let config = watch.config.clone();
        let loaded = watch.loaded.clone();
        let looked = tokio::task::spawn_blocking(move || {
            let now = Fingerprint::of(&files);
            if !asked && now == loaded {
                return (now, None);
            }
            (now, Some(config.load_tls()))
        })
        .await;
        let Ok((now, result)) = looked else {
            return;
        };
        let Some(result) = result else {
            continue;
        };
        // Whatever came of it, these files were looked at: a refused set
        // is tried again when they change (or on SIGHUP), not every tick.
        watch.loaded = now;
        let material = match result {
            Ok(material) => material,
            Err(error) => {
                watch.metrics.tls_reload_failures.inc();
                tracing::warn!(
                    node,
                    %error,
                    "TLS files refused; keeping the certificate in use"
                );
                continue;
            }
        };
        match watch.reloader.reload(&material) {
            Ok(()) => {
                watch.metrics.tls_reloads.inc();
                tracing::info!(
                    node,
                    cert = %watch.config.tls.cert.display(),
                    on_request = asked,
                    "TLS certificate reloaded: new connections use it"
                );
                note_certificate(node, &material, &watch.metrics);
            }
            Err(TransportError::Closed) => return,
            Err(error) => {
                watch.metrics.tls_reload_failures.inc();
                tracing::warn!(node, %error, "TLS files refused; keeping the certificate in use");
            }
        }
    }
}

/// The next tick, or never when the files are looked at on request only.
async fn tick(ticks: &mut Option<tokio::time::Interval>) {
    match ticks {
        Some(ticks) => {
            ticks.tick().await;
        }
        None => std::future::pending().await,
    }
}
