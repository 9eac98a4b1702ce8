//! The census: one pass over every tree, run by the retention sweep, that measures what the
//! store holds (entries and bytes per tree, spilled pieces counted with the tree whose
//! record they belong to; commands by state; bytes per daemon), collects the owners of
//! spilled values that are still referenced (for the pieces GC), and enforces the
//! per-daemon disk budget.
//!
//! Budget (`daemon_max_bytes`): each daemon's bytes are known between censuses as the last
//! census counted them plus what was written since ([`Budget`]), so a write is checked
//! when it is stored, not at the next sweep. A write that would take its daemon past the
//! budget first makes room by dropping that daemon's oldest reclaimable data: finished
//! contexts, cached GET responses, then change-log entries. If that is not enough (the
//! rest is unfinished commands, a running fetch or results younger than ten minutes), a
//! new command or update is refused with 429 `queue_full`, a chunk ends its fetch, and a
//! GET response is not cached. Results are never refused: they finish acknowledged work.
//! The census then trims what is left over budget, finished commands (finished more than
//! ten minutes ago) included, and corrects the counts. Commands that are not finished are
//! never dropped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::contexts::ContextRecord;
use super::responses::CachedResponse;
use super::spill::spilled;
use super::{layout, CommandRecord, CommandState, Result, SledStore};

/// What one tree holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeUsage {
    pub entries: u64,
    /// Keys and values, large values at their full length.
    pub bytes: u64,
}

/// The census's findings.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub trees: BTreeMap<String, TreeUsage>,
    /// Commands per state name (`queued`, `delivered`, …), every state listed.
    pub commands: BTreeMap<&'static str, u64>,
    /// Bytes per daemon: its change log, commands, queue and idempotency entries, cached
    /// responses and contexts.
    pub daemon_bytes: HashMap<String, u64>,
    /// Daemons still over the budget after trimming.
    pub over_budget: HashSet<String>,
    /// Bytes freed by trimming daemons over their budget.
    pub trimmed_bytes: u64,
    /// Owners of spilled values deleted by the pieces GC.
    pub pieces_collected: u64,
}

/// Each daemon's bytes between censuses, for checking writes against the budget.
#[derive(Debug, Default)]
pub(super) struct Budget {
    /// `daemon_max_bytes`; 0: no budget.
    max: AtomicU64,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    /// Bytes per daemon: the last census's count plus what was written since (less what
    /// was reclaimed). `None` until the first census.
    used: Option<HashMap<String, u64>>,
    /// Bytes written since the census in progress began, added to its count at its end.
    since_census: HashMap<String, u64>,
}

impl Budget {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn charge(&self, daemon_id: &str, bytes: u64) {
        // Without allocating a key on the write path once the daemon is known.
        fn add(map: &mut HashMap<String, u64>, daemon_id: &str, bytes: u64) {
            match map.get_mut(daemon_id) {
                Some(total) => *total += bytes,
                None => {
                    map.insert(daemon_id.to_owned(), bytes);
                }
            }
        }
        let mut counts = self.counts();
        add(&mut counts.since_census, daemon_id, bytes);
        if let Some(used) = counts.used.as_mut() {
            add(used, daemon_id, bytes);
        }
    }

    /// Bytes the daemon may still take, if there is a budget and a census has counted.
    fn room(&self, daemon_id: &str) -> Option<u64> {
        let max = self.max.load(Ordering::Relaxed);
        let counts = self.counts();
        let used = counts.used.as_ref()?.get(daemon_id).copied().unwrap_or(0);
        (max > 0).then(|| max.saturating_sub(used))
    }

    /// Gives back bytes the daemon no longer holds.
    pub(super) fn release(&self, daemon_id: &str, bytes: u64) {
        if let Some(used) = self
            .counts()
            .used
            .as_mut()
            .and_then(|u| u.get_mut(daemon_id))
        {
            *used = used.saturating_sub(bytes);
        }
    }
}

/// The same counts for a backend that keeps its data elsewhere (PostgreSQL).
impl Budget {
    pub(super) fn set_max(&self, daemon_max_bytes: u64) {
        self.max.store(daemon_max_bytes, Ordering::Relaxed);
    }

    pub(super) fn max_bytes(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }

    /// Bytes the daemon may still take, if there is a budget and a census has counted.
    pub(super) fn room_for(&self, daemon_id: &str) -> Option<u64> {
        self.room(daemon_id)
    }

    pub(super) fn charge_bytes(&self, daemon_id: &str, bytes: u64) {
        self.charge(daemon_id, bytes);
    }

    /// A census starts: writes from here on are added to its count at its end.
    pub(super) fn begin_census(&self) {
        self.counts().since_census.clear();
    }

    /// A census counted `daemon_bytes`.
    pub(super) fn end_census(&self, mut daemon_bytes: HashMap<String, u64>) {
        let mut counts = self.counts();
        for (daemon, bytes) in counts.since_census.drain() {
            *daemon_bytes.entry(daemon).or_default() += bytes;
        }
        counts.used = Some(daemon_bytes);
    }
}

/// Who trims a daemon over its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trim {
    /// A cached copy or a context chunk making room, under the daemon's lock: it may
    /// take only other cached data (contexts, cached responses).
    Cache,
    /// A command or updates making room, under the daemon's lock: the change log too.
    Write,
    /// The census, holding no lock: also finished commands, which it scans for.
    Census,
}

/// What a trim drops, and the bytes that frees.
#[derive(Default)]
struct Victims {
    contexts: Vec<ContextRecord>,
    responses: Vec<sled::IVec>,
    changes: Vec<sled::IVec>,
    bytes: u64,
}

/// Moves `(age, size, item)` candidates, oldest first, into `into` until `bytes` reaches
/// `excess`.
fn take_oldest<T>(
    mut candidates: Vec<(u64, u64, T)>,
    excess: u64,
    bytes: &mut u64,
    into: &mut Vec<T>,
) {
    candidates.sort_by_key(|(age, _, _)| *age);
    for (_, size, item) in candidates {
        if *bytes >= excess {
            break;
        }
        into.push(item);
        *bytes += size;
    }
}

/// The bytes of a context's chunks, from its record rather than by reading every chunk:
/// each is about its data, a 16-byte key and an 8-byte length.
pub(super) fn context_body_size(record: &ContextRecord) -> u64 {
    record.bytes + 24 * record.chunks
}

/// A finished command younger than this is never dropped for a disk budget.
pub(super) const FINISHED_MIN_AGE_MS: u64 = 10 * 60 * 1000;

/// Bytes an entry stands for: its key, and its value at full length if spilled.
pub(super) fn stored_size(key: &[u8], value: &[u8]) -> u64 {
    key.len() as u64 + spilled(value).map_or(value.len() as u64, |(_, len)| len)
}

/// The daemon id of a `daemon_id ++ 0x00 ++ …` key.
fn daemon_of(key: &[u8]) -> Option<&str> {
    let end = key.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&key[..end]).ok()
}

impl SledStore {
    /// Sets the disk budget of each daemon (`daemon_max_bytes`; 0: none).
    pub fn set_daemon_budget(&self, daemon_max_bytes: u64) {
        self.budget.max.store(daemon_max_bytes, Ordering::Relaxed);
    }

    /// Measures the store, collects unreferenced pieces, and trims daemons over their
    /// budget ([`SledStore::set_daemon_budget`]). Run every `sweep_interval`.
    pub fn census(&self, sweep_interval: std::time::Duration, now_ms: u64) -> Result<Usage> {
        let daemon_max_bytes = self.budget.max.load(Ordering::Relaxed);
        // Writes from here on may or may not be in this count: counted again after it, a
        // write is at worst counted twice until the next census.
        self.budget.counts().since_census.clear();
        let watermark = self.spill.watermark()?;
        let mut usage = Usage::default();
        for state in [
            CommandState::Queued,
            CommandState::Delivered,
            CommandState::Completed,
            CommandState::Failed,
            CommandState::Expired,
        ] {
            usage.commands.insert(state.as_str(), 0);
        }
        let mut referenced = HashSet::new();
        let trees: [(&str, &sled::Tree); 13] = [
            ("daemons", &self.daemons),
            ("commands", &self.commands),
            ("queue", &self.queue),
            ("finished", &self.finished),
            ("changes", &self.changes),
            ("idempotency", &self.idempotency),
            ("responses", &self.responses),
            ("credentials", &self.credentials),
            ("contexts", &self.contexts),
            ("context_index", &self.context_index),
            ("context_commands", &self.context_commands),
            ("context_chunks", &self.context_chunks),
            ("context_garbage", &self.context_garbage),
        ];
        let mut context_owner: HashMap<u64, String> = HashMap::new();
        // Bytes of each daemon's unfinished commands, which trimming never touches.
        let mut unfinished: HashMap<String, u64> = HashMap::new();
        for (name, tree) in trees {
            let mut tree_usage = TreeUsage::default();
            for item in tree.iter() {
                let (key, value) = item?;
                if let Some((owner, _)) = spilled(&value) {
                    referenced.insert(owner);
                }
                let size = stored_size(&key, &value);
                tree_usage.entries += 1;
                tree_usage.bytes += size;
                let daemon = match name {
                    "changes" | "queue" | "idempotency" | "responses" | "context_index" => {
                        daemon_of(&key).map(str::to_owned)
                    }
                    "commands" => {
                        let command: CommandRecord = self.decode(&value)?;
                        *usage.commands.entry(command.state.as_str()).or_default() += 1;
                        if !command.state.is_final() {
                            *unfinished.entry(command.daemon_id.clone()).or_default() += size;
                        }
                        Some(command.daemon_id)
                    }
                    // Retired contexts are on their way out: they count for the tree, not
                    // against their daemon.
                    "contexts" if self.context_garbage.contains_key(&key)? => None,
                    "contexts" => {
                        let record: ContextRecord = self.decode(&value)?;
                        context_owner.insert(record.context_id, record.daemon_id.clone());
                        Some(record.daemon_id)
                    }
                    "context_chunks" if key.len() >= 8 => {
                        let id = u64::from_be_bytes(key[..8].try_into().unwrap_or_default());
                        context_owner.get(&id).cloned()
                    }
                    _ => None,
                };
                if let Some(daemon) = daemon {
                    *usage.daemon_bytes.entry(daemon).or_default() += size;
                }
            }
            usage.trees.insert(name.to_owned(), tree_usage);
        }
        let hold = (2 * sweep_interval).max(std::time::Duration::from_secs(1));
        usage.pieces_collected = self.spill.collect(&referenced, watermark, hold)?;

        if daemon_max_bytes > 0 {
            let over: Vec<(String, u64)> = usage
                .daemon_bytes
                .iter()
                .filter(|(_, &bytes)| bytes > daemon_max_bytes)
                .map(|(daemon, &bytes)| (daemon.clone(), bytes))
                .collect();
            for (daemon, bytes) in over {
                let excess = bytes - daemon_max_bytes;
                let freed = self.trim_daemon(&daemon, excess, Trim::Census, now_ms)?;
                usage.trimmed_bytes += freed;
                if unfinished.get(&daemon).copied().unwrap_or(0) > daemon_max_bytes {
                    usage.over_budget.insert(daemon.clone());
                }
                tracing::warn!(
                    daemon_id = %daemon,
                    bytes,
                    budget = daemon_max_bytes,
                    freed,
                    "daemon over its disk budget: its oldest contexts, cached responses, \
                     finished commands and change-log entries were dropped"
                );
                if let Some(total) = usage.daemon_bytes.get_mut(&daemon) {
                    *total -= freed.min(*total);
                }
            }
        }
        let mut counts = self.budget.counts();
        let mut used = usage.daemon_bytes.clone();
        for (daemon, bytes) in counts.since_census.drain() {
            *used.entry(daemon).or_default() += bytes;
        }
        counts.used = Some(used);
        Ok(usage)
    }

    /// Charges `bytes` written for a daemon against its budget (a result, which is never
    /// refused). Called under the daemon's lock.
    pub(super) fn charge_budget(&self, daemon_id: &str, bytes: u64) {
        self.budget.charge(daemon_id, bytes);
    }

    /// Gives back `bytes` a daemon no longer holds (a value overwritten or retired).
    pub(super) fn release_budget(&self, daemon_id: &str, bytes: u64) {
        self.budget.release(daemon_id, bytes);
    }

    /// Makes room for `bytes` of a new write in the daemon's budget, dropping its oldest
    /// reclaimable data if needed, and charges them; `OverBudget` if there is no room even
    /// then. Called under the daemon's lock, so that check and charge are one step.
    pub(super) fn reserve_budget(
        &self,
        daemon_id: &str,
        bytes: u64,
        trim: Trim,
        now_ms: u64,
    ) -> Result<()> {
        if let Some(room) = self.budget.room(daemon_id) {
            if bytes > room {
                let freed = self.trim_daemon(daemon_id, bytes - room, trim, now_ms)?;
                self.budget.release(daemon_id, freed);
                if freed < bytes - room {
                    return Err(super::StoreError::OverBudget(daemon_id.to_owned()));
                }
                tracing::debug!(daemon_id, freed, "made room in a daemon's disk budget");
            }
        }
        self.budget.charge(daemon_id, bytes);
        Ok(())
    }

    /// Frees at least `excess` bytes of a daemon's reclaimable data if it can, counted as
    /// the census counts them, oldest first: finished contexts, cached responses,
    /// change-log entries (not for [`Trim::Cache`]), then (the census only, which scans
    /// every command) finished commands. A write making room drops nothing unless that
    /// makes room enough. Returns the bytes freed.
    fn trim_daemon(&self, daemon_id: &str, excess: u64, trim: Trim, now_ms: u64) -> Result<u64> {
        let mut victims = Victims::default();
        self.pick_contexts(daemon_id, excess, &mut victims)?;
        self.pick_responses(daemon_id, excess, &mut victims)?;
        if trim != Trim::Cache {
            self.pick_changes(daemon_id, excess, &mut victims)?;
        }
        if trim != Trim::Census && victims.bytes < excess {
            // Not room enough: the write is refused, and takes nothing with it.
            return Ok(0);
        }
        for record in &victims.contexts {
            match trim {
                Trim::Census => self.retire_context(record, now_ms)?,
                Trim::Cache | Trim::Write => self.retire_context_locked(record, now_ms)?,
            }
        }
        for (tree, keys) in [
            (&self.responses, &victims.responses),
            (&self.changes, &victims.changes),
        ] {
            for keys in keys.chunks(1_000) {
                let mut batch = sled::Batch::default();
                keys.iter().for_each(|key| batch.remove(key.clone()));
                let _gate = self.gate.shared();
                tree.apply_batch(batch)?;
            }
        }
        let mut freed = victims.bytes;
        if trim != Trim::Census {
            return Ok(freed);
        }
        // Finished commands, last: a client may still fetch a result, or retry with its
        // Idempotency-Key (a forgotten command would run again), so only ones finished
        // FINISHED_MIN_AGE ago go.
        let mut finished: Vec<(u64, CommandRecord)> = Vec::new();
        for item in self.commands.iter() {
            let (key, value) = item?;
            let command: CommandRecord = self.decode(&value)?;
            if command.daemon_id == daemon_id
                && command.state.is_final()
                && command.finished_at_ms + FINISHED_MIN_AGE_MS <= now_ms
            {
                finished.push((stored_size(&key, &value), command));
            }
        }
        finished.sort_by_key(|(_, command)| command.finished_at_ms);
        for (size, command) in finished {
            if freed >= excess {
                return Ok(freed);
            }
            self.forget_finished(&command)?;
            freed += size;
        }
        Ok(freed)
    }

    /// Listed contexts no longer fetching, oldest first; retired, they no longer count
    /// (their chunks go with the garbage sweep).
    fn pick_contexts(&self, daemon_id: &str, excess: u64, victims: &mut Victims) -> Result<()> {
        let mut contexts = Vec::new();
        for item in self
            .context_index
            .scan_prefix(layout::daemon_prefix(daemon_id))
        {
            let (_, id) = item?;
            let Some(value) = self.contexts.get(&id)? else {
                continue;
            };
            let record: ContextRecord = self.decode(&value)?;
            if record.daemon_id == daemon_id
                && record.state != super::ContextState::Fetching
                && !self.context_garbage.contains_key(&id)?
            {
                let size = stored_size(&id, &value) + context_body_size(&record);
                contexts.push((record.created_at_ms, size, record));
            }
        }
        take_oldest(contexts, excess, &mut victims.bytes, &mut victims.contexts);
        Ok(())
    }

    /// Cached GET responses, oldest first.
    fn pick_responses(&self, daemon_id: &str, excess: u64, victims: &mut Victims) -> Result<()> {
        if victims.bytes >= excess {
            return Ok(());
        }
        let mut responses = Vec::new();
        for item in self.responses.scan_prefix(layout::daemon_prefix(daemon_id)) {
            let (key, value) = item?;
            let response: CachedResponse = self.decode(&value)?;
            let size = stored_size(&key, &value);
            responses.push((response.stored_at_ms, size, key));
        }
        take_oldest(
            responses,
            excess,
            &mut victims.bytes,
            &mut victims.responses,
        );
        Ok(())
    }

    /// Change-log entries, oldest first.
    fn pick_changes(&self, daemon_id: &str, excess: u64, victims: &mut Victims) -> Result<()> {
        for item in self.changes.scan_prefix(layout::daemon_prefix(daemon_id)) {
            if victims.bytes >= excess {
                break;
            }
            let (key, value) = item?;
            victims.bytes += stored_size(&key, &value);
            victims.changes.push(key);
        }
        Ok(())
    }
}
