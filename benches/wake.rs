//! `cargo bench --bench wake`: how fast a waiting long poll hands out a newly queued
//! command. A daemon keeps one poll waiting on an HTTP/2 connection; a client queues a
//! durable write (`Prefer: respond-async`). Reported side by side, measured in the same
//! run: the plain round trip of `GET /healthz` (baseline), the durable write's round trip
//! (POST → 202, including the group-commit flush), and the wake latency (POST sent → the
//! waiting poll's answer received). Results also go to `target/bench-wake.json`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{create_key, micros, percentile, waiting_daemon};
use serde_json::{json, Value};
use syncrelay::config::Config;
use syncrelay::relay::{Process, Relay};

const ITERATIONS: usize = 500;
const WARMUP: usize = 50;

fn summary(name: &str, mut samples: Vec<Duration>) -> Value {
    samples.sort();
    let row = json!({
        "name": name,
        "samples": samples.len(),
        "p50_us": micros(percentile(&samples, 0.50)),
        "p99_us": micros(percentile(&samples, 0.99)),
        "max_us": micros(*samples.last().unwrap()),
    });
    println!(
        "{:<34} {:>9.0} {:>9.0} {:>9.0}",
        name,
        row["p50_us"].as_f64().unwrap(),
        row["p99_us"].as_f64().unwrap(),
        row["max_us"].as_f64().unwrap()
    );
    row
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[server]\ndata_dir = {:?}\nlisten = \"127.0.0.1:0\"\n",
        dir.path().display().to_string()
    );
    let config = Config::from_toml(&toml, Path::new("bench.toml")).unwrap();
    let relay = Relay::start(config, Process::EMBEDDED).await.unwrap();
    let store = relay.store().clone();
    let admin = std::fs::read_to_string(dir.path().join("admin.key")).unwrap();
    let url = relay.url();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(relay.serve(async {
        let _ = stop_rx.await;
    }));

    let http = reqwest::Client::new();
    let daemon_key = create_key(
        &http,
        &url,
        admin.trim(),
        json!({ "role": "daemon", "daemon": "d" }),
    )
    .await;
    let client_key = create_key(
        &http,
        &url,
        admin.trim(),
        json!({ "role": "client", "scope": ["d"] }),
    )
    .await;

    // The daemon: one HTTP/2 connection, a poll always waiting; reports when each command
    // arrives, then answers it.
    let (daemon, mut woke_rx) = waiting_daemon(&url, &daemon_key, "d").await;

    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let mut healthz = Vec::new();
    let mut write_ack = Vec::new();
    let mut wake = Vec::new();
    for i in 0..WARMUP + ITERATIONS {
        // Give the daemon's next poll time to be waiting again.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let started = Instant::now();
        let response = client.get(format!("{url}/healthz")).send().await.unwrap();
        assert!(response.status().is_success());
        let healthz_rtt = started.elapsed();

        let sent = Instant::now();
        let response = client
            .post(format!("{url}/api/v1/daemons/d/jobs"))
            .bearer_auth(&client_key)
            .header("prefer", "respond-async")
            .json(&json!({ "i": i }))
            .send()
            .await
            .unwrap();
        let acked = sent.elapsed();
        assert_eq!(response.status(), 202);
        let id = response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let (woke_id, arrived) = tokio::time::timeout(Duration::from_secs(10), woke_rx.recv())
            .await
            .expect("the waiting poll woke")
            .unwrap();
        assert_eq!(woke_id, id);
        if i >= WARMUP {
            healthz.push(healthz_rtt);
            write_ack.push(acked);
            wake.push(arrived.duration_since(sent));
        }
    }

    println!("\nwake latency, {ITERATIONS} samples, release build, loopback, HTTP/2");
    println!(
        "{:<34} {:>9} {:>9} {:>9}",
        "measure (µs)", "p50", "p99", "max"
    );
    let rows = vec![
        summary("GET /healthz round trip (baseline)", healthz),
        summary("durable write POST → 202", write_ack),
        summary("POST sent → waiting poll answered", wake),
    ];
    let p50 = |i: usize| rows[i]["p50_us"].as_f64().unwrap();
    println!(
        "\nratios of p50: wake / healthz = {:.2}, wake / durable write = {:.2}",
        p50(2) / p50(0),
        p50(2) / p50(1)
    );
    let stats = store.commit_stats();
    println!(
        "group commit: {} commits in {} flushes, mean flush {:.0} µs",
        stats.commits,
        stats.flushes,
        stats.flush_micros as f64 / stats.flushes.max(1) as f64
    );
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-wake.json");
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&json!({ "rows": rows })).unwrap(),
    )
    .unwrap();
    println!("written to {}", out.display());

    daemon.abort();
    let _ = stop_tx.send(());
    relay.await.unwrap().unwrap();
}
