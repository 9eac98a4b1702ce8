//! Helpers shared by the benches: latency percentiles and keys made through a relay's
//! admin API.
#![allow(dead_code)]

use std::time::Duration;

use serde_json::Value;

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Creates a key (`body` as for `POST /admin/keys`) and returns its token.
pub async fn create_key(http: &reqwest::Client, url: &str, admin: &str, body: Value) -> String {
    let created: Value = http
        .post(format!("{url}/admin/keys"))
        .bearer_auth(admin)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["token"].as_str().unwrap().to_owned()
}

/// One long poll of `daemon_id` that waits for commands (up to `timeout` s); its answer,
/// or `None` once the relay is gone.
pub async fn wait_poll(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    daemon_id: &str,
    connection_id: &Value,
    timeout: u64,
) -> Option<Value> {
    let poll = serde_json::json!({ "daemon_id": daemon_id, "connection_id": connection_id,
                                   "wait_for_commands": true, "timeout": timeout });
    let response = http
        .post(format!("{url}/sync/poll"))
        .bearer_auth(key)
        .json(&poll)
        .send()
        .await
        .ok()?;
    response.json::<Value>().await.ok()
}

/// `POST /sync/connect` as `daemon_id`: the relay's answer (`connection_id`, …).
pub async fn sync_connect(http: &reqwest::Client, url: &str, key: &str, daemon_id: &str) -> Value {
    http.post(format!("{url}/sync/connect"))
        .bearer_auth(key)
        .json(&serde_json::json!({ "daemon_id": daemon_id }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A daemon driven by hand over one HTTP/2 connection to `url`: connects as `daemon_id`,
/// keeps a poll always waiting, reports each command's id with the moment its poll's
/// answer arrived, and answers it (204). Ends when the relay goes or the task is aborted.
pub async fn waiting_daemon(
    url: &str,
    key: &str,
    daemon_id: &str,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<(String, std::time::Instant)>,
) {
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let connect = sync_connect(&h2, url, key, daemon_id).await;
    let (woke_tx, woke_rx) = tokio::sync::mpsc::unbounded_channel();
    let (url, key, daemon_id) = (url.to_owned(), key.to_owned(), daemon_id.to_owned());
    let connection_id = connect["connection_id"].clone();
    let task = tokio::spawn(async move {
        while let Some(body) = wait_poll(&h2, &url, &key, &daemon_id, &connection_id, 30).await {
            let arrived = std::time::Instant::now();
            let commands = body["commands"].as_array().cloned().unwrap_or_default();
            let results: Vec<Value> = commands
                .iter()
                .map(|c| {
                    let _ = woke_tx.send((c["id"].as_str().unwrap().to_owned(), arrived));
                    serde_json::json!({ "command_id": c["id"], "result": { "status": 204 } })
                })
                .collect();
            if !results.is_empty() {
                let _ = h2
                    .post(format!("{url}/sync/results"))
                    .bearer_auth(&key)
                    .json(&serde_json::json!({ "daemon_id": daemon_id, "results": results }))
                    .send()
                    .await;
            }
        }
    });
    (task, woke_rx)
}

/// A TCP link with a fixed propagation delay each way, on loopback: every piece read
/// is written out `delay` after it arrived, in order, without holding back the pieces
/// behind it (a delay line, not a stop-and-wait pipe), so throughput is unchanged and
/// only latency grows. Its address stands for `upstream`'s.
pub async fn delay_link(
    upstream: std::net::SocketAddr,
    delay: Duration,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                tokio::join!(
                    delay_line(in_read, out_write, delay),
                    delay_line(out_read, in_write, delay)
                );
            });
        }
    });
    (addr, task)
}

async fn delay_line(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buffer).await {
            if n == 0
                || tx
                    .send((tokio::time::Instant::now() + delay, buffer[..n].to_vec()))
                    .is_err()
            {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
