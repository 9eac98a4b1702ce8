//! The agent: the daemon's half of the sync protocol, for a daemon that does not speak it
//! itself. `syncrelay agent` runs it next to a local HTTP daemon; a Rust daemon can embed
//! it as a library with its own [`CommandHandler`] and publish its events through
//! [`EventPublisher`].
//!
//! One session per relay connection, three loops sharing one HTTP/2 connection:
//! - downlink: brings commands the moment they are queued;
//! - uplink: uploads the durable outbox (daemon events) and drops what the relay's
//!   `last_update_seq` acknowledges;
//! - results: posts finished results (and streamed responses, chunk by chunk) until the
//!   relay accepts them.
//!
//! By default all three share one `POST /sync/stream` (one HTTP/2 stream for the whole
//! connection; see [`stream`]); against a relay that does not offer it, or with
//! `sync = "poll"`, the downlink is a long poll and the others are requests of their own.
//!
//! Commands run concurrently up to `concurrency`. A redelivered command (same id) is never
//! executed twice: its stored result is sent again. A session that fails for a transient
//! reason (relay down or restarting, network gone, 5xx, superseded) is replaced after an
//! exponential backoff with jitter; only a rejected key stops the agent.

mod backoff;
pub mod config;
mod events;
pub mod handler;
mod link;
mod status;
mod stream;
pub mod target;

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::StreamExt;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{split_urls, AgentConfig, RawAgent, SyncMode};
pub use handler::{Command, CommandHandler, Outcome, StreamReply};
pub use target::HttpTarget;

use backoff::Backoff;
use link::{LinkError, RelayLink, WireCommand};
use status::StatusLog;
use stream::StreamLink;

use crate::protocol::{ResultEntry, ResultsResponse, StreamUp, Update};
use crate::store::{now_ms, AgentStore, OutboxEvent, StoreError, StoredResult};

/// A session that ends sooner than this after its connect, with several relay URLs, moves
/// the agent on to the next URL.
const SHORT_SESSION: Duration = Duration::from_secs(10);
/// Updates uploaded per poll (the relay accepts up to 1000 by default).
const UPLOAD_BATCH: usize = 100;
/// Bytes of results or updates sent in one request (the relay accepts 16 MiB bodies by
/// default).
const MAX_POST_BYTES: usize = 4 << 20;
/// Results posted per request.
const RESULTS_BATCH: usize = 100;
/// Results posts (or stream lines) out at once.
const RESULTS_IN_FLIGHT: usize = 8;
/// Longest wait for running commands at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Body pieces read ahead of the chunk being posted.
const STREAM_READ_AHEAD: usize = 64;
/// How often old results are forgotten.
const PRUNE_INTERVAL: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Rejected(String),
    #[error("invalid agent setup: {0}")]
    Setup(String),
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    #[error("agent state: {0}")]
    Store(#[from] StoreError),
}

/// Adds events to the outbox, for daemons that embed the agent.
#[derive(Clone)]
pub struct EventPublisher {
    store: Arc<AgentStore>,
    outbox_tx: watch::Sender<u64>,
}

impl EventPublisher {
    /// Stores the events durably; they reach the relay in this order, exactly once.
    /// Events the relay would refuse (an empty or over-long `kind`, a timestamp that is not
    /// RFC 3339) are refused here, so that one bad event can never block the outbox.
    pub async fn publish(&self, events: &[OutboxEvent]) -> Result<(), AgentError> {
        for (index, event) in events.iter().enumerate() {
            if event.kind.is_empty() || event.kind.len() > 256 {
                return Err(AgentError::InvalidEvent(format!(
                    "event {index}: kind must be 1 to 256 bytes"
                )));
            }
            if event
                .timestamp
                .as_deref()
                .is_some_and(|t| crate::protocol::parse_rfc3339(t).is_none())
            {
                return Err(AgentError::InvalidEvent(format!(
                    "event {index}: timestamp is not RFC 3339"
                )));
            }
            if let Err(limit) = crate::protocol::json_within_limits(
                event.data_json.as_bytes(),
                crate::protocol::MAX_CARRIED_JSON_DEPTH,
            ) {
                return Err(AgentError::InvalidEvent(format!(
                    "event {index}: data is {limit}"
                )));
            }
            if serde_json::from_str::<serde::de::IgnoredAny>(&event.data_json).is_err() {
                return Err(AgentError::InvalidEvent(format!(
                    "event {index}: data is not JSON"
                )));
            }
        }
        let seq = self.store.append_events(events, None)?;
        self.store.commit().await?;
        self.outbox_tx.send_replace(seq);
        Ok(())
    }
}

pub struct Agent {
    config: AgentConfig,
    shared: Arc<Shared>,
}

/// What the loops share.
struct Shared {
    config: AgentConfig,
    store: Arc<AgentStore>,
    link: RelayLink,
    handler: Arc<dyn CommandHandler>,
    status: Arc<StatusLog>,
    outbox_tx: watch::Sender<u64>,
    permits: Arc<Semaphore>,
    /// Every command task, so that none outlives `run` (and the store it writes to).
    commands: TaskTracker,
    /// Cancels command tasks still running when the shutdown grace is over.
    abandon: CancellationToken,
    /// Commands being executed now. Guards only the set.
    running: Mutex<HashSet<String>>,
    /// Ids of results not yet accepted by the relay, oldest first. Guards only the queue.
    unsent: Mutex<VecDeque<String>>,
    /// Results of reads (mirrored GET/HEAD), kept in memory only until the relay takes
    /// them: running a read twice is harmless, so it is not worth an fsync.
    volatile: Mutex<std::collections::HashMap<String, StoredResult>>,
    results_ready: Notify,
    /// The session's sync stream, while one is open: results and chunks go over it.
    stream: Mutex<Option<Arc<StreamLink>>>,
    /// The relay refused `/sync/stream` once: this agent polls from then on.
    stream_refused: AtomicBool,
}

impl Agent {
    /// An agent that executes commands with `handler`.
    pub fn new(config: AgentConfig, handler: Arc<dyn CommandHandler>) -> Result<Agent, AgentError> {
        let store = Arc::new(AgentStore::open(&config.state_dir)?);
        let link = RelayLink::new(&config).map_err(AgentError::Setup)?;
        let unsent = store
            .undelivered_results()?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let shared = Arc::new(Shared {
            store,
            link,
            handler,
            status: Arc::new(StatusLog::default()),
            outbox_tx: watch::Sender::new(0),
            permits: Arc::new(Semaphore::new(config.concurrency)),
            commands: TaskTracker::new(),
            abandon: CancellationToken::new(),
            running: Mutex::new(HashSet::new()),
            unsent: Mutex::new(unsent),
            volatile: Mutex::default(),
            results_ready: Notify::new(),
            stream: Mutex::default(),
            stream_refused: AtomicBool::new(false),
            config: config.clone(),
        });
        Ok(Agent { config, shared })
    }

    /// An agent for a local HTTP daemon at `config.target`, as `syncrelay agent` runs.
    pub fn for_http_target(config: AgentConfig) -> Result<Agent, AgentError> {
        let handler = Arc::new(HttpTarget::new(&config));
        Agent::new(config, handler)
    }

    pub fn publisher(&self) -> EventPublisher {
        EventPublisher {
            store: self.shared.store.clone(),
            outbox_tx: self.shared.outbox_tx.clone(),
        }
    }

    /// Runs until `shutdown` resolves (Ok) or the relay rejects the key (Err).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        let token = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(events) = &self.config.events {
            let url = self
                .config
                .target
                .join(&format!(
                    "{}/",
                    self.config.target.path().trim_end_matches('/')
                ))
                .and_then(|base| base.join(events))
                .map_err(|err| AgentError::Setup(format!("events path: {err}")))?;
            let watcher = events::EventWatcher {
                url,
                store: self.shared.store.clone(),
                outbox_tx: self.shared.outbox_tx.clone(),
                status: self.shared.status.clone(),
            };
            tasks.spawn(watcher.run(token.clone()));
        }
        tasks.spawn(prune_results(self.shared.clone(), token.clone()));
        let outcome = tokio::select! {
            outcome = self.shared.clone().sessions() => Err(outcome),
            _ = shutdown => Ok(()),
        };
        token.cancel();
        while tasks.join_next().await.is_some() {}
        // Commands in flight may finish within the grace period; the rest are abandoned
        // (the relay hands them out again: delivery is at-least-once).
        self.shared.commands.close();
        let grace = self.config.request_timeout.min(SHUTDOWN_GRACE);
        if tokio::time::timeout(grace, self.shared.commands.wait())
            .await
            .is_err()
        {
            self.shared.abandon.cancel();
            self.shared.commands.wait().await;
        }
        self.shared.store.close()?;
        outcome
    }
}

impl Shared {
    /// Session after session until the relay rejects the key.
    async fn sessions(self: Arc<Self>) -> AgentError {
        let mut backoff = Backoff::new();
        loop {
            let url = self.link.base().clone();
            let mut connected_at = None;
            let err = self.clone().session(&mut backoff, &mut connected_at).await;
            // A node that cannot be connected to (however long the attempt took), or whose
            // session fails soon after its connect (its stream refused, its database
            // away), is left for the next URL; the connect there releases the leases held
            // through this one. A long session that ends comes back to the same node first.
            let failed_soon = connected_at.is_none_or(|at: Instant| at.elapsed() < SHORT_SESSION);
            if !matches!(err, LinkError::Rejected(_) | LinkError::Superseded)
                && self.link.has_alternatives()
                && failed_soon
            {
                let next = self.link.rotate();
                // Whether a node serves /sync/stream is its own: ask the next one afresh.
                self.stream_refused.store(false, Ordering::Relaxed);
                tracing::info!(failed = %url, %next, error = %err, "trying the next relay URL");
            }
            match err {
                LinkError::Rejected(message) => {
                    self.status
                        .set("relay", &format!("rejected by the relay: {message}"));
                    return AgentError::Rejected(message);
                }
                LinkError::Superseded => self.status.set(
                    "relay",
                    "superseded: another connection for this daemon id took over",
                ),
                LinkError::Transient(message) | LinkError::Refused(message) => self
                    .status
                    .set("relay", &format!("disconnected from {url}: {message}")),
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// One connection's life; `connected_at` is set once its connect succeeded.
    async fn session(
        self: Arc<Self>,
        backoff: &mut Backoff,
        connected_at: &mut Option<Instant>,
    ) -> LinkError {
        let hello = match self.link.connect().await {
            Ok(hello) => hello,
            Err(err) => return err,
        };
        *connected_at = Some(Instant::now());
        backoff.reset();
        if let Err(err) = self.store.acknowledge(hello.last_update_seq) {
            return LinkError::Transient(format!("agent state: {err}"));
        }
        self.status
            .set("relay", &format!("connected to {}", self.link.base()));
        let poll_timeout = self
            .config
            .poll_timeout
            .min(Duration::from_secs(hello.poll_timeout_max.max(1)));
        let connection_id = hello.connection_id;
        let offered = hello.transports.iter().any(|t| t == "stream");
        if self.config.sync == SyncMode::Stream
            && offered
            && !self.stream_refused.load(Ordering::Relaxed)
        {
            match self.link.open_stream(&connection_id).await {
                Ok(Some((response, writer))) => {
                    return self
                        .clone()
                        .stream_session(&connection_id, response, writer)
                        .await
                }
                Ok(None) => self.stream_refused.store(true, Ordering::Relaxed),
                Err(err) => return err,
            }
        }
        tokio::select! {
            err = self.clone().downlink(&connection_id, poll_timeout) => err,
            err = self.clone().uplink(&connection_id) => err,
            err = self.clone().post_results() => err,
        }
    }

    /// A session on one sync stream: commands arrive on it, and updates, results and
    /// chunks go out on it, until it ends.
    async fn stream_session(
        self: Arc<Self>,
        connection_id: &str,
        response: reqwest::Response,
        writer: tokio::sync::mpsc::Sender<bytes::Bytes>,
    ) -> LinkError {
        let link = Arc::new(StreamLink::new(writer));
        *self.lock_stream() = Some(link.clone());
        self.status.set(
            "relay",
            &format!("connected to {} (one HTTP/2 stream)", self.link.base()),
        );
        let err = tokio::select! {
            err = stream::read_lines(response, &link, |commands| self.dispatch(commands)) => err,
            err = self.clone().uplink(connection_id) => err,
            err = self.clone().post_results() => err,
        };
        self.lock_stream().take();
        link.close().await;
        err
    }

    fn lock_stream(&self) -> std::sync::MutexGuard<'_, Option<Arc<StreamLink>>> {
        self.stream.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Uploads updates: a line on the session's stream, or a poll that does not wait.
    /// Answers the durable `last_update_seq` and any commands the poll brought.
    async fn upload(
        &self,
        connection_id: &str,
        updates: Vec<Update>,
    ) -> Result<(u64, Vec<WireCommand>), LinkError> {
        let stream = self.lock_stream().clone();
        if let Some(stream) = stream {
            let up = StreamUp {
                updates: Some(updates),
                results: None,
            };
            let down = stream.call(&up).await?;
            let seq = down.last_update_seq.ok_or_else(|| {
                LinkError::Transient("the relay's answer lacks last_update_seq".into())
            })?;
            return Ok((seq, Vec::new()));
        }
        let reply = self
            .link
            .poll(connection_id, updates, false, Duration::ZERO)
            .await?;
        Ok((reply.last_update_seq, reply.commands))
    }

    /// Sends results or chunks: a line on the session's stream, or a request.
    async fn send_results(
        &self,
        results: Vec<Box<RawValue>>,
    ) -> Result<ResultsResponse, LinkError> {
        let stream = self.lock_stream().clone();
        let Some(stream) = stream else {
            return self.link.results(results).await;
        };
        let up = StreamUp {
            updates: None,
            results: Some(results),
        };
        let down = stream.call(&up).await?;
        Ok(ResultsResponse {
            accepted: down.accepted.unwrap_or_default(),
            unknown: down.unknown.unwrap_or_default(),
        })
    }

    /// Long polls for commands.
    async fn downlink(self: Arc<Self>, connection_id: &str, timeout: Duration) -> LinkError {
        loop {
            match self
                .link
                .poll(connection_id, Vec::new(), true, timeout)
                .await
            {
                Ok(reply) => self.dispatch(reply.commands),
                Err(err) => return err,
            }
        }
    }

    /// Uploads the outbox whenever it holds unacknowledged events.
    async fn uplink(self: Arc<Self>, connection_id: &str) -> LinkError {
        let mut outbox_rx = self.outbox_tx.subscribe();
        loop {
            let pending = match self.store.pending(UPLOAD_BATCH) {
                Ok(pending) => pending,
                Err(err) => return LinkError::Transient(format!("agent state: {err}")),
            };
            if pending.is_empty() {
                if outbox_rx.changed().await.is_err() {
                    return LinkError::Transient("outbox closed".into());
                }
                continue;
            }
            // What the relay stores must already be durable here (see `commit_visible`):
            // usually it is, as the events watcher wakes this loop after its commit.
            if let Err(err) = self.store.commit_visible().await {
                return LinkError::Transient(format!("agent state: {err}"));
            }
            let mut bytes = 0;
            let updates = pending
                .into_iter()
                .take_while(|(_, event)| {
                    // At least one; then stay well inside the relay's body limit.
                    let fits = bytes == 0 || bytes + event.data_json.len() <= MAX_POST_BYTES;
                    bytes += event.data_json.len().max(1);
                    fits
                })
                .map(|(seq, event)| Update {
                    kind: event.kind,
                    // Stored as the daemon sent it: passed on as is, not parsed and re-written.
                    data: RawValue::from_string(event.data_json).ok(),
                    timestamp: event.timestamp,
                    seq: Some(seq),
                })
                .collect();
            match self.upload(connection_id, updates).await {
                Ok((last_update_seq, commands)) => {
                    if let Err(err) = self.store.acknowledge(last_update_seq) {
                        return LinkError::Transient(format!("agent state: {err}"));
                    }
                    self.dispatch(commands);
                }
                Err(err) => return err,
            }
        }
    }

    /// Starts each command, unless it runs already or has a result (then resends it).
    fn dispatch(self: &Arc<Self>, commands: Vec<WireCommand>) {
        for command in commands {
            let command = Command {
                id: command.id.into_owned(),
                method: command.method.into_owned(),
                params: serde_json::from_str(command.params.get()).unwrap_or(Value::Null),
                stream: command.stream,
            };
            if self.lock_running().contains(&command.id) {
                continue;
            }
            match self.store.result(&command.id) {
                Ok(Some(_)) => {
                    // Redelivered: the relay lacks our result. Send it again.
                    self.queue_result(command.id);
                    continue;
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "agent state unreadable; executing anyway")
                }
            }
            // Claim it in the same step as the check: downlink and uplink both dispatch.
            if !self.lock_running().insert(command.id.clone()) {
                continue;
            }
            let read = is_read(&command.method, &command.params, command.stream);
            let shared = self.clone();
            self.commands.spawn(async move {
                let id = command.id.clone();
                let run = async {
                    let Ok(_permit) = shared.permits.clone().acquire_owned().await else {
                        return;
                    };
                    let outcome = shared.handler.handle(command).await;
                    shared.finish(&id, outcome, read).await;
                };
                tokio::select! {
                    _ = run => {}
                    _ = shared.abandon.cancelled() => {}
                }
                shared.lock_running().remove(&id);
            });
        }
    }

    /// Stores a command's outcome and hands it to the results loop; streams are posted
    /// chunk by chunk here.
    async fn finish(&self, command_id: &str, outcome: Outcome, read: bool) {
        let (result_json, error_json) = match outcome {
            Outcome::Result(value) => (Some(value.to_string()), None),
            Outcome::Error { code, message } => (
                None,
                Some(json!({ "code": code, "message": message }).to_string()),
            ),
            Outcome::Stream(reply) => {
                self.post_stream(command_id, reply).await;
                return;
            }
        };
        let stored = StoredResult {
            result_json,
            error_json,
            finished_at_ms: now_ms(),
            delivered: false,
        };
        if read {
            self.lock_volatile().insert(command_id.to_owned(), stored);
            self.queue_result(command_id.to_owned());
            return;
        }
        // On disk before it is posted: should the agent die before the relay takes it, the
        // restarted agent posts it again instead of executing the command a second time.
        let kept = match self.store.put_result(command_id, &stored) {
            Ok(()) => self.store.commit().await,
            Err(err) => Err(err),
        };
        if let Err(err) = kept {
            tracing::warn!(error = %err, "cannot keep a result in the agent state");
        }
        self.queue_result(command_id.to_owned());
    }

    fn lock_volatile(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, StoredResult>> {
        self.volatile.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queue_result(&self, command_id: String) {
        let mut unsent = self.lock_unsent();
        if !unsent.contains(&command_id) {
            unsent.push_back(command_id);
        }
        drop(unsent);
        self.results_ready.notify_one();
    }

    /// Posts stored results until the relay has taken each (accepted, or unknown to it).
    /// Up to [`RESULTS_IN_FLIGHT`] posts (or stream lines) are out at once, so a result
    /// that finishes while another post is in flight goes at once instead of waiting a
    /// round trip behind it.
    async fn post_results(self: Arc<Self>) -> LinkError {
        let slots = Arc::new(Semaphore::new(RESULTS_IN_FLIGHT));
        // Ids in a post still in flight: not sent again meanwhile.
        let sending: Arc<Mutex<HashSet<String>>> = Arc::default();
        // Dropped with this future (the session ended): the posts in flight end with it.
        let mut posts = tokio::task::JoinSet::new();
        loop {
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => slot.expect("never closed"),
                Some(Ok(Err(err))) = posts.join_next() => return err,
            };
            let batch: Vec<String> = {
                let unsent = self.lock_unsent();
                let sending = sending.lock().unwrap_or_else(|p| p.into_inner());
                unsent
                    .iter()
                    .filter(|id| !sending.contains(*id))
                    .take(RESULTS_BATCH)
                    .cloned()
                    .collect()
            };
            if batch.is_empty() {
                drop(slot);
                tokio::select! {
                    () = self.results_ready.notified() => {}
                    Some(Ok(Err(err))) = posts.join_next() => return err,
                }
                continue;
            }
            let mut entries = Vec::with_capacity(batch.len());
            let mut ids = Vec::with_capacity(batch.len());
            // Ids whose result is gone (pruned) have nothing left to send.
            let mut gone = HashSet::new();
            let mut bytes = 0;
            for id in batch {
                let volatile = self.lock_volatile().get(&id).cloned();
                match volatile
                    .map(|stored| Ok(Some(stored)))
                    .unwrap_or_else(|| self.store.result(&id))
                {
                    Ok(Some(stored)) => {
                        // Keep each post well inside the relay's body limit.
                        let size = stored.result_json.as_ref().map_or(0, String::len)
                            + stored.error_json.as_ref().map_or(0, String::len);
                        if !entries.is_empty() && bytes + size > MAX_POST_BYTES {
                            break;
                        }
                        bytes += size;
                        entries.push(result_entry(&id, &stored));
                        ids.push(id);
                    }
                    _ => {
                        gone.insert(id);
                    }
                }
            }
            if !gone.is_empty() {
                self.lock_unsent().retain(|id| !gone.contains(id));
            }
            if entries.is_empty() {
                continue;
            }
            sending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(ids.iter().cloned());
            let (shared, sending) = (self.clone(), sending.clone());
            posts.spawn(async move {
                let _slot = slot;
                let sent = shared.send_results(entries).await;
                let mut sending_now = sending.lock().unwrap_or_else(|p| p.into_inner());
                for id in &ids {
                    sending_now.remove(id);
                }
                drop(sending_now);
                let reply = sent?;
                let done: HashSet<String> =
                    reply.accepted.into_iter().chain(reply.unknown).collect();
                shared.delivered(&done);
                Ok::<(), LinkError>(())
            });
        }
    }

    /// Forgets results the relay has taken: read results at once, stored ones marked.
    fn delivered(&self, done: &HashSet<String>) {
        for id in done {
            if self.lock_volatile().remove(id).is_some() {
                continue;
            }
            if let Ok(Some(mut stored)) = self.store.result(id) {
                stored.delivered = true;
                let _ = self.store.put_result(id, &stored);
            }
        }
        self.lock_unsent().retain(|id| !done.contains(id));
    }

    /// Posts a streamed response as chunks: a reader task keeps reading the body while a
    /// post is in flight, and each post carries what has arrived since the last one (at
    /// most `chunk_bytes`), so a fast stream goes in few large posts and a slow one
    /// without delay. Status and headers go with chunk 0, and a last empty chunk says
    /// `complete: true` (with the error, when the body failed part-way). Memory stays
    /// bounded by the reader's queue and one chunk. A chunk that fails to post is retried
    /// (the relay ignores duplicates); an `unknown` answer ends the stream.
    async fn post_stream(&self, command_id: &str, reply: StreamReply) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Piece>(STREAM_READ_AHEAD);
        let mut body = reply.body;
        // Ends when the body does (saying so with `Piece::End`), or when this function
        // returns and drops `rx`.
        let reader = tokio::spawn(async move {
            while let Some(item) = body.next().await {
                let piece = match item {
                    Ok(bytes) => Piece::Data(bytes),
                    Err(message) => Piece::Failed(message),
                };
                if tx.send(piece).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Piece::End).await;
        });
        let _reader = AbortOnDrop(reader);
        // A reader gone without `End` (it panicked) must not pass for a complete body.
        let lost = || Piece::Failed("the agent stopped reading the response".into());
        let mut head = Some((reply.status, reply.headers));
        let mut leftover: Option<bytes::Bytes> = None;
        // The body's end (with its error, if any), seen while filling a chunk.
        let mut ended: Option<Option<String>> = None;
        let limit = self.config.chunk_bytes;
        for index in 0i64.. {
            let next = match (leftover.take(), ended.take()) {
                (Some(bytes), end) => {
                    ended = end;
                    Piece::Data(bytes)
                }
                (None, Some(None)) => Piece::End,
                (None, Some(Some(message))) => Piece::Failed(message),
                (None, None) => rx.recv().await.unwrap_or_else(lost),
            };
            let (piece, error, complete) = match next {
                Piece::Data(first) => {
                    let mut piece = bytes::BytesMut::from(first.as_ref());
                    // Take what is already there, without waiting, up to the limit.
                    while piece.len() < limit && ended.is_none() {
                        let more = match rx.try_recv() {
                            Ok(more) => more,
                            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => lost(),
                            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                        };
                        match more {
                            Piece::Data(more) => piece.extend_from_slice(&more),
                            Piece::Failed(message) => ended = Some(Some(message)),
                            Piece::End => ended = Some(None),
                        }
                    }
                    let mut piece = piece.freeze();
                    if piece.len() > limit {
                        leftover = Some(piece.split_off(limit));
                    }
                    (piece, None, false)
                }
                Piece::Failed(message) => (bytes::Bytes::new(), Some(message), true),
                Piece::End => (bytes::Bytes::new(), None, true),
            };
            let mut entry = ResultEntry {
                command_id: command_id.to_owned(),
                chunk: Some(index),
                complete,
                ..ResultEntry::default()
            };
            if let Some((status, headers)) = head.take() {
                entry.status = Some(status);
                entry.headers = Some(headers);
            }
            match std::str::from_utf8(&piece) {
                Ok(text) => entry.data = Some(text.to_owned()),
                Err(_) => {
                    entry.data_base64 =
                        Some(base64::engine::general_purpose::STANDARD.encode(&piece))
                }
            }
            if let Some(message) = error {
                entry.error = Some(raw(&json!({ "code": "target_error", "message": message })));
            }
            let entry = raw(&entry);
            let mut backoff = Backoff::new();
            loop {
                match self.send_results(vec![entry.clone()]).await {
                    Ok(reply) if reply.unknown.iter().any(|id| id == command_id) => return,
                    Ok(_) => break,
                    Err(LinkError::Rejected(_)) => return,
                    Err(LinkError::Refused(message)) => {
                        tracing::warn!(command_id, %message, "the relay refused a chunk; the stream ends");
                        return;
                    }
                    Err(_) => tokio::time::sleep(backoff.next_delay()).await,
                }
            }
            if complete {
                return;
            }
        }
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_unsent(&self) -> std::sync::MutexGuard<'_, VecDeque<String>> {
        self.unsent.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the reader of a streamed body hands to the poster.
enum Piece {
    Data(bytes::Bytes),
    Failed(String),
    End,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A result as posted: the stored JSON passed on as is.
fn result_entry(command_id: &str, stored: &StoredResult) -> Box<RawValue> {
    let stored_raw = |text: &Option<String>| {
        text.as_ref()
            .and_then(|text| RawValue::from_string(text.clone()).ok())
    };
    raw(&ResultEntry {
        command_id: command_id.to_owned(),
        result: stored_raw(&stored.result_json),
        error: stored_raw(&stored.error_json),
        ..ResultEntry::default()
    })
}

/// A value as raw JSON, for the lists the relay takes apart entry by entry.
fn raw(value: &impl serde::Serialize) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).expect("wire types serialise")
}

async fn prune_results(shared: Arc<Shared>, token: CancellationToken) {
    let max_age = shared.config.results_max_age.as_millis() as u64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_INTERVAL) => {}
            _ = token.cancelled() => return,
        }
        if let Err(err) = shared.store.prune_results(now_ms().saturating_sub(max_age)) {
            tracing::warn!(error = %err, "pruning old results failed");
        }
    }
}

/// A mirrored GET, HEAD or OPTIONS (not streamed): executing it again is harmless, so its result
/// needs no durable copy on either side.
pub fn is_read(method: &str, params: &serde_json::Value, stream: bool) -> bool {
    method == "http"
        && !stream
        && matches!(
            params.get("method").and_then(|m| m.as_str()),
            Some("GET" | "HEAD" | "OPTIONS")
        )
}
