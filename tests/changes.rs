//! The change log as clients read it, end to end over real sockets: the JSON batches of
//! `GET /api/v1/daemons/{id}/changes` (shape, `since` as a seq or an RFC 3339 time,
//! `limit` and paging by `last_seq`, `wait` long-polls, parameter errors), the SSE mirror
//! of the daemon's event stream at `…/stream/events` (hld's event shape, replay from
//! `Last-Event-ID` or `?since=`, the live tail, hld's filters, keep-alive comments,
//! `?access_token=` and scoping), retention by count, and durability and ordering across a
//! graceful restart. SSE bodies are read chunk by chunk with a small frame parser below;
//! every read and every wait is bounded.

mod common;

use std::time::Duration;

use common::{eventually, Client, Daemon, TestRelay};
use serde_json::{json, Value};
use tokio::time::{timeout, Instant};

/// Upper bound of any single read or request in these tests.
const LIMIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Helpers

/// An update in the sync protocol's shape, stamped `2026-01-01T00:{minute}:00Z`.
fn update(kind: &str, session: &str, run: &str, minute: u32, seq: u64) -> Value {
    json!({
        "type": kind,
        "data": { "session_id": session, "run_id": run, "n": seq },
        "timestamp": stamp(minute),
        "seq": seq,
    })
}

fn stamp(minute: u32) -> String {
    format!("2026-01-01T00:{minute:02}:00Z")
}

/// Milliseconds since the epoch of an RFC 3339 time (any offset, any precision).
fn millis(text: &str) -> i128 {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|err| panic!("{text:?} is not RFC 3339: {err}"))
        .unix_timestamp_nanos()
        / 1_000_000
}

/// Posts `updates` with a non-waiting poll.
async fn post(daemon: &Daemon, updates: Value) {
    let (status, body) = timeout(LIMIT, daemon.poll_raw(updates, false, 0.0))
        .await
        .expect("poll answered in time");
    assert_eq!(status, 200, "poll: {body}");
}

/// Posts `count` updates (`new_approval`, session `s1`, run `r1`), daemon seqs and
/// minutes `first..first + count`.
async fn post_many(daemon: &Daemon, first: u64, count: u64) {
    let updates: Vec<Value> = (first..first + count)
        .map(|seq| update("new_approval", "s1", "r1", (seq % 60) as u32, seq))
        .collect();
    post(daemon, Value::Array(updates)).await;
}

/// `GET …/changes{query}`: status and JSON body.
async fn changes_raw(client: &Client, daemon_id: &str, query: &str) -> (u16, Value) {
    let response = timeout(
        LIMIT,
        client
            .get(&format!("/api/v1/daemons/{daemon_id}/changes{query}"))
            .send(),
    )
    .await
    .expect("changes answered in time")
    .expect("relay reachable");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `GET …/changes{query}`, which must answer 200.
async fn changes(client: &Client, daemon_id: &str, query: &str) -> Value {
    let (status, body) = changes_raw(client, daemon_id, query).await;
    assert_eq!(status, 200, "changes{query}: {body}");
    body
}

fn seqs(body: &Value) -> Vec<u64> {
    body["changes"]
        .as_array()
        .unwrap_or_else(|| panic!("no changes array in {body}"))
        .iter()
        .map(|entry| entry["seq"].as_u64().expect("seq"))
        .collect()
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str, what: &str) {
    assert_eq!(status, want_status, "{what}: {body}");
    assert_eq!(body["error"]["code"], want_code, "{what}: {body}");
}

// ---------------------------------------------------------------------------------------
// A small SSE reader: `Response::chunk()` in a loop, frames split at blank lines.

#[derive(Debug, Default, Clone)]
struct SseFrame {
    id: Option<String>,
    data: Option<String>,
    comments: Vec<String>,
}

impl SseFrame {
    /// Parses one frame (the lines between two blank lines), per the SSE field rules:
    /// `:` starts a comment, `field: value` with one optional space, `data` lines joined
    /// by `\n`.
    fn parse(block: &str) -> SseFrame {
        let mut frame = SseFrame::default();
        let mut data: Vec<&str> = Vec::new();
        for line in block.split('\n') {
            if let Some(comment) = line.strip_prefix(':') {
                frame.comments.push(comment.trim_start().to_owned());
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line, ""),
            };
            match field {
                "id" => frame.id = Some(value.to_owned()),
                "data" => data.push(value),
                _ => {}
            }
        }
        if !data.is_empty() {
            frame.data = Some(data.join("\n"));
        }
        frame
    }

    fn is_event(&self) -> bool {
        self.data.is_some()
    }

    fn seq(&self) -> u64 {
        self.id
            .as_deref()
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("event without a numeric id: {self:?}"))
    }

    fn json(&self) -> Value {
        serde_json::from_str(self.data.as_deref().expect("event data"))
            .unwrap_or_else(|err| panic!("event data is not JSON ({err}): {self:?}"))
    }
}

struct SseStream {
    response: reqwest::Response,
    buffer: String,
}

impl SseStream {
    /// Sends `request` and checks that it opened an event stream served by the relay.
    async fn open(request: reqwest::RequestBuilder) -> SseStream {
        let response = timeout(LIMIT, request.send())
            .await
            .expect("event stream opened in time")
            .expect("relay reachable");
        let status = response.status();
        if status != 200 {
            let body = response.text().await.unwrap_or_default();
            panic!("event stream answered {status}: {body}");
        }
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("text/event-stream"),
            "content-type {content_type:?}"
        );
        assert_eq!(response.headers()["x-syncrelay-source"], "relay");
        SseStream {
            response,
            buffer: String::new(),
        }
    }

    /// The next frame (event or comment), waiting at most `LIMIT` for each chunk.
    async fn next_frame(&mut self) -> SseFrame {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                return SseFrame::parse(block.trim_end_matches('\n'));
            }
            let chunk = timeout(LIMIT, self.response.chunk())
                .await
                .expect("no SSE data within the time limit")
                .expect("event stream failed")
                .expect("event stream ended");
            let text = std::str::from_utf8(&chunk).expect("SSE is UTF-8");
            // The relay ends lines with `\n`; accept `\r\n` as well.
            self.buffer.push_str(&text.replace('\r', ""));
        }
    }

    /// The next frame that carries data, skipping comments.
    async fn next_event(&mut self) -> SseFrame {
        loop {
            let frame = self.next_frame().await;
            if frame.is_event() {
                return frame;
            }
        }
    }

    /// Events up to and including the one with seq `last`; panics past it.
    async fn events_through(&mut self, last: u64) -> Vec<SseFrame> {
        let mut events = Vec::new();
        loop {
            let event = self.next_event().await;
            let seq = event.seq();
            assert!(
                seq <= last,
                "event {seq} beyond {last}: {events:?} then {event:?}"
            );
            events.push(event);
            if seq == last {
                return events;
            }
        }
    }
}

fn event_seqs(events: &[SseFrame]) -> Vec<u64> {
    events.iter().map(SseFrame::seq).collect()
}

fn events_path(daemon_id: &str, query: &str) -> String {
    format!("/api/v1/daemons/{daemon_id}/stream/events{query}")
}

// ---------------------------------------------------------------------------------------
// GET …/changes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_have_the_designed_shape() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("laptop").await;
    let client = relay.client(&["laptop"]).await;
    // Daemon seqs 101..103: the relay numbers its log itself, from 1.
    post(
        &daemon,
        json!([
            update("new_approval", "s1", "r1", 1, 101),
            update("approval_resolved", "s1", "r1", 2, 102),
            update("session_status_changed", "s2", "r2", 3, 103),
        ]),
    )
    .await;

    let response = client
        .get("/api/v1/daemons/laptop/changes")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-syncrelay-source"], "relay");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["last_seq"], 3, "{body}");
    let entries = body["changes"].as_array().expect("changes array");
    assert_eq!(entries.len(), 3, "{body}");
    let kinds = [
        "new_approval",
        "approval_resolved",
        "session_status_changed",
    ];
    for (index, entry) in entries.iter().enumerate() {
        let seq = index as u64 + 1;
        assert_eq!(entry["seq"], seq, "{entry}");
        assert_eq!(entry["type"], kinds[index], "{entry}");
        let timestamp = entry["timestamp"].as_str().expect("timestamp is a string");
        assert_eq!(
            millis(timestamp),
            millis(&stamp(index as u32 + 1)),
            "{entry}"
        );
        assert_eq!(
            entry["data"]["n"],
            100 + seq,
            "data kept as posted: {entry}"
        );
    }
    assert_eq!(
        entries[2]["data"],
        json!({ "session_id": "s2", "run_id": "r2", "n": 103 })
    );
}

/// Event data posted pretty-printed (line breaks, spaces) reaches clients as one compact
/// JSON text: a line break inside an SSE `data:` line would cut the event in two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pretty_printed_event_data_reaches_clients_compact() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let body = format!(
        "{{\"daemon_id\":\"d\",\"connection_id\":\"{}\",\"updates\":[{{\"type\":\"t\",\
         \"seq\":1,\"data\":{{\n  \"b\": 1,\r\n  \"a\": [1, 2]\n}}}}]}}",
        daemon.connection_id.as_deref().unwrap()
    );
    let response = daemon
        .http
        .post(format!("{}/sync/poll", relay.url))
        .bearer_auth(&daemon.key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let compact = r#"{"b":1,"a":[1,2]}"#;

    let changes = client
        .get("/api/v1/daemons/d/changes")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        changes.contains(&format!(r#""data":{compact}"#)),
        "{changes}"
    );

    let mut stream = client
        .get(&events_path("d", "?since=0"))
        .send()
        .await
        .unwrap();
    let mut text = String::new();
    // After the stream's `: connected` comment, the first event.
    while !text.split("\n\n").any(|frame| frame.starts_with("id:")) || !text.ends_with("\n\n") {
        let chunk = timeout(Duration::from_secs(10), stream.chunk())
            .await
            .expect("an event in time")
            .unwrap()
            .expect("the stream stays open");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let event = text
        .split("\n\n")
        .find(|frame| frame.starts_with("id:"))
        .unwrap();
    assert_eq!(
        event,
        format!(
            r#"id: 1{nl}data: {{"type":"t","timestamp":"{ts}","data":{compact}}}"#,
            nl = "\n",
            ts = serde_json::from_str::<Value>(&changes).unwrap()["changes"][0]["timestamp"]
                .as_str()
                .unwrap()
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_seq_is_exclusive() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    post_many(&daemon, 1, 5).await;

    assert_eq!(
        seqs(&changes(&client, "d", "?since=0").await),
        [1, 2, 3, 4, 5]
    );
    let after_two = changes(&client, "d", "?since=2").await;
    assert_eq!(seqs(&after_two), [3, 4, 5]);
    assert_eq!(after_two["last_seq"], 5);
    let at_end = changes(&client, "d", "?since=5").await;
    assert_eq!(seqs(&at_end), Vec::<u64>::new());
    assert_eq!(
        at_end["last_seq"], 5,
        "an empty batch still says where the log is"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_time_returns_entries_at_or_after_it() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    // Entries 1..5 at minutes 10, 20, 30, 40, 50.
    let updates: Vec<Value> = (1..=5)
        .map(|seq| update("e", "s", "r", seq as u32 * 10, seq))
        .collect();
    post(&daemon, Value::Array(updates)).await;

    let query = |since: &str| format!("?since={since}");
    // Exactly an entry's time: that entry is included.
    assert_eq!(
        seqs(&changes(&client, "d", &query(&stamp(30))).await),
        [3, 4, 5]
    );
    // Between two entries: from the next one.
    assert_eq!(
        seqs(&changes(&client, "d", &query("2026-01-01T00:35:00Z")).await),
        [4, 5]
    );
    // Fractional seconds are RFC 3339 too.
    assert_eq!(
        seqs(&changes(&client, "d", &query("2026-01-01T00:49:59.999Z")).await),
        [5]
    );
    // Before everything: all; after everything: nothing.
    assert_eq!(
        seqs(&changes(&client, "d", &query("2025-12-31T23:00:00Z")).await),
        [1, 2, 3, 4, 5]
    );
    let late = changes(&client, "d", &query("2026-01-01T01:00:00Z")).await;
    assert_eq!(seqs(&late), Vec::<u64>::new());
    assert_eq!(late["last_seq"], 5);
    // Another offset, percent-encoded by reqwest: 01:20+01:00 is 00:20Z.
    let response = client
        .get("/api/v1/daemons/d/changes")
        .query(&[("since", "2026-01-01T01:20:00+01:00")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(seqs(&body), [2, 3, 4, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_pages_through_the_whole_log_in_order() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    post_many(&daemon, 1, 20).await;
    post_many(&daemon, 21, 5).await;

    let first = changes(&client, "d", "?limit=7").await;
    assert_eq!(seqs(&first), (1..=7).collect::<Vec<u64>>());
    assert_eq!(
        first["last_seq"], 7,
        "last_seq is the last entry of the batch"
    );

    let mut read = Vec::new();
    let mut since = 0;
    for _ in 0..10 {
        let batch = changes(&client, "d", &format!("?since={since}&limit=7")).await;
        let batch_seqs = seqs(&batch);
        assert!(batch_seqs.len() <= 7, "limit exceeded: {batch}");
        let last_seq = batch["last_seq"].as_u64().expect("last_seq");
        if batch_seqs.is_empty() {
            assert_eq!(last_seq, since);
            break;
        }
        assert_eq!(last_seq, *batch_seqs.last().unwrap(), "{batch}");
        read.extend(batch_seqs);
        since = last_seq;
    }
    assert_eq!(
        read,
        (1..=25).collect::<Vec<u64>>(),
        "every entry once, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_parameters_are_bad_requests() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    post_many(&daemon, 1, 2).await;

    for query in [
        "?since=yesterday",
        "?since=-1",
        "?since=2026-13-01T00:00:00Z",
        "?since=2026-01-01",
        "?limit=0",
        "?limit=-5",
        "?limit=ten",
        "?wait=soon",
        "?wait=-1",
    ] {
        let (status, body) = changes_raw(&client, "d", query).await;
        assert_error(status, &body, 400, "bad_request", query);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_returns_as_soon_as_an_update_is_posted() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    post_many(&daemon, 1, 1).await;

    let mut waiter = tokio::spawn({
        let client = client.clone();
        async move {
            let started = Instant::now();
            let response = client
                .get("/api/v1/daemons/d/changes?since=1&wait=10")
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            (status, body, started.elapsed())
        }
    });
    // Nothing new yet: the request must still be waiting.
    assert!(
        timeout(Duration::from_millis(300), &mut waiter)
            .await
            .is_err(),
        "wait=10 answered before anything was posted"
    );
    post(
        &daemon,
        json!([update("session_created", "s9", "r9", 5, 2)]),
    )
    .await;
    let (status, body, elapsed) = timeout(LIMIT, waiter)
        .await
        .expect("the long poll woke on the update")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(seqs(&body), [2], "{body}");
    assert_eq!(body["changes"][0]["type"], "session_created");
    assert_eq!(body["last_seq"], 2);
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_returns_empty_when_nothing_arrives() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    post_many(&daemon, 1, 3).await;

    let started = Instant::now();
    let body = changes(&client, "d", "?since=3&wait=1").await;
    let elapsed = started.elapsed();
    assert_eq!(seqs(&body), Vec::<u64>::new());
    assert_eq!(body["last_seq"], 3);
    assert!(
        elapsed >= Duration::from_millis(900),
        "answered after {elapsed:?}, before its wait"
    );
    // With entries already there, wait does not delay the answer.
    let started = Instant::now();
    let body = changes(&client, "d", "?since=1&wait=10").await;
    assert_eq!(seqs(&body), [2, 3]);
    assert!(started.elapsed() < Duration::from_secs(5));
}

// ---------------------------------------------------------------------------------------
// GET …/stream/events

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_replays_in_hld_shape_from_since_then_follows_live() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    post(
        &daemon,
        json!([
            update("new_approval", "s1", "r1", 1, 1),
            update("approval_resolved", "s1", "r1", 2, 2),
            update("session_status_changed", "s2", "r2", 3, 3),
        ]),
    )
    .await;

    let mut stream = SseStream::open(client.get(&events_path("d", "?since=1"))).await;
    let events = stream.events_through(3).await;
    assert_eq!(event_seqs(&events), [2, 3]);
    assert_eq!(events[0].id.as_deref(), Some("2"));
    let event = events[0].json();
    assert_eq!(event["type"], "approval_resolved", "{event}");
    assert_eq!(
        millis(event["timestamp"].as_str().expect("timestamp")),
        millis(&stamp(2))
    );
    assert_eq!(
        event["data"],
        json!({ "session_id": "s1", "run_id": "r1", "n": 2 })
    );
    assert!(
        event.get("seq").is_none() || event["seq"] == 2,
        "seq travels in the id line: {event}"
    );

    // The same stream goes on with updates posted now.
    post(&daemon, json!([update("new_approval", "s3", "r3", 4, 4)])).await;
    let live = stream.next_event().await;
    assert_eq!(live.seq(), 4);
    assert_eq!(live.json()["type"], "new_approval");
    assert_eq!(live.json()["data"]["session_id"], "s3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_replays_from_last_event_id() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    post_many(&daemon, 1, 5).await;

    let mut stream = SseStream::open(
        client
            .get(&events_path("d", ""))
            .header("Last-Event-ID", "3"),
    )
    .await;
    assert_eq!(event_seqs(&stream.events_through(5).await), [4, 5]);

    // A reconnecting EventSource keeps its URL: Last-Event-ID wins over ?since=.
    let mut stream = SseStream::open(
        client
            .get(&events_path("d", "?since=1"))
            .header("Last-Event-ID", "4"),
    )
    .await;
    assert_eq!(event_seqs(&stream.events_through(5).await), [5]);

    // since=0 replays everything.
    let mut stream = SseStream::open(client.get(&events_path("d", "?since=0"))).await;
    assert_eq!(event_seqs(&stream.events_through(5).await), [1, 2, 3, 4, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_without_a_position_starts_at_the_live_tail() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    post_many(&daemon, 1, 3).await;

    // The response head is back, so the stream's position is fixed: only 4.. follow.
    let mut stream = SseStream::open(client.get(&events_path("d", ""))).await;
    post(
        &daemon,
        json!([update("session_created", "s4", "r4", 4, 4)]),
    )
    .await;
    let first = stream.next_event().await;
    assert_eq!(first.seq(), 4, "old entries were replayed: {first:?}");
    assert_eq!(first.json()["type"], "session_created");
    // Each later update is delivered as it is posted, one poll at a time.
    for seq in 5..=7 {
        post(
            &daemon,
            json!([update("new_approval", "s1", "r1", seq as u32, seq)]),
        )
        .await;
        let event = stream.next_event().await;
        assert_eq!(event.seq(), seq);
        assert_eq!(event.json()["data"]["n"], seq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_filters_by_event_types_session_and_run() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    post(
        &daemon,
        json!([
            update("new_approval", "s1", "r1", 1, 1),
            update("session_status_changed", "s2", "r2", 2, 2),
            update("approval_resolved", "s1", "r2", 3, 3),
            update("session_status_changed", "s1", "r1", 4, 4),
            update("new_approval", "s2", "r1", 5, 5),
            { "type": "conversation_updated", "data": null, "timestamp": stamp(6), "seq": 6 },
            // The last entry matches every filter below, so reading up to it sees all.
            update("new_approval", "s1", "r1", 7, 7),
        ]),
    )
    .await;

    let cases: [(&str, &[u64]); 6] = [
        ("eventTypes=new_approval,approval_resolved", &[1, 3, 5, 7]),
        ("eventTypes=new_approval", &[1, 5, 7]),
        ("sessionId=s1", &[1, 3, 4, 7]),
        ("runId=r1", &[1, 4, 5, 7]),
        ("eventTypes=new_approval&sessionId=s1", &[1, 7]),
        ("sessionId=s1&runId=r1", &[1, 4, 7]),
    ];
    for (filter, expected) in cases {
        let path = events_path("d", &format!("?since=0&{filter}"));
        let mut stream = SseStream::open(client.get(&path)).await;
        let events = stream.events_through(7).await;
        assert_eq!(event_seqs(&events), expected, "filter {filter}");
    }

    // Filters apply to the live tail too.
    let mut stream = SseStream::open(client.get(&events_path("d", "?sessionId=s5"))).await;
    post(
        &daemon,
        json!([
            update("new_approval", "s6", "r1", 8, 8),
            update("new_approval", "s5", "r1", 9, 9),
        ]),
    )
    .await;
    let event = stream.next_event().await;
    assert_eq!(event.seq(), 9, "{event:?}");
    assert_eq!(event.json()["data"]["session_id"], "s5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_sends_keepalive_comments_while_idle() {
    let relay = TestRelay::start_with("[changes]\nsse_keepalive = \"200ms\"\n").await;
    let _daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;

    let mut stream = SseStream::open(client.get(&events_path("d", ""))).await;
    let started = Instant::now();
    let mut comments = 0;
    while comments < 3 {
        let frame = stream.next_frame().await;
        assert!(!frame.is_event(), "no event was posted: {frame:?}");
        assert!(!frame.comments.is_empty(), "an empty frame: {frame:?}");
        comments += 1;
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "three comments took {:?} at a 200ms keep-alive",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_token_works_on_sse_only_and_scope_is_enforced() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let _other = relay.daemon("other").await;
    let client = relay.client(&["d"]).await;
    post_many(&daemon, 1, 2).await;
    let anonymous = reqwest::Client::new();

    // EventSource style: no header, the key in the query.
    let url = format!(
        "{}{}",
        relay.url,
        events_path("d", &format!("?since=0&access_token={}", client.key))
    );
    let mut stream = SseStream::open(anonymous.get(&url)).await;
    assert_eq!(event_seqs(&stream.events_through(2).await), [1, 2]);

    // Not on the JSON route.
    let response = anonymous
        .get(format!(
            "{}/api/v1/daemons/d/changes?access_token={}",
            relay.url, client.key
        ))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_error(status, &body, 401, "unauthorized", "/changes?access_token=");

    // Without any key.
    let response = anonymous
        .get(format!("{}{}", relay.url, events_path("d", "")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    // A daemon out of the key's scope reads as missing, whichever way the key comes.
    let (status, body) = changes_raw(&client, "other", "").await;
    assert_error(status, &body, 404, "not_found", "changes out of scope");
    let response = client.get(&events_path("other", "")).send().await.unwrap();
    assert_eq!(response.status(), 404, "stream out of scope");
    let url = format!(
        "{}{}",
        relay.url,
        events_path("other", &format!("?access_token={}", client.key))
    );
    let response = anonymous.get(&url).send().await.unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_error(
        status,
        &body,
        404,
        "not_found",
        "stream out of scope by query token",
    );
}

// ---------------------------------------------------------------------------------------
// Retention and restarts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_newest_entries() {
    let relay =
        TestRelay::start_with("[retention]\ninterval = \"50ms\"\nchanges_max_entries = 5\n").await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    post_many(&daemon, 1, 7).await;
    post_many(&daemon, 8, 5).await;

    eventually(LIMIT, || {
        let client = client.clone();
        async move { seqs(&changes(&client, "d", "?since=0").await) == [8, 9, 10, 11, 12] }
    })
    .await;
    let body = changes(&client, "d", "").await;
    assert_eq!(body["last_seq"], 12);
    assert_eq!(body["changes"][0]["data"]["n"], 8);
    // A stream replaying from the start begins at the oldest kept entry.
    let mut stream = SseStream::open(client.get(&events_path("d", "?since=0"))).await;
    assert_eq!(
        event_seqs(&stream.events_through(12).await),
        [8, 9, 10, 11, 12]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_survives_a_restart_and_continues_in_order() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let daemon_key = daemon.key.clone();
    let client = relay.client(&["d"]).await;
    // Daemon seqs 11, 12, 15, 16: gaps on the daemon side, a dense log on the relay.
    post(
        &daemon,
        json!([
            update("new_approval", "s1", "r1", 1, 11),
            update("approval_resolved", "s1", "r1", 2, 12),
        ]),
    )
    .await;
    post(
        &daemon,
        json!([
            update("session_status_changed", "s2", "r2", 3, 15),
            update("new_approval", "s2", "r2", 4, 16),
        ]),
    )
    .await;
    let before = changes(&client, "d", "").await;
    assert_eq!(seqs(&before), [1, 2, 3, 4]);
    drop(daemon);

    let dir = timeout(Duration::from_secs(15), relay.stop())
        .await
        .expect("graceful stop in time");
    let relay = TestRelay::start_in(dir, "").await;

    // The old client token still works, and so does a new key.
    let old_client = Client {
        url: relay.url.clone(),
        key: client.key.clone(),
        http: reqwest::Client::new(),
    };
    let after = changes(&old_client, "d", "").await;
    assert_eq!(after, before, "the same entries, in order, after a restart");
    let new_client = relay.client(&["d"]).await;
    assert_eq!(changes(&new_client, "d", "").await, before);

    // The daemon reconnects with its old key and learns what the relay has.
    let mut daemon = Daemon::new(&relay.url, "d", &daemon_key);
    let connected = daemon.connect().await;
    assert_eq!(connected["last_update_seq"], 16, "{connected}");
    assert_eq!(daemon.last_update_seq, 16);

    // Resending the last one is a retry; the next update gets the next seq.
    post(
        &daemon,
        json!([
            update("new_approval", "s2", "r2", 4, 16),
            update("session_created", "s3", "r3", 5, 17),
        ]),
    )
    .await;
    let body = changes(&new_client, "d", "?since=4").await;
    assert_eq!(seqs(&body), [5], "{body}");
    assert_eq!(body["changes"][0]["type"], "session_created");
    assert_eq!(body["last_seq"], 5);
    let all = changes(&new_client, "d", "").await;
    assert_eq!(seqs(&all), [1, 2, 3, 4, 5]);
    assert_eq!(
        all["changes"].as_array().unwrap()[..4],
        before["changes"].as_array().unwrap()[..]
    );
    assert_eq!(daemon.connect().await["last_update_seq"], 17);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resumes_after_a_restart_with_last_event_id() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let daemon_key = daemon.key.clone();
    let client = relay.client(&["d"]).await;
    post_many(&daemon, 1, 3).await;
    let mut stream = SseStream::open(client.get(&events_path("d", "?since=0"))).await;
    let seen = stream.events_through(3).await;
    let last_id = seen.last().unwrap().id.clone().unwrap();
    drop(stream);
    drop(daemon);

    let dir = timeout(Duration::from_secs(15), relay.stop())
        .await
        .expect("graceful stop in time");
    let relay = TestRelay::start_in(dir, "").await;
    let client = Client {
        url: relay.url.clone(),
        key: client.key.clone(),
        http: reqwest::Client::new(),
    };
    let mut daemon = Daemon::new(&relay.url, "d", &daemon_key);
    assert_eq!(daemon.connect().await["last_update_seq"], 3);
    post_many(&daemon, 4, 2).await;

    let mut stream = SseStream::open(
        client
            .get(&events_path("d", ""))
            .header("Last-Event-ID", last_id),
    )
    .await;
    let events = stream.events_through(5).await;
    assert_eq!(event_seqs(&events), [4, 5]);
    assert_eq!(events[0].json()["data"]["n"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_out_events_do_not_starve_keepalives() {
    let relay = TestRelay::start_with("[changes]\nsse_keepalive = \"300ms\"\n").await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let mut stream = SseStream::open(client.get(&events_path("d", "?eventTypes=wanted"))).await;

    // Events the filter drops keep arriving, faster than the keep-alive interval.
    let noise = {
        let noisy = Daemon::new(&relay.url, "d", &daemon.key);
        tokio::spawn(async move {
            for seq in 1.. {
                post(&noisy, json!([update("noise", "s", "r", 0, seq)])).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut keepalives = 0;
    while keepalives < 2 {
        let frame = stream.next_frame().await;
        assert!(
            !frame.is_event(),
            "only filtered-out events were posted: {frame:?}"
        );
        if frame.comments.iter().any(|c| c == "keepalive") {
            keepalives += 1;
        }
    }
    noise.abort();
}
