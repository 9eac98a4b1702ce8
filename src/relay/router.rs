//! Routing: one match over method and path segments. Before any route, the source
//! address's rate limit; then authentication (bearer key, or a verified TLS client
//! certificate), the key's rate limit and the authorization matrix ([`authorize`]) before
//! any body is read. A request or event stream whose key is revoked meanwhile ends with
//! 401. Every response carries `X-Syncrelay-Source`; every failure is the design's error
//! JSON.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use tokio::sync::watch;

use super::auth::{authenticate, authorize, bearer, Access, Principal};
use super::http::{json, read_body, ApiError, Body, Source, SOURCE};
use super::limits::{AddrKey, Limited};
use super::server::Connection;
use super::{admin_api, changes, client, mirror, streams, sync, App, Response};
use crate::config::IpNet;
use crate::protocol::valid_daemon_id;

/// The OpenAPI 3.1 document of the relay's own routes.
const OPENAPI: &str = include_str!("openapi.json");

/// One request's authentication state, shared with the revocation watch.
struct Ctx<'a> {
    app: &'a Arc<App>,
    connection: &'a Connection,
    /// Set once the request authenticated.
    principal: OnceLock<Principal>,
    /// The revocation generation when the request began.
    generation: u64,
    /// The client's address as rate limits see it.
    addr: AddrKey,
}

/// The route a path matches, as its template (ids in braces): a log line's `route`, with
/// no id or token in it.
fn route_template(path: &str) -> &'static str {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["healthz"] => "/healthz",
        ["readyz"] => "/readyz",
        ["metrics"] => "/metrics",
        ["openapi.json"] => "/openapi.json",
        ["sync", "connect"] => "/sync/connect",
        ["sync", "poll"] => "/sync/poll",
        ["sync", "results"] => "/sync/results",
        ["api", "v1", "daemons"] => "/api/v1/daemons",
        ["api", "v1", "daemons", _] => "/api/v1/daemons/{daemon_id}",
        ["api", "v1", "daemons", _, "changes"] => "/api/v1/daemons/{daemon_id}/changes",
        ["api", "v1", "daemons", _, "stream", "events"] => {
            "/api/v1/daemons/{daemon_id}/stream/events"
        }
        ["api", "v1", "daemons", _, "commands"] => "/api/v1/daemons/{daemon_id}/commands",
        ["api", "v1", "daemons", _, ..] => "/api/v1/daemons/{daemon_id}/{path}",
        ["api", "v1", "commands", _] => "/api/v1/commands/{command_id}",
        ["admin", "keys"] => "/admin/keys",
        ["admin", "keys", _] => "/admin/keys/{key_id}",
        ["admin", "daemons"] => "/admin/daemons",
        ["admin", "backup"] => "/admin/backup",
        _ => "unknown",
    }
}

/// Serves one request in a span naming its method and route, and once known, its key and
/// daemon (never a token).
pub async fn handle(
    app: Arc<App>,
    connection: Arc<Connection>,
    request: Request<Incoming>,
) -> Response {
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        route = %route_template(request.uri().path()),
        key_id = tracing::field::Empty,
        daemon_id = tracing::field::Empty,
    );
    tracing::Instrument::instrument(handle_in_span(app, connection, request), span).await
}

async fn handle_in_span(
    app: Arc<App>,
    connection: Arc<Connection>,
    request: Request<Incoming>,
) -> Response {
    let started = std::time::Instant::now();
    let family = super::RouteFamily::of(request.uri().path());
    let mut revocations = app.hub.revocations.subscribe();
    let addr = client_address(&app.config.server.trusted_proxies, &connection, &request);
    let ctx = Ctx {
        addr,
        app: &app,
        connection: &connection,
        principal: OnceLock::new(),
        generation: *revocations.borrow_and_update(),
    };
    let result = match app.limits.check_address(addr) {
        Err(limited) => Err(rate_limited(&app, limited)),
        Ok(()) => tokio::select! {
            result = route(&ctx, request) => result,
            () = revoked(&app, &ctx.principal, &mut revocations) => {
                Err(ApiError::unauthorized("the key was revoked"))
            }
        },
    };
    let mut response = result.unwrap_or_else(ApiError::into_response);
    app.metrics.request_seconds[family as usize].observe(started.elapsed().as_secs_f64());
    if !response.headers().contains_key(SOURCE) {
        response
            .headers_mut()
            .insert(SOURCE, Source::Relay.header());
    }
    // An event stream outlives its handler: it ends when its key is revoked.
    let is_event_stream = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if let (true, Some(principal)) = (is_event_stream, ctx.principal.get()) {
        if !principal.by_certificate {
            let principal = OnceLock::from(principal.clone());
            let app = app.clone();
            let until = Box::pin(async move { revoked(&app, &principal, &mut revocations).await });
            response = response.map(|body| {
                UntilRevoked {
                    body,
                    revoked: Mutex::new(Some(until)),
                }
                .boxed()
            });
        }
    }
    response
}

/// Resolves once the request's key has been revoked (never for certificates, or before
/// the request authenticated: [`principal`] checks that window itself).
async fn revoked(
    app: &App,
    principal: &OnceLock<Principal>,
    revocations: &mut watch::Receiver<u64>,
) {
    loop {
        if revocations.changed().await.is_err() {
            return std::future::pending().await;
        }
        if let Some(principal) = principal.get() {
            if !principal.by_certificate && matches!(app.store.key(&principal.key_id), Ok(None)) {
                return;
            }
        }
    }
}

/// An event-stream body that ends when its key is revoked, with an `error` event first,
/// so that a client never takes a cut-off stream (a context) for a complete one.
struct UntilRevoked {
    body: Body,
    /// `None` once revoked. In a mutex only so the body is `Sync`; never contended.
    revoked: Mutex<Option<Pin<Box<dyn std::future::Future<Output = ()> + Send>>>>,
}

const REVOKED_EVENT: &str =
    "event: error\ndata: {\"code\":\"unauthorized\",\"message\":\"the key was revoked\"}\n\n";

impl hyper::body::Body for UntilRevoked {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let revoked = self.revoked.get_mut().unwrap_or_else(|e| e.into_inner());
        let Some(future) = revoked else {
            return Poll::Ready(None);
        };
        if future.as_mut().poll(cx).is_ready() {
            *revoked = None;
            let event = Frame::data(Bytes::from_static(REVOKED_EVENT.as_bytes()));
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

async fn route(ctx: &Ctx<'_>, request: Request<Incoming>) -> Result<Response, ApiError> {
    let app = ctx.app;
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = request.method().clone();
    match segments.as_slice() {
        ["healthz"] => {
            only(&method, &[Method::GET, Method::HEAD], "GET, HEAD")?;
            Ok(json(
                http::StatusCode::OK,
                &serde_json::json!({ "status": "ok" }),
            ))
        }
        ["openapi.json"] => {
            only(&method, &[Method::GET], "GET")?;
            let mut response = Response::new(super::http::full(OPENAPI));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            Ok(response)
        }
        ["metrics"] => {
            only(&method, &[Method::GET], "GET")?;
            Ok(metrics(app))
        }
        ["readyz"] => {
            only(&method, &[Method::GET, Method::HEAD], "GET, HEAD")?;
            app.store.commit().await?;
            Ok(json(
                http::StatusCode::OK,
                &serde_json::json!({ "status": "ready" }),
            ))
        }
        ["sync", action @ ("connect" | "poll" | "results")] => {
            only(&method, &[Method::POST], "POST")?;
            let principal = principal(ctx, &request, false, Access::Sync(None))?;
            let body = body(app, request).await?;
            match *action {
                "connect" => sync::connect(app, &principal, &body).await,
                "poll" => sync::poll(app, &principal, &body).await,
                _ => sync::results(app, &principal, &body).await,
            }
        }
        ["api", "v1", "daemons"] => {
            only(&method, &[Method::GET], "GET")?;
            let principal = principal(ctx, &request, false, Access::Client(None))?;
            client::list_daemons(app, &principal)
        }
        ["api", "v1", "daemons", daemon_id, rest @ ..] => {
            let daemon_id = daemon_id.to_string();
            let prefix_len = "/api/v1/daemons/".len() + daemon_id.len() + 1;
            let rest_path = path.get(prefix_len..).unwrap_or("").to_owned();
            // `?access_token=` only where a browser's EventSource cannot send headers.
            let is_sse = method == Method::GET
                && (matches!(rest, ["stream", "events"])
                    || streams::is_stream_path(&app.config.streams.paths, &rest_path));
            if !valid_daemon_id(&daemon_id) {
                return Err(ApiError::bad_request("invalid daemon id"));
            }
            let principal = principal(ctx, &request, is_sse, Access::Client(Some(&daemon_id)))?;
            let query = request.uri().query().map(str::to_owned);
            match rest {
                [] => {
                    only(&method, &[Method::GET], "GET")?;
                    client::get_daemon(app, &daemon_id)
                }
                ["changes"] => {
                    only(&method, &[Method::GET], "GET")?;
                    changes::changes(app, &daemon_id, query.as_deref()).await
                }
                ["stream", "events"] => {
                    only(&method, &[Method::GET], "GET")?;
                    changes::stream_events(app, &daemon_id, request.headers(), query.as_deref())
                }
                // Reserved for the relay like `changes` and `stream/events`: never mirrored.
                ["commands"] => {
                    only(&method, &[Method::POST], "POST")?;
                    let headers = request.headers().clone();
                    let body = body(app, request).await?;
                    mirror::named(app, &principal, &daemon_id, &headers, &body).await
                }
                _ if rest
                    .iter()
                    .any(|segment| is_dot_segment(segment) || has_backslash(segment)) =>
                {
                    Err(ApiError::bad_request(
                        "a path may not contain . or .. segments or backslashes",
                    ))
                }
                _ => {
                    if method == Method::GET
                        && streams::is_stream_path(&app.config.streams.paths, &rest_path)
                    {
                        let (parts, _) = request.into_parts();
                        return streams::serve(app, &daemon_id, &rest_path, &parts).await;
                    }
                    let (parts, incoming) = request.into_parts();
                    let body = read_body(
                        incoming,
                        &parts.headers,
                        app.config.limits.max_body_bytes,
                        app.config.limits.body_read_timeout,
                    )
                    .await?;
                    mirror::mirrored(app, &principal, &daemon_id, &rest_path, &parts, body).await
                }
            }
        }
        ["api", "v1", "commands", command_id] => {
            only(&method, &[Method::GET], "GET")?;
            let principal = principal(ctx, &request, false, Access::Client(None))?;
            client::get_command(app, &principal, command_id, request.uri().query()).await
        }
        ["admin", rest @ ..] => {
            let principal = principal(ctx, &request, false, Access::Admin)?;
            match rest {
                ["keys"] if method == Method::GET => admin_api::list_keys(app),
                ["keys"] if method == Method::POST => {
                    let body = body(app, request).await?;
                    admin_api::create_key(app, &body).await
                }
                ["keys"] => Err(ApiError::method_not_allowed("GET, POST")),
                ["keys", key_id] => {
                    only(&method, &[Method::DELETE], "DELETE")?;
                    admin_api::revoke_key(app, key_id).await
                }
                ["daemons"] => {
                    only(&method, &[Method::GET], "GET")?;
                    client::list_daemons(app, &principal)
                }
                ["backup"] => {
                    only(&method, &[Method::POST], "POST")?;
                    let body = body(app, request).await?;
                    admin_api::backup(app, &body).await
                }
                _ => Err(ApiError::not_found(format!("no route {path}"))),
            }
        }
        _ => Err(ApiError::not_found(format!("no route {path}"))),
    }
}

/// `/metrics`: counters only, no ids or keys, so it needs no credentials.
fn metrics(app: &App) -> Response {
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
    let daemons = app.store.daemons().ok();
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
        app.store.size_on_disk().ok(),
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

fn only(method: &Method, allowed: &[Method], allow: &'static str) -> Result<(), ApiError> {
    if allowed.contains(method) {
        Ok(())
    } else {
        Err(ApiError::method_not_allowed(allow))
    }
}

/// Authenticates the request and authorizes it for `access`. Failed authentications
/// count against the source address; the key's own rate limit applies after.
fn principal(
    ctx: &Ctx<'_>,
    request: &Request<Incoming>,
    allow_query_token: bool,
    access: Access<'_>,
) -> Result<Principal, ApiError> {
    let app = ctx.app;
    let token = bearer(request.headers(), request.uri().query(), allow_query_token);
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
        (token, _) => match authenticate(&app.store, token) {
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
        && app.store.key(&principal.key_id)?.is_none()
    {
        return Err(ApiError::unauthorized("invalid or revoked key"));
    }
    authorize(&principal, access)?;
    let _ = ctx.principal.set(principal.clone());
    Ok(principal)
}

async fn body(app: &App, request: Request<Incoming>) -> Result<bytes::Bytes, ApiError> {
    let (parts, incoming) = request.into_parts();
    read_body(
        incoming,
        &parts.headers,
        app.config.limits.max_body_bytes,
        app.config.limits.body_read_timeout,
    )
    .await
}
