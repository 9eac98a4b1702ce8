//! The change log: updates a daemon posted with its polls, numbered by the relay (`seq`,
//! from 1, no gaps except where retention trimmed the oldest), de-duplicated by the
//! daemon's own `seq` so that a resent batch never appears twice.

use serde::{Deserialize, Serialize};
use sled::transaction::ConflictableTransactionResult;
use sled::Transactional;

use super::daemons::DaemonRecord;
use super::usage::{stored_size, Trim};
use super::{codec, layout, machine, Result, SledStore, StoreError};

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ChangeRecord {
    pub(super) kind: String,
    pub(super) timestamp_ms: u64,
    pub(super) stored_at_ms: u64,
    pub(super) data_json: String,
    pub(super) daemon_seq: Option<u64>,
}

/// An update as posted by a daemon, validated.
#[derive(Debug, Clone)]
pub struct NewChange {
    pub kind: String,
    /// The daemon's timestamp; the relay's clock when absent.
    pub timestamp_ms: Option<u64>,
    pub data_json: String,
    pub daemon_seq: Option<u64>,
}

/// A stored change-log entry.
#[derive(Debug, Clone)]
pub struct ChangeEntry {
    pub seq: u64,
    pub kind: String,
    pub timestamp_ms: u64,
    pub stored_at_ms: u64,
    pub data_json: String,
}

#[derive(Debug, Clone, Copy)]
pub struct AppendOutcome {
    pub appended: usize,
    pub last_update_seq: u64,
    pub last_change_seq: u64,
}

impl ChangeEntry {
    pub(super) fn from_stored(key: &[u8], value: &[u8]) -> Result<ChangeEntry> {
        let record: ChangeRecord = codec::decode(value)?;
        Ok(ChangeEntry {
            seq: layout::seq_of(key),
            kind: record.kind,
            timestamp_ms: record.timestamp_ms,
            stored_at_ms: record.stored_at_ms,
            data_json: record.data_json,
        })
    }
}

impl SledStore {
    /// Appends updates to the daemon's change log in one atomic step, dropping those whose
    /// daemon `seq` is at or below the stored `last_update_seq`. Call [`SledStore::commit`]
    /// before acknowledging.
    pub fn append_changes(
        &self,
        daemon_id: &str,
        updates: Vec<NewChange>,
        now_ms: u64,
    ) -> Result<AppendOutcome> {
        let _guard = self.lock_daemon(daemon_id);
        let mut daemon: DaemonRecord = self
            .get_decoded(&self.daemons, daemon_id.as_bytes())?
            .ok_or_else(|| StoreError::UnknownDaemon(daemon_id.to_owned()))?;
        let admitted = machine::admit_updates(
            &mut daemon.last_update_seq,
            &mut daemon.last_change_seq,
            updates,
            now_ms,
        );
        let rows = admitted
            .iter()
            .map(|(seq, record)| {
                Ok((
                    layout::daemon_seq_key(daemon_id, *seq),
                    self.encoded(record)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let outcome = AppendOutcome {
            appended: rows.len(),
            last_update_seq: daemon.last_update_seq,
            last_change_seq: daemon.last_change_seq,
        };
        if rows.is_empty() {
            return Ok(outcome);
        }
        let bytes = rows
            .iter()
            .map(|(key, value)| stored_size(key, value))
            .sum();
        self.reserve_budget(daemon_id, bytes, Trim::Write, now_ms)?;
        let daemon_bytes = self.encoded(&daemon)?;
        (&self.daemons, &self.changes).transaction(
            |(daemons, changes)| -> ConflictableTransactionResult<(), StoreError> {
                daemons.insert(daemon_id.as_bytes(), daemon_bytes.as_slice())?;
                for (key, value) in &rows {
                    changes.insert(key.as_slice(), value.as_slice())?;
                }
                Ok(())
            },
        )?;
        Ok(outcome)
    }

    /// Up to `limit` entries with `seq > after_seq`, oldest first (for tests).
    #[cfg(test)]
    pub fn changes_after(
        &self,
        daemon_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<ChangeEntry>> {
        self.changes_page(daemon_id, after_seq, limit, usize::MAX)
    }

    /// Up to `limit` entries with `seq > after_seq`, oldest first, stopping once the entries read hold `max_bytes` of data
    /// (at least one entry), so that a reader of large entries holds few at a time.
    pub fn changes_page(
        &self,
        daemon_id: &str,
        after_seq: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<ChangeEntry>> {
        let start = layout::daemon_seq_key(daemon_id, after_seq.saturating_add(1));
        let end = layout::daemon_seq_key(daemon_id, u64::MAX);
        let mut entries = Vec::new();
        let mut bytes = 0;
        for item in self.changes.range(start..=end).take(limit) {
            let (key, value) = item?;
            let entry = ChangeEntry::from_stored(&key, &self.spill.resolve(&value)?)?;
            bytes += entry.data_json.len();
            entries.push(entry);
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(entries)
    }

    /// The `seq` after which entries with a timestamp at or after `time_ms` begin: the
    /// `after_seq` that turns `?since=<RFC 3339 time>` into a sequence position.
    pub fn seq_before_time(&self, daemon_id: &str, time_ms: u64) -> Result<u64> {
        let mut last = 0;
        for item in self.changes.scan_prefix(layout::daemon_prefix(daemon_id)) {
            let (key, value) = item?;
            let entry = ChangeEntry::from_stored(&key, &self.spill.resolve(&value)?)?;
            if entry.timestamp_ms >= time_ms {
                return Ok(entry.seq - 1);
            }
            last = entry.seq;
        }
        Ok(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::temp_store;

    fn change(kind: &str, seq: Option<u64>, ts: Option<u64>) -> NewChange {
        NewChange {
            kind: kind.into(),
            timestamp_ms: ts,
            data_json: format!("{{\"k\":\"{kind}\"}}"),
            daemon_seq: seq,
        }
    }

    #[test]
    fn retries_are_dropped_and_sequence_is_dense() {
        let (_dir, store) = temp_store();
        store.ensure_daemon("d", 0).unwrap();
        let first = store
            .append_changes(
                "d",
                vec![
                    change("a", Some(1), Some(100)),
                    change("b", Some(2), Some(200)),
                ],
                5,
            )
            .unwrap();
        assert_eq!(
            (first.appended, first.last_update_seq, first.last_change_seq),
            (2, 2, 2)
        );
        // The same batch again plus one new update: only the new one lands.
        let retry = store
            .append_changes(
                "d",
                vec![
                    change("a", Some(1), None),
                    change("b", Some(2), None),
                    change("c", Some(3), Some(300)),
                ],
                6,
            )
            .unwrap();
        assert_eq!(
            (retry.appended, retry.last_update_seq, retry.last_change_seq),
            (1, 3, 3)
        );
        // Updates without a daemon seq are always appended.
        store
            .append_changes("d", vec![change("free", None, None)], 7)
            .unwrap();
        let all = store.changes_after("d", 0, 100).unwrap();
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(
            all.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c", "free"]
        );
        assert_eq!(all[3].timestamp_ms, 7);
        assert_eq!(store.changes_after("d", 2, 1).unwrap()[0].kind, "c");
        assert_eq!(store.seq_before_time("d", 150).unwrap(), 1);
        assert_eq!(store.seq_before_time("d", 10_000).unwrap(), 4);
        assert!(store.changes_after("other", 0, 10).unwrap().is_empty());
    }
}
