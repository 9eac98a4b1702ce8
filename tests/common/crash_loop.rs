//! The crash loops shared by `tests/crash.rs` (SIGKILL) and `tests/power_loss.rs`
//! (SIGKILL, then everything not fsynced dropped by LazyFS): a workload of clients queueing
//! writes and fetching stream contexts, an operator creating keys, and a daemon posting
//! updates, results and stream chunks, runs against the `syncrelay` binary, which is
//! killed mid-flight and restarted on the same data dir, several times. Afterwards every
//! acknowledged command is delivered, every acknowledged result and change-log entry is
//! there, in order, exactly once, every acknowledged key is listed, and every acknowledged
//! chunk is stored: resuming an upload after the first unacknowledged chunk never meets a
//! gap, and the finished context replays byte-exact.
//!
//! [`agent_crash_loop`] puts the agent in: the `syncrelay agent` binary serves a
//! [`TestDaemon`] (events, an echo API, large stream contexts), clients queue writes with
//! `Idempotency-Key` and fetch contexts (chunk uploads), and each kill strikes the relay or
//! the agent. The end check is `chaos::check`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::path::Path;

use super::chaos::{self, Ledger, DAEMON};
use super::daemon::TestDaemon;
use super::postgres::PgCluster;
use super::{create_key, eventually, AgentProcess, RelayProcess};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Client tasks queueing writes concurrently.
const WRITERS: usize = 4;
/// Updates per poll.
const BATCH: u64 = 5;
/// Events in one stream context, and where its text is cut into chunks: the cuts fall
/// inside events, and one chunk is over 4 KiB (stored as pieces, `store/spill.rs`).
const STREAM_EVENTS: usize = 20;
const STREAM_CUTS: [usize; 5] = [500, 4_600, 4_700, 9_000, 10_000];

/// What the relay acknowledged, as the test's clients and daemon saw it.
#[derive(Default)]
pub struct Acked {
    /// Commands answered 202.
    pub commands: BTreeSet<String>,
    /// Results listed as accepted in a 200.
    pub results: BTreeSet<String>,
    /// Highest daemon-side update seq answered 200.
    pub update_seq: u64,
    /// Stream commands the daemon uploaded chunks for, by command id.
    pub streams: BTreeMap<String, StreamAck>,
    /// Chunks answered 200 with their command accepted, in all.
    pub chunk_acks: usize,
    /// Stream contexts asked for so far (names `s0`, `s1`, …).
    pub streams_asked: usize,
    /// Live streams ended early by a storage failure (an error event after whole events).
    pub streams_cut: usize,
    /// Uploads unfinished at the last restart, finished after it.
    pub streams_resumed: usize,
    /// Uploads handed out again and resumed part-way, from a chunk after the first.
    pub resumed_mid_stream: usize,
    /// Uploads whose last chunk the relay stored but whose answer was lost in a kill.
    pub streams_unconfirmed: usize,
    /// Ids of the keys whose creation was answered 201.
    pub keys: BTreeSet<String>,
}

/// One stream command's upload as the daemon saw it acknowledged.
pub struct StreamAck {
    /// The daemon-side path, `/api/v1/approvals/s{n}/context/stream`.
    path: String,
    /// Highest chunk index accepted.
    acked: Option<usize>,
    /// The last chunk (`complete: true`) was accepted.
    complete: bool,
}

struct Keys {
    admin: String,
    daemon: String,
    client: String,
}

/// POSTs `body`; a 429 is retried after its `Retry-After`, as by [`get_response`].
async fn post(
    url: &str,
    token: &str,
    route: &str,
    body: &Value,
) -> Result<(u16, Value), reqwest::Error> {
    post_with(&reqwest::Client::new(), url, token, route, body).await
}

/// [`post`] on `http`.
async fn post_with(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    route: &str,
    body: &Value,
) -> Result<(u16, Value), reqwest::Error> {
    loop {
        let response = http
            .post(format!("{url}{route}"))
            .bearer_auth(token)
            .json(body)
            .send()
            .await?;
        if response.status() == 429 {
            tokio::time::sleep(retry_after(&response)).await;
            continue;
        }
        let status = response.status().as_u16();
        return Ok((status, response.json().await?));
    }
}

fn retry_after(response: &reqwest::Response) -> Duration {
    let seconds = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(1);
    Duration::from_secs(seconds)
}

/// GETs `route`, as a well-behaved client: a 429 is retried after its `Retry-After` (the
/// long run checks thousands of commands with one key, past the shipped rate limit).
async fn get_response(url: &str, token: &str, route: &str) -> reqwest::Response {
    loop {
        let response = reqwest::Client::new()
            .get(format!("{url}{route}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            tokio::time::sleep(retry_after(&response)).await;
            continue;
        }
        assert_eq!(response.status(), 200, "GET {route}");
        return response;
    }
}

/// [`get_response`]'s JSON body.
async fn get(url: &str, token: &str, route: &str) -> Value {
    get_response(url, token, route).await.json().await.unwrap()
}

/// Queues writes until the relay stops answering.
async fn writer(url: String, key: String, acked: Arc<Mutex<Acked>>, id: usize) {
    let http = reqwest::Client::new();
    for n in 0.. {
        let sent = http
            .post(format!("{url}/api/v1/daemons/d/jobs"))
            .bearer_auth(&key)
            .header("prefer", "respond-async")
            .json(&json!({ "writer": id, "n": n }))
            .send()
            .await;
        let Ok(response) = sent else { return };
        if response.status() != 202 {
            return;
        }
        let Ok(body) = response.json::<Value>().await else {
            return;
        };
        acked
            .lock()
            .unwrap()
            .commands
            .insert(body["id"].as_str().unwrap().to_owned());
    }
}

/// The SSE text a daemon serves for the stream context at `path`: a fixed function of the
/// path, so an upload resumed after a crash sends the same bytes again.
fn stream_text(path: &str) -> String {
    (0..STREAM_EVENTS)
        .map(|e| {
            let fill = "x".repeat(e * 53 % 1_000);
            format!(
                "event: context\ndata: {{\"path\":\"{path}\",\"e\":{e},\"fill\":\"{fill}\"}}\n\n"
            )
        })
        .collect()
}

/// The chunks of [`stream_text`], cut at [`STREAM_CUTS`].
fn stream_chunks(path: &str) -> Vec<String> {
    let text = stream_text(path);
    let mut bounds = vec![0];
    bounds.extend(STREAM_CUTS);
    bounds.push(text.len());
    assert!(
        bounds.windows(2).all(|w| w[0] < w[1]),
        "cuts inside the text"
    );
    bounds
        .windows(2)
        .map(|w| text[w[0]..w[1]].to_owned())
        .collect()
}

/// What a client receives for the stream context at `path`: the relay's framing of
/// [`stream_text`] (its own ids from 1), keep-alive comments removed.
fn framed_stream(path: &str) -> String {
    stream_text(path)
        .split_terminator("\n\n")
        .enumerate()
        .map(|(n, event)| format!("id: {}\n{event}\n\n", n + 1))
        .collect()
}

fn without_keepalives(body: &str) -> String {
    body.replace(": keepalive\n\n", "")
}

/// A client asking for stream contexts one after another and reading each to its end,
/// once the daemon is online and until the relay stops answering. A body that ends
/// cleanly must be the whole context, or say that storage failed after whole events.
async fn streamer(
    url: String,
    key: String,
    acked: Arc<Mutex<Acked>>,
    online: tokio::sync::oneshot::Receiver<()>,
) {
    if online.await.is_err() {
        return;
    }
    let http = reqwest::Client::new();
    loop {
        let n = {
            let mut a = acked.lock().unwrap();
            a.streams_asked += 1;
            a.streams_asked - 1
        };
        let path = format!("/api/v1/approvals/s{n}/context/stream");
        let Ok(response) = http
            .get(format!(
                "{url}/api/v1/daemons/d/approvals/s{n}/context/stream"
            ))
            .bearer_auth(&key)
            .send()
            .await
        else {
            return;
        };
        if response.status() != 200 {
            return;
        }
        let Ok(body) = response.text().await else {
            return;
        };
        let (body, whole) = (without_keepalives(&body), framed_stream(&path));
        // A database that crashes under a live stream ends it early, but honestly: whole
        // events, then an error event, never like a complete context.
        if let Some(sent) = body.strip_suffix(STORAGE_FAILED_EVENT) {
            assert!(
                whole.starts_with(sent) && (sent.is_empty() || sent.ends_with("\n\n")),
                "a stream cut by a storage failure sent whole events of its context: {sent:?}"
            );
            acked.lock().unwrap().streams_cut += 1;
            return;
        }
        assert_eq!(body, whole, "a stream served live ended early or differs");
    }
}

/// How the relay ends a live stream it can no longer read from its store.
const STORAGE_FAILED_EVENT: &str = "event: error\ndata: {\"code\":\"storage_unavailable\"}\n\n";

/// Uploads a stream command's chunks, one per request, from the one after the last
/// acknowledged. The relay must take each: a `chunk_gap` answer would mean it lost a chunk
/// it acknowledged, `unknown` that it lost the command. Returns false once the relay stops
/// answering.
async fn upload_stream(url: &str, key: &str, acked: &Mutex<Acked>, command: &Value) -> bool {
    let id = command["id"].as_str().unwrap().to_owned();
    let path = command["params"]["path"].as_str().unwrap().to_owned();
    // Read under the lock, asserted after it (a panic must not poison the ledger).
    let (start, complete) = {
        let mut a = acked.lock().unwrap();
        let entry = a.streams.entry(id.clone()).or_insert(StreamAck {
            path: path.clone(),
            acked: None,
            complete: false,
        });
        let progress = (entry.acked.map_or(0, |index| index + 1), entry.complete);
        if progress.0 > 0 && !progress.1 {
            a.resumed_mid_stream += 1;
        }
        progress
    };
    assert!(
        !complete,
        "{id}: handed out again after its last chunk was acknowledged"
    );
    let chunks = stream_chunks(&path);
    for (index, data) in chunks.iter().enumerate().skip(start) {
        let mut chunk = json!({ "command_id": id, "chunk": index, "data": data,
                                "complete": index + 1 == chunks.len() });
        if index == 0 {
            chunk["status"] = json!(200);
            chunk["headers"] = json!({ "content-type": "text/event-stream" });
        }
        let request = json!({ "daemon_id": "d", "results": [chunk] });
        let Ok((status, answer)) = post(url, key, "/sync/results", &request).await else {
            return false;
        };
        match status {
            200 => {}
            409 => panic!(
                "{id}: the relay lost an acknowledged chunk: chunk {index} answered {answer} \
                 after chunk {} was acknowledged",
                index as i64 - 1
            ),
            _ => return false,
        }
        assert_eq!(
            answer["accepted"],
            json!([id]),
            "{id}: chunk {index} not accepted (the relay lost the command?)"
        );
        let mut a = acked.lock().unwrap();
        a.chunk_acks += 1;
        let entry = a.streams.get_mut(&id).unwrap();
        entry.acked = Some(index);
        entry.complete = index + 1 == chunks.len();
    }
    true
}

/// The daemon: posts a batch of updates with every poll, answers every command and uploads
/// every stream command's chunks, until the relay stops answering. It resumes from the
/// relay's `last_update_seq` after a reconnect, as a daemon with an outbox does.
async fn daemon_loop(
    url: String,
    key: String,
    acked: Arc<Mutex<Acked>>,
    online: tokio::sync::oneshot::Sender<()>,
) {
    let Ok((200, connect)) = post(&url, &key, "/sync/connect", &json!({ "daemon_id": "d" })).await
    else {
        return;
    };
    let _ = online.send(());
    let connection_id = connect["connection_id"].clone();
    let mut next_seq = connect["last_update_seq"].as_u64().unwrap() + 1;
    assert!(
        next_seq > acked.lock().unwrap().update_seq,
        "an acknowledged update was lost"
    );
    loop {
        let updates: Vec<Value> = (next_seq..next_seq + BATCH)
            .map(|seq| json!({ "type": "tick", "seq": seq, "data": { "n": seq } }))
            .collect();
        let poll = json!({ "daemon_id": "d", "connection_id": connection_id, "updates": updates,
                           "wait_for_commands": true, "timeout": 0.05 });
        let Ok((200, body)) = post(&url, &key, "/sync/poll", &poll).await else {
            return;
        };
        let stored = body["last_update_seq"].as_u64().unwrap();
        assert_eq!(
            stored,
            next_seq + BATCH - 1,
            "the relay stored the whole batch"
        );
        acked.lock().unwrap().update_seq = stored;
        next_seq = stored + 1;
        let (streams, commands): (Vec<&Value>, Vec<&Value>) = body["commands"]
            .as_array()
            .unwrap()
            .iter()
            .partition(|c| c["stream"] == json!(true));
        for command in streams {
            if !upload_stream(&url, &key, &acked, command).await {
                return;
            }
        }
        let results: Vec<Value> = commands
            .iter()
            .map(|c| json!({ "command_id": c["id"], "result": { "status": 200, "body": c["id"] } }))
            .collect();
        if results.is_empty() {
            continue;
        }
        let request = json!({ "daemon_id": "d", "results": results });
        let Ok((200, answer)) = post(&url, &key, "/sync/results", &request).await else {
            return;
        };
        let mut acked = acked.lock().unwrap();
        for id in answer["accepted"].as_array().unwrap() {
            acked.results.insert(id.as_str().unwrap().to_owned());
        }
    }
}

/// An operator creating client keys (`POST /admin/keys`), a few a second, until the relay
/// stops answering: `syncrelay keys create` prints a token once its 201 arrives, and the
/// key must work from then on.
async fn key_maker(url: String, admin: String, acked: Arc<Mutex<Acked>>) {
    let http = reqwest::Client::new();
    loop {
        let Ok((201, body)) = post_with(
            &http,
            &url,
            &admin,
            "/admin/keys",
            &json!({ "role": "client", "scope": ["d"] }),
        )
        .await
        else {
            return;
        };
        let id = body["key_id"]
            .as_str()
            .expect("a created key's id")
            .to_owned();
        acked.lock().unwrap().keys.insert(id);
        // Pacing: an operator's rate, so that keys are created through the whole round.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Runs the workload until some of everything was acknowledged, then strikes: the relay
/// SIGKILLed, or its database stopped the way a crash stops it.
async fn run_and_kill(
    url: &str,
    keys: &Keys,
    acked: &Arc<Mutex<Acked>>,
    progress: usize,
    strike: impl FnOnce(),
) {
    let before = {
        let a = acked.lock().unwrap();
        (
            a.commands.len(),
            a.results.len(),
            a.update_seq,
            a.chunk_acks,
            a.keys.len(),
        )
    };
    let mut tasks = vec![tokio::spawn(key_maker(
        url.to_owned(),
        keys.admin.clone(),
        acked.clone(),
    ))];
    for id in 0..WRITERS {
        tasks.push(tokio::spawn(writer(
            url.to_owned(),
            keys.client.clone(),
            acked.clone(),
            id,
        )));
    }
    let (online_tx, online_rx) = tokio::sync::oneshot::channel();
    tasks.push(tokio::spawn(streamer(
        url.to_owned(),
        keys.client.clone(),
        acked.clone(),
        online_rx,
    )));
    tasks.push(tokio::spawn(daemon_loop(
        url.to_owned(),
        keys.daemon.clone(),
        acked.clone(),
        online_tx,
    )));
    eventually(Duration::from_secs(30), || {
        let a = acked.lock().unwrap();
        let progressed = a.commands.len() > before.0 + progress
            && a.results.len() > before.1 + progress / 3
            && a.update_seq > before.2 + progress as u64
            && a.chunk_acks > before.3 + 2
            && a.keys.len() > before.4;
        async move { progressed }
    })
    .await;
    // Kill at a random moment while every task still has requests in flight.
    let delay = rand::random::<u64>() % 40;
    tokio::time::sleep(Duration::from_millis(delay)).await;
    strike();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("workload tasks stop once the relay is gone")
            .expect("no assertion failed in a workload task");
    }
}

/// What each round of a loop strikes.
enum Fault<'a> {
    /// SIGKILL the relay, run this (a power cut drops what was not synced), restart it.
    KillRelay(Box<dyn FnMut() + 'a>),
    /// Stop its PostgreSQL with `pg_ctl stop -m immediate` under load and start it again;
    /// the relay process stays, and must serve again by itself.
    RestartDatabase(&'a PgCluster),
}

/// `rounds` SIGKILLs of the relay on `data_dir`, each after at least `progress`
/// acknowledged writes, each followed by `after_kill` (a power cut drops what was not
/// synced) before the restart; then checks everything acknowledged and returns what was.
pub async fn crash_loop(
    data_dir: &Path,
    rounds: usize,
    progress: usize,
    after_kill: impl FnMut(),
) -> Acked {
    fault_loop(
        data_dir,
        rounds,
        progress,
        Fault::KillRelay(Box::new(after_kill)),
    )
    .await
}

/// `rounds` crashes of the relay's PostgreSQL (`cluster`, which the data dir's
/// [`super::STORE_FILE`] names) under load, each after at least `progress` acknowledged
/// writes, then checks everything acknowledged on the same relay process.
pub async fn database_outage_loop(
    data_dir: &Path,
    cluster: &PgCluster,
    rounds: usize,
    progress: usize,
) -> Acked {
    fault_loop(data_dir, rounds, progress, Fault::RestartDatabase(cluster)).await
}

async fn fault_loop(
    data_dir: &Path,
    rounds: usize,
    progress: usize,
    mut fault: Fault<'_>,
) -> Acked {
    let relay = RelayProcess::spawn(data_dir);
    let admin = relay.admin_token();
    let keys = Keys {
        admin: admin.clone(),
        daemon: create_key(
            &relay.url,
            &admin,
            json!({ "role": "daemon", "daemon": "d" }),
        )
        .await,
        client: create_key(
            &relay.url,
            &admin,
            json!({ "role": "client", "scope": ["d"] }),
        )
        .await,
    };
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut relay = Some(relay);
    for _ in 0..rounds {
        match &mut fault {
            Fault::KillRelay(after_kill) => {
                let current = relay
                    .take()
                    .unwrap_or_else(|| RelayProcess::spawn(data_dir));
                assert_eq!(
                    current.admin_token(),
                    admin,
                    "admin.key kept across the restart"
                );
                let url = current.url.clone();
                run_and_kill(&url, &keys, &acked, progress, || current.kill()).await;
                after_kill();
            }
            Fault::RestartDatabase(cluster) => {
                let current = relay.as_ref().expect("one relay throughout");
                run_and_kill(&current.url, &keys, &acked, progress, || {
                    cluster.stop_immediate()
                })
                .await;
                cluster.start_again();
            }
        }
    }

    // Check everything that was acknowledged: on a restarted relay, or on the one that
    // lived through its database's crashes.
    let relay = relay.unwrap_or_else(|| RelayProcess::spawn(data_dir));
    assert_eq!(
        relay.admin_token(),
        admin,
        "admin.key kept across the restart"
    );
    let mut acked = std::mem::take(&mut *acked.lock().unwrap());
    let url = relay.url.as_str();
    let unfinished = acked.streams.values().filter(|s| !s.complete).count();

    // Change log: every acknowledged update exactly once, in daemon order, dense.
    let mut entries = Vec::new();
    let mut since = 0;
    loop {
        let batch = get(
            url,
            &keys.client,
            &format!("/api/v1/daemons/d/changes?since={since}&limit=1000"),
        )
        .await;
        let changes = batch["changes"].as_array().unwrap().clone();
        if changes.is_empty() {
            break;
        }
        since = batch["last_seq"].as_u64().unwrap();
        entries.extend(changes);
    }
    let daemon_seqs: Vec<u64> = entries
        .iter()
        .map(|e| e["data"]["n"].as_u64().unwrap())
        .collect();
    let relay_seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(daemon_seqs.len() as u64 >= acked.update_seq);
    assert_eq!(
        daemon_seqs,
        (1..=daemon_seqs.len() as u64).collect::<Vec<_>>(),
        "each update once, in order"
    );
    assert_eq!(
        relay_seqs, daemon_seqs,
        "relay seqs are dense and follow the daemon's order"
    );

    // Deliver at once what is still due, before the slow per-command checks below (the
    // shipped rate limit paces them; a long run's take minutes): a stream command waits at
    // most `wait_max` for its daemon, and must not expire while the test reads states.
    // Uploads resume from the chunk after the last acknowledged one (`upload_stream`);
    // other commands are taken now and answered once the states have been read.
    let (status, connect) = post(
        url,
        &keys.daemon,
        "/sync/connect",
        &json!({ "daemon_id": "d" }),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        connect["last_update_seq"].as_u64().unwrap(),
        daemon_seqs.len() as u64
    );
    let mut delivered = BTreeSet::new();
    let mut to_answer = Vec::new();
    let uploads = Mutex::new(Acked {
        streams: std::mem::take(&mut acked.streams),
        ..Acked::default()
    });
    loop {
        let poll = json!({ "daemon_id": "d", "connection_id": connect["connection_id"], "wait_for_commands": false });
        let (status, body) = post(url, &keys.daemon, "/sync/poll", &poll).await.unwrap();
        assert_eq!(status, 200);
        let commands = body["commands"].as_array().unwrap().clone();
        if commands.is_empty() {
            break;
        }
        for command in &commands {
            let id = command["id"].as_str().unwrap().to_owned();
            assert!(
                !acked.results.contains(&id),
                "{id} already had an acknowledged result"
            );
            assert!(
                delivered.insert(id.clone()),
                "{id} delivered twice after the restart"
            );
            if command["stream"] == json!(true) {
                assert!(
                    upload_stream(url, &keys.daemon, &uploads, command).await,
                    "the restarted relay takes the rest of {id}'s chunks"
                );
            } else {
                to_answer.push(json!({ "command_id": id, "result": { "status": 200 } }));
            }
        }
    }

    // Keys: every one whose creation was acknowledged is there.
    let listed: BTreeSet<String> = get(url, &admin, "/admin/keys").await["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key_id"].as_str().unwrap().to_owned())
        .collect();
    let lost: Vec<_> = acked.keys.difference(&listed).collect();
    assert!(lost.is_empty(), "acknowledged keys lost: {lost:?}");

    // Results: every acknowledged one is stored, with its body.
    for id in &acked.results {
        let state = get(url, &keys.client, &format!("/api/v1/commands/{id}")).await;
        assert_eq!(state["state"], "completed", "{id}");
        assert_eq!(state["result"]["body"], json!(id));
    }

    // Commands: every acknowledged one exists; those without a result were delivered
    // after the restart, each once, and none that already had a result came again.
    let mut pending: BTreeSet<String> = BTreeSet::new();
    for id in &acked.commands {
        let state = get(url, &keys.client, &format!("/api/v1/commands/{id}")).await;
        if state["state"] != "completed" {
            assert_eq!(state["state"], "delivered", "{id}: {state}");
            pending.insert(id.clone());
        }
    }
    for results in to_answer.chunks(100) {
        let (status, _) = post(
            url,
            &keys.daemon,
            "/sync/results",
            &json!({ "daemon_id": "d", "results": results }),
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
    }
    let missing: Vec<_> = pending.difference(&delivered).collect();
    assert!(
        missing.is_empty(),
        "acknowledged commands never delivered: {missing:?}"
    );

    // Stream contexts: every upload was finished (one unfinished by the ledger was handed
    // out again, or the relay had stored its last chunk but the answer was lost), and each
    // replays from the relay's store, whole and byte-exact, without a new fetch.
    let uploads = uploads.into_inner().unwrap();
    acked.streams = uploads.streams;
    acked.resumed_mid_stream += uploads.resumed_mid_stream;
    for (id, stream) in &acked.streams {
        let state = get(url, &keys.client, &format!("/api/v1/commands/{id}")).await;
        assert_eq!(state["state"], "completed", "{id}: {state}");
        if !stream.complete {
            acked.streams_unconfirmed += 1;
        }
        let name = stream.path.trim_start_matches("/api/v1/");
        let response = get_response(url, &keys.client, &format!("/api/v1/daemons/d/{name}")).await;
        assert_eq!(response.headers()["x-syncrelay-source"], "cache", "{id}");
        let body = response.text().await.unwrap();
        assert_eq!(
            without_keepalives(&body),
            framed_stream(&stream.path),
            "{id}: the stored context differs"
        );
    }
    acked.streams_resumed = unfinished - acked.streams_unconfirmed;
    // Uploads cut by a kill are handed out again; the long run must have resumed some
    // part-way, or "resuming never meets a gap" was not exercised.
    assert!(
        rounds < 50 || acked.resumed_mid_stream > 0,
        "no upload resumed part-way in {rounds} rounds"
    );
    assert!(
        acked.chunk_acks > rounds * 2,
        "the workload uploaded chunks: {} acknowledged in {rounds} rounds",
        acked.chunk_acks
    );
    assert!(
        acked.commands.len() > rounds * progress
            && acked.results.len() > rounds * progress / 3
            && acked.keys.len() >= rounds,
        "the workload ran: {} commands, {} results, {} keys acknowledged in {rounds} rounds",
        acked.commands.len(),
        acked.results.len(),
        acked.keys.len()
    );
    relay.kill();
    acked
}

/// Which process a kill of [`agent_crash_loop`] strikes.
#[derive(Clone, Copy, PartialEq)]
pub enum Strike {
    /// The relay or the agent: alternating for the first two kills, then at random.
    RelayOrAgent,
    /// The agent only.
    Agent,
}

/// What [`agent_crash_loop`] did.
pub struct AgentLoop {
    pub relay_kills: usize,
    pub agent_kills: usize,
    pub checked: chaos::Checked,
}

/// `kills` SIGKILLs, each of the process `strike` picks, each after at least `progress`
/// more acknowledged writes and change-log entries, at a random moment 0–40 ms later; the
/// relay restarts on its data dir (under `dir`) and address, the agent on `state_dir`
/// after `after_agent_kill` (a power cut drops what it did not sync). Then everything
/// acknowledged is checked.
pub async fn agent_crash_loop(
    dir: &Path,
    state_dir: &Path,
    kills: usize,
    progress: usize,
    strike: Strike,
    sync: &str,
    mut after_agent_kill: impl FnMut(),
) -> AgentLoop {
    let relay_dir = dir.join("relay");
    let mut relay = RelayProcess::spawn(&relay_dir);
    let listen = relay.url.trim_start_matches("http://").to_owned();
    let admin = relay.admin_token();
    let daemon_key = create_key(
        &relay.url,
        &admin,
        json!({ "role": "daemon", "daemon": DAEMON }),
    )
    .await;
    let client_key = create_key(
        &relay.url,
        &admin,
        json!({ "role": "client", "scope": [DAEMON] }),
    )
    .await;
    let daemon = Arc::new(TestDaemon::start().await);
    let url = relay.url.clone();
    let spawn_agent =
        || AgentProcess::spawn_syncing(&url, DAEMON, &daemon_key, &daemon.target, state_dir, sync);
    let mut agent = spawn_agent();

    let ledger = Arc::new(Ledger::default());
    let stop = CancellationToken::new();
    let tasks = chaos::spawn_workload(&relay.url, &client_key, &daemon, &ledger, &stop);

    let http = chaos::http_client();
    let started = std::time::Instant::now();
    let (mut relay_kills, mut agent_kills) = (0, 0);
    for kill in 0..kills {
        let writes = ledger.acknowledged_writes();
        let logged = chaos::log_len(&http, &relay.url, &client_key).await;
        let (url, key, http_ref, ledger_ref) = (&relay.url, &client_key, &http, &ledger);
        eventually(Duration::from_secs(60), || async move {
            ledger_ref.acknowledged_writes() >= writes + progress
                && chaos::log_len(http_ref, url, key).await >= logged + progress as u64
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 40)).await;
        let kill_relay = match (strike, kill) {
            (Strike::Agent, _) => false,
            (Strike::RelayOrAgent, 0) => true,
            (Strike::RelayOrAgent, 1) => false,
            (Strike::RelayOrAgent, _) => rand::random::<bool>(),
        };
        if kill_relay {
            relay.kill();
            relay = RelayProcess::spawn_at(&relay_dir, &listen);
            relay_kills += 1;
        } else {
            agent.kill();
            after_agent_kill();
            agent = spawn_agent();
            agent_kills += 1;
        }
    }
    chaos::stop_workload(stop, tasks).await;
    let checked = chaos::check(&relay.url, &client_key, &daemon, &ledger, false).await;
    assert!(
        checked.writes > 0 && checked.streams_replayed > 0,
        "the workload wrote and uploaded whole contexts: {checked:?}"
    );
    eprintln!(
        "relay and agent crash loop: {relay_kills} relay kills and {agent_kills} agent kills in \
         {:.0} s; {} client retries; checked {checked:?}; lost 0",
        started.elapsed().as_secs_f64(),
        ledger.retries.load(std::sync::atomic::Ordering::Relaxed),
    );
    agent.kill();
    relay.kill();
    AgentLoop {
        relay_kills,
        agent_kills,
        checked,
    }
}
