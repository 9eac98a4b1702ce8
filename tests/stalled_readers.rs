//! Issue 18, finding 1: readers that stop reading a cached context. A thousand HTTP/2
//! streams on a cached 50 MB context whose client never opens its flow-control window
//! (and one HTTP/1.1 reader that never reads) against the relay binary: each stream holds
//! a few chunks ahead of its reader, so the relay's RSS grows by a few chunks per stream
//! (it grew by 1.1–1.4 MiB per stream before), a reader that does read gets the whole
//! context meanwhile, and after `limits.body_write_timeout` without progress every
//! stalled stream is reset (its connection still serving) and the HTTP/1.1 connection
//! closed.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::daemon::TestDaemon;
use common::{eventually, metric_at, Client, RelayProcess, TestAgent};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use syncrelay::agent::RawAgent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const STREAMS: usize = 1_000;
/// Under the relay's 128 concurrent streams per connection.
const PER_CONNECTION: usize = 125;
/// 50,000 events of 1,000 data bytes: a little over 50 MB of SSE.
const EVENTS: u64 = 50_000;
const EVENT_BYTES: u64 = 1_000;
/// The agent's default chunk size, and so the size of the frames a stream sends.
const CHUNK: u64 = 64 << 10;
/// What a stalled stream may hold: the frames ahead of its reader, the one hyper holds,
/// and one more for HTTP/2 buffers and the stream's own state.
const PER_STREAM_BOUND: u64 = (2 + 1 + 1) * CHUNK;
const STALL: Duration = Duration::from_secs(20);
const LIMIT: Duration = Duration::from_secs(120);

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib << 10
}

/// Reads a whole response, returning its length.
async fn read_all(client: &Client, path: &str) -> (u64, String) {
    let mut response = client.get(path).send().await.expect("relay reachable");
    assert_eq!(response.status(), 200);
    let source = response.headers()["x-syncrelay-source"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut bytes = 0u64;
    while let Some(chunk) = response.chunk().await.expect("body") {
        bytes += chunk.len() as u64;
    }
    (bytes, source)
}

/// An HTTP/2 connection whose windows stay as the client first set them (64 KiB) because
/// nothing is ever read.
async fn stalled_connection(url: &str) -> http2::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .adaptive_window(false)
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .handshake(TokioIo::new(stream))
        .await
        .expect("h2 handshake");
    tokio::spawn(connection);
    sender
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_hold_a_few_chunks_each_and_are_ended() {
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[limits]\nbody_write_timeout = \"{}s\"\n\
         [streams]\ncontext_max_size = 268435456\n",
        STALL.as_secs()
    );
    let relay = RelayProcess::spawn_with(
        &dir.path().join("data"),
        &dir.path().join("relay.toml"),
        &extra,
    );
    let (daemon_key, client_key) = relay.daemon_and_client_keys("d").await;
    let client = Client {
        url: relay.url.clone(),
        key: client_key,
        http: reqwest::Client::new(),
    };
    let daemon = TestDaemon::start().await;
    let _agent = TestAgent::start(
        &relay.url,
        "d",
        &daemon_key,
        &daemon.target,
        RawAgent::default(),
    );
    client.await_online("d").await;
    let path = format!(
        "/api/v1/daemons/d/approvals/big/context/stream?events={EVENTS}&size={EVENT_BYTES}"
    );
    let (context_bytes, _) = read_all(&client, &path).await;
    assert!(context_bytes > 50_000_000, "{context_bytes} bytes");
    let pid = relay.child.id();
    let metric = |series: &'static str| {
        let (http, url) = (client.http.clone(), relay.url.clone());
        async move { metric_at(&http, &url, series).await.unwrap_or(-1.0) }
    };
    let rss_before = rss_bytes(pid);

    // A thousand streams that never read, 125 to a connection.
    let mut connections = Vec::new();
    let mut bodies: Vec<Incoming> = Vec::new();
    for _ in 0..STREAMS.div_ceil(PER_CONNECTION) {
        let mut sender = stalled_connection(&relay.url).await;
        let requests: Vec<_> = (0..PER_CONNECTION)
            .map(|_| {
                let request = hyper::Request::get(format!("{}{path}", relay.url))
                    .header("authorization", format!("Bearer {}", client.key))
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                sender.send_request(request)
            })
            .collect();
        for response in futures_util::future::join_all(requests).await {
            let response = response.expect("h2 response");
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()["x-syncrelay-source"], "cache");
            bodies.push(response.into_body());
        }
        connections.push(sender);
    }
    // Every pump has filled what it may hold and waits for its reader.
    eventually(LIMIT, || async {
        metric("syncrelay_streamed_responses_waiting").await == STREAMS as f64
    })
    .await;
    let rss_stalled = rss_bytes(pid);
    let per_stream = rss_stalled.saturating_sub(rss_before) / STREAMS as u64;
    println!(
        "RSS {} MiB before, {} MiB with {STREAMS} stalled streams: {} KiB per stream \
         (bound {} KiB, chunks of {} KiB)",
        rss_before >> 20,
        rss_stalled >> 20,
        per_stream >> 10,
        PER_STREAM_BOUND >> 10,
        CHUNK >> 10
    );
    assert!(
        per_stream <= PER_STREAM_BOUND,
        "{} KiB per stalled stream",
        per_stream >> 10
    );

    // One HTTP/1.1 reader that never reads.
    let mut http1 = TcpStream::connect(relay.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {}\r\n\r\n",
        client.key
    );
    http1.write_all(request.as_bytes()).await.unwrap();

    // A reader that reads gets the whole context meanwhile.
    let (bytes, source) = read_all(&client, &path).await;
    assert_eq!((bytes, source.as_str()), (context_bytes, "cache"));

    // After `body_write_timeout` without progress, all are ended.
    eventually(LIMIT, || async {
        metric("syncrelay_streamed_responses_stalled_total").await == (STREAMS + 1) as f64
            && metric("syncrelay_streamed_responses_open").await == 0.0
    })
    .await;
    for mut body in bodies {
        let end = tokio::time::timeout(LIMIT, async {
            loop {
                match body.frame().await {
                    Some(Ok(_)) => continue,
                    Some(Err(err)) => return Some(err),
                    None => return None,
                }
            }
        })
        .await
        .expect("the stream ends");
        let err = end.expect("reset, not ended like a complete context");
        assert!(
            format!("{err:?}").contains("CANCEL"),
            "reset with CANCEL: {err:?}"
        );
    }
    // Only the streams were reset: their connections still serve.
    for sender in &mut connections {
        let request = hyper::Request::get(format!("{}/healthz", relay.url))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.expect("connection open");
        assert_eq!(response.status(), 200);
    }
    // The HTTP/1.1 connection is closed, short of a whole context.
    let mut received = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(LIMIT, http1.read(&mut buf))
            .await
            .expect("closed")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => received += n as u64,
        }
    }
    assert!(
        received < context_bytes,
        "{received} of {context_bytes} bytes"
    );
}
