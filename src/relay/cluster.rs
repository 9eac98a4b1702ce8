//! One relay node of several (DESIGN.md, "Cluster"). The nodes share one PostgreSQL
//! database, the only system of record; core NATS carries *hints* between them, never data
//! of record. A node that commits something other nodes may be waiting for publishes a
//! hint after its commit; every node turns the hints it receives into the same in-memory
//! wake-ups ([`super::hub`]) its own commits fire, and the woken waiters re-read the
//! database. So a lost hint costs latency, never data:
//!
//! - hints are published from a bounded queue by one task: a handler never waits for NATS,
//!   and while NATS is unreachable hints are dropped (counted), not buffered;
//! - while NATS is unreachable, every waiter on this node is woken every
//!   `cluster.fallback_interval` (1 s by default) to re-read the database, and once more
//!   when NATS returns (hints sent meanwhile are gone);
//! - while it is reachable, the same re-read runs every [`SAFETY_INTERVAL`], for hints that
//!   core NATS dropped on the way (a slow consumer, a route between servers going down).
//!
//! | subject | payload arg | what the receiving node does |
//! | --- | --- | --- |
//! | `sr.wake.<daemon>` | | wakes the daemon's polls and streams: they lease again |
//! | `sr.chg.<daemon>` | seq | publishes change-log entries up to seq as committed |
//! | `sr.done.<command>` | | wakes `commands/{id}?wait=` waiters |
//! | `sr.ctx.<context>` | | wakes the context's stream readers |
//! | `sr.conn.<daemon>` | | re-reads the stored connection id: older polls end `superseded` |
//! | `sr.keys` | key id | drops the key from this node's key cache; every open request looks its key up again |
//!
//! A read's answer larger than one NATS message (`max_payload`) comes in pieces: the
//! holder answers with where to fetch them (an inbox it subscribes to for the purpose) and
//! the asking node requests them one by one, so no answer is too large to cross nodes.
//!
//! Each hint's payload is `<node> <sent µs since the epoch> [<arg>]`: a node ignores its own
//! hints (it woke its waiters already) and measures the others' delivery latency (across
//! machines this includes their clock difference).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use serde::{Deserialize, Serialize};

use super::hub::{DaemonSignals, ReadOutcome};
use super::App;
use crate::config::ClusterConfig;
use crate::metrics::{Histogram, HINT_BUCKETS};

/// While NATS is connected, how often waiters re-read the database anyway.
pub const SAFETY_INTERVAL: Duration = Duration::from_secs(30);

/// Hints waiting for the publisher; past this they are dropped (and counted).
const HINT_QUEUE: usize = 16_384;

/// The subjects a node listens on.
const SUBJECTS: [&str; 6] = [
    "sr.wake.*",
    "sr.chg.*",
    "sr.done.*",
    "sr.ctx.*",
    "sr.conn.*",
    "sr.keys",
];

/// Something committed that waiters on other nodes may be waiting for.
#[derive(Debug, Clone, Copy)]
pub enum Hint<'a> {
    /// Commands of this daemon were stored or released.
    Stored(&'a str),
    /// The daemon's change log is committed up to this seq.
    Changes(&'a str, u64),
    /// This command's result was stored.
    Done(&'a str),
    /// This context got a chunk or ended.
    Context(&'a str),
    /// The daemon connected here: its older connection is superseded.
    Connected(&'a str),
    /// This key was revoked.
    KeyRevoked(&'a str),
}

impl Hint<'_> {
    fn subject(&self) -> String {
        match self {
            Hint::Stored(daemon) => format!("sr.wake.{}", token(daemon)),
            Hint::Changes(daemon, _) => format!("sr.chg.{}", token(daemon)),
            Hint::Done(command) => format!("sr.done.{}", token(command)),
            Hint::Context(context) => format!("sr.ctx.{}", token(context)),
            Hint::Connected(daemon) => format!("sr.conn.{}", token(daemon)),
            Hint::KeyRevoked(_) => "sr.keys".into(),
        }
    }
}

/// An id as one subject token. Daemon ids may hold `.`, which NATS reads as a token
/// separator; ids never hold `~` (letters, digits, `.`, `_`, `-` only), so `.` ↔ `~` is
/// reversible and the token never holds `.`, `*`, `>` or a space.
fn token(id: &str) -> String {
    id.replace('.', "~")
}

/// The id of a subject token made by [`token`].
fn untoken(token: &str) -> String {
    token.replace('~', ".")
}

/// Counters for `/metrics` and `syncrelay status`.
pub struct ClusterMetrics {
    pub hints_sent: AtomicU64,
    pub hints_received: AtomicU64,
    /// Not sent: the queue was full or NATS unreachable.
    pub hints_dropped: AtomicU64,
    /// Wake-ups of every waiter on this node to re-read the database.
    pub fallback_rereads: AtomicU64,
    /// Seconds from a hint's publication on another node to its arrival here.
    pub hint_seconds: Histogram,
}

/// This node's link to the others.
pub struct Cluster {
    pub node: String,
    client: async_nats::Client,
    hints: mpsc::Sender<(String, Bytes)>,
    /// Changes with each connect and disconnect event (the client's own state decides).
    connected: watch::Receiver<bool>,
    pub metrics: ClusterMetrics,
    publisher: std::sync::Mutex<Option<mpsc::Receiver<(String, Bytes)>>>,
    fallback_interval: Duration,
    /// The daemons this node answers `sr.read.<daemon>` for (it holds their connection).
    held: std::sync::Mutex<HashSet<String>>,
    /// Bytes of large answers this node keeps for other nodes to fetch in pieces.
    pieces_kept: AtomicU64,
    /// The app, for the tasks that answer other nodes' reads (set by [`Cluster::spawn`]).
    app: OnceLock<Weak<App>>,
}

/// A mirrored read that a node sends to the node holding the daemon (`sr.read.<daemon>`).
#[derive(Serialize, Deserialize)]
struct ReadRequest {
    method: String,
    params_json: String,
    wait_ms: u64,
    /// Only asks whether the daemon is online there.
    #[serde(default)]
    probe: bool,
    /// The asking node fetches an answer too large for one message in pieces (a node
    /// that does not, during an upgrade, gets `timed_out` for such an answer instead).
    #[serde(default)]
    pieces: bool,
}

/// The holding node's answer.
#[derive(Serialize, Deserialize, Default)]
struct ReadReply {
    #[serde(default)]
    result_json: Option<String>,
    #[serde(default)]
    error_json: Option<String>,
    /// The daemon did not answer in time.
    #[serde(default)]
    timed_out: bool,
    /// The daemon's queue is full (its limit).
    #[serde(default)]
    queue_full: Option<u64>,
    /// Too large for one NATS message: `result_json` is fetched in this many pieces, piece
    /// `i` by a request with payload `i` on `pieces_at`.
    #[serde(default)]
    pieces: Option<u32>,
    #[serde(default)]
    pieces_at: Option<String>,
}

/// What a read sent to another node came to.
pub enum Remote {
    Answered(ReadOutcome),
    TimedOut,
    QueueFull(u64),
    /// No node holds the daemon (or NATS is unreachable).
    NoHolder,
}

impl Cluster {
    /// Connects to NATS. An unreachable NATS does not stop the node: the client keeps
    /// trying, and the node runs in the fallback mode until it connects.
    pub async fn connect(config: &ClusterConfig) -> anyhow::Result<Cluster> {
        let (connected_tx, connected) = watch::channel(false);
        let node = config.node.clone();
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("syncrelay {}", config.node))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .ping_interval(Duration::from_secs(5))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((attempts as u64 * 100).min(2_000))
            })
            .event_callback(move |event| {
                let connected_tx = connected_tx.clone();
                let node = node.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!(node, "cluster: NATS connected");
                            connected_tx.send_replace(true);
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!(
                                node,
                                "cluster: NATS disconnected; waiters re-read the database \
                                 on a timer until it returns"
                            );
                            connected_tx.send_replace(false);
                        }
                        other => tracing::info!(node, event = %other, "cluster: NATS event"),
                    }
                }
            });
        if let Some(path) = &config.nats_credentials_file {
            options = options.credentials_file(path).await.with_context(|| {
                format!("reading cluster.nats_credentials_file {}", path.display())
            })?;
        }
        if let Some(path) = &config.nats_token_file {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("reading cluster.nats_token_file {}", path.display()))?;
            options = options.token(token.trim().to_owned());
        }
        if let Some(path) = &config.nats_tls_ca {
            options = options.add_root_certificates(path.clone());
        }
        if let Some((cert, key)) = &config.nats_tls_client {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        options = options.require_tls(config.nats_tls_required);
        let client = options
            .connect(config.nats_urls.as_slice())
            .await
            .context("cluster: setting up the NATS client")?;
        let (hints, publisher) = mpsc::channel(HINT_QUEUE);
        Ok(Cluster {
            node: config.node.clone(),
            client,
            hints,
            connected,
            metrics: ClusterMetrics {
                hints_sent: AtomicU64::new(0),
                hints_received: AtomicU64::new(0),
                hints_dropped: AtomicU64::new(0),
                fallback_rereads: AtomicU64::new(0),
                hint_seconds: Histogram::new(HINT_BUCKETS),
            },
            publisher: std::sync::Mutex::new(Some(publisher)),
            fallback_interval: config.fallback_interval,
            held: Default::default(),
            pieces_kept: AtomicU64::new(0),
            app: OnceLock::new(),
        })
    }

    /// Whether NATS is connected now: the client's own state (its events only say when
    /// to look again).
    pub fn nats_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Queues a hint for the other nodes; never waits. Call it after the commit.
    pub fn hint(&self, hint: Hint<'_>) {
        if !self.nats_connected() {
            self.metrics.hints_dropped.fetch_add(1, Relaxed);
            return;
        }
        let arg = match hint {
            Hint::Changes(_, seq) => format!(" {seq}"),
            Hint::KeyRevoked(key_id) => format!(" {key_id}"),
            _ => String::new(),
        };
        let payload = format!("{} {}{arg}", self.node, now_micros());
        if self
            .hints
            .try_send((hint.subject(), payload.into()))
            .is_err()
        {
            self.metrics.hints_dropped.fetch_add(1, Relaxed);
        }
    }

    /// Starts the publisher, the listener and the fallback re-reads; they end with the
    /// app's shutdown token.
    pub fn spawn(app: &Arc<App>) -> Vec<tokio::task::JoinHandle<()>> {
        let Some(cluster) = app.cluster.clone() else {
            return Vec::new();
        };
        let _ = cluster.app.set(Arc::downgrade(app));
        let publisher = cluster
            .publisher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .expect("spawned once");
        vec![
            tokio::spawn(publish(cluster.clone(), publisher, app.shutdown.clone())),
            tokio::spawn(listen(app.clone(), cluster.clone())),
            tokio::spawn(fallback(app.clone(), cluster)),
        ]
    }
}

impl Cluster {
    /// The daemon polls or streams here: answer other nodes' reads of it while it stays
    /// online here. Cheap when already held.
    pub fn hold(self: &Arc<Self>, daemon: &str, signals: &Arc<DaemonSignals>) {
        let Some(app) = self.app.get().and_then(Weak::upgrade) else {
            return;
        };
        if !self.lock_held().insert(daemon.to_owned()) {
            return;
        }
        tokio::spawn(serve_reads(
            app,
            self.clone(),
            daemon.to_owned(),
            signals.clone(),
        ));
    }

    /// This node's figures for `GET /admin/stats`.
    pub fn stats(&self) -> crate::protocol::ClusterStats {
        let m = &self.metrics;
        let (cumulative, sum_seconds) = m.hint_seconds.snapshot();
        crate::protocol::ClusterStats {
            node: self.node.clone(),
            nats_connected: self.nats_connected(),
            daemons_held: self.daemons_held(),
            hints_sent: m.hints_sent.load(Relaxed),
            hints_received: m.hints_received.load(Relaxed),
            hints_dropped: m.hints_dropped.load(Relaxed),
            fallback_rereads: m.fallback_rereads.load(Relaxed),
            hint_latency: crate::protocol::HistogramView {
                bounds: m.hint_seconds.bounds().to_vec(),
                count: cumulative.last().copied().unwrap_or(0),
                cumulative,
                sum_seconds,
            },
        }
    }

    /// Daemons whose connection this node holds (it answers other nodes' reads of them).
    pub fn daemons_held(&self) -> u64 {
        self.lock_held().len() as u64
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends a read to the node holding the daemon and awaits its answer.
    pub async fn remote_read(
        &self,
        daemon: &str,
        method: &str,
        params_json: &str,
        wait: Duration,
    ) -> Remote {
        let request = ReadRequest {
            method: method.to_owned(),
            params_json: params_json.to_owned(),
            wait_ms: wait.as_millis() as u64,
            probe: false,
            pieces: true,
        };
        // The holder answers `timed_out` at `wait`; a little longer here covers the trip.
        match self
            .request(daemon, &request, wait + Duration::from_secs(2))
            .await
        {
            Some(ReadReply {
                queue_full: Some(limit),
                ..
            }) => Remote::QueueFull(limit),
            Some(reply) if reply.timed_out => Remote::TimedOut,
            Some(reply) => Remote::Answered(ReadOutcome {
                result_json: reply.result_json,
                error_json: reply.error_json,
            }),
            None => Remote::NoHolder,
        }
    }

    /// Whether another node holds the daemon online now.
    pub async fn held_elsewhere(&self, daemon: &str) -> bool {
        let probe = ReadRequest {
            method: String::new(),
            params_json: String::new(),
            wait_ms: 0,
            probe: true,
            pieces: false,
        };
        self.request(daemon, &probe, Duration::from_secs(2))
            .await
            .is_some_and(|reply| !reply.timed_out)
    }

    /// One request-reply on `sr.read.<daemon>`; `None`: no responder, NATS unreachable, or
    /// no answer within `limit`.
    async fn request(
        &self,
        daemon: &str,
        request: &ReadRequest,
        limit: Duration,
    ) -> Option<ReadReply> {
        if !self.nats_connected() {
            return None;
        }
        let payload = serde_json::to_vec(request).expect("a read request serialises");
        let request = async_nats::client::Request::new()
            .payload(payload.into())
            .timeout(Some(limit));
        match self
            .client
            .send_request(format!("sr.read.{}", token(daemon)), request)
            .await
        {
            Ok(message) => {
                let reply: ReadReply = serde_json::from_slice(&message.payload).ok()?;
                match (reply.pieces, reply.pieces_at.as_deref()) {
                    (Some(count), Some(at)) => Some(self.pieces(daemon, at, count).await),
                    _ => Some(reply),
                }
            }
            // A holder that did not answer in time: as when the daemon does not.
            Err(err) if err.kind() == async_nats::client::RequestErrorKind::TimedOut => {
                Some(ReadReply {
                    timed_out: true,
                    ..Default::default()
                })
            }
            Err(err) => {
                tracing::debug!(daemon, error = %err, "cluster: read not routed");
                None
            }
        }
    }

    /// Fetches a `result_json` sent in `count` pieces from `at`, each within
    /// [`PIECE_WAIT`]; `timed_out` when one does not come (as when the daemon does not
    /// answer in time).
    async fn pieces(&self, daemon: &str, at: &str, count: u32) -> ReadReply {
        let mut whole = Vec::new();
        for index in 0..count {
            let request = async_nats::client::Request::new()
                .payload(index.to_string().into())
                .timeout(Some(PIECE_WAIT));
            match self.client.send_request(at.to_owned(), request).await {
                Ok(piece) => whole.extend_from_slice(&piece.payload),
                Err(err) => {
                    tracing::warn!(daemon, index, count, error = %err, "cluster: a piece of a \
                        read's answer did not come");
                    return ReadReply {
                        timed_out: true,
                        ..Default::default()
                    };
                }
            }
        }
        match String::from_utf8(whole) {
            Ok(result_json) => ReadReply {
                result_json: Some(result_json),
                ..Default::default()
            },
            Err(_) => {
                tracing::warn!(
                    daemon,
                    count,
                    "cluster: a read's answer in pieces is not UTF-8"
                );
                ReadReply {
                    timed_out: true,
                    ..Default::default()
                }
            }
        }
    }
}

/// How long an asking node waits for each piece of a large answer.
const PIECE_WAIT: Duration = Duration::from_secs(5);

/// How long a holder keeps a large answer while no piece of it is asked for: gone once it
/// has been fetched, or its asker left.
const PIECES_IDLE: Duration = Duration::from_secs(10);

/// The most a node keeps of large answers waiting to be fetched in pieces; past it, a
/// large answer is `timed_out` (the asker serves the cached copy or 504).
const PIECES_BUDGET: usize = 128 << 20;

/// Answers `sr.read.<daemon>` for as long as the daemon stays online here.
async fn serve_reads(
    app: Arc<App>,
    cluster: Arc<Cluster>,
    daemon: String,
    signals: Arc<DaemonSignals>,
) {
    /// Leaves `held` however the task ends, so a later poll or stream holds it again
    /// (unless disarmed: the exit already left it, and a newer task may hold it now).
    struct Held<'a>(&'a Cluster, &'a str, bool);
    impl Drop for Held<'_> {
        fn drop(&mut self) {
            if self.2 {
                self.0.lock_held().remove(self.1);
            }
        }
    }
    let grace = app.config.sync.online_grace;
    let subject = format!("sr.read.{}", token(&daemon));
    let subscriber = cluster.client.subscribe(subject).await;
    let mut held = Held(&cluster, &daemon, true);
    let Ok(mut subscriber) = subscriber else {
        return;
    };
    let mut ticks = tokio::time::interval(grace.max(Duration::from_millis(100)));
    ticks.tick().await;
    loop {
        tokio::select! {
            message = subscriber.next() => match message {
                Some(message) => {
                    tokio::spawn(answer_read(
                        app.clone(),
                        cluster.clone(),
                        daemon.clone(),
                        signals.clone(),
                        message,
                    ));
                }
                None => break,
            },
            _ = ticks.tick() => {
                // Decided under the lock: a `hold` racing with this exit either finds
                // the daemon still held (online again: this task carries on) or gone
                // (it starts a new task).
                {
                    let mut holding = cluster.lock_held();
                    if !signals.online(grace) {
                        holding.remove(&daemon);
                        held.2 = false;
                        break;
                    }
                }
                // Other nodes tell the daemon online by its stored last-seen time: keep
                // it fresh while a long poll waits here without a word (only while one
                // is open: a daemon gone must not look seen). Off this loop, which
                // answers reads that need no database.
                if signals.attached() {
                    let (app, signals, daemon) = (app.clone(), signals.clone(), daemon.clone());
                    tokio::spawn(async move {
                        super::sync::touch(&app, &signals, &daemon).await;
                    });
                }
            }
            _ = app.shutdown.cancelled() => break,
        }
    }
    drop(held);
    let _ = subscriber.unsubscribe().await;
}

/// Answers one read another node sent here.
async fn answer_read(
    app: Arc<App>,
    cluster: Arc<Cluster>,
    daemon: String,
    signals: Arc<DaemonSignals>,
    message: async_nats::Message,
) {
    let Some(reply_to) = message.reply else {
        return;
    };
    let Ok(request) = serde_json::from_slice::<ReadRequest>(&message.payload) else {
        return;
    };
    // Only what `remote_read` sends: a mirrored GET, HEAD or OPTIONS. A write never
    // travels this way (it is stored, then hinted).
    let read_method = serde_json::from_str::<serde_json::Value>(&request.params_json)
        .ok()
        .and_then(|params| params["method"].as_str().map(str::to_owned));
    let is_read = request.method == "http"
        && matches!(read_method.as_deref(), Some("GET" | "HEAD" | "OPTIONS"));
    if !request.probe && !is_read {
        tracing::warn!(
            daemon,
            "cluster: refused a routed request that is not a read"
        );
        return;
    }
    let grace = app.config.sync.online_grace;
    if request.probe {
        if signals.online(grace) {
            let _ = cluster.client.publish(reply_to, "{}".into()).await;
        }
        return;
    }
    let wait = Duration::from_millis(request.wait_ms).min(app.config.commands.wait_max);
    let outcome = super::mirror::answer_here(
        &app,
        &daemon,
        &signals,
        &request.method,
        &request.params_json,
        wait,
    )
    .await;
    let reply = match outcome {
        Ok(Some(outcome)) => ReadReply {
            result_json: outcome.result_json,
            error_json: outcome.error_json,
            ..Default::default()
        },
        Ok(None) => ReadReply {
            timed_out: true,
            ..Default::default()
        },
        Err(_) => ReadReply {
            queue_full: Some(app.config.commands.queue_limit),
            ..Default::default()
        },
    };
    let payload = serde_json::to_vec(&reply).expect("a read reply serialises");
    // Room for the headers NATS adds.
    let max = cluster
        .client
        .server_info()
        .max_payload
        .saturating_sub(4096)
        .max(4096);
    if payload.len() <= max {
        let _ = cluster.client.publish(reply_to, payload.into()).await;
        return;
    }
    let large = match reply.result_json {
        Some(result) if request.pieces && reply.error_json.is_none() => Bytes::from(result),
        _ => {
            tracing::warn!(
                daemon,
                bytes = payload.len(),
                "cluster: a read's answer is larger \
                than NATS's max_payload and its asker cannot take pieces"
            );
            let timed_out = ReadReply {
                timed_out: true,
                ..Default::default()
            };
            let timed_out = serde_json::to_vec(&timed_out).expect("a read reply serialises");
            let _ = cluster.client.publish(reply_to, timed_out.into()).await;
            return;
        }
    };
    send_in_pieces(&app, &cluster, &daemon, reply_to, large, max).await;
}

/// Sends a `result_json` larger than one NATS message in pieces: the reply says where to
/// fetch them (a fresh inbox this node subscribes to first), then each piece's request is
/// answered, until the last piece is sent or none is asked for within [`PIECES_IDLE`].
/// Past [`PIECES_BUDGET`] of such answers kept at once, the reply is `timed_out`.
async fn send_in_pieces(
    app: &App,
    cluster: &Cluster,
    daemon: &str,
    reply_to: async_nats::Subject,
    result: Bytes,
    max: usize,
) {
    /// Gives the answer's bytes back to the budget however this ends.
    struct Kept<'a>(&'a AtomicU64, u64);
    impl Drop for Kept<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(self.1, Relaxed);
        }
    }
    let size = result.len() as u64;
    let kept = Kept(&cluster.pieces_kept, size);
    let count = result.len().div_ceil(max);
    let at = cluster.client.new_inbox();
    let head = if cluster.pieces_kept.fetch_add(size, Relaxed) + size > PIECES_BUDGET as u64 {
        tracing::warn!(
            daemon,
            bytes = size,
            "cluster: too many large answers waiting to \
            be fetched; this one is not sent"
        );
        ReadReply {
            timed_out: true,
            ..Default::default()
        }
    } else {
        ReadReply {
            pieces: Some(count as u32),
            pieces_at: Some(at.clone()),
            ..Default::default()
        }
    };
    let Ok(mut requests) = cluster.client.subscribe(at).await else {
        return;
    };
    let sending = head.pieces.is_some();
    let head = serde_json::to_vec(&head).expect("a read reply serialises");
    if cluster.client.publish(reply_to, head.into()).await.is_err() || !sending {
        return;
    }
    tracing::debug!(
        daemon,
        bytes = size,
        count,
        "cluster: a read's answer in pieces"
    );
    loop {
        let request = tokio::select! {
            request = tokio::time::timeout(PIECES_IDLE, requests.next()) => request,
            _ = app.shutdown.cancelled() => break,
        };
        let Ok(Some(request)) = request else {
            break;
        };
        let Some(reply) = request.reply else {
            continue;
        };
        let Some(index) = std::str::from_utf8(&request.payload)
            .ok()
            .and_then(|text| text.parse::<usize>().ok())
            .filter(|&index| index < count)
        else {
            continue;
        };
        let piece = result.slice(index * max..((index + 1) * max).min(result.len()));
        let _ = cluster.client.publish(reply, piece).await;
        if index + 1 == count {
            break;
        }
    }
    drop(kept);
    let _ = requests.unsubscribe().await;
}

/// Sends queued hints in order.
async fn publish(
    cluster: Arc<Cluster>,
    mut hints: mpsc::Receiver<(String, Bytes)>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        let (subject, payload) = tokio::select! {
            Some(hint) = hints.recv() => hint,
            _ = shutdown.cancelled() => break,
        };
        match cluster.client.publish(subject, payload).await {
            Ok(()) => cluster.metrics.hints_sent.fetch_add(1, Relaxed),
            Err(err) => {
                tracing::debug!(error = %err, "cluster: a hint was not sent");
                cluster.metrics.hints_dropped.fetch_add(1, Relaxed)
            }
        };
    }
    // What was queued before shutdown still goes out, briefly.
    let _ = tokio::time::timeout(Duration::from_secs(1), cluster.client.flush()).await;
}

/// Turns other nodes' hints into this node's wake-ups.
async fn listen(app: Arc<App>, cluster: Arc<Cluster>) {
    let mut subscribers = Vec::new();
    for subject in SUBJECTS {
        // Subscribing only queues a command to the client: it works before the first
        // connection too, and the client subscribes again after each reconnect.
        match cluster.client.subscribe(subject).await {
            Ok(subscriber) => subscribers.push(subscriber),
            Err(err) => {
                tracing::error!(subject, error = %err, "cluster: cannot subscribe; hints \
                    are not received and waiters rely on the database re-reads");
                return;
            }
        }
    }
    let mut messages = futures_util::stream::select_all(subscribers);
    loop {
        let message = tokio::select! {
            Some(message) = messages.next() => message,
            _ = app.shutdown.cancelled() => return,
        };
        apply(&app, &cluster, &message.subject, &message.payload).await;
    }
}

/// One hint from another node.
async fn apply(app: &Arc<App>, cluster: &Cluster, subject: &str, payload: &[u8]) {
    let Ok(payload) = std::str::from_utf8(payload) else {
        return;
    };
    let mut words = payload.split(' ');
    let (Some(node), Some(sent)) = (words.next(), words.next()) else {
        return;
    };
    if node == cluster.node {
        return;
    }
    cluster.metrics.hints_received.fetch_add(1, Relaxed);
    if let Ok(sent) = sent.parse::<u64>() {
        let seconds = now_micros().saturating_sub(sent) as f64 / 1e6;
        cluster.metrics.hint_seconds.observe(seconds);
    }
    let arg = words.next();
    let mut parts = subject.splitn(3, '.');
    let (Some("sr"), Some(kind)) = (parts.next(), parts.next()) else {
        return;
    };
    let key = untoken(parts.next().unwrap_or_default());
    let key = key.as_str();
    match kind {
        "wake" => {
            if let Some(signals) = app.hub.existing(key) {
                signals.bump_stored();
            }
        }
        "chg" => {
            if let (Some(signals), Some(seq)) =
                (app.hub.existing(key), arg.and_then(|a| a.parse().ok()))
            {
                signals.publish_changes(seq);
            }
        }
        "done" => app.hub.commands.notify(key),
        "ctx" => app.hub.contexts.notify(key),
        // The stored id decides, whatever order hints arrive in.
        "conn" if app.hub.existing(key).is_some() => {
            let app = app.clone();
            let daemon = key.to_owned();
            tokio::spawn(async move { reread_connection(&app, &daemon).await });
        }
        "keys" => {
            // Out of this node's key cache first: the open requests of the key then look
            // it up in the database and end.
            app.store.forget_cached_keys(Some(arg.unwrap_or_default()));
            app.hub.revocations.revoked();
        }
        _ => {}
    }
}

/// Publishes the daemon's stored connection id here, so older polls and streams on this
/// node end `superseded`.
pub async fn reread_connection(app: &App, daemon: &str) {
    let Some(signals) = app.hub.existing(daemon) else {
        return;
    };
    let _serial = signals.connect_lock.lock().await;
    match app.store.daemon(daemon).await {
        Ok(Some(record)) => {
            signals.connection.send_if_modified(|current| {
                let changed = *current != record.connection_id;
                if changed {
                    current.clone_from(&record.connection_id);
                }
                changed
            });
            // The connect made what the database holds this node's to show too: the node
            // that committed the daemon's last append may have died before its hint.
            signals.publish_changes(record.last_change_seq);
            signals.publish_update_seq(record.last_update_seq);
        }
        Ok(None) => {}
        Err(err) => tracing::debug!(daemon, error = %err, "cluster: connection re-read failed"),
    }
}

/// Wakes every waiter on this node to re-read the database: every
/// `fallback_interval` while NATS is unreachable, once when it returns, and every
/// [`SAFETY_INTERVAL`] while it is connected.
async fn fallback(app: Arc<App>, cluster: Arc<Cluster>) {
    let mut events = cluster.connected.clone();
    let mut was_connected = cluster.nats_connected();
    let mut last = tokio::time::Instant::now();
    loop {
        // The client's state is looked at every interval, not only on its events.
        tokio::select! {
            _ = tokio::time::sleep(cluster.fallback_interval) => {}
            Ok(()) = events.changed() => {}
            _ = app.shutdown.cancelled() => return,
        }
        let connected = cluster.nats_connected();
        // Unreachable; just back (hints sent meanwhile are lost); or the safety re-read.
        let due = !connected || !was_connected || last.elapsed() >= SAFETY_INTERVAL;
        was_connected = connected;
        if due {
            cluster.metrics.fallback_rereads.fetch_add(1, Relaxed);
            reread_all(&app).await;
            last = tokio::time::Instant::now();
        }
    }
}

/// Every waiter on this node looks at the database again.
async fn reread_all(app: &App) {
    for (daemon, signals) in app.hub.watched_daemons() {
        match app.store.daemon(&daemon).await {
            Ok(Some(record)) => {
                signals.publish_changes(record.last_change_seq);
                if *signals.connection.borrow() != record.connection_id {
                    reread_connection(app, &daemon).await;
                }
                signals.bump_stored();
            }
            Ok(None) => {}
            Err(err) => {
                tracing::debug!(error = %err, "cluster: re-read failed");
                // Still wake them: each waiter's own read reports the failure.
                signals.bump_stored();
            }
        }
    }
    app.hub.commands.notify_all();
    app.hub.contexts.notify_all();
    // A revocation's hint may be among those lost.
    app.store.forget_cached_keys(None);
    app.hub.revocations.revoked();
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
