//! Retention: the sweep a background task runs to keep the data dir bounded. It trims each
//! daemon's change log by count and age, expires commands past their TTL, forgets finished
//! commands (and their idempotency entries) after `results_max_age`, and drops old cached
//! GET responses. Deletions are not acknowledgements, so the sweep never commits; it works
//! in small batches and takes a daemon's lock only to expire a command.

use super::{layout, ChangeEntry, CommandRecord, CommandState, Result, SledStore};
use crate::store::responses::CachedResponse;

/// Entries removed per sled batch.
const SWEEP_BATCH: usize = 1_000;

#[derive(Debug, Clone, Copy)]
pub struct RetentionPolicy {
    pub changes_max_entries: u64,
    pub changes_max_age_ms: u64,
    pub results_max_age_ms: u64,
    pub responses_max_age_ms: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepStats {
    pub changes_removed: u64,
    pub commands_expired: u64,
    pub commands_purged: u64,
    pub responses_removed: u64,
}

impl SledStore {
    pub fn sweep(&self, policy: &RetentionPolicy, now_ms: u64) -> Result<SweepStats> {
        let mut stats = SweepStats::default();
        for daemon in self.daemons()? {
            stats.changes_removed +=
                self.trim_changes(&daemon.daemon_id, daemon.last_change_seq, policy, now_ms)?;
            stats.commands_expired += self.expire_queue(&daemon.daemon_id, now_ms)?;
        }
        stats.commands_purged =
            self.purge_finished(now_ms.saturating_sub(policy.results_max_age_ms))?;
        stats.responses_removed =
            self.purge_responses(now_ms.saturating_sub(policy.responses_max_age_ms))?;
        Ok(stats)
    }

    fn trim_changes(
        &self,
        daemon_id: &str,
        last_seq: u64,
        policy: &RetentionPolicy,
        now_ms: u64,
    ) -> Result<u64> {
        let keep_from_seq = last_seq.saturating_sub(policy.changes_max_entries) + 1;
        let cutoff_ms = now_ms.saturating_sub(policy.changes_max_age_ms);
        let mut removed = 0;
        loop {
            let mut batch = sled::Batch::default();
            let mut in_batch = 0;
            let mut done = true;
            for item in self.changes.scan_prefix(layout::daemon_prefix(daemon_id)) {
                let (key, value) = item?;
                let entry = ChangeEntry::from_stored(&key, &self.spill.resolve(&value)?)?;
                if entry.seq >= keep_from_seq && entry.stored_at_ms >= cutoff_ms {
                    break;
                }
                batch.remove(key);
                in_batch += 1;
                if in_batch == SWEEP_BATCH {
                    done = false;
                    break;
                }
            }
            {
                let _gate = self.gate.shared();
                self.changes.apply_batch(batch)?;
            }
            removed += in_batch as u64;
            if done {
                return Ok(removed);
            }
        }
    }

    fn expire_queue(&self, daemon_id: &str, now_ms: u64) -> Result<u64> {
        let mut due = Vec::new();
        for item in self.queue.scan_prefix(layout::daemon_prefix(daemon_id)) {
            let (_, command_id) = item?;
            if let Some(command) = self.get_decoded::<CommandRecord>(&self.commands, &command_id)? {
                if command.due_to_expire(now_ms) {
                    due.push(command.id);
                }
            }
        }
        let mut expired = 0;
        for command_id in due {
            if let Some(command) = self.command_at(&command_id, now_ms)? {
                if command.state == CommandState::Expired && command.finished_at_ms == now_ms {
                    expired += 1;
                }
            }
        }
        Ok(expired)
    }

    /// Forgets one finished command: its record, its `finished` index entry and its
    /// idempotency entry (as `purge_finished` does, for a disk budget).
    pub(super) fn forget_finished(&self, command: &CommandRecord) -> Result<()> {
        let _guard = self.lock_daemon(&command.daemon_id);
        // Under the lock: only a command still finished is forgotten.
        let still_finished = self
            .get_decoded::<CommandRecord>(&self.commands, command.id.as_bytes())?
            .is_some_and(|current| current.state.is_final());
        if !still_finished {
            return Ok(());
        }
        if let Some((key_id, idem)) = &command.idempotency {
            // Only while it still names this command.
            let key = layout::daemon_text_key(&command.daemon_id, &[key_id, idem]);
            let _ = self.idempotency.compare_and_swap(
                key,
                Some(command.id.as_bytes()),
                None as Option<&[u8]>,
            )?;
        }
        self.commands.remove(command.id.as_bytes())?;
        self.finished
            .remove(layout::finished_key(command.finished_at_ms, &command.id))?;
        Ok(())
    }

    fn purge_finished(&self, cutoff_ms: u64) -> Result<u64> {
        let mut purged = 0;
        let end = cutoff_ms.to_be_bytes();
        loop {
            let mut index = sled::Batch::default();
            let mut commands = sled::Batch::default();
            let mut idempotency = sled::Batch::default();
            let mut in_batch = 0;
            for item in self.finished.range(..end.as_slice()) {
                let (key, _) = item?;
                let command_id = &key[8..];
                // Only the command this entry indexes: a crash inside `finish_locked` can
                // leave an entry of a command that is not finished (then, or at that time).
                if let Some(command) = self
                    .get_decoded::<CommandRecord>(&self.commands, command_id)?
                    .filter(|c| c.state.is_final() && c.finished_at_ms.to_be_bytes() == key[..8])
                {
                    if let Some((key_id, idem)) = &command.idempotency {
                        idempotency
                            .remove(layout::daemon_text_key(&command.daemon_id, &[key_id, idem]));
                    }
                    commands.remove(command_id);
                }
                index.remove(key);
                in_batch += 1;
                if in_batch == SWEEP_BATCH {
                    break;
                }
            }
            if in_batch == 0 {
                return Ok(purged);
            }
            // Index last: a crash in between leaves an index entry that the next sweep
            // removes, never a command that no sweep would find.
            let _gate = self.gate.shared();
            self.idempotency.apply_batch(idempotency)?;
            self.commands.apply_batch(commands)?;
            self.finished.apply_batch(index)?;
            purged += in_batch as u64;
        }
    }

    fn purge_responses(&self, cutoff_ms: u64) -> Result<u64> {
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        for item in self.responses.iter() {
            let (key, value) = item?;
            let response: CachedResponse = self.decode(&value)?;
            if response.stored_at_ms < cutoff_ms {
                batch.remove(key);
                removed += 1;
            }
        }
        let _gate = self.gate.shared();
        self.responses.apply_batch(batch)?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::temp_store;
    use crate::store::{NewChange, NewCommand};

    #[test]
    fn sweep_trims_expires_and_purges() {
        let (_dir, store) = temp_store();
        store.ensure_daemon("d", 0).unwrap();
        let updates = (0..10)
            .map(|i| NewChange {
                kind: "e".into(),
                timestamp_ms: None,
                data_json: "null".into(),
                daemon_seq: Some(i + 1),
            })
            .collect();
        store.append_changes("d", updates, 0).unwrap();
        let command = store
            .enqueue(
                NewCommand {
                    daemon_id: "d".into(),
                    method: "m".into(),
                    params_json: "{}".into(),
                    stream: false,
                    ttl_ms: 100,
                    idempotency: Some(("k".into(), "i".into())),
                    queue_limit: 10,
                },
                0,
            )
            .unwrap()
            .command;
        let policy = RetentionPolicy {
            changes_max_entries: 4,
            changes_max_age_ms: 2_000,
            results_max_age_ms: 1_000,
            responses_max_age_ms: 1_000,
        };
        let stats = store.sweep(&policy, 500).unwrap();
        assert_eq!(stats.changes_removed, 6);
        assert_eq!(stats.commands_expired, 1);
        let left = store.changes_after("d", 0, 100).unwrap();
        assert_eq!(
            left.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [7, 8, 9, 10]
        );
        assert_eq!(
            store.command(&command.id).unwrap().unwrap().state,
            CommandState::Expired
        );
        let stats = store.sweep(&policy, 5_000).unwrap();
        assert_eq!(stats.commands_purged, 1);
        assert_eq!(stats.changes_removed, 4, "age limit reached too");
        assert!(store.command(&command.id).unwrap().is_none());
        assert_eq!(store.idempotency.len(), 0);
    }
}
