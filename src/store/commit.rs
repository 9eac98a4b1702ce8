//! Group commit. Request tasks hand a waiter to one flusher thread; the thread takes every
//! waiter that is queued, makes the database durable once ([`SyncedDb::sync`]: sled's
//! blocking `Db::flush()`, then a real `fdatasync`) and wakes them all with its outcome. A
//! waiter is only taken after its write finished, so the sync that answers it started
//! after the write: an acknowledgement sent after `commit` resolves survives a power cut.
//!
//! Why a thread and not `flush_async`: concurrent `flush_async` calls deadlock in sled
//! 0.34.7 (sled #1308, #1241). The thread also keeps blocking fsyncs off the runtime.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::synced::SyncedDb;
use super::StoreError;

type Waiter = oneshot::Sender<Result<(), String>>;

/// Counters of the flusher, for metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitStats {
    /// Flushes performed.
    pub flushes: u64,
    /// Commit calls answered.
    pub commits: u64,
    /// Total time spent in [`SyncedDb::sync`] (flush and fdatasync), microseconds.
    pub flush_micros: u64,
}

struct Counters {
    flushes: AtomicU64,
    commits: AtomicU64,
    flush_micros: AtomicU64,
    /// Seconds per flush.
    flush_seconds: crate::metrics::Histogram,
    /// Commits answered per flush.
    batch_size: crate::metrics::Histogram,
}

/// Writes whose effect someone may see before their writer's commit resolves: a new
/// command can be leased by a poll while the request that queued it still waits for its
/// flush, and a stream chunk can be read by a client's pump before the daemon's post of
/// it is committed. Counted, not listed: `started` before the write, `finished` after
/// it, and after each successful flush `durable` is what `finished` was when the flush
/// began.
#[derive(Default)]
struct Tracked {
    started: AtomicU64,
    finished: AtomicU64,
    durable: AtomicU64,
}

/// Longest the flusher lingers before a flush to let more commits join it.
///
/// Each flush costs the same CPU however many commits it answers (sled's write and
/// `sync_file_range` on one of its I/O threads, the `fdatasync`, the wake-ups): under
/// concurrent writes, CPU spent flushing is CPU the writers do not get. So when the last
/// flush answered more than one commit, the flusher waits as long as that flush took (at
/// most this) before it takes the queue, as PostgreSQL's `commit_delay` does when other
/// transactions are active: a commit waits at most about two flushes instead of one, and
/// a lone writer never waits (its flushes answer one commit each). BENCHMARKS.md, "The
/// write path", has what it buys.
const MAX_LINGER: Duration = Duration::from_millis(2);

/// Longest a commit waits for its flush before it is answered as a failure.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct GroupCommit {
    /// `None` once stopped. The lock only guards taking the sender out on stop.
    waiters_tx: Mutex<Option<mpsc::Sender<Waiter>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    counters: Arc<Counters>,
    tracked: Arc<Tracked>,
}

impl GroupCommit {
    /// Starts the flusher; with a seal, each commit bumps its counter and the seal is kept
    /// up to date (see `seal.rs`).
    pub fn start(db: Arc<SyncedDb>, seal: Option<super::seal::Seal>) -> GroupCommit {
        let (waiters_tx, waiters_rx) = mpsc::channel::<Waiter>();
        let counters = Arc::new(Counters {
            flushes: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            flush_micros: AtomicU64::new(0),
            flush_seconds: crate::metrics::Histogram::new(crate::metrics::LATENCY_BUCKETS),
            batch_size: crate::metrics::Histogram::new(crate::metrics::BATCH_BUCKETS),
        });
        let tracked = Arc::new(Tracked::default());
        let (thread_counters, thread_tracked) = (counters.clone(), tracked.clone());
        let thread = std::thread::Builder::new()
            .name("syncrelay-flush".into())
            .spawn(move || flush_loop(&db, seal, &waiters_rx, &thread_counters, &thread_tracked))
            .expect("spawn the flusher thread");
        GroupCommit {
            waiters_tx: Mutex::new(Some(waiters_tx)),
            thread: Mutex::new(Some(thread)),
            counters,
            tracked,
        }
    }

    /// Runs `write` as a tracked write (see [`GroupCommit::tracked_durable`]). It counts
    /// as finished even if it panics, so one bad write cannot make every later check
    /// answer "commit first".
    pub fn tracked<T>(&self, write: impl FnOnce() -> T) -> T {
        struct Finish<'a>(&'a AtomicU64);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.tracked.started.fetch_add(1, Ordering::SeqCst);
        let _finish = Finish(&self.tracked.finished);
        write()
    }

    /// Whether every tracked write visible now is on disk. `false` means "commit first";
    /// it may be `false` when a commit would find nothing to do, never `true` wrongly: a
    /// write visible now started before `started` is read, and a flush whose start saw
    /// `finished` at least that high began after every such write ended (or, if it began
    /// later still, after the write was visible, which its flush covers).
    pub fn tracked_durable(&self) -> bool {
        let started = self.tracked.started.load(Ordering::SeqCst);
        self.tracked.durable.load(Ordering::SeqCst) >= started
    }

    /// A commit unless every tracked write visible now is already on disk (then at once).
    pub async fn commit_visible(&self) -> Result<(), StoreError> {
        if self.tracked_durable() {
            return Ok(());
        }
        self.commit().await
    }

    pub async fn commit(&self) -> Result<(), StoreError> {
        let (done_tx, done_rx) = oneshot::channel();
        {
            let guard = self.waiters_tx.lock().unwrap_or_else(|p| p.into_inner());
            let sender = guard.as_ref().ok_or(StoreError::Closed)?;
            sender.send(done_tx).map_err(|_| StoreError::Closed)?;
        }
        // sled's flush can wait forever once a write failed (seen with ENOSPC): a commit
        // that takes this long is answered as a failure, so no request hangs on it and
        // nothing is acknowledged.
        match tokio::time::timeout(COMMIT_TIMEOUT, done_rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(message))) => {
                super::storage_failed(&message);
                Err(StoreError::Unavailable(message))
            }
            Ok(Err(_)) => Err(StoreError::Closed),
            Err(_) => {
                let message = format!(
                    "the store did not flush within {}s",
                    COMMIT_TIMEOUT.as_secs()
                );
                super::storage_failed(&message);
                Err(StoreError::Unavailable(message))
            }
        }
    }

    /// Appends the flush latency and batch size histograms in Prometheus text format.
    pub fn render_histograms(&self, out: &mut String) {
        out.push_str("# TYPE syncrelay_store_flush_seconds histogram\n");
        self.counters
            .flush_seconds
            .render(out, "syncrelay_store_flush_seconds", "");
        out.push_str("# TYPE syncrelay_store_flush_batch_size histogram\n");
        self.counters
            .batch_size
            .render(out, "syncrelay_store_flush_batch_size", "");
    }

    pub fn stats(&self) -> CommitStats {
        CommitStats {
            flushes: self.counters.flushes.load(Ordering::Relaxed),
            commits: self.counters.commits.load(Ordering::Relaxed),
            flush_micros: self.counters.flush_micros.load(Ordering::Relaxed),
        }
    }

    /// Answers every queued waiter and joins the thread.
    pub fn stop(&self) {
        self.waiters_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

fn flush_loop(
    db: &SyncedDb,
    mut seal: Option<super::seal::Seal>,
    waiters_rx: &mpsc::Receiver<Waiter>,
    counters: &Counters,
    tracked: &Tracked,
) {
    // `recv` fails once every sender is gone: stop() was called and the queue is drained.
    // The last flush's batch size and duration: what lingering is sized by.
    let (mut last_batch, mut last_flush) = (0, Duration::ZERO);
    while let Ok(first) = waiters_rx.recv() {
        if last_batch >= 2 {
            std::thread::sleep(last_flush.min(MAX_LINGER));
        }
        let mut batch = vec![first];
        batch.extend(waiters_rx.try_iter());
        last_batch = batch.len();
        let started = Instant::now();
        let covered = tracked.finished.load(Ordering::SeqCst);
        let bumped = seal.as_mut().map_or(Ok(()), |seal| seal.bump());
        let outcome = bumped.and_then(|()| db.sync().map_err(|err| err.to_string()));
        match &outcome {
            Ok(()) => {
                tracked.durable.fetch_max(covered, Ordering::SeqCst);
                if let Some(seal) = &mut seal {
                    seal.flush_succeeded();
                    seal.flushed(false);
                }
            }
            Err(message) => tracing::error!(error = %message, "flushing the store failed"),
        }
        counters.flushes.fetch_add(1, Ordering::Relaxed);
        counters
            .commits
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let elapsed = started.elapsed();
        last_flush = elapsed;
        counters
            .flush_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        counters.flush_seconds.observe(elapsed.as_secs_f64());
        counters.batch_size.observe(batch.len() as f64);
        for waiter in batch {
            let _ = waiter.send(outcome.clone());
        }
    }
    // Stopping: seal the last successful flush.
    if let Some(seal) = &mut seal {
        seal.flushed(true);
    }
}

#[cfg(test)]
mod tests {
    use crate::store::test_support::temp_store;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_commits_share_flushes() {
        let (_dir, store) = temp_store();
        let store = std::sync::Arc::new(store);
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..20 {
                    store.commit().await.unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let stats = store.commit_stats();
        assert_eq!(stats.commits, 64 * 20);
        assert!(stats.flushes <= stats.commits);
        store.close().unwrap();
        assert!(matches!(
            store.commit().await,
            Err(crate::store::StoreError::Closed)
        ));
    }
}
