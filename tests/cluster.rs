//! Several relay nodes on one PostgreSQL database with a 3-server NATS cluster, all on
//! loopback and started by the test helpers (DESIGN.md, "Cluster"). What one node commits
//! wakes the waiters of another through a NATS hint: a queued command wakes a poll, a
//! result wakes `commands/{id}?wait=`, an update wakes `changes?wait=` and the SSE
//! `stream/events`, a connect
//! supersedes a poll, a revocation cuts a poll. With NATS down the same wake-ups come from
//! the fallback re-reads of the database, and hints resume when NATS returns. With
//! PostgreSQL down every node answers writes 503 and recovers by itself.
//!
//! Every wait-for-wake is bounded by [`WAKE`] (5 s) while the request itself waits far
//! longer and the fallback re-read runs only every 30 s while NATS is up: only a hint
//! answers in time. Engines missing: one `SKIPPED:` line, or a failure under
//! `SYNCRELAY_REQUIRE_ENGINES=1`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::chaos;
use common::daemon::TestDaemon;
use common::nats::NatsCluster;
use common::{create_key, eventually, metric_at, postgres, Client, Daemon, TestAgent, TestRelay};
use serde_json::{json, Value};
use syncrelay::agent::RawAgent;
use tokio::time::timeout;

/// How long a hint may take to wake a waiter on another node (a generous bound for a
/// loaded CI machine; they take under a millisecond on loopback).
const WAKE: Duration = Duration::from_secs(5);

/// Three relay nodes ("a", "b", "c"), node i on NATS server i, one database.
struct Nodes {
    nats: NatsCluster,
    relays: Vec<TestRelay>,
    admin: String,
}

impl Nodes {
    async fn start(test: &str) -> Option<Nodes> {
        Nodes::start_on(test, postgres::shared(test)?).await
    }

    /// As [`Nodes::start`], on a new database of `pg`.
    async fn start_on(test: &str, pg: &postgres::PgCluster) -> Option<Nodes> {
        let nats = NatsCluster::start(test, 3).await?;
        let database = postgres::create_database(pg).await;
        let store = common::postgres_store(&pg.url(&database));
        let mut relays: Vec<TestRelay> = Vec::new();
        for (index, node) in ["a", "b", "c"].into_iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            // The first node makes the admin key; the others find keys in the database.
            if let Some(first) = relays.first() {
                std::fs::write(dir.path().join("admin.key"), &first.admin_token).unwrap();
            }
            let config = format!(
                "{store}[cluster]\nnode = \"{node}\"\nnats_urls = [\"{}\"]\n\
                 fallback_interval = \"500ms\"\n",
                nats.url(index)
            );
            relays.push(TestRelay::start_in(dir, &config).await);
        }
        let admin = relays[0].admin_token.clone();
        let nodes = Nodes {
            nats,
            relays,
            admin,
        };
        nodes.await_nats(1.0).await;
        nodes.await_hints().await;
        Some(nodes)
    }

    /// Awaits a hint from each node reaching both others: every node's subscriptions
    /// have spread through the NATS cluster. The probe is a revocation of a key that does
    /// not exist (404; the hint still goes out), sent again until it arrives.
    async fn await_hints(&self) {
        let http = reqwest::Client::new();
        for from in 0..self.relays.len() {
            let others: Vec<usize> = (0..self.relays.len()).filter(|&i| i != from).collect();
            let mut before = Vec::new();
            for &other in &others {
                before.push(
                    self.metric(other, "syncrelay_cluster_hints_received_total")
                        .await,
                );
            }
            eventually(Duration::from_secs(13), || {
                let (http, others, before) = (http.clone(), others.clone(), before.clone());
                async move {
                    let probe = http
                        .delete(format!("{}/admin/keys/0000000000000000", self.url(from)))
                        .bearer_auth(&self.admin)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(probe.status(), 404);
                    for (other, before) in others.into_iter().zip(before) {
                        let now = self.metric(other, "syncrelay_cluster_hints_received_total");
                        if now.await <= before {
                            return false;
                        }
                    }
                    true
                }
            })
            .await;
        }
    }

    /// Awaits `syncrelay_cluster_nats_connected` = `value` on every node.
    async fn await_nats(&self, value: f64) {
        for relay in &self.relays {
            eventually(Duration::from_secs(14), || async move {
                let now = relay.metric("syncrelay_cluster_nats_connected").await;
                now == Some(value)
            })
            .await;
        }
    }

    fn url(&self, node: usize) -> &str {
        &self.relays[node].url
    }

    /// A key made through node 0: its token and id.
    async fn key(&self, body: Value) -> (String, String) {
        let response = reqwest::Client::new()
            .post(format!("{}/admin/keys", self.url(0)))
            .bearer_auth(&self.admin)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let created: Value = response.json().await.unwrap();
        (
            created["token"].as_str().unwrap().to_owned(),
            created["key_id"].as_str().unwrap().to_owned(),
        )
    }

    /// A client of `daemon` talking to `node`.
    async fn client(&self, node: usize, daemon: &str) -> Client {
        let key = create_key(
            self.url(0),
            &self.admin,
            json!({ "role": "client", "scope": [daemon] }),
        )
        .await;
        Client {
            url: self.url(node).to_owned(),
            key,
            http: reqwest::Client::new(),
        }
    }

    async fn metric(&self, node: usize, series: &str) -> f64 {
        metric_at(&self.relays[node].http, self.url(node), series)
            .await
            .unwrap_or(0.0)
    }
}

/// Queues `POST /api/v1/daemons/{daemon}/sessions` asynchronously; the command id.
async fn queue(client: &Client, daemon: &str) -> String {
    queue_post(client, daemon, "/sessions").await
}

/// Queues `POST /api/v1/daemons/{daemon}{path}` asynchronously; the command id.
async fn queue_post(client: &Client, daemon: &str, path: &str) -> String {
    let response = client
        .post(&format!("/api/v1/daemons/{daemon}{path}"))
        .header("prefer", "respond-async")
        .json(&json!({ "query": "hello" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().to_owned()
}

/// Queues a command on node a while node b holds a poll of `daemon` waiting, and awaits
/// the poll's answer within [`WAKE`] (`how`: what brings it there); it must carry the
/// command.
async fn queued_on_a_reaches_the_poll_on_b(
    nodes: &Nodes,
    on_a: &Client,
    daemon: &Daemon,
    how: &str,
) {
    let poll = waiting_poll(daemon);
    await_polls(nodes, 1, 1.0).await;
    let command_id = queue(on_a, &daemon.daemon_id).await;
    let (status, body) = timeout(WAKE, poll)
        .await
        .unwrap_or_else(|_| panic!("{how}: the poll on node b did not get the command"))
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["commands"][0]["id"], command_id.as_str(), "{body}");
}

/// The daemon posts one update (daemon-side `seq`, event type, data) with a poll that
/// does not wait.
async fn post_update(daemon: &Daemon, seq: u64, kind: &str, data: Value) {
    let update = json!({
        "type": kind,
        "data": data,
        "timestamp": "2026-01-01T00:00:00Z",
        "seq": seq,
    });
    let (status, body) = daemon.poll_raw(json!([update]), false, 0.0).await;
    assert_eq!(status, 200, "{body}");
}

/// A mirrored GET of `path` on `daemon`: status, `X-Syncrelay-Source` and body.
async fn get(client: &Client, daemon: &str, path: &str) -> (u16, String, Value) {
    let response = client
        .get(&format!("/api/v1/daemons/{daemon}{path}"))
        .header("prefer", "wait=10")
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let source = response
        .headers()
        .get("x-syncrelay-source")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, source, response.json().await.unwrap_or(Value::Null))
}

/// A daemon on `node` that answers every mirrored call with its path (and for `/big`, 5 ×
/// NATS's message limit of padding), until aborted.
async fn serving_daemon(
    nodes: &Nodes,
    node: usize,
    daemon_id: &str,
) -> tokio::task::JoinHandle<()> {
    let (key, _) = nodes
        .key(json!({ "role": "daemon", "daemon": daemon_id }))
        .await;
    let mut daemon = Daemon::new(nodes.url(node), daemon_id, &key);
    daemon.connect().await;
    let id = daemon_id.to_owned();
    common::serve_daemon(daemon, move |command| {
        let path = command["params"]["path"].as_str().unwrap_or("");
        let pad = if path.ends_with("/big") {
            "x".repeat(5 * common::nats::MAX_PAYLOAD)
        } else {
            String::new()
        };
        json!({
            "status": 200,
            "headers": { "content-type": "application/json" },
            "body": { "daemon": id, "path": path, "pad": pad },
        })
    })
}

/// A poll of `daemon` waiting up to 25 s, started now: status and body.
fn waiting_poll(daemon: &Daemon) -> tokio::task::JoinHandle<(u16, Value)> {
    let daemon = daemon.clone();
    tokio::spawn(async move { daemon.poll_raw(json!([]), true, 25.0).await })
}

/// A GET of `path` started now, waiting for its answer: status and body.
fn long_get(client: &Client, path: String) -> tokio::task::JoinHandle<(u16, Value)> {
    let client = client.clone();
    tokio::spawn(async move {
        let response = client.get(&path).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json::<Value>().await.unwrap())
    })
}

/// Awaits `node` having received a request for `route` (a template).
async fn await_requests(nodes: &Nodes, node: usize, route: &str) {
    let series = format!("syncrelay_requests_total{{route=\"{route}\"}}");
    eventually(Duration::from_secs(10), || async {
        nodes.metric(node, &series).await >= 1.0
    })
    .await;
}

/// Awaits `node` holding at least `count` waiting polls.
async fn await_polls(nodes: &Nodes, node: usize, count: f64) {
    eventually(Duration::from_secs(10), || async move {
        nodes.metric(node, "syncrelay_polls_waiting").await >= count
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_node_commits_wakes_the_waiters_of_another() {
    let Some(nodes) = Nodes::start("what_one_node_commits_wakes_the_waiters_of_another").await
    else {
        return;
    };
    let (daemon_key, daemon_key_id) = nodes
        .key(json!({ "role": "daemon", "daemon": "home.d1" }))
        .await;

    // A command queued on node a wakes the daemon's poll on node b. The daemon id holds a
    // dot, which NATS would read as a subject separator: hints and reads still reach it.
    let mut daemon = Daemon::new(nodes.url(1), "home.d1", &daemon_key);
    daemon.connect().await;
    let poll = waiting_poll(&daemon);
    await_polls(&nodes, 1, 1.0).await;
    let on_a = nodes.client(0, "home.d1").await;
    let command_id = queue(&on_a, "home.d1").await;
    let (status, body) = timeout(WAKE, poll)
        .await
        .expect("the poll on node b woke for a command queued on node a")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["commands"][0]["id"], command_id.as_str(), "{body}");

    // Its result, posted on node b, wakes `commands/{id}?wait=` on node c.
    let on_c = nodes.client(2, "home.d1").await;
    let waiter = long_get(&on_c, format!("/api/v1/commands/{command_id}?wait=25"));
    // The waiter's request is in before the answer is posted (a hint that came first
    // would be missed by no one: a waiter reads the database after it subscribes).
    await_requests(&nodes, 2, "/api/v1/commands/{command_id}").await;
    daemon
        .answer(&command_id, 201, json!({ "session_id": "s1" }))
        .await;
    let (status, body) = timeout(WAKE, waiter)
        .await
        .expect("the wait on node c woke for a result posted on node b")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "completed", "{body}");

    // An update posted on node b wakes `changes?wait=` on node a.
    let changes = long_get(
        &on_a,
        "/api/v1/daemons/home.d1/changes?since=0&wait=25".into(),
    );
    await_requests(&nodes, 0, "/api/v1/daemons/{daemon_id}/changes").await;
    post_update(
        &daemon,
        1,
        "new_approval",
        json!({ "session_id": "s1", "run_id": "r1" }),
    )
    .await;
    let (status, body) = timeout(WAKE, changes)
        .await
        .expect("changes?wait on node a woke for an update posted on node b")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changes"][0]["type"], "new_approval", "{body}");

    // The SSE stream on node c, open from after that entry, gets the next update posted
    // on node b (and nothing before it).
    let mut events = on_c
        .get("/api/v1/daemons/home.d1/stream/events")
        .header("last-event-id", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let data = json!({ "session_id": "s1", "new_status": "running" });
    post_update(&daemon, 2, "session_status_changed", data).await;
    let mut text = String::new();
    while !text.contains("\n\n") || !text.contains("id: 2") {
        let chunk = timeout(WAKE, events.chunk())
            .await
            .expect("the SSE stream on node c got the update posted on node b in time")
            .unwrap()
            .expect("the stream stays open");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.contains("session_status_changed"), "{text}");
    assert!(!text.contains("id: 1\n"), "{text}");
    drop(events);

    // A connect on node c supersedes the poll waiting on node b, and the new connection's
    // poll is served at once on node a (which may not have had the hint yet).
    let poll = waiting_poll(&daemon);
    await_polls(&nodes, 1, 1.0).await;
    let mut moved = Daemon::new(nodes.url(2), "home.d1", &daemon_key);
    moved.connect().await;
    moved.url = nodes.url(0).to_owned();
    let (status, body) = moved.poll_raw(json!([]), false, 0.0).await;
    assert_eq!(
        status, 200,
        "the new connection polls on another node: {body}"
    );
    let (status, body) = timeout(WAKE, poll)
        .await
        .expect("the poll on node b ended when the daemon connected on node c")
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "superseded", "{body}");

    // Revoking the daemon's key through node a cuts its poll waiting on node b.
    moved.url = nodes.url(1).to_owned();
    let poll = waiting_poll(&moved);
    await_polls(&nodes, 1, 1.0).await;
    let response = reqwest::Client::new()
        .delete(format!("{}/admin/keys/{daemon_key_id}", nodes.url(0)))
        .bearer_auth(&nodes.admin)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let (status, body) = timeout(WAKE, poll)
        .await
        .expect("the poll on node b ended when its key was revoked on node a")
        .unwrap();
    assert_eq!(status, 401, "{body}");

    // A mirrored read on node a reaches the daemon through node b, the node it polls.
    let server = serving_daemon(&nodes, 1, "home.d3").await;
    await_polls(&nodes, 1, 1.0).await;
    let reader = nodes.client(0, "home.d3").await;
    let (status, source, body) = get(&reader, "home.d3", "/sessions?limit=2").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(source, "daemon");
    assert_eq!(body["daemon"], "home.d3", "{body}");
    assert_eq!(body["path"], "/api/v1/sessions", "{body}");
    // An answer five times NATS's message limit comes whole, in pieces.
    let (status, source, body) = get(&reader, "home.d3", "/big").await;
    assert_eq!((status, source.as_str()), (200, "daemon"), "{body}");
    let pad = body["pad"].as_str().expect("the whole answer");
    assert_eq!(pad.len(), 5 * common::nats::MAX_PAYLOAD);
    assert!(pad.bytes().all(|b| b == b'x'));
    server.abort();

    // Status: each node names itself and counts the hints it got from the others.
    for (index, node) in ["a", "b", "c"].into_iter().enumerate() {
        let series = format!("syncrelay_cluster_node_info{{node=\"{node}\"}}");
        assert_eq!(nodes.metric(index, &series).await, 1.0);
    }
    assert!(
        nodes
            .metric(1, "syncrelay_cluster_hints_received_total")
            .await
            >= 3.0
    );
    assert!(
        nodes
            .metric(1, "syncrelay_cluster_hint_seconds_count")
            .await
            >= 3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_waiters_reread_the_database_and_hints_resume_when_it_returns() {
    let test = "without_nats_waiters_reread_the_database_and_hints_resume_when_it_returns";
    let Some(mut nodes) = Nodes::start(test).await else {
        return;
    };
    let (daemon_key, _) = nodes.key(json!({ "role": "daemon", "daemon": "d2" })).await;
    let mut daemon = Daemon::new(nodes.url(1), "d2", &daemon_key);
    daemon.connect().await;
    let on_a = nodes.client(0, "d2").await;
    // A read through node a while NATS is up: its answer is kept as the cached copy.
    let server = serving_daemon(&nodes, 1, "d4").await;
    let reader = nodes.client(0, "d4").await;
    let (status, source, body) = get(&reader, "d4", "/sessions").await;
    assert_eq!((status, source.as_str()), (200, "daemon"), "{body}");
    server.abort();

    for index in 0..3 {
        nodes.nats.kill(index);
    }
    nodes.await_nats(0.0).await;
    // The queued command is acknowledged (it is in PostgreSQL) and reaches the poll on
    // node b through its node's re-read of the database (every 500 ms here).
    queued_on_a_reaches_the_poll_on_b(&nodes, &on_a, &daemon, "without NATS, re-reading").await;
    assert!(
        nodes
            .metric(0, "syncrelay_cluster_hints_dropped_total")
            .await
            >= 1.0
    );
    assert!(
        nodes
            .metric(1, "syncrelay_cluster_fallback_rereads_total")
            .await
            >= 1.0
    );
    // Reads cannot reach node b: node a answers from the cached copy, or 503.
    let (status, source, body) = get(&reader, "d4", "/sessions").await;
    assert_eq!((status, source.as_str()), (200, "cache"), "{body}");
    assert_eq!(body["daemon"], "d4", "{body}");
    let (status, _, body) = get(&reader, "d4", "/never-read").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "daemon_offline", "{body}");

    // NATS back: hints wake waiters again (the re-read is every 30 s now).
    for index in 0..3 {
        nodes.nats.restart(index).await;
    }
    nodes.await_nats(1.0).await;
    nodes.await_hints().await;
    let received = nodes
        .metric(1, "syncrelay_cluster_hints_received_total")
        .await;
    queued_on_a_reaches_the_poll_on_b(&nodes, &on_a, &daemon, "with NATS back, a hint").await;
    assert!(
        nodes
            .metric(1, "syncrelay_cluster_hints_received_total")
            .await
            > received
    );
}

/// PostgreSQL stopped (`-m immediate`) under a cluster: writes through every node get 503
/// `storage_unavailable`, storing nothing; once it is back the same node processes take
/// writes again by themselves: the command written before the outage is still there, and
/// one queued on node a reaches the poll waiting on node b through a hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_database_down_every_node_answers_503_and_all_recover_by_themselves() {
    let test = "with_the_database_down_every_node_answers_503_and_all_recover";
    let Some(pg) = postgres::PgCluster::start(test) else {
        return;
    };
    let Some(nodes) = Nodes::start_on(test, &pg).await else {
        return;
    };
    let (daemon_key, _) = nodes.key(json!({ "role": "daemon", "daemon": "d" })).await;
    let mut daemon = Daemon::new(nodes.url(1), "d", &daemon_key);
    daemon.connect().await;
    let on_a = nodes.client(0, "d").await;
    let on_b = nodes.client(1, "d").await;
    let before = queue(&on_a, "d").await;

    pg.stop_immediate();
    for (node, client) in [("a", &on_a), ("b", &on_b)] {
        let response = client
            .post("/api/v1/daemons/d/sessions")
            .header("prefer", "respond-async")
            .header("idempotency-key", format!("during-{node}"))
            .json(&json!({ "query": "during" }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503, "node {node}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["error"]["code"], "storage_unavailable",
            "node {node}: {body}"
        );
    }

    pg.start_again();
    eventually(Duration::from_secs(30), || async {
        let response = on_a.get("/api/v1/daemons/d").send().await.unwrap();
        response.status() == 200
    })
    .await;
    // Nothing of the refused writes was stored: the queue holds only the one from before.
    let view = on_b.daemon("d").await;
    assert_eq!(view["queued"], 1, "{view}");
    // The command from before the outage is leased first; then one queued now arrives
    // at the waiting poll through its hint.
    let (status, body) = daemon.poll_raw(json!([]), false, 0.0).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["commands"][0]["id"], before.as_str(), "{body}");
    queued_on_a_reaches_the_poll_on_b(&nodes, &on_a, &daemon, "after the outage, a hint").await;
}

/// A node SIGKILLed under its daemons: the agent, given both nodes' URLs, connects to the
/// other one, where the command it was running when the node died completes, run once at
/// the daemon; commands queued afterwards run too, and the surviving node reports the
/// daemon online. A daemon that had leased a command through the dead node gets it again
/// on the other node as soon as it connects there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_node_dies_its_daemons_move_to_another_and_their_leases_are_handed_out_again() {
    let test = "when_a_node_dies_its_daemons_move_to_another";
    let Some(pg) = postgres::shared(test) else {
        return;
    };
    let Some(nats) = NatsCluster::start(test, 1).await else {
        return;
    };
    let database = postgres::create_database(pg).await;
    let store = common::postgres_store(&pg.url(&database));
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let spawn = |index: usize| {
        let node = ["a", "b"][index];
        let extra = format!(
            "{store}[cluster]\nnode = \"{node}\"\nnats_urls = [\"{}\"]\n",
            nats.url(0)
        );
        let dir = dirs[index].path();
        common::RelayProcess::spawn_with(dir, &dir.join("config.toml"), &extra)
    };
    let a = spawn(0);
    // Node b finds the keys node a made in the database; its admin key is a's.
    std::fs::write(dirs[1].path().join("admin.key"), a.admin_token()).unwrap();
    let b = spawn(1);
    let http = reqwest::Client::new();
    for node in [&a.url, &b.url] {
        eventually(Duration::from_secs(14), || async {
            metric_at(&http, node, "syncrelay_cluster_nats_connected").await == Some(1.0)
        })
        .await;
    }
    let daemon_id = "home.d1";
    let daemon_key = a
        .create_key(json!({ "role": "daemon", "daemon": daemon_id }))
        .await;
    let client_key = a
        .create_key(json!({ "role": "client", "scope": [daemon_id, "home.d2"] }))
        .await;
    let client = |url: &str| Client {
        url: url.to_owned(),
        key: client_key.clone(),
        http: reqwest::Client::new(),
    };
    let (on_a, on_b) = (client(&a.url), client(&b.url));
    let local = TestDaemon::start().await;
    let _agent = TestAgent::start(
        &format!("{},{}", a.url, b.url),
        daemon_id,
        &daemon_key,
        &local.target,
        RawAgent::default(),
    );
    // The agent takes the first URL. Node b, which it is not connected to, reports it
    // online too (by the last-seen time node a stores), and `syncrelay status` on node a
    // names the node and counts the daemon it holds.
    on_a.await_online(daemon_id).await;
    on_b.await_online(daemon_id).await;
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncrelay"))
        .args(["status", "--url", &a.url, "--data-dir"])
        .arg(dirs[0].path())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{status:?}");
    assert!(
        text.starts_with("node a: NATS connected; holds 1 daemon connection(s)"),
        "{text}"
    );
    assert!(text.contains("home.d1"), "{text}");
    // Which node holds the daemon: node a, say both nodes to the admin (in `status` too);
    // clients are not told.
    assert!(text.contains("NODE"), "{text}");
    assert_eq!(holder(&b.url, &a.admin_token(), daemon_id).await, "a");
    assert_eq!(holder(&a.url, &a.admin_token(), daemon_id).await, "a");
    let seen = on_b.daemon(daemon_id).await;
    assert_eq!(seen["online"], true, "{seen}");
    assert!(seen.get("node").is_none(), "{seen}");
    // A context stream asked of node b: the agent uploads it through node a, and node b
    // serves it whole, its pump woken by the chunks' hints.
    let path = format!(
        "/api/v1/daemons/{daemon_id}/approvals/a1/context/stream?events={}&size={}",
        chaos::STREAM_EVENTS,
        chaos::STREAM_SIZE
    );
    let context = on_b.get(&path).send().await.unwrap();
    assert_eq!(context.status(), 200);
    assert_eq!(context.text().await.unwrap(), chaos::expected_context());

    // A daemon speaking the protocol by hand leases a command through node a too.
    let other_key = a
        .create_key(json!({ "role": "daemon", "daemon": "home.d2" }))
        .await;
    let mut other = Daemon::new(&a.url, "home.d2", &other_key);
    other.connect().await;
    let leased = queue(&on_b, "home.d2").await;
    let commands = other.next_commands().await;
    assert_eq!(commands[0]["id"], leased.as_str());
    // A command the daemon takes 3 s over, queued through node b, runs through node a.
    let slow = queue_post(&on_b, daemon_id, "/slow?ms=3000").await;
    eventually(Duration::from_secs(10), || async {
        local.hits("/api/v1/slow") == 1
    })
    .await;
    // Node a dies with both commands leased to connections through it, the slow one
    // still running at the daemon.
    let running = on_b
        .get(&format!("/api/v1/commands/{slow}"))
        .send()
        .await
        .unwrap();
    let running: Value = running.json().await.unwrap();
    assert_eq!(running["state"], "delivered", "{running}");
    a.kill();

    // The hand-made daemon connects to node b: the command comes again at once (the
    // connect released the lease; it would otherwise wait out lease_duration).
    other.url = b.url.clone();
    other.connect().await;
    let commands = other.poll(0.0).await;
    assert_eq!(commands.len(), 1, "{commands:?}");
    assert_eq!(commands[0]["id"], leased.as_str());

    // The agent reaches node b, which hands the command out again: its result arrives
    // there, from the one run at the daemon.
    let state = command_state(&on_b, &slow).await;
    assert_eq!(state["state"], "completed", "{state}");
    assert_eq!(state["result"]["status"], 200, "{state}");
    assert_eq!(local.hits("/api/v1/slow"), 1);
    assert_eq!(
        local.command_ids("/api/v1/slow"),
        std::slice::from_ref(&slow)
    );
    // The agent's stream is open on node b now (not just a's stored last-seen time).
    let http_b = reqwest::Client::new();
    eventually(Duration::from_secs(10), || async {
        metric_at(&http_b, &b.url, "syncrelay_polls_waiting").await >= Some(1.0)
    })
    .await;
    assert_eq!(holder(&b.url, &b.admin_token(), daemon_id).await, "b");
    // What is queued now runs through node b.
    let after = queue_post(&on_b, daemon_id, "/echo/after").await;
    let state = command_state(&on_b, &after).await;
    assert_eq!(state["state"], "completed", "{state}");
    assert_eq!(state["result"]["body"]["path"], "/api/v1/echo/after");
    drop(b);
}

/// The node `GET /admin/daemons/{daemon}` on `url` says holds the daemon ("" if none).
async fn holder(url: &str, admin: &str, daemon: &str) -> String {
    let response = reqwest::Client::new()
        .get(format!("{url}/admin/daemons/{daemon}"))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let view: Value = response.json().await.unwrap();
    view["node"].as_str().unwrap_or("").to_owned()
}

/// `GET /api/v1/commands/{id}`, waiting (in rounds of up to 20 s, 60 s in all) until the
/// command is finished.
async fn command_state(client: &Client, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let response = client
            .get(&format!("/api/v1/commands/{id}?wait=20"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let state: Value = response.json().await.unwrap();
        if matches!(
            state["state"].as_str(),
            Some("completed" | "failed" | "expired")
        ) || tokio::time::Instant::now() >= deadline
        {
            return state;
        }
    }
}

#[test]
fn a_cluster_needs_the_postgres_backend_and_a_node_name() {
    let toml = "[cluster]\nnats_urls = [\"nats://127.0.0.1:4222\"]\n";
    let err = syncrelay::config::Config::from_toml(toml, Path::new("c.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[cluster] needs store.backend = \"postgres\""),
        "{err}"
    );
    assert!(err.contains("cluster.node"), "{err}");

    let toml = "[store]\nbackend = \"postgres\"\nurl = \"postgres://u@127.0.0.1/db\"\n\
                [cluster]\nnode = \"a\"\nnats_urls = [\"nats://127.0.0.1:4222\"]\n";
    let config =
        syncrelay::config::Config::from_toml(toml, Path::new("c.toml")).expect("a valid node");
    let cluster = config.cluster.expect("[cluster] read");
    assert_eq!(cluster.node, "a");
    assert_eq!(cluster.fallback_interval, Duration::from_secs(1));
}
