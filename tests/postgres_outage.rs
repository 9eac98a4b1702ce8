//! The relay on PostgreSQL when the database fails, each test on a throwaway cluster of its
//! own: a COMMIT that fails is a 503 and leaves nothing behind; with the database down,
//! writes get 503 `storage_unavailable` while mirrored reads keep flowing, and the relay
//! serves again by itself once the database is back; and crashes of the database under
//! load (`pg_ctl stop -m immediate`, then start) lose nothing acknowledged, the relay
//! process living through all of them (20 in CI; `SYNCRELAY_PG_CRASHES=N` for more).

mod common;

use std::time::Duration;

use common::crash_loop::database_outage_loop;
use common::postgres::{create_database, PgCluster};
use common::{chaos, eventually, TestRelay, STORE_FILE};
use serde_json::{json, Value};

/// A data dir whose relay runs on a new database of `cluster`.
async fn data_dir_on(cluster: &PgCluster) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let database = create_database(cluster).await;
    std::fs::write(
        dir.path().join(STORE_FILE),
        common::postgres_store(&cluster.url(&database)),
    )
    .unwrap();
    dir
}

async fn psql(cluster: &PgCluster, database_of: &std::path::Path, sql: &str) {
    let store = std::fs::read_to_string(database_of.join(STORE_FILE)).unwrap();
    let url = store
        .lines()
        .find_map(|line| line.strip_prefix("url = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("the store file names its url")
        .to_owned();
    let _ = cluster;
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    client.batch_execute(sql).await.unwrap();
    drop(client);
    let _ = connection.await;
}

/// `POST /api/v1/daemons/d/jobs` with `Prefer: respond-async`: the status and body.
async fn queue(relay: &TestRelay, key: &str, body: Value, idempotency: &str) -> (u16, Value) {
    let response = relay
        .http
        .post(format!("{}/api/v1/daemons/d/jobs", relay.url))
        .bearer_auth(key)
        .header("prefer", "respond-async")
        .header("idempotency-key", idempotency)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A command's state once final (waiting up to 10 s).
async fn command(relay: &TestRelay, key: &str, route: &str) -> Value {
    relay
        .http
        .get(format!("{}{route}?wait=10", relay.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn queued(relay: &TestRelay, key: &str) -> u64 {
    let response = relay
        .http
        .get(format!("{}/api/v1/daemons/d", relay.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json::<Value>().await.unwrap()["queued"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_commit_fails_is_a_503_and_is_not_found_after_a_restart() {
    let test = "a_write_whose_commit_fails_is_a_503_and_is_not_found_after_a_restart";
    let Some(cluster) = PgCluster::start(test) else {
        return;
    };
    let dir = data_dir_on(&cluster).await;
    let relay = TestRelay::start_in(dir, "").await;
    let client = relay.client(&["d"]).await;
    relay.key("daemon", Some("d"), None).await;
    // A deferred constraint trigger: PostgreSQL runs it at COMMIT, which then fails. The
    // relay's one-statement INSERT commits on its own, so its COMMIT is what fails.
    psql(
        &cluster,
        relay.data_dir.path(),
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
           $$BEGIN RAISE EXCEPTION 'refused at commit'; END$$; \
         CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON commands \
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW \
           WHEN (NEW.params LIKE '%refuse-me%') EXECUTE FUNCTION refuse();",
    )
    .await;
    let (status, _) = queue(&relay, &client.key, json!({ "n": 1 }), "first").await;
    assert_eq!(status, 202);
    let (status, body) = queue(&relay, &client.key, json!({ "refuse-me": true }), "second").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "storage_unavailable");
    assert_eq!(queued(&relay, &client.key).await, 1);

    // Restarted: the refused write is not there, the acknowledged one is.
    let dir = relay.stop().await;
    let relay = TestRelay::start_in(dir, "").await;
    assert_eq!(queued(&relay, &client.key).await, 1);
    psql(
        &cluster,
        relay.data_dir.path(),
        "DROP TRIGGER refuse_at_commit ON commands",
    )
    .await;
    let (status, body) = queue(&relay, &client.key, json!({ "refuse-me": true }), "second").await;
    assert_eq!(status, 202, "the retry is a new command: {body}");
    assert_eq!(queued(&relay, &client.key).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_its_database_down_writes_get_503_reads_flow_and_the_relay_recovers() {
    let test = "with_its_database_down_writes_get_503_reads_flow_and_the_relay_recovers";
    let Some(cluster) = PgCluster::start(test) else {
        return;
    };
    let relay = TestRelay::start_in(data_dir_on(&cluster).await, "").await;
    let client = relay.client(&["d"]).await;
    let daemon = relay.daemon("d").await;
    // As an agent does: a failed poll is retried after a pause, not the end.
    let serving = tokio::spawn(async move {
        loop {
            let (status, body) = daemon.poll_raw(json!([]), true, 5.0).await;
            if status != 200 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let results: Vec<Value> = body["commands"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| json!({ "command_id": c["id"], "result": { "status": 200, "body": {} } }))
                .collect();
            let post = json!({ "daemon_id": "d", "results": results });
            while !results.is_empty() && daemon.post("/sync/results", post.clone()).await.0 != 200 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let (status, before) = queue(&relay, &client.key, json!({ "n": 1 }), "before").await;
    assert_eq!(status, 202);
    let route = format!("/api/v1/commands/{}", before["id"].as_str().unwrap());
    assert_eq!(
        command(&relay, &client.key, &route).await["state"],
        "completed"
    );

    cluster.stop_immediate();
    let (status, body) = queue(&relay, &client.key, json!({ "n": 2 }), "during").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "storage_unavailable");
    // A mirrored read needs nothing of the store: the key is known, the daemon polls.
    let read = relay
        .http
        .get(format!("{}/api/v1/daemons/d/sessions", relay.url))
        .bearer_auth(&client.key)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    assert_eq!(read.headers()["x-syncrelay-source"], "daemon");

    // Back: the same relay process takes writes again, by itself.
    cluster.start_again();
    let again = std::sync::Arc::new(std::sync::Mutex::new(Value::Null));
    eventually(Duration::from_secs(30), || {
        let (relay, key, again) = (&relay, client.key.clone(), again.clone());
        async move {
            let (status, body) = queue(relay, &key, json!({ "n": 2 }), "during").await;
            *again.lock().unwrap() = body;
            status == 202
        }
    })
    .await;
    let again = again.lock().unwrap().clone();
    let route = format!("/api/v1/commands/{}", again["id"].as_str().unwrap());
    let state = command(&relay, &client.key, &route).await;
    assert_eq!(state["state"], "completed", "{state}");
    serving.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_crashes_under_load_lose_nothing_and_need_no_relay_restart() {
    let test = "database_crashes_under_load_lose_nothing_and_need_no_relay_restart";
    let Some(cluster) = PgCluster::start(test) else {
        return;
    };
    let dir = data_dir_on(&cluster).await;
    let crashes = chaos::env_count("SYNCRELAY_PG_CRASHES", 20);
    let started = std::time::Instant::now();
    let acked = database_outage_loop(dir.path(), &cluster, crashes, 20).await;
    eprintln!(
        "database crash loop: {crashes} crashes of PostgreSQL in {:.0} s, one relay process; \
         checked {} acknowledged commands, {} results, {} updates, {} keys, {} chunks of {} \
         stream contexts ({} live streams cut by the outage, with an error event); lost 0",
        started.elapsed().as_secs_f64(),
        acked.commands.len(),
        acked.results.len(),
        acked.update_seq,
        acked.keys.len(),
        acked.chunk_acks,
        acked.streams.len(),
        acked.streams_cut,
    );
}
