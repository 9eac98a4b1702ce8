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
    /// Guards only the map; never held across `.await`.
    commands: Mutex<HashMap<String, watch::Sender<()>>>,
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

    /// Number of polls waiting across all daemons.
    pub fn polls_waiting(&self) -> usize {
        self.lock_daemons()
            .values()
            .map(|signals| signals.polls_waiting.load(Ordering::Relaxed))
            .sum()
    }

    /// Subscribes to the completion of a command. Subscribe, then read the store.
    pub fn watch_command(self: &Arc<Self>, command_id: &str) -> CommandWatch {
        let rx = self
            .lock_commands()
            .entry(command_id.to_owned())
            .or_insert_with(|| watch::Sender::new(()))
            .subscribe();
        CommandWatch {
            hub: self.clone(),
            command_id: command_id.to_owned(),
            rx: Some(rx),
        }
    }

    /// Wakes everyone watching the command; call after its result is committed.
    pub fn command_finished(&self, command_id: &str) {
        if let Some(tx) = self.lock_commands().remove(command_id) {
            tx.send_replace(());
        }
    }

    fn lock_daemons(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<DaemonSignals>>> {
        self.daemons.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_commands(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<()>>> {
        self.commands.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A subscription to one command's completion; removes the map entry when the last
/// watcher leaves.
pub struct CommandWatch {
    hub: Arc<Hub>,
    command_id: String,
    rx: Option<watch::Receiver<()>>,
}

impl CommandWatch {
    /// Resolves when the command was signalled finished (or the signal is gone).
    pub async fn changed(&mut self) {
        if let Some(rx) = self.rx.as_mut() {
            if rx.changed().await.is_err() {
                // Sender removed and dropped: the command finished. Stay resolved.
                self.rx = None;
            }
        }
    }
}

impl Drop for CommandWatch {
    fn drop(&mut self) {
        drop(self.rx.take());
        let mut commands = self.hub.lock_commands();
        if commands
            .get(&self.command_id)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            commands.remove(&self.command_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn command_watch_wakes_and_cleans_up() {
        let hub = Arc::new(Hub::default());
        let mut first = hub.watch_command("c");
        let second = hub.watch_command("c");
        drop(second);
        assert_eq!(hub.lock_commands().len(), 1);
        hub.command_finished("c");
        tokio::time::timeout(Duration::from_secs(5), first.changed())
            .await
            .unwrap();
        // Resolved stays resolved.
        tokio::time::timeout(Duration::from_secs(5), first.changed())
            .await
            .unwrap();
        drop(first);
        assert!(hub.lock_commands().is_empty());
    }
}
