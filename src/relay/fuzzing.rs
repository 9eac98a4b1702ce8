//! Fuzz entries for the relay's decoders of outside input: the sync protocol's JSON
//! bodies, the client API's parameters (query, headers, path segments, mirrored bodies)
//! and the SSE framing of stored stream chunks. Each takes arbitrary bytes, runs the real
//! decoders on them, and panics only when an invariant breaks (a refusal is fine; a
//! crash, a hang or an answer that breaks a promise is not). Used by the targets in
//! `fuzz/` and by `tests/fuzz_corpus.rs`; not an API.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::value::RawValue;
use serde_json::Value;

use super::changes::{parse_limit, parse_since};
use super::client::wait_param;
use super::framer::SseFramer;
use super::http::{forwarded_query, parse_json, query_pairs, query_value};
use super::mirror::{forwarded_headers, idempotency_key, with_body, Preferences};
use super::router::is_dot_segment;
use super::streams::is_stream_path;
use super::sync::{chunk_data, poll_timeout, validate_updates};
use crate::protocol::{
    json_within_limits, valid_daemon_id, ConnectRequest, CreateKeyRequest, HttpParams, JsonLimit,
    NamedCommandRequest, PollRequest, ResultEntry, ResultsRequest, HOP_BY_HOP_HEADERS,
    MAX_CARRIED_JSON_DEPTH, MAX_JSON_DEPTH,
};

const MAX_WAIT: Duration = Duration::from_secs(120);

/// A body as `POST /sync/connect`, `/sync/poll`, `/sync/results`, a named command or a
/// key creation would receive it.
pub fn sync_json(data: &[u8]) {
    // Whatever the relay accepts, it can hand on inside another document (a poll's
    // answer, a change batch) that serde_json readers, the agent among them, still parse.
    if let Ok(raw) = parse_json::<Box<RawValue>>(data) {
        let text = raw.get();
        let wrapped = format!(r#"{{"commands":[{{"id":"c","method":"m","params":{text}}}]}}"#);
        assert!(
            serde_json::from_str::<Value>(&wrapped).is_ok(),
            "accepted JSON that cannot travel inside a poll's answer"
        );
    } else {
        match json_within_limits(data, MAX_JSON_DEPTH) {
            // A refusal of input within the limits is the parser's.
            Ok(()) => assert!(serde_json::from_slice::<Value>(data).is_err()),
            // The limit checks refuse only what serde_json readers refuse, or what nests
            // deeper than the limit.
            Err(JsonLimit::NumberOutOfRange | JsonLimit::LoneSurrogate) => {
                assert!(
                    serde_json::from_slice::<Value>(data).is_err(),
                    "wrongly refused"
                )
            }
            Err(JsonLimit::TooDeep(max)) => {
                if let Ok(value) = serde_json::from_slice::<Value>(data) {
                    assert!(depth(&value) > max, "refused as too deep, but is not");
                }
            }
        }
    }
    if let Ok(poll) = parse_json::<PollRequest>(data) {
        if let Ok(timeout) = poll_timeout(poll.timeout, Duration::from_secs(60)) {
            assert!(timeout <= Duration::from_secs(60), "timeout not clamped");
        }
        if let Ok(changes) = validate_updates(&poll.updates) {
            assert_eq!(changes.len(), poll.updates.len());
            for change in changes {
                assert!((1..=256).contains(&change.kind.len()));
                assert!(serde_json::from_str::<Value>(&change.data_json).is_ok());
            }
        }
    }
    if let Ok(results) = parse_json::<ResultsRequest>(data) {
        for (index, raw) in results.results.iter().enumerate() {
            let Ok(entry) = serde_json::from_str::<ResultEntry>(raw.get()) else {
                continue;
            };
            if entry.chunk.is_none() {
                continue;
            }
            if let Ok((chunk, bytes)) = chunk_data(index, &entry) {
                assert_eq!(Some(chunk as i64), entry.chunk.filter(|c| *c >= 0));
                if let Some(text) = &entry.data {
                    assert_eq!(bytes, text.as_bytes());
                }
            }
        }
    }
    let _ = parse_json::<ConnectRequest>(data);
    let _ = parse_json::<NamedCommandRequest>(data);
    let _ = parse_json::<CreateKeyRequest>(data);
}

/// A client request's parameters: the first line is a path with its query, the next
/// lines up to an empty one are `name: value` headers, and the rest is a mirrored body.
pub fn client_params(data: &[u8]) {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let mut lines = head.split(|&b| b == b'\n');
    let target = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target.as_str(), None),
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) {
            headers.append(name, value);
        }
    }

    // Query parameters.
    let _ = query_pairs(query);
    let forwarded = forwarded_query(query);
    assert_eq!(
        query_value(Some(&forwarded), "access_token"),
        None,
        "a relay credential would reach the daemon: {forwarded:?}"
    );
    if let Ok(wait) = wait_param(query, MAX_WAIT) {
        assert!(wait <= MAX_WAIT);
    }
    let _ = parse_since(query_value(query, "since").as_deref());
    if let Ok(limit) = parse_limit(query) {
        assert!(limit > 0);
    }

    // Path segments.
    let segments: Vec<&str> = path.split('/').collect();
    for segment in &segments {
        if valid_daemon_id(segment) {
            assert!(!is_dot_segment(segment) && !segment.contains('/'));
        }
    }
    let patterns = vec![vec![
        "approvals".to_owned(),
        "*".to_owned(),
        "stream".to_owned(),
    ]];
    let _ = is_stream_path(&patterns, path.trim_start_matches('/'));

    // Headers.
    let prefs = Preferences::parse(&headers, Duration::from_secs(30), MAX_WAIT);
    assert!(prefs.wait <= MAX_WAIT);
    if let Ok(Some(key)) = idempotency_key(&headers) {
        assert!((1..=255).contains(&key.len()));
    }
    if let Ok(forwarded) = forwarded_headers(&headers) {
        for name in forwarded.keys() {
            assert!(
                !HOP_BY_HOP_HEADERS.contains(&name.as_str())
                    && name != "authorization"
                    && !name.starts_with("x-syncrelay-"),
                "{name} would reach the daemon"
            );
        }
    }

    // A mirrored body: JSON stays JSON only while it can travel inside a command.
    let params = HttpParams {
        method: "POST".into(),
        path: "/api/v1/x".into(),
        query: String::new(),
        headers: serde_json::Map::new(),
        body: Value::Null,
        body_base64: None,
    };
    let params = with_body(params, &headers, bytes::Bytes::copy_from_slice(body));
    let carried = serde_json::to_string(&params).expect("params serialise");
    assert!(
        json_within_limits(carried.as_bytes(), MAX_CARRIED_JSON_DEPTH + 2).is_ok(),
        "a mirrored body too deep to travel inside a command"
    );
}

/// A stored stream context, replayed to clients: the first byte says how many events a
/// client already has (`Last-Event-ID`), the second where to cut the rest into chunks.
pub fn sse_framing(data: &[u8]) {
    let [skip, cut, context @ ..] = data else {
        return;
    };
    let whole = replay(&[context], 0);
    // Every client gets the same bytes, however the daemon's chunks were cut.
    let step = usize::from(*cut).max(1);
    let pieces: Vec<&[u8]> = context.chunks(step).collect();
    assert_eq!(replay(&pieces, 0), whole, "output depends on chunking");
    let events: Vec<&[u8]> = split_events(&whole);
    for (number, event) in events.iter().enumerate() {
        let id = format!("id: {}\n", number + 1);
        assert!(event.starts_with(id.as_bytes()), "events numbered 1, 2, …");
        assert!(!event.contains(&b'\r'), "line ends normalised");
    }
    // A client resuming after event `skip` gets exactly the events after it.
    let skip = usize::from(*skip % 8);
    let resumed = replay(&[context], skip as u64);
    let expected: Vec<u8> = events.iter().skip(skip).flat_map(|e| e.to_vec()).collect();
    assert_eq!(resumed, expected, "resume after {skip}");
}

/// Nesting depth of arrays and objects (a scalar is 0).
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn replay(pieces: &[&[u8]], skip: u64) -> Vec<u8> {
    let mut framer = SseFramer::new(skip);
    let mut out = Vec::new();
    for piece in pieces {
        if let Some(bytes) = framer.push(piece) {
            out.extend_from_slice(&bytes);
        }
    }
    out
}

/// Framed output → its events, each ending in its blank line.
fn split_events(framed: &[u8]) -> Vec<&[u8]> {
    let mut events = Vec::new();
    let mut rest = framed;
    while !rest.is_empty() {
        let end = rest
            .windows(2)
            .position(|w| w == b"\n\n")
            .expect("every event ends with a blank line")
            + 2;
        events.push(&rest[..end]);
        rest = &rest[end..];
    }
    events
}
