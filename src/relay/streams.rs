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
    let signals = app.signals(daemon_id)?;
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
    let (record, source) = if signals.online(config.sync.online_grace) {
        let opened = app.store.open_context(
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
        )?;
        match opened {
            Opened::Started(record) => {
                app.store.commit().await?;
                signals.bump_queue();
                (record, Source::Daemon)
            }
            Opened::Existing(record) if record.state == ContextState::Complete => {
                (record, Source::Cache)
            }
            Opened::Existing(record) => (record, Source::Daemon),
        }
    } else {
        // Offline: a complete copy is served whatever its age; nothing else can be.
        match app.store.current_context(daemon_id, &key)? {
            Some(record)
                if !refresh && record.state == ContextState::Complete && record.servable() =>
            {
                (record, Source::Cache)
            }
            _ => return Err(ApiError::daemon_offline(daemon_id)),
        }
    };
    let record = await_head(app, record).await?;
    // The status and headers (and, for a cache hit, the whole context) go out only once on
    // disk: a crash must not take back what a client was shown.
    app.store.commit_visible().await?;
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
        if record.state != ContextState::Fetching || fetch_is_dead(app, &record)? {
            // Told only once on disk: the end of a fetch, or its command's expiry, may
            // still wait for its flush.
            app.store.commit().await?;
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
            .context(record.context_id)?
            .ok_or_else(|| ApiError::not_found("the context is gone"))?;
    }
}

/// A fetch whose command ended without completing the context will never go on. The
/// command may have finished with the context's last chunk after `record` was read, so a
/// final command is checked against a fresh read of the context.
fn fetch_is_dead(app: &App, record: &ContextRecord) -> Result<bool, ApiError> {
    if record.state != ContextState::Fetching {
        return Ok(false);
    }
    let command = app.store.command_at(&record.command_id, now_ms())?;
    if command.is_some_and(|c| !c.state.is_final()) {
        return Ok(false);
    }
    let fresh = app.store.context(record.context_id)?;
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
    // Once a record read as ended was found on disk, nothing of the context changes.
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
    // Once settled, the record read last is the record for good.
    let mut last_record: Option<ContextRecord> = None;
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
        let record = match last_record.take() {
            Some(record) if settled => Ok(Some(record)),
            _ => app.store.context(context_id),
        };
        let read = match record {
            Ok(Some(record)) => app
                .store
                .context_chunks(context_id, next, rooms.len())
                .map(|chunks| (record, chunks)),
            Ok(None) => return,
            Err(err) => Err(err),
        };
        let (record, chunks) = match read {
            Ok(read) => read,
            Err(err) => {
                drop(rooms);
                return storage_failed(&err).await;
            }
        };
        if !chunks.is_empty() {
            // These may be chunks (or the end) whose post still waits for its flush; a
            // crash would take them back, and a refetch may cut the context otherwise.
            if !settled {
                if let Err(err) = app.store.commit_visible().await {
                    drop(rooms);
                    return storage_failed(&err).await;
                }
                settled = record.state != ContextState::Fetching;
            }
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
            last_record = Some(record);
            continue;
        }
        drop(rooms);
        let dead = fetch_is_dead(&app, &record).unwrap_or(true);
        if next >= record.chunks && (record.state != ContextState::Fetching || dead) {
            // The end goes out only once on disk too. A dead fetch was read from its
            // command's state, whose final writes (expiry among them) are not tracked.
            let durable = match (settled, dead) {
                (true, _) => Ok(()),
                (false, false) => app.store.commit_visible().await,
                (false, true) => app.store.commit().await,
            };
            if let Err(err) = durable {
                return storage_failed(&err).await;
            }
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
