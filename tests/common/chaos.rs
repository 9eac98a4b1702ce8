//! The workload and the end checks shared by the tests that break things around a running
//! agent (crash loops, network faults): a [`TestDaemon`] producing events, clients queueing
//! writes with `Idempotency-Key` and retrying them until one answer is acknowledged, and
//! clients fetching large stream contexts (chunk uploads). What the relay acknowledged is
//! kept in a [`Ledger`]; [`check`] then asserts the promise: every daemon event in the
//! change log exactly once and in order, every acknowledged write completed with the
//! daemon's own answer, every stream context whole and byte-exact, and a context once
//! received whole replayed from the relay's store without asking the daemon again.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::daemon::TestDaemon;

pub const DAEMON: &str = "d";
/// A stream context: this many events of this many bytes (about 100 KiB, several chunks).
pub const STREAM_EVENTS: u64 = 200;
pub const STREAM_SIZE: usize = 500;

/// What the relay acknowledged, as the clients saw it.
#[derive(Default)]
pub struct Ledger {
    /// Write index → command id, for writes answered 202.
    pub writes: Mutex<BTreeMap<usize, String>>,
    /// Next write index.
    next_write: AtomicUsize,
    /// Stream contexts asked for (indexes below this).
    pub streams_tried: AtomicUsize,
    /// Stream contexts received whole.
    pub streams_whole: Mutex<BTreeSet<usize>>,
    /// Requests sent again after a fault cut them.
    pub retries: AtomicUsize,
}

impl Ledger {
    pub fn acknowledged_writes(&self) -> usize {
        self.writes.lock().unwrap().len()
    }

    pub fn streams_whole(&self) -> usize {
        self.streams_whole.lock().unwrap().len()
    }
}

/// A client that bounds every request, so a fault can delay a test but never hang it.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Emits `batch` events every `every` until `stop` (the pacing is the workload).
pub fn spawn_emitter(
    daemon: Arc<TestDaemon>,
    batch: usize,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            daemon.emit(batch);
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return,
            }
        }
    })
}

/// The id of the last event the daemon produced.
pub fn emitted(daemon: &TestDaemon) -> u64 {
    daemon.emit(0)
}

/// Queues writes (`POST …/echo/w{i}` with `Idempotency-Key: w{i}`) until `stop`. A write
/// whose answer did not arrive (reset, timeout, relay down, 5xx) is sent again with the same
/// key until one does: the relay must return the same command, never a second one.
pub async fn writer(url: String, key: String, ledger: Arc<Ledger>, stop: CancellationToken) {
    let http = http_client();
    while !stop.is_cancelled() {
        let i = ledger.next_write.fetch_add(1, Ordering::SeqCst);
        let mut attempt = 0;
        loop {
            if attempt > 0 {
                ledger.retries.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    // Never acknowledged: not in the ledger, nothing to check.
                    _ = stop.cancelled() => return,
                }
            }
            attempt += 1;
            let sent = http
                .post(format!("{url}/api/v1/daemons/{DAEMON}/echo/w{i}"))
                .bearer_auth(&key)
                .header("prefer", "respond-async")
                .header("idempotency-key", format!("w{i}"))
                .json(&json!({ "i": i }))
                .send()
                .await;
            let Ok(response) = sent else { continue };
            let status = response.status().as_u16();
            let Ok(body) = response.json::<Value>().await else {
                continue;
            };
            match status {
                202 => {}
                429 | 502 | 503 | 504 => continue,
                _ => panic!("write {i} (attempt {attempt}): unexpected {status} {body}"),
            }
            let id = body["id"].as_str().expect("a 202 names its command");
            ledger.writes.lock().unwrap().insert(i, id.to_owned());
            break;
        }
        // Pacing: a steady trickle, so writes are queued, leased and running at any moment.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// `name` from the environment as a count, else `default` (sizes of the long runs).
pub fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// The whole workload against the relay at `url`: an emitter (3 events every 20 ms), two
/// writers and a streamer.
pub fn spawn_workload(
    url: &str,
    key: &str,
    daemon: &Arc<TestDaemon>,
    ledger: &Arc<Ledger>,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = vec![spawn_emitter(
        daemon.clone(),
        3,
        Duration::from_millis(20),
        stop.clone(),
    )];
    for _ in 0..2 {
        tasks.push(tokio::spawn(writer(
            url.to_owned(),
            key.to_owned(),
            ledger.clone(),
            stop.clone(),
        )));
    }
    tasks.push(tokio::spawn(streamer(
        url.to_owned(),
        key.to_owned(),
        ledger.clone(),
        stop.clone(),
    )));
    tasks
}

/// Stops the workload and waits for its tasks (bounded), surfacing their assertions.
pub async fn stop_workload(stop: CancellationToken, tasks: Vec<tokio::task::JoinHandle<()>>) {
    stop.cancel();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("workload tasks stop")
            .expect("no assertion failed in a workload task");
    }
}

/// The path of stream context `j`.
pub fn stream_path(j: usize) -> String {
    format!(
        "/api/v1/daemons/{DAEMON}/approvals/a{j}/context/stream?events={STREAM_EVENTS}&size={STREAM_SIZE}"
    )
}

/// The daemon-side path of stream context `j`, as [`TestDaemon::hits`] counts it.
pub fn stream_daemon_path(j: usize) -> String {
    format!("/api/v1/approvals/a{j}/context/stream")
}

/// A context as the relay replays it: relay ids from 1, the daemon's own ids dropped.
pub fn expected_context() -> String {
    (0..STREAM_EVENTS)
        .map(|n| {
            let fill = ((b'a' + (n % 26) as u8) as char)
                .to_string()
                .repeat(STREAM_SIZE);
            format!(
                "id: {}\nevent: context\ndata: {{\"n\":{n},\"text\":\"{fill}\"}}\n\n",
                n + 1
            )
        })
        .collect()
}

/// Asks for a new stream context now and then until `stop`; a context received whole goes
/// in the ledger. A cut one is simply left: the end check asks for every context again.
pub async fn streamer(url: String, key: String, ledger: Arc<Ledger>, stop: CancellationToken) {
    let http = http_client();
    let expected = expected_context();
    while !stop.is_cancelled() {
        let j = ledger.streams_tried.fetch_add(1, Ordering::SeqCst);
        let body = async {
            let response = http
                .get(format!("{url}{}", stream_path(j)))
                .bearer_auth(&key)
                .send()
                .await
                .ok()?;
            (response.status() == 200).then_some(())?;
            response.text().await.ok()
        };
        if let Some(body) = body.await {
            if body == expected {
                ledger.streams_whole.lock().unwrap().insert(j);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// The relay's whole change log for the daemon, or `None` while it cannot answer.
pub async fn change_log(http: &reqwest::Client, url: &str, key: &str) -> Option<Vec<Value>> {
    let mut entries = Vec::new();
    let mut since = 0;
    loop {
        let response = http
            .get(format!(
                "{url}/api/v1/daemons/{DAEMON}/changes?since={since}&limit=1000"
            ))
            .bearer_auth(key)
            .send()
            .await
            .ok()?;
        if response.status() != 200 {
            return None;
        }
        let batch: Value = response.json().await.ok()?;
        let changes = batch["changes"].as_array()?.clone();
        if changes.is_empty() {
            return Some(entries);
        }
        since = batch["last_seq"].as_u64()?;
        entries.extend(changes);
    }
}

/// The daemon event ids (`data.n`) of the change log, in log order.
pub fn event_ids(entries: &[Value]) -> Vec<u64> {
    entries
        .iter()
        .map(|e| e["data"]["n"].as_u64().expect("an event with data.n"))
        .collect()
}

/// How many entries the relay's change log holds (0 while it does not know the daemon).
pub async fn log_len(http: &reqwest::Client, url: &str, key: &str) -> u64 {
    let Ok(response) = http
        .get(format!("{url}/api/v1/daemons/{DAEMON}"))
        .bearer_auth(key)
        .send()
        .await
    else {
        return 0;
    };
    if response.status() != 200 {
        return 0;
    }
    let body: Value = response.json().await.unwrap_or(Value::Null);
    body["last_seq"].as_u64().unwrap_or(0)
}

/// Waits (up to `limit`) until event `total` is in the change log, then asserts that the
/// log holds events 1..=total, each once, in order, with dense relay seqs.
pub async fn assert_all_events_once(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    total: u64,
    limit: Duration,
) {
    let deadline = tokio::time::Instant::now() + limit;
    let entries = loop {
        let entries = change_log(http, url, key).await.unwrap_or_default();
        // Uploads are in order: once the last event is in, every earlier one had its turn.
        if event_ids(&entries).contains(&total) {
            break entries;
        }
        if tokio::time::Instant::now() >= deadline {
            let ids = event_ids(&entries);
            panic!(
                "event {total} not in the change log within {limit:?}: {} entries, last {:?}",
                ids.len(),
                ids.last()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ids = event_ids(&entries);
    let expected: Vec<u64> = (1..=total).collect();
    if ids != expected {
        let mut seen = BTreeMap::<u64, usize>::new();
        for id in &ids {
            *seen.entry(*id).or_default() += 1;
        }
        let duplicated: Vec<u64> = seen
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, _)| *id)
            .collect();
        let missing: Vec<u64> = expected
            .iter()
            .filter(|id| !seen.contains_key(id))
            .copied()
            .collect();
        let out_of_order = ids.windows(2).filter(|w| w[0] >= w[1]).count();
        panic!(
            "change log is not events 1..={total} once in order: {} entries, duplicated {duplicated:?}, \
             missing {missing:?}, {out_of_order} order breaks",
            ids.len()
        );
    }
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, expected, "relay seqs are dense");
    assert!(
        entries.iter().all(|e| e["type"] == "tick"),
        "event types kept"
    );
}

/// GETs `route` as a well-behaved client: a 429 waits for its `Retry-After`, and a 503
/// (the agent reconnecting after the last fault) or a failed connection is tried again, for
/// at most a minute. Returns the first other answer.
pub async fn get(http: &reqwest::Client, url: &str, key: &str, route: &str) -> reqwest::Response {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let sent = http
            .get(format!("{url}{route}"))
            .bearer_auth(key)
            .send()
            .await;
        let pause = match &sent {
            Ok(response) if response.status() == 429 => response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .map_or(Duration::from_secs(1), Duration::from_secs),
            Ok(response) if response.status() == 503 => Duration::from_millis(100),
            Ok(_) => return sent.unwrap(),
            Err(_) => Duration::from_millis(100),
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "GET {route}: no answer within a minute (last: {:?})",
            sent.map(|r| r.status())
        );
        tokio::time::sleep(pause).await;
    }
}

/// A command's state (`wait` seconds for it to finish).
pub async fn command_state(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    id: &str,
    wait: u64,
) -> Value {
    let response = get(
        http,
        url,
        key,
        &format!("/api/v1/commands/{id}?wait={wait}"),
    )
    .await;
    assert_eq!(response.status(), 200, "GET /api/v1/commands/{id}");
    response.json().await.expect("command JSON")
}

/// What [`check`] found, for the test's report.
#[derive(Debug)]
pub struct Checked {
    pub events: u64,
    pub writes: usize,
    pub executions: usize,
    pub streams: usize,
    pub streams_replayed: usize,
}

/// The end check, once the faults are over and the agent can reach the relay at `url`:
/// every event once and in order, every acknowledged write completed with the daemon's
/// answer (run exactly once at the daemon with `exactly_once`, else at least once, as
/// delivery is when the agent itself can die between running a command and storing its
/// result) and as the one command its key names, every stream context asked for served
/// whole, and those received whole before replayed from the store.
pub async fn check(
    url: &str,
    key: &str,
    daemon: &TestDaemon,
    ledger: &Ledger,
    exactly_once: bool,
) -> Checked {
    let http = http_client();
    let events = emitted(daemon);
    assert_all_events_once(&http, url, key, events, Duration::from_secs(60)).await;

    let writes = ledger.writes.lock().unwrap().clone();
    for (i, id) in &writes {
        let state = command_state(&http, url, key, id, 20).await;
        assert_eq!(state["state"], "completed", "write {i} ({id}): {state}");
        let body = &state["result"]["body"];
        assert_eq!(state["result"]["status"], 200, "write {i}: {state}");
        assert_eq!(body["path"], format!("/api/v1/echo/w{i}"));
        assert_eq!(body["body"], json!({ "i": i }).to_string());
    }
    let mut executions = 0;
    for (i, id) in &writes {
        let path = format!("/api/v1/echo/w{i}");
        let hits = daemon.hits(&path);
        assert!(hits >= 1, "acknowledged write {i} never ran at the daemon");
        // However often it ran, it ran as one command, the one its key names: no retry
        // made a second command (the agent sends each command's id to the daemon).
        assert_eq!(
            daemon.command_ids(&path),
            std::slice::from_ref(id),
            "write {i}: the daemon ran other commands than the acknowledged one"
        );
        if exactly_once {
            assert_eq!(hits, 1, "write {i} ran {hits} times");
        }
        executions += hits;
        // Sent once more with its key, the write names the same command: no retry made
        // a second one.
        loop {
            let response = http
                .post(format!("{url}/api/v1/daemons/{DAEMON}/echo/w{i}"))
                .bearer_auth(key)
                .header("prefer", "respond-async")
                .header("idempotency-key", format!("w{i}"))
                .json(&json!({ "i": i }))
                .send()
                .await
                .expect("relay reachable");
            if response.status() == 429 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            assert_eq!(response.status(), 202, "write {i} sent again");
            let body: Value = response.json().await.expect("command JSON");
            assert_eq!(
                body["id"],
                json!(id),
                "write {i}: its key names another command"
            );
            break;
        }
    }

    let tried = ledger.streams_tried.load(Ordering::SeqCst);
    let whole = ledger.streams_whole.lock().unwrap().clone();
    let expected = expected_context();
    for j in 0..tried {
        let before = daemon.hits(&stream_daemon_path(j));
        let response = get(&http, url, key, &stream_path(j)).await;
        assert_eq!(response.status(), 200, "context {j}");
        let body = response.text().await.expect("context body");
        assert!(
            body == expected,
            "context {j}: {} bytes, want {} (every event once, in order, byte-exact)",
            body.len(),
            expected.len()
        );
        if whole.contains(&j) {
            assert_eq!(
                daemon.hits(&stream_daemon_path(j)),
                before,
                "context {j} was stored whole, yet the daemon was asked again"
            );
        }
    }
    Checked {
        events,
        writes: writes.len(),
        executions,
        streams: tried,
        streams_replayed: whole.len(),
    }
}
