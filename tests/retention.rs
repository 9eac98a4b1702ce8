//! Retention and quotas on a real relay: items past their limits disappear (finished
//! commands, change-log entries beyond the count, cached copies replaced), the disk space
//! they took is reused so the data dir stays bounded under a steady workload of large
//! values, and a daemon's disk budget is checked as each write is stored: a daemon at its
//! budget loses its oldest change-log entries to make room, and a command or update that
//! cannot fit even then gets `queue_full` at once.
//!
//! `SYNCRELAY_SOAK_ROUNDS=N` runs the churn test for N rounds instead of 10 (a longer
//! measurement, out of CI).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use common::{eventually, serve_daemon, Client, TestRelay};
use serde_json::{json, Value};

/// Bytes the files under `dir` occupy on disk.
fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            disk_usage(&entry.path())
        } else {
            meta.blocks() * 512
        };
    }
    total
}

/// Waits for a census taken after now.
async fn next_census(relay: &TestRelay) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    eventually(Duration::from_secs(10), || async move {
        relay
            .metric("syncrelay_store_census_timestamp_seconds")
            .await
            .is_some_and(|at| at > now)
    })
    .await;
}

/// The seqs of a daemon's change log as clients see it.
async fn change_seqs(client: &Client, daemon_id: &str) -> Vec<u64> {
    let changes: Value = client
        .get(&format!(
            "/api/v1/daemons/{daemon_id}/changes?since=0&limit=1000"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    changes["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["seq"].as_u64().unwrap())
        .collect()
}

fn megabytes(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_space_is_reused_under_steady_churn_of_large_values() {
    let rounds: usize = std::env::var("SYNCRELAY_SOAK_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10);
    let relay = TestRelay::start_with(
        r#"
        [retention]
        interval = "100ms"
        results_max_age = "200ms"
        changes_max_entries = 20
        "#,
    )
    .await;
    let client = relay.client(&["d", "u"]).await;
    let result_body = "r".repeat(200 * 1024);
    let page = "p".repeat(500 * 1024);
    let daemon = relay.daemon("d").await;
    let worker = serve_daemon(daemon, move |command| {
        let body = if command["params"]["method"] == "GET" {
            page.clone()
        } else {
            result_body.clone()
        };
        json!({ "status": 200, "headers": { "content-type": "text/plain" }, "body": body })
    });
    let updates = relay.daemon("u").await;
    let write_body = json!({ "blob": "w".repeat(200 * 1024) });
    let mut sizes = Vec::new();
    let mut next_seq = 1;
    let mut first_ids = Vec::new();
    for round in 0..rounds {
        let mut ids = Vec::new();
        for _ in 0..10 {
            let reply = client
                .post("/api/v1/daemons/d/jobs")
                .header("prefer", "respond-async")
                .json(&write_body)
                .send()
                .await
                .unwrap();
            assert_eq!(reply.status(), 202);
            let view: Value = reply.json().await.unwrap();
            ids.push(view["id"].as_str().unwrap().to_owned());
        }
        for _ in 0..2 {
            let reply = client.get("/api/v1/daemons/d/big").send().await.unwrap();
            assert_eq!(reply.status(), 200);
            assert_eq!(reply.text().await.unwrap().len(), 500 * 1024);
        }
        let batch: Vec<Value> = (next_seq..next_seq + 10)
            .map(|seq| json!({ "type": "session_updated", "seq": seq, "data": { "pad": "u".repeat(100 * 1024) } }))
            .collect();
        next_seq += 10;
        let (status, body) = updates.poll_raw(Value::Array(batch), false, 0.0).await;
        assert_eq!(status, 200, "{body}");
        // Every write answered, then purged once past results_max_age.
        for id in &ids {
            eventually(Duration::from_secs(10), || async {
                let reply = client
                    .get(&format!("/api/v1/commands/{id}"))
                    .send()
                    .await
                    .unwrap();
                reply.status() == 404
            })
            .await;
        }
        if round == 0 {
            first_ids = ids;
        }
        // Two more censuses: unreferenced pieces go on the second sweep that sees them.
        next_census(&relay).await;
        next_census(&relay).await;
        next_census(&relay).await;
        let size = disk_usage(relay.data_dir.path());
        eprintln!("round {round}: data dir {:.1} MiB", megabytes(size));
        sizes.push(size);
    }
    worker.abort();

    // Items past their limits are gone: the change log keeps its newest 20 entries.
    let seqs = change_seqs(&client, "u").await;
    assert_eq!(seqs, (next_seq - 20..next_seq).collect::<Vec<_>>());
    assert!(!first_ids.is_empty());
    assert_eq!(
        relay
            .metric("syncrelay_commands{state=\"completed\"}")
            .await,
        Some(0.0)
    );

    // The space is reused: about 6 MiB of large values per round, and the data dir
    // stops growing after the first rounds (sled's own blob files would have kept all
    // of it: 60 MiB after 10 rounds).
    let written_per_round = 10 * 2 * 200 * 1024 + 2 * 500 * 1024 + 10 * 100 * 1024;
    let settled = sizes[2];
    let last = *sizes.last().unwrap();
    eprintln!(
        "written {:.1} MiB in {rounds} rounds; data dir after round 3 {:.1} MiB, at the end {:.1} MiB",
        megabytes((written_per_round * rounds) as u64),
        megabytes(settled),
        megabytes(last)
    );
    assert!(
        last <= settled + settled / 2,
        "the data dir kept growing: {:?} MiB",
        sizes
            .iter()
            .map(|s| megabytes(*s) as u64)
            .collect::<Vec<_>>()
    );
}

/// A client's asynchronous command write of `bytes` bytes: its status and error code.
async fn job(client: &Client, bytes: usize) -> (u16, Value) {
    let reply = client
        .post("/api/v1/daemons/d/jobs")
        .header("prefer", "respond-async")
        .json(&json!({ "blob": "q".repeat(bytes) }))
        .send()
        .await
        .unwrap();
    let status = reply.status().as_u16();
    if status == 429 {
        assert!(reply.headers().contains_key("retry-after"));
    }
    (status, reply.json().await.unwrap())
}

/// `count` updates of `bytes` bytes each, numbered from `first`.
fn updates(first: u64, count: u64, bytes: usize) -> Value {
    (first..first + count)
        .map(|seq| json!({ "type": "e", "seq": seq, "data": { "pad": "c".repeat(bytes) } }))
        .collect()
}

/// Issue 18, finding 3: the budget is checked when a write is stored, not at the next
/// sweep. With a 20 MB budget, 8 MiB writes were all accepted until the sweep came; now
/// the write that would take the daemon past its budget gets 429 `queue_full` at once, and
/// so do updates that cannot fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_past_a_daemon_s_budget_are_refused_at_once() {
    let relay = TestRelay::start_with("[retention]\ndaemon_max_bytes = 20000000\n").await;
    let client = relay.client(&["d"]).await;
    let daemon = relay.daemon("d").await;
    // The census at start-up counts what each daemon holds; writes are checked from then on.
    let relay = &relay;
    eventually(Duration::from_secs(10), || async move {
        relay
            .metric("syncrelay_store_census_timestamp_seconds")
            .await
            .is_some()
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let (status, body) = job(&client, 8 << 20).await;
        if status == 429 {
            assert_eq!(body["error"]["code"], "queue_full", "{body}");
        }
        statuses.push(status);
    }
    assert_eq!(statuses, [202, 202, 429, 429, 429, 429]);
    // The daemon's updates count too: 4 MB of them do not fit in what is left. They are
    // not stored (`last_update_seq` stays 0, so the daemon keeps them), but the poll still
    // hands out the commands, whose running frees the budget; with none left, a 429.
    let (status, body) = daemon.poll_raw(updates(1, 4, 1_000_000), false, 0.0).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["last_update_seq"], 0);
    assert_eq!(body["commands"].as_array().unwrap().len(), 2);
    let (status, body) = daemon.poll_raw(updates(1, 4, 1_000_000), false, 0.0).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (429, &json!("queue_full"))
    );
    let (status, body) = daemon.poll_raw(updates(1, 1, 1_000), false, 0.0).await;
    assert_eq!(
        (status, &body["last_update_seq"]),
        (200, &json!(1)),
        "a small one fits"
    );
}

/// A daemon at its budget makes room for a new write by dropping its own oldest change-log
/// entries; what cannot fit even then (its unfinished commands are never dropped) is
/// refused at once; once its work is done and purged, writes go through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_at_its_budget_drops_old_changes_and_refuses_what_cannot_fit() {
    let relay = TestRelay::start_with(
        r#"
        [retention]
        interval = "100ms"
        results_max_age = "200ms"
        daemon_max_bytes = 2000000
        "#,
    )
    .await;
    let client = relay.client(&["d"]).await;
    let daemon = relay.daemon("d").await;
    next_census(&relay).await;
    // 4 MB of change log, all accepted: the newest 2 MB or less stay, at once.
    for batch in 0..4u64 {
        let (status, body) = daemon
            .poll_raw(updates(batch * 10 + 1, 10, 100_000), false, 0.0)
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let seqs = change_seqs(&client, "d").await;
    assert_eq!(seqs.last(), Some(&40), "the newest entries stay");
    assert!(
        seqs.len() <= 20 && seqs.len() >= 10,
        "about 2 MB of the change log left: {seqs:?}"
    );
    assert_eq!(seqs, (41 - seqs.len() as u64..41).collect::<Vec<_>>());

    // Commands take the room of old changes; past what unfinished commands can hold, new
    // ones are refused at once.
    let mut queued = Vec::new();
    for _ in 0..3 {
        let (status, body) = job(&client, 550_000).await;
        assert_eq!(status, 202, "{body}");
        queued.push(body["id"].as_str().unwrap().to_owned());
    }
    // Room for about three change-log entries is left; a refused write takes none of them.
    let kept = change_seqs(&client, "d").await;
    assert!(
        (1..=4).contains(&kept.len()),
        "the change log made room: {kept:?}"
    );
    let (status, body) = job(&client, 550_000).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (429, &json!("queue_full"))
    );
    assert_eq!(
        change_seqs(&client, "d").await,
        kept,
        "nothing dropped for a refusal"
    );
    for id in &queued {
        let reply = client
            .get(&format!("/api/v1/commands/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 200, "an unfinished command was dropped");
    }

    // An update that cannot fit is not stored, but the poll hands out the commands; the
    // daemon answers them, and once the results are purged, writes go through.
    let (status, body) = daemon.poll_raw(updates(41, 1, 600_000), false, 0.0).await;
    assert_eq!((status, &body["last_update_seq"]), (200, &json!(40)));
    let commands = body["commands"].as_array().unwrap();
    assert_eq!(commands.len(), 3);
    for command in commands {
        daemon
            .answer(command["id"].as_str().unwrap(), 200, json!({ "ok": true }))
            .await;
    }
    let client = &client;
    eventually(Duration::from_secs(10), || async move {
        job(client, 550_000).await.0 == 202
    })
    .await;
}
