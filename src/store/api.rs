//! [`Store`], the relay's one door to its data, durable by construction: every call that
//! changes something returns only once that change is durable, and every read that shows
//! a command, a context or a daemon outside returns only once what it read is durable. No
//! caller commits, so no caller can forget to.
//!
//! The backend behind it is an enum, not a trait object: the set of backends is closed
//! and known to this crate, each call is a `match` the compiler checks for exhaustiveness,
//! and async calls need neither boxing nor `async-trait`.
//!
//! sled: each mutation waits for the group commit. The writes a reader can show while
//! their own commit is still in flight (a queued command, a lease, a final state, a
//! chunk) are *tracked* where the backend makes them (`commit::GroupCommit::tracked`), so
//! such a read can tell (`commit_visible`) and wait for that flush before it answers; a
//! read with nothing in flight waits for nothing.
//!
//! A mutation runs to its end in a task of its own: a client that disconnects drops the
//! request's future, never half of a store call.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use super::changes::AppendOutcome;
use super::embedded::SledStore;
use super::postgres::{PgSettings, PgStore};
use super::{
    BackupProgress, BackupSummary, CachedResponse, ChangeEntry, ChunkOutcome, CommandRecord,
    CommitStats, CompleteOutcome, ContextRecord, ContextRequest, DaemonRecord, EnqueueOutcome,
    KeyRecord, LeaseBatch, NewChange, NewChunk, NewCommand, Opened, Result, RetentionPolicy,
    StoreError, SweepStats, Usage,
};

/// One entry of a daemon's results post, as the store takes it.
#[derive(Debug)]
pub enum Posted {
    /// A command's result or error.
    Result {
        command_id: String,
        result_json: Option<String>,
        error_json: Option<String>,
    },
    /// One chunk of a stream command's context.
    Chunk { command_id: String, chunk: NewChunk },
}

/// What became of one [`Posted`] entry, in the same order.
#[derive(Debug)]
pub enum PostedOutcome {
    Result(CompleteOutcome),
    Chunk(ChunkOutcome),
}

impl PostedOutcome {
    /// Whether the answer to this entry says something that must survive a crash: a
    /// stored result, a duplicate (the retry of one whose first commit may have failed),
    /// and every chunk answer (an `unknown` may have ended the fetch).
    fn needs_commit(&self) -> bool {
        !matches!(self, PostedOutcome::Result(CompleteOutcome::Unknown))
    }
}

/// The limits a chunk is stored under.
#[derive(Debug, Clone, Copy)]
pub struct ChunkLimits {
    pub max_context_bytes: u64,
    pub lease_ms: u64,
}

/// What the periodic maintenance does: retention, the contexts' TTL and size cap, and the
/// disk census.
#[derive(Debug, Clone)]
pub struct Maintenance {
    pub retention: RetentionPolicy,
    pub context_ttl_ms: u64,
    pub contexts_max_bytes: u64,
    pub context_garbage_grace_ms: u64,
    pub census_interval: std::time::Duration,
}

/// The relay's store. Cheap to share behind an `Arc`.
pub struct Store {
    backend: Backend,
    /// Offline copies written lately, by daemon and cache key: their fingerprint and
    /// `stored_at_ms`. An identical copy younger than `RESPONSE_REFRESH_MS` is not
    /// offered to the backend again, so a busy GET costs the store nothing.
    recent_copies: std::sync::Mutex<std::collections::HashMap<(String, String), (u64, u64)>>,
}

/// Offline copies remembered at most (the memo is emptied when full).
const RECENT_COPIES: usize = 10_000;

enum Backend {
    Sled(Arc<SledStore>),
    Postgres(Arc<PgStore>),
}

/// Where a store lives.
#[derive(Debug, Clone)]
pub enum StoreSettings {
    /// The embedded database in this directory.
    Sled(std::path::PathBuf),
    Postgres(PgSettings),
}

impl Store {
    /// The embedded store in `dir` (created if missing).
    pub fn open_sled(dir: &Path) -> Result<Store> {
        Ok(Store::with(Backend::Sled(Arc::new(SledStore::open(dir)?))))
    }

    /// The store `settings` name: sled opened (and created), or PostgreSQL connected,
    /// checked and migrated.
    pub async fn open(settings: &StoreSettings) -> anyhow::Result<Store> {
        use anyhow::Context;
        Ok(match settings {
            StoreSettings::Sled(dir) => Store::open_sled(dir)
                .with_context(|| format!("opening the store in {}", dir.display()))?,
            StoreSettings::Postgres(pg) => {
                Store::with(Backend::Postgres(Arc::new(PgStore::open(pg).await?)))
            }
        })
    }

    fn with(backend: Backend) -> Store {
        Store {
            backend,
            recent_copies: Default::default(),
        }
    }

    /// The backend's name, for logs and metrics.
    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backend::Sled(_) => "sled",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Readiness: a durable round trip right now (sled: a group commit; PostgreSQL: a
    /// writable primary answers).
    pub async fn check(&self) -> Result<()> {
        match &self.backend {
            Backend::Sled(sled) => sled.commit().await,
            Backend::Postgres(pg) => pg.check().await,
        }
    }

    /// Durable-write counts for metrics and benchmarks (PostgreSQL: commits, each its
    /// own "flush").
    pub fn commit_stats(&self) -> CommitStats {
        match &self.backend {
            Backend::Sled(sled) => sled.commit_stats(),
            Backend::Postgres(pg) => pg.commit_stats(),
        }
    }

    /// Appends the backend's latency histograms (Prometheus text).
    pub fn render_commit_histograms(&self, out: &mut String) {
        match &self.backend {
            Backend::Sled(sled) => sled.render_commit_histograms(out),
            Backend::Postgres(pg) => pg.render_commit_histograms(out),
        }
    }

    /// Bytes the data occupies on disk (PostgreSQL: the database's size).
    pub async fn size_on_disk(&self) -> Result<u64> {
        match &self.backend {
            Backend::Sled(sled) => sled.size_on_disk(),
            Backend::Postgres(pg) => pg.size_on_disk().await,
        }
    }

    /// Each daemon's disk budget (`retention.daemon_max_bytes`; 0: none).
    pub fn set_daemon_budget(&self, daemon_max_bytes: u64) {
        match &self.backend {
            Backend::Sled(sled) => sled.set_daemon_budget(daemon_max_bytes),
            Backend::Postgres(pg) => pg.set_daemon_budget(daemon_max_bytes),
        }
    }

    /// Makes everything durable and stops; later mutations fail.
    pub async fn close(&self) -> Result<()> {
        match &self.backend {
            Backend::Sled(sled) => {
                let sled = sled.clone();
                blocking(move || sled.close()).await
            }
            Backend::Postgres(pg) => {
                pg.close();
                Ok(())
            }
        }
    }

    /// A consistent copy into `dir` while serving (blocking: call it off the runtime).
    /// PostgreSQL's data is backed up by PostgreSQL's own tools, which this refuses with
    /// [`StoreError::Unsupported`] naming them.
    pub fn backup_to(
        &self,
        dir: &Path,
        progress: impl FnMut(BackupProgress),
    ) -> Result<BackupSummary> {
        self.can_back_up()?;
        match &self.backend {
            Backend::Sled(sled) => sled.backup_to(dir, progress),
            Backend::Postgres(_) => unreachable!("refused above"),
        }
    }

    /// Whether [`Store::backup_to`] can copy this store; the error says what backs it up
    /// instead.
    pub fn can_back_up(&self) -> Result<()> {
        match &self.backend {
            Backend::Sled(_) => Ok(()),
            Backend::Postgres(pg) => Err(StoreError::Unsupported(format!(
                "the relay's data is in PostgreSQL ({}): back it up with PostgreSQL's tools \
                 (pg_dump for a copy, pg_basebackup with WAL archiving for point-in-time \
                 recovery); the data dir holds no data to copy",
                pg.shown()
            ))),
        }
    }

    // ---- daemons -------------------------------------------------------------------

    /// The daemon's record, created if it has none.
    pub async fn ensure_daemon(&self, daemon_id: &str, now_ms: u64) -> Result<DaemonRecord> {
        if let Some(record) = self.daemon(daemon_id).await? {
            return Ok(record);
        }
        let daemon_id = daemon_id.to_owned();
        match &self.backend {
            Backend::Sled(sled) => {
                sled_write(sled, move |sled| sled.ensure_daemon(&daemon_id, now_ms)).await
            }
            Backend::Postgres(pg) => {
                let pg = pg.clone();
                to_end(async move { pg.ensure_daemon(&daemon_id, now_ms).await }).await
            }
        }
    }

    /// Registers a (re)connect and releases the daemon's leases, so that commands handed
    /// to the old connection go out again.
    pub async fn connect_daemon(
        &self,
        daemon_id: &str,
        version: Option<String>,
        capabilities: Vec<String>,
        connection_id: &str,
        now_ms: u64,
    ) -> Result<DaemonRecord> {
        let args = (
            daemon_id.to_owned(),
            connection_id.to_owned(),
            version,
            capabilities,
        );
        match &self.backend {
            Backend::Sled(sled) => {
                sled_write(sled, move |sled| {
                    let (daemon_id, connection_id, version, capabilities) = args;
                    sled.connect_daemon(&daemon_id, version, capabilities, &connection_id, now_ms)
                })
                .await
            }
            Backend::Postgres(pg) => {
                let pg = pg.clone();
                to_end(async move {
                    let (daemon_id, connection_id, version, capabilities) = args;
                    pg.connect_daemon(&daemon_id, version, capabilities, &connection_id, now_ms)
                        .await
                })
                .await
            }
        }
    }

    /// Records that the daemon was heard from. A hint (see [`Store::cache_response`]):
    /// applied when it returns, durable soon after.
    pub async fn touch_daemon(&self, daemon_id: &str, now_ms: u64) -> Result<()> {
        match &self.backend {
            Backend::Sled(sled) => sled.touch_daemon(daemon_id, now_ms),
            Backend::Postgres(pg) => pg.touch_daemon(daemon_id, now_ms).await,
        }
    }

    pub async fn daemon(&self, daemon_id: &str) -> Result<Option<DaemonRecord>> {
        match &self.backend {
            Backend::Sled(sled) => visible(sled, sled.daemon(daemon_id)).await,
            Backend::Postgres(pg) => pg.daemon(daemon_id).await,
        }
    }

    /// Every daemon, ordered by id.
    pub async fn daemons(&self) -> Result<Vec<DaemonRecord>> {
        match &self.backend {
            Backend::Sled(sled) => visible(sled, sled.daemons()).await,
            Backend::Postgres(pg) => pg.daemons().await,
        }
    }

    // ---- keys ----------------------------------------------------------------------

    /// Stores a new key; a daemon key's daemon is created with it, so that clients can
    /// queue writes for the daemon before it first connects.
    pub async fn create_key(&self, record: KeyRecord, now_ms: u64) -> Result<()> {
        match &self.backend {
            Backend::Sled(sled) => {
                sled_write(sled, move |sled| {
                    if let Some(daemon_id) = &record.daemon_id {
                        sled.ensure_daemon(daemon_id, now_ms)?;
                    }
                    sled.put_key(&record)
                })
                .await
            }
            Backend::Postgres(pg) => {
                let pg = pg.clone();
                to_end(async move { pg.create_key(record, now_ms).await }).await
            }
        }
    }

    /// Removes a key; `false` when there was none.
    pub async fn remove_key(&self, key_id: &str) -> Result<bool> {
        let key_id = key_id.to_owned();
        match &self.backend {
            Backend::Sled(sled) => sled_write(sled, move |sled| sled.remove_key(&key_id)).await,
            Backend::Postgres(pg) => {
                let pg = pg.clone();
                to_end(async move { pg.remove_key(&key_id).await }).await
            }
        }
    }

    /// A key by id. Not made durable first: a key is only usable once its creation has
    /// answered, and a removal shows early only as a refusal.
    pub async fn key(&self, key_id: &str) -> Result<Option<KeyRecord>> {
        match &self.backend {
            Backend::Sled(sled) => sled.key(key_id),
            Backend::Postgres(pg) => pg.key(key_id).await,
        }
    }

    /// Another relay node removed a key (`None`: maybe some): forget what this process
    /// cached, so the removal holds here too. sled belongs to one process and caches none.
    pub fn forget_cached_keys(&self, key_id: Option<&str>) {
        if let Backend::Postgres(pg) = &self.backend {
            pg.forget_cached_keys(key_id);
        }
    }

    pub async fn keys(&self) -> Result<Vec<KeyRecord>> {
        match &self.backend {
            Backend::Sled(sled) => sled.keys(),
            Backend::Postgres(pg) => pg.keys().await,
        }
    }

    pub async fn has_keys(&self) -> Result<bool> {
        match &self.backend {
            Backend::Sled(sled) => sled.has_keys(),
            Backend::Postgres(pg) => pg.has_keys().await,
        }
    }

    // ---- commands ------------------------------------------------------------------

    /// Queues a command, or returns the one its `Idempotency-Key` already names.
    pub async fn enqueue(&self, new: NewCommand, now_ms: u64) -> Result<EnqueueOutcome> {
        match &self.backend {
            Backend::Sled(sled) => sled_write(sled, move |sled| sled.enqueue(new, now_ms)).await,
            Backend::Postgres(pg) => {
                let pg = pg.clone();
                to_end(async move { pg.enqueue(new, now_ms).await }).await
            }
        }
    }

    /// Leases up to `max` of the daemon's commands: queued ones, and delivered ones whose
    /// lease ran out, in queue order; those past their TTL expire on the way. The
    /// commands are durable, and their lease too, when this returns: a daemon never runs
    /// a command a crash can take back. `Superseded` when a newer connect replaced
    /// `connection_id`.
    pub async fn lease(
        &self,
        daemon_id: &str,
        connection_id: Option<&str>,
        max: usize,
        lease_ms: u64,
        now_ms: u64,
    ) -> Result<LeaseBatch> {
        let daemon_id = daemon_id.to_owned();
        let connection_id = connection_id.map(str::to_owned);
        match &self.backend {
            // Nothing leased, nothing to wait for: what else it may have written (an
            // expiry) is shown only by reads, which wait for it themselves. An idle poll
            // costs no flush.
            Backend::Sled(sled) => {
                let sled = sled.clone();
                to_end(async move {
                    let batch =
                        sled.lease(&daemon_id, connection_id.as_deref(), max, lease_ms, now_ms)?;
                    if !batch.commands.is_empty() {
                        sled.commit().await?;
                    }
                    Ok(batch)
                })
                .await
            }
            Backend::Postgres(pg) => {
                let pg = pg.clone();
                to_end(async move {
                    pg.lease(&daemon_id, connection_id.as_deref(), max, lease_ms, now_ms)
                        .await
                })
                .await
            }
        }
    }

    /// Stores a daemon's results and chunks, in order, in one durable step; stops after
    /// the first chunk gap (the last outcome then says so).
    pub async fn post_results(
        &self,
        daemon_id: &str,
        posted: Vec<Posted>,
        limits: ChunkLimits,
        now_ms: u64,
    ) -> Result<Vec<PostedOutcome>> {
        if posted.is_empty() {
            return Ok(Vec::new());
        }
        let daemon_id = daemon_id.to_owned();
        match &self.backend {
            Backend::Sled(sled) => {
                let sled = sled.clone();
                to_end(async move {
                    let mut outcomes = Vec::with_capacity(posted.len());
                    for entry in posted {
                        let outcome = match entry {
                            Posted::Result {
                                command_id,
                                result_json,
                                error_json,
                            } => PostedOutcome::Result(sled.complete(
                                &daemon_id,
                                &command_id,
                                result_json,
                                error_json,
                                now_ms,
                            )?),
                            Posted::Chunk { command_id, chunk } => {
                                PostedOutcome::Chunk(sled.append_chunk(
                                    &daemon_id,
                                    &command_id,
                                    chunk,
                                    limits.max_context_bytes,
                                    limits.lease_ms,
                                    now_ms,
                                )?)
                            }
                        };
                        let gap = matches!(outcome, PostedOutcome::Chunk(ChunkOutcome::Gap { .. }));
                        outcomes.push(outcome);
                        if gap {
                            break;
                        }
                    }
                    if outcomes.iter().any(PostedOutcome::needs_commit) {
                        sled.commit().await?;
                    }
                    Ok(outcomes)
                })
                .await
            }
            Backend::Postgres(pg) => {
                let pg = pg.clone();
                to_end(async move { pg.post_results(&daemon_id, posted, limits, now_ms).await })
                    .await
            }
        }
    }

    /// The command as of `now_ms` (one past its TTL is expired first, so readers see
    /// `expired` the moment it is due), once what it shows is durable.
    pub async fn command(&self, command_id: &str, now_ms: u64) -> Result<Option<CommandRecord>> {
        match &self.backend {
            Backend::Sled(sled) => visible(sled, sled.command_at(command_id, now_ms)).await,
            Backend::Postgres(pg) => {
                let (pg, command_id) = (pg.clone(), command_id.to_owned());
                to_end(async move { pg.command(&command_id, now_ms).await }).await
            }
        }
    }

    // ---- change log ----------------------------------------------------------------

    /// Appends updates to the daemon's change log (dropping those at or below the stored
    /// `last_update_seq`) in one durable step.
    pub async fn append_changes(
        &self,
        daemon_id: &str,
        updates: Vec<NewChange>,
        now_ms: u64,
    ) -> Result<AppendOutcome> {
        let daemon_id = daemon_id.to_owned();
        match &self.backend {
            Backend::Sled(sled) => {
                sled_write(sled, move |sled| {
                    sled.append_changes(&daemon_id, updates, now_ms)
                })
                .await
            }
            Backend::Postgres(pg) => {
                let pg = pg.clone();
                to_end(async move { pg.append_changes(&daemon_id, updates, now_ms).await }).await
            }
        }
    }

    /// Entries after `after_seq`, at most `limit` of them and about `max_bytes` (at least
    /// one). The caller bounds them by the durable seq it was told
    /// (`Hub::committed_changes`).
    pub async fn changes_page(
        &self,
        daemon_id: &str,
        after_seq: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<ChangeEntry>> {
        match &self.backend {
            Backend::Sled(sled) => sled.changes_page(daemon_id, after_seq, limit, max_bytes),
            Backend::Postgres(pg) => {
                pg.changes_page(daemon_id, after_seq, limit, max_bytes)
                    .await
            }
        }
    }

    /// The seq after which entries have a timestamp at or after `time_ms` (for `?since=`).
    pub async fn seq_before_time(&self, daemon_id: &str, time_ms: u64) -> Result<u64> {
        match &self.backend {
            Backend::Sled(sled) => sled.seq_before_time(daemon_id, time_ms),
            Backend::Postgres(pg) => pg.seq_before_time(daemon_id, time_ms).await,
        }
    }

    // ---- contexts ------------------------------------------------------------------

    /// The context for a stream path, or a new fetch of it (its command queued in the
    /// same step, so concurrent first requests share one fetch). Durable when it
    /// returns, whichever it is: an existing context's status may be shown at once.
    pub async fn open_context(&self, request: ContextRequest, now_ms: u64) -> Result<Opened> {
        match &self.backend {
            Backend::Sled(sled) => {
                let sled = sled.clone();
                to_end(async move {
                    let opened = sled.open_context(request, now_ms)?;
                    match opened {
                        Opened::Started(_) => sled.commit().await?,
                        Opened::Existing(_) => sled.commit_visible().await?,
                    }
                    Ok(opened)
                })
                .await
            }
            Backend::Postgres(pg) => {
                let pg = pg.clone();
                to_end(async move { pg.open_context(request, now_ms).await }).await
            }
        }
    }

    /// The operator's view of a daemon's commands, newest first: unfinished ones, then
    /// finished ones among the relay's most recent (`commands::RECENT_WINDOW`).
    pub async fn recent_commands(
        &self,
        daemon_id: &str,
        limit: usize,
    ) -> Result<Vec<CommandRecord>> {
        match &self.backend {
            Backend::Sled(sled) => visible(sled, sled.recent_commands(daemon_id, limit)).await,
            Backend::Postgres(pg) => pg.recent_commands(daemon_id, limit).await,
        }
    }

    /// The daemon's current cached contexts, newest first.
    pub async fn daemon_contexts(
        &self,
        daemon_id: &str,
        limit: usize,
    ) -> Result<Vec<ContextRecord>> {
        match &self.backend {
            Backend::Sled(sled) => visible(sled, sled.daemon_contexts(daemon_id, limit)).await,
            Backend::Postgres(pg) => pg.daemon_contexts(daemon_id, limit).await,
        }
    }

    /// The current context of a stream path, if any.
    pub async fn current_context(
        &self,
        daemon_id: &str,
        key: &str,
    ) -> Result<Option<ContextRecord>> {
        match &self.backend {
            Backend::Sled(sled) => visible(sled, sled.current_context(daemon_id, key)).await,
            Backend::Postgres(pg) => pg.current_context(daemon_id, key).await,
        }
    }

    pub async fn context(&self, context_id: u64) -> Result<Option<ContextRecord>> {
        match &self.backend {
            Backend::Sled(sled) => visible(sled, sled.context(context_id)).await,
            Backend::Postgres(pg) => pg.context(context_id).await,
        }
    }

    /// The context and up to `limit` of its chunks from `from`, once durable. `settled`
    /// says the caller already read this context ended and durable: nothing of it changes
    /// any more, so no wait for a flush is needed.
    pub async fn read_context(
        &self,
        context_id: u64,
        from: u64,
        limit: usize,
        settled: bool,
    ) -> Result<Option<(ContextRecord, Vec<Vec<u8>>)>> {
        match &self.backend {
            Backend::Sled(sled) => {
                let Some(record) = sled.context(context_id)? else {
                    return Ok(None);
                };
                let chunks = sled.context_chunks(context_id, from, limit)?;
                if !settled {
                    sled.commit_visible().await?;
                }
                Ok(Some((record, chunks)))
            }
            Backend::Postgres(pg) => pg.read_context(context_id, from, limit).await,
        }
    }

    // ---- cached responses ----------------------------------------------------------

    /// Keeps the 2xx answer of a mirrored GET, the copy served while the daemon is
    /// offline; `false` when it was not kept (unchanged and recent, or no room in the
    /// daemon's budget).
    ///
    /// A hint, one of the two writes that do not wait to be durable (with
    /// [`Store::touch_daemon`]): nothing is acknowledged on it, and waiting would cost a
    /// flush per mirrored GET. sled: durable with the next commit of any other write;
    /// PostgreSQL: committed with `synchronous_commit` off.
    pub async fn cache_response(
        &self,
        daemon_id: &str,
        path_and_query: &str,
        response: CachedResponse,
    ) -> Result<bool> {
        let fingerprint = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            (response.status, &response.headers, &response.body).hash(&mut hasher);
            hasher.finish()
        };
        let slot = (daemon_id.to_owned(), path_and_query.to_owned());
        let stored_at = response.stored_at_ms;
        {
            let recent = self.lock_recent_copies();
            if let Some((seen, at)) = recent.get(&slot) {
                let fresh = stored_at.saturating_sub(*at) < super::responses::RESPONSE_REFRESH_MS;
                if *seen == fingerprint && fresh {
                    return Ok(false);
                }
            }
        }
        let written = match &self.backend {
            Backend::Sled(sled) => sled.put_response(daemon_id, path_and_query, &response)?,
            Backend::Postgres(pg) => {
                pg.cache_response(daemon_id, path_and_query, response)
                    .await?
            }
        };
        if written {
            let mut recent = self.lock_recent_copies();
            if recent.len() >= RECENT_COPIES {
                recent.clear();
            }
            recent.insert(slot, (fingerprint, stored_at));
        }
        Ok(written)
    }

    fn lock_recent_copies(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<(String, String), (u64, u64)>> {
        self.recent_copies.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn response(
        &self,
        daemon_id: &str,
        path_and_query: &str,
    ) -> Result<Option<CachedResponse>> {
        match &self.backend {
            Backend::Sled(sled) => sled.response(daemon_id, path_and_query),
            Backend::Postgres(pg) => pg.response(daemon_id, path_and_query).await,
        }
    }

    // ---- maintenance ---------------------------------------------------------------

    /// Retention, the contexts' TTL and size cap, then the census; durable when it returns.
    /// `None`: another relay node sharing the database is running it now (PostgreSQL: one
    /// sweep at a time, under an advisory lock).
    pub async fn maintain(
        &self,
        work: Maintenance,
        now_ms: u64,
    ) -> Result<Option<(SweepStats, Usage)>> {
        match &self.backend {
            Backend::Sled(sled) => {
                let sled = sled.clone();
                to_end(async move {
                    let worker = sled.clone();
                    let done = blocking(move || {
                        let stats = worker.sweep(&work.retention, now_ms)?;
                        worker.sweep_contexts(
                            work.context_ttl_ms,
                            work.contexts_max_bytes,
                            work.context_garbage_grace_ms,
                            now_ms,
                        )?;
                        let usage = worker.census(work.census_interval, now_ms)?;
                        Ok((stats, usage))
                    })
                    .await?;
                    sled.commit().await?;
                    Ok(Some(done))
                })
                .await
            }
            Backend::Postgres(pg) => {
                let pg = pg.clone();
                to_end(async move { pg.maintain(work, now_ms).await }).await
            }
        }
    }
}

/// A sled mutation: run to its end, durable when it returns.
async fn sled_write<T: Send + 'static>(
    sled: &Arc<SledStore>,
    op: impl FnOnce(&SledStore) -> Result<T> + Send + 'static,
) -> Result<T> {
    let sled = sled.clone();
    to_end(async move {
        let out = op(&sled)?;
        sled.commit().await?;
        Ok(out)
    })
    .await
}

/// A sled read whose answer is shown outside: returned once what it read is durable.
async fn visible<T>(sled: &SledStore, read: Result<T>) -> Result<T> {
    let out = read?;
    sled.commit_visible().await?;
    Ok(out)
}

/// Runs `work` in a task of its own and waits for it: dropping the waiter does not cut it
/// short. A panic in it is resumed here.
async fn to_end<T: Send + 'static>(
    work: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    match tokio::spawn(work).await {
        Ok(out) => out,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(_) => Err(StoreError::Closed),
    }
}

/// Runs blocking store work off the runtime's threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(out) => out,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(_) => Err(StoreError::Closed),
    }
}
