//! A local HTTP daemon for the agent tests, standing in for hld: a real hyper server on
//! `127.0.0.1:0` serving under `/api/v1`:
//! - `ANY /api/v1/echo/…`: JSON describing the request (method, path, query, headers, body);
//! - `GET /api/v1/status/{code}`: that status with `{"code": …}`;
//! - `GET /api/v1/text`, `/api/v1/binary`, `/api/v1/headers` (custom and repeated headers);
//! - `GET /api/v1/slow?ms=N`: answers after N ms;
//! - `GET /api/v1/big?bytes=N`: an N-byte body, streamed in 64 KiB pieces;
//! - `GET /api/v1/approvals/{id}/context/stream?events=N&size=B&delay_ms=D`: a large SSE
//!   context of N events of B bytes each;
//! - `GET /api/v1/stream/events`: hld-shaped SSE (`id: n`, `data: {"type","timestamp","data"}`)
//!   replaying after `Last-Event-ID`, then live; events are made with [`TestDaemon::emit`].
//!
//! Every request is counted per path ([`TestDaemon::hits`]), with the command ids the agent
//! sent in `X-Syncrelay-Command-Id` ([`TestDaemon::command_ids`]).
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::sync::broadcast;

type Body = BoxBody<Bytes, Infallible>;

#[derive(Default)]
struct State {
    /// Every event emitted so far, as (id, data JSON).
    events: Vec<(u64, String)>,
    hits: HashMap<String, usize>,
    /// Per path, the distinct command ids the agent ran there.
    command_ids: HashMap<String, BTreeSet<String>>,
}

pub struct TestDaemon {
    /// The URL that stands for the daemon's `/api/v1`.
    pub target: String,
    pub addr: std::net::SocketAddr,
    state: Arc<Mutex<State>>,
    live: broadcast::Sender<(u64, String)>,
    server: tokio::task::JoinHandle<()>,
}

impl TestDaemon {
    pub async fn start() -> TestDaemon {
        Self::start_on("127.0.0.1:0").await
    }

    /// Starts on a given address (to come back on the same port after `stop`).
    pub async fn start_on(addr: &str) -> TestDaemon {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind test daemon");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let (live, _) = broadcast::channel(4096);
        let server_state = state.clone();
        let server_live = live.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = server_state.clone();
                let live = server_live.clone();
                let service = hyper::service::service_fn(move |request| {
                    let (state, live) = (state.clone(), live.clone());
                    async move { Ok::<_, Infallible>(handle(request, state, live).await) }
                });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TestDaemon {
            target: format!("http://{addr}/api/v1"),
            addr,
            state,
            live,
            server,
        }
    }

    /// Emits `count` events `{"type":"tick","data":{"n": id}}` with the next ids; returns
    /// the last id.
    pub fn emit(&self, count: usize) -> u64 {
        let mut state = self.state.lock().unwrap();
        let mut last = state.events.last().map_or(0, |(id, _)| *id);
        for _ in 0..count {
            last += 1;
            let data = json!({
                "type": "tick",
                "timestamp": "2026-01-01T00:00:00Z",
                "data": { "n": last, "session_id": format!("s{}", last % 3) },
            })
            .to_string();
            state.events.push((last, data.clone()));
            let _ = self.live.send((last, data));
        }
        last
    }

    /// How many requests reached `path` (e.g. `/api/v1/text`).
    pub fn hits(&self, path: &str) -> usize {
        *self.state.lock().unwrap().hits.get(path).unwrap_or(&0)
    }

    /// The distinct command ids of the requests for `path`, sorted.
    pub fn command_ids(&self, path: &str) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .command_ids
            .get(path)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Stops accepting (open connections end with the test).
    pub fn stop(&self) {
        self.server.abort();
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn full(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()).boxed())
        .unwrap()
}

fn json_response(status: u16, value: &Value) -> Response<Body> {
    full(status, "application/json", value.to_string())
}

async fn handle(
    request: Request<Incoming>,
    state: Arc<Mutex<State>>,
    live: broadcast::Sender<(u64, String)>,
) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    {
        let mut state = state.lock().unwrap();
        *state.hits.entry(path.clone()).or_default() += 1;
        if let Some(id) = request.headers().get("x-syncrelay-command-id") {
            let id = id.to_str().unwrap_or("(not text)").to_owned();
            state
                .command_ids
                .entry(path.clone())
                .or_default()
                .insert(id);
        }
    }
    let param = |name: &str| -> Option<u64> {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
    };
    match path.as_str() {
        p if p.starts_with("/api/v1/echo") => {
            let method = request.method().to_string();
            let headers: serde_json::Map<String, Value> = request
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        Value::String(v.to_str().unwrap_or("").to_owned()),
                    )
                })
                .collect();
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let (text, base64) = match std::str::from_utf8(&body) {
                Ok(text) => (Value::String(text.to_owned()), Value::Null),
                Err(_) => (
                    Value::Null,
                    Value::String(body.iter().map(|b| format!("{b:02x}")).collect()),
                ),
            };
            json_response(
                200,
                &json!({ "method": method, "path": path, "query": query, "headers": headers,
                         "body": text, "body_hex": base64 }),
            )
        }
        p if p.starts_with("/api/v1/status/") => {
            let code: u16 = p.rsplit('/').next().unwrap().parse().unwrap_or(500);
            json_response(code, &json!({ "code": code }))
        }
        "/api/v1/text" => full(200, "text/plain; charset=utf-8", "hello text"),
        "/api/v1/binary" => full(
            200,
            "application/octet-stream",
            vec![0u8, 159, 146, 150, 255],
        ),
        "/api/v1/headers" => Response::builder()
            .status(200)
            .header("x-daemon", "yes")
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{\"ok\":true}")).boxed())
            .unwrap(),
        "/api/v1/slow" => {
            tokio::time::sleep(Duration::from_millis(param("ms").unwrap_or(1000))).await;
            full(200, "text/plain", "slow")
        }
        "/api/v1/big" => {
            let total = param("bytes").unwrap_or(1 << 20) as usize;
            let pieces = (0..total.div_ceil(65536)).map(move |i| {
                let len = (total - i * 65536).min(65536);
                Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'a' + (i % 26) as u8; len])))
            });
            Response::builder()
                .status(200)
                .header("content-type", "application/octet-stream")
                .body(StreamBody::new(futures_util::stream::iter(pieces)).boxed())
                .unwrap()
        }
        p if p.starts_with("/api/v1/approvals/") && p.ends_with("/context/stream") => {
            // A large SSE context: `events` events of `size` bytes of data each, produced
            // lazily (deterministic content), optionally `delay_ms` apart.
            let events = param("events").unwrap_or(10);
            let size = param("size").unwrap_or(100) as usize;
            let delay = Duration::from_millis(param("delay_ms").unwrap_or(0));
            let stream = futures_util::stream::unfold(0u64, move |n| async move {
                if n >= events {
                    return None;
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let fill = (b'a' + (n % 26) as u8) as char;
                let frame = format!(
                    "id: {n}\nevent: context\ndata: {{\"n\":{n},\"text\":\"{}\"}}\n\n",
                    fill.to_string().repeat(size)
                );
                Some((Ok::<_, Infallible>(Frame::data(Bytes::from(frame))), n + 1))
            });
            Response::builder()
                .status(200)
                .header("content-type", "text/event-stream")
                .body(StreamBody::new(stream).boxed())
                .unwrap()
        }
        "/api/v1/stream/events" => {
            let after: u64 = request
                .headers()
                .get("last-event-id")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut live_rx = live.subscribe();
            let backlog: Vec<(u64, String)> = state
                .lock()
                .unwrap()
                .events
                .iter()
                .filter(|(id, _)| *id > after)
                .cloned()
                .collect();
            let (frames_tx, frames_rx) = tokio::sync::mpsc::channel::<Bytes>(64);
            tokio::spawn(async move {
                let mut last = after;
                for (id, data) in backlog {
                    last = id;
                    if frames_tx
                        .send(Bytes::from(format!("id: {id}\ndata: {data}\n\n")))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                while let Ok((id, data)) = live_rx.recv().await {
                    if id <= last {
                        continue;
                    }
                    last = id;
                    if frames_tx
                        .send(Bytes::from(format!("id: {id}\ndata: {data}\n\n")))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            let stream = tokio_stream::wrappers::ReceiverStream::new(frames_rx)
                .map(|bytes| Ok::<_, Infallible>(Frame::data(bytes)));
            Response::builder()
                .status(200)
                .header("content-type", "text/event-stream")
                .body(StreamBody::new(stream).boxed())
                .unwrap()
        }
        _ => json_response(
            404,
            &json!({ "error": { "code": "not_found", "message": path } }),
        ),
    }
}

use tokio_stream::StreamExt as _;
