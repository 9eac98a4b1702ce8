//! The request path around the routes ([`super::api`]): before any route, the source
//! address's rate limit; then, in one layer ([`policy`]) by each route's guard, its
//! documented methods and authentication (bearer key, or a verified TLS client
//! certificate), the key's rate limit and the authorization matrix ([`authorize`]) before
//! any body is read. A request or event stream whose key is
//! revoked meanwhile ends with 401. Every response carries `X-Syncrelay-Source`; every
//! failure is the design's error JSON. Each request runs in a span naming its route
//! template, key and daemon (never a token).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::IntoResponse;
use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::Method;
use hyper::body::{Frame, Incoming};
use tokio::sync::watch;
use tower::ServiceExt;

use super::api::DaemonScope;
use super::api::{Guard, Policy};
use super::auth::{authenticate, authorize as authorize_access, bearer, Access, Principal};
use super::http::{ApiError, Source, SOURCE};
use super::limits::{AddrKey, Limited};
use super::server::Connection;
use super::{streams, App, Response};
use crate::config::IpNet;
use crate::protocol::valid_daemon_id;

pub const DAEMONS_PREFIX: &str = "/api/v1/daemons/";

/// One request's authentication state, shared by the route layers and the revocation
/// watch (a request extension).
struct RequestCtx {
    app: Arc<App>,
    connection: Arc<Connection>,
    /// Set once the request authenticated.
    principal: OnceLock<Arc<Principal>>,
    /// The revocation generation when the request began.
    generation: u64,
    /// The client's address as rate limits see it.
    addr: AddrKey,
}

/// Requests by matched route template (`/metrics`' `syncrelay_requests_total`): the
/// documented templates, counted without a lock, and any other (which would be a route
/// the document lacks) in a map.
pub struct RouteCounts {
    documented: BTreeMap<String, AtomicU64>,
    other: Mutex<BTreeMap<String, u64>>,
}

/// The label of requests no route matched.
const UNMATCHED: &str = "unmatched";

impl RouteCounts {
    pub fn new<'a>(templates: impl IntoIterator<Item = &'a String>) -> RouteCounts {
        let mut documented: BTreeMap<String, AtomicU64> = templates
            .into_iter()
            .map(|t| (t.clone(), AtomicU64::new(0)))
            .collect();
        documented.insert(UNMATCHED.to_owned(), AtomicU64::new(0));
        RouteCounts {
            documented,
            other: Mutex::default(),
        }
    }

    fn count(&self, template: &str) {
        match self.documented.get(template) {
            Some(count) => {
                count.fetch_add(1, Relaxed);
            }
            None => {
                *self
                    .other
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(template.to_owned())
                    .or_default() += 1;
            }
        }
    }

    /// Requests counted, all routes.
    pub fn total(&self) -> u64 {
        let other: u64 = self
            .other
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum();
        self.documented
            .values()
            .map(|n| n.load(Relaxed))
            .sum::<u64>()
            + other
    }

    fn render(&self, text: &mut String) {
        use std::fmt::Write;
        text.push_str("# TYPE syncrelay_requests_total counter\n");
        let other = self.other.lock().unwrap_or_else(|e| e.into_inner());
        let all = self
            .documented
            .iter()
            .map(|(t, n)| (t, n.load(Relaxed)))
            .chain(other.iter().map(|(t, n)| (t, *n)));
        for (template, count) in all {
            let _ = writeln!(
                text,
                "syncrelay_requests_total{{route=\"{template}\"}} {count}"
            );
        }
    }
}

/// Serves one request in a span naming its method and, once matched, its route template,
/// key and daemon (never a token).
pub async fn handle(
    app: Arc<App>,
    routes: axum::Router,
    connection: Arc<Connection>,
    request: Request<Incoming>,
) -> axum::response::Response {
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        route = tracing::field::Empty,
        key_id = tracing::field::Empty,
        daemon_id = tracing::field::Empty,
    );
    tracing::Instrument::instrument(handle_in_span(app, routes, connection, request), span).await
}

async fn handle_in_span(
    app: Arc<App>,
    routes: axum::Router,
    connection: Arc<Connection>,
    mut request: Request<Incoming>,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    one_leading_slash(&mut request);
    let family = super::RouteFamily::of(request.uri().path());
    let mut revocations = app.hub.revocations.subscribe();
    let addr = client_address(&app.config.server.trusted_proxies, &connection, &request);
    let ctx = Arc::new(RequestCtx {
        addr,
        app: app.clone(),
        connection,
        principal: OnceLock::new(),
        generation: *revocations.borrow_and_update(),
    });
    request.extensions_mut().insert(ctx.clone());
    let mut response = match app.limits.check_address(addr) {
        Err(limited) => rate_limited(&app, limited).into_response(),
        Ok(()) => tokio::select! {
            response = routes.oneshot(request) => {
                let mut response = match response {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                // axum states an empty body's length; the relay never does (hyper adds it
                // where HTTP wants it, and never on a HEAD answer, a 204 or a 304).
                if response.headers().get(CONTENT_LENGTH).is_some_and(|v| v == "0") {
                    response.headers_mut().remove(CONTENT_LENGTH);
                }
                response
            }
            () = revoked(&app, &ctx.principal, &mut revocations) => {
                ApiError::unauthorized("the key was revoked").into_response()
            }
        },
    };
    app.metrics.request_seconds[family as usize].observe(started.elapsed().as_secs_f64());
    if !response.headers().contains_key(SOURCE) {
        response
            .headers_mut()
            .insert(SOURCE, Source::Relay.header());
    }
    // An event stream or a sync stream outlives its handler: it ends when its key is
    // revoked, with a last event or line that says so.
    let content_type = response.headers().get(http::header::CONTENT_TYPE);
    let last = match content_type.map(|v| v.as_bytes()) {
        Some(t) if t.starts_with(b"text/event-stream") => Some(REVOKED_EVENT),
        Some(t) if t.starts_with(super::sync_stream::NDJSON.as_bytes()) => Some(REVOKED_LINE),
        _ => None,
    };
    if let (Some(last), Some(principal)) = (last, ctx.principal.get()) {
        if !principal.by_certificate {
            // A revocation replaces the rest of the body with one event.
            response.headers_mut().remove(CONTENT_LENGTH);
            let principal = OnceLock::from(principal.clone());
            let app = app.clone();
            let until = Box::pin(async move { revoked(&app, &principal, &mut revocations).await });
            response = response.map(|body| {
                axum::body::Body::new(UntilRevoked {
                    body,
                    last,
                    revoked: Mutex::new(Some(until)),
                })
            });
        }
    }
    response
}

/// `//healthz` is `/healthz`, as it always was: the routes match one leading slash.
fn one_leading_slash(request: &mut Request<Incoming>) {
    let path = request.uri().path();
    if !path.starts_with("//") {
        return;
    }
    let mut path_and_query = format!("/{}", path.trim_start_matches('/'));
    if let Some(query) = request.uri().query() {
        path_and_query = format!("{path_and_query}?{query}");
    }
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}

/// The one layer of every route (and of the fallback): names the matched template in the
/// request's span, counts the request by it, and applies the route's [`Guard`]: its
/// credentials and its documented methods, in the guard's order.
pub async fn policy(
    State(policies): State<Arc<BTreeMap<String, Policy>>>,
    mut request: Request,
    next: Next,
) -> axum::response::Response {
    let policy = request
        .extensions()
        .get::<MatchedPath>()
        .and_then(|matched| policies.get(matched.as_str()));
    let label = policy.map_or(UNMATCHED, |policy| policy.label.as_str());
    tracing::Span::current().record("route", tracing::field::display(label));
    if let Ok(ctx) = ctx(request.extensions()) {
        ctx.app.metrics.routes.count(label);
    }
    let Some(policy) = policy else {
        return next.run(request).await;
    };
    let refused = |policy: &Policy| {
        let mut err = ApiError::new(
            http::StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("this route accepts {}", policy.allow),
        );
        err.allow = Some(policy.allow.clone());
        err
    };
    let method_ok = policy
        .methods
        .as_ref()
        .is_none_or(|methods| methods.contains(request.method()));
    let checked = match policy.guard {
        Guard::Open => method_ok.then_some(()).ok_or_else(|| refused(policy)),
        Guard::MethodFirst(need) => match method_ok {
            true => authorize(&mut request, need).await,
            false => Err(refused(policy)),
        },
        Guard::CredentialsFirst(need) => authorize(&mut request, need)
            .await
            .and_then(|()| method_ok.then_some(()).ok_or_else(|| refused(policy))),
    };
    match checked {
        Ok(()) => next.run(request).await,
        Err(err) => err.into_response(),
    }
}

/// Who a route admits (the authorization matrix's families).
#[derive(Clone, Copy, Debug)]
pub enum Need {
    /// `/sync/*`: daemon keys and certificates.
    Sync,
    /// Client routes that name no daemon.
    Client,
    /// `/api/v1/daemons/{daemon_id}/…`: the id as sent must be valid (400) and in the
    /// key's scope; `?access_token=` counts only on event streams, where a browser's
    /// EventSource cannot send headers.
    Daemon,
    /// `/admin/*`.
    Admin,
}

/// Authenticates and authorizes the request for `need`, leaving the [`Principal`] (and
/// for daemon routes the [`DaemonScope`]) in its extensions.
pub async fn authorize<B>(request: &mut http::Request<B>, need: Need) -> Result<(), ApiError> {
    let ctx = ctx(request.extensions())?.clone();
    let ctx = &*ctx;
    // Only the parts that are `Sync` are held across the key lookup (a body is not).
    let (method, headers, uri) = (request.method(), request.headers(), request.uri());
    let plain = |access| principal(ctx, headers, uri, false, access);
    let (principal, scope) = match need {
        Need::Sync => (plain(Access::Sync(None)).await?, None),
        Need::Client => (plain(Access::Client(None)).await?, None),
        Need::Admin => (plain(Access::Admin).await?, None),
        Need::Daemon => {
            let scope = DaemonScope::of(uri);
            let tail = scope.tail();
            let is_sse = method == Method::GET
                && (tail == "stream/events"
                    || streams::is_stream_path(&ctx.app.config.streams.paths, tail));
            if !valid_daemon_id(scope.daemon_id()) {
                return Err(ApiError::bad_request("invalid daemon id"));
            }
            let access = Access::Client(Some(scope.daemon_id()));
            let principal = principal(ctx, headers, uri, is_sse, access).await?;
            (principal, Some(scope))
        }
    };
    if let Some(scope) = scope {
        request.extensions_mut().insert(scope);
    }
    request.extensions_mut().insert(principal);
    Ok(())
}

fn ctx(extensions: &http::Extensions) -> Result<&Arc<RequestCtx>, ApiError> {
    extensions
        .get::<Arc<RequestCtx>>()
        .ok_or_else(|| ApiError::unauthorized("no credentials"))
}

/// The relay a request was made to (for the fallback, which has no state).
pub fn request_app<B>(request: &http::Request<B>) -> Arc<App> {
    request
        .extensions()
        .get::<Arc<RequestCtx>>()
        .expect("every request passes handle")
        .app
        .clone()
}

/// Resolves once the request's key has been revoked (never for certificates, or before
/// the request authenticated: [`principal`] checks that window itself).
async fn revoked(
    app: &App,
    principal: &OnceLock<Arc<Principal>>,
    revocations: &mut watch::Receiver<u64>,
) {
    loop {
        if revocations.changed().await.is_err() {
            return std::future::pending().await;
        }
        if let Some(principal) = principal.get() {
            if !principal.by_certificate
                && matches!(app.store.key(&principal.key_id).await, Ok(None))
            {
                return;
            }
        }
    }
}

/// An event-stream (or sync stream) body that ends when its key is revoked, with an
/// `error` event (line) first, so that a client never takes a cut-off stream (a context)
/// for a complete one.
struct UntilRevoked {
    body: axum::body::Body,
    /// The event or line that ends the body.
    last: &'static str,
    /// `None` once revoked. In a mutex only so the body is `Sync`; never contended.
    revoked: Mutex<Option<Pin<Box<dyn std::future::Future<Output = ()> + Send>>>>,
}

const REVOKED_EVENT: &str =
    "event: error\ndata: {\"code\":\"unauthorized\",\"message\":\"the key was revoked\"}\n\n";
const REVOKED_LINE: &str =
    "{\"error\":{\"code\":\"unauthorized\",\"message\":\"the key was revoked\"}}\n";

impl hyper::body::Body for UntilRevoked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let last = self.last;
        let revoked = self.revoked.get_mut().unwrap_or_else(|e| e.into_inner());
        let Some(future) = revoked else {
            return Poll::Ready(None);
        };
        if future.as_mut().poll(cx).is_ready() {
            *revoked = None;
            let event = Frame::data(Bytes::from_static(last.as_bytes()));
            return Poll::Ready(Some(Ok(event)));
        }
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}

/// The client's address: the peer's, or behind a trusted proxy the last address in
/// `X-Forwarded-For` that is not itself a trusted proxy.
fn client_address(
    trusted: &[IpNet],
    connection: &Connection,
    request: &Request<Incoming>,
) -> AddrKey {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(connection.peer.ip()) {
        return connection.addr;
    }
    let forwarded = request
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|hop| hop.trim().parse::<IpAddr>().ok())
        .collect::<Vec<_>>();
    for hop in forwarded.into_iter().rev() {
        match hop {
            Some(ip) if is_trusted(ip) => continue,
            Some(ip) => return AddrKey::of(ip),
            // A hop we cannot read: stop trusting the chain here.
            None => break,
        }
    }
    connection.addr
}

fn rate_limited(app: &App, limited: Limited) -> ApiError {
    app.metrics.rate_limited.fetch_add(1, Relaxed);
    ApiError::rate_limited(limited.retry_after_secs())
}

/// The cluster's series: this node's name, NATS connectivity, the daemons it holds, hints
/// and their latency. Which node holds which daemon is in `/admin/daemons` (this page names
/// no daemon).
fn render_cluster(text: &mut String, cluster: &super::cluster::Cluster) {
    use std::fmt::Write;
    let m = &cluster.metrics;
    let _ = writeln!(
        text,
        "# TYPE syncrelay_cluster_node_info gauge\nsyncrelay_cluster_node_info{{node=\"{}\"}} 1",
        cluster.node
    );
    for (name, kind, value) in [
        (
            "syncrelay_cluster_nats_connected",
            "gauge",
            cluster.nats_connected() as u64,
        ),
        (
            "syncrelay_cluster_daemons_held",
            "gauge",
            cluster.daemons_held(),
        ),
        (
            "syncrelay_cluster_hints_sent_total",
            "counter",
            m.hints_sent.load(Relaxed),
        ),
        (
            "syncrelay_cluster_hints_received_total",
            "counter",
            m.hints_received.load(Relaxed),
        ),
        (
            "syncrelay_cluster_hints_dropped_total",
            "counter",
            m.hints_dropped.load(Relaxed),
        ),
        (
            "syncrelay_cluster_fallback_rereads_total",
            "counter",
            m.fallback_rereads.load(Relaxed),
        ),
    ] {
        let _ = writeln!(text, "# TYPE {name} {kind}\n{name} {value}");
    }
    text.push_str("# TYPE syncrelay_cluster_hint_seconds histogram\n");
    m.hint_seconds
        .render(text, "syncrelay_cluster_hint_seconds", "");
}

/// `/metrics`: counters only, no ids or keys, so it needs no credentials.
pub async fn metrics(app: &App) -> Response {
    use std::fmt::Write;
    let stats = app.store.commit_stats();
    let m = &app.metrics;
    let mut text = String::new();
    let (reads_held, reads_held_bytes) = app.hub.reads_held();
    let series = [
        (
            "syncrelay_connections_accepted_total",
            "counter",
            m.connections_accepted.load(Relaxed),
        ),
        (
            "syncrelay_connections_open",
            "gauge",
            m.connections_open.load(Relaxed).max(0) as u64,
        ),
        (
            "syncrelay_connections_refused_total",
            "counter",
            m.connections_refused.load(Relaxed),
        ),
        (
            "syncrelay_tls_handshake_failures_total",
            "counter",
            m.tls_handshake_failures.load(Relaxed),
        ),
        (
            "syncrelay_auth_failures_total",
            "counter",
            m.auth_failures.load(Relaxed),
        ),
        (
            "syncrelay_rate_limited_total",
            "counter",
            m.rate_limited.load(Relaxed),
        ),
        (
            "syncrelay_rate_limit_tracked",
            "gauge",
            app.limits.tracked() as u64,
        ),
        (
            "syncrelay_daemons_online",
            "gauge",
            app.hub.daemons_online(app.config.sync.online_grace) as u64,
        ),
        (
            "syncrelay_polls_waiting",
            "gauge",
            app.hub.polls_waiting() as u64,
        ),
        ("syncrelay_reads_held", "gauge", reads_held as u64),
        (
            "syncrelay_reads_held_bytes",
            "gauge",
            reads_held_bytes as u64,
        ),
        (
            "syncrelay_streamed_responses_open",
            "gauge",
            m.outlets.open.load(Relaxed).max(0) as u64,
        ),
        (
            "syncrelay_streamed_responses_waiting",
            "gauge",
            m.outlets.waiting.load(Relaxed).max(0) as u64,
        ),
        (
            "syncrelay_streamed_responses_stalled_total",
            "counter",
            m.outlets.stalled.load(Relaxed),
        ),
        ("syncrelay_store_flushes_total", "counter", stats.flushes),
        ("syncrelay_store_commits_total", "counter", stats.commits),
    ];
    let mut series: Vec<_> = series
        .into_iter()
        .map(|(n, k, v)| (n, k, Some(v)))
        .collect();
    // Totals only: /metrics needs no key, so it names no daemon.
    let daemons = app.store.daemons().await.ok();
    series.push((
        "syncrelay_daemons",
        "gauge",
        daemons.as_ref().map(|d| d.len() as u64),
    ));
    series.push((
        "syncrelay_commands_unfinished",
        "gauge",
        daemons.as_ref().map(|d| d.iter().map(|d| d.queued).sum()),
    ));
    series.push((
        "syncrelay_store_disk_bytes",
        "gauge",
        app.store.size_on_disk().await.ok(),
    ));
    for (name, kind, value) in series {
        if let Some(value) = value {
            let _ = writeln!(text, "# TYPE {name} {kind}\n{name} {value}");
        }
    }
    text.push_str("# TYPE syncrelay_request_duration_seconds histogram\n");
    for family in super::RouteFamily::ALL {
        m.request_seconds[family as usize].render(
            &mut text,
            "syncrelay_request_duration_seconds",
            &format!("family=\"{}\"", family.label()),
        );
    }
    app.store.render_commit_histograms(&mut text);
    if let Some(cluster) = &app.cluster {
        render_cluster(&mut text, cluster);
    }
    app.metrics.routes.render(&mut text);
    // The last census of the retention sweep (totals, by state and by tree; no daemon ids).
    if let Some((at_ms, usage)) = app.usage.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        let _ = writeln!(
            text,
            "# TYPE syncrelay_store_census_timestamp_seconds gauge\n\
             syncrelay_store_census_timestamp_seconds {:.3}",
            *at_ms as f64 / 1000.0
        );
        text.push_str("# TYPE syncrelay_commands gauge\n");
        for (state, count) in &usage.commands {
            let _ = writeln!(text, "syncrelay_commands{{state=\"{state}\"}} {count}");
        }
        text.push_str("# TYPE syncrelay_store_tree_bytes gauge\n");
        for (tree, tree_usage) in &usage.trees {
            let _ = writeln!(
                text,
                "syncrelay_store_tree_bytes{{tree=\"{tree}\"}} {}",
                tree_usage.bytes
            );
        }
        text.push_str("# TYPE syncrelay_store_tree_entries gauge\n");
        for (tree, tree_usage) in &usage.trees {
            let _ = writeln!(
                text,
                "syncrelay_store_tree_entries{{tree=\"{tree}\"}} {}",
                tree_usage.entries
            );
        }
        let _ = writeln!(
            text,
            "# TYPE syncrelay_daemons_over_budget gauge\nsyncrelay_daemons_over_budget {}",
            usage.over_budget.len()
        );
    }
    let mut response = Response::new(super::http::full(text));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// `.` or `..`, also percent-encoded: forwarded, it would step outside the daemon's API.
pub(super) fn is_dot_segment(segment: &str) -> bool {
    let decoded = segment.replace("%2e", ".").replace("%2E", ".");
    decoded == "." || decoded == ".."
}

/// A backslash, raw or percent-encoded: URL parsers (the agent's among them) take it for a
/// `/` in http URLs, so `..\x` would step outside the daemon's API past the check above.
pub(super) fn has_backslash(segment: &str) -> bool {
    segment.contains('\\') || segment.to_ascii_lowercase().contains("%5c")
}

/// Authenticates the request and authorizes it for `access`. Failed authentications
/// count against the source address; the key's own rate limit applies after.
async fn principal(
    ctx: &RequestCtx,
    headers: &http::HeaderMap,
    uri: &http::Uri,
    allow_query_token: bool,
    access: Access<'_>,
) -> Result<Arc<Principal>, ApiError> {
    let app = &*ctx.app;
    let token = bearer(headers, uri.query(), allow_query_token);
    let principal = match (token, &ctx.connection.certificate) {
        (None, Some(identity)) if identity.still_valid() => {
            Principal::certificate(identity.daemon_id.clone())
        }
        (None, Some(_)) => {
            app.metrics.auth_failures.fetch_add(1, Relaxed);
            return Err(ApiError::unauthorized(
                "the client certificate has expired or is no longer trusted",
            ));
        }
        (token, _) => match authenticate(&app.store, token).await {
            Ok(principal) => principal,
            Err(err) if err.status == http::StatusCode::UNAUTHORIZED => {
                app.metrics.auth_failures.fetch_add(1, Relaxed);
                app.limits
                    .auth_failed(ctx.addr)
                    .map_err(|limited| rate_limited(app, limited))?;
                return Err(err);
            }
            Err(err) => return Err(err),
        },
    };
    let span = tracing::Span::current();
    span.record("key_id", tracing::field::display(&principal.key_id));
    let daemon_id = match access {
        Access::Client(Some(daemon_id)) | Access::Sync(Some(daemon_id)) => Some(daemon_id),
        _ => principal.daemon_id.as_deref(),
    };
    if let Some(daemon_id) = daemon_id {
        span.record("daemon_id", tracing::field::display(daemon_id));
    }
    app.limits
        .check_key(&principal.key_id)
        .map_err(|limited| rate_limited(app, limited))?;
    // A revocation since the request began may have raced the lookup above; the
    // revocation watch only covers what comes after this point.
    if !principal.by_certificate
        && app.hub.revocations.generation() != ctx.generation
        && app.store.key(&principal.key_id).await?.is_none()
    {
        return Err(ApiError::unauthorized("invalid or revoked key"));
    }
    authorize_access(&principal, access)?;
    let principal = Arc::new(principal);
    let _ = ctx.principal.set(principal.clone());
    Ok(principal)
}
