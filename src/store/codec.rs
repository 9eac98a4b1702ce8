//! Value encoding: bincode 1.3.3 behind a one-byte format version, so that a later format
//! can be read side by side with this one and a foreign or damaged value is reported as
//! corruption instead of being misread.

use serde::{de::DeserializeOwned, Serialize};

use super::StoreError;

/// The format byte every stored value starts with.
pub const FORMAT_VERSION: u8 = 1;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    // Serialising plain structs into a Vec cannot fail: no maps with non-string keys, no
    // sequences of unknown length.
    bincode::serialize_into(&mut out, value).expect("bincode encodes store records");
    out
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, rest)) => bincode::deserialize(rest)
            .map_err(|err| StoreError::Corrupt(format!("undecodable record: {err}"))),
        Some((other, _)) => Err(StoreError::Corrupt(format!(
            "record has unknown format version {other}"
        ))),
        None => Err(StoreError::Corrupt("empty record".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_and_byte_vectors_share_one_layout() {
        // Chunks and cached bodies were stored as `Vec<u8>` and are read as bytes.
        let stored = encode(&vec![1u8, 2, 3]);
        let read: serde_bytes::ByteBuf = decode(&stored).unwrap();
        assert_eq!(read.into_vec(), [1, 2, 3]);
        assert_eq!(encode(&serde_bytes::Bytes::new(&[1, 2, 3])), stored);
    }

    #[test]
    fn round_trip_and_rejects_foreign_bytes() {
        let value = (42u64, "hello".to_owned(), vec![1u8, 2, 3]);
        let bytes = encode(&value);
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<(u64, String, Vec<u8>)>(&bytes).unwrap(), value);
        assert!(matches!(
            decode::<u64>(&[9, 0, 0]),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(decode::<u64>(&[]), Err(StoreError::Corrupt(_))));
        assert!(matches!(
            decode::<String>(&bytes[..3]),
            Err(StoreError::Corrupt(_))
        ));
    }
}
