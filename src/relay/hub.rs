//! The in-memory side of the relay: what wakes a waiting request. Nothing here is a source
//! of truth (the store is); it only tells waiters when to look again.
//!
//! - per daemon: a queue generation (bumped when a command is queued or leases are
//!   released), the last *committed* change-log seq (readers never see entries that could
//!   still be lost), the current connection id (a change answers old polls `superseded`),
//!   and liveness (polls waiting, last request) for `online`;
//! - per command: a signal fired once its result is committed;
//! - reads (mirrored GETs and other calls that change nothing) in flight: they are never
//!   stored. A read waits in its daemon's `reads` queue until a poll hands it out, and its
//!   result goes straight to the waiting client through `pending_reads`.
//!
//! Waiters subscribe first and read the store second, so no wake-up is missed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::store::{now_ms, DaemonRecord, Store, StoreError};

/// How stale the `last_seen` kept in a daemon's record may get while it polls; the
/// daemon view adds this process's own, exact, figure.
pub const LAST_SEEN_STEP_MS: u64 = 1_000;

pub struct DaemonSignals {
    pub queue: watch::Sender<u64>,
    /// Highest change-log seq that is on disk.
    pub changes: watch::Sender<u64>,
    pub connection: watch::Sender<Option<String>>,
    /// Highest daemon-side update seq that is on disk: what polls report.
    durable_update_seq: AtomicU64,
    /// Serialises connects of one daemon, so the connection id published here is always
    /// the one stored last. Held only across synchronous store calls.
    pub connect_lock: tokio::sync::Mutex<()>,
    polls_waiting: AtomicUsize,
    /// Moves whenever stored commands may have become ready for the daemon (queued,
    /// released by a reconnect): a stream leases again only then, or when a lease it
    /// knows of runs out.
    stored: AtomicU64,
    /// Last sync request seen by this process (ms); 0: none since start.
    last_request_ms: AtomicU64,
    /// The `last_seen_ms` last written to the daemon's record: polls write it at most
    /// once per [`LAST_SEEN_STEP_MS`], so a busy daemon's polls stay off the store.
    last_seen_stored_ms: AtomicU64,
    /// Reads waiting for a poll, oldest first, and reads handed to a poll and not yet
    /// answered (with the connection they went to). Guards only the queues.
    reads: Mutex<Reads>,
}

#[derive(Default)]
struct Reads {
    waiting: std::collections::VecDeque<Read>,
    handed: Vec<(Read, Option<String>)>,
}

/// A read waiting for its daemon: handed out by the next poll, answered in memory.
#[derive(Clone)]
pub struct Read {
    pub id: String,
    pub method: String,
    pub params_json: String,
    /// Nobody waits for it after this.
    pub until: tokio::time::Instant,
}

/// What the daemon answered to a read.
pub struct ReadOutcome {
    pub result_json: Option<String>,
    pub error_json: Option<String>,
}

impl DaemonSignals {
    fn new(record: &DaemonRecord) -> DaemonSignals {
        DaemonSignals {
            queue: watch::Sender::new(0),
            changes: watch::Sender::new(record.last_change_seq),
            connection: watch::Sender::new(record.connection_id.clone()),
            durable_update_seq: AtomicU64::new(record.last_update_seq),
            connect_lock: tokio::sync::Mutex::new(()),
            polls_waiting: AtomicUsize::new(0),
            stored: AtomicU64::new(0),
            last_request_ms: AtomicU64::new(0),
            last_seen_stored_ms: AtomicU64::new(record.last_seen_ms.unwrap_or(0)),
            reads: Mutex::default(),
        }
    }

    fn lock_reads(&self) -> std::sync::MutexGuard<'_, Reads> {
        self.reads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a read and wakes a waiting poll; refuses past `limit` reads waiting.
    pub fn push_read(&self, read: Read, limit: usize) -> Result<(), ()> {
        {
            let mut reads = self.lock_reads();
            let now = tokio::time::Instant::now();
            reads.waiting.retain(|read| read.until > now);
            reads.handed.retain(|(read, _)| read.until > now);
            if reads.waiting.len() >= limit {
                return Err(());
            }
            reads.waiting.push_back(read);
        }
        self.bump_queue();
        Ok(())
    }

    /// Up to `max` reads whose client still waits (`waiting(id)`), oldest first, handed
    /// to `connection`.
    pub fn take_reads(
        &self,
        max: usize,
        connection: Option<&str>,
        waiting: impl Fn(&str) -> bool,
    ) -> Vec<Read> {
        let now = tokio::time::Instant::now();
        let mut reads = self.lock_reads();
        reads
            .waiting
            .retain(|read| read.until > now && waiting(&read.id));
        let take = reads.waiting.len().min(max);
        let taken: Vec<Read> = reads.waiting.drain(..take).collect();
        for read in &taken {
            reads
                .handed
                .push((read.clone(), connection.map(str::to_owned)));
        }
        taken
    }

    /// Forgets a read whose client no longer waits (answered, past its deadline, or gone),
    /// so that its request body is freed now, not at the daemon's next poll.
    pub fn forget_read(&self, id: &str) {
        let mut reads = self.lock_reads();
        reads.waiting.retain(|read| read.id != id);
        reads.handed.retain(|(read, _)| read.id != id);
    }

    /// Reads held (waiting or handed out) and the bytes of their parameters.
    fn reads_held(&self) -> (usize, usize) {
        let reads = self.lock_reads();
        let held = reads
            .waiting
            .iter()
            .chain(reads.handed.iter().map(|(read, _)| read));
        held.fold((0, 0), |(count, bytes), read| {
            (count + 1, bytes + read.params_json.len())
        })
    }

    /// Puts reads a poll took back in front (the poll failed before answering).
    pub fn return_reads(&self, taken: Vec<Read>) {
        let mut reads = self.lock_reads();
        let ids: HashSet<&str> = taken.iter().map(|read| read.id.as_str()).collect();
        reads
            .handed
            .retain(|(read, _)| !ids.contains(read.id.as_str()));
        for read in taken.into_iter().rev() {
            reads.waiting.push_front(read);
        }
        drop(reads);
        self.bump_queue();
    }

    /// A handed-out read was answered.
    pub fn read_answered(&self, id: &str) {
        self.lock_reads().handed.retain(|(read, _)| read.id != id);
    }

    /// A new connection: reads handed to an older one (whose poll answer may never have
    /// arrived) are handed out again; the agent skips ids it is already running.
    pub fn requeue_reads(&self, connection: &str) {
        let mut reads = self.lock_reads();
        let now = tokio::time::Instant::now();
        let (stale, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut reads.handed)
            .into_iter()
            .partition(|(_, to)| to.as_deref() != Some(connection));
        reads.handed = kept;
        for (read, _) in stale.into_iter().rev() {
            if read.until > now {
                reads.waiting.push_front(read);
            }
        }
    }

    /// Stored commands are ready (committed before this call): wakes polls and streams.
    pub fn bump_stored(&self) {
        self.stored.fetch_add(1, Ordering::SeqCst);
        self.bump_queue();
    }

    /// Taken before a lease: if it has moved since, commands may wait that the lease did
    /// not see.
    pub fn stored_generation(&self) -> u64 {
        self.stored.load(Ordering::SeqCst)
    }

    /// Wakes polls waiting for commands.
    pub fn bump_queue(&self) {
        self.queue.send_modify(|generation| *generation += 1);
    }

    /// Publishes that change-log entries up to `seq` are durable.
    pub fn publish_changes(&self, seq: u64) {
        self.changes.send_if_modified(|current| {
            let newer = seq > *current;
            if newer {
                *current = seq;
            }
            newer
        });
    }

    /// Publishes that daemon-side updates up to `seq` are durable.
    pub fn publish_update_seq(&self, seq: u64) {
        self.durable_update_seq.fetch_max(seq, Ordering::Relaxed);
    }

    pub fn durable_update_seq(&self) -> u64 {
        self.durable_update_seq.load(Ordering::Relaxed)
    }

    pub fn seen(&self) {
        self.last_request_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// The last sync request this process saw (ms), if any.
    pub fn last_seen_ms(&self) -> Option<u64> {
        Some(self.last_request_ms.load(Ordering::Relaxed)).filter(|&ms| ms != 0)
    }

    /// Whether `now_ms` should be written to the daemon's record: true at most once per
    /// [`LAST_SEEN_STEP_MS`] (and to one caller of any that race).
    pub fn last_seen_due(&self, now_ms: u64) -> bool {
        let stored = self.last_seen_stored_ms.load(Ordering::Relaxed);
        now_ms.saturating_sub(stored) >= LAST_SEEN_STEP_MS
            && self
                .last_seen_stored_ms
                .compare_exchange(stored, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Counts a waiting poll for as long as the guard lives.
    pub fn waiting_poll(self: &Arc<Self>) -> PollGuard {
        self.polls_waiting.fetch_add(1, Ordering::Relaxed);
        PollGuard(self.clone())
    }

    /// Whether a poll waits or a stream is open now.
    pub fn attached(&self) -> bool {
        self.polls_waiting.load(Ordering::Relaxed) > 0
    }

    /// Online: a poll is waiting, or the daemon was heard from within `grace`.
    pub fn online(&self, grace: Duration) -> bool {
        if self.polls_waiting.load(Ordering::Relaxed) > 0 {
            return true;
        }
        let last = self.last_request_ms.load(Ordering::Relaxed);
        last != 0 && now_ms().saturating_sub(last) <= grace.as_millis() as u64
    }
}

pub struct PollGuard(Arc<DaemonSignals>);

impl Drop for PollGuard {
    fn drop(&mut self) {
        self.0.polls_waiting.fetch_sub(1, Ordering::Relaxed);
        self.0.seen();
    }
}

#[derive(Default)]
pub struct Hub {
    /// Guards only the map; never held across `.await`.
    daemons: Mutex<HashMap<String, Arc<DaemonSignals>>>,
    /// Fired when a command's result is stored (key: command id).
    pub commands: Arc<Signals>,
    /// Fired when a context gets a chunk or ends (key: context id).
    pub contexts: Arc<Signals>,
    /// Bumped after a key is revoked (and committed): requests and streams of that key
    /// still open look their key up again and end.
    pub revocations: Revocations,
    /// Reads handed out or waiting, by command id: (daemon id, where the answer goes).
    pending_reads: Mutex<HashMap<String, (String, tokio::sync::oneshot::Sender<ReadOutcome>)>>,
}

/// A read's claim on its answer; dropping it (answered, timed out, or the client gone)
/// forgets the read, so a late result is `unknown`.
pub struct PendingRead<'a> {
    hub: &'a Hub,
    id: String,
    pub answer: tokio::sync::oneshot::Receiver<ReadOutcome>,
}

impl PendingRead<'_> {
    /// The read's command id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for PendingRead<'_> {
    fn drop(&mut self) {
        self.hub.lock_pending().remove(&self.id);
    }
}

/// A generation counter of key revocations.
pub struct Revocations(watch::Sender<u64>);

impl Default for Revocations {
    fn default() -> Self {
        Revocations(watch::Sender::new(0))
    }
}

impl Revocations {
    pub fn revoked(&self) {
        self.0.send_modify(|generation| *generation += 1);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }

    pub fn generation(&self) -> u64 {
        *self.0.borrow()
    }
}

impl Hub {
    /// The daemon's signals, created from its stored record on first use; `None` for a
    /// daemon the store does not know.
    pub async fn daemon(
        &self,
        store: &Store,
        daemon_id: &str,
    ) -> Result<Option<Arc<DaemonSignals>>, StoreError> {
        if let Some(signals) = self.lock_daemons().get(daemon_id) {
            return Ok(Some(signals.clone()));
        }
        let Some(record) = store.daemon(daemon_id).await? else {
            return Ok(None);
        };
        let mut daemons = self.lock_daemons();
        let signals = daemons
            .entry(daemon_id.to_owned())
            .or_insert_with(|| Arc::new(DaemonSignals::new(&record)));
        Ok(Some(signals.clone()))
    }

    /// The daemon's signals if this process has them (someone here used the daemon).
    pub fn existing(&self, daemon_id: &str) -> Option<Arc<DaemonSignals>> {
        self.lock_daemons().get(daemon_id).cloned()
    }

    /// Daemons that something here waits on (a poll, a stream, a change-log reader).
    pub fn watched_daemons(&self) -> Vec<(String, Arc<DaemonSignals>)> {
        self.lock_daemons()
            .iter()
            .filter(|(_, signals)| {
                signals.queue.receiver_count() > 0
                    || signals.changes.receiver_count() > 0
                    || signals.connection.receiver_count() > 0
            })
            .map(|(id, signals)| (id.clone(), signals.clone()))
            .collect()
    }

    /// Whether the daemon is online, without creating signals for it.
    pub fn online(&self, daemon_id: &str, grace: Duration) -> bool {
        self.lock_daemons()
            .get(daemon_id)
            .is_some_and(|signals| signals.online(grace))
    }

    /// The highest durable change-log seq, for daemons this process has signals for.
    /// When this process last heard from the daemon (ms), if it has.
    pub fn last_seen_ms(&self, daemon_id: &str) -> Option<u64> {
        self.lock_daemons()
            .get(daemon_id)
            .and_then(|signals| signals.last_seen_ms())
    }

    pub fn committed_changes(&self, daemon_id: &str) -> Option<u64> {
        self.lock_daemons()
            .get(daemon_id)
            .map(|signals| *signals.changes.borrow())
    }

    /// Daemons online now (of those this process has seen).
    pub fn daemons_online(&self, grace: Duration) -> usize {
        self.lock_daemons()
            .values()
            .filter(|signals| signals.online(grace))
            .count()
    }

    /// Number of polls waiting across all daemons.
    pub fn polls_waiting(&self) -> usize {
        self.lock_daemons()
            .values()
            .map(|signals| signals.polls_waiting.load(Ordering::Relaxed))
            .sum()
    }

    /// Reads held in memory across all daemons, and the bytes of their parameters.
    pub fn reads_held(&self) -> (usize, usize) {
        self.lock_daemons()
            .values()
            .map(|signals| signals.reads_held())
            .fold((0, 0), |(count, bytes), (c, b)| (count + c, bytes + b))
    }

    /// Registers a read of `daemon_id` under `id`; its answer arrives on the claim.
    pub fn pending_read(&self, daemon_id: &str, id: &str) -> PendingRead<'_> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.lock_pending()
            .insert(id.to_owned(), (daemon_id.to_owned(), tx));
        PendingRead {
            hub: self,
            id: id.to_owned(),
            answer: rx,
        }
    }

    /// Hands a daemon's result to the client waiting for that read; gives it back when no
    /// such read of this daemon waits (not a read, or its client is gone).
    pub fn answer_read(
        &self,
        daemon_id: &str,
        id: &str,
        outcome: ReadOutcome,
    ) -> Result<(), ReadOutcome> {
        let mut pending = self.lock_pending();
        match pending.get(id) {
            Some((owner, _)) if owner == daemon_id => {
                let (_, tx) = pending.remove(id).expect("present");
                drop(pending);
                // The client may be leaving right now; its read is answered either way.
                let _ = tx.send(outcome);
                Ok(())
            }
            _ => Err(outcome),
        }
    }

    /// Whether a client still waits for the read `id`.
    pub fn read_waiting(&self, id: &str) -> bool {
        self.lock_pending()
            .get(id)
            .is_some_and(|(_, tx)| !tx.is_closed())
    }

    fn lock_pending(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        HashMap<String, (String, tokio::sync::oneshot::Sender<ReadOutcome>)>,
    > {
        self.pending_reads.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_daemons(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<DaemonSignals>>> {
        self.daemons.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Wake-ups by key. An entry lives while someone watches it, so memory follows the number
/// of waiting requests, not of keys ever signalled.
#[derive(Default)]
pub struct Signals {
    /// Guards only the map; never held across `.await`.
    map: Mutex<HashMap<String, watch::Sender<()>>>,
}

impl Signals {
    /// Subscribes to `key`. Subscribe, then read the store: no wake-up is missed.
    pub fn watch(self: &Arc<Self>, key: &str) -> KeyWatch {
        let rx = self
            .lock()
            .entry(key.to_owned())
            .or_insert_with(|| watch::Sender::new(()))
            .subscribe();
        KeyWatch {
            signals: self.clone(),
            key: key.to_owned(),
            rx,
        }
    }

    /// Wakes everyone watching `key`.
    pub fn notify(&self, key: &str) {
        if let Some(tx) = self.lock().get(key) {
            tx.send_replace(());
        }
    }

    /// Wakes everyone watching any key.
    pub fn notify_all(&self) {
        for tx in self.lock().values() {
            tx.send_replace(());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<()>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A subscription to one key; removes the map entry when the last watcher leaves.
pub struct KeyWatch {
    signals: Arc<Signals>,
    key: String,
    rx: watch::Receiver<()>,
}

impl KeyWatch {
    /// Resolves at the next notification.
    pub async fn changed(&mut self) {
        // The sender lives while this receiver does (the entry is only removed when
        // nobody watches), so an error cannot happen; treat it as a wake-up anyway.
        let _ = self.rx.changed().await;
    }
}

impl Drop for KeyWatch {
    fn drop(&mut self) {
        let mut map = self.signals.lock();
        // Our receiver still counts: remove the entry when it is the last one.
        if map
            .get(&self.key)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn key_watch_wakes_and_cleans_up() {
        let signals = Arc::new(Signals::default());
        let mut first = signals.watch("c");
        let second = signals.watch("c");
        drop(second);
        assert_eq!(signals.lock().len(), 1);
        signals.notify("c");
        tokio::time::timeout(Duration::from_secs(5), first.changed())
            .await
            .unwrap();
        drop(first);
        assert!(signals.lock().is_empty());
        signals.notify("nobody");
        assert!(signals.lock().is_empty());
    }
}
