//! The relay server: [`run`] serves HTTP/1.1 and HTTP/2 (prior-knowledge h2c) on a
//! listener the caller bound, until the caller's shutdown future resolves; then it stops
//! accepting, answers waiting polls and streams, drains connections under a grace timeout
//! and closes the store last.
//!
//! Modules: `server` (accept loop, connections), `router` (routes → handlers), `auth`,
//! `sync` (daemon side), `mirror` and `client` (client API), `changes` (change log and
//! SSE), `admin_api`, `hub` (in-memory wake-ups), `http` (errors, bodies).

mod admin_api;
pub mod auth;
mod changes;
mod client;
mod framer;
pub mod http;
mod hub;
mod mirror;
mod router;
mod server;
mod streams;
mod sync;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::{now_ms, RetentionPolicy, Store};
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
    pub metrics: Metrics,
}

/// Counters exposed at `/metrics` (Prometheus text format).
#[derive(Default)]
pub struct Metrics {
    pub connections_accepted: std::sync::atomic::AtomicU64,
    pub connections_open: std::sync::atomic::AtomicI64,
}

impl App {
    /// The signals of a daemon the store knows; 404 otherwise.
    fn signals(&self, daemon_id: &str) -> Result<Arc<DaemonSignals>, ApiError> {
        self.hub
            .daemon(&self.store, daemon_id)?
            .ok_or_else(|| ApiError::not_found(format!("no daemon {daemon_id}")))
    }
}

/// Serves the relay on `listener` until `shutdown` resolves, then closes `store`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    store: Arc<Store>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let app = Arc::new(App {
        config,
        store: store.clone(),
        hub: Arc::new(Hub::default()),
        shutdown: CancellationToken::new(),
        metrics: Metrics::default(),
    });
    let retention = tokio::spawn(retention_loop(app.clone()));
    server::serve(listener, app.clone(), shutdown).await;
    // `serve` cancelled the token: the sweep loop ends after the sweep in progress, if any.
    let _ = retention.await;
    tokio::task::spawn_blocking(move || store.close()).await??;
    tracing::info!("store closed");
    Ok(())
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
        let store = app.store.clone();
        let streams = app.config.streams.clone();
        let sweep = move || {
            let now = now_ms();
            let stats = store.sweep(&policy, now)?;
            store.sweep_contexts(
                streams.context_ttl.as_millis() as u64,
                streams.context_max_bytes,
                CONTEXT_GARBAGE_GRACE.as_millis() as u64,
                now,
            )?;
            Ok::<_, crate::store::StoreError>(stats)
        };
        match tokio::task::spawn_blocking(sweep).await {
            Ok(Ok(stats)) if stats != Default::default() => {
                tracing::debug!(?stats, "retention sweep");
            }
            Ok(Ok(_)) => {}
            Ok(Err(err)) => tracing::warn!(error = %err, "retention sweep failed"),
            Err(err) => tracing::warn!(error = %err, "retention sweep panicked"),
        }
    }
}
