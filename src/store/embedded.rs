//! The embedded backend: one sled database under `data_dir`, made durable by one group
//! commit thread (`commit`, `synced`: sled's own flush is no fsync). The domain operations
//! live beside it (`commands`, `contexts`, `changes`, …) as `impl SledStore` blocks; the
//! relay reaches them only through [`super::Store`], which commits before it returns.
//!
//! Concurrency: mutations of one daemon's records are serialised by a striped lock held only
//! across synchronous sled calls (never across `.await`). A multi-tree change is either a
//! sled transaction, so a crash never leaves half of one, or (queueing and finishing a
//! command, the hot path) single-key writes in an order whose every prefix the store reads
//! correctly (`commands.rs`): a sled transaction or batch costs two log writes and a
//! `sync_file_range` each, a single insert none.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{de::DeserializeOwned, Serialize};

use super::{codec, commit, gate, layout, seal, spill, synced, usage};
use super::{CommitStats, Result, StoreError, LOCK_STRIPES, SEAL_FILE, SLED_CACHE_BYTES};

/// The sled database and its group commit. Cheap to share behind an `Arc`.
pub struct SledStore {
    pub(super) db: sled::Db,
    /// The same database, with the sync that makes it durable.
    pub(super) synced: Arc<synced::SyncedDb>,
    pub(super) daemons: sled::Tree,
    pub(super) commands: sled::Tree,
    pub(super) queue: sled::Tree,
    pub(super) finished: sled::Tree,
    pub(super) changes: sled::Tree,
    pub(super) idempotency: sled::Tree,
    pub(super) responses: sled::Tree,
    pub(super) credentials: sled::Tree,
    pub(super) contexts: sled::Tree,
    pub(super) context_index: sled::Tree,
    pub(super) context_commands: sled::Tree,
    pub(super) context_chunks: sled::Tree,
    pub(super) context_garbage: sled::Tree,
    /// Large values, as pieces (see `spill`).
    pub(super) spill: spill::Spill,
    pub(super) committer: commit::GroupCommit,
    /// Serialises read-modify-write sequences on one daemon's records; guards no data of
    /// its own. Striped so memory does not grow with the number of daemons.
    pub(super) daemon_locks: Vec<Mutex<()>>,
    /// Held shared by every mutation, exclusively by an online backup.
    pub(super) gate: gate::Gate,
    /// Each daemon's bytes against its disk budget, between censuses.
    pub(super) budget: usage::Budget,
    /// Each daemon's queue counters, counted from the `queue` tree at first use after open
    /// (`commands.rs`); changed only under the daemon's lock.
    pub(super) queues: Mutex<std::collections::HashMap<String, super::commands::QueueCounters>>,
}

/// A daemon's mutation lock, inside the write gate.
pub(crate) struct DaemonGuard<'a> {
    _gate: gate::Shared<'a>,
    _lock: MutexGuard<'a, ()>,
}

impl SledStore {
    /// Opens (or creates) the database in `dir` and starts the flusher thread.
    pub fn open(dir: &Path) -> Result<SledStore> {
        std::fs::create_dir_all(dir)
            .map_err(|err| StoreError::Unavailable(format!("{}: {err}", dir.display())))?;
        // The page cache is capped so that RSS stays small on a small VPS whatever the
        // size of the stored contexts.
        let synced = Arc::new(synced::SyncedDb::open(
            sled::Config::new().cache_capacity(SLED_CACHE_BYTES),
            &dir.join("db"),
        )?);
        let db = synced.db().clone();
        let meta = db.open_tree("meta")?;
        match meta.get(layout::FORMAT_KEY)? {
            None => {
                meta.insert(layout::FORMAT_KEY, &[codec::FORMAT_VERSION])?;
                synced
                    .sync()
                    .map_err(|err| StoreError::Unavailable(format!("{}: {err}", dir.display())))?;
            }
            Some(found) if found.as_ref() == [codec::FORMAT_VERSION] => {}
            Some(found) => {
                return Err(StoreError::Corrupt(format!(
                    "data format {:?} is not the supported {}",
                    found.as_ref(),
                    codec::FORMAT_VERSION
                )))
            }
        }
        let store = SledStore {
            daemons: db.open_tree("daemons")?,
            commands: db.open_tree("commands")?,
            queue: db.open_tree("queue")?,
            finished: db.open_tree("finished")?,
            changes: db.open_tree("changes")?,
            idempotency: db.open_tree("idempotency")?,
            responses: db.open_tree("responses")?,
            credentials: db.open_tree("credentials")?,
            contexts: db.open_tree("contexts")?,
            context_index: db.open_tree("context_index")?,
            context_commands: db.open_tree("context_commands")?,
            context_chunks: db.open_tree("context_chunks")?,
            context_garbage: db.open_tree("context_garbage")?,
            spill: spill::Spill::open(&db)?,
            committer: commit::GroupCommit::start(
                synced.clone(),
                Some(seal::Seal::open(
                    dir,
                    SEAL_FILE,
                    &synced,
                    meta.clone(),
                    "Start the relay on a backup instead (`syncrelay serve --data-dir BACKUP`; \
                     backups are made with `syncrelay backup`).",
                )?),
            ),
            daemon_locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            gate: gate::Gate::default(),
            budget: usage::Budget::default(),
            queues: Mutex::default(),
            db,
            synced,
        };
        Ok(store)
    }

    /// Resolves once everything written before this call is on disk. Concurrent callers
    /// share one flush.
    pub async fn commit(&self) -> Result<()> {
        self.committer.commit().await
    }

    /// Resolves once every queued command and stream chunk visible now is on disk,
    /// including those whose writer still waits for its commit; at once (no flush) when
    /// they already are. Call it between reading such state and showing it outside: a
    /// daemon must never run a command a crash can take back (a client retrying with its
    /// `Idempotency-Key` would have the write run again as a new command), and a client
    /// must never be sent a chunk a crash can take back (a refetch may cut it differently).
    pub async fn commit_visible(&self) -> Result<()> {
        self.committer.commit_visible().await
    }

    /// Whether [`Store::commit_visible`] would resolve without a flush (for unit tests).
    #[cfg(test)]
    pub(crate) fn visible_durable(&self) -> bool {
        self.committer.tracked_durable()
    }

    /// Flush counts for metrics and benchmarks.
    pub fn commit_stats(&self) -> CommitStats {
        self.committer.stats()
    }

    /// Appends the flush latency and batch size histograms (Prometheus text).
    pub fn render_commit_histograms(&self, out: &mut String) {
        self.committer.render_histograms(out);
    }

    /// Flushes and stops the flusher thread; later commits fail with `Closed`.
    pub fn close(&self) -> Result<()> {
        self.committer.stop();
        self.synced
            .sync()
            .map_err(|err| StoreError::Unavailable(err.to_string()))
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.db.size_on_disk()?)
    }

    pub(super) fn lock_daemon(&self, daemon_id: &str) -> DaemonGuard<'_> {
        // The gate first: a backup waits for held daemon locks, never the other way round.
        let gate = self.gate.shared();
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in daemon_id.bytes() {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        let stripe = &self.daemon_locks[(hash % LOCK_STRIPES as u64) as usize];
        // A panic while holding the guard leaves no torn data (sled transactions are
        // atomic, and ordered single writes leave states the store reads as a crash would
        // leave them), so a poisoned lock is safe to keep using.
        DaemonGuard {
            _gate: gate,
            _lock: stripe
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        }
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        self.committer.stop();
    }
}

impl SledStore {
    /// A record as stored: large ones as pieces (`spill`).
    pub(super) fn encoded<T: Serialize>(&self, value: &T) -> Result<Vec<u8>> {
        self.spill.encoded(value)
    }

    pub(super) fn decode<T: DeserializeOwned>(&self, value: &[u8]) -> Result<T> {
        self.spill.decode(value)
    }

    pub(super) fn get_decoded<T: DeserializeOwned>(
        &self,
        tree: &sled::Tree,
        key: &[u8],
    ) -> Result<Option<T>> {
        self.spill.get_decoded(tree, key)
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use crate::store::SledStore;

    /// The relay's store on a fresh sled database.
    pub fn temp_relay_store() -> (tempfile::TempDir, crate::store::Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::open_sled(dir.path()).expect("open store");
        (dir, store)
    }

    pub fn temp_store() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open store");
        (dir, store)
    }
}
