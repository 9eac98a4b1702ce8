//! `POST /sync/stream` end to end: the agent on its one stream (every kind of item, one
//! TCP connection, no poll or results request), the line protocol as a daemon speaks it
//! (answers in order and only once durable, errors that do not end the stream, supersede,
//! lease expiry and redelivery, revocation), a daemon that stops reading (the relay leases
//! no more than it can send, and its memory stays put), HTTP/1.1 refused, and an agent
//! that falls back to long polling on a relay without the stream.

mod common;

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use common::daemon::TestDaemon;
use common::{eventually, Daemon, RelayProcess, TestAgent, TestRelay};
use syncrelay::agent::RawAgent;
use syncrelay::protocol::LineBuffer;

const DAEMON: &str = "streamer";

/// A daemon's side of one stream, spoken by hand.
struct RawStream {
    lines_out: mpsc::Sender<Bytes>,
    lines_in: mpsc::UnboundedReceiver<Value>,
}

impl RawStream {
    /// Opens the stream for `daemon`'s connection; panics unless the relay answers 200.
    async fn open(daemon: &Daemon) -> RawStream {
        let (status, stream) = Self::try_open(daemon).await;
        assert_eq!(status, 200);
        stream.expect("a stream")
    }

    async fn try_open(daemon: &Daemon) -> (u16, Option<RawStream>) {
        let (status, parts) = open_response(daemon).await;
        let Some((response, lines_out)) = parts else {
            return (status, None);
        };
        let lines_in = relay_lines(response);
        (
            status,
            Some(RawStream {
                lines_out,
                lines_in,
            }),
        )
    }

    async fn send(&self, line: Value) {
        let mut bytes = serde_json::to_vec(&line).unwrap();
        bytes.push(b'\n');
        self.lines_out
            .send(bytes.into())
            .await
            .expect("stream open");
    }

    /// The next line that is not a keep-alive (within 20 s); `None` once the relay ended
    /// the stream.
    async fn next(&mut self) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines_in.recv())
                .await
                .expect("a line within 20 s")?;
            if line["keepalive"] != true {
                return Some(line);
            }
        }
    }

    /// The next answer to a line (commands in between are returned in `commands`).
    async fn answer(&mut self, commands: &mut Vec<Value>) -> Value {
        loop {
            let line = self.next().await.expect("an answer");
            match line["commands"].as_array() {
                Some(list) => commands.extend(list.iter().cloned()),
                None => return line,
            }
        }
    }

    /// Commands until at least one arrives.
    async fn commands(&mut self) -> Vec<Value> {
        let line = self.next().await.expect("a commands line");
        line["commands"]
            .as_array()
            .unwrap_or_else(|| panic!("expected commands, got {line}"))
            .clone()
    }
}

/// The relay's lines of a stream, parsed, as they arrive (the crate's own line cutter).
fn relay_lines(response: reqwest::Response) -> mpsc::UnboundedReceiver<Value> {
    let (tx, lines_in) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut body = response.bytes_stream();
        let mut lines = LineBuffer::default();
        while let Some(Ok(bytes)) = body.next().await {
            lines.push(&bytes);
            while let Some(line) = lines.next_line() {
                let value: Value = serde_json::from_slice(&line).expect("a JSON line");
                if tx.send(value).is_err() {
                    return;
                }
            }
        }
    });
    lines_in
}

/// `POST /sync/stream` over prior-knowledge h2c; the response and the request body's sender
/// when it is a 200.
async fn open_response(daemon: &Daemon) -> (u16, Option<(reqwest::Response, mpsc::Sender<Bytes>)>) {
    let http = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let (lines_out, body) = mpsc::channel::<Bytes>(16);
    let body = tokio_stream::wrappers::ReceiverStream::new(body).map(Ok::<_, std::io::Error>);
    let response = http
        .post(format!("{}/sync/stream", daemon.url))
        .query(&[
            ("daemon_id", daemon.daemon_id.as_str()),
            ("connection_id", daemon.connection_id.as_deref().unwrap()),
        ])
        .bearer_auth(&daemon.key)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .expect("relay reachable");
    let status = response.status().as_u16();
    match status {
        200 => (status, Some((response, lines_out))),
        _ => (status, None),
    }
}

/// Queues a named command without waiting for it; its id.
async fn queue(relay_url: &str, client_key: &str, params: Value) -> String {
    let response = reqwest::Client::new()
        .post(format!("{relay_url}/api/v1/daemons/{DAEMON}/commands"))
        .bearer_auth(client_key)
        .header("prefer", "respond-async")
        .json(&json!({ "method": "doThing", "params": params }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().to_owned()
}

async fn command_view(relay_url: &str, client_key: &str, id: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{relay_url}/api/v1/commands/{id}"))
        .bearer_auth(client_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_carries_everything_on_one_stream_and_one_connection() {
    let relay = TestRelay::start().await;
    let daemon = TestDaemon::start().await;
    let daemon_key = relay.key("daemon", Some(DAEMON), None).await;
    let client = relay.client(&[DAEMON]).await;
    let agent = TestAgent::start(
        &relay.url,
        DAEMON,
        &daemon_key,
        &daemon.target,
        RawAgent::default(),
    );
    client.await_online(DAEMON).await;
    let accepted_before = relay.metric("syncrelay_connections_accepted").await;

    // A read (answered in memory), a write (stored, result stored), events (updates) and
    // a streamed context (chunks).
    let read = client
        .get(&format!("/api/v1/daemons/{DAEMON}/text"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    assert_eq!(read.text().await.unwrap(), "hello text");
    let write = client
        .post(&format!("/api/v1/daemons/{DAEMON}/echo/x"))
        .json(&json!({ "n": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(write.status(), 200);
    let echoed: Value = write.json().await.unwrap();
    assert_eq!(echoed["body"], r#"{"n":1}"#);
    let last = daemon.emit(5);
    let path = format!("/api/v1/daemons/{DAEMON}/changes");
    eventually(Duration::from_secs(10), || {
        let (client, path) = (client.clone(), path.clone());
        async move {
            let body: Value = client
                .get(&path)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            body["changes"].as_array().map_or(0, Vec::len) as u64 >= last
        }
    })
    .await;
    let context = client
        .get(&format!(
            "/api/v1/daemons/{DAEMON}/approvals/a1/context/stream?events=50&size=2000"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(context.status(), 200);
    let text = context.text().await.unwrap();
    assert_eq!(
        text.matches("data: ").count(),
        50,
        "{}",
        &text[..text.len().min(300)]
    );

    // One stream, no poll or results request, and no second connection.
    let route = |r: &str| format!("syncrelay_requests_total{{route=\"{r}\"}}");
    assert_eq!(relay.metric(&route("/sync/stream")).await, Some(1.0));
    assert_eq!(relay.metric(&route("/sync/poll")).await, Some(0.0));
    assert_eq!(relay.metric(&route("/sync/results")).await, Some(0.0));
    assert_eq!(
        relay.metric("syncrelay_connections_accepted").await,
        accepted_before.map(|n| n + 4.0),
        "the agent made no connection beyond its one (the four are this test's requests)"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_are_answered_in_order_once_durable_and_errors_do_not_end_the_stream() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon(DAEMON).await;
    let client = relay.client(&[DAEMON]).await;
    let mut stream = RawStream::open(&daemon).await;
    let mut commands = Vec::new();

    stream
        .send(json!({ "updates": [
            { "type": "session_created", "data": { "n": 1 }, "seq": 1 },
            { "type": "session_created", "data": { "n": 2 }, "seq": 2 },
        ] }))
        .await;
    stream.send(json!("not an object")).await;
    stream
        .send(json!({ "results": [{ "command_id": "cmd-nope", "result": {} }] }))
        .await;
    // A retry of the first line: dropped by `seq`.
    stream
        .send(json!({ "updates": [{ "type": "session_created", "data": { "n": 2 }, "seq": 2 }] }))
        .await;
    stream.send(json!({})).await;
    assert_eq!(
        stream.answer(&mut commands).await,
        json!({ "last_update_seq": 2 })
    );
    let refused = stream.answer(&mut commands).await;
    assert_eq!(refused["error"]["code"], "bad_request", "{refused}");
    assert_eq!(
        stream.answer(&mut commands).await,
        json!({ "accepted": [], "unknown": ["cmd-nope"] })
    );
    assert_eq!(
        stream.answer(&mut commands).await,
        json!({ "last_update_seq": 2 })
    );
    assert_eq!(
        stream.answer(&mut commands).await,
        json!({ "last_update_seq": 2 })
    );
    let log: Value = client
        .get(&format!("/api/v1/daemons/{DAEMON}/changes"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(log["changes"].as_array().unwrap().len(), 2, "{log}");

    // A command queued now arrives on the stream; its result is accepted on it.
    let id = queue(&relay.url, &client.key, json!({ "x": 1 })).await;
    let handed = stream.commands().await;
    assert_eq!(handed[0]["id"], id.as_str());
    stream
        .send(json!({ "results": [{ "command_id": id, "result": { "ok": true } }] }))
        .await;
    assert_eq!(
        stream.answer(&mut commands).await,
        json!({ "accepted": [id], "unknown": [] })
    );
    let view = command_view(&relay.url, &client.key, &id).await;
    assert_eq!(view["state"], "completed");
    assert_eq!(view["result"], json!({ "ok": true }));

    // Chunks: a gap is an error line that answers its line, and the stream goes on.
    let context = client
        .get(&format!(
            "/api/v1/daemons/{DAEMON}/approvals/a1/context/stream"
        ))
        .send();
    let context = tokio::spawn(context);
    let stream_command = stream.commands().await;
    let sid = stream_command[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(stream_command[0]["stream"], true);
    let chunk = |n: u64, data: &str, complete: bool| {
        json!({ "results": [{ "command_id": sid, "chunk": n, "status": 200,
            "headers": { "content-type": "text/event-stream" }, "data": data, "complete": complete }] })
    };
    stream.send(chunk(0, "data: one\n\n", false)).await;
    stream.send(chunk(2, "data: three\n\n", false)).await;
    stream.send(chunk(1, "data: two\n\n", true)).await;
    assert_eq!(
        stream.answer(&mut commands).await,
        json!({ "accepted": [sid], "unknown": [] })
    );
    let gap = stream.answer(&mut commands).await;
    assert_eq!(gap["error"]["code"], "chunk_gap", "{gap}");
    assert_eq!(gap["error"]["details"]["expected"], 1);
    assert_eq!(
        stream.answer(&mut commands).await,
        json!({ "accepted": [sid], "unknown": [] })
    );
    let context = context.await.unwrap().unwrap();
    assert_eq!(context.status(), 200);
    let body = context.text().await.unwrap();
    assert!(
        body.contains("data: one") && body.contains("data: two"),
        "{body}"
    );
    assert!(
        commands.is_empty(),
        "no other command was queued: {commands:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_connect_ends_the_stream_with_superseded() {
    let relay = TestRelay::start().await;
    let mut daemon = relay.daemon(DAEMON).await;
    let mut stream = RawStream::open(&daemon).await;
    stream.send(json!({})).await;
    assert!(stream.next().await.unwrap()["last_update_seq"].is_u64());
    daemon.connect().await;
    let last = stream.next().await.expect("a last line");
    assert_eq!(last["error"]["code"], "superseded", "{last}");
    assert_eq!(stream.next().await, None, "the stream ends after it");
    // The old connection cannot open a stream either: 409 before any line.
    let old = Daemon {
        connection_id: Some("conn-old".into()),
        ..Daemon::new(&relay.url, DAEMON, &daemon.key)
    };
    assert_eq!(RawStream::try_open(&old).await.0, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_not_answered_in_its_lease_is_handed_out_again_on_the_stream() {
    let relay = TestRelay::start_with("[sync]\nlease_duration = \"1s\"\n").await;
    let daemon = relay.daemon(DAEMON).await;
    let client = relay.client(&[DAEMON]).await;
    let mut stream = RawStream::open(&daemon).await;
    let id = queue(&relay.url, &client.key, json!({ "x": 1 })).await;
    let first = stream.commands().await;
    assert_eq!(first[0]["id"], id.as_str());
    // No result: the lease runs out and the same command comes again, unasked.
    let again = stream.commands().await;
    assert_eq!(again[0]["id"], id.as_str());
    let view = command_view(&relay.url, &client.key, &id).await;
    assert_eq!(view["deliveries"], 2, "{view}");
    stream
        .send(json!({ "results": [{ "command_id": id, "result": 7 }] }))
        .await;
    let mut commands = Vec::new();
    assert_eq!(
        stream.answer(&mut commands).await,
        json!({ "accepted": [id], "unknown": [] })
    );
    assert_eq!(
        command_view(&relay.url, &client.key, &id).await["result"],
        7
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_ends_the_stream() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon(DAEMON).await;
    let mut stream = RawStream::open(&daemon).await;
    stream.send(json!({})).await;
    assert!(stream.next().await.unwrap()["last_update_seq"].is_u64());
    let keys: Value = relay
        .http
        .get(format!("{}/admin/keys", relay.url))
        .bearer_auth(&relay.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key_id = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["daemon"] == DAEMON)
        .and_then(|k| k["key_id"].as_str())
        .expect("the daemon's key")
        .to_owned();
    let revoked = relay
        .http
        .delete(format!("{}/admin/keys/{key_id}", relay.url))
        .bearer_auth(&relay.admin_token)
        .send()
        .await
        .unwrap();
    assert!(revoked.status().is_success());
    let last = stream.next().await.expect("a last line");
    assert_eq!(last["error"]["code"], "unauthorized", "{last}");
    assert_eq!(stream.next().await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_is_refused_with_a_clear_error() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon(DAEMON).await;
    let response = reqwest::Client::builder()
        .http1_only()
        .build()
        .unwrap()
        .post(format!("{}/sync/stream", relay.url))
        .query(&[
            ("daemon_id", DAEMON),
            ("connection_id", daemon.connection_id.as_deref().unwrap()),
        ])
        .bearer_auth(&daemon.key)
        .body("{}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("HTTP/2"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_polls_a_relay_without_the_stream() {
    let relay = TestRelay::start_with("[sync]\nstream = false\n").await;
    let daemon = TestDaemon::start().await;
    let daemon_key = relay.key("daemon", Some(DAEMON), None).await;
    let client = relay.client(&[DAEMON]).await;
    let mut raw = Daemon::new(&relay.url, DAEMON, &daemon_key);
    let hello = raw.connect().await;
    assert_eq!(hello["transports"], json!(["poll"]));
    assert_eq!(RawStream::try_open(&raw).await.0, 404);
    let agent = TestAgent::start(
        &relay.url,
        DAEMON,
        &daemon_key,
        &daemon.target,
        RawAgent::default(),
    );
    client.await_online(DAEMON).await;
    let read = client
        .get(&format!("/api/v1/daemons/{DAEMON}/text"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.text().await.unwrap(), "hello text");
    let route = |r: &str| format!("syncrelay_requests_total{{route=\"{r}\"}}");
    assert_eq!(
        relay.metric(&route("/sync/stream")).await,
        Some(1.0),
        "only ours"
    );
    assert!(relay.metric(&route("/sync/poll")).await.unwrap() >= 1.0);
    agent.stop().await;
}

/// Resident memory of a process, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_stops_reading_holds_a_bounded_part_of_the_relay() {
    const COMMANDS: usize = 400;
    const PARAM_BYTES: usize = 60_000;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("extra.toml");
    std::fs::write(&config, "").unwrap();
    let relay = RelayProcess::spawn_with(
        &dir.path().join("data"),
        &config,
        "[sync]\nmax_commands_per_poll = 4\n",
    );
    let (daemon_key, client_key) = relay.daemon_and_client_keys(DAEMON).await;
    let mut daemon = Daemon::new(&relay.url, DAEMON, &daemon_key);
    daemon.connect().await;
    let filler = "x".repeat(PARAM_BYTES);
    let mut ids = Vec::with_capacity(COMMANDS);
    for n in 0..COMMANDS {
        ids.push(queue(&relay.url, &client_key, json!({ "n": n, "fill": filler })).await);
    }
    let rss_before = rss_bytes(relay.child.id());

    // Open the stream and never read it: the relay sends what HTTP/2's windows take, queues
    // a few lines more, and leases nothing further.
    let (status, parts) = open_response(&daemon).await;
    assert_eq!(status, 200);
    let (response, _lines_out) = parts.unwrap();
    let delivered = || async {
        let mut count = 0;
        for id in &ids {
            if command_view(&relay.url, &client_key, id).await["state"] == "delivered" {
                count += 1;
            }
        }
        count
    };
    eventually(Duration::from_secs(20), || async { delivered().await >= 8 }).await;
    // Windows (the client's 2 MiB stream window: ~35 commands), the relay's queued lines
    // and the one hyper holds: well under a third of the queue, however long we look.
    let bound = 120;
    let mut seen = 0;
    for _ in 0..5 {
        seen = delivered().await;
        assert!(
            seen <= bound,
            "{seen} of {COMMANDS} commands leased to a daemon that reads nothing"
        );
    }
    let rss_stalled = rss_bytes(relay.child.id());
    let growth = rss_stalled.saturating_sub(rss_before);
    eprintln!(
        "stalled reader: {seen} of {COMMANDS} commands ({} KiB each) leased; relay RSS {} → {} KiB (+{} KiB)",
        PARAM_BYTES / 1024,
        rss_before / 1024,
        rss_stalled / 1024,
        growth / 1024
    );
    assert!(
        growth < 16 << 20,
        "the relay grew by {} KiB for a stalled reader (the queue is {} MiB)",
        growth / 1024,
        (COMMANDS * PARAM_BYTES) >> 20
    );

    // Reading again, the daemon gets every command: nothing was lost while it stalled.
    let mut lines = relay_lines(response);
    let mut got = std::collections::HashSet::new();
    while got.len() < COMMANDS {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.recv())
            .await
            .expect("lines keep coming")
            .expect("the stream is open");
        for command in line["commands"].as_array().into_iter().flatten() {
            got.insert(command["id"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(got.len(), COMMANDS);
}
