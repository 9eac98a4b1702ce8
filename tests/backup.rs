//! Backup and restore as DESIGN.md promises them: "stop and copy `data_dir`" is a complete
//! backup, and "restoring is starting the relay on the copied directory". A real relay
//! process takes keys, change-log entries, queued writes and results; it is stopped (SIGTERM,
//! or SIGKILL: sled must recover), its data dir is copied with plain file copies and the
//! original deleted, and a relay started on the copy (on a new port) must show everything
//! that was acknowledged, unchanged: keys (admin.key included), the change log with the same
//! seqs, every command in the same state with the same result, idempotency keys, the
//! daemon's update-seq dedup, and the unfinished commands delivered on the next poll.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{create_key, Daemon, RelayProcess};
use serde_json::{json, Value};

/// How the relay is stopped before its data dir is copied.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// SIGTERM: stop accepting, answer waiting polls, flush, close the store.
    Graceful,
    /// SIGKILL: no shutdown code runs; sled recovers from what was flushed.
    Sigkill,
}

/// Writes queued (and delivered) before the daemon's first command poll.
const FIRST_WRITES: usize = 5;
/// Writes queued afterwards, while the daemon is not polling: still `queued` at the backup.
const LATER_WRITES: usize = 3;
/// Updates posted per poll; three polls before the backup.
const UPDATES_PER_POLL: u64 = 4;
const UPDATES: u64 = 3 * UPDATES_PER_POLL;

/// Plain recursive copy of a directory tree (regular files and directories only: anything
/// else in a data dir would be a surprise worth failing on).
fn copy_dir(from: &Path, to: &Path) -> u64 {
    std::fs::create_dir(to).unwrap_or_else(|e| panic!("mkdir {}: {e}", to.display()));
    let mut bytes = 0;
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            bytes += copy_dir(&entry.path(), &target);
        } else if kind.is_file() {
            bytes += std::fs::copy(entry.path(), &target)
                .unwrap_or_else(|e| panic!("copy {}: {e}", entry.path().display()));
        } else {
            panic!(
                "unexpected {kind:?} in the data dir: {}",
                entry.path().display()
            );
        }
    }
    bytes
}

/// `GET` with a bearer token; returns status and JSON body (null if none).
async fn get(url: &str, token: &str, route: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(format!("{url}{route}"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {route}: {e}"));
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get_ok(url: &str, token: &str, route: &str) -> Value {
    let (status, body) = get(url, token, route).await;
    assert_eq!(status, 200, "GET {route}: {body}");
    body
}

/// The `n`th mirrored write, with a method and path of its own.
fn write_request(n: usize) -> (reqwest::Method, String) {
    match n % 4 {
        0 => (reqwest::Method::POST, "/api/v1/daemons/d/jobs".to_owned()),
        1 => (reqwest::Method::PUT, format!("/api/v1/daemons/d/jobs/{n}")),
        2 => (
            reqwest::Method::PATCH,
            format!("/api/v1/daemons/d/jobs/{n}"),
        ),
        _ => (
            reqwest::Method::DELETE,
            format!("/api/v1/daemons/d/jobs/{n}"),
        ),
    }
}

/// Sends the `n`th write with `Prefer: respond-async` and `Idempotency-Key: job-{n}`;
/// asserts `202` with a `Location` naming the command and returns the command view.
async fn queue_write(url: &str, client_key: &str, n: usize) -> Value {
    let (method, path) = write_request(n);
    let response = reqwest::Client::new()
        .request(method, format!("{url}{path}"))
        .bearer_auth(client_key)
        .header("prefer", "respond-async")
        .header("idempotency-key", format!("job-{n}"))
        .json(&json!({ "job": n }))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("relay reachable");
    assert_eq!(response.status(), 202, "write {n}");
    let location = response
        .headers()
        .get("location")
        .expect("202 carries Location")
        .to_str()
        .unwrap()
        .to_owned();
    let view: Value = response.json().await.unwrap();
    let id = view["id"].as_str().expect("command id");
    assert_eq!(location, format!("/api/v1/commands/{id}"));
    view
}

/// Daemon-side updates `from..from+count`, each with a seq, a type, a time and data.
fn updates(from: u64, count: u64) -> Value {
    (from..from + count)
        .map(|seq| {
            json!({
                "type": if seq % 2 == 0 { "session_updated" } else { "session_created" },
                "seq": seq,
                "timestamp": format!("2026-01-01T00:00:{seq:02}Z"),
                "data": { "n": seq, "session_id": format!("s{}", seq % 3) },
            })
        })
        .collect::<Vec<_>>()
        .into()
}

/// One poll with updates, not waiting; asserts 200 and the stored seq, returns the commands.
async fn poll_with(daemon: &Daemon, updates: Value, expect_seq: u64) -> Vec<Value> {
    let (status, body) = daemon.poll_raw(updates, false, 0.0).await;
    assert_eq!(status, 200, "poll: {body}");
    assert_eq!(body["last_update_seq"], json!(expect_seq), "poll: {body}");
    body["commands"].as_array().cloned().unwrap()
}

fn ids(commands: &[Value]) -> BTreeSet<String> {
    commands
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Everything the original relay acknowledged, as its own API showed it just before the
/// stop.
struct Backup {
    admin_token: String,
    daemon_key: String,
    client_key: String,
    admin_keys: Value,
    daemon_view: Value,
    changes: Value,
    /// Command id → its view (`GET /api/v1/commands/{id}`), for every write.
    commands: BTreeMap<String, Value>,
    /// Command id → write number, for the idempotent retries.
    write_of: BTreeMap<String, usize>,
    /// Commands without a result at the backup (queued, or delivered without result).
    unfinished: BTreeSet<String>,
}

/// Runs the workload against a fresh relay in `dir` and returns what it acknowledged,
/// with the relay still running.
async fn fill(dir: &Path) -> (RelayProcess, Backup) {
    let relay = RelayProcess::spawn(dir);
    let url = relay.url.clone();
    let admin_token = relay.admin_token();
    let daemon_key = create_key(
        &url,
        &admin_token,
        json!({ "role": "daemon", "daemon": "d" }),
    )
    .await;
    let client_key = create_key(
        &url,
        &admin_token,
        json!({ "role": "client", "scope": ["d"] }),
    )
    .await;

    let mut daemon = Daemon::new(&url, "d", &daemon_key);
    let connect = daemon.connect().await;
    assert_eq!(connect["last_update_seq"], 0);

    // Updates 1..=4 with an empty queue.
    let commands = poll_with(&daemon, updates(1, UPDATES_PER_POLL), UPDATES_PER_POLL).await;
    assert!(commands.is_empty(), "{commands:?}");

    // Writes queued while the daemon is not polling.
    let mut write_of = BTreeMap::new();
    let mut first = Vec::new();
    for n in 0..FIRST_WRITES {
        let view = queue_write(&url, &client_key, n).await;
        assert_eq!(view["state"], "queued", "{view}");
        let id = view["id"].as_str().unwrap().to_owned();
        write_of.insert(id.clone(), n);
        first.push(id);
    }

    // The daemon's next poll (with updates 5..=8) takes all of them.
    let delivered = poll_with(
        &daemon,
        updates(UPDATES_PER_POLL + 1, UPDATES_PER_POLL),
        2 * UPDATES_PER_POLL,
    )
    .await;
    assert_eq!(
        ids(&delivered),
        first.iter().cloned().collect::<BTreeSet<_>>(),
        "the poll hands out every queued write"
    );

    // Results: #0 completes, #1 fails, #2 completes; #3 and #4 stay delivered without one.
    // An unknown id is listed as unknown without failing the batch.
    let answer = daemon
        .results(json!([
            { "command_id": first[0], "result": { "status": 201, "headers": { "content-type": "application/json" }, "body": { "done": 0 } } },
            { "command_id": first[1], "error": { "code": "conflict", "message": "job 1 is locked" } },
            { "command_id": first[2], "result": { "status": 200, "headers": { "x-job": "2" }, "body": "done 2" } },
            { "command_id": "cmd-never-issued", "result": { "status": 200 } },
        ]))
        .await;
    assert_eq!(answer["accepted"], json!([first[0], first[1], first[2]]));
    assert_eq!(answer["unknown"], json!(["cmd-never-issued"]));
    // Second results are accepted and ignored: the first one wins.
    let answer = daemon
        .results(json!([
            { "command_id": first[0], "result": { "status": 500, "body": "second" } },
            { "command_id": first[1], "result": { "status": 200, "body": "second" } },
            { "command_id": first[2], "error": { "code": "late", "message": "second" } },
        ]))
        .await;
    assert_eq!(answer["accepted"], json!([first[0], first[1], first[2]]));

    // Updates 9..=12; the leased commands are not handed out again yet.
    let commands = poll_with(
        &daemon,
        updates(2 * UPDATES_PER_POLL + 1, UPDATES_PER_POLL),
        UPDATES,
    )
    .await;
    assert!(
        commands.is_empty(),
        "leased commands came again: {commands:?}"
    );

    // More writes, while the daemon is not polling: they stay queued.
    let mut later = Vec::new();
    for n in FIRST_WRITES..FIRST_WRITES + LATER_WRITES {
        let view = queue_write(&url, &client_key, n).await;
        let id = view["id"].as_str().unwrap().to_owned();
        write_of.insert(id.clone(), n);
        later.push(id);
    }

    // What the relay shows now is what the backup must hold.
    let mut commands = BTreeMap::new();
    for id in write_of.keys() {
        let view = get_ok(&url, &client_key, &format!("/api/v1/commands/{id}")).await;
        commands.insert(id.clone(), view);
    }
    let state = |id: &String| commands[id]["state"].as_str().unwrap().to_owned();
    assert_eq!(state(&first[0]), "completed");
    assert_eq!(commands[&first[0]]["result"]["body"], json!({ "done": 0 }));
    assert_eq!(state(&first[1]), "failed");
    assert_eq!(commands[&first[1]]["error"]["code"], "conflict");
    assert_eq!(state(&first[2]), "completed");
    assert_eq!(commands[&first[2]]["result"]["body"], "done 2");
    assert_eq!(state(&first[3]), "delivered");
    assert_eq!(state(&first[4]), "delivered");
    for id in &later {
        assert_eq!(state(id), "queued");
    }
    let unfinished: BTreeSet<String> = [&first[3], &first[4]]
        .into_iter()
        .chain(&later)
        .cloned()
        .collect();

    let changes = get_ok(
        &url,
        &client_key,
        "/api/v1/daemons/d/changes?since=0&limit=1000",
    )
    .await;
    let entries = changes["changes"].as_array().unwrap();
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=UPDATES).collect::<Vec<_>>(), "{changes}");
    for entry in entries {
        assert_eq!(entry["data"]["n"], entry["seq"], "{entry}");
    }
    assert_eq!(changes["last_seq"], json!(UPDATES));

    let daemon_view = get_ok(&url, &client_key, "/api/v1/daemons/d").await;
    assert_eq!(daemon_view["last_seq"], json!(UPDATES), "{daemon_view}");
    let admin_keys = get_ok(&url, &admin_token, "/admin/keys").await;

    let backup = Backup {
        admin_token,
        daemon_key,
        client_key,
        admin_keys,
        daemon_view,
        changes,
        commands,
        write_of,
        unfinished,
    };
    (relay, backup)
}

/// Stops the relay as `how` says and waits for the process to be gone.
async fn stop(mut relay: RelayProcess, how: Stop) {
    match how {
        Stop::Graceful => {
            let pid = relay.child.id().to_string();
            assert!(Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success());
            let exit = tokio::time::timeout(
                Duration::from_secs(30),
                tokio::task::spawn_blocking(move || relay.child.wait().unwrap()),
            )
            .await
            .expect("the relay exits after SIGTERM")
            .unwrap();
            assert!(exit.success(), "graceful stop: {exit:?}");
        }
        Stop::Sigkill => relay.kill(),
    }
}

/// Checks a relay started on the copy against what the original acknowledged.
async fn verify(restored: &RelayProcess, backup: &Backup) {
    let url = restored.url.as_str();

    // Keys: admin.key came along and still authenticates; no new admin key was made.
    assert_eq!(restored.admin_token(), backup.admin_token);
    let admin_keys = get_ok(url, &backup.admin_token, "/admin/keys").await;
    assert_eq!(admin_keys, backup.admin_keys, "the same keys");
    assert_eq!(
        admin_keys["keys"].as_array().unwrap().len(),
        3,
        "{admin_keys}"
    );
    let (status, _) = get(url, "srk_bogus_token", "/api/v1/daemons").await;
    assert_eq!(status, 401, "an unknown key is still refused");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(restored.data_dir.join("admin.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "admin.key stays private");
    }

    // The daemon as clients see it: same last seq, same queue.
    let daemon_view = get_ok(url, &backup.client_key, "/api/v1/daemons/d").await;
    for field in ["daemon_id", "last_seq", "queued", "version", "capabilities"] {
        assert_eq!(
            daemon_view[field], backup.daemon_view[field],
            "{field}: {daemon_view} vs {}",
            backup.daemon_view
        );
    }

    // The change log: every entry, same seqs, same content, same order.
    let changes = get_ok(
        url,
        &backup.client_key,
        "/api/v1/daemons/d/changes?since=0&limit=1000",
    )
    .await;
    assert_eq!(changes, backup.changes, "the change log");

    // Every command in the same state with the same result, found where Location said.
    for (id, before) in &backup.commands {
        let after = get_ok(url, &backup.client_key, &format!("/api/v1/commands/{id}")).await;
        assert_eq!(&after, before, "command {id}");
    }

    // Idempotency keys came along: a client retrying a write gets the same command.
    for (id, n) in &backup.write_of {
        let view = queue_write(url, &backup.client_key, *n).await;
        assert_eq!(view["id"], json!(id), "retry of write {n}");
        assert_eq!(
            view["state"], backup.commands[id]["state"],
            "retry of write {n}"
        );
    }

    // The daemon reconnects: the relay knows its last update seq, a resent batch is dropped,
    // and the log goes on from there.
    let mut daemon = Daemon::new(url, "d", &backup.daemon_key);
    let connect = daemon.connect().await;
    assert_eq!(connect["last_update_seq"], json!(UPDATES), "{connect}");
    let mut delivered: Vec<Value> = poll_with(&daemon, updates(UPDATES - 1, 2), UPDATES).await;
    // Every unfinished command comes (again) on the first polls, each once, and nothing that
    // already had a result.
    loop {
        let more = poll_with(&daemon, json!([]), UPDATES).await;
        if more.is_empty() {
            break;
        }
        delivered.extend(more);
    }
    let delivered_ids: Vec<String> = delivered
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        delivered_ids.iter().cloned().collect::<BTreeSet<_>>(),
        backup.unfinished,
        "unfinished commands are delivered after the restore, finished ones are not"
    );
    assert_eq!(
        delivered_ids.len(),
        backup.unfinished.len(),
        "each once: {delivered_ids:?}"
    );
    for command in &delivered {
        let n = backup.write_of[command["id"].as_str().unwrap()];
        let (method, path) = write_request(n);
        assert_eq!(command["method"], "http");
        assert_eq!(command["params"]["method"], method.as_str(), "{command}");
        assert_eq!(
            command["params"]["path"],
            path.replace("/daemons/d", ""),
            "{command}"
        );
        assert_eq!(command["params"]["body"], json!({ "job": n }), "{command}");
    }
    let results: Vec<Value> = delivered_ids
        .iter()
        .map(|id| json!({ "command_id": id, "result": { "status": 200, "body": { "after_restore": id } } }))
        .collect();
    let answer = daemon.results(Value::Array(results)).await;
    assert_eq!(answer["accepted"], json!(delivered_ids));
    for id in &delivered_ids {
        let view = get_ok(url, &backup.client_key, &format!("/api/v1/commands/{id}")).await;
        assert_eq!(view["state"], "completed", "{view}");
        assert_eq!(view["result"]["body"], json!({ "after_restore": id }));
    }

    // New updates continue the same sequence.
    poll_with(&daemon, updates(UPDATES + 1, 1), UPDATES + 1).await;
    let tail = get_ok(
        url,
        &backup.client_key,
        &format!("/api/v1/daemons/d/changes?since={UPDATES}"),
    )
    .await;
    let tail = tail["changes"].as_array().unwrap();
    assert_eq!(tail.len(), 1, "{tail:?}");
    assert_eq!(tail[0]["seq"], json!(UPDATES + 1));
    assert_eq!(tail[0]["data"]["n"], json!(UPDATES + 1));
}

/// Fill a relay, stop it as `how` says, copy its data dir, delete the original, start a
/// relay on the copy and check it.
async fn backup_and_restore(how: Stop) {
    let original = tempfile::tempdir().unwrap();
    let (relay, backup) = fill(original.path()).await;
    stop(relay, how).await;

    let copies = tempfile::tempdir().unwrap();
    let copy = copies.path().join("restored-data");
    let bytes = copy_dir(original.path(), &copy);
    assert!(bytes > 0);
    assert!(copy.join("admin.key").is_file());
    original.close().expect("delete the original data dir");

    let restored = RelayProcess::spawn(&copy);
    verify(&restored, &backup).await;
    restored.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_of_a_stopped_relay_is_a_complete_backup() {
    tokio::time::timeout(Duration::from_secs(60), backup_and_restore(Stop::Graceful))
        .await
        .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_of_a_killed_relay_loses_nothing_acknowledged() {
    tokio::time::timeout(Duration::from_secs(60), backup_and_restore(Stop::Sigkill))
        .await
        .expect("bounded in time");
}

/// What the load acknowledged: change-log seqs and queued command ids.
#[derive(Default)]
struct Acked {
    last_seq: u64,
    /// (daemon id, command id).
    commands: Vec<(&'static str, String)>,
}

/// Daemon-side load: batches of 1 KiB updates, one poll each; records the seqs acked.
async fn post_updates(daemon: Daemon, acked: Arc<Mutex<Acked>>, stop: Arc<AtomicBool>) {
    let mut next = 1;
    while !stop.load(Ordering::Relaxed) {
        let batch: Value = (next..next + 20)
            .map(|seq| json!({ "type": "session_updated", "seq": seq, "data": { "pad": "x".repeat(1024), "n": seq } }))
            .collect::<Vec<_>>()
            .into();
        let (status, body) = daemon.poll_raw(batch, false, 0.0).await;
        if status == 200 {
            let seq = body["last_update_seq"].as_u64().unwrap();
            assert_eq!(seq, next + 19, "{body}");
            acked.lock().unwrap().last_seq = seq;
            next += 20;
        } else {
            assert_eq!(status, 429, "only rate limits may refuse the load: {body}");
        }
    }
}

/// Client-side load: queued writes; records the command ids acked with 202.
async fn queue_writes(
    url: String,
    key: String,
    daemon_id: &'static str,
    acked: Arc<Mutex<Acked>>,
    stop: Arc<AtomicBool>,
) {
    let http = reqwest::Client::new();
    while !stop.load(Ordering::Relaxed) {
        let response = http
            .post(format!("{url}/api/v1/daemons/{daemon_id}/jobs"))
            .bearer_auth(&key)
            .header("prefer", "respond-async")
            .json(&json!({ "job": "x".repeat(512) }))
            .send()
            .await
            .expect("relay reachable");
        match response.status().as_u16() {
            202 => {
                let view: Value = response.json().await.unwrap();
                let id = view["id"].as_str().unwrap().to_owned();
                acked.lock().unwrap().commands.push((daemon_id, id));
            }
            429 => {}
            other => panic!("write answered {other}"),
        }
    }
}

/// `syncrelay backup --to DIR` while a daemon posts updates and clients queue writes: the
/// copy, started as a relay of its own, holds everything acknowledged before the backup
/// began, and is consistent (no seq holes, every queued command deliverable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_backup_under_load_restores_everything_acknowledged() {
    tokio::time::timeout(Duration::from_secs(120), online_backup_under_load())
        .await
        .expect("bounded in time");
}

async fn online_backup_under_load() {
    let original = tempfile::tempdir().unwrap();
    let relay = RelayProcess::spawn(original.path());
    let admin = relay.admin_token();
    let daemon_key = relay
        .create_key(json!({ "role": "daemon", "daemon": "d" }))
        .await;
    let client_key = relay
        .create_key(json!({ "role": "client", "scope": ["d", "e"] }))
        .await;
    let mut daemon = Daemon::new(&relay.url, "d", &daemon_key);
    daemon.connect().await;
    // Daemon e connects once and then stays away: its writes stay queued.
    let e_key = relay
        .create_key(json!({ "role": "daemon", "daemon": "e" }))
        .await;
    Daemon::new(&relay.url, "e", &e_key).connect().await;

    let acked = Arc::new(Mutex::new(Acked::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = [
        tokio::spawn(post_updates(daemon, acked.clone(), stop.clone())),
        tokio::spawn(queue_writes(
            relay.url.clone(),
            client_key.clone(),
            "d",
            acked.clone(),
            stop.clone(),
        )),
        tokio::spawn(queue_writes(
            relay.url.clone(),
            client_key.clone(),
            "e",
            acked.clone(),
            stop.clone(),
        )),
    ];
    // Some megabytes in the store first, so the copy takes a while under load.
    common::eventually(Duration::from_secs(30), || {
        let acked = acked.clone();
        async move {
            let acked = acked.lock().unwrap();
            acked.last_seq >= 10_000 && acked.commands.len() >= 1_000
        }
    })
    .await;

    let (seq_before, commands_before) = {
        let acked = acked.lock().unwrap();
        (acked.last_seq, acked.commands.clone())
    };
    let copies = tempfile::tempdir().unwrap();
    let copy = copies.path().join("backup");
    let output = relay.backup(&copy).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "backup: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.starts_with("backed up "), "{stdout}");
    eprintln!("{stdout}");
    // The load went on during the backup and after it.
    let seq_after_backup = acked.lock().unwrap().last_seq;
    common::eventually(Duration::from_secs(30), || {
        let acked = acked.clone();
        async move { acked.lock().unwrap().last_seq > seq_after_backup }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    // A second backup into the same directory is refused, naming the problem.
    let again = relay.backup(&copy).await;
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("is not empty"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    relay.kill();
    original.close().unwrap();

    let restored = RelayProcess::spawn(&copy);
    assert_eq!(
        restored.admin_token(),
        admin,
        "the admin key is in the copy"
    );
    // The change log: every seq acknowledged before the backup, and no holes.
    let mut since = 0;
    let mut seen = 0;
    loop {
        let page = get_ok(
            &restored.url,
            &client_key,
            &format!("/api/v1/daemons/d/changes?since={since}&limit=1000"),
        )
        .await;
        let changes = page["changes"].as_array().unwrap();
        if changes.is_empty() {
            break;
        }
        for change in changes {
            seen += 1;
            assert_eq!(change["seq"], json!(seen), "no holes in the change log");
            assert_eq!(change["data"]["n"], json!(seen));
        }
        since = seen;
    }
    assert!(
        seen >= seq_before,
        "{seen} changes restored, {seq_before} acknowledged before"
    );
    // Every command acknowledged before the backup (the load's polls took some).
    let mut queued = BTreeSet::new();
    for (daemon_id, id) in &commands_before {
        let (status, view) = get(
            &restored.url,
            &client_key,
            &format!("/api/v1/commands/{id}"),
        )
        .await;
        assert_eq!(status, 200, "command {id}: {view}");
        match view["state"].as_str() {
            Some("queued") => {
                queued.insert(id.clone());
            }
            Some("delivered") if *daemon_id == "d" => {}
            _ => panic!("command {id}: {view}"),
        }
    }
    assert!(!queued.is_empty());
    // Queue and commands agree: the daemon receives every queued command, each whole.
    let mut daemon = Daemon::new(&restored.url, "e", &e_key);
    daemon.connect().await;
    let mut delivered = BTreeSet::new();
    loop {
        let commands = daemon.poll(0.0).await;
        if commands.is_empty() {
            break;
        }
        for command in &commands {
            assert_eq!(command["params"]["method"], "POST", "{command}");
            delivered.insert(command["id"].as_str().unwrap().to_owned());
        }
    }
    for id in &queued {
        assert!(delivered.contains(id), "command {id} was not delivered");
    }
    restored.kill();
}
