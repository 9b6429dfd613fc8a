//! The on-disk layout: table definitions, meta keys, and the sealed record
//! encoding (postcard payload followed by a CRC-32).
//!
//! redb checksums its pages, which catches torn and partial writes of a
//! commit. It does not catch a value that redb stored faithfully but that is
//! wrong: written by a buggy build, edited by a tool, or moved under another
//! key. So every record we write carries a CRC-32 over a *domain* (the table
//! and key it belongs under) followed by its payload, and every read verifies
//! it before decoding.

use redb::TableDefinition;
use serde::de::DeserializeOwned;
use serde::Serialize;

use synod_paxos::{Membership, Slot};

/// The format this build reads and writes. Bump it on any change to the
/// tables, keys or encodings below.
///
/// Version 2: the state machine lives in its own tables, saved as entries
/// are applied (version 1 saved whole snapshots). Version 3: node records
/// are keyed by the revision that created them, then their path. Version
/// 4: the state tables moved to a database file of their own, and each
/// file's meta says which of the two it is ([`KEY_ROLE`]).
pub(crate) const FORMAT_VERSION: u32 = 4;

/// Named scalars of the replica: format version, identity, the acceptor's
/// promise and the log's bounds. Values are sealed.
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("synod_meta");
/// The Paxos log by slot. Values are sealed [`synod_paxos::LogRecord`]s.
pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("synod_log");
pub(crate) const KEY_FORMAT_VERSION: &str = "format_version";
pub(crate) const KEY_IDENTITY: &str = "identity";
pub(crate) const KEY_PROMISED: &str = "promised";
pub(crate) const KEY_CHOSEN_THROUGH: &str = "chosen_through";
pub(crate) const KEY_LOG_START: &str = "log_start";
pub(crate) const KEY_MEMBERSHIP: &str = "membership";
/// The last journal group the log database holds (see `journal`); absent
/// in a log database written before the journal, which has none.
pub(crate) const KEY_JOURNAL_GROUP: &str = "journal_group";
/// Whether the replica is rejoining after losing its disk (absent: no).
pub(crate) const KEY_JOINING: &str = "joining";
/// Which of a replica's two database files this is: [`ROLE_LOG`] or
/// [`ROLE_STATE`], so that one is never opened as the other.
pub(crate) const KEY_ROLE: &str = "role";
/// The role of the file holding the promise, the log and its bounds.
pub(crate) const ROLE_LOG: &str = "log";
/// The role of the file holding the state machine's tables.
pub(crate) const ROLE_STATE: &str = "state";

/// Length of the CRC-32 trailer of a sealed record.
const CRC_BYTES: usize = 4;

/// The checksum domain of a meta value.
pub(crate) fn meta_domain(key: &str) -> Vec<u8> {
    let mut domain = b"synod/meta/".to_vec();
    domain.extend_from_slice(key.as_bytes());
    domain
}

/// The checksum domain of a log record.
pub(crate) fn log_domain(slot: Slot) -> Vec<u8> {
    let mut domain = b"synod/log/".to_vec();
    domain.extend_from_slice(&slot.to_be_bytes());
    domain
}

fn crc(domain: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(domain);
    hasher.update(payload);
    hasher.finalize()
}

/// Encodes `value` and appends the CRC-32 of `domain` and the encoding.
pub(crate) fn seal<T: Serialize>(domain: &[u8], value: &T) -> Result<Vec<u8>, postcard::Error> {
    let mut bytes = postcard::to_stdvec(value)?;
    let checksum = crc(domain, &bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    Ok(bytes)
}

/// Appends the CRC-32 of `domain` and `payload` to a copy of `payload`.
pub(crate) fn seal_bytes(domain: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut sealed = Vec::with_capacity(payload.len() + CRC_BYTES);
    sealed.extend_from_slice(payload);
    sealed.extend_from_slice(&crc(domain, payload).to_le_bytes());
    sealed
}

/// Verifies the CRC-32 [`seal_bytes`] (or [`seal`]) appended and returns
/// the payload before it; the error says which check failed.
pub(crate) fn unseal_bytes<'a>(domain: &[u8], sealed: &'a [u8]) -> Result<&'a [u8], String> {
    let Some(split) = sealed.len().checked_sub(CRC_BYTES) else {
        return Err(format!(
            "record of {} bytes is shorter than its checksum",
            sealed.len()
        ));
    };
    let (payload, trailer) = sealed.split_at(split);
    let mut stored = [0u8; CRC_BYTES];
    stored.copy_from_slice(trailer);
    let stored = u32::from_le_bytes(stored);
    let computed = crc(domain, payload);
    if stored != computed {
        return Err(format!(
            "CRC-32 mismatch (stored {stored:08x}, computed {computed:08x})"
        ));
    }
    Ok(payload)
}

/// Verifies the CRC-32 of a sealed record and decodes it; the error says
/// which check failed.
pub(crate) fn unseal<T: DeserializeOwned>(domain: &[u8], sealed: &[u8]) -> Result<T, String> {
    let payload = unseal_bytes(domain, sealed)?;
    let (value, rest) = postcard::take_from_bytes::<T>(payload)
        .map_err(|error| format!("record does not decode: {error}"))?;
    if !rest.is_empty() {
        return Err(format!("{} trailing bytes after the record", rest.len()));
    }
    Ok(value)
}

/// Reads a membership back from disk, refusing one that [`Membership::new`]
/// would not build (empty, unsorted, duplicated or too large): serde alone
/// does not enforce those rules.
pub(crate) fn valid_membership(membership: &Membership) -> Result<(), String> {
    match Membership::new(membership.members()) {
        Ok(rebuilt) if rebuilt == *membership => Ok(()),
        Ok(_) => Err(format!(
            "membership {:?} is not sorted",
            membership.members()
        )),
        Err(error) => Err(format!(
            "membership {:?} is invalid: {error}",
            membership.members()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use synod_paxos::{Ballot, LogRecord, Value};

    fn record() -> LogRecord {
        LogRecord {
            ballot: Ballot::new(3, 2),
            value: Value::Commands(synod_paxos::Batch {
                stamp_ms: 1_700_000_000_000,
                commands: vec![synod_paxos::Command::from_static(b"set /a 1")].into(),
            }),
        }
    }

    #[test]
    fn a_stored_membership_out_of_order_is_refused() {
        let stored = postcard::to_allocvec(&(vec![3u64, 1, 2],)).expect("encodes");
        let unsorted: Membership = postcard::from_bytes(&stored).expect("serde takes it");
        let error = valid_membership(&unsorted).expect_err("not sorted");
        assert!(error.contains("is not sorted"), "{error}");
        let empty: Membership = postcard::from_bytes(&[0]).expect("serde takes it");
        let error = valid_membership(&empty).expect_err("empty");
        assert!(error.contains("is invalid"), "{error}");
        valid_membership(&Membership::new(&[1, 2, 3]).expect("valid")).expect("sorted");
    }

    #[test]
    fn sealed_records_round_trip() {
        let sealed = seal(&log_domain(7), &record()).expect("encodes");
        let back: LogRecord = unseal(&log_domain(7), &sealed).expect("decodes");
        assert_eq!(back, record());
    }

    #[test]
    fn a_flipped_bit_anywhere_is_detected() {
        let sealed = seal(&log_domain(7), &record()).expect("encodes");
        for index in 0..sealed.len() {
            for bit in 0..8 {
                let mut damaged = sealed.clone();
                damaged[index] ^= 1 << bit;
                assert!(unseal::<LogRecord>(&log_domain(7), &damaged).is_err());
            }
        }
    }

    #[test]
    fn a_record_under_another_key_is_detected() {
        let sealed = seal(&log_domain(7), &record()).expect("encodes");
        let error = unseal::<LogRecord>(&log_domain(8), &sealed).expect_err("moved record");
        assert!(error.contains("CRC-32"), "{error}");
    }

    #[test]
    fn short_and_trailing_records_are_refused() {
        assert!(unseal::<u64>(&meta_domain("x"), &[1, 2]).is_err());
        let mut payload = postcard::to_stdvec(&5u64).expect("encodes");
        payload.push(0);
        let checksum = crc(&meta_domain("x"), &payload);
        payload.extend_from_slice(&checksum.to_le_bytes());
        let error = unseal::<u64>(&meta_domain("x"), &payload).expect_err("trailing byte");
        assert!(error.contains("trailing"), "{error}");
    }
}
