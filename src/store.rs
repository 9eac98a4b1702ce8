//! The durable store: every queued command, result, change-log entry, key and cached
//! response lives here. [`Store`] (`api`) is the relay's only way in; it speaks the domain
//! (connect, enqueue, lease, post results, append changes, …) and is durable by
//! construction: a call that changes something returns once the change is durable, a
//! read that shows state outside returns once that state is durable. No backend type
//! leaves this module.
//!
//! The embedded backend (`embedded`, with the domain operations in `commands`,
//! `contexts`, `changes`, …) is one sled database under `data_dir`: one tree per concept,
//! keys prefixed by daemon id and big-endian sequence numbers so that each daemon's queue
//! and change log are ordered prefix ranges (`layout`), values bincode behind a one-byte
//! format version (`codec`). Its writes land in sled's in-memory log and are durable once
//! a group commit that started after them has reached the disk, `fdatasync` included
//! (`commit`, `synced`: sled's own flush is no fsync): one flusher thread, never
//! `flush_async` from request tasks (sled #1308).

mod agent_state;
mod api;
mod backup;
mod changes;
mod codec;
mod commands;
mod commit;
mod contexts;
mod credentials;
mod daemons;
mod embedded;
#[doc(hidden)]
pub mod fuzzing;
mod gate;
mod layout;
mod machine;
pub mod postgres;
mod responses;
mod retention;
mod seal;
mod spill;
mod synced;
mod usage;

use std::time::{SystemTime, UNIX_EPOCH};

pub use agent_state::{AgentStore, OutboxEvent, StoredResult};
pub use api::{ChunkLimits, Maintenance, Posted, PostedOutcome, Store, StoreSettings};
pub use backup::{BackupProgress, BackupSummary};
pub use changes::{AppendOutcome, ChangeEntry, NewChange};
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

#[cfg(test)]
pub(crate) use embedded::test_support;
pub(crate) use embedded::SledStore;

/// sled's page cache.
const SLED_CACHE_BYTES: u64 = 64 << 20;
/// Number of stripes of the per-daemon mutation lock.
const LOCK_STRIPES: usize = 64;
/// The seal beside the database (`seal.rs`): how many group commits were on disk.
pub const SEAL_FILE: &str = "store.seal";

/// Errors of the store. `Unavailable` is the one a caller maps to 503
/// `storage_unavailable`: nothing of the failed call was acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// The backend does not do this; the message says what to do instead.
    #[error("{0}")]
    Unsupported(String),
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

/// Milliseconds since the Unix epoch, the store's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
