//! The PostgreSQL backend: the domain operations as SQL over schema 1, each durable once its
//! `COMMIT` returns (`synchronous_commit=on`, checked at start). The decisions are the
//! shared ones (`machine`): a transaction reads the records it needs, locked, asks the
//! machine what becomes of them, and writes that back.
//!
//! Locks are taken in one order, so that transactions never wait on each other in a
//! circle: a daemon's row (`FOR SHARE` by a lease, `FOR NO KEY UPDATE` by a connect, an
//! append or a new fetch, which serialises them per daemon as sled's daemon lock does;
//! neither conflicts with the `FOR KEY SHARE` a new command's foreign key takes), then its
//! commands in queue order, then contexts. Queueing a command takes no daemon lock at all:
//! it is one row of a group `INSERT` (`inserter.rs`), which concurrent writers share.
//!
//! Where the rules need a count (the queue limit) it is a per-daemon count at most a
//! second old plus what this relay queued since, not a count under a lock: concurrent
//! writers (or other relays) may pass the limit by what they queue in that second. Disk budgets are counted like sled's: a census in
//! SQL, plus what was written since, in memory; trimming a daemon over its budget happens
//! in the census (`maintain`), not inline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use deadpool_postgres::{Pool, Transaction};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::super::machine::{self, ChunkStep, CompleteStep, LeaseStep};
use super::super::usage::{Budget, TreeUsage, Usage, FINISHED_MIN_AGE_MS};
use super::super::{AppendOutcome, CachedResponse};
use super::super::{
    ChangeEntry, ChunkLimits, ChunkOutcome, CommandRecord, CommandState, CommitStats,
    CompleteOutcome, ContextRecord, ContextRequest, ContextState, DaemonRecord, EnqueueOutcome,
    KeyRecord, LeaseBatch, Maintenance, NewChange, NewCommand, Opened, Posted, PostedOutcome,
    Result, Role, StoreError, SweepStats,
};
use super::inserter::Inserter;
use super::{redacted, PgError, PgSettings, MAINTENANCE_LOCK};

const COMMAND_COLUMNS: &str = "command_id, daemon_id, method, params, stream, state, \
    created_ms, expires_ms, queue_seq, lease_until_ms, deliveries, finished_ms, result, error, \
    idempotency_key_id, idempotency_key";

const CONTEXT_COLUMNS: &str = "context_id, daemon_id, cache_key, command_id, state, status, \
    headers, chunks, bytes, created_ms, finished_ms, error";

const DAEMON_COLUMNS: &str = "daemon_id, version, capabilities, created_ms, last_seen_ms, \
    connection_id, last_update_seq, last_change_seq, \
    (SELECT count(*) FROM commands c WHERE c.daemon_id = daemons.daemon_id \
     AND c.state IN ('queued', 'delivered')), node";

const KEY_COLUMNS: &str = "key_id, role, daemon_id, scope, label, secret_sha256, created_ms";

/// Durable writes: how many committed, in how many `COMMIT`s (a group insert commits many
/// in one), and how long those took.
pub(super) struct Commits {
    writes: AtomicU64,
    commits: AtomicU64,
    micros: AtomicU64,
    seconds: crate::metrics::Histogram,
}

impl Default for Commits {
    fn default() -> Self {
        Commits {
            writes: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            micros: AtomicU64::new(0),
            seconds: crate::metrics::Histogram::new(crate::metrics::LATENCY_BUCKETS),
        }
    }
}

impl Commits {
    /// Counts `writes` made durable by one `COMMIT` that took from `started`.
    pub(super) fn committed(&self, started: Instant, writes: u64) {
        let elapsed = started.elapsed();
        self.writes.fetch_add(writes, Ordering::Relaxed);
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        self.seconds.observe(elapsed.as_secs_f64());
    }
}

/// The relay's data in PostgreSQL.
pub struct PgStore {
    pool: Pool,
    /// Where the database is, for messages (never the password).
    shown: String,
    budget: Budget,
    /// Keys by id, as read: authentication keeps working for known keys while the database
    /// is briefly away. Removed here before a revocation answers.
    keys: RwLock<HashMap<String, KeyRecord>>,
    /// Bumped around every key removal: a lookup caches what it read only if no removal
    /// began or ended meanwhile, so a revoked key is never cached again.
    key_removals: AtomicU64,
    commits: Arc<Commits>,
    /// In a cluster, this node's name, stored with each connect and last-seen time.
    node: Option<String>,
    /// New commands, inserted in batches.
    inserter: Inserter,
    /// Each daemon's unfinished commands as last counted, plus those queued here since,
    /// for the queue limit: counted again at most every [`COUNT_FOR`], so that queueing
    /// stays one `INSERT` (a count per write costs a scan of the queue).
    queued: Mutex<HashMap<String, (u64, Instant)>>,
}

/// How long a daemon's queue count is used before it is counted again.
const COUNT_FOR: std::time::Duration = std::time::Duration::from_secs(1);
/// Most offline copies remembered as recent; beyond, the memory starts over.
const RECENT_COPIES: usize = 10_000;

/// A row's `bigint`, as the relay's `u64` (never negative in this schema).
pub(super) fn u(row: &Row, index: usize) -> u64 {
    row.get::<_, i64>(index).max(0) as u64
}

pub(super) fn i(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn state_of(text: &str) -> Result<CommandState> {
    Ok(match text {
        "queued" => CommandState::Queued,
        "delivered" => CommandState::Delivered,
        "completed" => CommandState::Completed,
        "failed" => CommandState::Failed,
        "expired" => CommandState::Expired,
        other => return Err(StoreError::Corrupt(format!("command state {other:?}"))),
    })
}

fn context_state_name(state: ContextState) -> &'static str {
    match state {
        ContextState::Fetching => "fetching",
        ContextState::Complete => "complete",
        ContextState::Failed => "failed",
    }
}

fn context_state_of(text: &str) -> Result<ContextState> {
    Ok(match text {
        "fetching" => ContextState::Fetching,
        "complete" => ContextState::Complete,
        "failed" => ContextState::Failed,
        other => return Err(StoreError::Corrupt(format!("context state {other:?}"))),
    })
}

fn command_from(row: &Row) -> Result<CommandRecord> {
    let key_id: Option<String> = row.get(14);
    let key: Option<String> = row.get(15);
    Ok(CommandRecord {
        id: row.get(0),
        daemon_id: row.get(1),
        method: row.get(2),
        params_json: row.get(3),
        stream: row.get(4),
        state: state_of(row.get(5))?,
        created_at_ms: u(row, 6),
        expires_at_ms: u(row, 7),
        queue_seq: u(row, 8),
        lease_until_ms: u(row, 9),
        deliveries: row.get::<_, i32>(10).max(0) as u32,
        finished_at_ms: u(row, 11),
        result_json: row.get(12),
        error_json: row.get(13),
        idempotency: key_id.zip(key),
    })
}

fn headers_from(value: serde_json::Value) -> Result<Vec<(String, String)>> {
    serde_json::from_value(value).map_err(|err| StoreError::Corrupt(format!("headers: {err}")))
}

fn headers_json(headers: &[(String, String)]) -> serde_json::Value {
    serde_json::to_value(headers).unwrap_or(serde_json::Value::Array(Vec::new()))
}

fn context_from(row: &Row) -> Result<ContextRecord> {
    Ok(ContextRecord {
        context_id: u(row, 0),
        daemon_id: row.get(1),
        key: row.get(2),
        command_id: row.get(3),
        state: context_state_of(row.get(4))?,
        status: row.get::<_, Option<i32>>(5).map(|s| s.clamp(0, 999) as u16),
        headers: headers_from(row.get(6))?,
        chunks: u(row, 7),
        bytes: u(row, 8),
        created_at_ms: u(row, 9),
        finished_at_ms: u(row, 10),
        error_json: row.get(11),
    })
}

fn daemon_from(row: &Row) -> DaemonRecord {
    DaemonRecord {
        daemon_id: row.get(0),
        version: row.get(1),
        capabilities: row.get(2),
        created_at_ms: u(row, 3),
        last_seen_ms: row.get::<_, Option<i64>>(4).map(|t| t.max(0) as u64),
        connection_id: row.get(5),
        last_update_seq: u(row, 6),
        last_change_seq: u(row, 7),
        next_queue_seq: 0,
        queued: u(row, 8),
        node: row.get(9),
    }
}

fn key_from(row: &Row) -> Result<KeyRecord> {
    let role: &str = row.get(1);
    let secret: Vec<u8> = row.get(5);
    Ok(KeyRecord {
        key_id: row.get(0),
        role: Role::parse(role).ok_or_else(|| StoreError::Corrupt(format!("role {role:?}")))?,
        daemon_id: row.get(2),
        scope: row.get(3),
        label: row.get(4),
        secret_sha256: secret
            .try_into()
            .map_err(|_| StoreError::Corrupt("a key's hash is not 32 bytes".into()))?,
        created_at_ms: u(row, 6),
    })
}

/// A failed statement, as the store's error: everything but a constraint the caller
/// handles is "unavailable", so nothing of the call was acknowledged.
pub(super) fn pg(err: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(format!("PostgreSQL: {}", super::error_text(&err)))
}

pub(super) fn pool_err(err: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Unavailable(format!("PostgreSQL: {err}"))
}

impl PgStore {
    /// Connects, checks the server and migrates (see [`super::open`]).
    pub async fn open(settings: &PgSettings) -> std::result::Result<PgStore, PgError> {
        let pool = super::open(settings).await?;
        let commits = Arc::new(Commits::default());
        Ok(PgStore {
            inserter: Inserter::new(pool.clone(), commits.clone()),
            pool,
            shown: redacted(&settings.url),
            budget: Budget::default(),
            keys: RwLock::new(HashMap::new()),
            key_removals: AtomicU64::new(0),
            commits,
            node: settings.node.clone(),
            queued: Mutex::new(HashMap::new()),
        })
    }

    /// Where the database is, without the password.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_err)
    }

    /// Counts a durable write that took from `started`.
    fn committed(&self, started: Instant) {
        self.commits.committed(started, 1);
    }

    async fn commit(&self, tx: Transaction<'_>, started: Instant) -> Result<()> {
        tx.commit().await.map_err(pg)?;
        self.committed(started);
        Ok(())
    }

    pub fn commit_stats(&self) -> CommitStats {
        CommitStats {
            flushes: self.commits.commits.load(Ordering::Relaxed),
            commits: self.commits.writes.load(Ordering::Relaxed),
            flush_micros: self.commits.micros.load(Ordering::Relaxed),
        }
    }

    pub fn render_commit_histograms(&self, out: &mut String) {
        out.push_str("# TYPE syncrelay_store_flush_seconds histogram\n");
        self.commits
            .seconds
            .render(out, "syncrelay_store_flush_seconds", "");
    }

    pub fn set_daemon_budget(&self, daemon_max_bytes: u64) {
        self.budget.set_max(daemon_max_bytes);
    }

    pub fn close(&self) {
        self.pool.close();
    }

    /// A writable primary answers.
    pub async fn check(&self) -> Result<()> {
        let client = self.client().await?;
        let recovering: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(pg)?
            .get(0);
        if recovering {
            return Err(StoreError::Unavailable(
                "PostgreSQL is a read-only standby".into(),
            ));
        }
        Ok(())
    }

    pub async fn size_on_disk(&self) -> Result<u64> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT pg_database_size(current_database())", &[])
            .await
            .map_err(pg)?;
        Ok(u(&row, 0))
    }

    // ---- daemons -------------------------------------------------------------------

    pub async fn ensure_daemon(&self, daemon_id: &str, now_ms: u64) -> Result<DaemonRecord> {
        let client = self.client().await?;
        let started = Instant::now();
        create_daemon(&client, daemon_id, now_ms).await?;
        self.committed(started);
        daemon_in(&client, daemon_id)
            .await?
            .ok_or_else(|| StoreError::UnknownDaemon(daemon_id.to_owned()))
    }

    pub async fn connect_daemon(
        &self,
        daemon_id: &str,
        version: Option<String>,
        capabilities: Vec<String>,
        connection_id: &str,
        now_ms: u64,
    ) -> Result<DaemonRecord> {
        let mut client = self.client().await?;
        let started = Instant::now();
        let tx = client.transaction().await.map_err(pg)?;
        create_daemon(&tx, daemon_id, now_ms).await?;
        tx.execute(
            "SELECT 1 FROM daemons WHERE daemon_id = $1 FOR NO KEY UPDATE",
            &[&daemon_id],
        )
        .await
        .map_err(pg)?;
        tx.execute(
            "UPDATE daemons SET version = $2, capabilities = $3, last_seen_ms = $4, \
             connection_id = $5, node = $6 WHERE daemon_id = $1",
            &[
                &daemon_id,
                &version,
                &capabilities,
                &i(now_ms),
                &connection_id,
                &self.node,
            ],
        )
        .await
        .map_err(pg)?;
        // Every lease goes back: commands handed to the old connection go out again.
        let rows = unfinished_locked(&tx, daemon_id).await?;
        for row in &rows {
            let mut command = command_from(row)?;
            if machine::release(&mut command) {
                update_command(&tx, &command).await?;
            }
        }
        let record = daemon_in(&tx, daemon_id)
            .await?
            .ok_or_else(|| StoreError::UnknownDaemon(daemon_id.to_owned()))?;
        self.commit(tx, started).await?;
        Ok(record)
    }

    /// A hint: committed without waiting for the WAL flush. The time only moves forward
    /// (a late write from a node the daemon has left does not undo a newer one). The node
    /// is the connect's to set (a daemon that moves connects again); this only fills it in.
    pub async fn touch_daemon(&self, daemon_id: &str, now_ms: u64) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        tx.batch_execute("SET LOCAL synchronous_commit TO OFF")
            .await
            .map_err(pg)?;
        tx.execute(
            "UPDATE daemons SET last_seen_ms = $2, node = coalesce(node, $3) WHERE daemon_id = $1 \
             AND (last_seen_ms IS NULL OR last_seen_ms <= $2)",
            &[&daemon_id, &i(now_ms), &self.node],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)
    }

    pub async fn daemon(&self, daemon_id: &str) -> Result<Option<DaemonRecord>> {
        daemon_in(&self.client().await?, daemon_id).await
    }

    pub async fn daemons(&self) -> Result<Vec<DaemonRecord>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {DAEMON_COLUMNS} FROM daemons ORDER BY daemon_id COLLATE \"C\""),
                &[],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(daemon_from).collect())
    }

    // ---- keys ----------------------------------------------------------------------

    pub async fn create_key(&self, record: KeyRecord, now_ms: u64) -> Result<()> {
        let mut client = self.client().await?;
        let started = Instant::now();
        let tx = client.transaction().await.map_err(pg)?;
        if let Some(daemon_id) = &record.daemon_id {
            create_daemon(&tx, daemon_id, now_ms).await?;
        }
        tx.execute(
            &format!("INSERT INTO keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"),
            &[
                &record.key_id,
                &record.role.as_str(),
                &record.daemon_id,
                &record.scope,
                &record.label,
                &record.secret_sha256.as_slice(),
                &i(record.created_at_ms),
            ],
        )
        .await
        .map_err(pg)?;
        self.commit(tx, started).await?;
        self.keys_cache().insert(record.key_id.clone(), record);
        Ok(())
    }

    fn keys_cache(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, KeyRecord>> {
        self.keys.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops cached keys (one, or all for `None`) that another relay node may have
    /// removed: lookups from now on ask the database, and none already under way caches
    /// what it read.
    pub fn forget_cached_keys(&self, key_id: Option<&str>) {
        self.key_removals.fetch_add(1, Ordering::SeqCst);
        let mut cache = self.keys_cache();
        match key_id {
            Some(key_id) => {
                cache.remove(key_id);
            }
            None => cache.clear(),
        }
    }

    pub async fn remove_key(&self, key_id: &str) -> Result<bool> {
        // Out of the cache first: from now on every lookup asks the database, and none
        // that read the key before the DELETE commits may cache it (`key_removals`).
        self.key_removals.fetch_add(1, Ordering::SeqCst);
        self.keys_cache().remove(key_id);
        let client = self.client().await?;
        let started = Instant::now();
        let removed = client
            .execute("DELETE FROM keys WHERE key_id = $1", &[&key_id])
            .await;
        self.key_removals.fetch_add(1, Ordering::SeqCst);
        self.keys_cache().remove(key_id);
        let removed = removed.map_err(pg)?;
        self.committed(started);
        Ok(removed > 0)
    }

    pub async fn key(&self, key_id: &str) -> Result<Option<KeyRecord>> {
        if let Some(record) = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key_id)
        {
            return Ok(Some(record.clone()));
        }
        let removals = self.key_removals.load(Ordering::SeqCst);
        let client = self.client().await?;
        let select = client
            .prepare_cached(&format!("SELECT {KEY_COLUMNS} FROM keys WHERE key_id = $1"))
            .await
            .map_err(pg)?;
        let row = client.query_opt(&select, &[&key_id]).await.map_err(pg)?;
        let record = row.as_ref().map(key_from).transpose()?;
        if let Some(record) = &record {
            let mut cache = self.keys_cache();
            if self.key_removals.load(Ordering::SeqCst) == removals {
                cache.insert(record.key_id.clone(), record.clone());
            }
        }
        Ok(record)
    }

    pub async fn keys(&self) -> Result<Vec<KeyRecord>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {KEY_COLUMNS} FROM keys ORDER BY key_id COLLATE \"C\""),
                &[],
            )
            .await
            .map_err(pg)?;
        rows.iter().map(key_from).collect()
    }

    pub async fn has_keys(&self) -> Result<bool> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT EXISTS (SELECT 1 FROM keys)", &[])
            .await
            .map_err(pg)?;
        Ok(row.get(0))
    }

    // ---- commands ------------------------------------------------------------------

    /// One row of a group `INSERT` ([`Inserter`]): concurrent requests share a statement
    /// and its `COMMIT`. An `Idempotency-Key` already taken (even by a concurrent request)
    /// returns the command it names. The queue limit is checked
    /// against the daemon's count as of at most [`COUNT_FOR`] ago plus what this relay
    /// queued since: concurrent writers (or other relays) may pass it by what they queued
    /// in that time.
    pub async fn enqueue(&self, new: NewCommand, now_ms: u64) -> Result<EnqueueOutcome> {
        if new.idempotency.is_some() {
            if let Some(found) = find_idempotent(&self.client().await?, &new).await? {
                return Ok(EnqueueOutcome {
                    command: found,
                    created: false,
                });
            }
        }
        let queued = self.queued_count(&new.daemon_id).await?;
        let (probe, daemon_id) = (new.clone(), new.daemon_id.clone());
        let mut command = machine::new_command(new, queued, 0, now_ms)?;
        let bytes = command_bytes(&command);
        self.reserve(&daemon_id, bytes)?;
        // Into the daemon's queue if the daemon exists; with a key, unless the key is
        // taken (then nothing: the command it names is looked up below).
        let inserted = match self.inserter.insert(command.clone()).await {
            Ok(inserted) => inserted,
            Err(err) => {
                self.budget.release(&daemon_id, bytes);
                return Err(err);
            }
        };
        match inserted {
            Some(queue_seq) => {
                command.queue_seq = queue_seq;
                if let Some((count, _)) = self.queued_counts().get_mut(&daemon_id) {
                    *count += 1;
                }
                Ok(EnqueueOutcome {
                    command,
                    created: true,
                })
            }
            // No such daemon, or a concurrent request with the same key won.
            None => {
                self.budget.release(&daemon_id, bytes);
                match find_idempotent(&self.client().await?, &probe).await? {
                    Some(found) => Ok(EnqueueOutcome {
                        command: found,
                        created: false,
                    }),
                    None => Err(StoreError::UnknownDaemon(daemon_id)),
                }
            }
        }
    }

    fn queued_counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, Instant)>> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `finished` of the daemon's commands reached a final state (committed).
    fn unqueued(&self, daemon_id: &str, finished: u64) {
        if let Some((count, _)) = self.queued_counts().get_mut(daemon_id) {
            *count = count.saturating_sub(finished);
        }
    }

    /// The daemon's unfinished commands (see [`PgStore::enqueue`]).
    async fn queued_count(&self, daemon_id: &str) -> Result<u64> {
        if let Some((count, at)) = self.queued_counts().get_mut(daemon_id) {
            if at.elapsed() < COUNT_FOR {
                return Ok(*count);
            }
            // This caller counts again; the others keep using the count meanwhile.
            *at = Instant::now();
        }
        let client = self.client().await?;
        let count = client
            .prepare_cached(
                "SELECT count(*) FROM commands WHERE daemon_id = $1 \
                 AND state IN ('queued', 'delivered')",
            )
            .await
            .map_err(pg)?;
        let count = u(
            &client.query_one(&count, &[&daemon_id]).await.map_err(pg)?,
            0,
        );
        let mut counts = self.queued_counts();
        if counts.len() >= RECENT_COPIES {
            counts.clear();
        }
        counts.insert(daemon_id.to_owned(), (count, Instant::now()));
        Ok(count)
    }

    /// Charges a write against the daemon's budget, or refuses it.
    fn reserve(&self, daemon_id: &str, bytes: u64) -> Result<()> {
        if let Some(room) = self.budget.room_for(daemon_id) {
            if bytes > room {
                return Err(StoreError::OverBudget(daemon_id.to_owned()));
            }
        }
        self.budget.charge_bytes(daemon_id, bytes);
        Ok(())
    }

    pub async fn lease(
        &self,
        daemon_id: &str,
        connection_id: Option<&str>,
        max: usize,
        lease_ms: u64,
        now_ms: u64,
    ) -> Result<LeaseBatch> {
        let mut client = self.client().await?;
        // First, in one statement: whether anything is due at all. An idle poll (the
        // common case) ends here, without a transaction. This only pre-filters; what
        // becomes of each command is decided below, by the machine, under locks.
        let probe = client
            .prepare_cached(
                "SELECT d.connection_id, \
                   EXISTS (SELECT 1 FROM commands c WHERE c.daemon_id = d.daemon_id \
                     AND c.state IN ('queued', 'delivered') \
                     AND NOT (c.state = 'delivered' AND c.lease_until_ms > $2)), \
                   (SELECT min(c.lease_until_ms) FROM commands c WHERE c.daemon_id = d.daemon_id \
                     AND c.state = 'delivered' AND c.lease_until_ms > $2) \
                 FROM daemons d WHERE d.daemon_id = $1",
            )
            .await
            .map_err(pg)?;
        let probed = client
            .query_opt(&probe, &[&daemon_id, &i(now_ms)])
            .await
            .map_err(pg)?;
        let stored: Option<String> = probed.as_ref().and_then(|row| row.get(0));
        if stored.as_deref() != connection_id {
            return Err(StoreError::Superseded);
        }
        if let Some(row) = &probed {
            if !row.get::<_, bool>(1) {
                return Ok(LeaseBatch {
                    commands: Vec::new(),
                    next_lease_expiry_ms: row.get::<_, Option<i64>>(2).map(|t| t.max(0) as u64),
                });
            }
        }
        let started = Instant::now();
        let tx = client.transaction().await.map_err(pg)?;
        // Shared: concurrent leases pass, a connect (which releases leases) waits.
        let daemon = tx
            .query_opt(
                "SELECT connection_id FROM daemons WHERE daemon_id = $1 FOR SHARE",
                &[&daemon_id],
            )
            .await
            .map_err(pg)?;
        let stored: Option<String> = daemon.and_then(|row| row.get(0));
        if stored.as_deref() != connection_id {
            return Err(StoreError::Superseded);
        }
        let rows = unfinished_locked(&tx, daemon_id).await?;
        let mut batch = LeaseBatch::default();
        let mut wrote = false;
        let mut expired = 0;
        for row in &rows {
            if batch.commands.len() >= max {
                break;
            }
            let mut command = command_from(row)?;
            match machine::lease_step(&command, now_ms) {
                LeaseStep::Unqueue => {}
                LeaseStep::Running(until) => {
                    batch.next_lease_expiry_ms =
                        Some(batch.next_lease_expiry_ms.map_or(until, |t| t.min(until)));
                }
                LeaseStep::Expire => {
                    machine::finish(&mut command, CommandState::Expired, None, None, now_ms);
                    update_command(&tx, &command).await?;
                    wrote = true;
                    expired += 1;
                }
                LeaseStep::Lease => {
                    machine::lease(&mut command, lease_ms, now_ms);
                    update_command(&tx, &command).await?;
                    wrote = true;
                    batch.commands.push(command);
                }
            }
        }
        match wrote {
            true => self.commit(tx, started).await?,
            false => tx.rollback().await.map_err(pg)?,
        }
        self.unqueued(daemon_id, expired);
        Ok(batch)
    }

    pub async fn post_results(
        &self,
        daemon_id: &str,
        posted: Vec<Posted>,
        limits: ChunkLimits,
        now_ms: u64,
    ) -> Result<Vec<PostedOutcome>> {
        let mut client = self.client().await?;
        let started = Instant::now();
        let tx = client.transaction().await.map_err(pg)?;
        // Every command named, locked at once in queue order (as a lease locks them).
        let ids: Vec<&str> = posted
            .iter()
            .map(|p| match p {
                Posted::Result { command_id, .. } | Posted::Chunk { command_id, .. } => {
                    command_id.as_str()
                }
            })
            .collect();
        let select = tx
            .prepare_cached(&format!(
                "SELECT {COMMAND_COLUMNS} FROM commands WHERE command_id = ANY($1) \
                 ORDER BY queue_seq FOR UPDATE"
            ))
            .await
            .map_err(pg)?;
        let rows = tx.query(&select, &[&ids]).await.map_err(pg)?;
        let mut commands: HashMap<String, CommandRecord> = HashMap::new();
        for row in &rows {
            let command = command_from(row)?;
            commands.insert(command.id.clone(), command);
        }
        let unfinished = commands.values().filter(|c| !c.state.is_final()).count();
        let mut outcomes = Vec::with_capacity(posted.len());
        for entry in posted {
            let outcome = match entry {
                Posted::Result {
                    command_id,
                    result_json,
                    error_json,
                } => {
                    let command = commands.get_mut(&command_id);
                    let step =
                        machine::complete_step(command.as_deref(), daemon_id, error_json.is_some());
                    PostedOutcome::Result(match (step, command) {
                        (CompleteStep::Unknown, _) | (_, None) => CompleteOutcome::Unknown,
                        (CompleteStep::Duplicate, _) => CompleteOutcome::Duplicate,
                        (CompleteStep::Finish(state), Some(command)) => {
                            let bytes = result_json.as_ref().map_or(0, String::len)
                                + error_json.as_ref().map_or(0, String::len);
                            self.budget.charge_bytes(daemon_id, bytes as u64);
                            machine::finish(command, state, result_json, error_json, now_ms);
                            update_command(&tx, command).await?;
                            CompleteOutcome::Completed(Box::new(command.clone()))
                        }
                    })
                }
                Posted::Chunk { command_id, chunk } => {
                    let command = commands.get_mut(&command_id);
                    PostedOutcome::Chunk(
                        self.append_chunk(&tx, daemon_id, command, chunk, limits, now_ms)
                            .await?,
                    )
                }
            };
            let gap = matches!(outcome, PostedOutcome::Chunk(ChunkOutcome::Gap { .. }));
            outcomes.push(outcome);
            if gap {
                break;
            }
        }
        self.commit(tx, started).await?;
        let still = commands.values().filter(|c| !c.state.is_final()).count();
        self.unqueued(daemon_id, (unfinished - still) as u64);
        Ok(outcomes)
    }

    async fn append_chunk(
        &self,
        tx: &Transaction<'_>,
        daemon_id: &str,
        command: Option<&mut CommandRecord>,
        chunk: super::super::NewChunk,
        limits: ChunkLimits,
        now_ms: u64,
    ) -> Result<ChunkOutcome> {
        let Some(command) = command else {
            return Ok(ChunkOutcome::Unknown);
        };
        let row = tx
            .query_opt(
                &format!("SELECT {CONTEXT_COLUMNS} FROM contexts WHERE command_id = $1 FOR UPDATE"),
                &[&command.id],
            )
            .await
            .map_err(pg)?;
        let Some(mut record) = row.as_ref().map(context_from).transpose()? else {
            return Ok(ChunkOutcome::Unknown);
        };
        let same_as_stored = match machine::chunk_needs_stored(&record, chunk.index) {
            true => tx
                .query_opt(
                    "SELECT data = $3 FROM context_chunks WHERE context_id = $1 AND chunk = $2",
                    &[
                        &i(record.context_id),
                        &i(chunk.index),
                        &chunk.data.as_slice(),
                    ],
                )
                .await
                .map_err(pg)?
                .is_some_and(|row| row.get::<_, bool>(0)),
            false => true,
        };
        match machine::chunk_step(
            Some(&record),
            Some(command),
            daemon_id,
            chunk.index,
            same_as_stored,
        ) {
            ChunkStep::Unknown => return Ok(ChunkOutcome::Unknown),
            ChunkStep::Gap { expected } => return Ok(ChunkOutcome::Gap { expected }),
            ChunkStep::Restarted => {
                machine::restarted(&mut record, now_ms);
                update_context(tx, &record).await?;
                finish_stream_command(tx, command, &record, now_ms).await?;
                return Ok(ChunkOutcome::Unknown);
            }
            ChunkStep::Duplicate { finish_command } => {
                if finish_command {
                    finish_stream_command(tx, command, &record, now_ms).await?;
                }
                return Ok(ChunkOutcome::Duplicate(record));
            }
            ChunkStep::Append => {}
        }
        let index = chunk.index;
        let refusal = match machine::too_large(&record, chunk.data.len(), limits.max_context_bytes)
        {
            Some(refusal) => Some(refusal),
            None => match self.reserve(daemon_id, chunk.data.len() as u64 + 24) {
                Ok(()) => None,
                Err(StoreError::OverBudget(_)) => Some(machine::over_budget(daemon_id)),
                Err(err) => return Err(err),
            },
        };
        let too_large = refusal.is_some();
        if let Some(data) = machine::append_chunk(&mut record, chunk, refusal, now_ms) {
            tx.execute(
                "INSERT INTO context_chunks (context_id, chunk, data) VALUES ($1, $2, $3)",
                &[&i(record.context_id), &i(index), &data],
            )
            .await
            .map_err(pg)?;
        }
        update_context(tx, &record).await?;
        if record.state == ContextState::Fetching {
            // Chunks flowing: the daemon is working on it, keep the lease.
            command.lease_until_ms = now_ms.saturating_add(limits.lease_ms);
            update_command(tx, command).await?;
        } else {
            finish_stream_command(tx, command, &record, now_ms).await?;
        }
        Ok(match too_large {
            true => ChunkOutcome::TooLarge(record),
            false => ChunkOutcome::Stored(record),
        })
    }

    /// The command as of `now_ms`: one due to expire is expired first.
    pub async fn command(&self, command_id: &str, now_ms: u64) -> Result<Option<CommandRecord>> {
        let mut client = self.client().await?;
        let sql = format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE command_id = $1");
        let select = client.prepare_cached(&sql).await.map_err(pg)?;
        let row = client
            .query_opt(&select, &[&command_id])
            .await
            .map_err(pg)?;
        let command = row.as_ref().map(command_from).transpose()?;
        if !command.as_ref().is_some_and(|c| c.due_to_expire(now_ms)) {
            return Ok(command);
        }
        let started = Instant::now();
        let tx = client.transaction().await.map_err(pg)?;
        let row = tx
            .query_opt(&format!("{sql} FOR UPDATE"), &[&command_id])
            .await
            .map_err(pg)?;
        let Some(mut command) = row.as_ref().map(command_from).transpose()? else {
            return Ok(None);
        };
        if command.due_to_expire(now_ms) {
            machine::finish(&mut command, CommandState::Expired, None, None, now_ms);
            update_command(&tx, &command).await?;
            self.commit(tx, started).await?;
            self.unqueued(&command.daemon_id, 1);
        }
        Ok(Some(command))
    }

    // ---- change log ----------------------------------------------------------------

    pub async fn append_changes(
        &self,
        daemon_id: &str,
        updates: Vec<NewChange>,
        now_ms: u64,
    ) -> Result<AppendOutcome> {
        let mut client = self.client().await?;
        let started = Instant::now();
        let tx = client.transaction().await.map_err(pg)?;
        let row = tx
            .query_opt(
                "SELECT last_update_seq, last_change_seq FROM daemons WHERE daemon_id = $1 \
                 FOR NO KEY UPDATE",
                &[&daemon_id],
            )
            .await
            .map_err(pg)?
            .ok_or_else(|| StoreError::UnknownDaemon(daemon_id.to_owned()))?;
        let (mut last_update_seq, mut last_change_seq) = (u(&row, 0), u(&row, 1));
        let rows =
            machine::admit_updates(&mut last_update_seq, &mut last_change_seq, updates, now_ms);
        let outcome = AppendOutcome {
            appended: rows.len(),
            last_update_seq,
            last_change_seq,
        };
        if rows.is_empty() {
            tx.rollback().await.map_err(pg)?;
            return Ok(outcome);
        }
        let bytes: u64 = rows
            .iter()
            .map(|(_, r)| (r.data_json.len() + r.kind.len() + 48) as u64)
            .sum();
        self.reserve(daemon_id, bytes)?;
        let mut seqs = Vec::with_capacity(rows.len());
        let mut kinds = Vec::with_capacity(rows.len());
        let mut timestamps = Vec::with_capacity(rows.len());
        let mut data = Vec::with_capacity(rows.len());
        let mut daemon_seqs = Vec::with_capacity(rows.len());
        for (seq, record) in &rows {
            seqs.push(i(*seq));
            kinds.push(record.kind.as_str());
            timestamps.push(i(record.timestamp_ms));
            data.push(record.data_json.as_str());
            daemon_seqs.push(record.daemon_seq.map(i));
        }
        tx.execute(
            "INSERT INTO changes (daemon_id, seq, kind, timestamp_ms, stored_ms, data, daemon_seq) \
             SELECT $1, seq, kind, ts, $5, data, dseq \
             FROM unnest($2::bigint[], $3::text[], $4::bigint[], $6::text[], $7::bigint[]) \
             AS a(seq, kind, ts, data, dseq)",
            &[
                &daemon_id,
                &seqs,
                &kinds,
                &timestamps,
                &i(now_ms),
                &data,
                &daemon_seqs,
            ],
        )
        .await
        .map_err(|err| {
            self.budget.release(daemon_id, bytes);
            pg(err)
        })?;
        tx.execute(
            "UPDATE daemons SET last_update_seq = $2, last_change_seq = $3 WHERE daemon_id = $1",
            &[&daemon_id, &i(last_update_seq), &i(last_change_seq)],
        )
        .await
        .map_err(pg)?;
        self.commit(tx, started).await?;
        Ok(outcome)
    }

    pub async fn changes_page(
        &self,
        daemon_id: &str,
        after_seq: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<ChangeEntry>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT seq, kind, timestamp_ms, stored_ms, data FROM changes \
                 WHERE daemon_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[
                    &daemon_id,
                    &i(after_seq),
                    &(limit.min(i64::MAX as usize) as i64),
                ],
            )
            .await
            .map_err(pg)?;
        let mut entries = Vec::with_capacity(rows.len());
        let mut bytes = 0;
        for row in &rows {
            if !entries.is_empty() && bytes >= max_bytes {
                break;
            }
            let entry = ChangeEntry {
                seq: u(row, 0),
                kind: row.get(1),
                timestamp_ms: u(row, 2),
                stored_at_ms: u(row, 3),
                data_json: row.get(4),
            };
            bytes += entry.data_json.len();
            entries.push(entry);
        }
        Ok(entries)
    }

    pub async fn seq_before_time(&self, daemon_id: &str, time_ms: u64) -> Result<u64> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT coalesce( \
                   (SELECT seq - 1 FROM changes WHERE daemon_id = $1 AND timestamp_ms >= $2 \
                    ORDER BY seq LIMIT 1), \
                   (SELECT max(seq) FROM changes WHERE daemon_id = $1), 0)",
                &[&daemon_id, &i(time_ms)],
            )
            .await
            .map_err(pg)?;
        Ok(u(&row, 0))
    }

    /// See `SledStore::recent_commands`: the queue (the partial index), then finished
    /// commands among the relay's newest (the primary key, backwards: ids are
    /// time-ordered), each read bounded.
    pub async fn recent_commands(
        &self,
        daemon_id: &str,
        limit: usize,
    ) -> Result<Vec<CommandRecord>> {
        let client = self.client().await?;
        let sql = format!(
            "(SELECT {COMMAND_COLUMNS}, 0 AS part FROM commands WHERE daemon_id = $1 \
               AND state IN ('queued', 'delivered') ORDER BY queue_seq DESC LIMIT $2) \
             UNION ALL \
             (SELECT {COMMAND_COLUMNS}, 1 AS part FROM \
               (SELECT * FROM commands ORDER BY command_id DESC LIMIT $3) AS newest \
               WHERE daemon_id = $1 AND state NOT IN ('queued', 'delivered') \
               ORDER BY command_id DESC LIMIT $2) \
             ORDER BY part, queue_seq DESC LIMIT $2"
        );
        let limit = limit as i64;
        let rows = client
            .query(
                &sql,
                &[
                    &daemon_id,
                    &limit,
                    &(super::super::commands::RECENT_WINDOW as i64),
                ],
            )
            .await
            .map_err(pg)?;
        rows.iter().map(command_from).collect()
    }

    /// The daemon's current contexts, newest first.
    pub async fn daemon_contexts(
        &self,
        daemon_id: &str,
        limit: usize,
    ) -> Result<Vec<ContextRecord>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {CONTEXT_COLUMNS} FROM contexts WHERE daemon_id = $1 \
                     AND retired_ms IS NULL ORDER BY created_ms DESC LIMIT $2"
                ),
                &[&daemon_id, &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        rows.iter().map(context_from).collect()
    }

    // ---- contexts ------------------------------------------------------------------

    pub async fn open_context(&self, request: ContextRequest, now_ms: u64) -> Result<Opened> {
        let mut client = self.client().await?;
        let started = Instant::now();
        let tx = client.transaction().await.map_err(pg)?;
        // Per daemon, one at a time: concurrent first requests share one fetch.
        let daemon = tx
            .query_opt(
                "SELECT 1 FROM daemons WHERE daemon_id = $1 FOR NO KEY UPDATE",
                &[&request.daemon_id],
            )
            .await
            .map_err(pg)?;
        if daemon.is_none() {
            return Err(StoreError::UnknownDaemon(request.daemon_id));
        }
        let current = tx
            .query_opt(
                &format!(
                    "SELECT {CONTEXT_COLUMNS} FROM contexts WHERE daemon_id = $1 \
                     AND cache_key = $2 AND retired_ms IS NULL"
                ),
                &[&request.daemon_id, &request.key],
            )
            .await
            .map_err(pg)?
            .as_ref()
            .map(context_from)
            .transpose()?;
        if let Some(record) = &current {
            let command = match record.state {
                ContextState::Fetching => command_in(&tx, &record.command_id).await?,
                _ => None,
            };
            if !request.refresh
                && machine::context_usable(record, command.as_ref(), request.ttl_ms, now_ms)
            {
                tx.rollback().await.map_err(pg)?;
                return Ok(Opened::Existing(record.clone()));
            }
        }
        let queued = tx
            .query_one(
                "SELECT count(*) FROM commands WHERE daemon_id = $1 \
                 AND state IN ('queued', 'delivered')",
                &[&request.daemon_id],
            )
            .await
            .map_err(pg)?;
        let mut command =
            machine::new_command(machine::stream_command(&request), u(&queued, 0), 0, now_ms)?;
        let context_id = u(
            &tx.query_one("SELECT nextval('context_id_seq')", &[])
                .await
                .map_err(pg)?,
            0,
        );
        let daemon_id = request.daemon_id.clone();
        let record = machine::new_context(context_id, request, command.id.clone(), now_ms);
        let bytes = command_bytes(&command) + record.key.len() as u64 + 128;
        self.reserve(&daemon_id, bytes)?;
        let written = async {
            let row = tx
                .query_one(
                    "INSERT INTO commands (command_id, daemon_id, queue_seq, method, params, \
                     stream, state, created_ms, expires_ms) VALUES \
                     ($1, $2, nextval('command_queue_seq'), $3, $4, $5, 'queued', $6, $7) \
                     RETURNING queue_seq",
                    &[
                        &command.id,
                        &command.daemon_id,
                        &command.method,
                        &command.params_json,
                        &command.stream,
                        &i(command.created_at_ms),
                        &i(command.expires_at_ms),
                    ],
                )
                .await
                .map_err(pg)?;
            command.queue_seq = u(&row, 0);
            if let Some(old) = &current {
                tx.execute(
                    "UPDATE contexts SET retired_ms = $2 WHERE context_id = $1",
                    &[&i(old.context_id), &i(now_ms)],
                )
                .await
                .map_err(pg)?;
            }
            tx.execute(
                "INSERT INTO contexts (context_id, daemon_id, cache_key, command_id, state, \
                 created_ms) VALUES ($1, $2, $3, $4, 'fetching', $5)",
                &[
                    &i(record.context_id),
                    &record.daemon_id,
                    &record.key,
                    &record.command_id,
                    &i(now_ms),
                ],
            )
            .await
            .map_err(pg)?;
            Ok::<_, StoreError>(())
        };
        if let Err(err) = written.await {
            self.budget.release(&daemon_id, bytes);
            return Err(err);
        }
        self.commit(tx, started).await?;
        if let Some((count, _)) = self.queued_counts().get_mut(&daemon_id) {
            *count += 1;
        }
        if let Some(old) = &current {
            // Retired: no longer counted against the daemon.
            self.budget.release(&old.daemon_id, old.bytes);
        }
        Ok(Opened::Started(record))
    }

    pub async fn current_context(
        &self,
        daemon_id: &str,
        key: &str,
    ) -> Result<Option<ContextRecord>> {
        let client = self.client().await?;
        client
            .query_opt(
                &format!(
                    "SELECT {CONTEXT_COLUMNS} FROM contexts WHERE daemon_id = $1 \
                     AND cache_key = $2 AND retired_ms IS NULL"
                ),
                &[&daemon_id, &key],
            )
            .await
            .map_err(pg)?
            .as_ref()
            .map(context_from)
            .transpose()
    }

    pub async fn context(&self, context_id: u64) -> Result<Option<ContextRecord>> {
        let client = self.client().await?;
        context_by_id(&client, context_id).await
    }

    pub async fn read_context(
        &self,
        context_id: u64,
        from: u64,
        limit: usize,
    ) -> Result<Option<(ContextRecord, Vec<Vec<u8>>)>> {
        let client = self.client().await?;
        let Some(record) = context_by_id(&client, context_id).await? else {
            return Ok(None);
        };
        let rows = client
            .query(
                "SELECT data FROM context_chunks WHERE context_id = $1 AND chunk >= $2 \
                 ORDER BY chunk LIMIT $3",
                &[&i(context_id), &i(from), &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        Ok(Some((record, rows.iter().map(|row| row.get(0)).collect())))
    }

    // ---- cached responses ----------------------------------------------------------

    /// A hint: committed without waiting for the WAL flush. An identical copy younger
    /// than `RESPONSE_REFRESH_MS` is not written again (`Store` remembers what it wrote
    /// lately and does not even ask).
    pub async fn cache_response(
        &self,
        daemon_id: &str,
        path_and_query: &str,
        response: CachedResponse,
    ) -> Result<bool> {
        let bytes = (response.body.len() + path_and_query.len() + 64) as u64;
        if self.reserve(daemon_id, bytes).is_err() {
            // The copy is a convenience: without room, the daemon keeps its older data.
            return Ok(false);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        tx.batch_execute("SET LOCAL synchronous_commit TO OFF")
            .await
            .map_err(pg)?;
        let written = tx
            .execute(
                "INSERT INTO responses (daemon_id, cache_key, status, headers, body, stored_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (daemon_id, cache_key) DO UPDATE SET status = EXCLUDED.status, \
                 headers = EXCLUDED.headers, body = EXCLUDED.body, stored_ms = EXCLUDED.stored_ms \
                 WHERE NOT (responses.status = EXCLUDED.status \
                   AND responses.headers = EXCLUDED.headers AND responses.body = EXCLUDED.body \
                   AND EXCLUDED.stored_ms - responses.stored_ms < $7)",
                &[
                    &daemon_id,
                    &path_and_query,
                    &i32::from(response.status),
                    &headers_json(&response.headers),
                    &response.body,
                    &i(response.stored_at_ms),
                    &i(super::super::responses::RESPONSE_REFRESH_MS),
                ],
            )
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        if written == 0 {
            self.budget.release(daemon_id, bytes);
        }
        Ok(written > 0)
    }

    pub async fn response(
        &self,
        daemon_id: &str,
        path_and_query: &str,
    ) -> Result<Option<CachedResponse>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT status, headers, body, stored_ms FROM responses \
                 WHERE daemon_id = $1 AND cache_key = $2",
                &[&daemon_id, &path_and_query],
            )
            .await
            .map_err(pg)?;
        row.map(|row| {
            Ok(CachedResponse {
                status: row.get::<_, i32>(0).clamp(0, 999) as u16,
                headers: headers_from(row.get(1))?,
                body: row.get(2),
                stored_at_ms: u(&row, 3),
            })
        })
        .transpose()
    }

    // ---- maintenance ---------------------------------------------------------------

    /// Retention, the contexts' TTL and size cap, and the census, in SQL.
    pub async fn maintain(
        &self,
        work: Maintenance,
        now_ms: u64,
    ) -> Result<Option<(SweepStats, Usage)>> {
        let mut client = self.client().await?;
        // One node at a time: a session lock on this connection, released below, or with
        // the connection when that fails (it is then closed, not pooled).
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&MAINTENANCE_LOCK])
            .await
            .map_err(pg)?
            .get(0);
        if !locked {
            return Ok(None);
        }
        let outcome = self.maintain_locked(&mut client, work, now_ms).await;
        if client
            .execute("SELECT pg_advisory_unlock($1)", &[&MAINTENANCE_LOCK])
            .await
            .is_err()
        {
            drop(deadpool_postgres::Object::take(client));
        }
        outcome.map(Some)
    }

    async fn maintain_locked(
        &self,
        client: &mut deadpool_postgres::Object,
        work: Maintenance,
        now_ms: u64,
    ) -> Result<(SweepStats, Usage)> {
        let started = Instant::now();
        let mut stats = SweepStats::default();
        let policy = &work.retention;
        // The change log: the oldest entries, up to the first one kept by both rules.
        let daemons = client
            .query("SELECT daemon_id, last_change_seq FROM daemons", &[])
            .await
            .map_err(pg)?;
        for row in &daemons {
            let daemon_id: String = row.get(0);
            let keep_from = u(row, 1).saturating_sub(policy.changes_max_entries) + 1;
            let cutoff = now_ms.saturating_sub(policy.changes_max_age_ms);
            stats.changes_removed += client
                .execute(
                    "DELETE FROM changes WHERE daemon_id = $1 AND seq < coalesce( \
                       (SELECT min(seq) FROM changes WHERE daemon_id = $1 AND seq >= $2 \
                        AND stored_ms >= $3), \
                       (SELECT max(seq) + 1 FROM changes WHERE daemon_id = $1))",
                    &[&daemon_id, &i(keep_from), &i(cutoff)],
                )
                .await
                .map_err(pg)?;
        }
        // Commands past their TTL.
        let due = client
            .query(
                "SELECT command_id FROM commands WHERE state IN ('queued', 'delivered') \
                 AND expires_ms <= $1",
                &[&i(now_ms)],
            )
            .await
            .map_err(pg)?;
        for row in &due {
            let command_id: String = row.get(0);
            if let Some(command) = self.command(&command_id, now_ms).await? {
                if command.state == CommandState::Expired && command.finished_at_ms == now_ms {
                    stats.commands_expired += 1;
                }
            }
        }
        stats.commands_purged = client
            .execute(
                "DELETE FROM commands WHERE state IN ('completed', 'failed', 'expired') \
                 AND finished_ms < $1",
                &[&i(now_ms.saturating_sub(policy.results_max_age_ms))],
            )
            .await
            .map_err(pg)?;
        stats.responses_removed = client
            .execute(
                "DELETE FROM responses WHERE stored_ms < $1",
                &[&i(now_ms.saturating_sub(policy.responses_max_age_ms))],
            )
            .await
            .map_err(pg)?;
        self.sweep_contexts(client, &work, now_ms).await?;
        let usage = self.census(client, now_ms).await?;
        self.committed(started);
        Ok((stats, usage))
    }

    /// Retires contexts past their TTL, abandoned, or beyond the total size cap (oldest
    /// first), and deletes those retired longer than the grace period.
    async fn sweep_contexts(
        &self,
        client: &mut deadpool_postgres::Object,
        work: &Maintenance,
        now_ms: u64,
    ) -> Result<()> {
        let rows = client
            .query(
                &format!(
                    "SELECT {CONTEXT_COLUMNS} FROM contexts WHERE retired_ms IS NULL \
                     ORDER BY created_ms"
                ),
                &[],
            )
            .await
            .map_err(pg)?;
        let listed = rows.iter().map(context_from).collect::<Result<Vec<_>>>()?;
        let mut total: u64 = listed.iter().map(|r| r.bytes).sum();
        for record in &listed {
            let command = match record.state {
                ContextState::Fetching => command_in(&*client, &record.command_id).await?,
                _ => None,
            };
            let abandoned = machine::context_abandoned(record, command.as_ref(), now_ms);
            let finished = record.state != ContextState::Fetching || abandoned;
            let expired =
                finished && record.created_at_ms.saturating_add(work.context_ttl_ms) <= now_ms;
            let over_budget = finished && total > work.contexts_max_bytes;
            if expired || over_budget || abandoned {
                let retired = client
                    .execute(
                        "UPDATE contexts SET retired_ms = $2 WHERE context_id = $1 \
                         AND retired_ms IS NULL",
                        &[&i(record.context_id), &i(now_ms)],
                    )
                    .await
                    .map_err(pg)?;
                // Retired meanwhile by a new fetch, which gave its bytes back then.
                if retired == 1 {
                    self.budget.release(&record.daemon_id, record.bytes);
                }
                total -= record.bytes;
            }
        }
        client
            .execute(
                "DELETE FROM contexts WHERE retired_ms IS NOT NULL AND retired_ms + $1 <= $2",
                &[&i(work.context_garbage_grace_ms), &i(now_ms)],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    /// Measures every table and each daemon's bytes, trims daemons over their budget, and
    /// resets the budget's counts.
    async fn census(&self, client: &mut deadpool_postgres::Object, now_ms: u64) -> Result<Usage> {
        self.budget.begin_census();
        let mut usage = Usage::default();
        for state in ["queued", "delivered", "completed", "failed", "expired"] {
            usage.commands.insert(state, 0);
        }
        for row in client
            .query("SELECT state, count(*) FROM commands GROUP BY state", &[])
            .await
            .map_err(pg)?
        {
            let state = state_of(row.get(0))?.as_str();
            usage.commands.insert(state, u(&row, 1));
        }
        for row in client
            .query(
                "SELECT relname, n_live_tup, pg_total_relation_size(relid) \
                 FROM pg_stat_user_tables WHERE schemaname = current_schema()",
                &[],
            )
            .await
            .map_err(pg)?
        {
            usage.trees.insert(
                row.get(0),
                TreeUsage {
                    entries: u(&row, 1),
                    bytes: u(&row, 2),
                },
            );
        }
        let per_daemon = "SELECT daemon_id, sum(bytes)::bigint FROM ( \
              SELECT daemon_id, octet_length(data) + octet_length(kind) + 48 AS bytes FROM changes \
              UNION ALL SELECT daemon_id, octet_length(params) + coalesce(octet_length(result), 0) \
                + coalesce(octet_length(error), 0) + 128 FROM commands \
              UNION ALL SELECT daemon_id, octet_length(body) + octet_length(cache_key) + 64 \
                FROM responses \
              UNION ALL SELECT daemon_id, bytes + 128 FROM contexts WHERE retired_ms IS NULL \
            ) AS b GROUP BY daemon_id";
        for row in client.query(per_daemon, &[]).await.map_err(pg)? {
            usage.daemon_bytes.insert(row.get(0), u(&row, 1));
        }
        let max = self.budget.max_bytes();
        if max > 0 {
            let over: Vec<(String, u64)> = usage
                .daemon_bytes
                .iter()
                .filter(|(_, &bytes)| bytes > max)
                .map(|(d, &b)| (d.clone(), b))
                .collect();
            for (daemon_id, bytes) in over {
                let freed = self
                    .trim_daemon(client, &daemon_id, bytes - max, now_ms)
                    .await?;
                usage.trimmed_bytes += freed;
                let left = bytes.saturating_sub(freed);
                if left > max {
                    usage.over_budget.insert(daemon_id.clone());
                }
                tracing::warn!(
                    daemon_id = %daemon_id, bytes, budget = max, freed,
                    "daemon over its disk budget: its oldest cached responses, contexts, \
                     finished commands and change-log entries were dropped"
                );
                usage.daemon_bytes.insert(daemon_id, left);
            }
        }
        self.budget.end_census(usage.daemon_bytes.clone());
        Ok(usage)
    }

    /// Frees at least `excess` bytes of a daemon's reclaimable data if it can: cached
    /// responses, then ended contexts, then finished commands, then the change log, each
    /// oldest first. Returns the bytes freed.
    async fn trim_daemon(
        &self,
        client: &mut deadpool_postgres::Object,
        daemon_id: &str,
        excess: u64,
        now_ms: u64,
    ) -> Result<u64> {
        // As sled trims (`usage::trim_daemon`): cached copies, ended contexts, the change
        // log, and last finished commands at least `FINISHED_MIN_AGE_MS` old (a client may
        // still read a result, or retry its Idempotency-Key, for that long).
        let steps: [&str; 4] = [
            "WITH gone AS (DELETE FROM responses WHERE (daemon_id, cache_key) IN ( \
               SELECT daemon_id, cache_key FROM responses WHERE daemon_id = $1 \
               ORDER BY stored_ms LIMIT 64) \
             RETURNING octet_length(body) + octet_length(cache_key) + 64 AS bytes) \
             SELECT coalesce(sum(bytes), 0)::bigint, count(*) FROM gone",
            "WITH gone AS (UPDATE contexts SET retired_ms = $2 WHERE context_id IN ( \
               SELECT context_id FROM contexts WHERE daemon_id = $1 AND retired_ms IS NULL \
               AND state <> 'fetching' ORDER BY created_ms LIMIT 64) \
             RETURNING bytes + 128 AS bytes) \
             SELECT coalesce(sum(bytes), 0)::bigint, count(*) FROM gone",
            "WITH gone AS (DELETE FROM changes WHERE (daemon_id, seq) IN ( \
               SELECT daemon_id, seq FROM changes WHERE daemon_id = $1 ORDER BY seq LIMIT 256) \
             RETURNING octet_length(data) + octet_length(kind) + 48 AS bytes) \
             SELECT coalesce(sum(bytes), 0)::bigint, count(*) FROM gone",
            "WITH gone AS (DELETE FROM commands WHERE command_id IN ( \
               SELECT command_id FROM commands WHERE daemon_id = $1 \
               AND state IN ('completed', 'failed', 'expired') AND finished_ms <= $2 \
               ORDER BY finished_ms LIMIT 256) \
             RETURNING octet_length(params) + coalesce(octet_length(result), 0) \
               + coalesce(octet_length(error), 0) + 128 AS bytes) \
             SELECT coalesce(sum(bytes), 0)::bigint, count(*) FROM gone",
        ];
        let mut freed = 0;
        for step in steps {
            while freed < excess {
                // `$2`: now for the contexts, the newest finish a command may have for the
                // commands (the last step).
                let old_enough = i(now_ms.saturating_sub(FINISHED_MIN_AGE_MS));
                let second = match step.contains("FROM commands") {
                    true => old_enough,
                    false => i(now_ms),
                };
                let params: [&(dyn ToSql + Sync); 2] = [&daemon_id, &second];
                let used = if step.contains("$2") {
                    &params[..]
                } else {
                    &params[..1]
                };
                let row = client.query_one(step, used).await.map_err(pg)?;
                freed += u(&row, 0);
                if u(&row, 1) == 0 {
                    break;
                }
            }
        }
        Ok(freed)
    }
}

/// What a command takes against its daemon's budget (roughly as the census counts it).
fn command_bytes(command: &CommandRecord) -> u64 {
    (command.params_json.len() + command.method.len() + command.id.len() + 128) as u64
}

async fn find_idempotent(
    client: &deadpool_postgres::Object,
    new: &NewCommand,
) -> Result<Option<CommandRecord>> {
    let Some((key_id, key)) = &new.idempotency else {
        return Ok(None);
    };
    let select = client
        .prepare_cached(&format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE daemon_id = $1 \
             AND idempotency_key_id = $2 AND idempotency_key = $3"
        ))
        .await
        .map_err(pg)?;
    client
        .query_opt(&select, &[&new.daemon_id, key_id, key])
        .await
        .map_err(pg)?
        .as_ref()
        .map(command_from)
        .transpose()
}

/// Creates the daemon's row unless it has one.
async fn create_daemon(
    client: &impl deadpool_postgres::GenericClient,
    daemon_id: &str,
    now_ms: u64,
) -> Result<()> {
    client
        .execute(
            "INSERT INTO daemons (daemon_id, created_ms) VALUES ($1, $2) \
             ON CONFLICT (daemon_id) DO NOTHING",
            &[&daemon_id, &i(now_ms)],
        )
        .await
        .map_err(pg)?;
    Ok(())
}

async fn daemon_in(
    client: &impl deadpool_postgres::GenericClient,
    daemon_id: &str,
) -> Result<Option<DaemonRecord>> {
    let row = client
        .query_opt(
            &format!("SELECT {DAEMON_COLUMNS} FROM daemons WHERE daemon_id = $1"),
            &[&daemon_id],
        )
        .await
        .map_err(pg)?;
    Ok(row.as_ref().map(daemon_from))
}

async fn command_in(
    client: &impl deadpool_postgres::GenericClient,
    command_id: &str,
) -> Result<Option<CommandRecord>> {
    client
        .query_opt(
            &format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE command_id = $1"),
            &[&command_id],
        )
        .await
        .map_err(pg)?
        .as_ref()
        .map(command_from)
        .transpose()
}

async fn context_by_id(
    client: &deadpool_postgres::Object,
    context_id: u64,
) -> Result<Option<ContextRecord>> {
    client
        .query_opt(
            &format!("SELECT {CONTEXT_COLUMNS} FROM contexts WHERE context_id = $1"),
            &[&i(context_id)],
        )
        .await
        .map_err(pg)?
        .as_ref()
        .map(context_from)
        .transpose()
}

/// The daemon's unfinished commands in queue order, locked for the transaction.
async fn unfinished_locked(tx: &Transaction<'_>, daemon_id: &str) -> Result<Vec<Row>> {
    let select = tx
        .prepare_cached(&format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE daemon_id = $1 \
             AND state IN ('queued', 'delivered') ORDER BY queue_seq FOR UPDATE"
        ))
        .await
        .map_err(pg)?;
    tx.query(&select, &[&daemon_id]).await.map_err(pg)
}

/// Writes back what the machine changed in a command.
async fn update_command(tx: &Transaction<'_>, command: &CommandRecord) -> Result<()> {
    let update = tx
        .prepare_cached(
            "UPDATE commands SET state = $2, lease_until_ms = $3, deliveries = $4, \
             finished_ms = $5, result = $6, error = $7 WHERE command_id = $1",
        )
        .await
        .map_err(pg)?;
    tx.execute(
        &update,
        &[
            &command.id,
            &command.state.as_str(),
            &i(command.lease_until_ms),
            &(command.deliveries.min(i32::MAX as u32) as i32),
            &i(command.finished_at_ms),
            &command.result_json,
            &command.error_json,
        ],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

async fn update_context(tx: &Transaction<'_>, record: &ContextRecord) -> Result<()> {
    let update = tx
        .prepare_cached(
            "UPDATE contexts SET state = $2, status = $3, headers = $4, chunks = $5, \
             bytes = $6, finished_ms = $7, error = $8 WHERE context_id = $1",
        )
        .await
        .map_err(pg)?;
    tx.execute(
        &update,
        &[
            &i(record.context_id),
            &context_state_name(record.state),
            &record.status.map(i32::from),
            &headers_json(&record.headers),
            &i(record.chunks),
            &i(record.bytes),
            &i(record.finished_at_ms),
            &record.error_json,
        ],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

/// Ends a stream command with its context ([`machine::stream_finish`]).
async fn finish_stream_command(
    tx: &Transaction<'_>,
    command: &mut CommandRecord,
    record: &ContextRecord,
    now_ms: u64,
) -> Result<()> {
    if let Some((state, result, error)) = machine::stream_finish(record) {
        machine::finish(command, state, result, error, now_ms);
        update_command(tx, command).await?;
    }
    Ok(())
}
