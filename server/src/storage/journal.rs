//! The log database's write-ahead journal, in `synod.journal`: what makes
//! a persist batch durable with one small append and one `fdatasync`.
//!
//! # Why a journal in front of redb
//!
//! Every client write waits for a log commit on a majority. A redb commit
//! with [`redb::Durability::Immediate`] copies the touched pages of the log
//! and meta tables, redb's own system and freed trees and its header (about
//! 32 KiB in eight places of the file for one 200-byte record), then syncs:
//! 0.1 ms alone and 0.25 ms with three replicas on one disk, 0.38 ms of a
//! one-writer round trip of 0.57 ms. Appending the same batches here and
//! syncing costs one page and about 50 us. The batches are then written to
//! redb without a sync ([`redb::Durability::None`]), off the client's path,
//! and a durable redb commit now and then (a *checkpoint*) lets the
//! journal start over.
//!
//! # Layout
//!
//! A header, then records, each appended whole and synced before the next
//! is written:
//!
//! - header: [`MAGIC`], then a sealed [`JournalHeader`] (postcard and a
//!   CRC-32, see `codec`) prefixed by its length (u32, little-endian): the
//!   format version and the replica's [`Identity`], checked on open;
//! - record: its length (u32, little-endian), then a sealed
//!   [`JournalGroup`]: a group number and the batches of one group commit.
//!
//! Group numbers increase by one from record to record and across
//! checkpoints; the log database records the last group it holds
//! (`journal_group` in its meta), so a record at or below it is already in
//! the database and is skipped when the journal is replayed.
//!
//! # Crashes
//!
//! Only the last record can be incomplete: each is synced before the next
//! is written, the file grows with zeros, and [`Journal::reset`] shrinks
//! the file (and syncs) before anything new is appended. So a record that
//! is cut short or fails its checksum, with only zeros after it, is the
//! unsynced tail of a crash: it was never acknowledged, and
//! [`Journal::open`] cuts it off. A damaged record with a valid record or
//! any other bytes after it is damage to acknowledged data, and the journal
//! is refused as corrupt. (Damage that zeroes a record's length, or makes
//! it point past the file's end, still reads as a torn tail: a crash can
//! leave exactly that, so the two cannot be told apart.)

use std::path::{Path, PathBuf};

use redb::StorageBackend;
use serde::{Deserialize, Serialize};
use synod_paxos::Persist;

use super::codec::{seal, unseal, FORMAT_VERSION};
use super::{corrupt, Identity, Result, StorageError};

/// The journal's file name inside a replica's data directory.
pub const JOURNAL_FILE_NAME: &str = "synod.journal";

/// The first bytes of every journal.
pub const MAGIC: &[u8; 16] = b"synod journal\n\0\0";

/// Bytes of a record's length prefix.
const LENGTH_BYTES: usize = 4;

/// A record longer than this is damage, not data: a group commit holds at
/// most a few thousand batches of bounded size.
const RECORD_BYTES_MAX: usize = 1 << 30;

/// The file grows in steps of this many bytes, so that most appends
/// write inside its length (a redb backend writes only there) without
/// changing it. The zeros past the last record read as the end.
const GROWTH_BYTES: u64 = 1 << 20;

/// Checksum domain of the header.
const HEADER_DOMAIN: &[u8] = b"synod/journal/header";

/// Checksum domain of a record.
const RECORD_DOMAIN: &[u8] = b"synod/journal/group";

/// What a journal's header says about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct JournalHeader {
    format_version: u32,
    identity: Identity,
}

/// One group commit as the journal holds it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct JournalGroup {
    /// Its number: one more than the group before it.
    pub group: u64,
    /// The batches, in the order they were committed.
    pub batches: Vec<Persist>,
}

/// [`JournalGroup`]'s encoding, from borrowed batches.
#[derive(Serialize)]
struct JournalGroupRef<'a> {
    group: u64,
    batches: &'a [&'a Persist],
}

/// An open journal: appends records at its end.
pub struct Journal {
    path: PathBuf,
    backend: Box<dyn StorageBackend>,
    /// Where the records start: the header's length.
    records_start: u64,
    /// Where the next record goes.
    end: u64,
    /// The file's length: `end` and zeros after it.
    allocated: u64,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("end", &self.end)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Writes a new journal with `identity`'s header on an empty `backend`
    /// and syncs it.
    ///
    /// # Errors
    /// [`StorageError::AlreadyExists`] if the backend is not empty; I/O
    /// errors.
    pub fn create(
        backend: impl StorageBackend,
        path: &Path,
        identity: &Identity,
    ) -> Result<Journal> {
        let length = backend
            .len()
            .map_err(|source| io_error(path, "read the journal's length", source))?;
        if length != 0 {
            return Err(StorageError::AlreadyExists {
                path: path.to_path_buf(),
            });
        }
        let header = JournalHeader {
            format_version: FORMAT_VERSION,
            identity: identity.clone(),
        };
        let sealed = seal(HEADER_DOMAIN, &header).map_err(|source| StorageError::Encode {
            path: path.to_path_buf(),
            what: "the journal header",
            source,
        })?;
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&length_prefix(sealed.len()));
        bytes.extend_from_slice(&sealed);
        backend
            .set_len(bytes.len() as u64)
            .map_err(|source| io_error(path, "size the journal", source))?;
        backend
            .write(0, &bytes)
            .map_err(|source| io_error(path, "write the journal header", source))?;
        backend
            .sync_data()
            .map_err(|source| io_error(path, "sync the journal header", source))?;
        let end = bytes.len() as u64;
        Ok(Journal {
            path: path.to_path_buf(),
            backend: Box::new(backend),
            records_start: end,
            end,
            allocated: end,
        })
    }

    /// Opens the journal on `backend`, checks that it is `identity`'s, and
    /// returns its groups in order; an incomplete last record is cut off
    /// (and the cut synced) so that the next append follows the last
    /// complete one.
    ///
    /// # Errors
    /// [`StorageError::NotSynod`] without the magic bytes;
    /// [`StorageError::FormatVersion`], [`StorageError::WrongCluster`],
    /// [`StorageError::WrongNode`] for another build's, cluster's or
    /// replica's journal; [`StorageError::Corrupt`] for a damaged header, a
    /// damaged record followed by a valid one, or group numbers out of
    /// sequence; I/O errors.
    pub fn open(
        backend: impl StorageBackend,
        path: &Path,
        identity: &Identity,
    ) -> Result<(Journal, Vec<JournalGroup>)> {
        let length = backend
            .len()
            .map_err(|source| io_error(path, "read the journal's length", source))?;
        let length = usize::try_from(length)
            .map_err(|_| corrupt(path, format!("the journal is {length} bytes long")))?;
        let mut bytes = vec![0u8; length];
        backend
            .read(0, &mut bytes)
            .map_err(|source| io_error(path, "read the journal", source))?;
        let records_start = check_header(&bytes, path, identity)?;
        let (groups, valid_end) = read_records(&bytes, records_start, path)?;
        let torn = bytes[valid_end..].iter().any(|&byte| byte != 0);
        if torn {
            tracing::warn!(
                path = %path.display(),
                bytes = bytes.len() - valid_end,
                offset = valid_end,
                "the journal ends in an incomplete record (a crash while it was written); cutting it off"
            );
        }
        if valid_end < bytes.len() {
            backend
                .set_len(valid_end as u64)
                .map_err(|source| io_error(path, "cut off the journal's incomplete end", source))?;
            backend
                .sync_data()
                .map_err(|source| io_error(path, "sync the journal", source))?;
        }
        Ok((
            Journal {
                path: path.to_path_buf(),
                backend: Box::new(backend),
                records_start: records_start as u64,
                end: valid_end as u64,
                allocated: valid_end as u64,
            },
            groups,
        ))
    }

    /// The journal file (or the name given for a backend).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of records since the last reset.
    pub fn record_bytes(&self) -> u64 {
        self.end - self.records_start
    }

    /// Appends one group commit's record; durable only after
    /// [`Journal::sync`].
    ///
    /// # Errors
    /// An I/O error, or an encoding error (a bug).
    pub fn append(&mut self, group: u64, batches: &[&Persist]) -> Result<()> {
        let sealed =
            seal(RECORD_DOMAIN, &JournalGroupRef { group, batches }).map_err(|source| {
                StorageError::Encode {
                    path: self.path.clone(),
                    what: "a journal record",
                    source,
                }
            })?;
        let mut record = Vec::with_capacity(LENGTH_BYTES + sealed.len());
        record.extend_from_slice(&length_prefix(sealed.len()));
        record.extend_from_slice(&sealed);
        let record_end = self.end + record.len() as u64;
        if record_end > self.allocated {
            let allocated = record_end.next_multiple_of(GROWTH_BYTES);
            self.backend
                .set_len(allocated)
                .map_err(|source| io_error(&self.path, "grow the journal", source))?;
            self.allocated = allocated;
        }
        self.backend
            .write(self.end, &record)
            .map_err(|source| io_error(&self.path, "append to the journal", source))?;
        self.end = record_end;
        Ok(())
    }

    /// Makes every appended record durable (`fdatasync`).
    ///
    /// # Errors
    /// The I/O error; after a failed sync the journal must not be used
    /// again (the caller poisons its store).
    pub fn sync(&mut self) -> Result<()> {
        self.backend
            .sync_data()
            .map_err(|source| io_error(&self.path, "sync the journal (fsync)", source))
    }

    /// Drops every record, once the log database holds them durably, and
    /// syncs the shorter file before anything new is appended.
    ///
    /// # Errors
    /// The I/O error.
    pub fn reset(&mut self) -> Result<()> {
        if self.allocated == self.records_start {
            return Ok(());
        }
        self.backend
            .set_len(self.records_start)
            .map_err(|source| io_error(&self.path, "empty the journal", source))?;
        self.backend
            .sync_data()
            .map_err(|source| io_error(&self.path, "sync the emptied journal", source))?;
        self.end = self.records_start;
        self.allocated = self.records_start;
        Ok(())
    }
}

fn length_prefix(length: usize) -> [u8; LENGTH_BYTES] {
    u32::try_from(length).unwrap_or(u32::MAX).to_le_bytes()
}

fn io_error(path: &Path, operation: &'static str, source: std::io::Error) -> StorageError {
    StorageError::Io {
        path: path.to_path_buf(),
        operation,
        source,
    }
}

/// Reads the length prefix at `offset`, if all of it is there.
fn length_at(bytes: &[u8], offset: usize) -> Option<usize> {
    let prefix = bytes.get(offset..offset + LENGTH_BYTES)?;
    let mut length = [0u8; LENGTH_BYTES];
    length.copy_from_slice(prefix);
    Some(u32::from_le_bytes(length) as usize)
}

/// Checks the magic bytes and the header; returns where the records start.
fn check_header(bytes: &[u8], path: &Path, identity: &Identity) -> Result<usize> {
    if !bytes.starts_with(MAGIC) {
        return Err(StorageError::NotSynod {
            path: path.to_path_buf(),
            detail: "the file does not start as a Synod journal does".to_string(),
        });
    }
    let header_damaged = |detail: String| corrupt(path, format!("the journal header: {detail}"));
    let length =
        length_at(bytes, MAGIC.len()).ok_or_else(|| header_damaged("cut short".to_string()))?;
    let start = MAGIC.len() + LENGTH_BYTES;
    let sealed = bytes
        .get(start..start + length)
        .ok_or_else(|| header_damaged("cut short".to_string()))?;
    let header: JournalHeader = unseal(HEADER_DOMAIN, sealed).map_err(header_damaged)?;
    if header.format_version != FORMAT_VERSION {
        return Err(StorageError::FormatVersion {
            path: path.to_path_buf(),
            found: header.format_version,
            expected: FORMAT_VERSION,
        });
    }
    if header.identity.cluster_id != identity.cluster_id {
        return Err(StorageError::WrongCluster {
            path: path.to_path_buf(),
            found: header.identity.cluster_id,
            expected: identity.cluster_id.clone(),
        });
    }
    if header.identity.node_id != identity.node_id {
        return Err(StorageError::WrongNode {
            path: path.to_path_buf(),
            found: header.identity.node_id,
            expected: identity.node_id,
        });
    }
    Ok(start + length)
}

/// A record that reads back whole, and where the next one starts.
fn record_at(bytes: &[u8], offset: usize) -> Option<(JournalGroup, usize)> {
    let length = length_at(bytes, offset)?;
    if length > RECORD_BYTES_MAX {
        return None;
    }
    let start = offset + LENGTH_BYTES;
    let sealed = bytes.get(start..start + length)?;
    let group = unseal(RECORD_DOMAIN, sealed).ok()?;
    Some((group, start + length))
}

/// Checks that the record at `offset`, which does not read back whole,
/// is what a crash while appending it leaves: nothing was written after
/// it, because every record is synced before the next is appended and the
/// file grows with zeros. A valid record or any other bytes after its end
/// are damage to synced records instead.
///
/// Two damaged tails are taken as torn without that check: a length that
/// reads as zero (its bytes never reached the disk, whatever of the rest
/// did) and a record the file ends inside.
fn check_torn_tail(bytes: &[u8], offset: usize, path: &Path) -> Result<()> {
    let length = match length_at(bytes, offset) {
        None | Some(0) => return Ok(()),
        Some(length) => length,
    };
    let claimed_end = offset.saturating_add(LENGTH_BYTES).saturating_add(length);
    let Some(after) = bytes.get(claimed_end..) else {
        return Ok(());
    };
    let follows = if record_at(bytes, claimed_end).is_some() {
        "records follow it"
    } else if after.iter().any(|&byte| byte != 0) {
        "data follows it"
    } else {
        return Ok(());
    };
    Err(corrupt(
        path,
        format!("the journal record at byte {offset} is damaged, and {follows}"),
    ))
}

/// Reads the records from `offset` on; returns them and where the valid
/// ones end (the file's end unless its last record is incomplete).
fn read_records(
    bytes: &[u8],
    mut offset: usize,
    path: &Path,
) -> Result<(Vec<JournalGroup>, usize)> {
    let mut groups: Vec<JournalGroup> = Vec::new();
    while offset < bytes.len() {
        let Some((group, next)) = record_at(bytes, offset) else {
            check_torn_tail(bytes, offset, path)?;
            return Ok((groups, offset));
        };
        if let Some(last) = groups.last() {
            if group.group != last.group + 1 {
                return Err(corrupt(
                    path,
                    format!(
                        "the journal record at byte {offset} is group {}, after group {}",
                        group.group, last.group
                    ),
                ));
            }
        }
        groups.push(group);
        offset = next;
    }
    Ok((groups, offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::backends::InMemoryBackend;
    use synod_paxos::{AcceptedEntry, Ballot, Value};

    fn identity() -> Identity {
        Identity {
            cluster_id: "journal-test".into(),
            node_id: 2,
        }
    }

    fn batch(id: u64) -> Persist {
        Persist {
            id,
            promised: Some(Ballot::new(3, 2)),
            accepted: vec![AcceptedEntry {
                slot: id,
                ballot: Ballot::new(3, 2),
                value: Value::Noop,
            }],
            chosen_through: Some(id.saturating_sub(1)),
            ..Persist::default()
        }
    }

    /// The journal's bytes through its last record.
    fn image_of(journal: &Journal) -> Vec<u8> {
        let mut bytes = vec![0u8; journal.end as usize];
        journal.backend.read(0, &mut bytes).expect("read");
        bytes
    }

    fn backend_with(bytes: &[u8]) -> InMemoryBackend {
        let backend = InMemoryBackend::new();
        backend.set_len(bytes.len() as u64).expect("set_len");
        backend.write(0, bytes).expect("write");
        backend
    }

    fn written(groups: u64) -> Vec<u8> {
        let path = Path::new("memory.journal");
        let mut journal =
            Journal::create(InMemoryBackend::new(), path, &identity()).expect("create");
        for group in 1..=groups {
            let batches = [batch(group * 2), batch(group * 2 + 1)];
            let refs: Vec<&Persist> = batches.iter().collect();
            journal.append(group, &refs).expect("append");
            journal.sync().expect("sync");
        }
        image_of(&journal)
    }

    fn reopen(bytes: &[u8]) -> Result<(Journal, Vec<JournalGroup>)> {
        Journal::open(
            backend_with(bytes),
            Path::new("memory.journal"),
            &identity(),
        )
    }

    #[test]
    fn appended_groups_read_back_in_order() {
        let (_, groups) = reopen(&written(3)).expect("open");
        let numbers: Vec<u64> = groups.iter().map(|group| group.group).collect();
        assert_eq!(numbers, [1, 2, 3]);
        assert_eq!(groups[1].batches, vec![batch(4), batch(5)]);
    }

    #[test]
    fn every_cut_of_the_last_record_is_dropped_and_the_rest_kept() {
        let whole = written(3);
        let two = written(2).len();
        for cut in two..whole.len() {
            let (journal, groups) = reopen(&whole[..cut]).expect("a cut tail opens");
            assert_eq!(groups.len(), 2, "cut at {cut}");
            assert_eq!(
                journal.backend.len().expect("length"),
                two as u64,
                "cut at {cut} is cut off"
            );
        }
    }

    #[test]
    fn the_zeros_the_file_grew_by_read_as_its_end() {
        let mut bytes = written(3);
        bytes.resize(bytes.len() + 4096, 0);
        let (mut journal, groups) = reopen(&bytes).expect("open");
        assert_eq!(groups.len(), 3);
        let batches = [batch(20)];
        let refs: Vec<&Persist> = batches.iter().collect();
        journal.append(4, &refs).expect("append");
        journal.sync().expect("sync");
        let (_, groups) = reopen(&image_of(&journal)).expect("reopen");
        assert_eq!(groups.len(), 4);
    }

    #[test]
    fn a_flipped_bit_in_the_last_record_drops_only_it() {
        let mut bytes = written(3);
        let last = bytes.len() - 3;
        bytes[last] ^= 0x10;
        let (_, groups) = reopen(&bytes).expect("a damaged tail opens");
        assert_eq!(groups.len(), 2);
    }

    #[test]
    fn a_damaged_record_before_a_valid_one_is_corrupt() {
        let one = written(1).len();
        let mut bytes = written(3);
        bytes[one + 6] ^= 0x01;
        match reopen(&bytes) {
            Err(StorageError::Corrupt { detail, .. }) => {
                assert!(detail.contains("records follow"), "{detail}");
            }
            other => panic!("expected corrupt, got {other:?}"),
        }
    }

    #[test]
    fn a_damaged_length_before_other_records_is_corrupt() {
        let one = written(1).len();
        for flipped_bit in [0x01u8, 0x04, 0x20] {
            let mut bytes = written(3);
            bytes[one] ^= flipped_bit;
            assert!(
                matches!(reopen(&bytes), Err(StorageError::Corrupt { .. })),
                "bit {flipped_bit:#x} of the second record's length"
            );
        }
    }

    #[test]
    fn appends_after_a_reset_start_over_and_continue_the_numbers() {
        let (mut journal, _) = reopen(&written(2)).expect("open");
        journal.reset().expect("reset");
        assert_eq!(journal.record_bytes(), 0);
        let batches = [batch(9)];
        let refs: Vec<&Persist> = batches.iter().collect();
        journal.append(3, &refs).expect("append");
        journal.sync().expect("sync");
        let (_, groups) = reopen(&image_of(&journal)).expect("reopen");
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].group, 3);
    }

    #[test]
    fn another_replicas_or_clusters_journal_is_refused() {
        let bytes = written(1);
        let other_node = Identity {
            node_id: 3,
            ..identity()
        };
        let other_cluster = Identity {
            cluster_id: "elsewhere".into(),
            ..identity()
        };
        let path = Path::new("memory.journal");
        assert!(matches!(
            Journal::open(backend_with(&bytes), path, &other_node),
            Err(StorageError::WrongNode { found: 2, .. })
        ));
        assert!(matches!(
            Journal::open(backend_with(&bytes), path, &other_cluster),
            Err(StorageError::WrongCluster { .. })
        ));
    }

    #[test]
    fn a_file_that_is_not_a_journal_is_refused() {
        assert!(matches!(
            reopen(b"SQLite format 3\0 and more"),
            Err(StorageError::NotSynod { .. })
        ));
        let mut bytes = written(0);
        let header_end = bytes.len();
        bytes[header_end - 2] ^= 0xff;
        assert!(matches!(reopen(&bytes), Err(StorageError::Corrupt { .. })));
    }

    #[test]
    fn group_numbers_out_of_sequence_are_corrupt() {
        let path = Path::new("memory.journal");
        let mut journal =
            Journal::create(InMemoryBackend::new(), path, &identity()).expect("create");
        let batches = [batch(1)];
        let refs: Vec<&Persist> = batches.iter().collect();
        journal.append(4, &refs).expect("append");
        journal.append(6, &refs).expect("append");
        assert!(matches!(
            reopen(&image_of(&journal)),
            Err(StorageError::Corrupt { .. })
        ));
    }

    #[test]
    fn create_refuses_a_backend_with_contents() {
        assert!(matches!(
            Journal::create(backend_with(b"x"), Path::new("memory.journal"), &identity()),
            Err(StorageError::AlreadyExists { .. })
        ));
    }
}
