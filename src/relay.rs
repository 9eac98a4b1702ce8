//! The relay server. [`Relay::start`] does what `syncrelay serve` does before serving (the
//! binary and the tests alike): loads TLS, opens the store, writes the admin key on first
//! start, binds the listener and, for the process, installs the storage-failure exit and
//! the SIGHUP handler. [`Relay::serve`] then serves HTTP/1.1 and HTTP/2 (over TLS with ALPN
//! when `[tls]` is set, else prior-knowledge h2c) until the caller's shutdown future
//! resolves; then it stops accepting, answers waiting polls and streams, drains
//! connections under a grace timeout and closes the store last. With TLS, SIGHUP re-reads
//! the certificate files.
//!
//! Modules: `server` (accept loop, connections), `tls`, `limits` (rate and connection
//! limits), `router` (routes → handlers), `auth`, `sync` (daemon side), `mirror` and
//! `client` (client API), `changes` (change log and SSE), `admin_api`, `hub` (in-memory
//! wake-ups), `http` (errors, bodies).

mod admin_api;
mod api;
pub mod auth;
mod changes;
mod client;
pub mod cluster;
mod console;
mod deadline;
mod framer;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
mod hub;
pub mod limits;
mod mirror;
mod outlet;
mod router;
mod server;
mod streams;
mod sync;
mod sync_stream;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::{now_ms, Maintenance, RetentionPolicy, Store};
use http::ApiError;
use hub::{DaemonSignals, Hub};

pub type Response = ::http::Response<http::Body>;

/// How long a replaced or evicted context's chunks stay readable for clients still
/// replaying it.
const CONTEXT_GARBAGE_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// What every handler shares.
pub struct App {
    pub config: Config,
    pub store: Arc<Store>,
    pub hub: Arc<Hub>,
    /// Cancelled when shutdown begins: waiting polls and streams answer at once.
    pub shutdown: CancellationToken,
    /// The tasks serving `/sync/stream`s, so that none outlives the store they write to.
    pub sessions: tokio_util::task::TaskTracker,
    pub metrics: Metrics,
    pub limits: limits::RateLimits,
    /// Set while an online backup runs (one at a time).
    pub backup_running: std::sync::atomic::AtomicBool,
    /// The retention sweep's last census of the store, and when it was taken (ms).
    pub usage: std::sync::Mutex<Option<(u64, crate::store::Usage)>>,
    /// `/openapi.json`, generated from the routes at start.
    pub openapi: bytes::Bytes,
    /// This node's link to the others; `None`: a lone relay.
    pub cluster: Option<Arc<cluster::Cluster>>,
}

/// Counters exposed at `/metrics` (Prometheus text format).
pub struct Metrics {
    pub connections_accepted: std::sync::atomic::AtomicU64,
    pub connections_open: std::sync::atomic::AtomicI64,
    /// Connections closed at once by `max_connections` or `max_connections_per_address`.
    pub connections_refused: std::sync::atomic::AtomicU64,
    pub tls_handshake_failures: std::sync::atomic::AtomicU64,
    pub auth_failures: std::sync::atomic::AtomicU64,
    pub rate_limited: std::sync::atomic::AtomicU64,
    /// Seconds from request to response head, by route family ([`RouteFamily`]).
    pub request_seconds: [crate::metrics::Histogram; RouteFamily::ALL.len()],
    /// Pumped responses (context and event streams) and their stalled readers.
    pub outlets: Arc<outlet::OutletMetrics>,
    /// Requests by matched route template.
    pub routes: router::RouteCounts,
    /// When the relay started serving.
    pub started: std::time::Instant,
}

impl Metrics {
    /// Counters for a relay serving `templates`.
    pub fn new<'a>(templates: impl IntoIterator<Item = &'a String>) -> Self {
        Metrics {
            connections_accepted: Default::default(),
            connections_open: Default::default(),
            connections_refused: Default::default(),
            tls_handshake_failures: Default::default(),
            auth_failures: Default::default(),
            rate_limited: Default::default(),
            request_seconds: std::array::from_fn(|_| {
                crate::metrics::Histogram::new(crate::metrics::LATENCY_BUCKETS)
            }),
            outlets: Default::default(),
            routes: router::RouteCounts::new(templates),
            started: std::time::Instant::now(),
        }
    }
}

/// Route families, as latency metrics label them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteFamily {
    Sync,
    Client,
    Admin,
    Health,
    Other,
}

impl RouteFamily {
    pub const ALL: [RouteFamily; 5] = [
        RouteFamily::Sync,
        RouteFamily::Client,
        RouteFamily::Admin,
        RouteFamily::Health,
        RouteFamily::Other,
    ];

    pub fn of(path: &str) -> RouteFamily {
        match path.trim_start_matches('/').split('/').next() {
            Some("sync") => RouteFamily::Sync,
            Some("api") => RouteFamily::Client,
            Some("admin") => RouteFamily::Admin,
            Some("healthz" | "readyz" | "metrics") => RouteFamily::Health,
            _ => RouteFamily::Other,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            RouteFamily::Sync => "sync",
            RouteFamily::Client => "client",
            RouteFamily::Admin => "admin",
            RouteFamily::Health => "health",
            RouteFamily::Other => "other",
        }
    }
}

/// Longest shutdown waits for the store's final flush.
const STORE_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// How often rate-limit state that has refilled is dropped.
const LIMITS_HOUSEKEEPING: std::time::Duration = std::time::Duration::from_secs(10);

impl App {
    /// Tells the other nodes, if any, what was just committed.
    pub fn hint(&self, hint: cluster::Hint<'_>) {
        if let Some(cluster) = &self.cluster {
            cluster.hint(hint);
        }
    }

    /// The signals of a daemon the store knows; 404 otherwise.
    async fn signals(&self, daemon_id: &str) -> Result<Arc<DaemonSignals>, ApiError> {
        self.hub
            .daemon(&self.store, daemon_id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no daemon {daemon_id}")))
    }
}

/// How a relay runs inside its process.
#[derive(Debug, Clone, Copy)]
pub struct Process {
    /// Exit with status 75 once the store's disk fails, so that a supervisor's restart
    /// recovers the store ([`crate::store::exit_on_storage_failure`]).
    pub exit_on_storage_failure: bool,
    /// Reload the TLS files on SIGHUP (instead of dying of it).
    pub reload_on_sighup: bool,
}

impl Process {
    /// `syncrelay serve`: the relay is the process.
    pub const SERVE: Process = Process {
        exit_on_storage_failure: true,
        reload_on_sighup: true,
    };
    /// A relay inside another program (tests, benches): no process-wide hooks.
    pub const EMBEDDED: Process = Process {
        exit_on_storage_failure: false,
        reload_on_sighup: false,
    };
}

/// The relay as `syncrelay serve` runs it, for the binary and the tests alike: the TLS
/// files loaded, the store opened, the admin key written on first start and the listener
/// bound by [`Relay::start`]; requests served by [`Relay::serve`].
pub struct Relay {
    config: Config,
    store: Arc<Store>,
    tls: Option<Arc<tls::TlsState>>,
    listener: TcpListener,
    hangups: Option<tokio::signal::unix::Signal>,
    cluster: Option<Arc<cluster::Cluster>>,
}

impl Relay {
    /// Everything up to serving. Refuses what the config would not serve safely
    /// ([`Config::check_serving`]: plaintext off loopback).
    pub async fn start(config: Config, process: Process) -> anyhow::Result<Relay> {
        use anyhow::Context;
        config.check_serving().map_err(anyhow::Error::msg)?;
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(tls::TlsState::load(files)?)),
            None => None,
        };
        let data_dir = config.server.data_dir.clone();
        // Made here, not by the store: on PostgreSQL it still holds `admin.key`.
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating the data dir {}", data_dir.display()))?;
        let store = Arc::new(Store::open(&config.store_settings()).await?);
        tracing::info!(backend = store.backend_name(), "store open");
        if process.exit_on_storage_failure {
            crate::store::exit_on_storage_failure();
        }
        if let Some(path) = auth::ensure_admin_key(&store, &data_dir).await? {
            tracing::info!(path = %path.display(), "first start: created an admin key");
        }
        let cluster = match &config.cluster {
            Some(settings) => {
                let cluster = cluster::Cluster::connect(settings).await?;
                tracing::info!(node = %settings.node, nats = ?settings.nats_urls, "cluster node");
                Some(Arc::new(cluster))
            }
            None => None,
        };
        let listen = config.server.listen;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        // Before the relay is announced: from then on, SIGHUP reloads TLS instead of
        // killing the process.
        let hangups = match process.reload_on_sighup {
            true => Some(
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                    .context("installing the SIGHUP handler")?,
            ),
            false => None,
        };
        Ok(Relay {
            config,
            store,
            tls,
            listener,
            hangups,
            cluster,
        })
    }

    /// The address bound (port 0 in the config picks one).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.listener.local_addr().expect("a bound listener")
    }

    /// The store, for a caller that also reads its statistics.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// `http://` or `https://` and the bound address.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.local_addr())
    }

    /// Serves until `shutdown` resolves, then drains and closes the store.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tracing::info!(
            url = %self.url(),
            data_dir = %self.config.server.data_dir.display(),
            "relay listening"
        );
        run_with_tls(
            self.listener,
            self.config,
            self.store,
            self.tls,
            self.hangups,
            self.cluster,
            shutdown,
        )
        .await
    }
}

/// Serves on `listener` with TLS already loaded (`None`: plaintext) until `shutdown`
/// resolves, then closes `store`. Each signal on `hangups` reloads the TLS files.
async fn run_with_tls(
    listener: TcpListener,
    config: Config,
    store: Arc<Store>,
    tls: Option<Arc<tls::TlsState>>,
    hangups: Option<tokio::signal::unix::Signal>,
    cluster: Option<Arc<cluster::Cluster>>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    store.set_daemon_budget(config.retention.daemon_max_bytes);
    let (routes, document) = api::router();
    let app = Arc::new(App {
        limits: limits::RateLimits::new(&config.rate_limit),
        config,
        store: store.clone(),
        hub: Arc::new(Hub::default()),
        shutdown: CancellationToken::new(),
        sessions: tokio_util::task::TaskTracker::new(),
        metrics: Metrics::new(document.paths.paths.keys()),
        backup_running: Default::default(),
        usage: Default::default(),
        openapi: serde_json::to_vec(&document)
            .expect("the document serialises")
            .into(),
        cluster,
    });
    let routes = routes.with_state(app.clone());
    let retention = tokio::spawn(retention_loop(app.clone()));
    let housekeeping = tokio::spawn(limits_housekeeping(app.clone()));
    let cluster_tasks = cluster::Cluster::spawn(&app);
    let reloads = hangups
        .map(|hangups| tokio::spawn(reload_on_sighup(hangups, tls.clone(), app.shutdown.clone())));
    server::serve(listener, app.clone(), routes, tls, shutdown).await;
    // `serve` cancelled the token: the loops end (the sweep after the one in progress).
    let _ = retention.await;
    let _ = housekeeping.await;
    for task in cluster_tasks {
        let _ = task.await;
    }
    if let Some(reloads) = reloads {
        let _ = reloads.await;
    }
    // Sync streams end on the cancelled token; one in a store call finishes it first.
    app.sessions.close();
    if tokio::time::timeout(STORE_CLOSE_TIMEOUT, app.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!("sync streams still running at shutdown");
    }
    // Bounded: a store whose flush is wedged (sled after a failed write) must not keep
    // the process from exiting. Everything acknowledged was flushed before its answer.
    match tokio::time::timeout(STORE_CLOSE_TIMEOUT, store.close()).await {
        Ok(closed) => {
            closed?;
            tracing::info!("store closed");
        }
        Err(_) => tracing::error!(
            "the store did not close within {}s; exiting without the final flush \
             (everything acknowledged was flushed already)",
            STORE_CLOSE_TIMEOUT.as_secs()
        ),
    }
    Ok(())
}

/// Re-reads the TLS files on each SIGHUP; a failed reload keeps the old ones.
async fn reload_on_sighup(
    mut hangups: tokio::signal::unix::Signal,
    tls: Option<Arc<tls::TlsState>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            Some(()) = hangups.recv() => {}
            _ = shutdown.cancelled() => return,
        }
        match tls.as_ref().map(|tls| tls.reload()) {
            None => tracing::info!("SIGHUP: no [tls] configured; nothing to reload"),
            Some(Ok(())) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
            Some(Err(err)) => {
                tracing::error!(error = %format!("{err:#}"), "SIGHUP: TLS reload failed; keeping the old certificate")
            }
        }
    }
}

/// Drops rate-limit state that has refilled, so idle addresses cost no memory.
async fn limits_housekeeping(app: Arc<App>) {
    let mut ticks = tokio::time::interval(LIMITS_HOUSEKEEPING);
    loop {
        tokio::select! {
            _ = ticks.tick() => app.limits.housekeeping(),
            _ = app.shutdown.cancelled() => return,
        }
    }
}

/// Runs the retention sweep every `retention.interval`, off the request path.
async fn retention_loop(app: Arc<App>) {
    let retention = &app.config.retention;
    let policy = RetentionPolicy {
        changes_max_entries: retention.changes_max_entries,
        changes_max_age_ms: retention.changes_max_age.as_millis() as u64,
        results_max_age_ms: retention.results_max_age.as_millis() as u64,
        responses_max_age_ms: retention.get_cache_max_age.as_millis() as u64,
    };
    let mut ticks = tokio::time::interval(retention.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = app.shutdown.cancelled() => return,
        }
        let work = Maintenance {
            retention: policy,
            context_ttl_ms: app.config.streams.context_ttl.as_millis() as u64,
            contexts_max_bytes: app.config.streams.context_max_bytes,
            context_garbage_grace_ms: CONTEXT_GARBAGE_GRACE.as_millis() as u64,
            census_interval: app.config.retention.interval,
        };
        let now = now_ms();
        match app.store.maintain(work, now).await {
            Ok(None) => tracing::debug!("retention sweep: another node is running it"),
            Ok(Some((stats, usage))) => {
                tracing::debug!(
                    ?stats,
                    trimmed_bytes = usage.trimmed_bytes,
                    pieces_collected = usage.pieces_collected,
                    "retention sweep"
                );
                *app.usage.lock().unwrap_or_else(|p| p.into_inner()) = Some((now, usage));
            }
            Err(err) => tracing::warn!(error = %err, "retention sweep failed"),
        }
    }
}
