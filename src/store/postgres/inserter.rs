//! Group insert for new commands: commands queued by concurrent requests go into
//! PostgreSQL together, one `INSERT … SELECT … FROM unnest(…)` and one `COMMIT` (one round
//! trip, one WAL flush) for all that arrived while the previous statement ran, where each
//! used to pay its own. It is the sled store's group commit on PostgreSQL's terms: a batch
//! grows with the load, and a lone request waits for nobody.
//!
//! The statements run on a spawned task, never on a request's future: a client that
//! disconnects (its handler dropped) must not take the commands of the others in its batch
//! down with it, nor leave them unanswered after PostgreSQL committed them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use deadpool_postgres::Pool;
use tokio::sync::oneshot;

use super::backend::{i, pg, pool_err, u, Commits};
use crate::store::{CommandRecord, Result, StoreError};

/// Most commands one statement inserts.
const MAX_BATCH: usize = 256;

/// Queues many commands at once (arrays of their fields, in the same order): each whose
/// daemon exists and whose `Idempotency-Key`, if it has one, is not taken. Returns those
/// inserted, with their queue positions; `nextval` numbers them in array order.
const ENQUEUE_MANY: &str = "INSERT INTO commands (command_id, daemon_id, queue_seq, method, \
    params, stream, state, created_ms, expires_ms, idempotency_key_id, idempotency_key) \
    SELECT c.id, c.daemon, nextval('command_queue_seq'), c.method, c.params, c.stream, \
      'queued', c.created, c.expires, c.key_id, c.key \
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bool[], $6::int8[], \
      $7::int8[], $8::text[], $9::text[]) WITH ORDINALITY \
      AS c(id, daemon, method, params, stream, created, expires, key_id, key, n) \
    WHERE EXISTS (SELECT 1 FROM daemons d WHERE d.daemon_id = c.daemon) \
    ORDER BY c.n \
    ON CONFLICT (daemon_id, idempotency_key_id, idempotency_key) \
      WHERE idempotency_key IS NOT NULL DO NOTHING \
    RETURNING command_id, queue_seq";

/// Inserts new commands in batches (see the module comment).
pub(super) struct Inserter {
    shared: Arc<Shared>,
}

struct Shared {
    pool: Pool,
    commits: Arc<Commits>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    waiting: Vec<Waiting>,
    /// A task is inserting batches; commands that arrive meanwhile wait for it.
    inserting: bool,
}

struct Waiting {
    command: CommandRecord,
    /// The command's queue position once committed; `None` when its daemon does not exist
    /// or its `Idempotency-Key` is taken.
    done: oneshot::Sender<Result<Option<u64>>>,
}

impl Inserter {
    pub(super) fn new(pool: Pool, commits: Arc<Commits>) -> Inserter {
        Inserter {
            shared: Arc::new(Shared {
                pool,
                commits,
                state: Mutex::default(),
            }),
        }
    }

    /// Inserts `command` with whatever else is waiting, and answers once the statement
    /// that inserted it committed: its queue position, or `None` when its daemon does not
    /// exist or its `Idempotency-Key` is taken.
    pub(super) async fn insert(&self, command: CommandRecord) -> Result<Option<u64>> {
        let (done, answer) = oneshot::channel();
        let start = {
            let mut state = self.shared.lock();
            state.waiting.push(Waiting { command, done });
            !std::mem::replace(&mut state.inserting, true)
        };
        if start {
            tokio::spawn(self.shared.clone().insert_waiting());
        }
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts what is waiting, a batch per statement, until nothing is.
    async fn insert_waiting(self: Arc<Self>) {
        // Should the task end otherwise (a panic, the runtime shutting down), the commands
        // left waiting are answered, and the next command starts a task again. Not after
        // the loop: by then a new task may be inserting, and what waits is its.
        struct Inserting(Arc<Shared>, bool);
        impl Drop for Inserting {
            fn drop(&mut self) {
                if self.1 {
                    return;
                }
                let mut state = self.0.lock();
                state.inserting = false;
                for waiting in state.waiting.drain(..) {
                    let _ = waiting.done.send(Err(StoreError::Closed));
                }
            }
        }
        let mut inserting = Inserting(self, false);
        loop {
            let batch: Vec<Waiting> = {
                let mut state = inserting.0.lock();
                let take = state.waiting.len().min(MAX_BATCH);
                if take == 0 {
                    // Under the lock: a command arriving after this starts a task.
                    state.inserting = false;
                    break;
                }
                state.waiting.drain(..take).collect()
            };
            inserting.0.insert_batch(batch).await;
        }
        inserting.1 = true;
    }

    /// One statement for `batch`; each command's request gets its own outcome.
    async fn insert_batch(&self, batch: Vec<Waiting>) {
        let started = Instant::now();
        let commands: Vec<&CommandRecord> = batch.iter().map(|w| &w.command).collect();
        match self.run(&commands).await {
            Ok(inserted) => {
                self.commits.committed(started, batch.len() as u64);
                for waiting in batch {
                    let queue_seq = inserted.get(&waiting.command.id).copied();
                    let _ = waiting.done.send(Ok(queue_seq));
                }
            }
            Err(err) => {
                for waiting in batch {
                    let _ = waiting.done.send(Err(err.clone()));
                }
            }
        }
    }

    async fn run(&self, commands: &[&CommandRecord]) -> Result<HashMap<String, u64>> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let insert = client.prepare_cached(ENQUEUE_MANY).await.map_err(pg)?;
        let texts = |field: fn(&CommandRecord) -> &str| -> Vec<&str> {
            commands.iter().map(|c| field(c)).collect()
        };
        let (ids, daemons) = (texts(|c| &c.id), texts(|c| &c.daemon_id));
        let (methods, params) = (texts(|c| &c.method), texts(|c| &c.params_json));
        let streams: Vec<bool> = commands.iter().map(|c| c.stream).collect();
        let created: Vec<i64> = commands.iter().map(|c| i(c.created_at_ms)).collect();
        let expires: Vec<i64> = commands.iter().map(|c| i(c.expires_at_ms)).collect();
        let (key_ids, keys): (Vec<Option<&str>>, Vec<Option<&str>>) = commands
            .iter()
            .map(|c| {
                c.idempotency
                    .as_ref()
                    .map(|(id, key)| (id.as_str(), key.as_str()))
                    .unzip()
            })
            .unzip();
        let rows = client
            .query(
                &insert,
                &[
                    &ids, &daemons, &methods, &params, &streams, &created, &expires, &key_ids,
                    &keys,
                ],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|row| (row.get::<_, String>(0), u(row, 1)))
            .collect())
    }
}
