//! Fuzz entry for stored-value decoding: arbitrary bytes, as a damaged store could hold
//! them, go through the decoder of every record type, the large-value pointer and the
//! seal file. Decoding may refuse (that is a `Corrupt` error, the relay's refusal to
//! serve wrong data) but must never panic, hang or allocate without bound; and what it
//! accepts must be the one canonical encoding of what it returns, so damage cannot turn
//! into a different record that still decodes. Used by `fuzz/` and `tests/fuzz_corpus.rs`;
//! not an API.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::changes::ChangeRecord;
use super::{codec, seal, spill};
use super::{
    CachedResponse, CommandRecord, ContextRecord, DaemonRecord, KeyRecord, OutboxEvent,
    StoredResult,
};

/// Runs `data` through every stored-value decoder; panics only on a broken invariant.
pub fn stored_value(data: &[u8]) {
    canonical::<CommandRecord>(data);
    canonical::<ChangeRecord>(data);
    canonical::<ContextRecord>(data);
    canonical::<CachedResponse>(data);
    canonical::<DaemonRecord>(data);
    canonical::<KeyRecord>(data);
    canonical::<OutboxEvent>(data);
    canonical::<StoredResult>(data);
    canonical::<Vec<u8>>(data);
    canonical::<String>(data);
    canonical::<u64>(data);
    if spill::spilled(data).is_some() {
        assert!(
            codec::decode::<Vec<u8>>(data).is_err(),
            "a large-value pointer must never read as an inline value"
        );
    }
    // The seal file as read from disk: whatever the bytes, no panic.
    let _ = seal::parse_bytes(data);
    if data.len() >= 11 {
        // A seal syncrelay wrote reads back as its counter, and the same seal with one
        // byte changed or cut short (a bit flip, a torn write) is refused.
        let commits = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
        let mut sealed = seal::rendered(commits).into_bytes();
        assert_eq!(seal::parse_bytes(&sealed), Some(commits));
        let at = usize::from(u16::from_le_bytes([data[8], data[9]])) % sealed.len();
        assert_eq!(
            seal::parse_bytes(&sealed[..at]),
            None,
            "a seal cut at {at} was accepted"
        );
        sealed[at] ^= data[10].max(1);
        assert_eq!(
            seal::parse_bytes(&sealed),
            None,
            "a seal with byte {at} changed was accepted: {:?}",
            String::from_utf8_lossy(&sealed)
        );
    }
}

/// Decodes `data` as `T`; when that succeeds, re-encoding gives back exactly the bytes
/// the decoder read (bincode 1.x allows trailing bytes, so a prefix).
fn canonical<T: Serialize + DeserializeOwned>(data: &[u8]) {
    if let Ok(value) = codec::decode::<T>(data) {
        let again = codec::encode(&value);
        assert!(
            data.starts_with(&again),
            "{} decoded from bytes it would not write",
            std::any::type_name::<T>()
        );
    }
}
