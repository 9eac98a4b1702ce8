//! Commands: the durable queue from clients to a daemon and the results coming back.
//!
//! A command is `queued` when stored, `delivered` while leased to a daemon, and ends
//! `completed` (a result), `failed` (an error) or `expired` (not answered before its TTL).
//! The `queue` tree holds one entry per unfinished command, in arrival order per daemon;
//! finishing a command removes it there and indexes it in `finished` by time, which is
//! what retention walks.

use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::daemons::DaemonRecord;
use super::machine::{self, CompleteStep, LeaseStep};
use super::usage::{stored_size, Trim};
use super::{layout, Result, SledStore, StoreError};

/// How many of the relay's newest commands the operator's view of one daemon's finished
/// commands looks through.
pub const RECENT_WINDOW: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum CommandState {
    Queued,
    Delivered,
    Completed,
    Failed,
    Expired,
}

impl CommandState {
    /// The name clients see.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Queued => "queued",
            CommandState::Delivered => "delivered",
            CommandState::Completed => "completed",
            CommandState::Failed => "failed",
            CommandState::Expired => "expired",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            CommandState::Completed | CommandState::Failed | CommandState::Expired
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommandRecord {
    pub id: String,
    pub daemon_id: String,
    pub method: String,
    /// The params as JSON text, passed to the daemon unchanged.
    pub params_json: String,
    pub stream: bool,
    pub state: CommandState,
    pub created_at_ms: u64,
    /// Not delivered (or not answered) by then → `expired`.
    pub expires_at_ms: u64,
    /// Position in the daemon's queue.
    pub queue_seq: u64,
    /// While `delivered`: when the lease runs out and the command goes out again.
    pub lease_until_ms: u64,
    pub deliveries: u32,
    /// When it reached a final state; 0 before.
    pub finished_at_ms: u64,
    pub result_json: Option<String>,
    pub error_json: Option<String>,
    /// `(key id, Idempotency-Key)` it was created under, to drop the index entry with it.
    pub idempotency: Option<(String, String)>,
}

impl CommandRecord {
    /// Unfinished and past its TTL. A command whose lease still runs is not due yet: its
    /// result may still come.
    pub fn due_to_expire(&self, now_ms: u64) -> bool {
        let lease_running = self.state == CommandState::Delivered && self.lease_until_ms > now_ms;
        !self.state.is_final() && !lease_running && self.expires_at_ms <= now_ms
    }

    /// When a waiter should look again even without a signal: the lease's end or expiry.
    pub fn next_deadline_ms(&self) -> u64 {
        if self.state == CommandState::Delivered {
            self.lease_until_ms.max(self.expires_at_ms)
        } else {
            self.expires_at_ms
        }
    }
}

/// What a client asks to queue.
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub daemon_id: String,
    pub method: String,
    pub params_json: String,
    pub stream: bool,
    pub ttl_ms: u64,
    pub idempotency: Option<(String, String)>,
    pub queue_limit: u64,
}

#[derive(Debug)]
pub struct EnqueueOutcome {
    pub command: CommandRecord,
    /// False when an `Idempotency-Key` matched an earlier command, returned instead.
    pub created: bool,
}

#[derive(Debug, Default)]
pub struct LeaseBatch {
    pub commands: Vec<CommandRecord>,
    /// The earliest time a lease held by the daemon runs out, when one does: a waiting
    /// poll must look again then.
    pub next_lease_expiry_ms: Option<u64>,
}

#[derive(Debug)]
pub enum CompleteOutcome {
    /// The result was stored; the command is now final.
    Completed(Box<CommandRecord>),
    /// The command already had a result; this one was ignored (first one wins).
    Duplicate,
    /// No such command for this daemon, or it expired.
    Unknown,
}

/// A fresh command id: `cmd-` and 24 hex digits, the milliseconds since the epoch (48
/// bits), a counter of this process (16 bits) and 32 random bits, as UUIDv7 orders its
/// ids. Ids made later sort later, so new commands go to the end of the `commands` tree
/// instead of into random pages of it (each write to a page rewrites it in sled's cache);
/// two ids of one process differ in their time or counter, and the random bits keep them
/// unguessable to someone who knows the time.
pub fn new_command_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let count = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut bytes = [0u8; 12];
    bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    bytes[6..8].copy_from_slice(&count.to_be_bytes());
    rand::thread_rng().fill_bytes(&mut bytes[8..]);
    format!("cmd-{}", hex::encode(bytes))
}

/// A daemon's queue as counted in memory: the last position handed out, and the entries
/// of the `queue` tree (its unfinished commands, plus any entry a crash left pointing at
/// nothing, until a lease drops it). Counted from the tree at first use after open, so a
/// crash cannot leave them wrong. They used to live in the daemon's record, which made
/// every enqueue and every finish rewrite that record too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct QueueCounters {
    pub last_seq: u64,
    pub queued: u64,
}

/// Takes the next queue position of the daemon for a new command, or refuses with
/// `QueueFull`. The caller holds the daemon's lock, writes the command, then stores the
/// counters back ([`SledStore::set_queue_counters`]).
pub(super) fn prepare_command(
    counters: &mut QueueCounters,
    new: NewCommand,
    now_ms: u64,
) -> Result<CommandRecord> {
    let command = machine::new_command(new, counters.queued, counters.last_seq + 1, now_ms)?;
    counters.last_seq += 1;
    counters.queued += 1;
    Ok(command)
}

impl SledStore {
    /// The daemon's queue counters, counted from the `queue` tree on first use. `record_seq`
    /// is the last position its record holds (written by earlier versions; never lower
    /// than a position still in use then). The caller holds the daemon's lock.
    pub(super) fn queue_counters(&self, daemon_id: &str, record_seq: u64) -> Result<QueueCounters> {
        if let Some(counters) = self.queues_map().get(daemon_id) {
            return Ok(*counters);
        }
        let mut counters = self.count_queue(daemon_id)?;
        counters.last_seq = counters.last_seq.max(record_seq);
        self.queues_map().insert(daemon_id.to_owned(), counters);
        Ok(counters)
    }

    /// The counters of the daemon's queue as the tree holds it now (nothing cached).
    pub(super) fn count_queue(&self, daemon_id: &str) -> Result<QueueCounters> {
        let mut counters = QueueCounters::default();
        for item in self.queue.scan_prefix(layout::daemon_prefix(daemon_id)) {
            let (key, _) = item?;
            counters.queued += 1;
            counters.last_seq = counters.last_seq.max(layout::seq_of(&key));
        }
        Ok(counters)
    }

    /// Stores the counters after the write they count. The caller holds the daemon's lock.
    pub(super) fn set_queue_counters(&self, daemon_id: &str, counters: QueueCounters) {
        self.queues_map().insert(daemon_id.to_owned(), counters);
    }

    /// The cached counters, when the daemon's have been counted since open.
    pub(super) fn cached_queue_counters(&self, daemon_id: &str) -> Option<QueueCounters> {
        self.queues_map().get(daemon_id).copied()
    }

    fn queues_map(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, QueueCounters>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes one entry of the daemon's queue, and counts it when it was there. The caller
    /// holds the daemon's lock.
    pub(super) fn unqueue(&self, daemon_id: &str, queue_key: &[u8]) -> Result<()> {
        if self.queue.remove(queue_key)?.is_some() {
            if let Some(counters) = self.queues_map().get_mut(daemon_id) {
                counters.queued = counters.queued.saturating_sub(1);
            }
        }
        Ok(())
    }

    /// Stores a new command at the end of its daemon's queue, or returns the command an
    /// `Idempotency-Key` already names. Call [`SledStore::commit`] before acknowledging.
    ///
    /// No sled transaction: the records go in as single writes, each atomic, in an order
    /// whose every prefix (what a crash before the commit can leave; sled recovers its log
    /// up to the first missing write) the store reads correctly:
    /// 1. the `Idempotency-Key`'s entry: alone, it names a command that does not exist,
    ///    and a retry queues a new one in its place;
    /// 2. the queue entry: without its command, a lease drops it;
    /// 3. the command.
    ///
    /// A retry that finds its command unfinished but not queued (a state sled's recovery
    /// should never leave) queues it again rather than leave it to wait forever.
    pub fn enqueue(&self, new: NewCommand, now_ms: u64) -> Result<EnqueueOutcome> {
        let _guard = self.lock_daemon(&new.daemon_id);
        let daemon: DaemonRecord = self
            .get_decoded(&self.daemons, new.daemon_id.as_bytes())?
            .ok_or_else(|| StoreError::UnknownDaemon(new.daemon_id.clone()))?;
        let mut counters = self.queue_counters(&new.daemon_id, daemon.next_queue_seq)?;
        let idempotency_key = new
            .idempotency
            .as_ref()
            .map(|(key_id, key)| layout::daemon_text_key(&new.daemon_id, &[key_id, key]));
        if let Some(index_key) = &idempotency_key {
            if let Some(command_id) = self.idempotency.get(index_key)? {
                if let Some(command) =
                    self.get_decoded::<CommandRecord>(&self.commands, &command_id)?
                {
                    let queue_key = layout::daemon_seq_key(&command.daemon_id, command.queue_seq);
                    if !command.state.is_final() && !self.queue.contains_key(&queue_key)? {
                        self.committer
                            .tracked(|| self.queue.insert(queue_key.as_slice(), command_id))?;
                        counters.queued += 1;
                        self.set_queue_counters(&command.daemon_id, counters);
                    }
                    return Ok(EnqueueOutcome {
                        command,
                        created: false,
                    });
                }
            }
        }
        let command = prepare_command(&mut counters, new, now_ms)?;
        let command_bytes = self.encoded(&command)?;
        let queue_key = layout::daemon_seq_key(&command.daemon_id, command.queue_seq);
        let index_bytes = idempotency_key
            .as_ref()
            .map_or(0, |key| key.len() + command.id.len());
        self.reserve_budget(
            &command.daemon_id,
            stored_size(command.id.as_bytes(), &command_bytes)
                + (queue_key.len() + command.id.len() + index_bytes) as u64,
            Trim::Write,
            now_ms,
        )?;
        // Tracked: a poll may lease the command before this request's commit resolves.
        self.committer.tracked(|| -> Result<()> {
            if let Some(index_key) = &idempotency_key {
                self.idempotency
                    .insert(index_key.as_slice(), command.id.as_bytes())?;
            }
            self.queue
                .insert(queue_key.as_slice(), command.id.as_bytes())?;
            self.set_queue_counters(&command.daemon_id, counters);
            self.commands
                .insert(command.id.as_bytes(), command_bytes.as_slice())?;
            Ok(())
        })?;
        Ok(EnqueueOutcome {
            command,
            created: true,
        })
    }

    /// Leases up to `max` commands of the daemon that are queued or whose lease ran out, in
    /// queue order, for `lease_ms`. Commands past their TTL are expired on the way.
    ///
    /// `connection_id` is the connection the poll belongs to: when a newer connect replaced
    /// it, the answer is `Superseded` and nothing is leased. Checked under the daemon's
    /// lock, which `connect_daemon` also takes, so an old poll can never take the commands
    /// a reconnect has just released.
    pub fn lease(
        &self,
        daemon_id: &str,
        connection_id: Option<&str>,
        max: usize,
        lease_ms: u64,
        now_ms: u64,
    ) -> Result<LeaseBatch> {
        let _guard = self.lock_daemon(daemon_id);
        let daemon: Option<DaemonRecord> = self.get_decoded(&self.daemons, daemon_id.as_bytes())?;
        if daemon.and_then(|d| d.connection_id).as_deref() != connection_id {
            return Err(StoreError::Superseded);
        }
        let mut batch = LeaseBatch::default();
        for item in self.queue.scan_prefix(layout::daemon_prefix(daemon_id)) {
            if batch.commands.len() >= max {
                break;
            }
            let (queue_key, command_id) = item?;
            let Some(mut command) =
                self.get_decoded::<CommandRecord>(&self.commands, &command_id)?
            else {
                // A queue entry outlived its command (purged by retention, or a crash
                // came between the two writes of `enqueue`): drop it.
                self.unqueue(daemon_id, &queue_key)?;
                continue;
            };
            match machine::lease_step(&command, now_ms) {
                LeaseStep::Unqueue => {
                    self.unqueue(daemon_id, &queue_key)?;
                }
                LeaseStep::Running(until) => {
                    batch.next_lease_expiry_ms =
                        Some(batch.next_lease_expiry_ms.map_or(until, |t| t.min(until)));
                }
                LeaseStep::Expire => {
                    self.finish_locked(&mut command, CommandState::Expired, None, None, now_ms)?;
                }
                LeaseStep::Lease => {
                    machine::lease(&mut command, lease_ms, now_ms);
                    let bytes = self.encoded(&command)?;
                    // Tracked: the daemon is told only once it is durable, and so is a
                    // reader.
                    self.committer
                        .tracked(|| self.commands.insert(&command_id, bytes))?;
                    batch.commands.push(command);
                }
            }
        }
        Ok(batch)
    }

    /// Stores the result (or error) of a command. First result wins.
    pub fn complete(
        &self,
        daemon_id: &str,
        command_id: &str,
        result_json: Option<String>,
        error_json: Option<String>,
        now_ms: u64,
    ) -> Result<CompleteOutcome> {
        let _guard = self.lock_daemon(daemon_id);
        let command = self.get_decoded::<CommandRecord>(&self.commands, command_id.as_bytes())?;
        match machine::complete_step(command.as_ref(), daemon_id, error_json.is_some()) {
            CompleteStep::Unknown => Ok(CompleteOutcome::Unknown),
            CompleteStep::Duplicate => Ok(CompleteOutcome::Duplicate),
            CompleteStep::Finish(state) => {
                let mut command = command.expect("a command to finish");
                let bytes = result_json.as_ref().map_or(0, String::len)
                    + error_json.as_ref().map_or(0, String::len);
                self.charge_budget(daemon_id, bytes as u64);
                self.finish_locked(&mut command, state, result_json, error_json, now_ms)?;
                Ok(CompleteOutcome::Completed(Box::new(command)))
            }
        }
    }

    pub fn command(&self, command_id: &str) -> Result<Option<CommandRecord>> {
        self.get_decoded(&self.commands, command_id.as_bytes())
    }

    /// The operator's view of one daemon's commands, newest first: its unfinished ones
    /// (the queue), then its finished ones among the relay's [`RECENT_WINDOW`] newest
    /// commands (ids are time-ordered, so the newest are the end of the tree), up to
    /// `limit` in all. A bounded read whatever the number of daemons: a daemon quiet while
    /// others are busy shows only its queue.
    pub fn recent_commands(&self, daemon_id: &str, limit: usize) -> Result<Vec<CommandRecord>> {
        let mut listed: Vec<CommandRecord> = Vec::new();
        for item in self
            .queue
            .scan_prefix(layout::daemon_prefix(daemon_id))
            .rev()
        {
            let (_, id) = item?;
            if listed.len() >= limit {
                break;
            }
            if let Some(command) = self.get_decoded::<CommandRecord>(&self.commands, &id)? {
                listed.push(command);
            }
        }
        for item in self.commands.iter().rev().take(RECENT_WINDOW) {
            if listed.len() >= limit {
                break;
            }
            let (_, value) = item?;
            let command: CommandRecord = self.decode(&value)?;
            if command.daemon_id == daemon_id && command.state.is_final() {
                listed.push(command);
            }
        }
        Ok(listed)
    }

    /// The command as of `now_ms`: one whose TTL has passed is expired first, so readers
    /// see `expired` the moment it is due, not only after the next poll or sweep.
    pub fn command_at(&self, command_id: &str, now_ms: u64) -> Result<Option<CommandRecord>> {
        match self.command(command_id)? {
            Some(command) if command.due_to_expire(now_ms) => {}
            other => return Ok(other),
        }
        let daemon_id = match self.command(command_id)? {
            Some(command) => command.daemon_id,
            None => return Ok(None),
        };
        let _guard = self.lock_daemon(&daemon_id);
        // Read again under the lock: a result may have landed in between.
        let Some(mut command) = self.command(command_id)? else {
            return Ok(None);
        };
        if command.due_to_expire(now_ms) {
            self.finish_locked(&mut command, CommandState::Expired, None, None, now_ms)?;
        }
        Ok(Some(command))
    }

    /// Moves a command to a final state: its `finished` index entry, its record, then its
    /// queue entry goes, as single writes in that order (see [`SledStore::enqueue`]). A
    /// crash between them leaves an index entry of an unfinished command, which retention
    /// drops and keeps the command, or a finished command still queued, which the next
    /// lease unqueues. The caller holds the daemon's lock.
    pub(super) fn finish_locked(
        &self,
        command: &mut CommandRecord,
        state: CommandState,
        result_json: Option<String>,
        error_json: Option<String>,
        now_ms: u64,
    ) -> Result<()> {
        machine::finish(command, state, result_json, error_json, now_ms);
        let command_bytes = self.encoded(&*command)?;
        let queue_key = layout::daemon_seq_key(&command.daemon_id, command.queue_seq);
        let finished_key = layout::finished_key(now_ms, &command.id);
        let command = &*command;
        // Tracked: a reader may show the final state before the caller's commit resolves.
        self.committer.tracked(|| -> Result<()> {
            self.finished.insert(finished_key.as_slice(), &[])?;
            self.commands
                .insert(command.id.as_bytes(), command_bytes.as_slice())?;
            self.unqueue(&command.daemon_id, &queue_key)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::temp_store;

    fn new_command(daemon: &str, idempotency: Option<&str>) -> NewCommand {
        NewCommand {
            daemon_id: daemon.into(),
            method: "http".into(),
            params_json: "{}".into(),
            stream: false,
            ttl_ms: 1_000,
            idempotency: idempotency.map(|key| ("k1".to_owned(), key.to_owned())),
            queue_limit: 3,
        }
    }

    #[test]
    fn lease_redelivers_after_expiry_and_first_result_wins() {
        let (_dir, store) = temp_store();
        store.ensure_daemon("d", 0).unwrap();
        let a = store.enqueue(new_command("d", None), 0).unwrap().command;
        let b = store.enqueue(new_command("d", None), 0).unwrap().command;
        let batch = store.lease("d", None, 10, 100, 10).unwrap();
        assert_eq!(
            batch.commands.iter().map(|c| &c.id).collect::<Vec<_>>(),
            [&a.id, &b.id]
        );
        // Leased: nothing more now, a wake-up due when the first lease runs out.
        let batch = store.lease("d", None, 10, 100, 50).unwrap();
        assert!(batch.commands.is_empty());
        assert_eq!(batch.next_lease_expiry_ms, Some(110));
        assert!(matches!(
            store
                .complete("d", &a.id, Some("1".into()), None, 60)
                .unwrap(),
            CompleteOutcome::Completed(_)
        ));
        assert!(matches!(
            store
                .complete("d", &a.id, Some("2".into()), None, 61)
                .unwrap(),
            CompleteOutcome::Duplicate
        ));
        assert!(matches!(
            store.complete("other", &b.id, None, None, 61).unwrap(),
            CompleteOutcome::Unknown
        ));
        let batch = store.lease("d", None, 10, 100, 111).unwrap();
        assert_eq!(batch.commands.len(), 1);
        assert_eq!(batch.commands[0].id, b.id);
        assert_eq!(batch.commands[0].deliveries, 2);
        assert_eq!(
            store
                .command(&a.id)
                .unwrap()
                .unwrap()
                .result_json
                .as_deref(),
            Some("1")
        );
        assert_eq!(store.daemon("d").unwrap().unwrap().queued, 1);
    }

    #[tokio::test]
    async fn a_queued_command_is_reported_unflushed_until_a_commit_covers_it() {
        let (_dir, store) = temp_store();
        store.ensure_daemon("d", 0).unwrap();
        store.commit().await.unwrap();
        assert!(store.visible_durable(), "nothing queued yet");
        store.enqueue(new_command("d", None), 0).unwrap();
        assert!(
            !store.visible_durable(),
            "a poll must not hand this out unflushed"
        );
        store.commit().await.unwrap();
        assert!(store.visible_durable());
        // A refused enqueue (the idempotency key is known) queues nothing new.
        store.enqueue(new_command("d", Some("k")), 0).unwrap();
        store.commit().await.unwrap();
        store.enqueue(new_command("d", Some("k")), 0).unwrap();
        assert!(store.visible_durable());
    }

    #[test]
    fn ttl_queue_limit_and_idempotency() {
        let (_dir, store) = temp_store();
        store.ensure_daemon("d", 0).unwrap();
        let first = store.enqueue(new_command("d", Some("x")), 0).unwrap();
        let again = store.enqueue(new_command("d", Some("x")), 5).unwrap();
        assert!(first.created && !again.created);
        assert_eq!(first.command.id, again.command.id);
        store.enqueue(new_command("d", None), 0).unwrap();
        store.enqueue(new_command("d", None), 0).unwrap();
        assert!(matches!(
            store.enqueue(new_command("d", None), 0),
            Err(StoreError::QueueFull { limit: 3, .. })
        ));
        // Past the TTL nothing is handed out and the queue empties.
        let batch = store.lease("d", None, 10, 100, 2_000).unwrap();
        assert!(batch.commands.is_empty());
        assert_eq!(
            store.command(&first.command.id).unwrap().unwrap().state,
            CommandState::Expired
        );
        assert_eq!(store.daemon("d").unwrap().unwrap().queued, 0);
        assert!(matches!(
            store
                .complete("d", &first.command.id, None, None, 2_001)
                .unwrap(),
            CompleteOutcome::Unknown
        ));
        assert!(matches!(
            store.enqueue(new_command("nobody", None), 0),
            Err(StoreError::UnknownDaemon(_))
        ));
    }

    #[test]
    fn reconnect_releases_leases() {
        let (_dir, store) = temp_store();
        store.ensure_daemon("d", 0).unwrap();
        store.enqueue(new_command("d", None), 0).unwrap();
        assert_eq!(
            store.lease("d", None, 10, 100, 1).unwrap().commands.len(),
            1
        );
        store.connect_daemon("d", None, vec![], "c2", 2).unwrap();
        assert!(matches!(
            store.lease("d", None, 10, 100, 3),
            Err(StoreError::Superseded)
        ));
        assert_eq!(
            store
                .lease("d", Some("c2"), 10, 100, 3)
                .unwrap()
                .commands
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn queue_counters_are_counted_again_after_reopen() {
        let (dir, store) = temp_store();
        store.ensure_daemon("d", 0).unwrap();
        let a = store.enqueue(new_command("d", None), 0).unwrap().command;
        let b = store.enqueue(new_command("d", None), 0).unwrap().command;
        store.complete("d", &a.id, None, None, 1).unwrap();
        store.commit().await.unwrap();
        store.close().unwrap();
        drop(store);
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.daemon("d").unwrap().unwrap().queued, 1);
        // The next position follows the last one in use, never reuses it.
        let c = store.enqueue(new_command("d", None), 2).unwrap().command;
        assert!(c.queue_seq > b.queue_seq);
        assert_eq!(store.daemon("d").unwrap().unwrap().queued, 2);
        let leased = store.lease("d", None, 10, 100, 3).unwrap().commands;
        assert_eq!(
            leased.iter().map(|c| &c.id).collect::<Vec<_>>(),
            [&b.id, &c.id]
        );
    }

    /// What a crash inside `enqueue` or `finish_locked` can leave (a prefix of their
    /// writes) is read as described there.
    #[test]
    fn what_a_crash_leaves_of_queueing_and_finishing_is_read_correctly() {
        let (_dir, store) = temp_store();
        store.ensure_daemon("d", 0).unwrap();
        // The idempotency entry alone: a retry queues a new command in its place.
        let index_key = layout::daemon_text_key("d", &["k1", "lost"]);
        store
            .idempotency
            .insert(&index_key, b"cmd-gone".as_slice())
            .unwrap();
        let retry = store.enqueue(new_command("d", Some("lost")), 0).unwrap();
        assert!(retry.created);
        assert_eq!(
            store.idempotency.get(&index_key).unwrap().unwrap().as_ref(),
            retry.command.id.as_bytes()
        );
        // A queue entry without its command: counted until a lease drops it.
        store
            .queue
            .insert(layout::daemon_seq_key("d", 1_000), b"cmd-gone".as_slice())
            .unwrap();
        let mut counters = store.count_queue("d").unwrap();
        assert_eq!(counters.queued, 2);
        store.set_queue_counters("d", counters);
        let leased = store.lease("d", None, 10, 100, 1).unwrap().commands;
        assert_eq!(leased.len(), 1);
        assert_eq!(store.daemon("d").unwrap().unwrap().queued, 1);
        // An unfinished command whose queue entry is missing: a retry with its key
        // queues it again.
        let kept = retry.command;
        store
            .queue
            .remove(layout::daemon_seq_key("d", kept.queue_seq))
            .unwrap();
        counters = store.count_queue("d").unwrap();
        store.set_queue_counters("d", counters);
        let again = store.enqueue(new_command("d", Some("lost")), 2).unwrap();
        assert!(!again.created);
        assert_eq!(again.command.id, kept.id);
        assert!(store
            .queue
            .contains_key(layout::daemon_seq_key("d", kept.queue_seq))
            .unwrap());
        assert_eq!(store.daemon("d").unwrap().unwrap().queued, 1);
        // A `finished` entry of a command that is not finished: retention drops the
        // entry and keeps the command.
        let live = store.enqueue(new_command("d", None), 3).unwrap().command;
        store
            .finished
            .insert(layout::finished_key(4, &live.id), &[])
            .unwrap();
        let policy = crate::store::RetentionPolicy {
            changes_max_entries: u64::MAX,
            changes_max_age_ms: u64::MAX,
            results_max_age_ms: 0,
            responses_max_age_ms: u64::MAX,
        };
        store.sweep(&policy, 10).unwrap();
        assert_eq!(
            store.command(&live.id).unwrap().unwrap().state,
            CommandState::Queued
        );
        assert!(store.finished.is_empty());
    }
}
