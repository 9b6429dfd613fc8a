//! Takes a lock, holds it while doing "work", and releases it.
//!
//! Start a local cluster with `synod dev` in another terminal, then:
//!
//! ```text
//! cargo run -p synod-client --example lock -- /locks/demo 10
//! ```
//!
//! Run it in two terminals at once: the second waits until the first
//! releases, and gets a larger fencing token. Kill the holder with `kill -9`
//! and the waiter gets the lock once the holder's session times out.
//!
//! Arguments: the lock's path (default `/locks/demo`) and how many seconds
//! to hold it (default 5). Environment: `SYNOD_ENDPOINTS` (comma-separated,
//! default `127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103`, as `synod dev`
//! listens), `SYNOD_CERTS` (the directory of `ca.pem`, `client.pem` and
//! `client-key.pem`, default `synod-dev/certs`), `SYNOD_SESSION_TIMEOUT_MS`
//! (default 5000).

use std::io::Write;
use std::time::Duration;

use synod_client::Client;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut arguments = std::env::args().skip(1);
    let path = arguments.next().unwrap_or_else(|| "/locks/demo".into());
    let hold_seconds: f64 = arguments.next().map_or(Ok(5.0), |s| s.parse())?;
    let endpoints = std::env::var("SYNOD_ENDPOINTS")
        .unwrap_or_else(|_| "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103".into());
    let certs = std::env::var("SYNOD_CERTS").unwrap_or_else(|_| "synod-dev/certs".into());
    let session_timeout_ms: u64 =
        std::env::var("SYNOD_SESSION_TIMEOUT_MS").map_or(Ok(5000), |s| s.parse())?;

    let client = Client::builder()
        .endpoints(endpoints.split(',').map(str::trim))
        .tls_dir(certs)
        .session_timeout_ms(session_timeout_ms)
        .connect()
        .await?;
    println!(
        "session {} connected; waiting for {path}",
        client.session_id()
    );
    let guard = client.lock(&path).await?;
    // The token goes with every request to the services the lock protects;
    // they check it with `check_sequencer` (or write with `set_fenced`).
    println!("acquired {path} token {}", guard.token().generation);
    std::io::stdout().flush()?;

    tokio::select! {
        lost = guard.lost() => {
            // The session expired: another holder may already have the lock.
            eprintln!("stopping work: {lost}");
            return Err(lost.into());
        }
        _ = tokio::time::sleep(Duration::from_secs_f64(hold_seconds)) => {}
    }
    guard.release().await?;
    println!("released {path}");
    client.close().await;
    Ok(())
}
