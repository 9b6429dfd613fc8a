//! Asking replicas for their status without opening a session.
//!
//! `status` is most needed when the cluster is unwell: without a leader no
//! session can open (opening one is a write through the log). A replica
//! answers a status frame on any client connection that passed the hello,
//! so the shell connects, says hello and asks, with a bound on each step.
//! This is the only place the shell speaks the wire protocol itself; it
//! belongs in the client library (a session-less `Client::probe_status`)
//! once that exists.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use synod_proto::tls::{self, TlsMaterial};
use synod_proto::wire::{
    encode_frame, ClientFrame, ClusterStatus, ServerFrame, DEFAULT_MAX_FRAME_BYTES,
};

/// Frames read while waiting for the status answer before giving up.
const FRAMES_MAX: usize = 16;

/// A QUIC endpoint with the client's certificate, for probing replicas.
#[derive(Clone)]
pub struct Prober {
    endpoint: quinn::Endpoint,
    timeout: Duration,
}

impl Prober {
    /// Loads the TLS files and binds a client endpoint (IPv4 or IPv6, after
    /// `sample_address`). Must run inside the tokio runtime.
    ///
    /// # Errors
    /// Unreadable TLS files or no socket.
    pub fn new(
        material: &TlsMaterial,
        sample_address: SocketAddr,
        timeout: Duration,
    ) -> anyhow::Result<Prober> {
        let bind: SocketAddr = if sample_address.is_ipv6() {
            SocketAddr::from(([0u16; 8], 0))
        } else {
            SocketAddr::from(([0u8; 4], 0))
        };
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(timeout).context("probe timeout out of range")?,
        ));
        let endpoint = tls::client_endpoint(material, bind, Arc::new(transport))
            .context("cannot set up a QUIC endpoint")?;
        Ok(Prober { endpoint, timeout })
    }

    /// The status of the replica at `address`, whose certificate must name
    /// `server_name`.
    ///
    /// # Errors
    /// The replica cannot be reached, refuses, or does not answer in time.
    pub async fn status(&self, address: &str, server_name: &str) -> anyhow::Result<ClusterStatus> {
        let socket = resolve(address)?;
        let exchange = async {
            let mut stream = tls::connect(
                &self.endpoint,
                socket,
                server_name,
                DEFAULT_MAX_FRAME_BYTES,
                self.timeout,
            )
            .await?;
            stream
                .send
                .write_all(&encode_frame(&ClientFrame::Status))
                .await
                .context("cannot send the status request")?;
            let mut answer = None;
            for _ in 0..FRAMES_MAX {
                match stream.frames.next::<ServerFrame>().await? {
                    Some(ServerFrame::Status(status)) => {
                        answer = Some(status);
                        break;
                    }
                    Some(ServerFrame::Unavailable { reason }) => bail!("unavailable: {reason}"),
                    Some(_) => {}
                    None => bail!("the replica closed the stream"),
                }
            }
            stream.connection.close(0u32.into(), b"status read");
            answer.context("no status answer")
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => bail!("no answer within {} ms", self.timeout.as_millis()),
        }
    }
}

/// The first socket address of `host:port`.
///
/// # Errors
/// The address does not resolve.
pub fn resolve(address: &str) -> anyhow::Result<SocketAddr> {
    address
        .to_socket_addrs()
        .with_context(|| format!("bad address {address}"))?
        .next()
        .with_context(|| format!("{address} resolves to no address"))
}

/// The host part of `host:port` (without IPv6 brackets): the name a
/// replica's certificate is checked against when its id is not known yet.
pub fn host_of(address: &str) -> &str {
    address
        .rsplit_once(':')
        .map_or(address, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("127.0.0.1:7101"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7101"), "::1");
        assert_eq!(host_of("db1.example.com:7101"), "db1.example.com");
    }
}
