//! Cache-and-serve streaming end to end, over real loopback sockets.
//!
//! Through the agent, against the local test daemon's SSE context route: one fetch then
//! byte-identical replays from disk (`X-Syncrelay-Source: cache`, relay event ids
//! `id: 1..N`); `Last-Event-ID` resume (and 400 for an invalid one); concurrent first
//! requests sharing one fetch; a client joining a running fetch getting the stored prefix
//! then the live tail; `Cache-Control: no-cache`; expiry by `context_ttl`; oldest-first
//! eviction past `context_max_bytes`; the per-context size limit; an offline daemon's
//! cached context still served (503 `daemon_offline` without one); a non-2xx answer passed
//! on unframed and never served from cache.
//!
//! With a hand-driven daemon speaking the sync protocol: the stream command, chunk uploads
//! (duplicates ignored, gaps 409 `chunk_gap` with the expected index, negative index 400,
//! `data_base64`, oversized chunks 413, unknown command ids), live forwarding of each chunk
//! to waiting readers (re-framed: the daemon's ids replaced, comment-only blocks dropped),
//! a mid-stream `error` ending the stream and the next request fetching again, and a first
//! request carrying `Last-Event-ID` still fetching the whole context.
//!
//! The 100 MB / 20-client acceptance test lives in `streams_large.rs`.

mod common;

use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use common::daemon::TestDaemon;
use common::{eventually, Client, Daemon, TestAgent, TestRelay};
use syncrelay::agent::RawAgent;

/// Bound of every wait on the relay.
const LIMIT: Duration = Duration::from_secs(10);

/// The test daemon's context `aid`, as a client asks for it (add a query).
fn context(aid: &str) -> String {
    format!("/api/v1/daemons/d/approvals/{aid}/context/stream")
}

/// The same context as the test daemon sees it (for `TestDaemon::hits`).
fn daemon_path(aid: &str) -> String {
    format!("/api/v1/approvals/{aid}/context/stream")
}

/// Event `n` (from 0) of the test daemon's context, as the daemon sends it.
fn raw_event(n: u64, size: usize) -> String {
    let fill = ((b'a' + (n % 26) as u8) as char).to_string().repeat(size);
    format!("id: {n}\nevent: context\ndata: {{\"n\":{n},\"text\":\"{fill}\"}}\n\n")
}

/// The relay's framing of the test daemon's events with relay ids `ids` (event `id - 1`).
fn framed(ids: std::ops::RangeInclusive<u64>, size: usize) -> String {
    ids.map(|id| {
        let n = id - 1;
        let fill = ((b'a' + (n % 26) as u8) as char).to_string().repeat(size);
        format!("id: {id}\nevent: context\ndata: {{\"n\":{n},\"text\":\"{fill}\"}}\n\n")
    })
    .collect()
}

/// The `id:` values of an SSE body, in order.
fn ids(body: &str) -> Vec<u64> {
    body.lines()
        .filter_map(|line| line.strip_prefix("id: "))
        .map(|id| id.parse().expect("numeric id"))
        .collect()
}

/// A relay, the test daemon, an agent between them and a client, the daemon online.
struct Setup {
    relay: TestRelay,
    daemon: TestDaemon,
    client: Client,
    agent: TestAgent,
}

async fn setup(toml: &str) -> Setup {
    setup_with(toml, RawAgent::default()).await
}

async fn setup_with(toml: &str, agent: RawAgent) -> Setup {
    let relay = TestRelay::start_with(toml).await;
    let daemon = TestDaemon::start().await;
    let key = relay.key("daemon", Some("d"), None).await;
    let client = relay.client(&["d"]).await;
    let agent = TestAgent::start(&relay.url, "d", &key, &daemon.target, agent);
    client.await_online("d").await;
    Setup {
        relay,
        daemon,
        client,
        agent,
    }
}

/// A whole answer.
#[derive(Debug)]
struct Got {
    status: u16,
    source: String,
    content_type: String,
    body: String,
}

/// GETs `path` with extra `headers` and reads the whole body (bounded in time).
async fn get(client: &Client, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut reader = Reader::open(client, path, headers).await;
    reader.read_to_end().await;
    reader.got()
}

/// A response read incrementally with `Response::chunk`, every read bounded.
struct Reader {
    status: u16,
    source: String,
    content_type: String,
    response: reqwest::Response,
    body: Vec<u8>,
    ended: bool,
}

impl Reader {
    async fn open(client: &Client, path: &str, headers: &[(&str, &str)]) -> Reader {
        let mut request = client.get(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = tokio::time::timeout(LIMIT, request.send())
            .await
            .expect("response headers in time")
            .expect("relay reachable");
        Reader::new(response)
    }

    fn new(response: reqwest::Response) -> Reader {
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        Reader {
            status: response.status().as_u16(),
            source: header("x-syncrelay-source"),
            content_type: header("content-type"),
            body: Vec::new(),
            ended: false,
            response,
        }
    }

    /// Reads one more piece; false at the end of the body.
    async fn step(&mut self) -> bool {
        let piece = tokio::time::timeout(LIMIT, self.response.chunk())
            .await
            .expect("body piece in time")
            .expect("body readable");
        match piece {
            Some(bytes) => {
                self.body.extend_from_slice(&bytes);
                true
            }
            None => {
                self.ended = true;
                false
            }
        }
    }

    async fn read_to_end(&mut self) {
        while !self.ended && self.step().await {}
    }

    /// Reads until the body holds `count` complete events.
    async fn read_events(&mut self, count: usize) {
        while self.text().matches("\n\n").count() < count {
            assert!(self.step().await, "the body ended early: {:?}", self.text());
        }
    }

    /// Reads exactly the next `expected` bytes of the body (what one posted chunk yields).
    async fn expect_next(&mut self, expected: &str) {
        let start = self.body.len();
        while self.body.len() < start + expected.len() {
            assert!(self.step().await, "the body ended early: {:?}", self.text());
        }
        assert_eq!(
            String::from_utf8_lossy(&self.body[start..]),
            expected,
            "the next bytes of the stream"
        );
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("UTF-8 body")
    }

    fn got(&self) -> Got {
        Got {
            status: self.status,
            source: self.source.clone(),
            content_type: self.content_type.clone(),
            body: self.text(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_is_fetched_once_and_replayed() {
    let Setup {
        relay: _relay,
        agent: _agent,
        daemon,
        client,
    } = setup("").await;
    let path = format!("{}?events=50&size=1000", context("a1"));
    let first = get(&client, &path, &[]).await;
    assert_eq!((first.status, first.source.as_str()), (200, "daemon"));
    assert_eq!(first.content_type, "text/event-stream");
    assert_eq!(first.body.matches("\nevent: context\n").count(), 50);
    assert_eq!(ids(&first.body), (1..=50).collect::<Vec<_>>(), "relay ids");
    assert_eq!(first.body, framed(1..=50, 1000), "the daemon's events");
    let second = get(&client, &path, &[]).await;
    assert_eq!((second.status, second.source.as_str()), (200, "cache"));
    assert_eq!(second.content_type, "text/event-stream");
    assert_eq!(first.body, second.body, "byte-identical replay");
    assert_eq!(
        daemon.hits(&daemon_path("a1")),
        1,
        "the daemon was asked once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_resumes_after_that_event() {
    let Setup {
        relay: _relay,
        agent: _agent,
        daemon,
        client,
    } = setup("").await;
    let path = format!("{}?events=30&size=50", context("r1"));
    let full = get(&client, &path, &[]).await;
    assert_eq!(full.body, framed(1..=30, 50));
    for k in [0u64, 1, 17, 29] {
        let resumed = get(&client, &path, &[("last-event-id", &k.to_string())]).await;
        assert_eq!((resumed.status, resumed.source.as_str()), (200, "cache"));
        assert_eq!(
            ids(&resumed.body),
            (k + 1..=30).collect::<Vec<_>>(),
            "after {k}"
        );
        assert_eq!(resumed.body, framed(k + 1..=30, 50), "events after {k}");
        assert!(full.body.ends_with(&resumed.body), "a suffix of the replay");
    }
    // At or past the last event: an empty stream, still a 200.
    for k in ["30", "1000"] {
        let resumed = get(&client, &path, &[("last-event-id", k)]).await;
        assert_eq!(
            (resumed.status, resumed.body.as_str()),
            (200, ""),
            "after {k}"
        );
    }
    assert_eq!(daemon.hits(&daemon_path("r1")), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_last_event_id_is_refused() {
    let Setup {
        relay: _relay,
        agent: _agent,
        daemon,
        client,
    } = setup("").await;
    let path = format!("{}?events=3&size=10", context("r2"));
    for bad in ["abc", "-1", "1.5", ""] {
        let response = client
            .get(&path)
            .header("last-event-id", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "Last-Event-ID {bad:?}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "bad_request", "{body}");
    }
    assert_eq!(daemon.hits(&daemon_path("r2")), 0, "nothing fetched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_share_one_fetch() {
    let Setup {
        relay: _relay,
        agent: _agent,
        daemon,
        client,
    } = setup("").await;
    // 20 events 20 ms apart: the fetch runs ~400 ms, all five join it.
    let path = format!("{}?events=20&size=200&delay_ms=20", context("c1"));
    let readers = (0..5).map(|_| get(&client, &path, &[]));
    let answers = futures_util::future::join_all(readers).await;
    let expected = framed(1..=20, 200);
    for (i, got) in answers.iter().enumerate() {
        assert_eq!(
            (got.status, got.source.as_str()),
            (200, "daemon"),
            "client {i}"
        );
        assert_eq!(
            got.body, expected,
            "client {i}: every event, byte-identical"
        );
    }
    assert_eq!(
        daemon.hits(&daemon_path("c1")),
        1,
        "one fetch for five clients"
    );
    let replay = get(&client, &path, &[]).await;
    assert_eq!((replay.source.as_str(), replay.body), ("cache", expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_joining_a_running_fetch_gets_the_prefix_then_the_live_tail() {
    let Setup {
        relay: _relay,
        agent: _agent,
        daemon,
        client,
    } = setup("").await;
    // 40 events 25 ms apart: ~1 s of fetch.
    let path = format!("{}?events=40&size=300&delay_ms=25", context("t1"));
    let mut first = Reader::open(&client, &path, &[]).await;
    assert_eq!((first.status, first.source.as_str()), (200, "daemon"));
    first.read_events(5).await;
    // The fetch is running: the first client has 5 of 40 events, the rest are to come.
    let mut joined = Reader::open(&client, &path, &[]).await;
    let mut resumed = Reader::open(&client, &path, &[("last-event-id", "3")]).await;
    for late in [&joined, &resumed] {
        assert_eq!(
            (late.status, late.source.as_str()),
            (200, "daemon"),
            "joined the running fetch, not a replay of a complete one"
        );
    }
    let (a, b, c) = tokio::join!(
        first.read_to_end(),
        joined.read_to_end(),
        resumed.read_to_end()
    );
    let _ = (a, b, c);
    let expected = framed(1..=40, 300);
    assert_eq!(first.text(), expected);
    let joined = joined.text();
    assert_eq!(
        ids(&joined),
        (1..=40).collect::<Vec<_>>(),
        "contiguous ids across the seam"
    );
    assert_eq!(joined, expected, "nothing missing or doubled at the seam");
    assert_eq!(resumed.text(), framed(4..=40, 300), "resumed mid-fetch");
    assert_eq!(daemon.hits(&daemon_path("t1")), 1);
    let replay = get(&client, &path, &[]).await;
    assert_eq!((replay.source.as_str(), replay.body), ("cache", expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_control_no_cache_fetches_again() {
    let Setup {
        relay: _relay,
        agent: _agent,
        daemon,
        client,
    } = setup("").await;
    let path = format!("{}?events=5&size=20", context("n1"));
    assert_eq!(get(&client, &path, &[]).await.source, "daemon");
    assert_eq!(get(&client, &path, &[]).await.source, "cache");
    assert_eq!(daemon.hits(&daemon_path("n1")), 1);
    let fresh = get(&client, &path, &[("cache-control", "no-cache")]).await;
    assert_eq!((fresh.status, fresh.source.as_str()), (200, "daemon"));
    assert_eq!(fresh.body, framed(1..=5, 20));
    assert_eq!(daemon.hits(&daemon_path("n1")), 2, "refetched");
    // The fresh copy replaces the old one and is replayed from then on.
    let replay = get(&client, &path, &[]).await;
    assert_eq!((replay.source.as_str(), replay.body), ("cache", fresh.body));
    assert_eq!(daemon.hits(&daemon_path("n1")), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_context_is_fetched_again() {
    let Setup {
        relay: _relay,
        agent: _agent,
        daemon,
        client,
    } = setup("[streams]\ncontext_ttl = \"1s\"\n[retention]\ninterval = \"100ms\"\n").await;
    let path = format!("{}?events=5&size=20", context("e1"));
    let started = std::time::Instant::now();
    let first = get(&client, &path, &[]).await;
    assert_eq!(first.source, "daemon");
    assert_eq!(get(&client, &path, &[]).await.source, "cache", "fresh");
    let client_ref = &client;
    let path_ref = path.as_str();
    eventually(LIMIT, move || async move {
        let got = get(client_ref, path_ref, &[]).await;
        assert_eq!(got.body, framed(1..=5, 20));
        got.source == "daemon"
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "refetched after {:?}, before the 1 s TTL",
        started.elapsed()
    );
    assert_eq!(daemon.hits(&daemon_path("e1")), 2, "fetched again once");
    assert_eq!(
        get(&client, &path, &[]).await.source,
        "cache",
        "the new copy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_contexts_are_evicted_past_context_max_bytes() {
    // Each context is 5 events of ~146 bytes: two fit in 1800 bytes, three do not.
    let size: u64 = (0..5).map(|n| raw_event(n, 100).len() as u64).sum();
    assert!(
        2 * size <= 1800 && 3 * size > 1800,
        "premise: {size} bytes each"
    );
    let Setup {
        relay: _relay,
        agent: _agent,
        daemon,
        client,
    } = setup("[streams]\ncontext_max_bytes = 1800\n[retention]\ninterval = \"100ms\"\n").await;
    let path = |aid: &str| format!("{}?events=5&size=100", context(aid));
    for aid in ["x1", "x2", "x3"] {
        assert_eq!(
            get(&client, &path(aid), &[]).await.source,
            "daemon",
            "{aid}"
        );
    }
    // The sweep evicts the oldest, x1: its next request fetches again. Now x1 is the
    // newest, and the total is over the limit again: x2 (the oldest) goes next.
    let (client_ref, x1) = (&client, path("x1"));
    let x1 = x1.as_str();
    eventually(LIMIT, move || async move {
        get(client_ref, x1, &[]).await.source == "daemon"
    })
    .await;
    assert_eq!(daemon.hits(&daemon_path("x1")), 2);
    // Not being evicted can only be observed over a window: a few sweeps.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let x3 = get(&client, &path("x3"), &[]).await;
    assert_eq!(
        x3.source, "cache",
        "x3 is newer than x2 and within the budget: it stays"
    );
    assert_eq!(x3.body, framed(1..=5, 100));
    assert_eq!(daemon.hits(&daemon_path("x3")), 1);
    assert_eq!(
        get(&client, &path("x2"), &[]).await.source,
        "daemon",
        "x2, the oldest after x1, was evicted"
    );
    assert_eq!(daemon.hits(&daemon_path("x2")), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_over_the_size_limit_fails_and_is_fetched_again() {
    let Setup {
        relay: _relay,
        agent: _agent,
        daemon,
        client,
    } = setup("[streams]\ncontext_max_size = 1000\n").await;

    // Mid-stream: the agent posts the events as they come (5 ms apart; those that arrive
    // while a post is in flight go together in the next chunk); the chunk that would take
    // the context past 1000 bytes is refused and the fetch fails. Readers get the events
    // stored until then (at most the 6 that fit), then an `error` event says the fetch
    // failed (the 200 was already sent).
    let mut stored = 0;
    let mut bytes = 0;
    while bytes + raw_event(stored, 100).len() <= 1000 {
        bytes += raw_event(stored, 100).len();
        stored += 1;
    }
    assert_eq!(stored, 6, "premise");
    let path = format!("{}?events=20&size=100&delay_ms=5", context("big1"));
    for attempt in 1..=2 {
        let got = get(&client, &path, &[]).await;
        assert_eq!(
            (got.status, got.source.as_str()),
            (200, "daemon"),
            "attempt {attempt}"
        );
        let failure = "event: error\ndata: {\"code\":\"payload_too_large\",\"message\":\"the context exceeds 1000 bytes\"}\n\n";
        assert!(
            (1..=stored).any(|n| got.body == framed(1..=n, 100) + failure),
            "attempt {attempt}: whole events that fit, then the failure: {}",
            got.body
        );
        assert_eq!(
            daemon.hits(&daemon_path("big1")),
            attempt,
            "a failed context is never served: each request fetches again"
        );
    }

    // Chunk 0 already too large: no status was stored, the readers get 502 stream_failed.
    let path = format!("{}?events=3&size=2000", context("big2"));
    for attempt in 1..=2 {
        let response = client.get(&path).send().await.unwrap();
        assert_eq!(response.status(), 502, "attempt {attempt}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "stream_failed", "{body}");
        assert_eq!(daemon.hits(&daemon_path("big2")), attempt);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_daemon_s_cached_context_is_still_served() {
    let agent_config = RawAgent {
        poll_timeout: Some("1s".into()),
        ..RawAgent::default()
    };
    let Setup {
        daemon,
        client,
        agent,
        relay: _relay,
    } = setup_with("[sync]\nonline_grace = \"300ms\"\n", agent_config).await;
    let path = format!("{}?events=10&size=100", context("o1"));
    let online = get(&client, &path, &[]).await;
    assert_eq!(online.source, "daemon");
    agent.stop().await;
    let client_ref = &client;
    eventually(LIMIT, move || async move {
        let body: Value = client_ref
            .get("/api/v1/daemons/d")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["online"] == false
    })
    .await;

    let offline = get(&client, &path, &[]).await;
    assert_eq!((offline.status, offline.source.as_str()), (200, "cache"));
    assert_eq!(
        offline.body, online.body,
        "the cached context, byte-identical"
    );
    let resumed = get(&client, &path, &[("last-event-id", "8")]).await;
    assert_eq!(resumed.body, framed(9..=10, 100));

    // Never fetched: nothing to serve.
    let response = client
        .get(&format!("{}?events=10&size=100", context("o2")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "daemon_offline", "{body}");
    assert_eq!(daemon.hits(&daemon_path("o1")), 1);
    assert_eq!(daemon.hits(&daemon_path("o2")), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_2xx_answer_is_passed_on_unframed_and_not_cached() {
    let Setup {
        relay: _relay,
        agent: _agent,
        daemon,
        client,
    } = setup("[streams]\npaths = [\"status/*\"]\n").await;
    for attempt in 1..=2 {
        let got = get(&client, "/api/v1/daemons/d/status/404", &[]).await;
        assert_eq!(
            (got.status, got.source.as_str()),
            (404, "daemon"),
            "attempt {attempt}"
        );
        assert_eq!(got.content_type, "application/json", "the daemon's headers");
        assert_eq!(got.body, "{\"code\":404}", "the daemon's body, unframed");
        assert_eq!(
            daemon.hits("/api/v1/status/404"),
            attempt,
            "never served from cache"
        );
    }
}

// --- The chunk protocol, with a daemon driven by hand ---------------------------------

/// Posts `results` for daemon `d`; returns status and body (any status).
async fn post_results(daemon: &Daemon, results: Value) -> (u16, Value) {
    daemon
        .post(
            "/sync/results",
            json!({ "daemon_id": daemon.daemon_id, "results": results }),
        )
        .await
}

/// A chunk with text data.
fn chunk(command_id: &str, index: i64, data: &str, complete: bool) -> Value {
    json!({ "command_id": command_id, "chunk": index, "data": data, "complete": complete })
}

/// Chunk 0 with status and headers.
fn first_chunk(command_id: &str, data: &str) -> Value {
    json!({
        "command_id": command_id, "chunk": 0, "status": 200,
        "headers": { "content-type": "text/event-stream", "x-daemon": "yes" },
        "data": data, "complete": false,
    })
}

/// Starts a client GET (answered once chunk 0 arrives) and returns the stream command
/// the daemon receives for it.
async fn request_stream(
    client: &Client,
    daemon: &Daemon,
    path: &str,
    headers: &[(&str, &str)],
) -> (tokio::task::JoinHandle<reqwest::Response>, Value) {
    let mut request = client.get(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let pending = tokio::spawn(async move { request.send().await.expect("relay reachable") });
    let commands = daemon.next_commands().await;
    assert_eq!(commands.len(), 1, "{commands:?}");
    (pending, commands[0].clone())
}

async fn answered(pending: tokio::task::JoinHandle<reqwest::Response>) -> Reader {
    let response = tokio::time::timeout(LIMIT, pending)
        .await
        .expect("answered in time")
        .unwrap();
    Reader::new(response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_reach_waiting_clients_live_and_an_error_ends_the_stream() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let path = format!("{}?x=1", context("m1"));
    let (pending, command) = request_stream(&client, &daemon, &path, &[]).await;
    assert_eq!(command["stream"], true, "{command}");
    assert_eq!(command["method"], "http");
    assert_eq!(command["params"]["method"], "GET");
    assert_eq!(
        command["params"]["path"],
        "/api/v1/approvals/m1/context/stream"
    );
    assert_eq!(command["params"]["query"], "x=1");
    let id = command["id"].as_str().unwrap().to_owned();
    assert!(!pending.is_finished(), "no answer before chunk 0");

    // Chunk 0: the daemon's id is replaced by the relay's, the keep-alive block dropped.
    let reply = daemon
        .results(json!([first_chunk(
            &id,
            "id: 77\ndata: a\n\n: keepalive\n\n"
        )]))
        .await;
    assert_eq!(reply["accepted"], json!([id]));
    let mut first = answered(pending).await;
    assert_eq!((first.status, first.source.as_str()), (200, "daemon"));
    assert_eq!(first.content_type, "text/event-stream");
    assert_eq!(first.response.headers()["x-daemon"], "yes");
    first.expect_next("id: 1\ndata: a\n\n").await;

    // Each chunk reaches the waiting reader as soon as it is posted; an event split
    // across chunks comes out whole.
    daemon
        .results(json!([chunk(&id, 1, "event: e\ndata: b", false)]))
        .await;
    daemon.results(json!([chunk(&id, 2, "\n\n", false)])).await;
    first.expect_next("id: 2\nevent: e\ndata: b\n\n").await;

    // A reader joining now gets the stored prefix, then the same live tail; one resuming
    // after event 1 only the rest. No second fetch.
    let mut joined = Reader::open(&client, &path, &[]).await;
    let mut resumed = Reader::open(&client, &path, &[("last-event-id", "1")]).await;
    assert_eq!((joined.status, joined.source.as_str()), (200, "daemon"));
    joined
        .expect_next("id: 1\ndata: a\n\nid: 2\nevent: e\ndata: b\n\n")
        .await;
    resumed.expect_next("id: 2\nevent: e\ndata: b\n\n").await;
    assert!(daemon.poll(0.0).await.is_empty(), "the fetch is shared");

    daemon
        .results(json!([chunk(&id, 3, "data: c\n\n", false)]))
        .await;
    for reader in [&mut first, &mut joined, &mut resumed] {
        reader.expect_next("id: 3\ndata: c\n\n").await;
    }

    // A failure part-way (`complete` with an `error`) ends the stream for every reader,
    // with an `error` event carrying the daemon's error.
    let reply = daemon
        .results(json!([{
            "command_id": id, "chunk": 4, "data": "", "complete": true,
            "error": { "code": "target_error", "message": "the daemon's body broke off" },
        }]))
        .await;
    assert_eq!(reply["accepted"], json!([id]));
    let expected = "id: 1\ndata: a\n\nid: 2\nevent: e\ndata: b\n\nid: 3\ndata: c\n\n\
                    event: error\ndata: {\"code\":\"target_error\",\"message\":\"the daemon's body broke off\"}\n\n";
    for reader in [&mut first, &mut joined] {
        reader.read_to_end().await;
        assert_eq!(reader.text(), expected);
    }
    resumed.read_to_end().await;
    assert_eq!(resumed.text(), &expected["id: 1\ndata: a\n\n".len()..]);

    // The stream is over: a late chunk is unknown, a retried one still accepted.
    let reply = daemon
        .results(json!([chunk(&id, 5, "data: late\n\n", false)]))
        .await;
    assert_eq!(reply["unknown"], json!([id]), "{reply}");
    let reply = daemon.results(json!([chunk(&id, 4, "", true)])).await;
    assert_eq!(reply["accepted"], json!([id]), "{reply}");

    // A failed context is not served: the next request is a new fetch.
    let (pending, again) = request_stream(&client, &daemon, &path, &[]).await;
    let again_id = again["id"].as_str().unwrap().to_owned();
    assert_ne!(again_id, id, "a new stream command");
    assert_eq!(again["stream"], true);
    let mut body = String::from("data: z\n\n");
    body.push_str(": comment only\n\n");
    let mut last = first_chunk(&again_id, &body);
    last["complete"] = json!(true);
    daemon.results(json!([last])).await;
    let mut reader = answered(pending).await;
    reader.read_to_end().await;
    assert_eq!(
        (
            reader.status,
            reader.source.as_str(),
            reader.text().as_str()
        ),
        (200, "daemon", "id: 1\ndata: z\n\n")
    );
    let replay = get(&client, &path, &[]).await;
    assert_eq!(
        (replay.status, replay.source.as_str(), replay.body.as_str()),
        (200, "cache", "id: 1\ndata: z\n\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_uploads_are_checked() {
    let relay = TestRelay::start_with("[streams]\nmax_chunk_bytes = 64\n").await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let path = context("m2");
    let (pending, command) = request_stream(&client, &daemon, &path, &[]).await;
    let id = command["id"].as_str().unwrap().to_owned();
    daemon
        .results(json!([first_chunk(&id, "data: a\n\n")]))
        .await;
    let mut reader = answered(pending).await;
    reader.expect_next("id: 1\ndata: a\n\n").await;

    // A gap: 409 chunk_gap with the index the relay needs next.
    let (status, body) = post_results(&daemon, json!([chunk(&id, 5, "data: x\n\n", false)])).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "chunk_gap", "{body}");
    assert_eq!(body["error"]["details"]["expected"], 1, "{body}");
    assert_eq!(body["error"]["details"]["command_id"], id, "{body}");

    // A negative index, or both data and data_base64: 400.
    let (status, body) = post_results(&daemon, json!([chunk(&id, -1, "data: x\n\n", false)])).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("bad_request"))
    );
    let mut both = chunk(&id, 1, "data: x\n\n", false);
    both["data_base64"] = json!("ZGF0YTogeAoK");
    let (status, _) = post_results(&daemon, json!([both])).await;
    assert_eq!(status, 400);

    // Over max_chunk_bytes (counted after base64 decoding too): 413.
    let big = format!("data: {}\n\n", "y".repeat(60));
    let (status, body) = post_results(&daemon, json!([chunk(&id, 1, &big, false)])).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large");
    let mut big64 = chunk(&id, 1, "", false);
    big64.as_object_mut().unwrap().remove("data");
    big64["data_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&big));
    let (status, _) = post_results(&daemon, json!([big64])).await;
    assert_eq!(status, 413);

    // data_base64 carries the bytes; exactly 64 is within the limit.
    let exact = format!("data: {}\n\n", "b".repeat(56));
    assert_eq!(exact.len(), 64);
    let mut b64 = json!({ "command_id": id, "chunk": 1, "complete": false });
    b64["data_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&exact));
    assert_eq!(daemon.results(json!([b64])).await["accepted"], json!([id]));
    reader.expect_next(&format!("id: 2\n{exact}")).await;

    // A duplicate index (a retry: the same bytes) is accepted and ignored. Different bytes
    // under a stored index would fail the fetch (see the store's unit tests).
    let reply = daemon.results(json!([chunk(&id, 1, &exact, false)])).await;
    assert_eq!(reply["accepted"], json!([id]));
    assert_eq!(reply["unknown"], json!([]));

    // An unknown command id is listed in `unknown`; it does not fail the batch.
    let reply = daemon
        .results(json!([
            chunk("cmd-nope", 0, "data: x\n\n", false),
            chunk(&id, 2, "data: c\n\n", true),
        ]))
        .await;
    assert_eq!(reply["unknown"], json!(["cmd-nope"]), "{reply}");
    assert_eq!(reply["accepted"], json!([id]), "{reply}");
    reader.read_to_end().await;
    assert_eq!(
        reader.text(),
        format!("id: 1\ndata: a\n\nid: 2\n{exact}id: 3\ndata: c\n\n"),
        "the duplicate and the refused chunks left no trace"
    );
    let replay = get(&client, &path, &[]).await;
    assert_eq!(
        (replay.source.as_str(), replay.body),
        ("cache", reader.text())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_request_with_last_event_id_still_fetches_the_whole_context() {
    // The relay's event ids are its own ordinals: a first client's `Last-Event-ID` must
    // not reach the daemon, or the shared, stored context would start mid-way.
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let path = context("m3");
    let (pending, command) =
        request_stream(&client, &daemon, &path, &[("last-event-id", "1")]).await;
    let id = command["id"].as_str().unwrap().to_owned();
    let headers = command["params"]["headers"].as_object().unwrap();
    assert!(
        !headers
            .keys()
            .any(|k| k.eq_ignore_ascii_case("last-event-id")),
        "Last-Event-ID forwarded to the daemon: {headers:?}"
    );
    daemon
        .results(json!([
            first_chunk(&id, "data: a\n\n"),
            chunk(&id, 1, "data: b\n\n", true)
        ]))
        .await;
    let mut reader = answered(pending).await;
    reader.read_to_end().await;
    assert_eq!(reader.text(), "id: 2\ndata: b\n\n", "resumed after event 1");
    let replay = get(&client, &path, &[]).await;
    assert_eq!(
        (replay.source.as_str(), replay.body.as_str()),
        ("cache", "id: 1\ndata: a\n\nid: 2\ndata: b\n\n")
    );
}
