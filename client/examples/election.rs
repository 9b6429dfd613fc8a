//! Campaigns for leadership, leads for a while, and resigns; meanwhile it
//! prints every leader it observes.
//!
//! Start a local cluster with `synod dev` in another terminal, then run
//! this in two or three terminals:
//!
//! ```text
//! cargo run -p synod-client --example election -- /elections/demo instance-a 10
//! ```
//!
//! One instance leads; the others wait. When the leader resigns (or is
//! killed with `kill -9`, after its session times out) the next one leads,
//! and every instance prints the change.
//!
//! Arguments: the election's name (default `/elections/demo`), this
//! instance's value (default `instance-<pid>`), and how many seconds to
//! lead (default 5). Environment as for the `lock` example:
//! `SYNOD_ENDPOINTS`, `SYNOD_CERTS`, `SYNOD_SESSION_TIMEOUT_MS`.

use std::io::Write;
use std::time::Duration;

use synod_client::Client;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut arguments = std::env::args().skip(1);
    let name = arguments.next().unwrap_or_else(|| "/elections/demo".into());
    let value = arguments
        .next()
        .unwrap_or_else(|| format!("instance-{}", std::process::id()));
    let lead_seconds: f64 = arguments.next().map_or(Ok(5.0), |s| s.parse())?;
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

    // Print every leader this instance observes, in order.
    let mut leaders = client.observe(&name).await?;
    tokio::spawn(async move {
        while let Ok(leader) = leaders.next().await {
            match leader {
                Some(leader) => println!(
                    "observed leader {} (token {})",
                    String::from_utf8_lossy(&leader.value),
                    leader.sequencer.generation
                ),
                None => println!("observed: nobody leads"),
            }
            let _ = std::io::stdout().flush();
        }
    });

    println!("{value} campaigning in {name}");
    let leadership = client.campaign(&name, value.as_bytes()).await?;
    println!("elected {value} token {}", leadership.token().generation);
    std::io::stdout().flush()?;
    tokio::select! {
        lost = leadership.lost() => {
            eprintln!("no longer leading: {lost}");
            return Err(lost.into());
        }
        _ = tokio::time::sleep(Duration::from_secs_f64(lead_seconds)) => {}
    }
    leadership.resign().await?;
    println!("{value} resigned");
    client.close().await;
    Ok(())
}
