//! Abuse limits end to end over real loopback sockets, checked against DESIGN.md
//! ("Security") and config.toml's `[limits]`, `[rate_limit]` and `[cors]`: brute-forced
//! keys block their source address (before any key lookup) while other addresses and keys
//! carry on, per-key and per-address rate limits (429 `rate_limited` with `Retry-After`),
//! slowloris header timeouts, connection caps per address and in all, header count and
//! size limits (431), CORS, revocation ending waiting polls and event streams at once, and
//! rate-limit memory staying bounded while source addresses rotate.
//!
//! Linux routes all of 127.0.0.0/8 to loopback, so a test appears as another source
//! address by binding its socket to 127.0.0.2, 127.0.1.7 and so on. Every read, request
//! and wait is bounded.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::{eventually, Daemon, TestRelay};
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout, Instant};

/// Upper bound of any single request, read or wait in these tests.
const LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Helpers

/// 127.0.0.`last`.
fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A reqwest client whose connections come from `from`.
fn client_from(from: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(from)
        .build()
        .expect("reqwest client")
}

/// A response read in full.
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends a request (bounded) and reads its body as JSON (`Null` when it is not JSON).
async fn send(request: reqwest::RequestBuilder) -> Reply {
    let response = timeout(LIMIT, request.send())
        .await
        .expect("response within the limit")
        .expect("relay reachable");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = timeout(LIMIT, response.bytes())
        .await
        .expect("body within the limit")
        .expect("body");
    Reply {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

/// `GET {url}{path}` with `key` as bearer token when given.
async fn get(http: &reqwest::Client, url: &str, path: &str, key: Option<&str>) -> Reply {
    let mut request = http.get(format!("{url}{path}"));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    send(request).await
}

/// Asserts the design's rate-limit answer: 429, error code `rate_limited`, and a
/// `Retry-After` of whole seconds, at least 1. Returns the seconds.
fn assert_rate_limited(reply: &Reply, what: &str) -> u64 {
    assert_eq!(reply.status, 429, "{what}: {}", reply.body);
    assert_eq!(
        reply.body["error"]["code"], "rate_limited",
        "{what}: {}",
        reply.body
    );
    let retry_after = reply
        .header("retry-after")
        .unwrap_or_else(|| panic!("{what}: 429 without Retry-After"));
    let seconds: u64 = retry_after
        .parse()
        .unwrap_or_else(|_| panic!("{what}: Retry-After {retry_after:?} is not whole seconds"));
    assert!(seconds >= 1, "{what}: Retry-After {seconds}");
    seconds
}

/// A well-formed but unknown key: `srk_<16 hex>_<64 hex>`, random.
fn random_bad_key() -> String {
    format!(
        "srk_{}_{}",
        hex::encode(rand::random::<[u8; 8]>()),
        hex::encode(rand::random::<[u8; 32]>())
    )
}

/// The key id of a token `srk_<id>_<secret>`.
fn key_id(token: &str) -> &str {
    token
        .strip_prefix("srk_")
        .and_then(|rest| rest.split_once('_'))
        .map(|(id, _)| id)
        .unwrap_or_else(|| panic!("not a key token: {token:?}"))
}

/// One counter or gauge of `/metrics`, read from 127.0.0.1.
async fn metric(relay: &TestRelay, name: &str) -> u64 {
    let response = timeout(
        LIMIT,
        relay.http.get(format!("{}/metrics", relay.url)).send(),
    )
    .await
    .expect("metrics within the limit")
    .expect("relay reachable");
    assert_eq!(response.status(), 200, "/metrics");
    let text = response.text().await.expect("metrics text");
    text.lines()
        .find_map(|line| {
            let (metric, value) = line.split_once(' ')?;
            (metric == name).then(|| value.trim().parse::<u64>().expect("integer metric"))
        })
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

/// Revokes a key through the admin API; must answer 200.
async fn revoke(relay: &TestRelay, token: &str) {
    let id = key_id(token);
    let reply = send(
        relay
            .http
            .delete(format!("{}/admin/keys/{id}", relay.url))
            .bearer_auth(&relay.admin_token),
    )
    .await;
    assert_eq!(reply.status, 200, "revoke {id}: {}", reply.body);
}

/// A raw TCP connection to the relay from `from`.
async fn connect_from(from: IpAddr, relay: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind source");
    timeout(LIMIT, socket.connect(relay))
        .await
        .expect("connect within the limit")
        .expect("connect")
}

/// A minimal keep-alive `GET path` request.
fn get_request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n")
}

/// Reads one HTTP/1.1 response with a `Content-Length` body; `None` when the connection
/// ends (EOF or error) before a whole response arrived.
async fn read_response(stream: &mut TcpStream) -> Option<(u16, Vec<u8>)> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        match timeout(LIMIT, stream.read(&mut chunk))
            .await
            .expect("response within the limit")
        {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while buffer.len() < head_end + length {
        match timeout(LIMIT, stream.read(&mut chunk))
            .await
            .expect("body within the limit")
        {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
    Some((status, buffer[head_end..head_end + length].to_vec()))
}

/// Sends `request` on `stream` and reads one response; `None` as for [`read_response`]
/// (also when the write fails because the relay closed the connection).
async fn exchange(stream: &mut TcpStream, request: &[u8]) -> Option<(u16, Vec<u8>)> {
    if stream.write_all(request).await.is_err() {
        return None;
    }
    read_response(stream).await
}

/// Reads until the relay closes the connection (EOF or reset) and returns what arrived
/// before. Panics when it stays open for `limit`.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut received = Vec::new();
    let mut chunk = [0u8; 8192];
    let deadline = Instant::now() + limit;
    loop {
        let read = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("connection still open after {limit:?}"));
        match read {
            Ok(0) | Err(_) => return received,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
        }
    }
}

/// An update in the sync protocol's shape.
fn update(seq: u64) -> Value {
    json!({
        "type": "new_approval",
        "data": { "session_id": "s1", "run_id": "r1", "n": seq },
        "timestamp": "2026-01-01T00:00:00Z",
        "seq": seq,
    })
}

// ---------------------------------------------------------------------------------------
// Failed authentication

/// A brute force of random keys from one address: after `auth_failures_burst` failures
/// (401) the address is answered 429 with `Retry-After` without its keys being looked up
/// (the failure counter stops), even for a valid key; other addresses and valid keys are
/// served on every request meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brute_force_blocks_the_address_but_nobody_else() {
    const BURST: u64 = 5;
    let relay = TestRelay::start_with(
        "[rate_limit]\nauth_failures_per_minute = 5\nauth_failures_burst = 5\n",
    )
    .await;
    let good = relay.client(&["*"]).await;
    let other_key = relay.key("client", None, Some(&["*"])).await;
    let attacker = client_from(loopback(2));
    let neighbour = client_from(loopback(3));
    assert_eq!(metric(&relay, "syncrelay_auth_failures_total").await, 0);

    let mut statuses = Vec::new();
    let mut failures_when_blocked = None;
    for attempt in 0..200 {
        let bad = random_bad_key();
        let reply = get(&attacker, &relay.url, "/api/v1/daemons", Some(&bad)).await;
        match reply.status {
            401 => {
                assert_eq!(
                    reply.body["error"]["code"], "unauthorized",
                    "{}",
                    reply.body
                );
                assert!(
                    failures_when_blocked.is_none(),
                    "attempt {attempt}: 401 again after being blocked ({statuses:?})"
                );
            }
            429 => {
                let seconds = assert_rate_limited(&reply, "blocked brute force");
                assert!(
                    seconds <= 60,
                    "Retry-After {seconds} beyond the refill time"
                );
                let failures = metric(&relay, "syncrelay_auth_failures_total").await;
                assert!(
                    failures <= BURST + 1,
                    "attempt {attempt}: {failures} key lookups counted, want ≤ {}",
                    BURST + 1
                );
                match failures_when_blocked {
                    None => failures_when_blocked = Some(failures),
                    Some(before) => assert_eq!(
                        failures, before,
                        "attempt {attempt}: a blocked request was still authenticated"
                    ),
                }
            }
            other => panic!("attempt {attempt}: unexpected {other}: {}", reply.body),
        }
        statuses.push(reply.status);
        // Interleaved: a valid key from 127.0.0.1 and another from 127.0.0.3.
        if attempt % 5 == 0 {
            let reply = good.get("/api/v1/daemons").send().await.expect("reachable");
            assert_eq!(
                reply.status(),
                200,
                "good key from 127.0.0.1, attempt {attempt}"
            );
            let reply = get(&neighbour, &relay.url, "/api/v1/daemons", Some(&other_key)).await;
            assert_eq!(
                reply.status, 200,
                "good key from 127.0.0.3, attempt {attempt}: {}",
                reply.body
            );
        }
    }
    let unauthorized = statuses.iter().filter(|s| **s == 401).count() as u64;
    assert!(
        (BURST..=BURST + 1).contains(&unauthorized),
        "{unauthorized} answers 401 before blocking: {statuses:?}"
    );
    assert!(
        statuses[..BURST as usize].iter().all(|s| *s == 401),
        "the first {BURST} failures are plain 401s: {statuses:?}"
    );
    assert_eq!(*statuses.last().unwrap(), 429, "still blocked at the end");
    let limited = statuses.iter().filter(|s| **s == 429).count() as u64;
    assert!(metric(&relay, "syncrelay_rate_limited_total").await >= limited);

    // Blocked before any key is checked: a valid key from the blocked address is refused.
    let reply = get(&attacker, &relay.url, "/api/v1/daemons", Some(&good.key)).await;
    assert_rate_limited(&reply, "valid key from the blocked address");
    let reply = get(&attacker, &relay.url, "/healthz", None).await;
    assert_rate_limited(&reply, "healthz from the blocked address");
    assert!(metric(&relay, "syncrelay_auth_failures_total").await <= BURST + 1);
    // …while the same key from elsewhere is fine.
    let reply = get(&neighbour, &relay.url, "/api/v1/daemons", Some(&good.key)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

// ---------------------------------------------------------------------------------------
// Request rates

/// One key over its rate gets 429 with `Retry-After`; another key is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_rate_limit_is_per_key() {
    let relay =
        TestRelay::start_with("[rate_limit]\nper_key_per_second = 5\nper_key_burst = 5\n").await;
    let busy = relay.client(&["*"]).await;
    let calm = relay.client(&["*"]).await;

    let mut limited = 0;
    let mut ok = 0;
    for _ in 0..20 {
        let reply = send(busy.get("/api/v1/daemons")).await;
        match reply.status {
            200 => ok += 1,
            429 => {
                assert_rate_limited(&reply, "busy key");
                limited += 1;
            }
            other => panic!("busy key: unexpected {other}: {}", reply.body),
        }
    }
    assert!(ok >= 5, "the burst of 5 is allowed ({ok} ok)");
    assert!(limited > 0, "20 requests at once exceed a burst of 5");

    // Same address, another key: its own full burst.
    for i in 0..5 {
        let reply = send(calm.get("/api/v1/daemons")).await;
        assert_eq!(reply.status, 200, "calm key request {i}: {}", reply.body);
    }
}

/// One source address over its rate gets 429 even unauthenticated; another address is
/// unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_rate_limit_is_per_address() {
    let relay =
        TestRelay::start_with("[rate_limit]\nper_address_per_second = 5\nper_address_burst = 5\n")
            .await;
    let noisy = client_from(loopback(2));
    let quiet = client_from(loopback(3));

    let mut limited = 0;
    for _ in 0..20 {
        let reply = get(&noisy, &relay.url, "/healthz", None).await;
        match reply.status {
            200 => {}
            429 => {
                assert_rate_limited(&reply, "noisy address");
                limited += 1;
            }
            other => panic!("noisy address: unexpected {other}: {}", reply.body),
        }
    }
    assert!(limited > 0, "20 requests at once exceed a burst of 5");

    for i in 0..5 {
        let reply = get(&quiet, &relay.url, "/healthz", None).await;
        assert_eq!(
            reply.status, 200,
            "quiet address request {i}: {}",
            reply.body
        );
    }
}

// ---------------------------------------------------------------------------------------
// Slow and idle connections

/// Issue 18, finding 4: a read whose client is gone, or whose wait has passed, leaves its
/// daemon's queue with its body at once, not at the daemon's next poll (large bodies held
/// for an online daemon that does not poll grew the relay's memory without bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_reads_free_their_bodies_without_a_poll() {
    let relay = TestRelay::start().await;
    let _daemon = relay.daemon("d").await; // online, never polls
    let client = relay.client(&["d"]).await;
    let body = "x".repeat(1 << 20);
    let held = |relay: &TestRelay| {
        let relay_url = relay.url.clone();
        let http = relay.http.clone();
        async move {
            let text = http
                .get(format!("{relay_url}/metrics"))
                .send()
                .await
                .unwrap();
            let text = text.text().await.unwrap();
            let value = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok())
                    .unwrap()
            };
            (
                value("syncrelay_reads_held"),
                value("syncrelay_reads_held_bytes"),
            )
        }
    };
    // Past their deadline: each answered 504, and nothing held afterwards.
    for _ in 0..3 {
        let reply = send(
            client
                .get("/api/v1/daemons/d/sessions")
                .header("prefer", "wait=1")
                .body(body.clone()),
        )
        .await;
        assert_eq!(reply.status, 504, "{}", reply.body);
        assert_eq!(held(&relay).await, (0, 0), "a timed-out read is not held");
    }
    // Clients gone mid-wait (HTTP/2 resets the stream): held while they wait, then freed.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let waiting: Vec<_> = (0..4)
        .map(|_| {
            let request = h2
                .get(format!("{}/api/v1/daemons/d/sessions", relay.url))
                .bearer_auth(&client.key)
                .header("prefer", "wait=60")
                .body(body.clone());
            tokio::spawn(async move {
                let _ = request.send().await;
            })
        })
        .collect();
    let relay_ref = &relay;
    eventually(Duration::from_secs(10), || async move {
        let (count, bytes) = held(relay_ref).await;
        count == 4 && bytes >= 4 << 20
    })
    .await;
    for task in &waiting {
        task.abort();
    }
    eventually(Duration::from_secs(10), || async move {
        held(relay_ref).await == (0, 0)
    })
    .await;
}

/// Issue 18, finding 6: an authenticated request whose body stalls (a declared length never
/// sent, or a byte now and then) is answered 408 `timeout` after `body_read_timeout` of no
/// progress, on the sync protocol and on a mirrored write alike; a steady body is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_bodies_are_timed_out() {
    let relay = TestRelay::start_with("[limits]\nbody_read_timeout = \"1s\"\n").await;
    let daemon_key = relay.key("daemon", Some("d"), None).await;
    let client_key = relay.key("client", None, Some(&["d"])).await;
    let head = |path: &str, key: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
        )
    };
    for (path, key) in [
        ("/sync/poll", &daemon_key),
        ("/api/v1/daemons/d/jobs", &client_key),
    ] {
        // Nothing after the first byte.
        let mut stream = connect_from(loopback(3), relay.addr).await;
        stream.write_all(head(path, key).as_bytes()).await.unwrap();
        let started = Instant::now();
        let (status, body) = read_response(&mut stream).await.expect("an answer");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (408, Some("timeout")),
            "{path}"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{path}: not before the timeout"
        );

        // A byte every 1.5 s: progress, but never within the timeout.
        let mut stream = connect_from(loopback(3), relay.addr).await;
        stream.write_all(head(path, key).as_bytes()).await.unwrap();
        let (mut reader, mut writer) = stream.into_split();
        let trickle = tokio::spawn(async move {
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                if writer.write_all(b" ").await.is_err() {
                    return;
                }
            }
        });
        let mut received = Vec::new();
        let _ = timeout(LIMIT, reader.read_to_end(&mut received)).await;
        trickle.abort();
        let text = String::from_utf8_lossy(&received);
        assert!(text.starts_with("HTTP/1.1 408"), "{path}: {text}");
    }
    // A body that keeps coming within the timeout is read whole.
    let mut stream = connect_from(loopback(3), relay.addr).await;
    let body = json!({ "daemon_id": "d", "updates": [], "wait_for_commands": false }).to_string();
    let request = format!(
        "POST /sync/connect HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {daemon_key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    for piece in body.as_bytes().chunks(body.len() / 3 + 1) {
        tokio::time::sleep(Duration::from_millis(400)).await;
        stream.write_all(piece).await.unwrap();
    }
    let (status, answer) = read_response(&mut stream).await.expect("an answer");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
}

/// A client trickling header lines, never finishing its request, is closed after
/// `header_read_timeout` (not before), while other requests are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_headers_are_cut_off() {
    let relay = TestRelay::start_with("[limits]\nheader_read_timeout = \"1s\"\n").await;
    let mut stream = connect_from(loopback(2), relay.addr).await;
    let started = Instant::now();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("first bytes");

    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.tick().await;
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut served_meanwhile = false;
    let closed_after = loop {
        assert!(
            started.elapsed() < LIMIT,
            "a slowloris connection was still open after {LIMIT:?}"
        );
        tokio::select! {
            _ = tick.tick() => {
                if stream.write_all(b"X-a: b\r\n").await.is_err() {
                    break started.elapsed();
                }
                if !served_meanwhile {
                    // Another connection is served while this one dawdles.
                    let reply = get(&relay.http, &relay.url, "/healthz", None).await;
                    assert_eq!(reply.status, 200, "{}", reply.body);
                    served_meanwhile = true;
                }
            }
            read = stream.read(&mut chunk) => match read {
                Ok(0) | Err(_) => break started.elapsed(),
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            },
        }
    };
    assert!(served_meanwhile);
    assert!(
        closed_after >= Duration::from_millis(900),
        "closed after {closed_after:?}, before header_read_timeout"
    );
    assert!(
        !received.starts_with(b"HTTP/1.1 2"),
        "an unfinished request was answered: {:?}",
        String::from_utf8_lossy(&received)
    );
}

/// A connection that sends nothing at all is closed after `header_read_timeout` too, as is
/// one that stalls inside what could be an HTTP/2 preface.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed() {
    let relay = TestRelay::start_with("[limits]\nheader_read_timeout = \"1s\"\n").await;
    let started = Instant::now();
    let mut silent = connect_from(loopback(2), relay.addr).await;
    let mut preface = connect_from(loopback(3), relay.addr).await;
    preface
        .write_all(b"PRI * HTTP/2.0\r\n")
        .await
        .expect("preface prefix");
    for (what, stream) in [("silent", &mut silent), ("preface prefix", &mut preface)] {
        let received = read_until_closed(stream, LIMIT).await;
        assert!(received.is_empty(), "{what}: answered {received:?}");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before header_read_timeout",
        started.elapsed()
    );
}

/// A request line stalled after its first byte is closed after `header_read_timeout`
/// (the HTTP/1.1 header timer runs once the relay knows it speaks HTTP/1.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_line_is_closed() {
    let relay = TestRelay::start_with("[limits]\nheader_read_timeout = \"1s\"\n").await;
    let mut stream = connect_from(loopback(2), relay.addr).await;
    let started = Instant::now();
    stream.write_all(b"G").await.expect("one byte");
    let received = read_until_closed(&mut stream, LIMIT).await;
    assert!(
        !received.starts_with(b"HTTP/1.1 2"),
        "{:?}",
        String::from_utf8_lossy(&received)
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before header_read_timeout",
        started.elapsed()
    );
}

/// A keep-alive connection idle after a request is closed within `header_read_timeout`
/// plus slack, as the next request's headers never come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    let relay = TestRelay::start_with("[limits]\nheader_read_timeout = \"1s\"\n").await;
    let mut stream = connect_from(loopback(2), relay.addr).await;
    let (status, _) = exchange(&mut stream, get_request("/healthz").as_bytes())
        .await
        .expect("a response");
    assert_eq!(status, 200);
    let received = read_until_closed(&mut stream, LIMIT).await;
    assert!(
        !received.starts_with(b"HTTP/1.1 2"),
        "{:?}",
        String::from_utf8_lossy(&received)
    );
}

// ---------------------------------------------------------------------------------------
// Connection caps

/// Beyond `max_connections_per_address`, new connections from that address are closed at
/// once without an answer; other addresses connect; a freed place is usable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_capped() {
    let relay = TestRelay::start_with("[limits]\nmax_connections_per_address = 3\n").await;
    let from = loopback(2);
    let mut open = Vec::new();
    for i in 0..3 {
        let mut stream = connect_from(from, relay.addr).await;
        let (status, _) = exchange(&mut stream, get_request("/healthz").as_bytes())
            .await
            .unwrap_or_else(|| panic!("connection {i} within the cap was closed"));
        assert_eq!(status, 200);
        open.push(stream);
    }
    assert_eq!(
        metric(&relay, "syncrelay_connections_refused_total").await,
        0
    );

    let mut fourth = connect_from(from, relay.addr).await;
    let _ = fourth.write_all(get_request("/healthz").as_bytes()).await;
    let received = read_until_closed(&mut fourth, Duration::from_secs(5)).await;
    assert!(
        received.is_empty(),
        "a refused connection got an answer: {:?}",
        String::from_utf8_lossy(&received)
    );
    assert_eq!(
        metric(&relay, "syncrelay_connections_refused_total").await,
        1
    );

    // The three still work, and another address is not affected.
    for stream in &mut open {
        let (status, _) = exchange(stream, get_request("/healthz").as_bytes())
            .await
            .expect("an admitted connection stays usable");
        assert_eq!(status, 200);
    }
    let mut elsewhere = connect_from(loopback(3), relay.addr).await;
    let (status, _) = exchange(&mut elsewhere, get_request("/healthz").as_bytes())
        .await
        .expect("another address is admitted");
    assert_eq!(status, 200);

    // Closing one frees its place for a new connection from the same address.
    drop(open.pop());
    let addr = relay.addr;
    eventually(LIMIT, || async move {
        let mut stream = connect_from(from, addr).await;
        match exchange(&mut stream, get_request("/healthz").as_bytes()).await {
            Some((status, _)) => {
                assert_eq!(status, 200);
                true
            }
            None => false,
        }
    })
    .await;
}

/// Beyond `max_connections` in all, new connections from any address are closed at once;
/// a freed place is usable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_in_all_are_capped() {
    let relay = TestRelay::start_with("[limits]\nmax_connections = 3\n").await;
    let mut open = Vec::new();
    for last in 2..5 {
        let mut stream = connect_from(loopback(last), relay.addr).await;
        let (status, _) = exchange(&mut stream, get_request("/healthz").as_bytes())
            .await
            .unwrap_or_else(|| panic!("connection from 127.0.0.{last} within the cap"));
        assert_eq!(status, 200);
        open.push(stream);
    }
    let mut fourth = connect_from(loopback(5), relay.addr).await;
    let _ = fourth.write_all(get_request("/healthz").as_bytes()).await;
    let received = read_until_closed(&mut fourth, Duration::from_secs(5)).await;
    assert!(
        received.is_empty(),
        "a refused connection got an answer: {:?}",
        String::from_utf8_lossy(&received)
    );

    drop(open.remove(0));
    let addr = relay.addr;
    eventually(LIMIT, || async move {
        let mut stream = connect_from(loopback(5), addr).await;
        match exchange(&mut stream, get_request("/metrics").as_bytes()).await {
            Some((status, body)) => {
                assert_eq!(status, 200);
                let text = String::from_utf8(body).unwrap();
                let refused = text
                    .lines()
                    .find_map(|l| l.strip_prefix("syncrelay_connections_refused_total "))
                    .and_then(|v| v.parse::<u64>().ok())
                    .expect("refused counter");
                assert!(refused >= 1, "{text}");
                true
            }
            None => false,
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Header limits

/// More than `max_headers` headers, or a header block over `max_header_bytes`, is
/// answered 431; requests just within both limits are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_blocks_get_431() {
    let relay = TestRelay::start().await;
    let with_headers = |count: usize| {
        let mut request = String::from("GET /healthz HTTP/1.1\r\nHost: relay\r\n");
        for i in 0..count {
            request.push_str(&format!("X-Filler-{i}: v\r\n"));
        }
        request.push_str("\r\n");
        request
    };
    let with_header_of = |bytes: usize| {
        format!(
            "GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Big: {}\r\n\r\n",
            "a".repeat(bytes)
        )
    };
    let status_of = |request: String| {
        let addr = relay.addr;
        async move {
            let mut stream = connect_from(loopback(2), addr).await;
            exchange(&mut stream, request.as_bytes())
                .await
                .map(|(status, _)| status)
        }
    };

    // Within the defaults (64 headers, 16384 bytes): served.
    assert_eq!(status_of(with_headers(60)).await, Some(200), "61 headers");
    assert_eq!(
        status_of(with_header_of(12 * 1024)).await,
        Some(200),
        "12 KB"
    );
    // Beyond them: 431.
    assert_eq!(status_of(with_headers(100)).await, Some(431), "101 headers");
    assert_eq!(
        status_of(with_header_of(20 * 1024)).await,
        Some(431),
        "20 KB"
    );
}

// ---------------------------------------------------------------------------------------
// CORS

/// With allowed origins: preflights from them are answered with the allowed methods and
/// headers, actual responses carry `Access-Control-Allow-Origin` and expose the relay's
/// headers; other origins get no CORS headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_only_allowed_origins() {
    const ORIGIN: &str = "https://app.example.com";
    let relay =
        TestRelay::start_with("[cors]\nallowed_origins = [\"https://app.example.com\"]\n").await;
    let client = relay.client(&["*"]).await;
    let preflight = |origin: &'static str| {
        relay
            .http
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/api/v1/daemons", relay.url),
            )
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
    };

    let reply = send(preflight(ORIGIN)).await;
    assert!(
        (200..300).contains(&reply.status),
        "preflight: {}",
        reply.status
    );
    assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
    let lower = |name: &str| reply.header(name).unwrap_or("").to_ascii_lowercase();
    assert!(
        lower("access-control-allow-headers").contains("authorization"),
        "allow-headers: {:?}",
        reply.header("access-control-allow-headers")
    );
    assert!(
        lower("access-control-allow-methods")
            .split(',')
            .any(|m| m.trim() == "get"),
        "allow-methods: {:?}",
        reply.header("access-control-allow-methods")
    );

    let reply = send(client.get("/api/v1/daemons").header("origin", ORIGIN)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
    let exposed = reply
        .header("access-control-expose-headers")
        .unwrap_or("")
        .to_ascii_lowercase();
    assert!(
        exposed.contains("x-syncrelay-source"),
        "expose-headers: {exposed:?}"
    );

    let evil = "https://evil.example.com";
    let reply = send(preflight(evil)).await;
    assert_eq!(
        reply.header("access-control-allow-origin"),
        None,
        "preflight"
    );
    let reply = send(client.get("/api/v1/daemons").header("origin", evil)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("access-control-allow-origin"), None, "GET");
}

/// Without `[cors]`, no response carries any CORS header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cors_headers_without_cors_config() {
    let relay = TestRelay::start().await;
    let client = relay.client(&["*"]).await;
    let origin = "https://app.example.com";
    let preflight = send(
        relay
            .http
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/api/v1/daemons", relay.url),
            )
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization"),
    )
    .await;
    let actual = send(client.get("/api/v1/daemons").header("origin", origin)).await;
    assert_eq!(actual.status, 200, "{}", actual.body);
    for (what, reply) in [("preflight", &preflight), ("GET", &actual)] {
        let cors: Vec<_> = reply
            .headers
            .keys()
            .filter(|name| name.as_str().starts_with("access-control-"))
            .collect();
        assert!(cors.is_empty(), "{what}: CORS headers {cors:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Revocation

/// A daemon's waiting poll is answered 401 as soon as its key is revoked, and the key is
/// refused from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_key_answers_its_waiting_poll() {
    let relay = TestRelay::start().await;
    let key = relay.key("daemon", Some("d1"), None).await;
    let mut daemon = Daemon::new(&relay.url, "d1", &key);
    daemon.connect().await;
    let poll = tokio::spawn(async move {
        let reply = daemon.poll_raw(json!([]), true, 30.0).await;
        (daemon, reply)
    });
    eventually(LIMIT, || async {
        metric(&relay, "syncrelay_polls_waiting").await >= 1
    })
    .await;

    let revoked_at = Instant::now();
    revoke(&relay, &key).await;
    let (daemon, (status, body)) = timeout(Duration::from_secs(5), poll)
        .await
        .expect("the waiting poll ends within 5 s of the revocation")
        .expect("poll task");
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    assert!(revoked_at.elapsed() < Duration::from_secs(5));

    let (status, body) = daemon.poll_raw(json!([]), false, 0.0).await;
    assert_eq!(status, 401, "next request with the revoked key: {body}");
}

/// An open event stream ends as soon as its key is revoked (and not when another key is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_key_ends_its_event_stream() {
    let relay = TestRelay::start().await;
    let mut daemon = relay.daemon("d1").await;
    let viewer = relay.client(&["d1"]).await;
    let bystander = relay.key("client", None, Some(&["d1"])).await;

    let mut stream = timeout(LIMIT, viewer.get("/api/v1/daemons/d1/stream/events").send())
        .await
        .expect("stream opened in time")
        .expect("relay reachable");
    assert_eq!(stream.status(), 200);
    let first = timeout(LIMIT, stream.chunk())
        .await
        .expect("first frame in time")
        .expect("stream body")
        .expect("a first frame");
    assert!(!first.is_empty());

    // Another key's revocation leaves the stream open: an update still arrives.
    revoke(&relay, &bystander).await;
    daemon.connect().await;
    let (status, body) = daemon.poll_raw(json!([update(1)]), false, 0.0).await;
    assert_eq!(status, 200, "{body}");
    let mut seen = String::new();
    while !seen.contains("new_approval") {
        let chunk = timeout(LIMIT, stream.chunk())
            .await
            .expect("the update arrives in time")
            .expect("stream body")
            .expect("the stream is still open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }

    revoke(&relay, &viewer.key).await;
    let mut tail = String::new();
    let ended = timeout(Duration::from_secs(5), async {
        loop {
            match stream.chunk().await {
                Ok(Some(chunk)) => tail.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the stream is open 5 s after its key was revoked"
    );
    // It ends with an error event, never as if it were complete.
    assert!(
        tail.contains("event: error") && tail.contains("\"unauthorized\""),
        "the last events: {tail:?}"
    );
    let reply = send(viewer.get("/api/v1/daemons/d1/stream/events")).await;
    assert_eq!(reply.status, 401, "{}", reply.body);
}

// ---------------------------------------------------------------------------------------
// Bounded memory

/// Requests (and failed authentications) from 200 rotating addresses leave at most
/// `max_tracked_addresses` entries per table; every request is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_addresses_keep_rate_limit_memory_bounded() {
    let relay = TestRelay::start_with(
        "[rate_limit]\nmax_tracked_addresses = 50\nper_address_per_second = 1000\n",
    )
    .await;
    for i in 1..=200u8 {
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 1, i));
        let mut stream = connect_from(from, relay.addr).await;
        let (status, _) = exchange(&mut stream, get_request("/healthz").as_bytes())
            .await
            .expect("an answer");
        assert_eq!(status, 200, "healthz from {from}");
        if i % 25 == 0 {
            let tracked = metric(&relay, "syncrelay_rate_limit_tracked").await;
            assert!(tracked <= 55, "after {i} addresses: {tracked} tracked");
        }
    }
    let tracked = metric(&relay, "syncrelay_rate_limit_tracked").await;
    assert!(tracked >= 50, "the per-address table fills up: {tracked}");
    assert!(tracked <= 55, "{tracked} tracked after 200 addresses");

    // Failed authentications from 200 more addresses: the failure table and the table of
    // blocked addresses are capped at 50 as well (once the failure table is full, new
    // addresses share one budget, and are blocked once it is spent), so at most three full
    // tables of 50, plus the few keys used here.
    for i in 1..=200u8 {
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 2, i));
        let mut stream = connect_from(from, relay.addr).await;
        let request = format!(
            "GET /api/v1/daemons HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {}\r\n\r\n",
            random_bad_key()
        );
        let (status, _) = exchange(&mut stream, request.as_bytes())
            .await
            .expect("an answer");
        assert!(
            status == 401 || status == 429,
            "bad key from {from}: {status}"
        );
        if i % 25 == 0 {
            let tracked = metric(&relay, "syncrelay_rate_limit_tracked").await;
            assert!(tracked <= 155, "after {i} bad-key addresses: {tracked}");
        }
    }
    let tracked = metric(&relay, "syncrelay_rate_limit_tracked").await;
    assert!(tracked <= 155, "{tracked} tracked after 400 addresses");
    let reply = get(&relay.http, &relay.url, "/healthz", None).await;
    assert_eq!(reply.status, 200);
}

/// HTTP/2 has no header timeout: a connection that opens HTTP/2 (preface and SETTINGS)
/// and never sends a request is closed after `header_read_timeout`; one that served a
/// request is closed after `idle_timeout` with nothing in flight, but never while a long
/// poll is in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed() {
    let relay =
        TestRelay::start_with("[limits]\nheader_read_timeout = \"1s\"\nidle_timeout = \"1s\"\n")
            .await;

    // Preface and an empty SETTINGS frame, then silence.
    let mut silent = TcpStream::connect(relay.addr).await.unwrap();
    silent
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let started = Instant::now();
    let closed = timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 1024];
        while let Ok(n) = silent.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a silent HTTP/2 connection is still open after 10 s"
    );
    assert!(started.elapsed() >= Duration::from_millis(800));

    // A real HTTP/2 client: one request, then idle.
    let daemon_key = relay.key("daemon", Some("d"), None).await;
    let stream = TcpStream::connect(relay.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = connection.await;
        let _ = closed_tx.send(Instant::now());
    });
    let post = |path: &str, body: Value| {
        http::Request::post(format!("http://{}{path}", relay.addr))
            .header("authorization", format!("Bearer {daemon_key}"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap()
    };
    let response = sender
        .send_request(post(
            "/sync/connect",
            json!({ "daemon_id": "d", "version": "1", "capabilities": [] }),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let hello: Value = serde_json::from_slice(&body).unwrap();
    // A 3 s long poll outlasts the 1 s idle timeout: the connection stays up for it.
    let poll_started = Instant::now();
    let response = sender
        .send_request(post(
            "/sync/poll",
            json!({
                "daemon_id": "d",
                "connection_id": hello["connection_id"],
                "timeout": 3,
                "wait_for_commands": true,
                "updates": []
            }),
        ))
        .await
        .expect("the long poll's connection stays open");
    assert_eq!(response.status(), 200);
    http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap();
    let answered = Instant::now();
    assert!(answered - poll_started >= Duration::from_millis(2500));
    // Then idle: closed about a second later.
    let closed_at = timeout(Duration::from_secs(10), closed_rx)
        .await
        .expect("the idle connection is closed")
        .unwrap();
    assert!(closed_at - answered >= Duration::from_millis(800));
}

/// Behind a trusted proxy, limits apply to the client named by `X-Forwarded-For`: one
/// brute-forcing client is blocked while another behind the same proxy is served. From
/// an untrusted peer the header is ignored, so rotating it does not escape the block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxies_limit_the_forwarded_client() {
    let relay = TestRelay::start_with(
        "[server]\ntrusted_proxies = [\"127.0.0.2\"]\n\
         [rate_limit]\nauth_failures_per_minute = 5\nauth_failures_burst = 5\n",
    )
    .await;
    let good = relay.key("client", None, Some(&["d"])).await;
    let proxy = client_from(loopback(2));
    let via_proxy = |client: &str, key: &str| {
        proxy
            .get(format!("{}/api/v1/daemons", relay.url))
            .header("x-forwarded-for", format!("{client}, 127.0.0.2"))
            .bearer_auth(key)
    };
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(
            send(via_proxy("203.0.113.9", &random_bad_key()))
                .await
                .status,
        );
    }
    assert_eq!(&statuses[..5], &[401; 5], "{statuses:?}");
    assert_rate_limited(
        &send(via_proxy("203.0.113.9", &good)).await,
        "blocked client",
    );
    let other = send(via_proxy("203.0.113.10", &good)).await;
    assert_eq!(
        other.status, 200,
        "another client behind the proxy: {}",
        other.body
    );

    // Not a trusted proxy: the header is ignored and the peer itself is blocked.
    let spoofer = client_from(loopback(3));
    for i in 0..10u8 {
        spoofer
            .get(format!("{}/api/v1/daemons", relay.url))
            .header("x-forwarded-for", format!("198.51.100.{i}"))
            .bearer_auth(random_bad_key())
            .send()
            .await
            .unwrap();
    }
    let reply = send(
        spoofer
            .get(format!("{}/api/v1/daemons", relay.url))
            .header("x-forwarded-for", "198.51.100.200")
            .bearer_auth(&good),
    )
    .await;
    assert_rate_limited(&reply, "a spoofed X-Forwarded-For");
}
