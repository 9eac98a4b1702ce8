//! The change log as clients read it: JSON batches (`/changes?since=&limit=&wait=`) and the
//! SSE mirror of the daemon's event stream (`/stream/events`), both served from the store.
//! Readers only see entries up to the hub's committed seq, so nothing a client saw can be
//! lost by a crash and come back different.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, StatusCode};
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::client::wait_param;
use super::http::{json, query_pairs, query_value, ApiError, Source, SOURCE};
use super::outlet::{self, Outlet};
use super::sync::null_raw;
use super::{App, Response};
use crate::protocol::{parse_rfc3339, rfc3339, ChangeView, ChangesResponse, StreamEvent};
use crate::store::ChangeEntry;

/// Entries read from the store per step of an SSE stream.
/// What an event stream reads from the store at a time: at most this many entries, and no
/// more once they hold `.1` bytes of data, so a stalled reader holds little.
const SSE_BATCH: (usize, usize) = (256, 256 << 10);
/// Default `limit` of `/changes`.
const DEFAULT_LIMIT: usize = 100;

/// Resolves `since` (a seq, or an RFC 3339 time) to the seq after which to read.
async fn since_seq(
    app: &App,
    daemon_id: &str,
    since: Option<&str>,
) -> Result<Option<u64>, ApiError> {
    match parse_since(since)? {
        None => Ok(None),
        Some(Since::Seq(seq)) => Ok(Some(seq)),
        Some(Since::Time(time_ms)) => {
            Ok(Some(app.store.seq_before_time(daemon_id, time_ms).await?))
        }
    }
}

/// What `since` names: a seq, or a time in milliseconds since the Unix epoch.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Since {
    Seq(u64),
    Time(u64),
}

pub(super) fn parse_since(since: Option<&str>) -> Result<Option<Since>, ApiError> {
    let Some(text) = since.filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    if let Ok(seq) = text.parse::<u64>() {
        return Ok(Some(Since::Seq(seq)));
    }
    parse_rfc3339(text)
        .map(|ms| Some(Since::Time(ms)))
        .ok_or_else(|| ApiError::bad_request("since must be a seq or an RFC 3339 time"))
}

/// `limit` of `/changes`: a positive integer, [`DEFAULT_LIMIT`] when absent.
pub(super) fn parse_limit(query: Option<&str>) -> Result<usize, ApiError> {
    match query_value(query, "limit") {
        None => Ok(DEFAULT_LIMIT),
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|l| *l > 0)
            .ok_or_else(|| ApiError::bad_request("limit must be a positive integer")),
    }
}

/// `GET /api/v1/daemons/{id}/changes`.
pub async fn changes(
    app: &App,
    daemon_id: &str,
    query: Option<&str>,
) -> Result<Response, ApiError> {
    let signals = app.signals(daemon_id).await?;
    let after = since_seq(app, daemon_id, query_value(query, "since").as_deref())
        .await?
        .unwrap_or(0);
    let limit = parse_limit(query)?.min(app.config.changes.batch_max);
    let wait = wait_param(query, app.config.commands.wait_max)?;
    let deadline = Instant::now() + wait;
    let mut committed_rx = signals.changes.subscribe();
    let (entries, committed) = loop {
        let committed = *committed_rx.borrow_and_update();
        let entries = read(app, daemon_id, after, committed, (limit, usize::MAX)).await?;
        if !entries.is_empty() || Instant::now() >= deadline {
            break (entries, committed);
        }
        tokio::select! {
            _ = committed_rx.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = app.shutdown.cancelled() => break (entries, committed),
        }
    };
    let last_seq = entries.last().map_or(after.min(committed), |e| e.seq);
    let data: Vec<Box<RawValue>> = entries.iter().map(raw_data).collect();
    let views: Vec<ChangeView> = entries
        .iter()
        .zip(&data)
        .map(|(entry, data)| ChangeView {
            seq: entry.seq,
            event: StreamEvent {
                kind: &entry.kind,
                timestamp: rfc3339(entry.timestamp_ms),
                data,
            },
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &ChangesResponse {
            changes: views,
            last_seq,
            more: last_seq < committed,
        },
    ))
}

/// Entries with `after < seq <= committed`.
async fn read(
    app: &App,
    daemon_id: &str,
    after: u64,
    committed: u64,
    (limit, max_bytes): (usize, usize),
) -> Result<Vec<ChangeEntry>, ApiError> {
    if after >= committed {
        return Ok(Vec::new());
    }
    let mut entries = app
        .store
        .changes_page(daemon_id, after, limit, max_bytes)
        .await?;
    entries.retain(|e| e.seq <= committed);
    Ok(entries)
}

fn raw_data(entry: &ChangeEntry) -> Box<RawValue> {
    RawValue::from_string(entry.data_json.clone()).unwrap_or_else(|_| null_raw())
}

/// hld's stream filters.
struct Filter {
    event_types: Vec<String>,
    session_id: Option<String>,
    run_id: Option<String>,
}

impl Filter {
    fn from_query(query: Option<&str>) -> Filter {
        let mut filter = Filter {
            event_types: Vec::new(),
            session_id: None,
            run_id: None,
        };
        for (key, value) in query_pairs(query) {
            match key.as_str() {
                "eventTypes" | "eventTypes[]" => filter.event_types.extend(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .map(str::to_owned),
                ),
                "sessionId" if !value.is_empty() => filter.session_id = Some(value),
                "runId" if !value.is_empty() => filter.run_id = Some(value),
                _ => {}
            }
        }
        filter
    }

    fn matches(&self, entry: &ChangeEntry) -> bool {
        if !self.event_types.is_empty() && !self.event_types.contains(&entry.kind) {
            return false;
        }
        if self.session_id.is_none() && self.run_id.is_none() {
            return true;
        }
        let data: serde_json::Value = serde_json::from_str(&entry.data_json).unwrap_or_default();
        let field_is = |names: [&str; 2], wanted: &Option<String>| match wanted {
            None => true,
            Some(wanted) => names
                .iter()
                .any(|name| data.get(*name).and_then(|v| v.as_str()) == Some(wanted.as_str())),
        };
        field_is(["session_id", "sessionId"], &self.session_id)
            && field_is(["run_id", "runId"], &self.run_id)
    }
}

/// `GET /api/v1/daemons/{id}/stream/events`: replays from `Last-Event-ID` or `?since=`,
/// then follows the log live, with keep-alive comments while idle.
pub async fn stream_events(
    app: &Arc<App>,
    daemon_id: &str,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Response, ApiError> {
    let signals = app.signals(daemon_id).await?;
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let start = match last_event_id {
        Some(text) => Some(
            text.parse::<u64>()
                .map_err(|_| ApiError::bad_request("Last-Event-ID must be a seq"))?,
        ),
        None => since_seq(app, daemon_id, query_value(query, "since").as_deref()).await?,
    };
    // Without a position, a stream starts at the live tail, as hld's own does.
    let mut after = start.unwrap_or_else(|| *signals.changes.borrow());
    let filter = Filter::from_query(query);
    let (outlet, body) = Outlet::open(
        &app.metrics.outlets,
        app.config.limits.body_write_timeout,
        outlet::response_end(),
    );
    let app = app.clone();
    let daemon_id = daemon_id.to_owned();
    // In the request's span, so its log lines say whose stream it is.
    tokio::spawn(tracing::Instrument::in_current_span(async move {
        let mut committed_rx = signals.changes.subscribe();
        let keepalive = app.config.changes.sse_keepalive;
        // One deadline across wake-ups: entries the filter drops must not postpone it.
        let mut keepalive_at = Instant::now() + keepalive;
        if !outlet.send(Bytes::from_static(b": connected\n\n")).await {
            return;
        }
        loop {
            let committed = *committed_rx.borrow_and_update();
            let entries = match read(&app, &daemon_id, after, committed, SSE_BATCH).await {
                Ok(entries) => entries,
                Err(err) => {
                    tracing::warn!(daemon_id = %daemon_id, error = %err.message, "event stream ended");
                    return;
                }
            };
            // More to read at once, without waiting for a wake-up.
            let more = entries.last().is_some_and(|last| last.seq < committed);
            for entry in entries {
                after = entry.seq;
                if !filter.matches(&entry) {
                    continue;
                }
                if !outlet.send(sse_frame(&entry)).await {
                    return;
                }
                keepalive_at = Instant::now() + keepalive;
            }
            if more {
                continue;
            }
            tokio::select! {
                changed = committed_rx.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep_until(keepalive_at) => {
                    if !outlet.send(Bytes::from_static(b": keepalive\n\n")).await {
                        return;
                    }
                    keepalive_at = Instant::now() + keepalive;
                }
                _ = outlet.closed() => return,
                _ = app.shutdown.cancelled() => return,
            }
        }
    }));
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::OK;
    let map = response.headers_mut();
    map.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    map.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    map.insert(SOURCE, Source::Relay.header());
    Ok(response)
}

/// One SSE event in hld's shape: `id: <seq>` and `data: {"type","timestamp","data"}`.
fn sse_frame(entry: &ChangeEntry) -> Bytes {
    let data = raw_data(entry);
    let event = StreamEvent {
        kind: &entry.kind,
        timestamp: rfc3339(entry.timestamp_ms),
        data: &data,
    };
    let event = serde_json::to_string(&event).expect("events serialise");
    Bytes::from(format!("id: {}\ndata: {event}\n\n", entry.seq))
}
