//! Cache-and-serve streaming. A GET on a configured stream path (default
//! `approvals/*/context/stream`) is served from the stored context for that path+query:
//! replayed from disk when complete and fresh, joined while a fetch is running (stored
//! prefix, then the live tail, nothing missing or doubled at the seam: both come from the
//! same ordered chunk range), or fetched with one stream command that all concurrent
//! clients share. Each client's body is pumped chunk by chunk from the store through an
//! [`Outlet`], which holds at most a few chunks ahead of the client and ends the response
//! of a client that stops reading, so memory depends on the chunk size, not the context
//! size, and a slow client only slows itself.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::request::Parts;
use http::StatusCode;
use tokio::time::Instant;

use super::framer::SseFramer;
use super::http::{ApiError, Source, SOURCE};
use super::mirror::{forwarded_headers, header_is};
use super::outlet::{self, Outlet};
use super::{App, Response};
use crate::protocol::HttpParams;
use crate::store::{now_ms, ContextRecord, ContextRequest, ContextState, Opened};

/// Whether `rest` (a path under a daemon's `/api/v1/`, without query) is a stream path.
pub fn is_stream_path(patterns: &[Vec<String>], rest: &str) -> bool {
    let segments: Vec<&str> = rest.split('/').collect();
    patterns.iter().any(|pattern| {
        pattern.len() == segments.len()
            && pattern
                .iter()
                .zip(&segments)
                .all(|(p, s)| p == "*" || p == s)
    })
}

/// `GET /api/v1/daemons/{id}/<stream path>`.
pub async fn serve(
    app: &Arc<App>,
    daemon_id: &str,
    rest: &str,
    parts: &Parts,
) -> Result<Response, ApiError> {
    let signals = app.signals(daemon_id).await?;
    let params = HttpParams {
        method: "GET".into(),
        path: format!("/api/v1/{rest}"),
        query: super::http::forwarded_query(parts.uri.query()),
        headers: fetch_headers(&parts.headers)?,
        body: serde_json::Value::Null,
        body_base64: None,
    };
    let key = super::mirror::cache_key(&params);
    let refresh = header_is(&parts.headers, CACHE_CONTROL.as_str(), "no-cache")
        || header_is(&parts.headers, "pragma", "no-cache");
    let resume_after = match parts.headers.get("last-event-id") {
        None => 0,
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| ApiError::bad_request("Last-Event-ID must be an event number"))?,
    };
    let config = &app.config;
    // In a cluster the daemon may be online on another node: the command stored here wakes
    // it there (a hint), and its chunks, committed there, wake this stream's pump.
    let online = signals.online(config.sync.online_grace)
        || match &app.cluster {
            Some(cluster) => cluster.held_elsewhere(daemon_id).await,
            None => false,
        };
    let (record, source) = if online {
        let opened = app
            .store
            .open_context(
                ContextRequest {
                    daemon_id: daemon_id.to_owned(),
                    key,
                    params_json: serde_json::to_string(&params).expect("params serialise"),
                    refresh,
                    ttl_ms: config.streams.context_ttl.as_millis() as u64,
                    command_ttl_ms: config.commands.wait_max.as_millis() as u64,
                    queue_limit: config.commands.queue_limit,
                },
                now_ms(),
            )
            .await?;
        match opened {
            Opened::Started(record) => {
                signals.bump_stored();
                app.hint(super::cluster::Hint::Stored(daemon_id));
                (record, Source::Daemon)
            }
            Opened::Existing(record) if record.state == ContextState::Complete => {
                (record, Source::Cache)
            }
            Opened::Existing(record) => (record, Source::Daemon),
        }
    } else {
        // Offline: a complete copy is served whatever its age; nothing else can be.
        match app.store.current_context(daemon_id, &key).await? {
            Some(record)
                if !refresh && record.state == ContextState::Complete && record.servable() =>
            {
                (record, Source::Cache)
            }
            _ => return Err(ApiError::daemon_offline(daemon_id)),
        }
    };
    // The store shows only what is durable: a crash cannot take back the status, the
    // headers or a chunk a client was shown.
    let record = await_head(app, record).await?;
    let status = record
        .status
        .and_then(super::mirror::final_status)
        .unwrap_or(StatusCode::BAD_GATEWAY);
    let sse = status.is_success();
    let (outlet, body) = Outlet::open(
        &app.metrics.outlets,
        config.limits.body_write_timeout,
        outlet::response_end(),
    );
    tokio::spawn(tracing::Instrument::in_current_span(pump(
        app.clone(),
        record.context_id,
        sse.then_some(resume_after),
        outlet,
    )));
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    for (name, value) in &record.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            if name != http::header::CONTENT_LENGTH {
                headers.append(name, value);
            }
        }
    }
    if sse {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    headers.insert(SOURCE, source.header());
    Ok(response)
}

/// The headers of the shared fetch: the client's, less those that describe this client's
/// position or caching wishes. The fetch is always the whole context; `Last-Event-ID`
/// numbers are the relay's own, never the daemon's.
fn fetch_headers(
    headers: &http::HeaderMap,
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    let mut forwarded = forwarded_headers(headers)?;
    for name in ["last-event-id", "cache-control", "pragma"] {
        forwarded.remove(name);
    }
    Ok(forwarded)
}

/// Waits for chunk 0 (the daemon's status and headers), up to the default wait.
async fn await_head(app: &App, mut record: ContextRecord) -> Result<ContextRecord, ApiError> {
    let deadline = Instant::now() + app.config.commands.wait_default;
    let mut watch = app.hub.contexts.watch(&record.context_id.to_string());
    loop {
        if record.status.is_some() {
            return Ok(record);
        }
        if record.state != ContextState::Fetching || fetch_is_dead(app, &record).await? {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "stream_failed",
                "the daemon could not provide the stream",
            ));
        }
        tokio::select! {
            _ = watch.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {
                return Err(ApiError::timeout("the daemon did not start the stream in time"));
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = app.shutdown.cancelled() => return Err(ApiError::timeout("the relay is shutting down")),
        }
        record = app
            .store
            .context(record.context_id)
            .await?
            .ok_or_else(|| ApiError::not_found("the context is gone"))?;
    }
}

/// A fetch whose command ended without completing the context will never go on. The
/// command may have finished with the context's last chunk after `record` was read, so a
/// final command is checked against a fresh read of the context.
async fn fetch_is_dead(app: &App, record: &ContextRecord) -> Result<bool, ApiError> {
    if record.state != ContextState::Fetching {
        return Ok(false);
    }
    let command = app.store.command(&record.command_id, now_ms()).await?;
    if command.is_some_and(|c| !c.state.is_final()) {
        return Ok(false);
    }
    let fresh = app.store.context(record.context_id).await?;
    Ok(fresh.is_none_or(|r| r.state == ContextState::Fetching))
}

/// Copies one context to one client: stored chunks first, then each new chunk once it is
/// on disk, until the context ends. `sse` is the `Last-Event-ID` to resume after, or
/// `None` to pass the bytes on unframed (a non-2xx answer). A chunk is read from the store
/// only once the client has room for it, so what the client has not taken stays on disk.
async fn pump(app: Arc<App>, context_id: u64, sse: Option<u64>, outlet: Outlet) {
    let mut framer = sse.map(SseFramer::new);
    let mut watch = app.hub.contexts.watch(&context_id.to_string());
    let keepalive = app.config.changes.sse_keepalive;
    let mut keepalive_at = Instant::now() + keepalive;
    let mut next = 0u64;
    // Once a record read as ended was read durable, nothing of the context changes.
    let mut settled = false;
    // A storage failure ends an SSE body with an error event, never like a whole context.
    let (sse_body, outlet) = (framer.is_some(), &outlet);
    let storage_failed = move |err: &dyn std::fmt::Display| {
        tracing::warn!(context_id, error = %err, "serving a context failed");
        async move {
            if sse_body {
                send_error_event(outlet, "{\"code\":\"storage_unavailable\"}").await;
            }
        }
    };
    loop {
        // Room first, for as many chunks as the client has room for now.
        let room = match outlet.try_room() {
            Some(room) => room,
            None => {
                // About to wait for the client, who may never come back: hold little.
                framer.as_mut().map(SseFramer::compact);
                let Some(room) = outlet.room().await else {
                    return;
                };
                room
            }
        };
        let mut rooms = vec![room];
        while rooms.len() < outlet::FRAMES_AHEAD {
            match outlet.try_room() {
                Some(room) => rooms.push(room),
                None => break,
            }
        }
        // Durable when read: a crash cannot take back chunks (or the end) a client was
        // sent, which a refetch might cut otherwise.
        let read = app
            .store
            .read_context(context_id, next, rooms.len(), settled)
            .await;
        let (record, chunks) = match read {
            Ok(Some(read)) => read,
            Ok(None) => return,
            Err(err) => {
                drop(rooms);
                return storage_failed(&err).await;
            }
        };
        settled = record.state != ContextState::Fetching;
        if !chunks.is_empty() {
            for (chunk, room) in chunks.into_iter().zip(rooms) {
                next += 1;
                let out = match framer.as_mut() {
                    Some(framer) => framer.push(&chunk),
                    None => (!chunk.is_empty()).then(|| Bytes::from(chunk)),
                };
                if let Some(bytes) = out {
                    room.send(bytes);
                    keepalive_at = Instant::now() + keepalive;
                }
            }
            continue;
        }
        drop(rooms);
        let dead = match fetch_is_dead(&app, &record).await {
            Ok(dead) => dead,
            Err(err) => return storage_failed(&err.message).await,
        };
        if next >= record.chunks && (record.state != ContextState::Fetching || dead) {
            if framer.is_some() && record.state != ContextState::Complete {
                // Say so, rather than end like a complete context.
                let error = record
                    .error_json
                    .as_deref()
                    .unwrap_or("{\"code\":\"stream_failed\"}");
                send_error_event(outlet, error).await;
            }
            return;
        }
        tokio::select! {
            _ = watch.changed() => {}
            _ = tokio::time::sleep_until(keepalive_at) => {
                if framer.is_some() && !outlet.send(Bytes::from_static(b": keepalive\n\n")).await {
                    return;
                }
                keepalive_at = Instant::now() + keepalive;
            }
            _ = outlet.closed() => return,
            _ = app.shutdown.cancelled() => return,
        }
    }
}

/// Ends an SSE body with an `error` event, so the client does not take the end for a
/// complete context. A client already gone is no matter.
async fn send_error_event(outlet: &Outlet, error_json: &str) {
    outlet
        .send(Bytes::from(format!("event: error\ndata: {error_json}\n\n")))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_paths_match_per_segment() {
        let patterns = vec![vec![
            "approvals".to_owned(),
            "*".to_owned(),
            "context".to_owned(),
            "stream".to_owned(),
        ]];
        assert!(is_stream_path(&patterns, "approvals/a1/context/stream"));
        assert!(!is_stream_path(&patterns, "approvals/a1/context"));
        assert!(!is_stream_path(&patterns, "approvals/a1/b/context/stream"));
        assert!(!is_stream_path(&patterns, "sessions/a1/context/stream"));
    }
}
