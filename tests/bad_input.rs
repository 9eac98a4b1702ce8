//! Malformed and hostile requests, one table: each row is sent as raw bytes over a real
//! loopback connection (so nothing in a client library tidies it up first) and must get
//! exactly its status and error code from `DESIGN.md` ("Errors"). Rows cover wrong JSON
//! types, numbers out of range, deep nesting, invalid UTF-8, path traversal in ids and
//! paths, header injection both ways through a mirrored call, absurd timeouts and waits,
//! negative and huge chunk indexes, oversized bodies, and the wrong key for a route.
//! After the table the relay must still be serving, with the daemon's state untouched.

mod common;

use std::time::Duration;

use common::{serve_daemon, TestRelay};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on any single exchange.
const LIMIT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy)]
enum Key {
    Daemon,
    Client,
    None,
}

/// One malformed or hostile request and the answer it must get. `code: None` means the
/// request never reaches the relay's handlers: hyper refuses bytes that are not HTTP/1.1
/// with a bare 400 before any route runs.
struct Row {
    name: &'static str,
    key: Key,
    method: &'static str,
    target: Vec<u8>,
    headers: Vec<Vec<u8>>,
    body: Vec<u8>,
    status: u16,
    code: Option<&'static str>,
}

fn row(name: &'static str, key: Key, method: &'static str, target: impl Into<Vec<u8>>) -> Row {
    Row {
        name,
        key,
        method,
        target: target.into(),
        headers: Vec::new(),
        body: Vec::new(),
        status: 0,
        code: None,
    }
}

impl Row {
    fn body(mut self, body: impl Into<Vec<u8>>) -> Row {
        self.body = body.into();
        self
    }

    fn header(mut self, line: impl Into<Vec<u8>>) -> Row {
        self.headers.push(line.into());
        self
    }

    fn expect(mut self, status: u16, code: &'static str) -> Row {
        self.status = status;
        self.code = Some(code);
        self
    }

    /// Refused by the HTTP parser, before the relay's code.
    fn unparsable(mut self) -> Row {
        self.status = 400;
        self.code = None;
        self
    }

    fn ok(mut self, status: u16) -> Row {
        self.status = status;
        self.code = None;
        self
    }
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn poll_with_update(update: &str) -> String {
    format!(r#"{{"daemon_id":"d1","updates":[{update}]}}"#)
}

fn result_entry(entry: &str) -> String {
    format!(r#"{{"daemon_id":"d1","results":[{entry}]}}"#)
}

fn rows() -> Vec<Row> {
    use Key::*;
    let deep_update = poll_with_update(&format!(r#"{{"type":"a","data":{}}}"#, nested(200)));
    let deepest_update = poll_with_update(&format!(r#"{{"type":"a","data":{}}}"#, nested(90)));
    let huge_nesting = poll_with_update(&format!(r#"{{"type":"a","data":{}}}"#, nested(100_000)));
    let too_many = format!(
        r#"{{"daemon_id":"d1","updates":[{}]}}"#,
        vec![r#"{"type":"a","data":1}"#; 1001].join(",")
    );
    vec![
        // Wrong types and shapes in the sync protocol.
        row("poll body is not JSON", Daemon, "POST", "/sync/poll")
            .body("not json")
            .expect(400, "bad_request"),
        row("poll empty body", Daemon, "POST", "/sync/poll").expect(400, "bad_request"),
        row("poll daemon_id is a number", Daemon, "POST", "/sync/poll")
            .body(r#"{"daemon_id":5}"#)
            .expect(400, "bad_request"),
        row("poll updates is a string", Daemon, "POST", "/sync/poll")
            .body(r#"{"daemon_id":"d1","updates":"x"}"#)
            .expect(400, "bad_request"),
        row("poll body is an array", Daemon, "POST", "/sync/poll")
            .body(r#"[{"daemon_id":"d1"}]"#)
            .expect(400, "bad_request"),
        row("update type empty", Daemon, "POST", "/sync/poll")
            .body(poll_with_update(r#"{"type":"","data":{}}"#))
            .expect(400, "bad_request"),
        row("update type 100 kB", Daemon, "POST", "/sync/poll")
            .body(poll_with_update(&format!(
                r#"{{"type":"{}","data":{{}}}}"#,
                "a".repeat(100_000)
            )))
            .expect(400, "bad_request"),
        row("update timestamp not RFC 3339", Daemon, "POST", "/sync/poll")
            .body(poll_with_update(
                r#"{"type":"a","data":{},"timestamp":"yesterday"}"#,
            ))
            .expect(400, "bad_request"),
        row("more updates than a poll may carry", Daemon, "POST", "/sync/poll")
            .body(too_many)
            .expect(413, "payload_too_large"),
        // Numbers out of range.
        row("update seq 2^64", Daemon, "POST", "/sync/poll")
            .body(poll_with_update(
                r#"{"type":"a","data":{},"seq":18446744073709551616}"#,
            ))
            .expect(400, "bad_request"),
        row("update seq negative", Daemon, "POST", "/sync/poll")
            .body(poll_with_update(r#"{"type":"a","data":{},"seq":-1}"#))
            .expect(400, "bad_request"),
        row("update seq fractional", Daemon, "POST", "/sync/poll")
            .body(poll_with_update(r#"{"type":"a","data":{},"seq":1.5}"#))
            .expect(400, "bad_request"),
        row("update data 1e999", Daemon, "POST", "/sync/poll")
            .body(poll_with_update(r#"{"type":"a","data":{"n":1e999}}"#))
            .expect(400, "bad_request"),
        row("named params -1E+400", Client, "POST", "/api/v1/daemons/d1/commands")
            .body(r#"{"method":"getX","params":[-1E+400]}"#)
            .expect(400, "bad_request"),
        row("named params with a lone surrogate escape", Client, "POST", "/api/v1/daemons/d1/commands")
            .body(r#"{"method":"getX","params":{"a":"\ud800"}}"#)
            .expect(400, "bad_request"),
        row("update data with a lone low surrogate", Daemon, "POST", "/sync/poll")
            .body(poll_with_update(r#"{"type":"a","data":"\udc00x"}"#))
            .expect(400, "bad_request"),
        row("poll timeout 1e999 overflows", Daemon, "POST", "/sync/poll")
            .body(r#"{"daemon_id":"d1","timeout":1e999}"#)
            .expect(400, "bad_request"),
        // Absurd timeouts: negative is refused, huge is clamped to poll_timeout_max.
        row("poll timeout negative", Daemon, "POST", "/sync/poll")
            .body(r#"{"daemon_id":"d1","wait_for_commands":true,"timeout":-1}"#)
            .expect(400, "bad_request"),
        row("poll timeout as a string", Daemon, "POST", "/sync/poll")
            .body(r#"{"daemon_id":"d1","wait_for_commands":true,"timeout":"30"}"#)
            .expect(400, "bad_request"),
        row("poll timeout 1e308 is clamped", Daemon, "POST", "/sync/poll")
            .body(r#"{"daemon_id":"d1","wait_for_commands":false,"timeout":1e308}"#)
            .ok(200),
        // Deep nesting: refused past MAX_JSON_DEPTH, however deep, without recursion.
        row("update data nested 200 deep", Daemon, "POST", "/sync/poll")
            .body(deep_update)
            .expect(400, "bad_request"),
        row("update data nested 100,000 deep", Daemon, "POST", "/sync/poll")
            .body(huge_nesting)
            .expect(400, "bad_request"),
        row("update data nested 90 deep is fine", Daemon, "POST", "/sync/poll")
            .body(deepest_update)
            .ok(200),
        row("named params nested 200 deep", Client, "POST", "/api/v1/daemons/d1/commands")
            .body(format!(r#"{{"method":"getX","params":{}}}"#, nested(200)))
            .expect(400, "bad_request"),
        // Invalid UTF-8.
        row("invalid UTF-8 in a JSON string", Daemon, "POST", "/sync/poll")
            .body(b"{\"daemon_id\":\"d1\",\"updates\":[{\"type\":\"\xff\xfe\",\"data\":{}}]}".to_vec())
            .expect(400, "bad_request"),
        row("lone surrogate escape", Daemon, "POST", "/sync/poll")
            .body(poll_with_update(r#"{"type":"\ud800","data":{}}"#))
            .expect(400, "bad_request"),
        row("invalid UTF-8 raw in the path", Client, "GET", b"/api/v1/daemons/d\xff1".to_vec())
            .unparsable(),
        row("invalid UTF-8 percent-encoded in a daemon id", Client, "GET", "/api/v1/daemons/d%ff1")
            .expect(400, "bad_request"),
        row("invalid UTF-8 in a named command body", Client, "POST", "/api/v1/daemons/d1/commands")
            .body(b"{\"method\":\"get\xc3\x28\"}".to_vec())
            .expect(400, "bad_request"),
        // Results and stream chunks.
        row("chunk index negative", Daemon, "POST", "/sync/results")
            .body(result_entry(
                r#"{"command_id":"cmd-x","chunk":-1,"data":"x","complete":false}"#,
            ))
            .expect(400, "bad_request"),
        row("chunk index 2^64", Daemon, "POST", "/sync/results")
            .body(result_entry(
                r#"{"command_id":"cmd-x","chunk":18446744073709551616,"data":"x","complete":false}"#,
            ))
            .expect(400, "bad_request"),
        row("chunk index a string", Daemon, "POST", "/sync/results")
            .body(result_entry(
                r#"{"command_id":"cmd-x","chunk":"0","data":"x","complete":false}"#,
            ))
            .expect(400, "bad_request"),
        row("chunk data_base64 not base64", Daemon, "POST", "/sync/results")
            .body(result_entry(
                r#"{"command_id":"cmd-x","chunk":0,"data_base64":"!!!","complete":false}"#,
            ))
            .expect(400, "bad_request"),
        row("results missing", Daemon, "POST", "/sync/results")
            .body(r#"{"daemon_id":"d1"}"#)
            .expect(400, "bad_request"),
        row("result for an unknown command", Daemon, "POST", "/sync/results")
            .body(result_entry(r#"{"command_id":"cmd-x","result":{},"error":null}"#))
            .ok(200),
        row("result command id with path traversal", Daemon, "POST", "/sync/results")
            .body(result_entry(
                r#"{"command_id":"../../etc/passwd","result":{},"error":null}"#,
            ))
            .ok(200),
        // Path traversal in ids and paths.
        row("daemon id ..%2F..%2Fadmin", Client, "GET", "/api/v1/daemons/..%2F..%2Fadmin/sessions")
            .expect(400, "bad_request"),
        row("daemon id ..", Client, "GET", "/api/v1/daemons/../admin/keys")
            .expect(400, "bad_request"),
        row("mirrored path with .. segments", Client, "GET", "/api/v1/daemons/d1/../../admin/keys")
            .expect(400, "bad_request"),
        row("mirrored path with %2e%2e segments", Client, "GET", "/api/v1/daemons/d1/%2e%2e/%2e%2e/admin")
            .expect(400, "bad_request"),
        // Issue 18, finding 2: URL parsers take a backslash for a slash.
        row("mirrored path with ..\\", Client, "GET", "/api/v1/daemons/d1/..\\restricted/secret")
            .expect(400, "bad_request"),
        row("mirrored path with %2e%2e\\", Client, "GET", "/api/v1/daemons/d1/%2e%2e\\restart")
            .expect(400, "bad_request"),
        row("mirrored path with %2e%2e%5c", Client, "GET", "/api/v1/daemons/d1/%2e%2e%5Crestart")
            .expect(400, "bad_request"),
        row("mirrored path with a backslash", Client, "POST", "/api/v1/daemons/d1/a\\b")
            .expect(400, "bad_request"),
        row("daemon id with NUL", Client, "GET", "/api/v1/daemons/d%001").expect(400, "bad_request"),
        row("daemon id 5,000 characters", Client, "GET", format!("/api/v1/daemons/{}", "a".repeat(5000)))
            .expect(400, "bad_request"),
        row("command id with traversal", Client, "GET", "/api/v1/commands/..%2F..%2Fetc")
            .expect(404, "not_found"),
        row("daemon outside the key's scope", Client, "GET", "/api/v1/daemons/d2")
            .expect(404, "not_found"),
        row("named command http is reserved", Client, "POST", "/api/v1/daemons/d1/commands")
            .body(r#"{"method":"http","params":{"method":"GET","path":"/../../etc"}}"#)
            .expect(400, "bad_request"),
        // Client API parameters.
        row("changes since negative", Client, "GET", "/api/v1/daemons/d1/changes?since=-1")
            .expect(400, "bad_request"),
        row("changes since not a seq or time", Client, "GET", "/api/v1/daemons/d1/changes?since=abc")
            .expect(400, "bad_request"),
        row("changes since past u64", Client, "GET", "/api/v1/daemons/d1/changes?since=99999999999999999999999")
            .expect(400, "bad_request"),
        row("changes since bad percent escape", Client, "GET", "/api/v1/daemons/d1/changes?since=%zz")
            .expect(400, "bad_request"),
        row("changes limit 0", Client, "GET", "/api/v1/daemons/d1/changes?limit=0")
            .expect(400, "bad_request"),
        row("changes limit negative", Client, "GET", "/api/v1/daemons/d1/changes?limit=-5")
            .expect(400, "bad_request"),
        row("changes limit past u64", Client, "GET", "/api/v1/daemons/d1/changes?limit=99999999999999999999999")
            .expect(400, "bad_request"),
        row("changes wait negative", Client, "GET", "/api/v1/daemons/d1/changes?wait=-1")
            .expect(400, "bad_request"),
        row("changes wait NaN", Client, "GET", "/api/v1/daemons/d1/changes?wait=NaN")
            .expect(400, "bad_request"),
        row("changes wait infinite", Client, "GET", "/api/v1/daemons/d1/changes?wait=inf")
            .expect(400, "bad_request"),
        row("command wait negative", Client, "GET", "/api/v1/commands/cmd-nope?wait=-1")
            .expect(400, "bad_request"),
        row("command wait huge, unknown id", Client, "GET", "/api/v1/commands/cmd-nope?wait=1e30")
            .expect(404, "not_found"),
        row("event stream Last-Event-ID not a seq", Client, "GET", "/api/v1/daemons/d1/stream/events")
            .header("Last-Event-ID: abc")
            .expect(400, "bad_request"),
        row("event stream since negative", Client, "GET", "/api/v1/daemons/d1/stream/events?since=-4")
            .expect(400, "bad_request"),
        row("Idempotency-Key 10,000 characters", Client, "POST", "/api/v1/daemons/d1/sessions")
            .header(format!("Idempotency-Key: {}", "k".repeat(10_000)))
            .body("{}")
            .expect(400, "bad_request"),
        row("named command method a number", Client, "POST", "/api/v1/daemons/d1/commands")
            .body(r#"{"method":5,"params":{}}"#)
            .expect(400, "bad_request"),
        row("named command without method", Client, "POST", "/api/v1/daemons/d1/commands")
            .body(r#"{"params":{}}"#)
            .expect(400, "bad_request"),
        // Prefer: an unusable wait preference is ignored (RFC 7240), not an error.
        row("Prefer wait negative is ignored", Client, "POST", "/api/v1/daemons/d1/sessions")
            .header("Prefer: wait=-3")
            .body("{}")
            .ok(200),
        row("Prefer wait past u64 is ignored", Client, "POST", "/api/v1/daemons/d1/sessions")
            .header("Prefer: wait=999999999999999999999999")
            .body("{}")
            .ok(200),
        // Framing and size.
        row("obs-fold header continuation", Client, "GET", "/api/v1/daemons/d1/sessions")
            .header("X-A: a")
            .header(" Injected: b")
            .unparsable(),
        row("Content-Length past u64", Daemon, "POST", "/sync/poll")
            .header("Content-Length: 99999999999999999999")
            .unparsable(),
        row("Content-Length over the body limit", Daemon, "POST", "/sync/poll")
            .header("Content-Length: 20000000")
            .expect(413, "payload_too_large"),
        // The wrong key for a route.
        row("no key", None, "POST", "/sync/poll")
            .body(r#"{"daemon_id":"d1"}"#)
            .expect(401, "unauthorized"),
        row("malformed bearer token", None, "GET", "/api/v1/daemons")
            .header("Authorization: Bearer \x01\x02")
            .unparsable(),
        row("daemon key acting as another daemon", Daemon, "POST", "/sync/poll")
            .body(r#"{"daemon_id":"d2"}"#)
            .expect(403, "forbidden"),
        row("client key on /sync", Client, "POST", "/sync/poll")
            .body(r#"{"daemon_id":"d1"}"#)
            .expect(403, "forbidden"),
        row("daemon key on /api/v1", Daemon, "GET", "/api/v1/daemons").expect(403, "forbidden"),
        row("client key on /admin", Client, "GET", "/admin/keys").expect(403, "forbidden"),
    ]
}

/// Sends `request` on a fresh connection and reads until the relay closes it (the request
/// says `Connection: close`): status and body. A write cut short by the relay (it may
/// answer and close before a refused body is all sent) still reads the answer.
async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> (u16, Vec<u8>, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let _ = stream.write_all(request).await;
    let mut received = Vec::new();
    let read = tokio::time::timeout(LIMIT, stream.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "no answer within {LIMIT:?}");
    let end = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no response head in {:?}",
                String::from_utf8_lossy(&received)
            )
        });
    let head = String::from_utf8_lossy(&received[..end]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    (status, received[end + 4..].to_vec(), head)
}

fn request(row: &Row, daemon_key: &str, client_key: &str) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(row.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(&row.target);
    out.extend_from_slice(b" HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n");
    match row.key {
        Key::Daemon => {
            out.extend_from_slice(format!("Authorization: Bearer {daemon_key}\r\n").as_bytes())
        }
        Key::Client => {
            out.extend_from_slice(format!("Authorization: Bearer {client_key}\r\n").as_bytes())
        }
        Key::None => {}
    }
    let sets_length = row
        .headers
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with(b"content-length"));
    for line in &row.headers {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    if !sets_length && (row.method == "POST" || !row.body.is_empty()) {
        out.extend_from_slice(b"Content-Type: application/json\r\n");
        out.extend_from_slice(format!("Content-Length: {}\r\n", row.body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&row.body);
    out
}

/// What the test daemon answers every mirrored call with: the headers it was sent, plus
/// response headers that try to inject a second header line.
fn echo(command: &Value) -> Value {
    json!({
        "status": 200,
        "headers": {
            "content-type": "application/json",
            "x-injected": "a\r\nSet-Cookie: stolen=1",
            "x-lf": "a\nSet-Cookie: stolen=2",
            "set-cookie\r\nx-evil": "1",
            "x-fine": "yes",
        },
        "body": { "headers": command["params"]["headers"], "body": command["params"]["body"] },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_request_gets_its_exact_error() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d1").await;
    let daemon_key = daemon.key.clone();
    let _other = relay.daemon("d2").await;
    let client = relay.client(&["d1"]).await;
    let serving = serve_daemon(daemon, echo);

    let mut wrong = Vec::new();
    let rows = rows();
    for row in &rows {
        let (status, body, head) =
            exchange(relay.addr, &request(row, &daemon_key, &client.key)).await;
        let code = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
        let message = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned));
        if status != row.status || code.as_deref() != row.code {
            wrong.push(format!(
                "{}: got {status} {code:?}, want {} {:?} ({})",
                row.name,
                row.status,
                row.code,
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ));
            continue;
        }
        if row.code.is_some() {
            assert!(
                message.is_some_and(|m| !m.is_empty()),
                "{}: an error without a message",
                row.name
            );
            assert!(
                head.to_ascii_lowercase()
                    .contains("x-syncrelay-source: relay"),
                "{}: a relay error must say X-Syncrelay-Source: relay",
                row.name
            );
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} rows wrong:\n{}",
        wrong.len(),
        rows.len(),
        wrong.join("\n")
    );
    println!(
        "{} hostile requests, each answered as the table says",
        rows.len()
    );

    // Header injection through a mirrored call, both ways.
    let (status, body, head) = exchange(
        relay.addr,
        &request(
            &row(
                "mirrored call",
                Key::Client,
                "GET",
                "/api/v1/daemons/d1/sessions",
            )
            .header("X-Syncrelay-Source: cache")
            .header("X-Syncrelay-If-Offline: fail")
            .header("X-Syncrelay-Command-Id: forged")
            .header("Cookie: session=abc")
            .header("Connection: x-secret, close")
            .header("X-Secret: hop-by-hop"),
            &daemon_key,
            &client.key,
        ),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(
        !lower.contains("set-cookie"),
        "an injected header line reached the client: {head}"
    );
    assert!(!lower.contains("x-evil"), "{head}");
    assert!(
        !lower.contains("x-injected") && !lower.contains("x-lf"),
        "{head}"
    );
    assert!(
        lower.contains("x-fine: yes"),
        "well-formed daemon headers pass: {head}"
    );
    assert!(lower.contains("x-syncrelay-source: daemon"), "{head}");
    let sent: Value = serde_json::from_slice(&body).expect("echo body");
    let forwarded = sent["headers"].as_object().expect("forwarded headers");
    for dropped in [
        "authorization",
        "x-syncrelay-source",
        "x-syncrelay-if-offline",
        "x-syncrelay-command-id",
        "connection",
        "x-secret",
        "host",
    ] {
        assert!(
            !forwarded.keys().any(|k| k.eq_ignore_ascii_case(dropped)),
            "{dropped} must not reach the daemon: {forwarded:?}"
        );
    }
    assert_eq!(
        forwarded.get("cookie"),
        Some(&json!("session=abc")),
        "end-to-end headers pass"
    );

    // A mirrored JSON body too deep to travel as JSON inside a command reaches the daemon
    // as its exact text, and the call succeeds.
    let deep = nested(150);
    let (status, body, head) = exchange(
        relay.addr,
        &request(
            &row(
                "deep mirrored body",
                Key::Client,
                "POST",
                "/api/v1/daemons/d1/sessions",
            )
            .body(deep.clone()),
            &daemon_key,
            &client.key,
        ),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    let sent: Value = serde_json::from_slice(&body).expect("echo body");
    assert_eq!(sent["body"], json!(deep));

    // Nothing above touched the daemon's state: its change log holds exactly the one
    // accepted update, and the relay still answers.
    let reply = client
        .get("/api/v1/daemons/d1/changes?since=0")
        .send()
        .await
        .expect("changes");
    assert_eq!(reply.status(), 200);
    let changes: Value = reply.json().await.expect("changes JSON");
    assert_eq!(
        changes["changes"].as_array().map(Vec::len),
        Some(1),
        "{changes}"
    );
    serving.abort();
}
