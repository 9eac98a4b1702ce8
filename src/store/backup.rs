//! Online backup: a consistent copy of the whole database into a new directory while the
//! relay keeps serving. The copy holds the write gate exclusively, so it is one point in
//! time across every tree: mutations wait (reads, polls and streams go on), and resume as
//! soon as the last entry is copied; flushing the copy happens after the gate is released.
//! The result is an ordinary data dir: restoring is starting a relay on it.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{Result, SledStore, StoreError, SLED_CACHE_BYTES};

/// Bytes per batch written into the copy.
const BATCH_BYTES: usize = 4 << 20;
/// Least time between two progress reports.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Where a backup is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupProgress {
    /// Key and value bytes copied so far.
    pub copied_bytes: u64,
    /// What the whole copy is expected to hold (the store's size on disk, which is an
    /// upper bound: sled's files hold space not yet reclaimed).
    pub estimated_bytes: u64,
    pub entries: u64,
}

/// A finished backup.
#[derive(Debug, Clone, Copy)]
pub struct BackupSummary {
    pub bytes: u64,
    pub entries: u64,
    /// How long mutations waited for the copy.
    pub writes_paused: Duration,
    pub elapsed: Duration,
}

impl SledStore {
    /// Copies the database into `dir/db` (`dir` must not exist, or be empty). `progress` is
    /// called every few hundred milliseconds while entries are copied.
    pub fn backup_to(
        &self,
        dir: &Path,
        mut progress: impl FnMut(BackupProgress),
    ) -> Result<BackupSummary> {
        let started = Instant::now();
        let unavailable = |err: &dyn std::fmt::Display| {
            StoreError::Unavailable(format!("backup to {}: {err}", dir.display()))
        };
        std::fs::create_dir_all(dir).map_err(|err| unavailable(&err))?;
        let synced_target = super::synced::SyncedDb::open(
            sled::Config::new()
                .cache_capacity(SLED_CACHE_BYTES)
                .create_new(true),
            &dir.join("db"),
        )
        .map_err(|err| unavailable(&err))?;
        let target = synced_target.db();
        let estimated_bytes = self.db.size_on_disk()?;
        let mut done = BackupProgress {
            copied_bytes: 0,
            estimated_bytes,
            entries: 0,
        };
        let mut reported = Instant::now();
        let paused;
        {
            let exclusive_since = Instant::now();
            let _exclusive = self.gate.exclusive();
            for name in self.db.tree_names() {
                let source = self.db.open_tree(&name)?;
                let copy = target.open_tree(&name).map_err(|err| unavailable(&err))?;
                let mut batch = sled::Batch::default();
                let mut batch_bytes = 0;
                for item in source.iter() {
                    let (key, value) = item?;
                    let size = key.len() + value.len();
                    batch.insert(key, value);
                    batch_bytes += size;
                    done.copied_bytes += size as u64;
                    done.entries += 1;
                    if batch_bytes >= BATCH_BYTES {
                        copy.apply_batch(std::mem::take(&mut batch))
                            .map_err(|err| unavailable(&err))?;
                        batch_bytes = 0;
                    }
                    if reported.elapsed() >= PROGRESS_EVERY {
                        done.estimated_bytes = done.estimated_bytes.max(done.copied_bytes);
                        progress(done);
                        reported = Instant::now();
                    }
                }
                copy.apply_batch(batch).map_err(|err| unavailable(&err))?;
            }
            // The copy's ids continue above every id this store gave out (sled's own id
            // counter is not in any tree, so it was not copied).
            let id_base = self.spill.next_id()?;
            target
                .open_tree("meta")
                .and_then(|meta| meta.insert(super::spill::ID_BASE_KEY, &id_base.to_be_bytes()))
                .map_err(|err| unavailable(&err))?;
            paused = exclusive_since.elapsed();
        }
        // Durable before it is reported done: the copy's files, their directories, and the
        // backup directory's own entry (it may have been created above).
        synced_target.sync().map_err(|err| unavailable(&err))?;
        // The copy's own seal, so that damage to it is found when it is restored.
        let commits = target
            .open_tree("meta")
            .map_err(|err| unavailable(&err))
            .and_then(|meta| super::seal::commits_in(&meta))?;
        super::seal::write(&dir.join(super::SEAL_FILE), commits)
            .and_then(|()| crate::files::sync_parent(dir))
            .map_err(|err| unavailable(&err))?;
        drop(synced_target);
        done.estimated_bytes = done.copied_bytes;
        progress(done);
        Ok(BackupSummary {
            bytes: done.copied_bytes,
            entries: done.entries,
            writes_paused: paused,
            elapsed: started.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::store::test_support::temp_store;
    use crate::store::{NewChange, SledStore};

    #[test]
    fn the_copy_opens_as_a_store_with_everything_in_it() {
        let (_dir, store) = temp_store();
        store.ensure_daemon("d", 0).unwrap();
        let updates = (0..50)
            .map(|i| NewChange {
                kind: "e".into(),
                timestamp_ms: None,
                data_json: format!("{{\"i\":{i}}}"),
                daemon_seq: Some(i + 1),
            })
            .collect();
        store.append_changes("d", updates, 0).unwrap();
        // Ids the original gave out (context ids, owners of large values; reopened, sled's
        // counter jumps ahead, which a copy does not know about).
        let given_out = (0..3)
            .map(|_| store.spill.next_id().unwrap())
            .max()
            .unwrap();
        let target = tempfile::tempdir().unwrap();
        let copy_dir = target.path().join("copy");
        let mut reports = Vec::new();
        let summary = store
            .backup_to(&copy_dir, |progress| reports.push(progress))
            .unwrap();
        assert!(summary.entries >= 51, "{summary:?}");
        let last = reports.last().unwrap();
        assert_eq!(last.copied_bytes, summary.bytes);
        assert_eq!(last.estimated_bytes, summary.bytes);

        let copy = SledStore::open(&copy_dir).unwrap();
        assert!(
            copy.spill.next_id().unwrap() > given_out,
            "the copy hands out no id the original gave out"
        );
        let entries = copy.changes_after("d", 0, 100).unwrap();
        assert_eq!(entries.len(), 50);
        assert_eq!(entries[49].data_json, "{\"i\":49}");
        // Copying into a directory that already holds a database is refused.
        assert!(store.backup_to(&copy_dir, |_| {}).is_err());
    }
}
