//! Receiving a backup: a replica's saved state, streamed on a connection
//! that said `Hello::Backup` (see [`crate::ClientBuilder::fetch_snapshot`]).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use synod_proto::tls::{handshake, FrameReader, HandshakeError};
use synod_proto::wire::{Hello, SnapshotFrame, SnapshotHeader};

use crate::error::ClientError;
use crate::Result;

/// Largest frame of a backup stream: a chunk is about 1 MiB but holds at
/// least one whole record, whose data may be up to 64 MiB.
const BACKUP_FRAME_BYTES_MAX: u64 = 256 << 20;

/// A backup being received from one replica. The replica holds one read
/// transaction for it until it is read to the end, dropped, or the
/// replica's `limits.backup_timeout_ms` passes.
#[derive(Debug)]
pub struct SnapshotDownload {
    connection: quinn::Connection,
    frames: FrameReader,
    node_id: u64,
    through_slot: u64,
    received: (u64, u64),
    ended: bool,
}

impl SnapshotDownload {
    /// The replica streaming it.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// The state reflects every slot of the log through this one.
    pub fn through_slot(&self) -> u64 {
        self.through_slot
    }

    /// The next chunk of the stream's bytes (opaque: write them to a
    /// backup file as they come); `None` once every chunk arrived and
    /// their count and size matched what the replica sent.
    ///
    /// # Errors
    /// [`ClientError::ConnectionLost`] when the stream breaks or the
    /// replica reports that it failed part-way;
    /// [`ClientError::Protocol`] when the chunks do not add up.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        if self.ended {
            return Ok(None);
        }
        let lost = |error: String| ClientError::ConnectionLost(format!("backup stream: {error}"));
        match self.frames.next::<SnapshotFrame>().await {
            Ok(Some(SnapshotFrame::Chunk(chunk))) => {
                self.received.0 += 1;
                self.received.1 += chunk.len() as u64;
                Ok(Some(chunk))
            }
            Ok(Some(SnapshotFrame::End { chunks, bytes })) => {
                self.ended = true;
                self.connection.close(0u32.into(), b"backup received");
                if (chunks, bytes) != self.received {
                    return Err(ClientError::Protocol(format!(
                        "the backup ended after {} chunks of {} bytes, but the replica sent {chunks} of {bytes}",
                        self.received.0, self.received.1
                    )));
                }
                Ok(None)
            }
            Ok(Some(SnapshotFrame::Failed(reason))) => {
                Err(lost(format!("the replica failed part-way: {reason}")))
            }
            Ok(None) => Err(lost("the stream ended before the backup did".to_string())),
            Err(error) => Err(lost(error.to_string())),
        }
    }
}

/// Why one replica did not start a backup.
enum NotStarted {
    /// It answered, and refused (a limit, or no saved state yet).
    Refused(String),
    /// It could not be reached, or the connection broke.
    Unreachable(String),
}

/// Asks each replica in turn for a backup; the first that starts one.
/// When some replica answered but refused, its reason is the error
/// ([`synod_proto::Error::Unavailable`]); otherwise the replicas were
/// unreachable ([`ClientError::ConnectionLost`]).
pub(crate) async fn fetch(
    endpoint: quinn::Endpoint,
    endpoints: &[(SocketAddr, String)],
    timeout: Duration,
) -> Result<SnapshotDownload> {
    let mut refused = None;
    let mut unreachable = String::from("no replica was asked");
    for (address, name) in endpoints {
        match start(&endpoint, *address, name, timeout).await {
            Ok(download) => return Ok(download),
            Err(NotStarted::Refused(reason)) => {
                refused.get_or_insert(format!("{address} refused the backup: {reason}"));
            }
            Err(NotStarted::Unreachable(error)) => unreachable = format!("{address}: {error}"),
        }
    }
    Err(match refused {
        Some(reason) => ClientError::Refused(synod_proto::Error::Unavailable { reason }),
        None => ClientError::ConnectionLost(unreachable),
    })
}

async fn start(
    endpoint: &quinn::Endpoint,
    address: SocketAddr,
    name: &str,
    timeout: Duration,
) -> std::result::Result<SnapshotDownload, NotStarted> {
    let unreachable = |error: String| NotStarted::Unreachable(error);
    let connecting = endpoint
        .connect(address, name)
        .map_err(|error| unreachable(error.to_string()))?;
    let connection = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| unreachable(format!("no connection within {} ms", timeout.as_millis())))?
        .map_err(|error| unreachable(error.to_string()))?;
    let hello = Hello::Backup {
        protocol_version: synod_proto::PROTOCOL_VERSION,
    };
    let mut handshaken = match handshake(connection, &hello, BACKUP_FRAME_BYTES_MAX, timeout).await
    {
        Ok(handshaken) => handshaken,
        Err(HandshakeError::Refused { reason }) => return Err(NotStarted::Refused(reason)),
        Err(error) => return Err(unreachable(error.to_string())),
    };
    let header = tokio::time::timeout(timeout, handshaken.frames.next::<SnapshotHeader>())
        .await
        .map_err(|_| unreachable("the replica did not start the backup in time".to_string()))?
        .map_err(|error| unreachable(error.to_string()))?;
    match header {
        Some(SnapshotHeader::Ready { through_slot }) => Ok(SnapshotDownload {
            connection: handshaken.connection,
            frames: handshaken.frames,
            node_id: handshaken.node_id,
            through_slot,
            received: (0, 0),
            ended: false,
        }),
        Some(SnapshotHeader::Unavailable { reason }) => Err(NotStarted::Refused(reason)),
        None => Err(unreachable(
            "the replica closed the stream without an answer".to_string(),
        )),
    }
}
