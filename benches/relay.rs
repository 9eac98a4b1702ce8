//! `cargo bench --bench relay`: the relay against a direct call and a TCP tunnel, measured
//! side by side in one run on loopback, release build. The relay and its agent run as real
//! processes (`syncrelay serve`, `syncrelay agent`), like rathole's server and client; the
//! local HTTP server and the load generator run in this process.
//!
//! Sections (every one bounded in time):
//! - mirrored GET: p50/p99 at concurrency 1 and requests/s at concurrency 64, direct to
//!   the local server (baseline), through the relay with the agent on its `/sync/stream`,
//!   through rathole when installed, and through the relay with an agent polling;
//! - link: the same GET at concurrency 16 with 20 ms of delay each way between the
//!   daemon's side and the relay's (agent ↔ relay; rathole's client ↔ server);
//! - durable writes: mirrored POSTs answered 202 (flushed) per second at concurrency 64,
//!   and writes per flush, against the anchor of a durable PostgreSQL `INSERT` of a
//!   command-sized row at concurrency 64 on a throwaway cluster (when PostgreSQL is
//!   installed);
//! - idle: p50/p99 from queueing a command to its `commands` line reaching the daemon,
//!   with 1,000 and 10,000 idle daemons on one h2c connection and stream each (and 1,000
//!   over TLS), and relay RSS per idle daemon;
//! - change log: append and replay rate of 1,000,000 entries, restart time on that store,
//!   data-dir bytes per stored byte;
//! - fsync cost: durable writes at c=64 and change-log appends with sled's flush alone
//!   (a hidden switch only this bench sets) against the shipped flush + `fdatasync`,
//!   alternated in one run;
//! - cluster: three nodes on one throwaway PostgreSQL and one `nats-server` (when both are
//!   installed): the mirrored GET through the daemon's node against another node's (read
//!   routed over NATS), the wake latency of a write queued on the poll's node against
//!   another node's beside one NATS round trip, durable writes to one node against the
//!   same load spread over three.
//!
//! `SYNCRELAY_BENCH_QUICK=1` shrinks every section (a smoke run). Results also go to
//! `target/bench-relay.json`; BENCHMARKS.md explains the method and the limits.

#[path = "../tests/common/certs.rs"]
#[allow(dead_code)]
mod certs;
mod common;
#[path = "../tests/common/nats.rs"]
mod nats;
#[path = "../tests/common/postgres.rs"]
mod postgres;

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{create_key, micros, percentile};
use http_body_util::Full;
use serde_json::{json, Value};

fn quick() -> bool {
    std::env::var_os("SYNCRELAY_BENCH_QUICK").is_some()
}

/// Whether `section` runs: `SYNCRELAY_BENCH_ONLY` names a comma-separated subset of
/// `get`, `writes`, `postgres` (the relay on PostgreSQL, with `get` and `writes` for its
/// rows, and the INSERT anchor), `fsync`, `changes`, `cluster` and `idle` (all when unset),
/// for profiling one section.
fn runs(section: &str) -> bool {
    std::env::var("SYNCRELAY_BENCH_ONLY")
        .map(|only| only.split(',').any(|name| name.trim() == section))
        .unwrap_or(true)
}

/// How long each throughput measurement runs: `SYNCRELAY_BENCH_SECONDS`, else 5 s (1 s
/// quick).
fn load_duration() -> Duration {
    let default = if quick() { 1 } else { 5 };
    let seconds = std::env::var("SYNCRELAY_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    Duration::from_secs(seconds)
}

/// The daemon stand-in: answers every request with a small JSON body, as hld's
/// `GET /api/v1/sessions` would for an empty list.
async fn local_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request| async {
                    let mut response = hyper::Response::new(Full::new(Bytes::from_static(
                        br#"{"data":[],"ok":true}"#,
                    )));
                    response.headers_mut().insert(
                        "content-type",
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A child process that is killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Lifts this process's open-files limit to its hard limit (the relay, spawned after,
/// inherits it): 10,000 daemons on connections of their own need twice that many.
fn raise_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

const RELAY_CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
[commands]
queue_limit = 100000000
[rate_limit]
per_key_per_second = 0
per_address_per_second = 0
[limits]
max_connections = 30000
max_connections_per_address = 30000
"#;

/// Starts `syncrelay serve` on `data_dir`; returns it, its URL and the time to its
/// listening line.
fn spawn_relay(data_dir: &Path) -> (Process, String, Duration) {
    spawn_relay_with(data_dir, Durability::Fdatasync)
}

/// How the relay makes a group commit durable, for the `fsync` section's comparison.
#[derive(Clone, Copy, PartialEq)]
enum Durability {
    /// As shipped: sled's flush, then `fdatasync`.
    Fdatasync,
    /// sled's flush alone (`sync_file_range`), as before issue 17: not durable against a
    /// power cut. Only this bench asks for it.
    FlushOnly,
}

fn spawn_relay_with(data_dir: &Path, sync: Durability) -> (Process, String, Duration) {
    spawn_relay_on(data_dir, sync, "")
}

/// [`spawn_relay_with`], with a `[store]` table (empty: sled in `data_dir`).
fn spawn_relay_on(data_dir: &Path, sync: Durability, store: &str) -> (Process, String, Duration) {
    let config = data_dir.with_extension("toml");
    std::fs::write(&config, format!("{RELAY_CONFIG}{store}")).unwrap();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_syncrelay"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "error")
        .envs(
            (sync == Durability::FlushOnly)
                .then_some((syncrelay::store::UNSYNCED_FOR_BENCH_ENV, "1")),
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("syncrelay listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (Process(child), url, started.elapsed())
}

/// A relay on `data_dir` with a daemon key for `daemon_id` and a client key for every
/// daemon: (process, URL, admin token, daemon key, client key).
async fn relay_with_keys(
    data_dir: &Path,
    daemon_id: &str,
) -> (Process, String, String, String, String) {
    relay_with_keys_synced(data_dir, daemon_id, Durability::Fdatasync).await
}

async fn relay_with_keys_synced(
    data_dir: &Path,
    daemon_id: &str,
    sync: Durability,
) -> (Process, String, String, String, String) {
    relay_with_keys_on(data_dir, daemon_id, sync, "").await
}

async fn relay_with_keys_on(
    data_dir: &Path,
    daemon_id: &str,
    sync: Durability,
    store: &str,
) -> (Process, String, String, String, String) {
    let (relay, url, _) = spawn_relay_on(data_dir, sync, store);
    let admin = std::fs::read_to_string(data_dir.join("admin.key"))
        .unwrap()
        .trim()
        .to_owned();
    let http = reqwest::Client::new();
    let daemon = json!({ "role": "daemon", "daemon": daemon_id });
    let daemon_key = create_key(&http, &url, &admin, daemon).await;
    let client = json!({ "role": "client", "scope": ["*"] });
    let client_key = create_key(&http, &url, &admin, client).await;
    (relay, url, admin, daemon_key, client_key)
}

/// Sequential GETs: the latency samples, after a warm-up.
async fn latency(http: &reqwest::Client, url: &str, key: Option<&str>, n: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let mut request = http.get(url);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let started = Instant::now();
        let response = request.send().await.unwrap();
        assert!(
            response.status().is_success(),
            "{url}: {}",
            response.status()
        );
        response.bytes().await.unwrap();
        if i >= n / 10 {
            samples.push(started.elapsed());
        }
    }
    samples.sort();
    samples
}

/// Requests per second with `concurrency` workers for `duration`; `request` builds one.
async fn throughput<F>(concurrency: usize, duration: Duration, request: F) -> f64
where
    F: Fn() -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let request = Arc::new(request);
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (request, done) = (request.clone(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let response = request().send().await.unwrap();
                    assert!(response.status().is_success(), "{}", response.status());
                    response.bytes().await.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// One mirrored-GET row: p50/p99 at concurrency 1, requests/s at 64.
async fn get_row(name: &str, url: &str, key: Option<&str>, rows: &mut Vec<Value>) {
    let n = if quick() { 200 } else { 2_000 };
    let duration = load_duration();
    let http = reqwest::Client::new();
    let samples = latency(&http, url, key, n).await;
    let (url_owned, key_owned) = (url.to_owned(), key.map(str::to_owned));
    let load = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let rps = throughput(64, duration, move || {
        let request = load.get(&url_owned);
        match &key_owned {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    })
    .await;
    let row = json!({
        "path": name,
        "p50_us": micros(percentile(&samples, 0.5)),
        "p99_us": micros(percentile(&samples, 0.99)),
        "rps_c64": rps,
    });
    println!(
        "{:<28} {:>10.0} {:>10.0} {:>12.0}",
        name,
        micros(percentile(&samples, 0.5)),
        micros(percentile(&samples, 0.99)),
        rps
    );
    rows.push(row);
}

/// rathole's server and client forwarding a local port to `target`, or why not; with
/// `link`, the client reaches the server through a delay line of that delay each way.
async fn start_rathole(
    dir: &Path,
    target: std::net::SocketAddr,
    link: Option<Duration>,
) -> Result<(Process, Process, String), String> {
    let binary = std::env::var_os("RATHOLE")
        .map(PathBuf::from)
        .or_else(|| {
            let home = std::env::var_os("HOME")?;
            let path = Path::new(&home).join(".cargo/bin/rathole");
            path.exists().then_some(path)
        })
        .ok_or("rathole not installed (cargo install rathole)")?;
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (control, service) = (free_port(), free_port());
    let remote = match link {
        Some(delay) => {
            let upstream = format!("127.0.0.1:{control}").parse().unwrap();
            // The link's task lives as long as this process: a few idle sockets.
            common::delay_link(upstream, delay).await.0.port()
        }
        None => control,
    };
    let server = dir.join(format!("rathole-server-{service}.toml"));
    std::fs::write(
        &server,
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{control}\"\n[server.services.svc]\ntoken = \"bench\"\nbind_addr = \"127.0.0.1:{service}\"\n"
        ),
    )
    .unwrap();
    let client = dir.join(format!("rathole-client-{service}.toml"));
    std::fs::write(
        &client,
        format!(
            "[client]\nremote_addr = \"127.0.0.1:{remote}\"\n[client.services.svc]\ntoken = \"bench\"\nlocal_addr = \"{target}\"\n"
        ),
    )
    .unwrap();
    let spawn = |config: &Path| {
        Command::new(&binary)
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Process)
            .map_err(|err| format!("{}: {err}", binary.display()))
    };
    let server = spawn(&server)?;
    let client = spawn(&client)?;
    Ok((server, client, format!("http://127.0.0.1:{service}")))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let target = local_server().await;
    let (relay, url, admin, daemon_key, client_key) =
        relay_with_keys(&dir.path().join("data"), "d").await;
    let agent = start_agent(
        &url,
        &daemon_key,
        &client_key,
        target,
        &dir.path().join("agent"),
    )
    .await;
    let poll_key = create_key(
        &reqwest::Client::new(),
        &url,
        &admin,
        json!({ "role": "daemon", "daemon": "p" }),
    )
    .await;
    let poller = start_agent_as(
        &url,
        "p",
        "poll",
        &poll_key,
        &client_key,
        target,
        &dir.path().join("agent-poll"),
    )
    .await;

    println!("\nmirrored GET, loopback, release build, 2 cores");
    println!(
        "{:<28} {:>10} {:>10} {:>12}",
        "path", "p50 µs", "p99 µs", "req/s c=64"
    );
    let mut gets = Vec::new();
    let mut rathole = None;
    if runs("get") {
        rathole = mirrored_gets(&url, &client_key, target, dir.path(), &mut gets).await;
    }
    let mut writes = Value::Null;
    if runs("writes") {
        writes = durable_writes(&url, &admin, &client_key).await;
    }
    let mut link = Value::Null;
    if runs("link") {
        link = delayed_link(&url, &admin, &client_key, target, dir.path()).await;
    }
    let relay_rss_kib = relay.rss_kib();
    drop((relay, agent, poller));
    let mut on_postgres = Value::Null;
    if runs("postgres") {
        on_postgres = postgres_rows(
            dir.path(),
            target,
            writes["per_second_c64"].as_f64(),
            gets.get(1).and_then(|row| row["rps_c64"].as_f64()),
        )
        .await;
    }
    let fsync = if runs("fsync") {
        fsync_cost(dir.path()).await
    } else {
        Value::Null
    };
    let changelog = if runs("changes") {
        change_log(&dir.path().join("changes-data")).await
    } else {
        Value::Null
    };
    let cluster = if runs("cluster") {
        cluster_rows(dir.path(), target).await
    } else {
        Value::Null
    };
    let mut idle = Vec::new();
    if runs("idle") {
        raise_open_files();
        let (small, large) = if quick() { (200, 200) } else { (1_000, 10_000) };
        for (run, (n, tls)) in [(small, false), (large, false), (small, true)]
            .into_iter()
            .enumerate()
        {
            let name = format!("idle-{run}-{n}-{}", if tls { "tls" } else { "h2c" });
            idle.push(idle_daemons(&dir.path().join(name), n, tls).await);
        }
    }

    let json = json!({
        "change_log": changelog,
        "idle_daemons": idle,
        "mirrored_get": gets,
        "mirrored_get_20ms_link_c16": link,
        "rathole_skipped": rathole,
        "relay_rss_kib_after_gets_and_writes": relay_rss_kib,
        "durable_writes": writes,
        "postgres": on_postgres,
        "fsync_cost": fsync,
        "cluster": cluster,
    });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-relay.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("written to {}", out.display());
}

/// `syncrelay agent` serving `target` as daemon `d` of the relay at `url`, online, on
/// the stream.
async fn start_agent(
    url: &str,
    daemon_key: &str,
    client_key: &str,
    target: std::net::SocketAddr,
    dir: &Path,
) -> Process {
    start_agent_as(url, "d", "stream", daemon_key, client_key, target, dir).await
}

/// `syncrelay agent` serving `target` as `daemon_id`, syncing by `sync` (`stream` or
/// `poll`), online.
async fn start_agent_as(
    url: &str,
    daemon_id: &str,
    sync: &str,
    daemon_key: &str,
    client_key: &str,
    target: std::net::SocketAddr,
    dir: &Path,
) -> Process {
    std::fs::create_dir_all(dir).unwrap();
    let agent_config = dir.join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "[agent]\nrelay = {url:?}\ndaemon_id = {daemon_id:?}\nsync = {sync:?}\nkey = {daemon_key:?}\ntarget = \"http://{target}/api/v1\"\nevents = \"\"\nstate_dir = {:?}\nconcurrency = 64\n",
            dir.join("state").display().to_string()
        ),
    )
    .unwrap();
    let agent = Process(
        Command::new(env!("CARGO_BIN_EXE_syncrelay"))
            .arg("agent")
            .arg("--config")
            .arg(&agent_config)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let view: Value = http
            .get(format!("{url}/api/v1/daemons/{daemon_id}"))
            .bearer_auth(client_key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap_or_default();
        if view["online"] == true {
            return agent;
        }
        assert!(Instant::now() < deadline, "the agent never came online");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The relay on PostgreSQL (a throwaway cluster on this machine): its mirrored-GET row and
/// durable writes at c=64, then the anchor (a raw durable `INSERT`) on the same cluster;
/// each against the sled figures measured earlier in this run. Skipped, with a note, where
/// PostgreSQL is not installed.
async fn postgres_rows(
    dir: &Path,
    target: std::net::SocketAddr,
    sled_writes: Option<f64>,
    sled_gets: Option<f64>,
) -> Value {
    let Some(cluster) = postgres::PgCluster::start("postgres rows") else {
        return json!({ "skipped": "PostgreSQL not installed" });
    };
    let (client, connection) =
        tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls)
            .await
            .expect("the throwaway cluster accepts connections");
    let connection = tokio::spawn(connection);
    client.batch_execute("CREATE DATABASE relay").await.unwrap();
    drop(client);
    let _ = connection.await;
    let store = format!(
        "[store]\nbackend = \"postgres\"\nurl = {:?}\npool_size = 64\n",
        cluster.url("relay")
    );
    let (relay, url, admin, daemon_key, client_key) =
        relay_with_keys_on(&dir.join("pg-data"), "d", Durability::Fdatasync, &store).await;
    let mut gets = Vec::new();
    let mut writes = Value::Null;
    if runs("get") {
        let agent = start_agent(
            &url,
            &daemon_key,
            &client_key,
            target,
            &dir.join("pg-agent"),
        )
        .await;
        get_row(
            "relay on PostgreSQL",
            &format!("{url}/api/v1/daemons/d/sessions"),
            Some(&client_key),
            &mut gets,
        )
        .await;
        drop(agent);
        if let (Some(sled), Some(pg)) = (sled_gets, gets[0]["rps_c64"].as_f64()) {
            println!(
                "mirrored GET throughput, PostgreSQL / sled: {:.2}×",
                pg / sled
            );
        }
    }
    if runs("writes") {
        writes = durable_writes(&url, &admin, &client_key).await;
    }
    drop(relay);
    let anchor = if runs("writes") {
        postgres_anchor(&cluster).await
    } else {
        Value::Null
    };
    let pg_writes = writes["per_second_c64"].as_f64();
    let anchor_rate = anchor["per_second_c64"].as_f64();
    let ratio = |relay: Option<f64>| relay.zip(anchor_rate).map(|(r, a)| r / a);
    if let Some(r) = ratio(pg_writes) {
        println!("durable writes on PostgreSQL / anchor: {r:.2}× (target ≥ 0.5)");
    }
    if let Some(r) = ratio(sled_writes) {
        println!("durable writes on sled / anchor: {r:.2}×");
    }
    json!({
        "mirrored_get": gets,
        "durable_writes": writes,
        "insert_anchor": anchor,
        "writes_ratio_to_anchor": ratio(pg_writes),
        "sled_writes_ratio_to_anchor": ratio(sled_writes),
    })
}

/// The cluster (DESIGN.md, "Cluster"): three relay nodes on one throwaway PostgreSQL
/// cluster and one `nats-server`, each figure beside its counterpart in this run:
/// - mirrored GET through node a, which holds the daemon's agent, and through node b, whose
///   reads go to node a over NATS (p50 at c=1, requests/s at c=64); beside them one NATS
///   round trip to node a (a probe on `sr.read.<daemon>`, as nodes send; the target: the
///   cross-node GET p50 within one such round trip of the same-node one);
/// - wake: a daemon driven by hand keeps a poll waiting on node a; durable writes queued on
///   node a and on node b, alternately: POST sent → the poll's answer received; beside it,
///   one NATS request-reply round trip on the same server (the target: the cross-node wake
///   p50 within one round trip of the same-node one);
/// - durable writes at c=64: all to node a, then the same load spread over a, b and c.
async fn cluster_rows(dir: &Path, target: std::net::SocketAddr) -> Value {
    let Some(pg) = postgres::PgCluster::start("cluster rows") else {
        return json!({ "skipped": "PostgreSQL not installed" });
    };
    let Some(nats) = nats::NatsCluster::start("cluster rows", 1).await else {
        return json!({ "skipped": "nats-server not installed" });
    };
    let database = postgres::create_database(&pg).await;
    let store = format!(
        "[store]\nbackend = \"postgres\"\nurl = {:?}\npool_size = 32\n",
        pg.url(&database)
    );
    let mut nodes = Vec::new();
    let mut admin = String::new();
    for node in ["a", "b", "c"] {
        let data = dir.join(format!("cluster-{node}"));
        std::fs::create_dir_all(&data).unwrap();
        // The first node makes the admin key; the others find the keys in the database.
        if !admin.is_empty() {
            std::fs::write(data.join("admin.key"), &admin).unwrap();
        }
        let toml = format!(
            "{store}[cluster]\nnode = \"{node}\"\nnats_urls = [\"{}\"]\n",
            nats.url(0)
        );
        let (process, url, _) = spawn_relay_on(&data, Durability::Fdatasync, &toml);
        if admin.is_empty() {
            admin = std::fs::read_to_string(data.join("admin.key"))
                .unwrap()
                .trim()
                .to_owned();
        }
        nodes.push((process, url));
    }
    let urls: Vec<String> = nodes.iter().map(|(_, url)| url.clone()).collect();
    let http = reqwest::Client::new();
    for url in &urls {
        let deadline = Instant::now() + Duration::from_secs(15);
        while metric(&http, url, "syncrelay_cluster_nats_connected").await < 1.0 {
            assert!(Instant::now() < deadline, "{url} never reached NATS");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let daemon = json!({ "role": "daemon", "daemon": "d" });
    let daemon_key = create_key(&http, &urls[0], &admin, daemon).await;
    let client = json!({ "role": "client", "scope": ["*"] });
    let client_key = create_key(&http, &urls[0], &admin, client).await;

    println!("\ncluster: 3 nodes, one PostgreSQL, one nats-server, the agent on node a");
    let agent = start_agent(
        &urls[0],
        &daemon_key,
        &client_key,
        target,
        &dir.join("cluster-agent"),
    )
    .await;
    let mut gets = Vec::new();
    for (name, url) in [
        ("GET via the daemon's node", &urls[0]),
        ("GET via another node (NATS)", &urls[1]),
    ] {
        let path = format!("{url}/api/v1/daemons/d/sessions");
        get_row(name, &path, Some(&client_key), &mut gets).await;
    }
    let holder_trip = holder_round_trip(&nats.url(0), "d").await;
    drop(agent);
    let ratio = |key: &str| {
        gets[1][key]
            .as_f64()
            .zip(gets[0][key].as_f64())
            .map(|(cross, same)| cross / same)
    };
    println!(
        "cross-node / same-node GET: p50 {:.2}×, req/s {:.2}×",
        ratio("p50_us").unwrap_or(f64::NAN),
        ratio("rps_c64").unwrap_or(f64::NAN)
    );
    let p50 = |row: &Value| row["p50_us"].as_f64().unwrap_or(f64::NAN);
    let read_extra = p50(&gets[1]) - p50(&gets[0]);
    println!(
        "cross-node GET p50 − same-node: {read_extra:.0} µs = {:.2} round trips to the holding \
         node (target ≤ 1)",
        read_extra / holder_trip
    );

    let wake = cluster_wake(&urls, &admin, &client_key, &nats.url(0)).await;

    let one = durable_writes(&urls[0], &admin, &client_key).await;
    let load = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let next = Arc::new(AtomicU64::new(0));
    let (spread_urls, spread_key) = (urls.clone(), client_key.clone());
    let spread = throughput(64, load_duration(), move || {
        let node = next.fetch_add(1, Ordering::Relaxed) as usize % spread_urls.len();
        load.post(format!("{}/api/v1/daemons/w/jobs", spread_urls[node]))
            .bearer_auth(&spread_key)
            .header("prefer", "respond-async")
            .json(&json!({ "title": "bench" }))
    })
    .await;
    let one_rate = one["per_second_c64"].as_f64().unwrap_or(f64::NAN);
    println!(
        "durable writes c=64: one node {one_rate:.0}/s, spread over three {spread:.0}/s ({:.2}×)",
        spread / one_rate
    );
    drop(nodes);
    json!({
        "mirrored_get": gets,
        "get_cross_over_same": { "p50": ratio("p50_us"), "rps_c64": ratio("rps_c64") },
        "holder_round_trip_p50_us": holder_trip,
        "get_extra_p50_us": read_extra,
        "get_extra_in_holder_round_trips": read_extra / holder_trip,
        "wake": wake,
        "durable_writes_one_node_c64": one,
        "durable_writes_three_nodes_c64": spread,
        "three_over_one": spread / one_rate,
    })
}

/// One NATS request-reply round trip to the relay node holding `daemon`, as nodes ask
/// each other: a probe on `sr.read.<daemon>` (DESIGN.md, "Cluster"), which the holder
/// answers at once. p50 in µs, printed as a row.
async fn holder_round_trip(nats_url: &str, daemon: &str) -> f64 {
    let n = if quick() { 50 } else { 1000 };
    let nats = async_nats::connect(nats_url).await.unwrap();
    let probe = r#"{"method":"","params_json":"","wait_ms":0,"probe":true}"#;
    let mut trips = Vec::new();
    for i in 0..n + n / 10 {
        let started = Instant::now();
        let reply = nats
            .request(format!("sr.read.{daemon}"), probe.into())
            .await
            .expect("the holding node answers its probe");
        assert_eq!(&reply.payload[..], b"{}");
        if i >= n / 10 {
            trips.push(started.elapsed());
        }
    }
    trips.sort();
    let (p50, p99) = (percentile(&trips, 0.5), percentile(&trips, 0.99));
    println!(
        "{:<28} {:>10.0} {:>10.0}",
        "NATS round trip to node a",
        micros(p50),
        micros(p99)
    );
    micros(p50)
}

/// The wake rows of [`cluster_rows`]: a daemon driven by hand keeps a poll waiting on
/// `urls[0]`; writes are queued on it and on `urls[1]` in turn (so the machine's drift
/// falls on both), and NATS request-reply round trips are timed on the same server.
async fn cluster_wake(urls: &[String], admin: &str, client_key: &str, nats_url: &str) -> Value {
    // Many samples: the figure compared is a difference of two medians of about 2 ms.
    let n = if quick() { 50 } else { 1000 };
    let http = reqwest::Client::new();
    let daemon = json!({ "role": "daemon", "daemon": "wake" });
    let daemon_key = create_key(&http, &urls[0], admin, daemon).await;
    let (poller, mut woke_rx) = common::waiting_daemon(&urls[0], &daemon_key, "wake").await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let mut wakes = [Vec::new(), Vec::new()];
    for i in 0..2 * (n + n / 10) {
        let node = i % 2;
        // The poll answered last is waiting again before the next write.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let sent = Instant::now();
        let response = client
            .post(format!("{}/api/v1/daemons/wake/jobs", urls[node]))
            .bearer_auth(client_key)
            .header("prefer", "respond-async")
            .json(&json!({ "i": i }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let id = response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let (woke, arrived) = tokio::time::timeout(Duration::from_secs(10), woke_rx.recv())
            .await
            .expect("the waiting poll woke")
            .unwrap();
        assert_eq!(woke, id);
        if i >= 2 * (n / 10) {
            wakes[node].push(arrived.duration_since(sent));
        }
    }
    poller.abort();

    // One NATS round trip: a request to a responder on the same server.
    let nats = async_nats::connect(nats_url).await.unwrap();
    let mut echo = nats.subscribe("bench.echo").await.unwrap();
    let responder = {
        let nats = nats.clone();
        tokio::spawn(async move {
            while let Some(message) = futures_util::StreamExt::next(&mut echo).await {
                if let Some(reply) = message.reply {
                    let _ = nats.publish(reply, message.payload).await;
                }
            }
        })
    };
    let mut trips = Vec::new();
    for i in 0..n + n / 10 {
        let started = Instant::now();
        nats.request("bench.echo", "x".into()).await.unwrap();
        if i >= n / 10 {
            trips.push(started.elapsed());
        }
    }
    responder.abort();
    let row = |name: &str, mut samples: Vec<Duration>| {
        samples.sort();
        let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
        println!(
            "{name:<36} p50 {:>8.0} µs  p99 {:>8.0} µs",
            micros(p50),
            micros(p99)
        );
        json!({ "name": name, "p50_us": micros(p50), "p99_us": micros(p99) })
    };
    let [same, cross] = wakes;
    let rows = [
        row("wake, write on the poll's node", same),
        row("wake, write on another node", cross),
        row("NATS request-reply round trip", trips),
    ];
    let p50 = |i: usize| rows[i]["p50_us"].as_f64().unwrap();
    let extra = p50(1) - p50(0);
    println!(
        "cross-node wake p50 − same-node: {extra:.0} µs = {:.2} NATS round trips (target ≤ 1)",
        extra / p50(2)
    );
    json!({ "rows": rows, "extra_p50_us": extra, "extra_in_round_trips": extra / p50(2) })
}

/// The mirrored-GET rows (direct, relay, rathole) into `gets`; why rathole was skipped.
async fn mirrored_gets(
    url: &str,
    client_key: &str,
    target: std::net::SocketAddr,
    dir: &Path,
    gets: &mut Vec<Value>,
) -> Option<String> {
    let http = reqwest::Client::new();
    get_row(
        "direct (baseline)",
        &format!("http://{target}/api/v1/sessions"),
        None,
        gets,
    )
    .await;
    get_row(
        "relay, agent on the stream",
        &format!("{url}/api/v1/daemons/d/sessions"),
        Some(client_key),
        gets,
    )
    .await;
    let rathole = match start_rathole(dir, target, None).await {
        Ok((server, client, tunnel)) => {
            let ready = Instant::now() + Duration::from_secs(10);
            while http
                .get(format!("{tunnel}/api/v1/sessions"))
                .send()
                .await
                .is_err()
            {
                assert!(Instant::now() < ready, "rathole never forwarded");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            get_row(
                "rathole (TCP tunnel)",
                &format!("{tunnel}/api/v1/sessions"),
                None,
                gets,
            )
            .await;
            drop((server, client));
            None
        }
        Err(why) => {
            println!("rathole: skipped: {why}");
            Some(why)
        }
    };
    // Last, so that the rows before keep their places in the JSON and the ratios below.
    get_row(
        "relay, agent polling",
        &format!("{url}/api/v1/daemons/p/sessions"),
        Some(client_key),
        gets,
    )
    .await;
    let ratio = |a: usize, b: usize, field: &str| {
        gets[a][field].as_f64().unwrap() / gets[b][field].as_f64().unwrap()
    };
    println!(
        "relay / direct: p50 {:.2}×, throughput {:.2}×",
        ratio(1, 0, "p50_us"),
        ratio(1, 0, "rps_c64")
    );
    if gets.len() == 4 {
        println!(
            "relay (stream) / rathole: p50 {:.2}× (target ≤ 1.5), throughput {:.2}× (target ≥ 1)",
            ratio(1, 2, "p50_us"),
            ratio(1, 2, "rps_c64")
        );
        println!(
            "relay (polling) / rathole: p50 {:.2}×, throughput {:.2}×",
            ratio(3, 2, "p50_us"),
            ratio(3, 2, "rps_c64")
        );
    }
    rathole
}

/// Latency samples and requests/s of `concurrency` workers each sending GETs one after
/// another for `duration`.
async fn loaded_latency(
    url: &str,
    key: Option<&str>,
    concurrency: usize,
    duration: Duration,
) -> (Vec<Duration>, f64) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, url, key) = (http.clone(), url.to_owned(), key.map(str::to_owned));
            tokio::spawn(async move {
                let mut samples = Vec::new();
                while Instant::now() < deadline {
                    let mut request = http.get(&url);
                    if let Some(key) = &key {
                        request = request.bearer_auth(key);
                    }
                    let sent = Instant::now();
                    let response = request.send().await.unwrap();
                    assert!(response.status().is_success(), "{}", response.status());
                    response.bytes().await.unwrap();
                    samples.push(sent.elapsed());
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::new();
    for worker in workers {
        samples.extend(worker.await.unwrap());
    }
    let rps = samples.len() as f64 / started.elapsed().as_secs_f64();
    samples.sort();
    (samples, rps)
}

/// The mirrored GET at c=16 with 20 ms of delay each way between the daemon's side and
/// the relay's: the agent on the stream, the agent polling, and rathole's client and
/// server through the same kind of link.
async fn delayed_link(
    url: &str,
    admin: &str,
    client_key: &str,
    target: std::net::SocketAddr,
    dir: &Path,
) -> Value {
    const DELAY: Duration = Duration::from_millis(20);
    let duration = load_duration();
    let relay_addr: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let (link, _link_task) = common::delay_link(relay_addr, DELAY).await;
    let http = reqwest::Client::new();
    println!("\nmirrored GET, c=16, 20 ms each way between the daemon's side and the relay");
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "path", "p50 µs", "p99 µs", "req/s"
    );
    let mut rows = Vec::new();
    let mut row = |name: &str, (samples, rps): (Vec<Duration>, f64)| {
        let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
        println!(
            "{name:<28} {:>10.0} {:>10.0} {rps:>10.0}",
            micros(p50),
            micros(p99)
        );
        rows.push(
            json!({ "path": name, "p50_us": micros(p50), "p99_us": micros(p99), "rps_c16": rps }),
        );
    };
    for (daemon, sync) in [("ls", "stream"), ("lp", "poll")] {
        let key = create_key(
            &http,
            url,
            admin,
            json!({ "role": "daemon", "daemon": daemon }),
        )
        .await;
        let agent = start_agent_as(
            &format!("http://{link}"),
            daemon,
            sync,
            &key,
            client_key,
            target,
            &dir.join(format!("agent-{daemon}")),
        )
        .await;
        let get = format!("{url}/api/v1/daemons/{daemon}/sessions");
        // Warm up: the agent's connection and the first leases.
        loaded_latency(&get, Some(client_key), 16, Duration::from_millis(500)).await;
        let measured = loaded_latency(&get, Some(client_key), 16, duration).await;
        row(&format!("relay, agent {sync}"), measured);
        drop(agent);
    }
    match start_rathole(dir, target, Some(DELAY)).await {
        Ok((server, client, tunnel)) => {
            let get = format!("{tunnel}/api/v1/sessions");
            let ready = Instant::now() + Duration::from_secs(10);
            while http.get(&get).send().await.is_err() {
                assert!(Instant::now() < ready, "rathole never forwarded");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            loaded_latency(&get, None, 16, Duration::from_millis(500)).await;
            let measured = loaded_latency(&get, None, 16, duration).await;
            row("rathole (TCP tunnel)", measured);
            drop((server, client));
            let ratio = |a: usize, b: usize| {
                rows[a]["p50_us"].as_f64().unwrap() / rows[b]["p50_us"].as_f64().unwrap()
            };
            println!(
                "through the link, p50 relay (stream) / rathole: {:.2}× (target ≤ 1.1); relay (polling) / rathole: {:.2}×",
                ratio(0, 2),
                ratio(1, 2)
            );
        }
        Err(why) => println!("rathole through the link: skipped: {why}"),
    }
    Value::Array(rows)
}

/// Durable writes: 202s per second at concurrency 64, and writes per flush.
async fn durable_writes(url: &str, admin: &str, client_key: &str) -> Value {
    let http = reqwest::Client::new();
    // Durable writes: to a daemon that is offline, so the figure is the relay's own.
    let w_key = create_key(
        &http,
        url,
        admin,
        json!({ "role": "daemon", "daemon": "w" }),
    )
    .await;
    http.post(format!("{url}/sync/connect"))
        .bearer_auth(&w_key)
        .json(&json!({ "daemon_id": "w" }))
        .send()
        .await
        .unwrap();
    let before = metrics(&http, url).await;
    let load = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let (write_url, write_key) = (
        format!("{url}/api/v1/daemons/w/jobs"),
        client_key.to_owned(),
    );
    let writes = throughput(64, load_duration(), move || {
        load.post(&write_url)
            .bearer_auth(&write_key)
            .header("prefer", "respond-async")
            .json(&json!({ "title": "bench" }))
    })
    .await;
    let after = metrics(&http, url).await;
    let per_flush = (after.0 - before.0) / (after.1 - before.1).max(1.0);
    println!(
        "\ndurable writes (POST → 202 after the group commit), c=64: {writes:.0}/s (target ≥ 20,000), {per_flush:.1} writes per flush"
    );

    json!({ "per_second_c64": writes, "writes_per_flush": per_flush })
}

/// The durable-write anchor: a prepared `INSERT` of a command-sized row, each its own
/// transaction (`synchronous_commit=on`), at concurrency 64 (one connection each), on
/// `cluster`.
async fn postgres_anchor(cluster: &postgres::PgCluster) -> Value {
    let url = cluster.url("postgres");
    let connect = || async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("the throwaway cluster accepts connections");
        tokio::spawn(connection);
        client
    };
    connect()
        .await
        .batch_execute(
            "CREATE TABLE commands (id text PRIMARY KEY, daemon_id text NOT NULL, \
             method text NOT NULL, params bytea NOT NULL, created_at timestamptz NOT NULL)",
        )
        .await
        .unwrap();
    // A mirrored write's command: its id, daemon, method and `http` params.
    let params = serde_json::to_vec(&json!({
        "method": "POST", "path": "/api/v1/jobs", "headers": {"content-type": "application/json"},
        "body": { "title": "bench" },
    }))
    .unwrap();
    // Connections and prepared statements first, outside the timed window.
    let mut writers = Vec::new();
    for _ in 0..64 {
        let client = connect().await;
        let insert = client
            .prepare(
                "INSERT INTO commands (id, daemon_id, method, params, created_at) \
                 VALUES ($1, 'w', 'http', $2, now())",
            )
            .await
            .unwrap();
        writers.push((client, insert));
    }
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + load_duration();
    let mut tasks = Vec::new();
    for (task, (client, insert)) in writers.into_iter().enumerate() {
        let (count, params) = (count.clone(), params.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0_u64;
            while Instant::now() < deadline {
                let id = format!("cmd-{task}-{n}");
                client.execute(&insert, &[&id, &params]).await.unwrap();
                n += 1;
            }
            count.fetch_add(n, Ordering::Relaxed);
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let per_second = count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    println!(
        "PostgreSQL durable INSERT anchor (prepared, c=64, one transaction each): {per_second:.0}/s"
    );
    json!({ "per_second_c64": per_second })
}

/// Where the throwaway cluster is missing, the anchor is skipped with a note (a benchmark
/// never fails for it).
fn skip_or_fail(what: &str, why: &str) {
    println!("{what} skipped: {why}");
}

/// What the `fdatasync` after sled's flush costs: durable writes at c=64 and change-log
/// appends on fresh relays, sled's flush alone against flush + fdatasync, alternated
/// (A B A B) in this run so that the machine's drift falls on both.
async fn fsync_cost(dir: &Path) -> Value {
    let entries: u64 = if quick() { 20_000 } else { 200_000 };
    let mut rows = Vec::new();
    for (round, sync) in [Durability::FlushOnly, Durability::Fdatasync]
        .into_iter()
        .cycle()
        .take(4)
        .enumerate()
    {
        let data_dir = dir.join(format!("fsync-{round}"));
        let (relay, url, admin, key, client) = relay_with_keys_synced(&data_dir, "c", sync).await;
        let writes = durable_writes(&url, &admin, &client).await;
        let appends = append_changes(&url, &key, entries).await;
        drop(relay);
        rows.push((sync, writes, appends));
    }
    let mean = |sync: Durability, field: &dyn Fn(&Value, f64) -> f64| {
        let picked: Vec<f64> = rows
            .iter()
            .filter(|row| row.0 == sync)
            .map(|row| field(&row.1, row.2))
            .collect();
        picked.iter().sum::<f64>() / picked.len() as f64
    };
    let summary = |sync: Durability| {
        json!({
            "writes_per_second_c64": mean(sync, &|w, _| w["per_second_c64"].as_f64().unwrap()),
            "writes_per_flush": mean(sync, &|w, _| w["writes_per_flush"].as_f64().unwrap()),
            "change_log_appends_per_second": mean(sync, &|_, a| a),
        })
    };
    let (before, after) = (
        summary(Durability::FlushOnly),
        summary(Durability::Fdatasync),
    );
    let ratio = |field: &str| after[field].as_f64().unwrap() / before[field].as_f64().unwrap();
    println!(
        "\nfsync cost (mean of 2 runs each, alternated): sled flush only → flush + fdatasync\n  \
         durable writes c=64: {:.0}/s → {:.0}/s ({:.2}×), writes per sync {:.1} → {:.1}\n  \
         change-log appends ({entries} in polls of 1,000): {:.0}/s → {:.0}/s ({:.2}×)",
        before["writes_per_second_c64"].as_f64().unwrap(),
        after["writes_per_second_c64"].as_f64().unwrap(),
        ratio("writes_per_second_c64"),
        before["writes_per_flush"].as_f64().unwrap(),
        after["writes_per_flush"].as_f64().unwrap(),
        before["change_log_appends_per_second"].as_f64().unwrap(),
        after["change_log_appends_per_second"].as_f64().unwrap(),
        ratio("change_log_appends_per_second"),
    );
    json!({ "flush_only": before, "flush_and_fdatasync": after, "entries": entries })
}

/// Appends `entries` change-log entries for daemon `c` in polls of 1,000 (each poll
/// answered after its commit); returns entries per second.
async fn append_changes(url: &str, key: &str, entries: u64) -> f64 {
    append_changes_sized(url, key, entries).await.0
}

/// [`append_changes`], and the bytes of the updates' `data` JSON.
async fn append_changes_sized(url: &str, key: &str, entries: u64) -> (f64, u64) {
    let http = reqwest::Client::new();
    let connect = common::sync_connect(&http, url, key, "c").await;
    let mut data_bytes = 0u64;
    let started = Instant::now();
    for batch in 0..entries / 1000 {
        let updates: Vec<Value> = (0..1000)
            .map(|i| {
                let seq = batch * 1000 + i + 1;
                json!({ "type": "session_updated", "seq": seq,
                        "data": { "session_id": format!("s{}", seq % 97), "status": "running", "n": seq } })
            })
            .collect();
        data_bytes += updates
            .iter()
            .map(|u| u["data"].to_string().len() as u64)
            .sum::<u64>();
        let response = http
            .post(format!("{url}/sync/poll"))
            .bearer_auth(key)
            .json(
                &json!({ "daemon_id": "c", "connection_id": connect["connection_id"],
                           "updates": updates, "wait_for_commands": false }),
            )
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    }
    (entries as f64 / started.elapsed().as_secs_f64(), data_bytes)
}

/// Bytes the files under `dir` occupy.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                disk_usage(&entry.path())
            } else {
                meta.blocks() * 512
            }
        })
        .sum()
}

/// Change log: append N entries (polls of 1,000 updates, each committed), replay them
/// (`GET …/changes`, 1,000 a page), restart the relay on that store (SIGTERM, then start
/// until `/readyz` answers), and the data dir's bytes per byte of update data.
async fn change_log(data_dir: &Path) -> Value {
    let entries: u64 = if quick() { 50_000 } else { 1_000_000 };
    let (relay, url, _, key, client) = relay_with_keys(data_dir, "c").await;
    let http = reqwest::Client::new();
    let (append_rate, data_bytes) = append_changes_sized(&url, &key, entries).await;
    let started = Instant::now();
    let mut since = 0;
    while since < entries {
        let page: Value = http
            .get(format!(
                "{url}/api/v1/daemons/c/changes?since={since}&limit=1000"
            ))
            .bearer_auth(&client)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        since = page["changes"].as_array().unwrap().last().unwrap()["seq"]
            .as_u64()
            .unwrap();
    }
    let replay_rate = entries as f64 / started.elapsed().as_secs_f64();
    // Graceful stop, then time a start on the same store until it is ready.
    let pid = relay.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let mut relay = relay;
    relay.0.wait().unwrap();
    let bytes = disk_usage(data_dir);
    let started = Instant::now();
    let (_relay, url, _) = spawn_relay(data_dir);
    while !http
        .get(format!("{url}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let restart = started.elapsed();
    let per_byte = bytes as f64 / data_bytes as f64;
    println!(
        "\nchange log, {entries} entries: append {append_rate:.0}/s, replay {replay_rate:.0}/s, \
         restart {:.2} s (target ≤ 2 s), data dir {:.1} MiB = {per_byte:.1} bytes per byte of data",
        restart.as_secs_f64(),
        bytes as f64 / (1 << 20) as f64
    );
    json!({
        "entries": entries,
        "append_per_second": append_rate,
        "replay_per_second": replay_rate,
        "restart_seconds": restart.as_secs_f64(),
        "data_dir_bytes": bytes,
        "bytes_per_data_byte": per_byte,
    })
}

/// `n` idle daemons, each on one TCP connection of its own (h2c, or h2 over TLS) with one
/// `/sync/stream` open on it, as agents keep them: relay RSS per daemon, and the wake
/// time from a queued command's 202 to its `commands` line reaching the daemon.
async fn idle_daemons(data_dir: &Path, n: usize, tls: bool) -> Value {
    use rustls_pki_types::pem::PemObject;
    let samples = if quick() { 50 } else { 300 };
    let (tls_toml, connector) = if tls {
        let ca = certs::Ca::new("bench CA");
        let (cert, key) = ca.server().write(data_dir.parent().unwrap(), "idle-server");
        let mut roots = rustls::RootCertStore::empty();
        let ca_pem = ca.write(data_dir.parent().unwrap(), "idle-ca.pem");
        for der in rustls_pki_types::CertificateDer::pem_file_iter(&ca_pem).unwrap() {
            roots.add(der.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        (
            format!(
                "[tls]\ncert = {:?}\nkey = {:?}\n",
                cert.display().to_string(),
                key.display().to_string()
            ),
            Some(tokio_rustls::TlsConnector::from(Arc::new(config))),
        )
    } else {
        (String::new(), None)
    };
    let (relay, url, _) = spawn_relay_on(data_dir, Durability::Fdatasync, &tls_toml);
    let admin = std::fs::read_to_string(data_dir.join("admin.key"))
        .unwrap()
        .trim()
        .to_owned();
    let mut http = reqwest::Client::builder().pool_max_idle_per_host(64);
    if tls {
        let ca_pem = std::fs::read(data_dir.parent().unwrap().join("idle-ca.pem")).unwrap();
        http = http.add_root_certificate(reqwest::Certificate::from_pem(&ca_pem).unwrap());
    }
    let http = http.build().unwrap();
    let client_key = create_key(
        &http,
        &url,
        &admin,
        json!({ "role": "client", "scope": ["*"] }),
    )
    .await;
    // Keys, 64 at a time.
    let semaphore = Arc::new(tokio::sync::Semaphore::new(64));
    let mut setups = Vec::new();
    for i in 0..n {
        let (http, url, admin, semaphore) =
            (http.clone(), url.clone(), admin.clone(), semaphore.clone());
        setups.push(tokio::spawn(async move {
            let _permit = semaphore.acquire().await.unwrap();
            let daemon_id = format!("idle-{i}");
            let key = create_key(
                &http,
                &url,
                &admin,
                json!({ "role": "daemon", "daemon": daemon_id }),
            )
            .await;
            (daemon_id, key)
        }));
    }
    let mut daemons = Vec::with_capacity(n);
    for setup in setups {
        daemons.push(setup.await.unwrap());
    }
    let rss_before = relay.rss_kib();
    let addr: std::net::SocketAddr = url
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .parse()
        .unwrap();
    let (woke_tx, mut woke_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let mut streams = Vec::new();
    let connecting = Arc::new(tokio::sync::Semaphore::new(64));
    for (index, (daemon_id, key)) in daemons.into_iter().enumerate() {
        let (woke_tx, connector, connecting) =
            (woke_tx.clone(), connector.clone(), connecting.clone());
        streams.push(tokio::spawn(async move {
            let permit = connecting.acquire_owned().await.unwrap();
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = tcp.set_nodelay(true);
            let mut sender = match connector {
                Some(connector) => {
                    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
                    let stream = connector.connect(name, tcp).await.unwrap();
                    h2_handshake(stream).await
                }
                None => h2_handshake(tcp).await,
            };
            let connect = serde_json::to_vec(&json!({ "daemon_id": daemon_id })).unwrap();
            let request = http::Request::post("/sync/connect")
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(http_body_util::Either::Left(Full::new(Bytes::from(
                    connect,
                ))))
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .unwrap()
                .to_bytes();
            let hello: Value = serde_json::from_slice(&body).unwrap();
            let connection_id = hello["connection_id"].as_str().unwrap().to_owned();
            // The request body stays open for as long as the daemon lives.
            let (_lines_out, lines) =
                tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, Infallible>>(1);
            let body =
                http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(lines));
            let request = http::Request::post(format!(
                "/sync/stream?daemon_id={daemon_id}&connection_id={connection_id}"
            ))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/x-ndjson")
            .body(http_body_util::Either::Right(body))
            .unwrap();
            let response = sender.send_request(request).await.unwrap();
            assert_eq!(response.status(), 200);
            drop(permit);
            let mut body = response.into_body();
            while let Some(Ok(frame)) = http_body_util::BodyExt::frame(&mut body).await {
                if let Ok(data) = frame.into_data() {
                    if data.starts_with(b"{\"commands\"") {
                        let _ = woke_tx.send((index, Instant::now()));
                    }
                }
            }
            drop(_lines_out);
        }));
    }
    let ready = Instant::now() + Duration::from_secs(120);
    while metric(&http, &url, "syncrelay_polls_waiting").await < n as f64 {
        assert!(Instant::now() < ready, "the streams never all opened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_waiting = relay.rss_kib();
    let mut wake = Vec::with_capacity(samples);
    for sample in 0..samples {
        let index = (sample * 7919) % n;
        let sent = Instant::now();
        let response = http
            .post(format!("{url}/api/v1/daemons/idle-{index}/jobs"))
            .bearer_auth(&client_key)
            .header("prefer", "respond-async")
            .json(&json!({ "sample": sample }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let (woken, arrived) = tokio::time::timeout(Duration::from_secs(10), woke_rx.recv())
            .await
            .expect("a stream woke")
            .unwrap();
        assert_eq!(woken, index);
        wake.push(arrived.duration_since(sent));
    }
    wake.sort();
    let per_daemon = (rss_waiting.saturating_sub(rss_before)) as f64 * 1024.0 / n as f64;
    let total_per_daemon = rss_waiting as f64 * 1024.0 / n as f64;
    let transport = if tls { "h2 over TLS" } else { "h2c" };
    println!(
        "\n{n} idle daemons, one {transport} connection and stream each: wake p50 {:.0} µs, p99 {:.0} µs \
         (target ≤ 10 ms); relay RSS {:.1} MiB, {:.1} KiB per daemon's connection and stream \
         ({:.1} KiB per daemon in all; target ≤ 16)",
        micros(percentile(&wake, 0.5)),
        micros(percentile(&wake, 0.99)),
        rss_waiting as f64 / 1024.0,
        per_daemon / 1024.0,
        total_per_daemon / 1024.0
    );
    for stream in streams {
        stream.abort();
    }
    json!({
        "daemons": n,
        "transport": transport,
        "wake_p50_us": micros(percentile(&wake, 0.5)),
        "wake_p99_us": micros(percentile(&wake, 0.99)),
        "relay_rss_kib_before_streams": rss_before,
        "relay_rss_kib_streams_open": rss_waiting,
        "rss_bytes_per_daemon_stream": per_daemon,
        "rss_bytes_per_daemon_total": total_per_daemon,
    })
}

type IdleBody = http_body_util::Either<
    Full<Bytes>,
    http_body_util::StreamBody<
        tokio_stream::wrappers::ReceiverStream<Result<hyper::body::Frame<Bytes>, Infallible>>,
    >,
>;

/// An HTTP/2 client connection on `io`, its driver spawned.
async fn h2_handshake<T>(io: T) -> hyper::client::conn::http2::SendRequest<IdleBody>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    sender
}

/// One value of the relay's `/metrics`.
async fn metric(http: &reqwest::Client, url: &str, series: &str) -> f64 {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// (commits, flushes) from the relay's `/metrics`.
async fn metrics(http: &reqwest::Client, url: &str) -> (f64, f64) {
    (
        metric(http, url, "syncrelay_store_commits_total").await,
        metric(http, url, "syncrelay_store_flushes_total").await,
    )
}
