//! `cargo bench --bench replay`: cache-and-serve replay throughput and memory. The relay
//! runs as its own release process; the bench plays the daemon (sync protocol by hand) and
//! uploads a 100 MB SSE context once. Then N clients (1, 10, 20) read it concurrently from
//! the relay, and the same bytes from a static file server (Python's `http.server`,
//! threaded) in the same run. Reported: MB/s delivered to all clients together, and the
//! server's peak RSS while serving, sampled from /proc every 10 ms. Results also go to
//! `target/bench-replay.json`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const EVENTS: usize = 100_000;
const EVENT_DATA_BYTES: usize = 1_000;
const EVENTS_PER_CHUNK: usize = 60;
const CLIENT_COUNTS: [usize; 3] = [1, 10, 20];

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

fn spawn_relay(data_dir: &Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_syncrelay"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .arg("--config")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the relay");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .trim_start_matches("syncrelay listening on ")
        .to_owned();
    Server { child, url }
}

fn spawn_static(dir: &Path) -> Server {
    let mut child = Command::new("python3")
        .args([
            "-u",
            "-m",
            "http.server",
            "0",
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 for the static file server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
    let port = line
        .split_whitespace()
        .nth(5)
        .expect("python's banner")
        .to_owned();
    Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

/// The daemon's side of the context: SSE events, `EVENTS_PER_CHUNK` per chunk.
fn context_chunks() -> Vec<String> {
    let fill = "x".repeat(EVENT_DATA_BYTES);
    (0..EVENTS)
        .collect::<Vec<_>>()
        .chunks(EVENTS_PER_CHUNK)
        .map(|events| {
            events
                .iter()
                .map(|n| format!("event: context\ndata: {{\"n\":{n},\"text\":\"{fill}\"}}\n\n"))
                .collect()
        })
        .collect()
}

async fn post(http: &reqwest::Client, url: &str, token: &str, body: &Value) -> Value {
    http.post(url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Reads `url` with `clients` concurrent readers; returns (seconds, bytes, peak RSS KiB).
async fn fan_out(url: &str, token: Option<&str>, clients: usize, pid: u32) -> (f64, u64, u64) {
    let total = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        })
    };
    let started = Instant::now();
    let readers: Vec<_> = (0..clients)
        .map(|_| {
            let (url, token, total) = (url.to_owned(), token.map(str::to_owned), total.clone());
            tokio::spawn(async move {
                let mut request = reqwest::Client::new().get(&url);
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                let mut response = request.send().await.unwrap();
                assert!(response.status().is_success());
                while let Some(chunk) = response.chunk().await.unwrap() {
                    total.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for reader in readers {
        reader.await.unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    (
        seconds,
        total.load(Ordering::Relaxed),
        sampler.join().unwrap(),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let data_dir = tempfile::tempdir().unwrap();
    let static_dir = tempfile::tempdir().unwrap();
    let relay = spawn_relay(data_dir.path());
    let pid = relay.child.id();
    let admin = std::fs::read_to_string(data_dir.path().join("admin.key")).unwrap();
    let http = reqwest::Client::new();
    let key = |body: Value| {
        let (http, url, admin) = (http.clone(), relay.url.clone(), admin.trim().to_owned());
        async move {
            post(&http, &format!("{url}/admin/keys"), &admin, &body).await["token"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let daemon_key = key(json!({ "role": "daemon", "daemon": "d" })).await;
    let client_key = key(json!({ "role": "client", "scope": ["d"] })).await;
    let sync = |route: &str| format!("{}/sync/{route}", relay.url);
    let connect = post(
        &http,
        &sync("connect"),
        &daemon_key,
        &json!({ "daemon_id": "d" }),
    )
    .await;
    let connection = connect["connection_id"].clone();
    let context_url = format!(
        "{}/api/v1/daemons/d/approvals/bench/context/stream",
        relay.url
    );
    let rss_idle = rss_kib(pid);

    // Upload: a client asks, the bench-daemon answers the stream command with chunks.
    let first_read = tokio::spawn({
        let (url, token) = (context_url.clone(), client_key.clone());
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
        }
    });
    let polled = post(
        &http,
        &sync("poll"),
        &daemon_key,
        &json!({ "daemon_id": "d", "connection_id": connection, "wait_for_commands": true, "timeout": 10 }),
    )
    .await;
    let command_id = polled["commands"][0]["id"]
        .as_str()
        .expect("a stream command")
        .to_owned();
    let chunks = context_chunks();
    let upload_bytes: usize = chunks.iter().map(String::len).sum();
    let upload_started = Instant::now();
    let last = chunks.len() - 1;
    for (index, data) in chunks.into_iter().enumerate() {
        let mut entry = json!({ "command_id": command_id, "chunk": index, "data": data, "complete": index == last });
        if index == 0 {
            entry["status"] = json!(200);
            entry["headers"] = json!({ "content-type": "text/event-stream" });
        }
        let answer = post(
            &http,
            &sync("results"),
            &daemon_key,
            &json!({ "daemon_id": "d", "results": [entry] }),
        )
        .await;
        assert_eq!(answer["accepted"][0], command_id.as_str());
    }
    let upload_seconds = upload_started.elapsed().as_secs_f64();
    let framed = first_read.await.unwrap();
    std::fs::write(static_dir.path().join("context.sse"), &framed).unwrap();
    let rss_after_upload = rss_kib(pid);

    let static_server = spawn_static(static_dir.path());
    let static_url = format!("{}/context.sse", static_server.url);
    let static_pid = static_server.child.id();
    let static_idle = rss_kib(static_pid);
    let mb = |bytes: u64| bytes as f64 / 1e6;
    println!(
        "\nreplay of a {:.1} MB SSE context ({} events), release build, loopback, 2 cores",
        mb(framed.len() as u64),
        EVENTS
    );
    println!(
        "upload (daemon → relay, 1 chunk per request, each committed): {:.1} MB/s; relay RSS idle {} MiB, after upload {} MiB",
        upload_bytes as f64 / 1e6 / upload_seconds,
        rss_idle / 1024,
        rss_after_upload / 1024
    );
    println!(
        "\n{:<8} {:>16} {:>16} {:>8} {:>18} {:>18}",
        "clients", "relay MB/s", "static MB/s", "ratio", "relay peak RSS", "static peak RSS"
    );
    let mut rows = Vec::new();
    for clients in CLIENT_COUNTS {
        let (relay_s, relay_bytes, relay_peak) =
            fan_out(&context_url, Some(&client_key), clients, pid).await;
        let (static_s, static_bytes, static_peak) =
            fan_out(&static_url, None, clients, static_pid).await;
        assert_eq!(relay_bytes, static_bytes, "the same bytes from both");
        let relay_rate = mb(relay_bytes) / relay_s;
        let static_rate = mb(static_bytes) / static_s;
        println!(
            "{:<8} {:>16.0} {:>16.0} {:>8.2} {:>14} MiB {:>14} MiB",
            clients,
            relay_rate,
            static_rate,
            relay_rate / static_rate,
            relay_peak / 1024,
            static_peak / 1024
        );
        rows.push(json!({
            "clients": clients, "relay_mb_s": relay_rate, "static_mb_s": static_rate,
            "relay_peak_rss_kib": relay_peak, "static_peak_rss_kib": static_peak,
        }));
    }
    println!("(static idle RSS {} MiB)", static_idle / 1024);
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-replay.json");
    let report = json!({
        "context_bytes": framed.len(), "upload_mb_s": upload_bytes as f64 / 1e6 / upload_seconds,
        "relay_rss_idle_kib": rss_idle, "relay_rss_after_upload_kib": rss_after_upload, "rows": rows,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("written to {}", out.display());
}
