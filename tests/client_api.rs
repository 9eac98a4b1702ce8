//! The client API end to end over real loopback HTTP, checked against DESIGN.md ("Client
//! API", "Waiting, offline daemons, retries", "Errors"): the scoped daemon listing, mirrored
//! calls turned into `http` commands (methods, path, query, bodies, forwarded and dropped
//! headers) and the daemon's answer replayed unchanged, `Prefer: wait` / `respond-async`
//! with `202 Accepted` and `GET /api/v1/commands/{id}`, offline daemons (cached GETs,
//! `daemon_offline`, writes queued and delivered later, `X-Syncrelay-If-Offline: fail`),
//! `Idempotency-Key`, named commands, daemon errors and timeouts, and the relay's own
//! errors. Every response is checked for `X-Syncrelay-Source`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{eventually, serve_daemon, Client, Daemon, Reply, TestRelay};
use reqwest::{Method, RequestBuilder};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A short grace so a daemon that stops polling is offline within a fraction of a second.
const QUICK_OFFLINE: &str = "[sync]\nonline_grace = \"300ms\"\n";

/// Upper bound for any single request in these tests.
const REQUEST_LIMIT: Duration = Duration::from_secs(20);

/// Sends a request (bounded), reads the whole body and checks that the response says where
/// it came from, as every response must.
async fn send(request: RequestBuilder) -> Reply {
    let response = tokio::time::timeout(REQUEST_LIMIT, request.send())
        .await
        .expect("response within the limit")
        .expect("relay reachable");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = tokio::time::timeout(REQUEST_LIMIT, response.bytes())
        .await
        .expect("body within the limit")
        .expect("body")
        .to_vec();
    let source = headers
        .get("x-syncrelay-source")
        .unwrap_or_else(|| panic!("status {status}: no X-Syncrelay-Source header"));
    assert!(
        ["daemon", "cache", "relay"].contains(&source.to_str().unwrap()),
        "X-Syncrelay-Source = {source:?}"
    );
    Reply {
        status,
        headers,
        body,
    }
}

/// Sends the request on its own task, so the test can play the daemon meanwhile.
fn spawn_send(request: RequestBuilder) -> tokio::task::JoinHandle<Reply> {
    tokio::spawn(send(request))
}

async fn join(task: tokio::task::JoinHandle<Reply>) -> Reply {
    tokio::time::timeout(REQUEST_LIMIT, task)
        .await
        .expect("client request finished")
        .expect("client task")
}

/// Asserts a relay-made error: status, the design's error shape, and source `relay`.
fn assert_relay_error(reply: &Reply, status: u16, code: &str) {
    let body = reply.json();
    assert_eq!(reply.status, status, "body: {body}");
    assert_eq!(body["error"]["code"], code, "body: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error without a message: {body}"
    );
    assert_eq!(reply.source(), "relay", "relay-made error {code}");
}

/// `serve_daemon`, keeping every command the daemon received.
fn serve_recording<F>(
    daemon: Daemon,
    answer: F,
) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<Value>>>)
where
    F: Fn(&Value) -> Value + Send + Sync + 'static,
{
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let task = serve_daemon(daemon, move |command| {
        record.lock().unwrap().push(command.clone());
        answer(command)
    });
    (task, seen)
}

/// Answers with the command's params as the JSON body and the method in `x-echo-method`.
fn echo(command: &Value) -> Value {
    json!({
        "status": 200,
        "headers": {
            "content-type": "application/json",
            "x-echo-method": command["params"]["method"],
        },
        "body": command["params"],
    })
}

/// `online` of `GET /api/v1/daemons/{id}`.
async fn is_online(client: &Client, daemon_id: &str) -> bool {
    let reply = send(client.get(&format!("/api/v1/daemons/{daemon_id}"))).await;
    assert_eq!(reply.status, 200);
    reply.json()["online"].as_bool().expect("online is a bool")
}

/// Awaits the daemon being reported offline (it has stopped polling).
async fn await_offline(client: &Client, daemon_id: &str) {
    eventually(Duration::from_secs(10), || async {
        !is_online(client, daemon_id).await
    })
    .await;
}

/// One HTTP/1.1 request written by hand on a fresh TCP connection (`Connection: close` is
/// in `head`), for headers a client library would rewrite. Returns status, headers
/// (lower-case names) and body.
async fn raw_request(
    addr: std::net::SocketAddr,
    head: &str,
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut request = head.replace('\n', "\r\n").into_bytes();
        request.extend_from_slice(body);
        stream.write_all(&request).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        response
    };
    let response = tokio::time::timeout(REQUEST_LIMIT, exchange)
        .await
        .expect("raw exchange within the limit");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of the response head");
    let head = std::str::from_utf8(&response[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    assert!(
        headers.iter().any(|(name, _)| name == "x-syncrelay-source"),
        "status {status}: no X-Syncrelay-Source header"
    );
    (status, headers, response[split + 4..].to_vec())
}

// ---------------------------------------------------------------------------------------
// Listing and scope
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_shows_only_daemons_in_scope_with_their_fields() {
    let relay = TestRelay::start().await;
    let alpha = relay.daemon("alpha").await;
    let _beta = relay.daemon("beta").await;
    let _gamma = relay.daemon("gamma").await;
    let scoped = relay.client(&["alpha", "beta"]).await;
    let everything = relay.client(&["*"]).await;

    // One change-log entry and one queued command for alpha.
    let (status, body) = alpha
        .poll_raw(
            json!([{ "type": "session_created", "data": { "id": "s1" }, "seq": 1 }]),
            false,
            0.0,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let queued = send(
        scoped
            .post("/api/v1/daemons/alpha/sessions")
            .header("prefer", "respond-async")
            .json(&json!({ "query": "hi" })),
    )
    .await;
    assert_eq!(queued.status, 202);

    let listing = send(scoped.get("/api/v1/daemons")).await;
    assert_eq!(listing.status, 200);
    assert_eq!(listing.source(), "relay");
    let body = listing.json();
    let mut ids: Vec<&str> = body["daemons"]
        .as_array()
        .expect("daemons array")
        .iter()
        .map(|d| d["daemon_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["alpha", "beta"], "scoped listing: {body}");
    let entry = body["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["daemon_id"] == "alpha")
        .unwrap()
        .clone();
    assert_eq!(entry["online"], true, "{entry}");
    let last_seen = entry["last_seen"].as_str().expect("last_seen is a time");
    assert!(
        last_seen.contains('T') && last_seen.ends_with('Z'),
        "last_seen {last_seen}"
    );
    assert_eq!(entry["version"], "1.0.0");
    assert_eq!(entry["capabilities"], json!(["sessions"]));
    assert_eq!(entry["queued"], 1, "{entry}");
    assert_eq!(entry["last_seq"], 1, "{entry}");

    // One daemon: the same fields.
    let one = send(scoped.get("/api/v1/daemons/alpha")).await;
    assert_eq!(one.status, 200);
    let one = one.json();
    for field in [
        "daemon_id",
        "online",
        "version",
        "capabilities",
        "queued",
        "last_seq",
    ] {
        assert_eq!(one[field], entry[field], "field {field}");
    }
    assert!(one["last_seen"].is_string());

    // Scope "*" sees every daemon.
    let all = send(everything.get("/api/v1/daemons")).await.json();
    let mut ids: Vec<&str> = all["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["daemon_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["alpha", "beta", "gamma"]);
    assert_eq!(
        send(everything.get("/api/v1/daemons/gamma")).await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_scope_and_unknown_daemons_are_both_not_found() {
    let relay = TestRelay::start().await;
    let _alpha = relay.daemon("alpha").await;
    let gamma = relay.daemon("gamma").await;
    let scoped = relay.client(&["alpha"]).await;
    let everything = relay.client(&["*"]).await;

    let hidden = send(scoped.get("/api/v1/daemons/gamma")).await;
    assert_relay_error(&hidden, 404, "not_found");
    let unknown = send(scoped.get("/api/v1/daemons/nosuch")).await;
    assert_relay_error(&unknown, 404, "not_found");
    // Same shape either way: an out-of-scope id reads exactly like an unknown one.
    let keys = |reply: &Reply| {
        let body = reply.json();
        let mut keys: Vec<String> = body["error"].as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    };
    assert_eq!(keys(&hidden), keys(&unknown));
    assert_relay_error(
        &send(everything.get("/api/v1/daemons/nosuch")).await,
        404,
        "not_found",
    );

    // Mirrored calls and named commands to an out-of-scope daemon: 404, nothing queued.
    let write = send(
        scoped
            .post("/api/v1/daemons/gamma/sessions")
            .header("prefer", "respond-async")
            .json(&json!({})),
    )
    .await;
    assert_relay_error(&write, 404, "not_found");
    let named = send(
        scoped
            .post("/api/v1/daemons/gamma/commands")
            .header("prefer", "respond-async")
            .json(&json!({ "method": "getApproval", "params": {} })),
    )
    .await;
    assert_relay_error(&named, 404, "not_found");
    assert!(gamma.poll(0.0).await.is_empty(), "a command reached gamma");

    // A command of gamma's is not visible to a key scoped to alpha.
    let queued = send(
        everything
            .post("/api/v1/daemons/gamma/sessions")
            .header("prefer", "respond-async")
            .json(&json!({})),
    )
    .await;
    assert_eq!(queued.status, 202);
    let id = queued.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(
        send(everything.get(&format!("/api/v1/commands/{id}")))
            .await
            .status,
        200
    );
    assert_relay_error(
        &send(scoped.get(&format!("/api/v1/commands/{id}"))).await,
        404,
        "not_found",
    );
    assert_relay_error(
        &send(everything.get("/api/v1/commands/cmd-doesnotexist")).await,
        404,
        "not_found",
    );
}

// ---------------------------------------------------------------------------------------
// Mirrored calls
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_becomes_an_http_command() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let (server, seen) = serve_recording(daemon, echo);

    for method in [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::HEAD,
    ] {
        let read = method == Method::GET || method == Method::HEAD;
        let mut request = client.request(
            method.clone(),
            "/api/v1/daemons/d/sessions/s1/items?limit=5&x=a",
        );
        if !read {
            request = request.json(&json!({ "n": 1, "method": method.as_str() }));
        }
        let reply = send(request).await;
        assert_eq!(reply.status, 200, "{method}");
        assert_eq!(reply.source(), "daemon", "{method}");
        assert_eq!(reply.header("x-echo-method"), Some(method.as_str()));

        let command = seen
            .lock()
            .unwrap()
            .pop()
            .expect("the daemon got a command");
        assert_eq!(command["method"], "http");
        let params = &command["params"];
        assert_eq!(params["method"], method.as_str());
        assert_eq!(params["path"], "/api/v1/sessions/s1/items");
        assert_eq!(params["query"], "limit=5&x=a");
        if read {
            assert!(params["body"].is_null(), "{method}: {params}");
        } else {
            assert_eq!(params["body"], json!({ "n": 1, "method": method.as_str() }));
        }
        if method == Method::HEAD {
            assert!(reply.body.is_empty(), "HEAD with a body");
        } else {
            assert_eq!(reply.json(), *params, "{method}: the echoed params");
        }
    }
    server.abort();
}

/// Methods no document can list (`TRACE`, WebDAV's `PROPFIND`) are mirrored like any
/// other; an empty answer to `HEAD` states no length the `GET` would not have; and a path
/// with extra leading slashes routes as it always has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_method_is_mirrored_and_head_states_no_empty_length() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let (server, seen) = serve_recording(daemon, echo);
    for method in [Method::TRACE, Method::from_bytes(b"PROPFIND").unwrap()] {
        let reply = send(client.request(method.clone(), "/api/v1/daemons/d/files/a")).await;
        assert_eq!(reply.status, 200, "{method}");
        assert_eq!(reply.source(), "daemon", "{method}");
        assert_eq!(reply.header("x-echo-method"), Some(method.as_str()));
        let command = seen
            .lock()
            .unwrap()
            .pop()
            .expect("the daemon got a command");
        assert_eq!(command["params"]["method"], method.as_str());
    }
    let reply = send(client.request(Method::HEAD, "/api/v1/daemons/d/sessions")).await;
    assert_eq!(reply.status, 200);
    assert!(reply.body.is_empty());
    assert_eq!(
        reply.header("content-length"),
        None,
        "HEAD: {:?}",
        reply.headers
    );
    server.abort();

    let health = send(reqwest::Client::new().get(format!("{}//healthz", relay.url))).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json(), json!({ "status": "ok" }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_keep_their_kind() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let (server, seen) = serve_recording(daemon, echo);

    // JSON stays JSON.
    let reply = send(
        client
            .post("/api/v1/daemons/d/json")
            .json(&json!({ "nested": { "list": [1, 2, 3] }, "flag": true })),
    )
    .await;
    assert_eq!(reply.status, 200);
    let params = seen.lock().unwrap().pop().unwrap()["params"].clone();
    assert_eq!(
        params["body"],
        json!({ "nested": { "list": [1, 2, 3] }, "flag": true })
    );
    assert!(matches!(
        params.get("body_base64"),
        None | Some(Value::Null)
    ));

    // Text stays a string.
    let reply = send(
        client
            .request(Method::PUT, "/api/v1/daemons/d/text")
            .header("content-type", "text/plain; charset=utf-8")
            .body("hello, wörld\n{not json"),
    )
    .await;
    assert_eq!(reply.status, 200);
    let params = seen.lock().unwrap().pop().unwrap()["params"].clone();
    assert_eq!(params["body"], "hello, wörld\n{not json");
    assert!(matches!(
        params.get("body_base64"),
        None | Some(Value::Null)
    ));

    // Bytes that are not UTF-8 travel as base64.
    let bytes: Vec<u8> = vec![0x00, 0x9f, 0x92, 0x96, 0xff, 0xfe, b'a', 0x80];
    let reply = send(
        client
            .post("/api/v1/daemons/d/blob")
            .header("content-type", "application/octet-stream")
            .body(bytes.clone()),
    )
    .await;
    assert_eq!(reply.status, 200);
    let params = seen.lock().unwrap().pop().unwrap()["params"].clone();
    let encoded = params["body_base64"].as_str().expect("body_base64");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap(),
        bytes
    );
    assert!(params["body"].is_null(), "{params}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_headers_are_forwarded_and_hop_by_hop_and_relay_headers_are_not() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let (server, seen) = serve_recording(daemon, echo);

    let body = br#"{"hello":"world"}"#;
    let head = format!(
        "POST /api/v1/daemons/d/things?x=1 HTTP/1.1\n\
         Host: {addr}\n\
         Authorization: Bearer {key}\n\
         Prefer: wait=10\n\
         Idempotency-Key: hop-test-1\n\
         X-Custom: kept\n\
         Accept-Language: de\n\
         X-Named-Hop: dropped\n\
         Connection: close, X-Named-Hop\n\
         Keep-Alive: timeout=5\n\
         TE: trailers\n\
         Upgrade: example/1\n\
         Content-Type: application/json\n\
         Content-Length: {len}\n\n",
        addr = relay.addr,
        key = client.key,
        len = body.len(),
    );
    let (status, _headers, _body) = raw_request(relay.addr, &head, body).await;
    assert_eq!(status, 200);

    let command = seen
        .lock()
        .unwrap()
        .pop()
        .expect("the daemon got the command");
    let headers = command["params"]["headers"]
        .as_object()
        .expect("headers object")
        .clone();
    let lower: Vec<String> = headers.keys().map(|k| k.to_ascii_lowercase()).collect();
    let value = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(value("x-custom"), Some(json!("kept")), "{headers:?}");
    assert_eq!(value("accept-language"), Some(json!("de")), "{headers:?}");
    for dropped in [
        "connection",
        "keep-alive",
        "te",
        "upgrade",
        "x-named-hop",
        "authorization",
        "prefer",
        "idempotency-key",
    ] {
        assert!(
            !lower.iter().any(|k| k == dropped),
            "{dropped} was forwarded: {headers:?}"
        );
    }
    // The body still arrived as JSON.
    assert_eq!(command["params"]["body"], json!({ "hello": "world" }));
    server.abort();
}

/// A daemon result whose status is no final HTTP status (1xx, past 599) is the daemon's
/// error: 502 in the error shape, and the client's connection goes on (it was answered
/// `101` with no upgrade and then closed, or broke an HTTP/2 connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_status_outside_200_to_599_is_a_502() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let server = serve_daemon(daemon, move |command| {
        let path = command["params"]["path"].as_str().unwrap();
        let status: u16 = path.trim_start_matches("/api/v1/s").parse().unwrap_or(200);
        json!({ "status": status, "headers": { "upgrade": "h2c" }, "body": "x" })
    });
    for status in [100, 101, 103, 199, 600, 999] {
        let reply = send(
            client
                .post(&format!("/api/v1/daemons/d/s{status}"))
                .json(&json!({})),
        )
        .await;
        assert_eq!(reply.status, 502, "status {status}");
        assert_eq!(
            reply.json()["error"]["code"],
            "bad_gateway",
            "status {status}"
        );
        let get = send(client.get(&format!("/api/v1/daemons/d/s{status}"))).await;
        assert_eq!(get.status, 502, "GET with status {status}");
    }
    // The same client (and connection pool) still gets real answers.
    let ok = send(client.get("/api/v1/daemons/d/s200")).await;
    assert_eq!((ok.status, ok.text().as_str()), (200, "x"));
    let over_h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for _ in 0..2 {
        let reply = over_h2
            .get(format!("{}/api/v1/daemons/d/s101", relay.url))
            .bearer_auth(&client.key)
            .send()
            .await
            .expect("the HTTP/2 connection survives a daemon's 101");
        assert_eq!(reply.status(), 502);
    }
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_status_headers_and_body_come_back_unchanged() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let blob: Vec<u8> = vec![0xde, 0xad, 0xbe, 0xef, 0x00, 0xff, 0x10];
    let blob_b64 = base64::engine::general_purpose::STANDARD.encode(&blob);
    let server = serve_daemon(daemon, move |command| {
        match command["params"]["path"].as_str().unwrap() {
            "/api/v1/created" => json!({
                "status": 201,
                "headers": { "x-daemon": "yes", "content-type": "text/plain" },
                "body": "made it",
            }),
            "/api/v1/blob" => json!({
                "status": 200,
                "headers": { "content-type": "application/octet-stream" },
                "body_base64": blob_b64,
            }),
            _ => json!({
                "status": 404,
                "headers": { "content-type": "application/json" },
                "body": { "error": { "code": "not_found", "message": "no such session" } },
            }),
        }
    });

    let created = send(client.post("/api/v1/daemons/d/created").json(&json!({}))).await;
    assert_eq!(created.status, 201);
    assert_eq!(created.header("x-daemon"), Some("yes"));
    assert_eq!(created.header("content-type"), Some("text/plain"));
    assert_eq!(created.text(), "made it");
    assert_eq!(created.source(), "daemon");

    let binary = send(client.get("/api/v1/daemons/d/blob")).await;
    assert_eq!(binary.status, 200);
    assert_eq!(
        binary.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(binary.body, blob);
    assert_eq!(binary.source(), "daemon");

    let missing = send(client.get("/api/v1/daemons/d/sessions/nope")).await;
    assert_eq!(missing.status, 404);
    assert_eq!(
        missing.source(),
        "daemon",
        "the daemon's 404 is the daemon's"
    );
    assert_eq!(
        missing.json(),
        json!({ "error": { "code": "not_found", "message": "no such session" } })
    );
    server.abort();
}

// ---------------------------------------------------------------------------------------
// Waiting: Prefer, 202 Accepted, GET /api/v1/commands/{id}
// ---------------------------------------------------------------------------------------

/// Checks a `202 Accepted` for a queued command and returns its id.
fn assert_accepted(reply: &Reply) -> String {
    let body = reply.json();
    assert_eq!(reply.status, 202, "{body}");
    assert_eq!(reply.source(), "relay");
    let id = body["id"].as_str().expect("id").to_owned();
    assert_eq!(
        reply.header("location"),
        Some(format!("/api/v1/commands/{id}").as_str())
    );
    let state = body["state"].as_str().expect("state");
    assert!(["queued", "delivered"].contains(&state), "state {state}");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn respond_async_is_accepted_at_once_and_followed_to_completion() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;

    let started = Instant::now();
    let reply = send(
        client
            .post("/api/v1/daemons/d/sessions")
            .header("prefer", "respond-async")
            .json(&json!({ "query": "build it" })),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "respond-async waited"
    );
    let id = assert_accepted(&reply);
    let body = reply.json();
    assert_eq!(body["state"], "queued");
    assert_eq!(body["daemon_id"], "d");
    assert_eq!(body["method"], "http");

    let view = send(client.get(&format!("/api/v1/commands/{id}"))).await;
    assert_eq!(view.status, 200);
    assert_eq!(view.source(), "relay");
    let view = view.json();
    assert_eq!(view["state"], "queued");
    assert_eq!(view["id"], id.as_str());
    assert!(view["created_at"].is_string(), "{view}");
    assert!(matches!(view.get("result"), None | Some(Value::Null)));

    let commands = daemon.next_commands().await;
    assert_eq!(commands.len(), 1);
    assert_eq!(commands[0]["id"], id.as_str());
    assert_eq!(
        commands[0]["params"]["body"],
        json!({ "query": "build it" })
    );
    let view = send(client.get(&format!("/api/v1/commands/{id}")))
        .await
        .json();
    assert_eq!(view["state"], "delivered");

    let waiting = spawn_send(client.get(&format!("/api/v1/commands/{id}?wait=5")));
    daemon.answer(&id, 201, json!({ "id": "s-1" })).await;
    let done = join(waiting).await;
    assert_eq!(done.status, 200);
    let done = done.json();
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["result"]["status"], 201);
    assert_eq!(done["result"]["body"], json!({ "id": "s-1" }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_not_answered_within_prefer_wait_is_accepted() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;

    // The daemon takes the command but does not answer in time.
    let write = spawn_send(
        client
            .request(Method::PATCH, "/api/v1/daemons/d/sessions/s1")
            .header("prefer", "wait=1")
            .json(&json!({ "archived": true })),
    );
    let commands = daemon.next_commands().await;
    assert_eq!(commands.len(), 1);
    let started = Instant::now();
    let reply = join(write).await;
    let id = assert_accepted(&reply);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(commands[0]["id"], id.as_str());
    assert_eq!(reply.json()["state"], "delivered");

    // Answered later: the command's state has the result.
    daemon.answer(&id, 200, json!({ "archived": true })).await;
    let view = send(client.get(&format!("/api/v1/commands/{id}?wait=5")))
        .await
        .json();
    assert_eq!(view["state"], "completed");
    assert_eq!(view["result"]["body"], json!({ "archived": true }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_wait_bounds_the_wait_for_a_write() {
    let relay = TestRelay::start().await;
    let _daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;

    let started = Instant::now();
    let reply = send(
        client
            .post("/api/v1/daemons/d/sessions")
            .header("prefer", "wait=1")
            .json(&json!({})),
    )
    .await;
    let elapsed = started.elapsed();
    assert_accepted(&reply);
    assert!(
        elapsed >= Duration::from_millis(900),
        "answered after {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "answered after {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_get_times_out_with_504() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;

    let started = Instant::now();
    let read = spawn_send(
        client
            .get("/api/v1/daemons/d/sessions?slow=1")
            .header("prefer", "wait=1"),
    );
    // The daemon is online and takes the command, but never answers.
    let commands = daemon.next_commands().await;
    assert_eq!(commands[0]["params"]["method"], "GET");
    let reply = join(read).await;
    assert_relay_error(&reply, 504, "timeout");
    assert!(started.elapsed() >= Duration::from_millis(900));
}

// ---------------------------------------------------------------------------------------
// Offline daemons
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_reads_are_served_from_the_last_2xx_copy_or_503() {
    let relay = TestRelay::start_with(QUICK_OFFLINE).await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;

    // While online: one 2xx and one 404 GET, both answered by the daemon.
    let read = spawn_send(client.get("/api/v1/daemons/d/sessions?leafOnly=true"));
    let commands = daemon.next_commands().await;
    daemon
        .results(json!([{
            "command_id": commands[0]["id"],
            "result": {
                "status": 200,
                "headers": { "content-type": "application/json", "x-daemon": "yes" },
                "body": { "sessions": [{ "id": "s1" }] },
            },
        }]))
        .await;
    let fresh = join(read).await;
    assert_eq!(fresh.status, 200);
    assert_eq!(fresh.source(), "daemon");

    let read = spawn_send(client.get("/api/v1/daemons/d/sessions/gone"));
    let commands = daemon.next_commands().await;
    daemon
        .answer(
            commands[0]["id"].as_str().unwrap(),
            404,
            json!({ "error": { "code": "not_found", "message": "gone" } }),
        )
        .await;
    assert_eq!(join(read).await.status, 404);

    // The daemon stops polling.
    await_offline(&client, "d").await;

    let cached = send(client.get("/api/v1/daemons/d/sessions?leafOnly=true")).await;
    assert_eq!(cached.status, 200);
    assert_eq!(cached.source(), "cache");
    assert_eq!(cached.header("x-daemon"), Some("yes"));
    assert_eq!(cached.json(), json!({ "sessions": [{ "id": "s1" }] }));
    let age: u64 = cached
        .header("age")
        .expect("Age header")
        .parse()
        .expect("Age in seconds");
    assert!(age < 60, "age {age}");
    // Age counts up from when the copy was stored.
    eventually(Duration::from_secs(5), || async {
        let again = send(client.get("/api/v1/daemons/d/sessions?leafOnly=true")).await;
        assert_eq!(again.source(), "cache");
        again.header("age").and_then(|a| a.parse::<u64>().ok()) >= Some(1)
    })
    .await;

    // Another query, or a path whose answer was not 2xx: no copy, 503 daemon_offline.
    for path in [
        "/api/v1/daemons/d/sessions?leafOnly=false",
        "/api/v1/daemons/d/sessions",
        "/api/v1/daemons/d/sessions/gone",
    ] {
        let started = Instant::now();
        let reply = send(client.get(path)).await;
        assert_relay_error(&reply, 503, "daemon_offline");
        assert!(
            reply.header("retry-after").is_some(),
            "{path}: no Retry-After"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{path}: waited for an offline daemon"
        );
    }
    // Reads are never queued for an offline daemon.
    assert!(
        daemon.poll(0.0).await.is_empty(),
        "a read was queued while offline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_writes_are_queued_and_delivered_when_the_daemon_returns() {
    let relay = TestRelay::start_with(QUICK_OFFLINE).await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    await_offline(&client, "d").await;

    let write = send(
        client
            .post("/api/v1/daemons/d/sessions")
            .header("prefer", "wait=1")
            .json(&json!({ "query": "while you were out" })),
    )
    .await;
    let write_id = assert_accepted(&write);
    let named = send(
        client
            .post("/api/v1/daemons/d/commands")
            .header("prefer", "respond-async")
            .json(&json!({ "method": "approve", "params": { "approval_id": "a1" } })),
    )
    .await;
    let named_id = assert_accepted(&named);
    let view = send(client.get(&format!("/api/v1/commands/{write_id}")))
        .await
        .json();
    assert_eq!(view["state"], "queued");

    // The daemon polls again: both, in order.
    let commands = daemon.next_commands().await;
    let ids: Vec<&str> = commands.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [write_id.as_str(), named_id.as_str()]);
    assert_eq!(commands[0]["params"]["method"], "POST");
    assert_eq!(commands[0]["params"]["path"], "/api/v1/sessions");
    assert_eq!(
        commands[0]["params"]["body"],
        json!({ "query": "while you were out" })
    );
    assert_eq!(commands[1]["method"], "approve");
    assert_eq!(commands[1]["params"], json!({ "approval_id": "a1" }));

    daemon.answer(&write_id, 201, json!({ "id": "s9" })).await;
    daemon
        .results(json!([{ "command_id": named_id, "result": { "approved": true } }]))
        .await;
    let view = send(client.get(&format!("/api/v1/commands/{write_id}?wait=5")))
        .await
        .json();
    assert_eq!(view["state"], "completed");
    assert_eq!(view["result"]["status"], 201);
    assert_eq!(view["result"]["body"], json!({ "id": "s9" }));
    let view = send(client.get(&format!("/api/v1/commands/{named_id}?wait=5")))
        .await
        .json();
    assert_eq!(view["state"], "completed");
    assert_eq!(view["result"], json!({ "approved": true }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_offline_fail_is_an_immediate_503_and_queues_nothing() {
    let relay = TestRelay::start_with(QUICK_OFFLINE).await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    await_offline(&client, "d").await;

    let started = Instant::now();
    let reply = send(
        client
            .post("/api/v1/daemons/d/sessions")
            .header("x-syncrelay-if-offline", "fail")
            .json(&json!({ "query": "now or never" })),
    )
    .await;
    assert_relay_error(&reply, 503, "daemon_offline");
    assert!(started.elapsed() < Duration::from_secs(5));
    let named = send(
        client
            .post("/api/v1/daemons/d/commands")
            .header("x-syncrelay-if-offline", "fail")
            .json(&json!({ "method": "approve", "params": {} })),
    )
    .await;
    assert_relay_error(&named, 503, "daemon_offline");
    assert!(
        daemon.poll(0.0).await.is_empty(),
        "a failed write was queued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_write_expires_after_command_ttl() {
    let relay = TestRelay::start_with(
        "[sync]\nonline_grace = \"300ms\"\n[commands]\ncommand_ttl = \"1s\"\n",
    )
    .await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    await_offline(&client, "d").await;

    let reply = send(
        client
            .post("/api/v1/daemons/d/sessions")
            .header("prefer", "respond-async")
            .json(&json!({})),
    )
    .await;
    let id = assert_accepted(&reply);
    // Nobody took it within command_ttl (1 s): within a few seconds the command reads as
    // expired, without a daemon poll having to notice first.
    let last = Arc::new(Mutex::new(Value::Null));
    let expired = tokio::time::timeout(
        Duration::from_secs(5),
        eventually(Duration::from_secs(6), || async {
            let view = send(client.get(&format!("/api/v1/commands/{id}")))
                .await
                .json();
            *last.lock().unwrap() = view.clone();
            view["state"] == "expired"
        }),
    )
    .await;
    assert!(
        expired.is_ok(),
        "5 s after a 1 s command_ttl the command still reads {}",
        last.lock().unwrap()
    );
    // And it is never handed out.
    assert!(
        daemon.poll(0.0).await.is_empty(),
        "an expired command was delivered"
    );
}

// ---------------------------------------------------------------------------------------
// Idempotency-Key, named commands, daemon errors
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_returns_the_same_command_and_result() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let other_client = relay.client(&["d"]).await;
    let write = |client: &Client, prefer: &str| {
        client
            .post("/api/v1/daemons/d/sessions")
            .header("idempotency-key", "create-session-42")
            .header("prefer", prefer.to_owned())
            .json(&json!({ "query": "once" }))
    };

    let first = assert_accepted(&send(write(&client, "respond-async")).await);
    let second = assert_accepted(&send(write(&client, "respond-async")).await);
    assert_eq!(first, second, "a retry made a second command");

    let commands = daemon.next_commands().await;
    assert_eq!(commands.len(), 1, "{commands:?}");
    assert_eq!(commands[0]["id"], first.as_str());
    assert!(
        daemon.poll(0.0).await.is_empty(),
        "a second command was delivered"
    );
    daemon.answer(&first, 201, json!({ "id": "s42" })).await;

    // A retry after completion: the same result, still one command.
    let retry = send(write(&client, "wait=5")).await;
    assert_eq!(retry.status, 201);
    assert_eq!(retry.source(), "daemon");
    assert_eq!(retry.json(), json!({ "id": "s42" }));
    let view = send(client.get(&format!("/api/v1/commands/{first}")))
        .await
        .json();
    assert_eq!(view["state"], "completed");
    assert_eq!(view["result"]["body"], json!({ "id": "s42" }));
    assert!(daemon.poll(0.0).await.is_empty(), "the retry was delivered");

    // The key belongs to the client that sent it: another client gets its own command.
    let theirs = assert_accepted(&send(write(&other_client, "respond-async")).await);
    assert_ne!(theirs, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_commands_reach_the_daemon_and_return_its_result() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let (server, seen) = serve_recording(daemon, |command| {
        json!({
            "approval": { "id": command["params"]["approval_id"], "status": "pending" },
            "method_was": command["method"],
        })
    });

    let reply = send(client.post("/api/v1/daemons/d/commands").json(
        &json!({ "method": "getApproval", "params": { "approval_id": "ap-7", "verbose": true } }),
    ))
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.source(), "daemon");
    assert_eq!(
        reply.json(),
        json!({ "approval": { "id": "ap-7", "status": "pending" }, "method_was": "getApproval" })
    );
    let command = seen.lock().unwrap().pop().unwrap();
    assert_eq!(command["method"], "getApproval");
    assert_eq!(
        command["params"],
        json!({ "approval_id": "ap-7", "verbose": true })
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_errors_become_502_or_504_in_the_error_shape() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;

    // A mirrored call the daemon could not forward.
    let call = spawn_send(client.post("/api/v1/daemons/d/sessions").json(&json!({})));
    let commands = daemon.next_commands().await;
    daemon
        .results(json!([{
            "command_id": commands[0]["id"],
            "error": { "code": "target_unreachable", "message": "connection refused by 127.0.0.1:7777" },
        }]))
        .await;
    let reply = join(call).await;
    assert_eq!(reply.status, 502);
    let body = reply.json();
    assert_eq!(body["error"]["code"], "target_unreachable", "{body}");
    assert_eq!(
        body["error"]["message"],
        "connection refused by 127.0.0.1:7777"
    );

    // A named command that timed out on the daemon side.
    let call = spawn_send(
        client
            .post("/api/v1/daemons/d/commands")
            .json(&json!({ "method": "getApproval", "params": { "approval_id": "a" } })),
    );
    let commands = daemon.next_commands().await;
    daemon
        .results(json!([{
            "command_id": commands[0]["id"],
            "error": { "code": "timeout", "message": "the daemon took too long" },
        }]))
        .await;
    let reply = join(call).await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.json()["error"]["code"], "timeout");

    // Followed asynchronously: state failed, with the error.
    let id = assert_accepted(
        &send(
            client
                .request(Method::DELETE, "/api/v1/daemons/d/sessions/s1")
                .header("prefer", "respond-async"),
        )
        .await,
    );
    let commands = daemon.next_commands().await;
    assert_eq!(commands[0]["id"], id.as_str());
    daemon
        .results(json!([{
            "command_id": id,
            "error": { "code": "target_unreachable", "message": "down" },
        }]))
        .await;
    let view = send(client.get(&format!("/api/v1/commands/{id}?wait=5")))
        .await
        .json();
    assert_eq!(view["state"], "failed", "{view}");
    assert_eq!(view["error"]["code"], "target_unreachable");
}

// ---------------------------------------------------------------------------------------
// Authentication and relay-made errors
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_invalid_tokens_are_401() {
    let relay = TestRelay::start().await;
    let _daemon = relay.daemon("d").await;
    let http = reqwest::Client::new();
    for path in [
        "/api/v1/daemons",
        "/api/v1/daemons/d",
        "/api/v1/daemons/d/sessions",
        "/api/v1/commands/cmd-x",
    ] {
        let url = format!("{}{path}", relay.url);
        assert_relay_error(&send(http.get(&url)).await, 401, "unauthorized");
        assert_relay_error(
            &send(http.get(&url).bearer_auth("srk_0011223344556677_nope")).await,
            401,
            "unauthorized",
        );
        assert_relay_error(
            &send(http.get(&url).bearer_auth("junk")).await,
            401,
            "unauthorized",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_and_admin_keys_are_forbidden_on_the_client_api() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let http = reqwest::Client::new();
    for token in [daemon.key.as_str(), relay.admin_token.as_str()] {
        for path in [
            "/api/v1/daemons",
            "/api/v1/daemons/d",
            "/api/v1/daemons/d/sessions",
            "/api/v1/commands/cmd-x",
        ] {
            let url = format!("{}{path}", relay.url);
            assert_relay_error(
                &send(http.get(&url).bearer_auth(token)).await,
                403,
                "forbidden",
            );
        }
        let named = http
            .post(format!("{}/api/v1/daemons/d/commands", relay.url))
            .bearer_auth(token)
            .json(&json!({ "method": "x", "params": {} }));
        assert_relay_error(&send(named).await, 403, "forbidden");
    }
    assert!(daemon.poll(0.0).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_wrong_methods_and_bad_ids() {
    let relay = TestRelay::start().await;
    let _daemon = relay.daemon("d").await;
    let client = relay.client(&["*"]).await;

    for path in [
        "/api/v1/nope",
        "/api/v2/daemons",
        "/api/v1",
        "/nothing/here",
    ] {
        assert_relay_error(&send(client.get(path)).await, 404, "not_found");
    }
    for (method, path) in [
        (Method::DELETE, "/api/v1/daemons"),
        (Method::POST, "/api/v1/daemons"),
        (Method::DELETE, "/api/v1/daemons/d"),
        (Method::GET, "/api/v1/daemons/d/commands"),
        (Method::POST, "/api/v1/commands/cmd-x"),
    ] {
        let reply = send(client.request(method.clone(), path)).await;
        let body = reply.json();
        assert_eq!(reply.status, 405, "{method} {path}: {body}");
        assert!(body["error"]["code"].is_string(), "{body}");
        assert!(body["error"]["message"].is_string(), "{body}");
        assert_eq!(reply.source(), "relay");
        assert!(reply.header("allow").is_some(), "{method} {path}: no Allow");
    }
    let long = "a".repeat(65);
    for id in ["a%20b", long.as_str(), "a%2Fb", "a:b"] {
        for path in [
            format!("/api/v1/daemons/{id}"),
            format!("/api/v1/daemons/{id}/sessions"),
        ] {
            let reply = send(client.get(&path)).await;
            assert_relay_error(&reply, 400, "bad_request");
        }
    }
    // 64 characters is a valid (here unknown) id.
    let longest = "a".repeat(64);
    assert_relay_error(
        &send(client.get(&format!("/api/v1/daemons/{longest}"))).await,
        404,
        "not_found",
    );
    // Bad wait values and bad named-command bodies are bad requests too.
    assert_relay_error(
        &send(client.get("/api/v1/commands/cmd-x?wait=soon")).await,
        400,
        "bad_request",
    );
    assert_relay_error(
        &send(client.post("/api/v1/daemons/d/commands").body("not json")).await,
        400,
        "bad_request",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_max_body_bytes_are_413() {
    let relay = TestRelay::start_with("[limits]\nmax_body_bytes = 1024\n").await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;

    let big = vec![b'x'; 2048];
    let reply = send(
        client
            .post("/api/v1/daemons/d/upload")
            .header("content-type", "text/plain")
            .body(big.clone()),
    )
    .await;
    assert_relay_error(&reply, 413, "payload_too_large");
    let named = format!(
        r#"{{"method":"x","params":{{"pad":"{}"}}}}"#,
        "y".repeat(2048)
    );
    let reply = send(
        client
            .post("/api/v1/daemons/d/commands")
            .header("content-type", "application/json")
            .body(named),
    )
    .await;
    assert_relay_error(&reply, 413, "payload_too_large");

    // Without a Content-Length (chunked) the limit holds as well.
    let chunked = format!(
        "POST /api/v1/daemons/d/upload HTTP/1.1\nHost: {addr}\nAuthorization: Bearer {key}\n\
         Content-Type: text/plain\nTransfer-Encoding: chunked\nConnection: close\n\n",
        addr = relay.addr,
        key = client.key,
    );
    let mut body = format!("{:x}\r\n", big.len()).into_bytes();
    body.extend_from_slice(&big);
    body.extend_from_slice(b"\r\n0\r\n\r\n");
    let (status, headers, response_body) = raw_request(relay.addr, &chunked, &body).await;
    assert_eq!(status, 413);
    assert!(headers.contains(&("x-syncrelay-source".into(), "relay".into())));
    let error: Value = serde_json::from_slice(&response_body).expect("JSON error");
    assert_eq!(error["error"]["code"], "payload_too_large");

    // Nothing reached the daemon; a body at the limit still goes through.
    assert!(daemon.poll(0.0).await.is_empty());
    let fits = send(
        client
            .post("/api/v1/daemons/d/upload")
            .header("prefer", "respond-async")
            .header("content-type", "text/plain")
            .body(vec![b'x'; 1024]),
    )
    .await;
    assert_accepted(&fits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_cannot_claim_another_source() {
    // The relay sets X-Syncrelay-Source itself; a daemon's own header cannot override it.
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let server = serve_daemon(
        daemon,
        |_| json!({ "status": 200, "headers": { "x-syncrelay-source": "cache" }, "body": "hi" }),
    );
    let reply = send(client.get("/api/v1/daemons/d/x")).await;
    assert_eq!(reply.status, 200);
    let sources: Vec<_> = reply.headers.get_all("x-syncrelay-source").iter().collect();
    assert_eq!(sources, ["daemon"]);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_are_refused_before_reaching_the_daemon() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    for path in [
        "/api/v1/daemons/d/../../admin/keys",
        "/api/v1/daemons/d/sessions/%2e%2e/x",
        "/api/v1/daemons/d/./sessions",
        "/api/v1/daemons/d/sessions/%2E",
    ] {
        // A raw request: reqwest would normalise the dots away before sending.
        let head = format!(
            "GET {path} HTTP/1.1\nHost: relay\nAuthorization: Bearer {}\nConnection: close\n\n",
            client.key
        );
        let (status, _, body) = raw_request(relay.addr, &head, b"").await;
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "{path}"
        );
    }
    assert!(daemon.poll(0.0).await.is_empty(), "nothing was queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn respond_async_does_not_apply_to_reads() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let server = serve_daemon(daemon, |_| json!({ "status": 200, "body": "fresh" }));
    let reply = send(
        client
            .get("/api/v1/daemons/d/sessions")
            .header("prefer", "respond-async"),
    )
    .await;
    assert_eq!(
        reply.status, 200,
        "a read is answered by waiting, never queued for later"
    );
    assert_eq!(reply.text(), "fresh");
    assert_eq!(reply.source(), "daemon");
    server.abort();
}
