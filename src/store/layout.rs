//! Key layout of the sled trees. Daemon ids never contain a NUL byte (they are
//! `[A-Za-z0-9._-]`), so `daemon_id ++ 0x00` is a prefix that no other daemon's keys share,
//! and big-endian sequence numbers after it sort numerically.

/// Key of the format byte in the `meta` tree.
pub const FORMAT_KEY: &[u8] = b"format";

/// `daemon_id ++ 0x00`: the prefix of one daemon's range in a per-daemon tree.
pub fn daemon_prefix(daemon_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(daemon_id.len() + 9);
    key.extend_from_slice(daemon_id.as_bytes());
    key.push(0);
    key
}

/// `daemon_id ++ 0x00 ++ seq (big-endian)`.
pub fn daemon_seq_key(daemon_id: &str, seq: u64) -> Vec<u8> {
    let mut key = daemon_prefix(daemon_id);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The sequence number at the end of a `daemon_seq_key`.
pub fn seq_of(key: &[u8]) -> u64 {
    let mut tail = [0u8; 8];
    if key.len() >= 8 {
        tail.copy_from_slice(&key[key.len() - 8..]);
    }
    u64::from_be_bytes(tail)
}

/// `daemon_id ++ 0x00 ++ text`: keys of the idempotency and response trees.
pub fn daemon_text_key(daemon_id: &str, parts: &[&str]) -> Vec<u8> {
    let mut key = daemon_prefix(daemon_id);
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            key.push(0);
        }
        key.extend_from_slice(part.as_bytes());
    }
    key
}

/// `completed_at_ms (big-endian) ++ command_id`: the `finished` index, oldest first.
pub fn finished_key(completed_at_ms: u64, command_id: &str) -> Vec<u8> {
    let mut key = completed_at_ms.to_be_bytes().to_vec();
    key.extend_from_slice(command_id.as_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_keys_sort_numerically_within_a_daemon() {
        let a = daemon_seq_key("d", 9);
        let b = daemon_seq_key("d", 10);
        let c = daemon_seq_key("d", 256);
        assert!(a < b && b < c);
        assert_eq!(seq_of(&c), 256);
        // "d" and "d2" share no prefix range.
        assert!(!daemon_seq_key("d2", 1).starts_with(&daemon_prefix("d")));
    }
}
