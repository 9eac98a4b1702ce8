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
}

enum Backend {
    Sled(Arc<SledStore>),
}

impl Store {
    /// The embedded store in `dir` (created if missing).
    pub fn open_sled(dir: &Path) -> Result<Store> {
        Ok(Store {
            backend: Backend::Sled(Arc::new(SledStore::open(dir)?)),
        })
    }

    /// The backend's name, for logs and metrics.
    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backend::Sled(_) => "sled",
        }
    }

    /// Readiness: a durable round trip right now (sled: a group commit).
    pub async fn check(&self) -> Result<()> {
        match &self.backend {
            Backend::Sled(sled) => sled.commit().await,
        }
    }

    /// Flush counts for metrics and benchmarks.
    pub fn commit_stats(&self) -> CommitStats {
        match &self.backend {
            Backend::Sled(sled) => sled.commit_stats(),
        }
    }

    /// Appends the backend's latency histograms (Prometheus text).
    pub fn render_commit_histograms(&self, out: &mut String) {
        match &self.backend {
            Backend::Sled(sled) => sled.render_commit_histograms(out),
        }
    }

    /// Bytes the data occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64> {
        match &self.backend {
            Backend::Sled(sled) => sled.size_on_disk(),
        }
    }

    /// Each daemon's disk budget (`retention.daemon_max_bytes`; 0: none).
    pub fn set_daemon_budget(&self, daemon_max_bytes: u64) {
        match &self.backend {
            Backend::Sled(sled) => sled.set_daemon_budget(daemon_max_bytes),
        }
    }

    /// Makes everything durable and stops; later mutations fail with `Closed`.
    pub async fn close(&self) -> Result<()> {
        match &self.backend {
            Backend::Sled(sled) => {
                let sled = sled.clone();
                blocking(move || sled.close()).await
            }
        }
    }

    /// A consistent copy into `dir` while serving (blocking: call it off the runtime).
    pub fn backup_to(
        &self,
        dir: &Path,
        progress: impl FnMut(BackupProgress),
    ) -> Result<BackupSummary> {
        match &self.backend {
            Backend::Sled(sled) => sled.backup_to(dir, progress),
        }
    }

    // ---- daemons -------------------------------------------------------------------

    /// The daemon's record, created if it has none.
    pub async fn ensure_daemon(&self, daemon_id: &str, now_ms: u64) -> Result<DaemonRecord> {
        if let Some(record) = self.daemon(daemon_id).await? {
            return Ok(record);
        }
        let daemon_id = daemon_id.to_owned();
        self.write(move |sled| sled.ensure_daemon(&daemon_id, now_ms))
            .await
    }

    /// Registers a (re)connect and releases the daemon's leases (see
    /// `SledStore::connect_daemon`).
    pub async fn connect_daemon(
        &self,
        daemon_id: &str,
        version: Option<String>,
        capabilities: Vec<String>,
        connection_id: &str,
        now_ms: u64,
    ) -> Result<DaemonRecord> {
        let (daemon_id, connection_id) = (daemon_id.to_owned(), connection_id.to_owned());
        self.write(move |sled| {
            sled.connect_daemon(&daemon_id, version, capabilities, &connection_id, now_ms)
        })
        .await
    }

    /// Records that the daemon was heard from. A hint (see [`Store::cache_response`]):
    /// applied when it returns, durable with the next commit.
    pub async fn touch_daemon(&self, daemon_id: &str, now_ms: u64) -> Result<()> {
        match &self.backend {
            Backend::Sled(sled) => sled.touch_daemon(daemon_id, now_ms),
        }
    }

    pub async fn daemon(&self, daemon_id: &str) -> Result<Option<DaemonRecord>> {
        self.read(|sled| sled.daemon(daemon_id)).await
    }

    /// Every daemon, ordered by id.
    pub async fn daemons(&self) -> Result<Vec<DaemonRecord>> {
        self.read(|sled| sled.daemons()).await
    }

    // ---- keys ----------------------------------------------------------------------

    /// Stores a new key; a daemon key's daemon is created with it, so that clients can
    /// queue writes for the daemon before it first connects.
    pub async fn create_key(&self, record: KeyRecord, now_ms: u64) -> Result<()> {
        self.write(move |sled| {
            if let Some(daemon_id) = &record.daemon_id {
                sled.ensure_daemon(daemon_id, now_ms)?;
            }
            sled.put_key(&record)
        })
        .await
    }

    /// Removes a key; `false` when there was none.
    pub async fn remove_key(&self, key_id: &str) -> Result<bool> {
        let key_id = key_id.to_owned();
        self.write(move |sled| sled.remove_key(&key_id)).await
    }

    /// A key by id. Not made durable first: a key is only usable once its creation has
    /// answered, and a removal shows early only as a refusal.
    pub async fn key(&self, key_id: &str) -> Result<Option<KeyRecord>> {
        match &self.backend {
            Backend::Sled(sled) => sled.key(key_id),
        }
    }

    pub async fn keys(&self) -> Result<Vec<KeyRecord>> {
        match &self.backend {
            Backend::Sled(sled) => sled.keys(),
        }
    }

    pub async fn has_keys(&self) -> Result<bool> {
        match &self.backend {
            Backend::Sled(sled) => sled.has_keys(),
        }
    }

    // ---- commands ------------------------------------------------------------------

    /// Queues a command, or returns the one its `Idempotency-Key` already names.
    pub async fn enqueue(&self, new: NewCommand, now_ms: u64) -> Result<EnqueueOutcome> {
        self.write(move |sled| sled.enqueue(new, now_ms)).await
    }

    /// Leases up to `max` of the daemon's commands (see `SledStore::lease`). The commands
    /// are durable, and their lease too, when this returns: a daemon never runs a command
    /// a crash can take back.
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
        // Nothing leased, nothing to wait for: what else it may have written (an expiry)
        // is shown only by reads, which wait for it themselves. An idle poll costs no
        // flush.
        self.write_when(
            move |sled| sled.lease(&daemon_id, connection_id.as_deref(), max, lease_ms, now_ms),
            |batch| !batch.commands.is_empty(),
        )
        .await
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
                    let outcomes = {
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
                            let gap =
                                matches!(outcome, PostedOutcome::Chunk(ChunkOutcome::Gap { .. }));
                            outcomes.push(outcome);
                            if gap {
                                break;
                            }
                        }
                        outcomes
                    };
                    if outcomes.iter().any(PostedOutcome::needs_commit) {
                        sled.commit().await?;
                    }
                    Ok(outcomes)
                })
                .await
            }
        }
    }

    /// The command as of `now_ms` (one past its TTL is expired first, so readers see
    /// `expired` the moment it is due), once what it shows is durable.
    pub async fn command(&self, command_id: &str, now_ms: u64) -> Result<Option<CommandRecord>> {
        match &self.backend {
            Backend::Sled(sled) => {
                let command = sled.command_at(command_id, now_ms)?;
                sled.commit_visible().await?;
                Ok(command)
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
        self.write(move |sled| sled.append_changes(&daemon_id, updates, now_ms))
            .await
    }

    /// Entries after `after_seq`, at most `limit` of them and about `max_bytes`. The
    /// caller bounds them by the durable seq it was told (`Hub::committed_changes`).
    pub async fn changes_page(
        &self,
        daemon_id: &str,
        after_seq: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<ChangeEntry>> {
        match &self.backend {
            Backend::Sled(sled) => sled.changes_page(daemon_id, after_seq, limit, max_bytes),
        }
    }

    /// The highest seq stored before `time_ms` (for `?since=` times).
    pub async fn seq_before_time(&self, daemon_id: &str, time_ms: u64) -> Result<u64> {
        match &self.backend {
            Backend::Sled(sled) => sled.seq_before_time(daemon_id, time_ms),
        }
    }

    // ---- contexts ------------------------------------------------------------------

    /// The context for a stream path, or a new fetch of it (its command queued).
    /// Durable when it returns, whichever it is: a started fetch (its command queued) or
    /// an existing context (whose status may be shown at once).
    pub async fn open_context(&self, request: ContextRequest, now_ms: u64) -> Result<Opened> {
        let opened = self
            .write_when(
                move |sled| sled.open_context(request, now_ms),
                |opened| matches!(opened, Opened::Started(_)),
            )
            .await?;
        if let Opened::Existing(_) = opened {
            self.read(|_| Ok(())).await?;
        }
        Ok(opened)
    }

    /// The current context of a stream path, if any.
    pub async fn current_context(
        &self,
        daemon_id: &str,
        key: &str,
    ) -> Result<Option<ContextRecord>> {
        self.read(|sled| sled.current_context(daemon_id, key)).await
    }

    pub async fn context(&self, context_id: u64) -> Result<Option<ContextRecord>> {
        self.read(|sled| sled.context(context_id)).await
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
        }
    }

    // ---- cached responses ----------------------------------------------------------

    /// Keeps the 2xx answer of a mirrored GET, the copy served while the daemon is
    /// offline; `false` when it was not kept (too large for the daemon's budget).
    ///
    /// A hint, one of the two writes that do not wait to be durable (with
    /// [`Store::touch_daemon`]): nothing is acknowledged on it, and waiting would cost a
    /// flush per mirrored GET. It is durable with the next commit of any other write.
    pub async fn cache_response(
        &self,
        daemon_id: &str,
        path_and_query: &str,
        response: CachedResponse,
    ) -> Result<bool> {
        match &self.backend {
            Backend::Sled(sled) => sled.put_response(daemon_id, path_and_query, &response),
        }
    }

    pub async fn response(
        &self,
        daemon_id: &str,
        path_and_query: &str,
    ) -> Result<Option<CachedResponse>> {
        match &self.backend {
            Backend::Sled(sled) => sled.response(daemon_id, path_and_query),
        }
    }

    // ---- maintenance ---------------------------------------------------------------

    /// Retention, the contexts' TTL and size cap, then the census; durable when it returns.
    pub async fn maintain(&self, work: Maintenance, now_ms: u64) -> Result<(SweepStats, Usage)> {
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
                    Ok(done)
                })
                .await
            }
        }
    }

    // ---- the two shapes of a call --------------------------------------------------

    /// A mutation: run to its end, durable when it returns.
    async fn write<T: Send + 'static>(
        &self,
        op: impl FnOnce(&SledStore) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.write_when(op, |_| true).await
    }

    /// A mutation whose outcome says whether anything of it is told outside
    /// (`acknowledged`): only then does it wait for the commit.
    async fn write_when<T: Send + 'static>(
        &self,
        op: impl FnOnce(&SledStore) -> Result<T> + Send + 'static,
        acknowledged: fn(&T) -> bool,
    ) -> Result<T> {
        match &self.backend {
            Backend::Sled(sled) => {
                let sled = sled.clone();
                to_end(async move {
                    let out = op(&sled)?;
                    if acknowledged(&out) {
                        sled.commit().await?;
                    }
                    Ok(out)
                })
                .await
            }
        }
    }

    /// A read whose answer is shown outside: returned once what it read is durable.
    async fn read<T>(&self, op: impl FnOnce(&SledStore) -> Result<T>) -> Result<T> {
        match &self.backend {
            Backend::Sled(sled) => {
                let out = op(sled)?;
                sled.commit_visible().await?;
                Ok(out)
            }
        }
    }
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
