//! The agent end to end: a relay (in-process), the agent (in-process, through the library)
//! and a local HTTP daemon (`common::daemon::TestDaemon`), all on loopback; clients call
//! the daemon through the relay's mirrored API (`/api/v1/daemons/d/…`) and named commands.
//!
//! Covered here:
//! - requests: every method, path, query, end-to-end headers, JSON/text/binary bodies;
//! - responses: status codes, custom and repeated headers, text, JSON and binary bodies;
//! - failures: a slow target (504 `timeout`), a target that is down (502
//!   `target_unreachable`), both kept as `failed` commands; the agent recovers when the
//!   daemon comes back;
//! - concurrent calls, bounded by the agent's `concurrency`;
//! - named methods through `[agent.methods]`, and an unmapped one (502 `unknown_method`);
//! - the daemon's SSE events reaching the relay's change log in order, exactly once;
//! - redelivery: a command the relay hands out again (lease expired, reconnect) is
//!   executed once, whether it is still running or already finished with its result not
//!   yet accepted by the relay;
//! - a result stored before an agent restart is delivered after it, not re-executed; an
//!   agent stopped while a command runs restarts on its state dir and completes it;
//! - a target with another path layout (the `/api/v1` prefix is swapped, events off);
//! - one TCP connection from the agent to the relay, counted by a proxy in between.
//!
//! Faults with real processes (relay and agent killed and restarted) live in
//! `agent_faults.rs`; the relay's SSE mirror of the change log in `changes.rs`.

mod common;

use std::time::{Duration, Instant};

use common::daemon::TestDaemon;
use common::proxy::Proxy;
use common::{eventually, Client, TestAgent, TestRelay};
use reqwest::Method;
use serde_json::{json, Value};
use syncrelay::agent::RawAgent;

/// Bound of every wait on a condition.
const LIMIT: Duration = Duration::from_secs(10);

/// A relay, a local daemon and an agent between them (daemon id `d`), with a client that
/// has seen `d` online.
struct Env {
    _relay: TestRelay,
    daemon: TestDaemon,
    client: Client,
    _agent: TestAgent,
}

/// `relay_toml` is added to the relay's config; `agent` sets further `[agent]` fields.
async fn env(relay_toml: &str, agent: RawAgent) -> Env {
    let relay = TestRelay::start_with(relay_toml).await;
    let daemon = TestDaemon::start().await;
    let key = relay.key("daemon", Some("d"), None).await;
    let client = relay.client(&["d"]).await;
    let agent = TestAgent::start(&relay.url, "d", &key, &daemon.target, agent);
    client.await_online("d").await;
    Env {
        _relay: relay,
        daemon,
        client,
        _agent: agent,
    }
}

/// A mirrored call to daemon `d` (`path` is under its `/api/v1`) that waits for the answer.
fn mirrored(client: &Client, method: Method, path: &str) -> reqwest::RequestBuilder {
    client
        .request(method, &format!("/api/v1/daemons/d{path}"))
        .header("prefer", "wait=10")
}

/// A write queued with `Prefer: respond-async`: asserts the 202 and returns the command id.
async fn queue_write(client: &Client, path: &str) -> String {
    let response = client
        .post(&format!("/api/v1/daemons/d{path}"))
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/api/v1/commands/{id}"));
    id
}

/// `GET /api/v1/commands/{id}?wait=N`.
async fn command(client: &Client, id: &str, wait_secs: u64) -> Value {
    let response = client
        .get(&format!("/api/v1/commands/{id}?wait={wait_secs}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The error code of a relay-made error (`{"error":{"code","message"}}`), checking the shape.
async fn error_code(response: reqwest::Response) -> String {
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"].is_string(),
        "not the error shape: {body}"
    );
    body["error"]["code"].as_str().unwrap().to_owned()
}

/// Daemon `d`'s change log from the start.
async fn changes(client: &Client) -> Vec<Value> {
    let body: Value = client
        .get("/api/v1/daemons/d/changes?since=0&limit=1000")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["changes"].as_array().unwrap().clone()
}

/// Awaits at least `count` entries in `d`'s change log and returns them.
async fn await_changes(client: &Client, count: usize) -> Vec<Value> {
    eventually(LIMIT, move || async move {
        changes(client).await.len() >= count
    })
    .await;
    changes(client).await
}

/// Asserts the change log holds exactly the ticks `1..=last`, in order, each once.
fn assert_ticks(entries: &[Value], last: u64) {
    let numbers: Vec<u64> = entries
        .iter()
        .map(|entry| {
            assert_eq!(entry["type"], "tick", "{entry}");
            entry["data"]["n"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(numbers, (1..=last).collect::<Vec<_>>());
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirrored_get_reaches_the_local_daemon() {
    let relay = TestRelay::start().await;
    let daemon = TestDaemon::start().await;
    let key = relay.key("daemon", Some("d"), None).await;
    let client = relay.client(&["d"]).await;
    let _agent = TestAgent::start(&relay.url, "d", &key, &daemon.target, RawAgent::default());
    client.await_online("d").await;
    let response = client
        .get("/api/v1/daemons/d/echo/x?y=1")
        .header("prefer", "wait=10")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-syncrelay-source"], "daemon");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["path"], "/api/v1/echo/x");
    assert_eq!(body["query"], "y=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_reaches_the_daemon_with_path_query_headers_and_body() {
    let env = env("", RawAgent::default()).await;
    let query = "q=a%20b&list=1&list=2&empty=";
    for method in [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
    ] {
        let name = method.as_str().to_ascii_lowercase();
        let mut request = mirrored(
            &env.client,
            method.clone(),
            &format!("/echo/{name}?{query}"),
        )
        .header("x-custom", format!("custom-{name}"))
        .header("x-syncrelay-command-id", "forged")
        .header("x-multi", "a")
        .header("x-multi", "b");
        if method != Method::GET {
            request = request
                .header("content-type", "text/plain")
                .body(format!("body of {name}"));
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "{method}");
        assert_eq!(response.headers()["x-syncrelay-source"], "daemon");
        let echo: Value = response.json().await.unwrap();
        assert_eq!(echo["method"], method.as_str());
        assert_eq!(echo["path"], format!("/api/v1/echo/{name}"));
        assert_eq!(echo["query"], query, "{method}");
        assert_eq!(echo["headers"]["x-custom"], format!("custom-{name}"));
        assert_eq!(echo["headers"]["x-multi"], "a, b", "{method}");
        // The relay's own request headers stay at the relay: the client key above all.
        for private in ["authorization", "prefer"] {
            assert!(
                echo["headers"].get(private).is_none(),
                "{private} forwarded"
            );
        }
        // The command id the daemon sees is the one the relay gave the command, never a
        // client's forgery: it is what a daemon deduplicates re-deliveries by.
        let id = echo["headers"]["x-syncrelay-command-id"].as_str().unwrap();
        assert!(id.starts_with("cmd-") && id.len() > 4, "{method}: {id}");
        assert_eq!(
            env.daemon.command_ids(&format!("/api/v1/echo/{name}")),
            [id.to_owned()]
        );
        if method == Method::GET {
            assert_eq!(echo["body"], "", "{method}");
        } else {
            assert_eq!(echo["body"], format!("body of {name}"), "{method}");
            assert_eq!(echo["headers"]["content-type"], "text/plain");
        }
    }

    // HEAD: the daemon is reached, the answer has the daemon's headers and no body.
    let response = mirrored(&env.client, Method::HEAD, "/echo/head?h=1")
        .header("x-custom", "custom-head")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["x-syncrelay-source"], "daemon");
    assert!(response.bytes().await.unwrap().is_empty());
    assert_eq!(env.daemon.hits("/api/v1/echo/head"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_text_and_binary_request_bodies_arrive_unchanged() {
    let env = env("", RawAgent::default()).await;

    let document = json!({ "a": [1, 2.5, null], "s": "x\"y", "nested": { "ok": true } });
    let response = mirrored(&env.client, Method::POST, "/echo/json")
        .json(&document)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["headers"]["content-type"], "application/json");
    let received: Value = serde_json::from_str(echo["body"].as_str().unwrap()).unwrap();
    assert_eq!(received, document);

    let text = "héllo\nwörld \u{1f980} {not json";
    let response = mirrored(&env.client, Method::PUT, "/echo/text")
        .header("content-type", "text/plain; charset=utf-8")
        .body(text)
        .send()
        .await
        .unwrap();
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["body"], text);
    assert_eq!(echo["headers"]["content-type"], "text/plain; charset=utf-8");

    let bytes: Vec<u8> = (0..=255u8).rev().chain(0..=255u8).collect();
    let response = mirrored(&env.client, Method::POST, "/echo/binary")
        .header("content-type", "application/octet-stream")
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["body_hex"], hex(&bytes), "binary body not byte-exact");
    assert_eq!(echo["headers"]["content-type"], "application/octet-stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_codes_pass_through() {
    let env = env("", RawAgent::default()).await;
    for code in [200u16, 201, 400, 404, 409, 500, 503] {
        let response = mirrored(&env.client, Method::GET, &format!("/status/{code}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), code);
        assert_eq!(response.headers()["x-syncrelay-source"], "daemon");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body, json!({ "code": code }));
    }
    // A write's status too.
    let response = mirrored(&env.client, Method::POST, "/status/201")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_headers_come_back_including_repeated_ones() {
    let env = env("", RawAgent::default()).await;
    let response = mirrored(&env.client, Method::GET, "/headers")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-daemon"], "yes");
    assert_eq!(response.headers()["content-type"], "application/json");
    let cookies: Vec<&str> = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({ "ok": true }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_binary_response_bodies_come_back_unchanged() {
    let env = env("", RawAgent::default()).await;

    let response = mirrored(&env.client, Method::GET, "/text")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; charset=utf-8"
    );
    assert_eq!(response.text().await.unwrap(), "hello text");

    let response = mirrored(&env.client, Method::GET, "/binary")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    assert_eq!(
        &response.bytes().await.unwrap()[..],
        [0u8, 159, 146, 150, 255]
    );

    // A larger body, not streamed: one result of 1 MiB.
    let size = 1 << 20;
    let response = mirrored(&env.client, Method::GET, &format!("/big?bytes={size}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    assert_eq!(body.len(), size);
    for (index, piece) in body.chunks(65536).enumerate() {
        assert!(piece.iter().all(|b| *b == b'a' + (index % 26) as u8));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_target_answers_504_timeout_and_the_command_is_failed() {
    let agent = RawAgent {
        request_timeout: Some("300ms".into()),
        ..RawAgent::default()
    };
    let env = env("", agent).await;

    let started = Instant::now();
    let response = mirrored(&env.client, Method::GET, "/slow?ms=3000")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    assert_eq!(error_code(response).await, "timeout");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "answered by the agent's request_timeout, not the daemon: {:?}",
        started.elapsed()
    );

    // The same as a queued write: the command ends `failed`, with the error kept.
    let id = queue_write(&env.client, "/slow?ms=3000").await;
    let state = command(&env.client, &id, 10).await;
    assert_eq!(state["state"], "failed", "{state}");
    assert_eq!(state["error"]["code"], "timeout", "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_is_down_answers_502_and_the_command_is_failed_not_lost() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let target = format!("http://127.0.0.1:{port}/api/v1");
    let relay = TestRelay::start().await;
    let key = relay.key("daemon", Some("d"), None).await;
    let client = relay.client(&["d"]).await;
    let _agent = TestAgent::start(&relay.url, "d", &key, &target, RawAgent::default());
    client.await_online("d").await;

    let response = mirrored(&client, Method::GET, "/echo/read")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(error_code(response).await, "target_unreachable");

    let id = queue_write(&client, "/echo/write").await;
    let state = command(&client, &id, 10).await;
    assert_eq!(state["state"], "failed", "{state}");
    assert_eq!(state["error"]["code"], "target_unreachable", "{state}");
    assert_eq!(state["deliveries"], 1, "{state}");

    // The daemon comes up on that port: the agent, still running, reaches it.
    let daemon = TestDaemon::start_on(&format!("127.0.0.1:{port}")).await;
    let response = mirrored(&client, Method::GET, "/echo/back")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(daemon.hits("/api/v1/echo/back"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_all_succeed_within_the_concurrency_limit() {
    let agent = RawAgent {
        concurrency: Some(16),
        ..RawAgent::default()
    };
    let env = env("", agent).await;
    let started = Instant::now();
    let calls = (0..32).map(|_| {
        let client = env.client.clone();
        tokio::spawn(async move {
            let response = mirrored(&client, Method::GET, "/slow?ms=200")
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        })
    });
    for answer in futures_util::future::join_all(calls).await {
        assert_eq!(answer.unwrap(), (200, "slow".to_owned()));
    }
    let elapsed = started.elapsed();
    assert_eq!(env.daemon.hits("/api/v1/slow"), 32);
    // 32 calls of 200 ms, at most 16 at a time: two rounds at least; one at a time would
    // take 6.4 s.
    assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_methods_run_through_their_mapping() {
    let agent = RawAgent {
        methods: [
            (
                "getApproval".to_owned(),
                "GET /api/v1/echo/approvals/{approval_id}".to_owned(),
            ),
            (
                "decide".to_owned(),
                "POST /api/v1/echo/approvals/{approval_id}/decide".to_owned(),
            ),
        ]
        .into(),
        ..RawAgent::default()
    };
    let env = env("", agent).await;
    let named = |body: Value| {
        env.client
            .post("/api/v1/daemons/d/commands")
            .header("prefer", "wait=10")
            .json(&body)
            .send()
    };

    let response =
        named(json!({ "method": "getApproval", "params": { "approval_id": "a1", "x": "2" } }))
            .await
            .unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/api/v1/echo/approvals/a1");
    assert_eq!(echo["query"], "x=2");

    // A write: the params left after the path become a JSON body.
    let response = named(
        json!({ "method": "decide", "params": { "approval_id": "a2", "decision": "approve" } }),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/api/v1/echo/approvals/a2/decide");
    let body: Value = serde_json::from_str(echo["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, json!({ "decision": "approve" }));

    let response = named(json!({ "method": "noSuchMethod", "params": {} }))
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(error_code(response).await, "unknown_method");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_events_reach_the_change_log_in_order_exactly_once() {
    let env = env("", RawAgent::default()).await;
    assert_eq!(env.daemon.emit(20), 20);
    let entries = await_changes(&env.client, 20).await;
    assert_ticks(&entries, 20);
    for entry in &entries {
        let n = entry["data"]["n"].as_u64().unwrap();
        assert_eq!(entry["data"]["session_id"], format!("s{}", n % 3));
        assert!(
            entry["timestamp"]
                .as_str()
                .unwrap()
                .starts_with("2026-01-01T00:00:00"),
            "the daemon's timestamp is kept: {entry}"
        );
    }
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // Events emitted later, while the agent runs, keep flowing.
    for round in 1..=3u64 {
        let last = env.daemon.emit(5);
        assert_eq!(last, 20 + 5 * round);
        let entries = await_changes(&env.client, last as usize).await;
        assert_ticks(&entries, last);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_redelivered_while_it_runs_is_not_executed_again() {
    // The lease (1 s) runs out twice while the daemon takes 2.5 s: the relay hands the
    // command to the agent again on its waiting poll.
    let env = env("[sync]\nlease_duration = \"1s\"\n", RawAgent::default()).await;
    let id = queue_write(&env.client, "/slow?ms=2500").await;
    let (client, id_ref) = (&env.client, id.as_str());
    eventually(LIMIT, move || async move {
        let state = command(client, id_ref, 0).await;
        assert_ne!(state["state"], "completed", "finished before a redelivery");
        state["deliveries"].as_u64().unwrap() >= 2
    })
    .await;

    let done = command(&env.client, &id, 10).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["result"]["status"], 200);
    assert_eq!(done["result"]["body"], "slow");
    // A later call's round trip: the agent has long handled every redelivery.
    let response = mirrored(&env.client, Method::GET, "/echo/after")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(env.daemon.hits("/api/v1/slow"), 1, "executed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_redelivered_after_it_ran_gets_the_stored_result_not_a_second_run() {
    // The agent dials the relay through a proxy that can hold what the agent sends. The
    // command finishes while the agent's result post is held; the lease (2 s) runs out and
    // the relay hands the command out again on the poll already waiting there; only then
    // does the result get through.
    let relay = TestRelay::start_with("[sync]\nlease_duration = \"2s\"\n").await;
    let daemon = TestDaemon::start().await;
    let proxy = Proxy::start(relay.addr).await;
    let key = relay.key("daemon", Some("d"), None).await;
    let client = relay.client(&["d"]).await;
    let _agent = TestAgent::start(&proxy.url, "d", &key, &daemon.target, RawAgent::default());
    client.await_online("d").await;

    let id = queue_write(&client, "/slow?ms=1000").await;
    // The daemon is executing it, and the agent's next poll waits at the relay.
    let (relay_ref, daemon_ref) = (&relay, &daemon);
    eventually(LIMIT, move || async move {
        daemon_ref.hits("/api/v1/slow") == 1
            && relay_ref.metric("syncrelay_polls_waiting").await == Some(1.0)
    })
    .await;
    proxy.hold(true);
    let (client_ref, id_ref) = (&client, id.as_str());
    eventually(LIMIT, move || async move {
        command(client_ref, id_ref, 0).await["deliveries"]
            .as_u64()
            .unwrap()
            >= 2
    })
    .await;
    let state = command(&client, &id, 0).await;
    assert_eq!(
        state["state"], "delivered",
        "the relay had the result before it redelivered: {state}"
    );
    proxy.hold(false);

    let done = command(&client, &id, 10).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["result"]["body"], "slow");
    let response = mirrored(&client, Method::GET, "/echo/after")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(daemon.hits("/api/v1/slow"), 1, "executed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_stored_before_a_restart_is_delivered_after_it_without_a_second_run() {
    // The first agent runs the command, but its result post is held in the proxy; the
    // agent stops with the result only in its state dir. An agent restarted on that dir
    // (dialing the relay directly) delivers it; the relay also hands the command out
    // again on reconnect, which must not run it a second time.
    let relay = TestRelay::start_with("[sync]\nlease_duration = \"2s\"\n").await;
    let daemon = TestDaemon::start().await;
    let proxy = Proxy::start(relay.addr).await;
    let key = relay.key("daemon", Some("d"), None).await;
    let client = relay.client(&["d"]).await;
    let agent = TestAgent::start(&proxy.url, "d", &key, &daemon.target, RawAgent::default());
    client.await_online("d").await;

    let id = queue_write(&client, "/slow?ms=500").await;
    let daemon_ref = &daemon;
    eventually(LIMIT, move || async move {
        daemon_ref.hits("/api/v1/slow") == 1
    })
    .await;
    proxy.hold(true);
    // The lease (2 s) outlasts the daemon's 0.5 s: once it has run out, the command is
    // long finished at the agent, and the relay still lacks its result.
    let (client_ref, id_ref) = (&client, id.as_str());
    eventually(LIMIT, move || async move {
        command(client_ref, id_ref, 0).await["deliveries"]
            .as_u64()
            .unwrap()
            >= 2
    })
    .await;
    assert_eq!(command(&client, &id, 0).await["state"], "delivered");
    let state_dir = agent.stop().await;

    let _agent = TestAgent::start_in(
        state_dir,
        &relay.url,
        "d",
        &key,
        &daemon.target,
        RawAgent::default(),
    );
    let done = command(&client, &id, 10).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["result"]["status"], 200);
    assert_eq!(done["result"]["body"], "slow");
    let response = mirrored(&client, Method::GET, "/echo/after")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(daemon.hits("/api/v1/slow"), 1, "executed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stopped_while_a_command_runs_restarts_on_its_state_dir_and_completes_it() {
    // An embedding process stops the agent while the daemon is still working on a command
    // and starts it again on the same state dir: once `run` has returned, the state dir is
    // free, and the command (delivered again on reconnect) still ends completed.
    let relay = TestRelay::start().await;
    let daemon = TestDaemon::start().await;
    let key = relay.key("daemon", Some("d"), None).await;
    let client = relay.client(&["d"]).await;
    let agent = TestAgent::start(&relay.url, "d", &key, &daemon.target, RawAgent::default());
    client.await_online("d").await;

    let id = queue_write(&client, "/slow?ms=1500").await;
    let daemon_ref = &daemon;
    eventually(LIMIT, move || async move {
        daemon_ref.hits("/api/v1/slow") == 1
    })
    .await;
    let state_dir = agent.stop().await;
    let _agent = TestAgent::start_in(
        state_dir,
        &relay.url,
        "d",
        &key,
        &daemon.target,
        RawAgent::default(),
    );
    let done = command(&client, &id, 10).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["result"]["body"], "slow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_with_another_path_layout_gets_the_api_v1_prefix_swapped() {
    // The target stands for the daemon's `/api/v1`, whatever its own path (Syncthing:
    // `/rest`); here it is a path under the echo route, and events are disabled.
    let relay = TestRelay::start().await;
    let daemon = TestDaemon::start().await;
    let key = relay.key("daemon", Some("d"), None).await;
    let client = relay.client(&["d"]).await;
    let target = format!("http://{}/api/v1/echo/rest", daemon.addr);
    let agent = RawAgent {
        events: Some(String::new()),
        ..RawAgent::default()
    };
    let _agent = TestAgent::start(&relay.url, "d", &key, &target, agent);
    client.await_online("d").await;

    let response = mirrored(&client, Method::GET, "/system/status?leafOnly=true")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["path"], "/api/v1/echo/rest/system/status");
    assert_eq!(echo["query"], "leafOnly=true");
    assert_eq!(daemon.hits("/api/v1/stream/events"), 0);
    assert_eq!(daemon.hits("/api/v1/echo/rest/stream/events"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_uses_one_tcp_connection_to_the_relay() {
    let relay = TestRelay::start().await;
    let daemon = TestDaemon::start().await;
    let proxy = Proxy::start(relay.addr).await;
    let key = relay.key("daemon", Some("d"), None).await;
    let client = relay.client(&["d"]).await;
    let _agent = TestAgent::start(&proxy.url, "d", &key, &daemon.target, RawAgent::default());
    client.await_online("d").await;

    daemon.emit(30);
    let calls = (0..50).map(|i| {
        let client = client.clone();
        tokio::spawn(async move {
            let method = if i % 2 == 0 {
                Method::GET
            } else {
                Method::POST
            };
            let response = mirrored(&client, method, &format!("/echo/n{i}?i={i}"))
                .body(format!("call {i}"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let echo: Value = response.json().await.unwrap();
            assert_eq!(echo["path"], format!("/api/v1/echo/n{i}"));
            assert_eq!(echo["query"], format!("i={i}"));
        })
    });
    for call in futures_util::future::join_all(calls).await {
        call.unwrap();
    }
    let entries = await_changes(&client, 30).await;
    assert_ticks(&entries, 30);
    daemon.emit(10);
    assert_ticks(&await_changes(&client, 40).await, 40);

    assert_eq!(
        proxy.connections(),
        1,
        "the agent opened more than one connection"
    );
}

/// A Rust daemon embedding the agent: its own handler answers commands, and its events go
/// through the publisher. No local HTTP daemon is involved.
struct Doubler;

impl syncrelay::agent::CommandHandler for Doubler {
    fn handle(
        &self,
        command: syncrelay::agent::Command,
    ) -> futures_util::future::BoxFuture<'static, syncrelay::agent::Outcome> {
        Box::pin(async move {
            match command.method.as_str() {
                "double" => {
                    let n = command.params["n"].as_i64().unwrap_or(0);
                    syncrelay::agent::Outcome::Result(serde_json::json!({ "doubled": n * 2 }))
                }
                other => syncrelay::agent::Outcome::error("unknown_method", format!("no {other}")),
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_daemon_embeds_the_agent_with_its_own_handler() {
    let relay = TestRelay::start().await;
    let key = relay.key("daemon", Some("embedded"), None).await;
    let client = relay.client(&["embedded"]).await;
    let state = tempfile::tempdir().unwrap();
    let config = RawAgent {
        relay: Some(vec![relay.url.clone()]),
        daemon_id: Some("embedded".into()),
        key: Some(key),
        events: Some(String::new()),
        state_dir: Some(state.path().to_owned()),
        ..RawAgent::default()
    }
    .validate("embedded")
    .unwrap();
    let agent = syncrelay::agent::Agent::new(config, std::sync::Arc::new(Doubler)).unwrap();
    let publisher = agent.publisher();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(agent.run(async move {
        let _ = stop_rx.await;
    }));
    client.await_online("embedded").await;

    let answer: Value = client
        .post("/api/v1/daemons/embedded/commands")
        .header("prefer", "wait=10")
        .json(&serde_json::json!({ "method": "double", "params": { "n": 21 } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer, serde_json::json!({ "doubled": 42 }));

    let events: Vec<_> = (1..=3)
        .map(|n| syncrelay::store::OutboxEvent {
            kind: "native".into(),
            timestamp: None,
            data_json: format!("{{\"n\":{n}}}"),
        })
        .collect();
    publisher.publish(&events).await.unwrap();
    common::eventually(std::time::Duration::from_secs(10), || {
        let client = client.clone();
        async move {
            let body: Value = client
                .get("/api/v1/daemons/embedded/changes?since=0")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let seen: Vec<i64> = body["changes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["data"]["n"].as_i64().unwrap())
                .collect();
            seen == [1, 2, 3]
        }
    })
    .await;
    let _ = stop_tx.send(());
    running.await.unwrap().unwrap();
}

/// A read is never kept, so it costs no flush: mirrored GETs through relay and agent
/// commit nothing on the relay (nor, for the agent, write its state), while a mirrored
/// write is committed before it is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirrored_read_commits_nothing_and_a_write_does() {
    let relay = TestRelay::start().await;
    let daemon = TestDaemon::start().await;
    let key = relay.key("daemon", Some("d"), None).await;
    let client = relay.client(&["d"]).await;
    let agent = TestAgent::start(
        &relay.url,
        "d",
        &key,
        &daemon.target,
        RawAgent {
            events: Some(String::new()),
            ..RawAgent::default()
        },
    );
    client.await_online("d").await;
    // The agent's own start (its connect commits) is over once a first read went through.
    let warm = mirrored(&client, Method::GET, "/text")
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status(), 200);
    let before = relay.metric("syncrelay_store_commits_total").await.unwrap();
    for _ in 0..5 {
        let response = mirrored(&client, Method::GET, "/text")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-syncrelay-source"], "daemon");
    }
    assert_eq!(
        relay.metric("syncrelay_store_commits_total").await.unwrap(),
        before,
        "reads committed"
    );
    let response = mirrored(&client, Method::POST, "/echo/json")
        .json(&json!({ "query": "hi" }))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    assert!(
        relay.metric("syncrelay_store_commits_total").await.unwrap() > before,
        "a write was not committed"
    );
    // The agent kept no read result on disk: its state holds the write's only.
    let state = agent.stop().await;
    let store = syncrelay::store::AgentStore::open(state.path()).unwrap();
    assert_eq!(store.undelivered_results().unwrap().len(), 0);
    assert_eq!(
        store.prune_results(u64::MAX).unwrap(),
        1,
        "only the write's result"
    );
}
