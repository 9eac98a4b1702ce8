//! The durable store: every queued command, result, change-log entry, key and cached
//! response lives here, in one sled database under `data_dir`. Its API speaks the domain
//! (connect, enqueue, lease, complete, append_changes, …) and no sled type leaves this
//! module, so another backend can be added later.
//!
//! Layout (see `layout`): one tree per concept, keys prefixed by daemon id and big-endian
//! sequence numbers so that each daemon's queue and change log are ordered prefix ranges.
//! Values are bincode behind a one-byte format version (`codec`).
//!
//! Durability: writes land in sled's in-memory log; [`Store::commit`] resolves once a
//! flush that *started after the call* has reached the disk, `fdatasync` included
//! (`synced`: sled's own flush is no fsync). One flusher thread serves all callers
//! (`commit`): group commit, never `flush_async` from request tasks (sled #1308).
//!
//! Concurrency: mutations of one daemon's records are serialised by a striped lock held only
//! across synchronous sled calls (never across `.await`), and multi-tree changes use sled
//! transactions so a crash never leaves half of one.

mod agent_state;
mod backup;
mod changes;
mod codec;
mod commands;
mod commit;
mod contexts;
mod credentials;
mod daemons;
#[doc(hidden)]
pub mod fuzzing;
mod gate;
mod layout;
pub mod postgres;
mod responses;
mod retention;
mod seal;
mod spill;
mod synced;
mod usage;

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{de::DeserializeOwned, Serialize};

pub use agent_state::{AgentStore, OutboxEvent, StoredResult};
pub use backup::{BackupProgress, BackupSummary};
pub use changes::{ChangeEntry, NewChange};
pub use commands::{
    new_command_id, CommandRecord, CommandState, CompleteOutcome, EnqueueOutcome, LeaseBatch,
    NewCommand,
};
pub use commit::CommitStats;
pub use contexts::{ChunkOutcome, ContextRecord, ContextRequest, ContextState, NewChunk, Opened};
pub use credentials::{KeyRecord, Role};
pub use daemons::DaemonRecord;
pub use responses::CachedResponse;
pub use retention::{RetentionPolicy, SweepStats};
#[doc(hidden)]
pub use synced::UNSYNCED_FOR_BENCH_ENV;
pub use usage::{TreeUsage, Usage};

/// sled's page cache.
const SLED_CACHE_BYTES: u64 = 64 << 20;
/// Number of stripes of the per-daemon mutation lock.
const LOCK_STRIPES: usize = 64;
/// The seal beside the database (`seal.rs`): how many group commits were on disk.
pub const SEAL_FILE: &str = "store.seal";

/// Errors of the store. `Unavailable` is the one a caller maps to 503
/// `storage_unavailable`: nothing of the failed call was acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the queue of daemon {daemon_id} is full ({limit} commands)")]
    QueueFull { daemon_id: String, limit: u64 },
    /// The write does not fit in the daemon's disk budget, even after dropping the
    /// daemon's reclaimable data.
    #[error("daemon {0} is over its disk budget")]
    OverBudget(String),
    #[error("unknown daemon {0}")]
    UnknownDaemon(String),
    /// A newer connect replaced the connection a poll belongs to.
    #[error("the connection was superseded by a newer connect")]
    Superseded,
    #[error("the store is closed")]
    Closed,
}

impl From<sled::Error> for StoreError {
    fn from(err: sled::Error) -> Self {
        match err {
            sled::Error::Corruption { .. } => StoreError::Corrupt(err.to_string()),
            sled::Error::Io(_) => {
                let message = err.to_string();
                storage_failed(&message);
                StoreError::Unavailable(message)
            }
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

/// What to do when the store's disk fails (a write's I/O error, a flush that fails or
/// stalls). sled 0.34 does not recover from that in-process: after ENOSPC its flush waits
/// forever and its locks stay taken. `syncrelay serve` installs a hook that exits, so a
/// supervisor's restart recovers the store (everything acknowledged is already on disk).
type FailureHook = Box<dyn Fn(&str) + Send + Sync>;
static STORAGE_FAILURE_HOOK: std::sync::OnceLock<FailureHook> = std::sync::OnceLock::new();

/// Installs the storage-failure hook (once per process; later calls are ignored).
pub fn on_storage_failure(hook: impl Fn(&str) + Send + Sync + 'static) {
    let _ = STORAGE_FAILURE_HOOK.set(Box::new(hook));
}

/// Exit status after a storage failure (EX_TEMPFAIL: try again).
pub const EXIT_STORAGE_FAILED: i32 = 75;

/// Crash-only on a failing disk (the relay's store or the agent's state): what is in
/// flight is answered as a failure, then the process exits with EX_TEMPFAIL so that its
/// supervisor restarts it. sled recovers at open; a failed fsync is never retried in
/// process (the store refuses every later sync); a restart on a still-full disk fails
/// until space returns.
pub fn exit_on_storage_failure() {
    let exiting = std::sync::atomic::AtomicBool::new(false);
    on_storage_failure(move |message| {
        if !exiting.swap(true, std::sync::atomic::Ordering::SeqCst) {
            tracing::error!(
                error = message,
                "the store's disk failed; exiting so that a restart recovers it \
                 (everything acknowledged is on disk)"
            );
            std::thread::spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(500));
                std::process::exit(EXIT_STORAGE_FAILED);
            });
        }
    });
}

pub(crate) fn storage_failed(message: &str) {
    if let Some(hook) = STORAGE_FAILURE_HOOK.get() {
        hook(message);
    }
}

impl From<sled::transaction::TransactionError<StoreError>> for StoreError {
    fn from(err: sled::transaction::TransactionError<StoreError>) -> Self {
        match err {
            sled::transaction::TransactionError::Abort(inner) => inner,
            sled::transaction::TransactionError::Storage(storage) => storage.into(),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The relay's database. Cheap to share behind an `Arc`.
pub struct Store {
    db: sled::Db,
    /// The same database, with the sync that makes it durable.
    synced: Arc<synced::SyncedDb>,
    daemons: sled::Tree,
    commands: sled::Tree,
    queue: sled::Tree,
    finished: sled::Tree,
    changes: sled::Tree,
    idempotency: sled::Tree,
    responses: sled::Tree,
    credentials: sled::Tree,
    contexts: sled::Tree,
    context_index: sled::Tree,
    context_commands: sled::Tree,
    context_chunks: sled::Tree,
    context_garbage: sled::Tree,
    /// Large values, as pieces (see `spill`).
    spill: spill::Spill,
    committer: commit::GroupCommit,
    /// Serialises read-modify-write sequences on one daemon's records; guards no data of
    /// its own. Striped so memory does not grow with the number of daemons.
    daemon_locks: Vec<Mutex<()>>,
    /// Held shared by every mutation, exclusively by an online backup.
    gate: gate::Gate,
    /// Each daemon's bytes against its disk budget, between censuses.
    budget: usage::Budget,
}

/// A daemon's mutation lock, inside the write gate.
pub(crate) struct DaemonGuard<'a> {
    _gate: gate::Shared<'a>,
    _lock: MutexGuard<'a, ()>,
}

impl Store {
    /// Opens (or creates) the database in `dir` and starts the flusher thread.
    pub fn open(dir: &Path) -> Result<Store> {
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
        let store = Store {
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

    fn lock_daemon(&self, daemon_id: &str) -> DaemonGuard<'_> {
        // The gate first: a backup waits for held daemon locks, never the other way round.
        let gate = self.gate.shared();
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in daemon_id.bytes() {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        let stripe = &self.daemon_locks[(hash % LOCK_STRIPES as u64) as usize];
        // A panic while holding the guard leaves no torn data (sled transactions are
        // atomic), so a poisoned lock is safe to keep using.
        DaemonGuard {
            _gate: gate,
            _lock: stripe
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.committer.stop();
    }
}

/// Milliseconds since the Unix epoch, the store's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Store {
    /// A record as stored: large ones as pieces (`spill`).
    fn encoded<T: Serialize>(&self, value: &T) -> Result<Vec<u8>> {
        self.spill.encoded(value)
    }

    fn decode<T: DeserializeOwned>(&self, value: &[u8]) -> Result<T> {
        self.spill.decode(value)
    }

    fn get_decoded<T: DeserializeOwned>(&self, tree: &sled::Tree, key: &[u8]) -> Result<Option<T>> {
        self.spill.get_decoded(tree, key)
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::Store;

    pub fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open store");
        (dir, store)
    }
}
