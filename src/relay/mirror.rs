//! The mirrored client API: `ANY /api/v1/daemons/{id}/{path…}` becomes an `http` command
//! and `POST /api/v1/daemons/{id}/commands` a named one. Both share one flow: reads are
//! never queued for an offline daemon (the last cached 2xx GET is served instead), writes
//! are committed to disk before anything is answered, the caller waits up to
//! `Prefer: wait=N` for the result and otherwise gets `202 Accepted` with a `Location`.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AGE, CONTENT_TYPE, LOCATION};
use http::request::Parts;
use http::{HeaderMap, Method, StatusCode};
use serde_json::Value;

use super::auth::Principal;
use super::http::{full, json, ApiError, Source, SOURCE};
use super::{App, Response};
use crate::protocol::{
    json_within_limits, rfc3339, CommandView, HttpParams, HttpResult, NamedCommandRequest,
    HOP_BY_HOP_HEADERS, MAX_CARRIED_JSON_DEPTH,
};
use crate::store::{now_ms, CommandRecord, CommandState, NewCommand};

/// Request headers the relay consumes itself: the relay key, its preferences, its own
/// controls. Forwarding `Authorization` would hand the client's relay key to the daemon.
const RELAY_REQUEST_HEADERS: &[&str] = &["authorization", "prefer", "idempotency-key", "expect"];

const IF_OFFLINE: &str = "x-syncrelay-if-offline";
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// How a completed command's result becomes the client's response.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ResultKind {
    /// The result is `{status, headers, body}` to replay as the response.
    Http,
    /// The result is JSON handed back as a 200 body.
    Named,
}

struct CommandSpec {
    method: String,
    params_json: String,
    write: bool,
    /// For GET and HEAD: the path+query under which the offline copy is kept.
    cache_key: Option<String>,
    head: bool,
    kind: ResultKind,
}

/// `ANY /api/v1/daemons/{id}/{rest}`.
pub async fn mirrored(
    app: &App,
    principal: &Principal,
    daemon_id: &str,
    rest: &str,
    parts: &Parts,
    body: Bytes,
) -> Result<Response, ApiError> {
    let params = HttpParams {
        method: parts.method.as_str().to_owned(),
        path: format!("/api/v1/{rest}"),
        query: super::http::forwarded_query(parts.uri.query()),
        headers: forwarded_headers(&parts.headers)?,
        body: Value::Null,
        body_base64: None,
    };
    let params = with_body(params, &parts.headers, body);
    let read = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
    let spec = CommandSpec {
        method: "http".to_owned(),
        cache_key: matches!(parts.method, Method::GET | Method::HEAD).then(|| cache_key(&params)),
        head: parts.method == Method::HEAD,
        params_json: serde_json::to_string(&params).expect("params serialise"),
        write: !read,
        kind: ResultKind::Http,
    };
    dispatch(app, principal, daemon_id, spec, &parts.headers).await
}

/// `POST /api/v1/daemons/{id}/commands`.
pub async fn named(
    app: &App,
    principal: &Principal,
    daemon_id: &str,
    headers: &HeaderMap,
    request: NamedCommandRequest,
) -> Result<Response, ApiError> {
    if request.method.is_empty() || request.method.len() > 128 {
        return Err(ApiError::bad_request("method must be 1 to 128 characters"));
    }
    if request.method == "http" {
        // `http` commands come from mirrored calls, whose path the relay checks; a named
        // `http` would skip those checks.
        return Err(ApiError::bad_request(
            "method http is reserved: call ANY /api/v1/daemons/{id}/{path} instead",
        ));
    }
    let spec = CommandSpec {
        method: request.method,
        params_json: request
            .params
            .map_or_else(|| "{}".to_owned(), |p| p.get().to_owned()),
        write: true,
        cache_key: None,
        head: false,
        kind: ResultKind::Named,
    };
    dispatch(app, principal, daemon_id, spec, headers).await
}

async fn dispatch(
    app: &App,
    principal: &Principal,
    daemon_id: &str,
    spec: CommandSpec,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let signals = app.signals(daemon_id).await?;
    let prefs = Preferences::from_headers(headers, app);
    let online = signals.online(app.config.sync.online_grace);
    if !online && !spec.write {
        if let Some(cluster) = &app.cluster {
            return remote_read(app, cluster, daemon_id, spec, prefs.wait).await;
        }
        return offline_copy(app, daemon_id, &spec)
            .await
            .ok_or_else(|| ApiError::daemon_offline(daemon_id));
    }
    if !online && header_is(headers, IF_OFFLINE, "fail") {
        let elsewhere = match &app.cluster {
            Some(cluster) => cluster.held_elsewhere(daemon_id).await,
            None => false,
        };
        if !elsewhere {
            return Err(ApiError::daemon_offline(daemon_id));
        }
    }
    if !spec.write {
        return read(app, daemon_id, &signals, spec, prefs.wait).await;
    }
    // A write: stored and committed before anything is answered.
    let idempotency = idempotency_key(headers)?.map(|key| (principal.key_id.clone(), key));
    let ttl = app.config.commands.command_ttl;
    let outcome = app
        .store
        .enqueue(
            NewCommand {
                daemon_id: daemon_id.to_owned(),
                method: spec.method.clone(),
                params_json: spec.params_json.clone(),
                stream: false,
                ttl_ms: ttl.as_millis() as u64,
                idempotency,
                queue_limit: app.config.commands.queue_limit,
            },
            now_ms(),
        )
        .await?;
    if outcome.created {
        signals.bump_stored();
        app.hint(super::cluster::Hint::Stored(daemon_id));
    }
    let command_id = outcome.command.id.clone();
    if prefs.respond_async {
        return Ok(accepted(&outcome.command));
    }
    let last = super::client::await_command(app, &command_id, prefs.wait)
        .await?
        .ok_or_else(|| ApiError::not_found("the command is gone"))?;
    match last.state {
        CommandState::Completed => Ok(completed_response(last.result_json.as_deref(), &spec)),
        CommandState::Failed => Err(daemon_error(last.error_json.as_deref())),
        _ => Ok(accepted(&last)),
    }
}

/// A read, handed to the daemon in memory: it changes nothing, is never queued for later
/// and its answer is the response, so no part of it is stored (the 2xx answer is kept as
/// the offline copy, as a cache).
async fn read(
    app: &App,
    daemon_id: &str,
    signals: &super::hub::DaemonSignals,
    spec: CommandSpec,
    wait: Duration,
) -> Result<Response, ApiError> {
    let outcome = answer_here(
        app,
        daemon_id,
        signals,
        &spec.method,
        &spec.params_json,
        wait,
    )
    .await?;
    render_read(app, daemon_id, &spec, outcome, wait).await
}

/// A read of a daemon held by another relay node, sent there over NATS; no node holding
/// it: the cached copy, or 503 `daemon_offline`.
async fn remote_read(
    app: &App,
    cluster: &super::cluster::Cluster,
    daemon_id: &str,
    spec: CommandSpec,
    wait: Duration,
) -> Result<Response, ApiError> {
    use super::cluster::Remote;
    let remote = cluster
        .remote_read(daemon_id, &spec.method, &spec.params_json, wait)
        .await;
    match remote {
        Remote::Answered(outcome) => render_read(app, daemon_id, &spec, Some(outcome), wait).await,
        Remote::TimedOut => render_read(app, daemon_id, &spec, None, wait).await,
        Remote::QueueFull(limit) => Err(crate::store::StoreError::QueueFull {
            daemon_id: daemon_id.to_owned(),
            limit,
        }
        .into()),
        Remote::NoHolder => offline_copy(app, daemon_id, &spec)
            .await
            .ok_or_else(|| ApiError::daemon_offline(daemon_id)),
    }
}

/// Queues a read for this node's poll or stream of the daemon and awaits its answer;
/// `None`: none within `wait` (or the relay is shutting down).
pub(super) async fn answer_here(
    app: &App,
    daemon_id: &str,
    signals: &super::hub::DaemonSignals,
    method: &str,
    params_json: &str,
    wait: Duration,
) -> Result<Option<super::hub::ReadOutcome>, ApiError> {
    let id = crate::store::new_command_id();
    let mut pending = app.hub.pending_read(daemon_id, &id);
    let until = tokio::time::Instant::now() + wait;
    let read = super::hub::Read {
        id,
        method: method.to_owned(),
        params_json: params_json.to_owned(),
        until,
    };
    let limit = app.config.commands.queue_limit as usize;
    if signals.push_read(read, limit).is_err() {
        return Err(crate::store::StoreError::QueueFull {
            daemon_id: daemon_id.to_owned(),
            limit: limit as u64,
        }
        .into());
    }
    // However this ends (answered, past its deadline, or the client gone and this future
    // dropped), the read leaves its daemon's queue with its body.
    struct Queued<'a>(&'a super::hub::DaemonSignals, String);
    impl Drop for Queued<'_> {
        fn drop(&mut self) {
            self.0.forget_read(&self.1);
        }
    }
    let _queued = Queued(signals, pending.id().to_owned());
    Ok(tokio::select! {
        answer = &mut pending.answer => answer.ok(),
        _ = tokio::time::sleep_until(until) => None,
        _ = app.shutdown.cancelled() => None,
    })
}

/// The client's answer to a read: the daemon's, or (none in time) the cached copy or 504.
async fn render_read(
    app: &App,
    daemon_id: &str,
    spec: &CommandSpec,
    outcome: Option<super::hub::ReadOutcome>,
    wait: Duration,
) -> Result<Response, ApiError> {
    match outcome {
        Some(outcome) if outcome.error_json.is_none() => {
            // Rendered once: for the client, and (a GET's 2xx) as the offline copy.
            let result_json = outcome.result_json.as_deref().unwrap_or("null");
            match (&spec.kind, &spec.cache_key, http_rendered(result_json)) {
                (ResultKind::Http, Some(key), Ok(rendered)) => {
                    if !spec.head {
                        super::sync::keep_copy(app, daemon_id, key, &rendered).await;
                    }
                    Ok(build(rendered, Source::Daemon, spec.head))
                }
                _ => Ok(completed_response(outcome.result_json.as_deref(), spec)),
            }
        }
        Some(outcome) => Err(daemon_error(outcome.error_json.as_deref())),
        None => offline_copy(app, daemon_id, spec).await.ok_or_else(|| {
            ApiError::timeout(format!(
                "daemon {daemon_id} did not answer within {} s",
                wait.as_secs()
            ))
        }),
    }
}

/// `Prefer` (RFC 7240): `wait=N` and `respond-async`; unknown preferences are ignored.
pub(super) struct Preferences {
    pub wait: Duration,
    pub respond_async: bool,
}

impl Preferences {
    fn from_headers(headers: &HeaderMap, app: &App) -> Preferences {
        let commands = &app.config.commands;
        Preferences::parse(headers, commands.wait_default, commands.wait_max)
    }

    pub(super) fn parse(headers: &HeaderMap, default: Duration, max: Duration) -> Preferences {
        let mut prefs = Preferences {
            wait: default,
            respond_async: false,
        };
        let tokens = headers
            .get_all("prefer")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim);
        for token in tokens {
            if token.eq_ignore_ascii_case("respond-async") {
                prefs.respond_async = true;
            } else if let Some(value) = token.strip_prefix("wait=") {
                if let Ok(seconds) = value.trim().parse::<u64>() {
                    prefs.wait = Duration::from_secs(seconds).min(max);
                }
            }
        }
        prefs
    }
}

pub fn header_is(headers: &HeaderMap, name: &str, expected: &str) -> bool {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(expected))
}

pub(super) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
            ))
        })?;
    Ok(Some(key.to_owned()))
}

/// The end-to-end request headers, as the `headers` object of an `http` command.
pub fn forwarded_headers(headers: &HeaderMap) -> Result<serde_json::Map<String, Value>, ApiError> {
    let dropped = connection_listed(headers);
    let mut out = serde_json::Map::new();
    for (name, value) in headers {
        let name = name.as_str();
        if HOP_BY_HOP_HEADERS.contains(&name)
            || RELAY_REQUEST_HEADERS.contains(&name)
            || name.starts_with("x-syncrelay-")
            || dropped.iter().any(|d| d == name)
        {
            continue;
        }
        let value = value
            .to_str()
            .map_err(|_| ApiError::bad_request(format!("header {name} is not visible ASCII")))?;
        match out.get_mut(name) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(value);
            }
            _ => {
                out.insert(name.to_owned(), Value::String(value.to_owned()));
            }
        }
    }
    Ok(out)
}

/// Header names listed in `Connection`, which are hop-by-hop too.
fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect()
}

/// JSON stays JSON, text stays text, anything else travels as base64.
pub(super) fn with_body(mut params: HttpParams, headers: &HeaderMap, body: Bytes) -> HttpParams {
    if body.is_empty() {
        return params;
    }
    let is_json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("json"));
    if is_json && json_within_limits(&body, MAX_CARRIED_JSON_DEPTH).is_ok() {
        if let Ok(value) = serde_json::from_slice::<Value>(&body) {
            params.body = value;
            return params;
        }
    }
    match std::str::from_utf8(&body) {
        Ok(text) => params.body = Value::String(text.to_owned()),
        Err(_) => {
            params.body_base64 = Some(base64::engine::general_purpose::STANDARD.encode(&body))
        }
    }
    params
}

/// Key of the offline copy: the daemon-side path and query.
pub fn cache_key(params: &HttpParams) -> String {
    if params.query.is_empty() {
        params.path.clone()
    } else {
        format!("{}?{}", params.path, params.query)
    }
}

/// A daemon's `http` result as response parts.
pub struct Rendered {
    pub status: StatusCode,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A daemon's status as a final response's: 200–599 only. A 1xx is no final answer (hyper
/// would send a bare `101` with no upgrade and end the exchange, or break an HTTP/2
/// connection), and a code past 599 is not HTTP; both are the daemon's error (502).
pub fn final_status(code: u16) -> Option<StatusCode> {
    (200..=599)
        .contains(&code)
        .then(|| StatusCode::from_u16(code).ok())
        .flatten()
}

pub fn render_http_result(result: &HttpResult) -> Result<Rendered, String> {
    let status = final_status(result.status).ok_or_else(|| {
        format!(
            "status {} is not a final HTTP status (200-599)",
            result.status
        )
    })?;
    let mut headers = Vec::new();
    for (name, value) in &result.headers {
        let lower = name.to_ascii_lowercase();
        if HOP_BY_HOP_HEADERS.contains(&lower.as_str()) || lower == SOURCE.as_str() {
            continue;
        }
        let values: Vec<&str> = match value {
            Value::String(text) => vec![text.as_str()],
            Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
            _ => continue,
        };
        for text in values {
            if HeaderName::from_bytes(lower.as_bytes()).is_ok()
                && HeaderValue::from_str(text).is_ok()
            {
                headers.push((lower.clone(), text.to_owned()));
            }
        }
    }
    let body = if let Some(encoded) = &result.body_base64 {
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|err| format!("body_base64: {err}"))?
    } else {
        match &result.body {
            Value::Null => Vec::new(),
            Value::String(text) => text.as_bytes().to_vec(),
            other => {
                if !headers.iter().any(|(name, _)| name == "content-type") {
                    headers.push(("content-type".into(), "application/json".into()));
                }
                serde_json::to_vec(other).expect("JSON values serialise")
            }
        }
    };
    Ok(Rendered {
        status,
        headers,
        body,
    })
}

fn build(rendered: Rendered, source: Source, head: bool) -> Response {
    let body = if head { Vec::new() } else { rendered.body };
    let mut response = Response::new(full(body));
    *response.status_mut() = rendered.status;
    let map = response.headers_mut();
    for (name, value) in rendered.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            map.append(name, value);
        }
    }
    map.insert(SOURCE, source.header());
    response
}

/// An `http` command's result as the response it stands for.
fn http_rendered(result_json: &str) -> Result<Rendered, String> {
    serde_json::from_str::<HttpResult>(result_json)
        .map_err(|err| err.to_string())
        .and_then(|result| render_http_result(&result))
}

fn completed_response(result_json: Option<&str>, spec: &CommandSpec) -> Response {
    let result_json = result_json.unwrap_or("null");
    match spec.kind {
        ResultKind::Named => {
            let mut response = Response::new(full(result_json.to_owned()));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
                .headers_mut()
                .insert(SOURCE, Source::Daemon.header());
            response
        }
        ResultKind::Http => match http_rendered(result_json) {
            Ok(rendered) => build(rendered, Source::Daemon, spec.head),
            Err(reason) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                format!("the daemon's result is not an http result: {reason}"),
            )
            .to_response(),
        },
    }
}

/// A failed command as the client sees it: 504 when the daemon side timed out, else 502,
/// with the daemon's own code and message.
fn daemon_error(error_json: Option<&str>) -> ApiError {
    let error: Value = error_json
        .and_then(|e| serde_json::from_str(e).ok())
        .unwrap_or(Value::Null);
    let code = error
        .get("code")
        .and_then(Value::as_str)
        .unwrap_or("daemon_error")
        .to_owned();
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| error.as_str().map(str::to_owned))
        .unwrap_or_else(|| "the daemon could not execute the command".to_owned());
    let status = if code == "timeout" {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::BAD_GATEWAY
    };
    let mut err = ApiError::new(status, &code, message);
    if let Some(details) = error.get("details") {
        err = err.with_details(details.clone());
    }
    err
}

async fn offline_copy(app: &App, daemon_id: &str, spec: &CommandSpec) -> Option<Response> {
    let key = spec.cache_key.as_ref()?;
    let cached = match app.store.response(daemon_id, key).await {
        Ok(found) => found?,
        Err(err) => {
            tracing::warn!(error = %err, "could not read an offline copy");
            return None;
        }
    };
    let age_secs = now_ms().saturating_sub(cached.stored_at_ms) / 1000;
    let mut response = build(
        Rendered {
            status: final_status(cached.status)?,
            headers: cached.headers,
            body: cached.body,
        },
        Source::Cache,
        spec.head,
    );
    response
        .headers_mut()
        .insert(AGE, HeaderValue::from(age_secs));
    Some(response)
}

/// `202 Accepted` with the command's state and where to follow it.
fn accepted(command: &CommandRecord) -> Response {
    let mut response = json(StatusCode::ACCEPTED, &command_view(command));
    let location = format!("/api/v1/commands/{}", command.id);
    response.headers_mut().insert(
        LOCATION,
        HeaderValue::from_str(&location).expect("ids are header-safe"),
    );
    response
}

pub fn command_view(command: &CommandRecord) -> CommandView {
    let raw = |text: &Option<String>| {
        text.as_ref()
            .and_then(|t| serde_json::value::RawValue::from_string(t.clone()).ok())
    };
    CommandView {
        id: command.id.clone(),
        daemon_id: command.daemon_id.clone(),
        method: command.method.clone(),
        state: command.state.as_str(),
        created_at: rfc3339(command.created_at_ms),
        result: raw(&command.result_json),
        error: raw(&command.error_json),
        deliveries: command.deliveries,
    }
}
