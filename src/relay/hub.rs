//! The in-memory side of the relay: what wakes a waiting request. Nothing here is a source
//! of truth (the store is); it only tells waiters when to look again.
//!
//! - per daemon: a queue generation (bumped when a command is queued or leases are
//!   released), the last *committed* change-log seq (readers never see entries that could
//!   still be lost), the current connection id (a change answers old polls `superseded`),
//!   and liveness (polls waiting, last request) for `online`;
//! - per command: a signal fired once its result is committed.
//!
//! Waiters subscribe first and read the store second, so no wake-up is missed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::store::{now_ms, DaemonRecord, Store, StoreError};

pub struct DaemonSignals {
    pub queue: watch::Sender<u64>,
    /// Highest change-log seq that is on disk.
    pub changes: watch::Sender<u64>,
    pub connection: watch::Sender<Option<String>>,
    /// Highest daemon-side update seq that is on disk: what polls report.
    durable_update_seq: AtomicU64,
    /// Serialises connects of one daemon, so the connection id published here is always
    /// the one stored last. Held only across synchronous store calls.
    pub connect_lock: Mutex<()>,
    polls_waiting: AtomicUsize,
    /// Last sync request seen by this process (ms); 0: none since start.
    last_request_ms: AtomicU64,
}

impl DaemonSignals {
    fn new(record: &DaemonRecord) -> DaemonSignals {
        DaemonSignals {
            queue: watch::Sender::new(0),
            changes: watch::Sender::new(record.last_change_seq),
            connection: watch::Sender::new(record.connection_id.clone()),
            durable_update_seq: AtomicU64::new(record.last_update_seq),
            connect_lock: Mutex::new(()),
            polls_waiting: AtomicUsize::new(0),
            last_request_ms: AtomicU64::new(0),
        }
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

    /// Counts a waiting poll for as long as the guard lives.
    pub fn waiting_poll(self: &Arc<Self>) -> PollGuard {
        self.polls_waiting.fetch_add(1, Ordering::Relaxed);
        PollGuard(self.clone())
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
    pub fn daemon(
        &self,
        store: &Store,
        daemon_id: &str,
    ) -> Result<Option<Arc<DaemonSignals>>, StoreError> {
        if let Some(signals) = self.lock_daemons().get(daemon_id) {
            return Ok(Some(signals.clone()));
        }
        let Some(record) = store.daemon(daemon_id)? else {
            return Ok(None);
        };
        let mut daemons = self.lock_daemons();
        let signals = daemons
            .entry(daemon_id.to_owned())
            .or_insert_with(|| Arc::new(DaemonSignals::new(&record)));
        Ok(Some(signals.clone()))
    }

    /// Whether the daemon is online, without creating signals for it.
    pub fn online(&self, daemon_id: &str, grace: Duration) -> bool {
        self.lock_daemons()
            .get(daemon_id)
            .is_some_and(|signals| signals.online(grace))
    }

    /// The highest durable change-log seq, for daemons this process has signals for.
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
