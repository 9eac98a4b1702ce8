//! The daemon side of the sync protocol (DESIGN.md, "Sync protocol" and "Errors"), end to
//! end over loopback HTTP: `/sync/connect` (session parameters, refreshing version and
//! capabilities, superseding an older connection and its waiting poll), `/sync/poll` (long
//! polls that wake the moment a command is queued, timeouts clamped to `poll_timeout_max`,
//! `wait_for_commands: false`, leases and redelivery after a lease runs out or a reconnect,
//! updates appended to the change log with retries dropped by `seq`), `/sync/results`
//! (accepted and unknown ids, first result wins, no answering another daemon's commands),
//! authentication and authorisation, rejected input (bad JSON, types, ids, methods, too many
//! updates, oversized bodies) in the shared error shape with `X-Syncrelay-Source: relay`,
//! and the per-daemon queue limit.

mod common;

use std::future::Future;
use std::time::Duration;

use common::{eventually, Client, Daemon, TestRelay};
use serde_json::{json, Value};

/// Upper bound for anything that should happen "at once" or after a short relay timer.
const QUICK: Duration = Duration::from_secs(5);
/// Upper bound for waits that include a 1 s relay timer (clamped poll, lease expiry).
const SLOW: Duration = Duration::from_secs(10);
/// Upper bound for any single request of the helpers; tests assert tighter bounds.
const REQUEST_LIMIT: Duration = Duration::from_secs(30);

/// A response reduced to what the assertions need.
struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Reply {
    async fn read(response: reqwest::Response) -> Reply {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("response body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts a relay-made error: status, code, the `{"error":{"code","message"}}` shape
    /// and `X-Syncrelay-Source: relay`.
    #[track_caller]
    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "status; body {}", self.body);
        assert_eq!(self.body["error"]["code"], code, "code; body {}", self.body);
        assert!(
            self.body["error"]["message"].is_string(),
            "error.message is a string: {}",
            self.body
        );
        assert_eq!(
            self.header("x-syncrelay-source"),
            Some("relay"),
            "source header of {}",
            self.body
        );
    }
}

/// Awaits `future`, failing the test if it takes longer than `limit`.
async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {limit:?}"))
}

/// POSTs `body` (JSON) to `route` with an optional bearer token.
async fn post_json(relay_url: &str, route: &str, token: Option<&str>, body: &Value) -> Reply {
    post_raw(relay_url, route, token, serde_json::to_vec(body).unwrap()).await
}

/// POSTs raw bytes as `application/json` to `route` with an optional bearer token.
async fn post_raw(relay_url: &str, route: &str, token: Option<&str>, body: Vec<u8>) -> Reply {
    let mut request = reqwest::Client::new()
        .post(format!("{relay_url}{route}"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = within(REQUEST_LIMIT, route, request.send())
        .await
        .expect("relay reachable");
    Reply::read(response).await
}

/// A poll with full control over the body, as `daemon`.
async fn poll_body(daemon: &Daemon, body: Value) -> Reply {
    post_json(&daemon.url, "/sync/poll", Some(&daemon.key), &body).await
}

/// A connect as `daemon` with the given version and capabilities.
async fn connect_as(daemon: &Daemon, version: &str, capabilities: &[&str]) -> Reply {
    post_json(
        &daemon.url,
        "/sync/connect",
        Some(&daemon.key),
        &json!({ "daemon_id": daemon.daemon_id, "version": version, "capabilities": capabilities }),
    )
    .await
}

/// Queues a write for `daemon_id` without waiting for its result; returns the command id.
async fn queue_write(client: &Client, daemon_id: &str, body: Value) -> String {
    let reply = try_queue_write(client, daemon_id, body).await;
    assert_eq!(reply.status, 202, "queued write: {}", reply.body);
    let location = reply
        .header("location")
        .expect("Location of a 202")
        .to_owned();
    let id = location
        .strip_prefix("/api/v1/commands/")
        .unwrap_or_else(|| panic!("unexpected Location {location}"))
        .to_owned();
    assert_eq!(reply.body["id"], id.as_str());
    id
}

async fn try_queue_write(client: &Client, daemon_id: &str, body: Value) -> Reply {
    let request = client
        .post(&format!("/api/v1/daemons/{daemon_id}/things"))
        .header("Prefer", "respond-async")
        .json(&body)
        .send();
    Reply::read(within(QUICK, "client write", request).await.unwrap()).await
}

async fn client_get(client: &Client, path: &str) -> Value {
    let response = within(QUICK, path, client.get(path).send()).await.unwrap();
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.unwrap()
}

/// The daemon's change log as a client sees it.
async fn changes(client: &Client, daemon_id: &str) -> Vec<Value> {
    let body = client_get(
        client,
        &format!("/api/v1/daemons/{daemon_id}/changes?since=0"),
    )
    .await;
    body["changes"].as_array().cloned().expect("changes list")
}

/// Waits until the relay reports the daemon online. With `online_grace = "1ms"` that means
/// a poll of it is waiting, so whatever the test does next happens during the wait.
async fn until_poll_waits(client: &Client, daemon_id: &str) {
    let path = format!("/api/v1/daemons/{daemon_id}");
    eventually(QUICK, || async {
        client_get(client, &path).await["online"] == true
    })
    .await;
}

/// Config that makes "online" mean "a poll is waiting right now".
const ONLINE_MEANS_WAITING: &str = "[sync]\nonline_grace = \"1ms\"\n";

fn ids(commands: &[Value]) -> Vec<&str> {
    commands.iter().map(|c| c["id"].as_str().unwrap()).collect()
}

// ---------------------------------------------------------------------------------------
// /sync/connect

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reports_session_parameters() {
    let relay = TestRelay::start_with("[sync]\npoll_timeout_max = \"7s\"\n").await;
    let key = relay.key("daemon", Some("alpha"), None).await;
    let daemon = Daemon::new(&relay.url, "alpha", &key);

    let first = connect_as(&daemon, "1.0.0", &["sessions"]).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.header("x-syncrelay-source"), Some("relay"));
    let connection_id = first.body["connection_id"].as_str().expect("connection_id");
    assert!(!connection_id.is_empty());
    assert_eq!(
        first.body["poll_timeout_max"], 7,
        "equals [sync] poll_timeout_max"
    );
    assert_eq!(first.body["last_update_seq"], 0, "nothing stored yet");
    let relay_version = first.body["relay_version"].as_str().expect("relay_version");
    assert!(!relay_version.is_empty());

    let second = connect_as(&daemon, "1.0.0", &["sessions"]).await;
    assert_eq!(second.status, 200, "{}", second.body);
    assert_ne!(
        second.body["connection_id"], first.body["connection_id"],
        "every connect opens a new connection"
    );

    // The default is 60 s.
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("beta").await;
    let reply = connect_as(&daemon, "1.0.0", &[]).await;
    assert_eq!(reply.body["poll_timeout_max"], 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_refreshes_version_and_capabilities() {
    let relay = TestRelay::start().await;
    let key = relay.key("daemon", Some("laptop"), None).await;
    let client = relay.client(&["laptop"]).await;
    let daemon = Daemon::new(&relay.url, "laptop", &key);

    assert_eq!(
        connect_as(&daemon, "1.0.0", &["sessions"]).await.status,
        200
    );
    let view = client_get(&client, "/api/v1/daemons/laptop").await;
    assert_eq!(view["daemon_id"], "laptop");
    assert_eq!(view["version"], "1.0.0");
    assert_eq!(view["capabilities"], json!(["sessions"]));
    assert!(
        view["last_seen"].is_string(),
        "last_seen after connect: {view}"
    );
    assert_eq!(view["online"], true);

    let reply = connect_as(&daemon, "2.1.0", &["approvals", "sessions", "streaming"]).await;
    assert_eq!(reply.status, 200);
    let view = client_get(&client, "/api/v1/daemons/laptop").await;
    assert_eq!(view["version"], "2.1.0");
    assert_eq!(
        view["capabilities"],
        json!(["approvals", "sessions", "streaming"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connect_supersedes_a_waiting_poll() {
    let relay = TestRelay::start_with(ONLINE_MEANS_WAITING).await;
    let old = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let key = old.key.clone();

    let body = json!({
        "daemon_id": "d",
        "connection_id": old.connection_id,
        "updates": [],
        "wait_for_commands": true,
        "timeout": 20,
    });
    let waiting = tokio::spawn(async move { poll_body(&old, body).await });
    until_poll_waits(&client, "d").await;

    let mut new = Daemon::new(&relay.url, "d", &key);
    new.connect().await;
    let reply = within(QUICK, "superseded poll", waiting).await.unwrap();
    reply.assert_error(409, "superseded");

    // The new connection polls normally.
    let (status, body) = new.poll_raw(json!([]), false, 0.0).await;
    assert_eq!(status, 200, "{body}");
}

/// The reconnect both supersedes the waiting poll and releases the lease of a command it
/// had handed out: that command must go to the new connection, never to the superseded
/// poll (which would lease it again, out of reach of the new connection for a whole lease).
/// Repeated because a wrong order shows only some of the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superseded_poll_never_takes_the_commands_released_by_the_reconnect() {
    let relay = TestRelay::start_with(ONLINE_MEANS_WAITING).await;
    let mut daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let command_id = queue_write(&client, "d", json!({})).await;
    // Leased (60 s) to the first connection.
    assert_eq!(ids(&daemon.next_commands().await), [command_id.as_str()]);

    for round in 0..8 {
        let old = Daemon {
            url: daemon.url.clone(),
            daemon_id: daemon.daemon_id.clone(),
            key: daemon.key.clone(),
            connection_id: daemon.connection_id.clone(),
            last_update_seq: 0,
            http: reqwest::Client::new(),
        };
        let waiting = tokio::spawn(async move { old.poll_raw(json!([]), true, 20.0).await });
        until_poll_waits(&client, "d").await;
        daemon.connect().await;
        let (status, body) = within(QUICK, "superseded poll", waiting).await.unwrap();
        assert_eq!(
            (status, &body["error"]["code"]),
            (409, &json!("superseded")),
            "round {round}: the superseded poll answered {status} {body}"
        );
        let (status, body) = daemon.poll_raw(json!([]), false, 0.0).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            ids(body["commands"].as_array().unwrap()),
            [command_id.as_str()],
            "round {round}: the new connection gets the released command at once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_naming_a_stale_connection_is_rejected_at_once() {
    let relay = TestRelay::start().await;
    let old = relay.daemon("d").await;
    let mut new = Daemon::new(&relay.url, "d", &old.key);
    new.connect().await;
    assert_ne!(old.connection_id, new.connection_id);

    // Would wait 20 s if it were accepted.
    let reply = within(
        QUICK,
        "stale poll",
        poll_body(
            &old,
            json!({
                "daemon_id": "d",
                "connection_id": old.connection_id,
                "wait_for_commands": true,
                "timeout": 20,
            }),
        ),
    )
    .await;
    reply.assert_error(409, "superseded");

    // A connection id the relay never issued is just as stale.
    let reply = poll_body(
        &old,
        json!({ "daemon_id": "d", "connection_id": "conn-made-up", "wait_for_commands": false }),
    )
    .await;
    reply.assert_error(409, "superseded");
}

// ---------------------------------------------------------------------------------------
// /sync/poll: waiting

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_poll_wakes_when_a_command_is_queued() {
    let relay = TestRelay::start_with(ONLINE_MEANS_WAITING).await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;

    let waiting = tokio::spawn(async move { daemon.poll_raw(json!([]), true, 20.0).await });
    until_poll_waits(&client, "d").await;
    let command_id = queue_write(&client, "d", json!({ "name": "x" })).await;

    // Well before the poll's own 20 s timeout.
    let (status, body) = within(QUICK, "woken poll", waiting).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let commands = body["commands"].as_array().expect("commands");
    assert_eq!(ids(commands), [command_id.as_str()]);
    let command = &commands[0];
    assert_eq!(command["method"], "http");
    assert_eq!(command["params"]["method"], "POST");
    assert_eq!(command["params"]["path"], "/api/v1/things");
    assert_eq!(command["params"]["body"], json!({ "name": "x" }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_timeout_is_clamped_to_poll_timeout_max() {
    let relay = TestRelay::start_with("[sync]\npoll_timeout_max = \"1s\"\n").await;
    let mut daemon = relay.daemon("d").await;
    assert_eq!(daemon.connect().await["poll_timeout_max"], 1);

    // Asks for 30 s; the relay answers after at most 1 s with nothing.
    let (status, body) = within(SLOW, "clamped poll", daemon.poll_raw(json!([]), true, 30.0)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["commands"], json!([]));
    assert_eq!(body["last_update_seq"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_without_waiting_answers_at_once() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;

    // timeout 30 is ignored when wait_for_commands is false.
    let (status, body) = within(QUICK, "empty poll", daemon.poll_raw(json!([]), false, 30.0)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["commands"], json!([]));

    // A queued command comes back without waiting too.
    let command_id = queue_write(&client, "d", json!({})).await;
    let (status, body) = within(QUICK, "poll", daemon.poll_raw(json!([]), false, 30.0)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        ids(body["commands"].as_array().unwrap()),
        [command_id.as_str()]
    );
}

// ---------------------------------------------------------------------------------------
// /sync/poll: leases

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_command_is_handed_out_again_after_its_lease() {
    let relay = TestRelay::start_with("[sync]\nlease_duration = \"1s\"\n").await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let command_id = queue_write(&client, "d", json!({})).await;

    let first = within(QUICK, "first delivery", daemon.poll(5.0)).await;
    assert_eq!(ids(&first), [command_id.as_str()]);

    // Not answered: a waiting poll gets the same command once the 1 s lease runs out
    // (and long before its own 8 s timeout).
    let again = within(SLOW, "redelivery", daemon.poll(8.0)).await;
    assert_eq!(
        ids(&again),
        [command_id.as_str()],
        "same id, delivered again"
    );
    assert_eq!(again[0]["params"], first[0]["params"]);

    // Answered: nothing more is handed out.
    let answer = daemon.answer(&command_id, 201, json!({ "ok": true })).await;
    assert_eq!(answer["accepted"], json!([command_id]));
    let (status, body) = daemon.poll_raw(json!([]), false, 0.0).await;
    assert_eq!(status, 200);
    assert_eq!(body["commands"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_releases_leases() {
    // Default 60 s lease: only the reconnect can bring the command back within the test.
    let relay = TestRelay::start().await;
    let mut daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let command_id = queue_write(&client, "d", json!({})).await;

    let first = within(QUICK, "first delivery", daemon.poll(5.0)).await;
    assert_eq!(ids(&first), [command_id.as_str()]);
    let (_, body) = daemon.poll_raw(json!([]), false, 0.0).await;
    assert_eq!(
        body["commands"],
        json!([]),
        "leased, so not handed out twice"
    );

    daemon.connect().await;
    let (status, body) = within(QUICK, "poll", daemon.poll_raw(json!([]), false, 0.0)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        ids(body["commands"].as_array().unwrap()),
        [command_id.as_str()],
        "handed out again at once after the reconnect"
    );
}

// ---------------------------------------------------------------------------------------
// /sync/poll: updates

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_are_appended_and_resent_ones_dropped() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;

    let batch = json!([
        { "type": "session_created", "data": { "id": "s1" }, "timestamp": "2025-01-02T03:04:05Z", "seq": 1 },
        { "type": "session_updated", "data": { "id": "s1", "n": 2 }, "seq": 2 },
    ]);
    let (status, body) = daemon.poll_raw(batch.clone(), false, 0.0).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["last_update_seq"], 2);

    let log = changes(&client, "d").await;
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0]["type"], "session_created");
    assert_eq!(log[0]["data"], json!({ "id": "s1" }));
    let timestamp = log[0]["timestamp"].as_str().unwrap();
    assert!(
        timestamp.starts_with("2025-01-02T03:04:05"),
        "daemon's timestamp kept: {timestamp}"
    );
    assert_eq!(log[1]["type"], "session_updated");
    assert_eq!(log[1]["data"], json!({ "id": "s1", "n": 2 }));
    assert!(
        log[1]["timestamp"].is_string(),
        "relay's time when none given"
    );
    let first_seq = log[0]["seq"].as_u64().unwrap();
    assert_eq!(log[1]["seq"].as_u64(), Some(first_seq + 1));

    // The same batch again (a lost response): nothing new.
    let (status, body) = daemon.poll_raw(batch, false, 0.0).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["last_update_seq"], 2);
    assert_eq!(
        changes(&client, "d").await.len(),
        2,
        "a resent batch never duplicates"
    );

    // Overlapping batch: only seq 3 is new.
    let overlap = json!([
        { "type": "session_updated", "data": { "id": "s1", "n": 2 }, "seq": 2 },
        { "type": "session_deleted", "data": { "id": "s1" }, "seq": 3 },
    ]);
    let (_, body) = daemon.poll_raw(overlap, false, 0.0).await;
    assert_eq!(body["last_update_seq"], 3);
    let log = changes(&client, "d").await;
    let kinds: Vec<&str> = log.iter().map(|c| c["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["session_created", "session_updated", "session_deleted"]
    );

    // A poll without updates still reports the stored seq.
    let (_, body) = daemon.poll_raw(json!([]), false, 0.0).await;
    assert_eq!(body["last_update_seq"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reports_the_stored_last_update_seq() {
    let relay = TestRelay::start().await;
    let mut daemon = relay.daemon("d").await;
    assert_eq!(daemon.last_update_seq, 0);
    let updates = json!([
        { "type": "a", "data": {}, "seq": 40 },
        { "type": "b", "data": {}, "seq": 41 },
    ]);
    let (status, body) = daemon.poll_raw(updates, false, 0.0).await;
    assert_eq!(status, 200, "{body}");

    let reply = daemon.connect().await;
    assert_eq!(reply["last_update_seq"], 41);

    // After a restart, too: it is stored, not remembered.
    let dir = relay.stop().await;
    let relay = TestRelay::start_in(dir, "").await;
    let mut daemon = Daemon::new(&relay.url, "d", &daemon.key);
    assert_eq!(daemon.connect().await["last_update_seq"], 41);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_without_seq_are_always_appended() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let (_, body) = daemon
        .poll_raw(
            json!([{ "type": "numbered", "data": {}, "seq": 5 }]),
            false,
            0.0,
        )
        .await;
    assert_eq!(body["last_update_seq"], 5);

    let unnumbered = json!([{ "type": "tick", "data": { "n": 1 } }]);
    for _ in 0..2 {
        let (status, body) = daemon.poll_raw(unnumbered.clone(), false, 0.0).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["last_update_seq"], 5,
            "unchanged by updates without seq"
        );
    }
    let log = changes(&client, "d").await;
    let kinds: Vec<&str> = log.iter().map(|c| c["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["numbered", "tick", "tick"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_with_invalid_timestamp_is_rejected() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let reply = poll_body(
        &daemon,
        json!({
            "daemon_id": "d",
            "updates": [
                { "type": "fine", "data": {}, "seq": 1 },
                { "type": "bad", "data": {}, "timestamp": "yesterday", "seq": 2 },
            ],
            "wait_for_commands": false,
        }),
    )
    .await;
    reply.assert_error(400, "bad_request");
    assert!(
        changes(&client, "d").await.is_empty(),
        "a rejected batch stores nothing"
    );
    assert_eq!(
        daemon.poll_raw(json!([]), false, 0.0).await.1["last_update_seq"],
        0
    );
}

// ---------------------------------------------------------------------------------------
// /sync/results

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_list_accepted_and_unknown_ids() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let command_id = queue_write(&client, "d", json!({})).await;
    assert_eq!(ids(&daemon.next_commands().await), [command_id.as_str()]);

    let body = daemon
        .results(json!([
            { "command_id": "cmd-000000000000000000000000", "result": { "status": 200 } },
            { "command_id": command_id, "result": { "status": 201, "headers": {}, "body": { "made": 1 } }, "error": null },
            { "command_id": "not-even-an-id", "result": null },
        ]))
        .await;
    assert_eq!(body["accepted"], json!([command_id]));
    assert_eq!(
        body["unknown"],
        json!(["cmd-000000000000000000000000", "not-even-an-id"])
    );

    let view = client_get(&client, &format!("/api/v1/commands/{command_id}")).await;
    assert_eq!(view["state"], "completed");
    assert_eq!(view["result"]["status"], 201);
    assert_eq!(view["result"]["body"], json!({ "made": 1 }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_result_wins() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let command_id = queue_write(&client, "d", json!({})).await;
    daemon.next_commands().await;

    let first = daemon
        .answer(&command_id, 200, json!({ "answer": "first" }))
        .await;
    assert_eq!(first["accepted"], json!([command_id]));
    assert_eq!(first["unknown"], json!([]));
    let second = daemon
        .answer(&command_id, 500, json!({ "answer": "second" }))
        .await;
    assert_eq!(
        second["accepted"],
        json!([command_id]),
        "accepted and ignored"
    );
    assert_eq!(second["unknown"], json!([]));

    let view = client_get(&client, &format!("/api/v1/commands/{command_id}")).await;
    assert_eq!(view["state"], "completed");
    assert_eq!(view["result"]["status"], 200);
    assert_eq!(view["result"]["body"], json!({ "answer": "first" }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_for_another_daemons_command_is_unknown() {
    let relay = TestRelay::start().await;
    let owner = relay.daemon("owner").await;
    let intruder = relay.daemon("intruder").await;
    let client = relay.client(&["owner"]).await;
    let command_id = queue_write(&client, "owner", json!({})).await;
    owner.next_commands().await;

    let body = intruder
        .answer(&command_id, 200, json!({ "forged": true }))
        .await;
    assert_eq!(body["accepted"], json!([]));
    assert_eq!(body["unknown"], json!([command_id]));
    let view = client_get(&client, &format!("/api/v1/commands/{command_id}")).await;
    assert_eq!(
        view["state"], "delivered",
        "untouched by the other daemon: {view}"
    );
    assert!(view["result"].is_null(), "{view}");

    // Its own daemon can still answer it.
    let body = owner
        .answer(&command_id, 200, json!({ "real": true }))
        .await;
    assert_eq!(body["accepted"], json!([command_id]));
}

// ---------------------------------------------------------------------------------------
// Authentication and authorisation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_routes_require_the_daemons_own_key() {
    let relay = TestRelay::start().await;
    let a = relay.daemon("a").await;
    let _b = relay.daemon("b").await;
    let client = relay.client(&["*"]).await;
    let bodies = [
        (
            "/sync/connect",
            json!({ "daemon_id": "a", "version": "1", "capabilities": [] }),
        ),
        (
            "/sync/poll",
            json!({ "daemon_id": "a", "wait_for_commands": false }),
        ),
        ("/sync/results", json!({ "daemon_id": "a", "results": [] })),
    ];
    for (route, body) in &bodies {
        post_json(&relay.url, route, None, body)
            .await
            .assert_error(401, "unauthorized");
        post_json(&relay.url, route, Some("srk_0000_nope"), body)
            .await
            .assert_error(401, "unauthorized");
        post_json(&relay.url, route, Some(&client.key), body)
            .await
            .assert_error(403, "forbidden");
        post_json(&relay.url, route, Some(&relay.admin_token), body)
            .await
            .assert_error(403, "forbidden");

        // Daemon a's key acting as daemon b.
        let mut as_b = body.clone();
        as_b["daemon_id"] = json!("b");
        post_json(&relay.url, route, Some(&a.key), &as_b)
            .await
            .assert_error(403, "forbidden");
    }
}

// ---------------------------------------------------------------------------------------
// Bad input

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_bad_requests() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let key = Some(daemon.key.as_str());
    let url = relay.url.as_str();

    for route in ["/sync/connect", "/sync/poll", "/sync/results"] {
        for raw in [&b"{\"daemon_id\": \"d\""[..], b"not json", b"", b"[]"] {
            post_raw(url, route, key, raw.to_vec())
                .await
                .assert_error(400, "bad_request");
        }
        post_json(
            url,
            route,
            key,
            &json!({ "version": "1", "results": [], "updates": [] }),
        )
        .await
        .assert_error(400, "bad_request");
        post_json(url, route, key, &json!({ "daemon_id": 7, "results": [] }))
            .await
            .assert_error(400, "bad_request");
        let long = "a".repeat(65);
        for bad_id in ["../x", long.as_str(), "", "a/b", ".."] {
            let body = json!({ "daemon_id": bad_id, "results": [], "wait_for_commands": false });
            post_json(url, route, key, &body)
                .await
                .assert_error(400, "bad_request");
        }
    }

    let wrong_types = [
        json!({ "daemon_id": "d", "updates": "x" }),
        json!({ "daemon_id": "d", "updates": [{ "data": {} }] }),
        json!({ "daemon_id": "d", "updates": [{ "type": "t", "seq": "one" }] }),
        json!({ "daemon_id": "d", "updates": [{ "type": "t", "seq": -1 }] }),
        json!({ "daemon_id": "d", "wait_for_commands": "yes" }),
        json!({ "daemon_id": "d", "timeout": "30" }),
        json!({ "daemon_id": "d", "timeout": -1 }),
    ];
    for body in &wrong_types {
        let reply = post_json(url, "/sync/poll", key, body).await;
        assert_eq!(reply.status, 400, "{body} → {}", reply.body);
        reply.assert_error(400, "bad_request");
    }
    post_json(
        url,
        "/sync/connect",
        key,
        &json!({ "daemon_id": "d", "capabilities": "all" }),
    )
    .await
    .assert_error(400, "bad_request");
    post_json(
        url,
        "/sync/results",
        key,
        &json!({ "daemon_id": "d", "results": "x" }),
    )
    .await
    .assert_error(400, "bad_request");
    post_json(
        url,
        "/sync/results",
        key,
        &json!({ "daemon_id": "d", "results": [{ "result": 1 }] }),
    )
    .await
    .assert_error(400, "bad_request");

    // Unknown fields are ignored.
    let reply = post_json(
        url,
        "/sync/poll",
        key,
        &json!({ "daemon_id": "d", "wait_for_commands": false, "future_field": [1, 2] }),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_routes_only_accept_post() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let http = reqwest::Client::new();
    for route in ["/sync/connect", "/sync/poll", "/sync/results"] {
        for method in [
            reqwest::Method::GET,
            reqwest::Method::PUT,
            reqwest::Method::DELETE,
        ] {
            let request = http
                .request(method.clone(), format!("{}{route}", relay.url))
                .bearer_auth(&daemon.key)
                .send();
            let reply = Reply::read(within(QUICK, route, request).await.unwrap()).await;
            reply.assert_error(405, "method_not_allowed");
            assert_eq!(reply.header("allow"), Some("POST"), "{method} {route}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_updates_in_one_poll_is_payload_too_large() {
    let relay = TestRelay::start_with("[limits]\nmax_updates_per_poll = 3\n").await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let update = |seq: u64| json!({ "type": "t", "data": {}, "seq": seq });

    let four: Vec<Value> = (1..=4).map(update).collect();
    let reply = poll_body(
        &daemon,
        json!({ "daemon_id": "d", "updates": four, "wait_for_commands": false }),
    )
    .await;
    reply.assert_error(413, "payload_too_large");
    assert!(
        changes(&client, "d").await.is_empty(),
        "nothing of a rejected batch is stored"
    );

    let three: Vec<Value> = (1..=3).map(update).collect();
    let (status, body) = daemon.poll_raw(Value::Array(three), false, 0.0).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["last_update_seq"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_payload_too_large() {
    let relay = TestRelay::start_with("[limits]\nmax_body_bytes = 1024\n").await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    let big = json!({
        "daemon_id": "d",
        "updates": [{ "type": "t", "data": { "blob": "x".repeat(4096) }, "seq": 1 }],
        "wait_for_commands": false,
    });
    for route in ["/sync/poll", "/sync/connect", "/sync/results"] {
        post_json(&relay.url, route, Some(&daemon.key), &big)
            .await
            .assert_error(413, "payload_too_large");
    }
    assert!(changes(&client, "d").await.is_empty());

    // Just under the limit is fine.
    let small = json!({
        "daemon_id": "d",
        "updates": [{ "type": "t", "data": { "blob": "x".repeat(512) }, "seq": 1 }],
        "wait_for_commands": false,
    });
    let reply = poll_body(&daemon, small).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

// ---------------------------------------------------------------------------------------
// Queue limit

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_queue_full() {
    let relay = TestRelay::start_with("[commands]\nqueue_limit = 2\n").await;
    let daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;

    let first = queue_write(&client, "d", json!({ "n": 1 })).await;
    queue_write(&client, "d", json!({ "n": 2 })).await;
    let reply = try_queue_write(&client, "d", json!({ "n": 3 })).await;
    reply.assert_error(429, "queue_full");
    let retry_after = reply
        .header("retry-after")
        .expect("Retry-After with queue_full");
    assert!(
        retry_after.parse::<u64>().is_ok(),
        "Retry-After in seconds: {retry_after}"
    );

    // Delivered but unanswered commands still count; an answer makes room.
    let commands = daemon.next_commands().await;
    assert_eq!(commands.len(), 2);
    try_queue_write(&client, "d", json!({ "n": 3 }))
        .await
        .assert_error(429, "queue_full");
    daemon.answer(&first, 200, json!({})).await;
    queue_write(&client, "d", json!({ "n": 3 })).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_leave_exactly_one_valid_connection() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("d").await;
    let connects: Vec<_> = (0..8)
        .map(|i| {
            let (url, key) = (daemon.url.clone(), daemon.key.clone());
            tokio::spawn(async move {
                let body = json!({ "daemon_id": "d", "version": format!("v{i}") });
                post_json(&url, "/sync/connect", Some(&key), &body).await
            })
        })
        .collect();
    let mut connection_ids = Vec::new();
    for connect in connects {
        let reply = within(REQUEST_LIMIT, "connect", connect).await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        connection_ids.push(reply.body["connection_id"].as_str().unwrap().to_owned());
    }
    // Whatever order they ran in, the published connection is the stored one: exactly one
    // id is accepted, every other is superseded.
    let mut accepted = 0;
    for connection_id in &connection_ids {
        let reply = poll_body(
            &daemon,
            json!({ "daemon_id": "d", "connection_id": connection_id, "wait_for_commands": false }),
        )
        .await;
        match reply.status {
            200 => accepted += 1,
            409 => assert_eq!(reply.body["error"]["code"], "superseded"),
            other => panic!("poll answered {other}: {}", reply.body),
        }
    }
    assert_eq!(accepted, 1, "exactly one connection stays valid");
}

/// Reads live in memory only, yet are not lost with a poll's answer: a read handed to a
/// connection that is then replaced (its poll answer may never have arrived) is handed
/// out again to the new connection, and its answer reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_handed_to_a_replaced_connection_is_handed_out_again() {
    let relay = TestRelay::start().await;
    let mut daemon = relay.daemon("d").await;
    let client = relay.client(&["d"]).await;
    // Online: a poll waits when the client asks.
    let first_poll = {
        let daemon = Daemon {
            url: daemon.url.clone(),
            daemon_id: daemon.daemon_id.clone(),
            key: daemon.key.clone(),
            connection_id: daemon.connection_id.clone(),
            last_update_seq: daemon.last_update_seq,
            http: reqwest::Client::new(),
        };
        tokio::spawn(async move { daemon.poll(10.0).await })
    };
    eventually(Duration::from_secs(10), || async {
        client
            .get("/api/v1/daemons/d")
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()["online"]
            == true
    })
    .await;
    let read = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .get("/api/v1/daemons/d/sessions")
                .header("prefer", "wait=10")
                .send()
                .await
                .unwrap()
        }
    });
    let handed = first_poll.await.unwrap();
    assert_eq!(handed.len(), 1);
    assert_eq!(handed[0]["params"]["method"], "GET");
    // The daemon reconnects as if that answer had been lost.
    daemon.connect().await;
    let again = daemon.poll(5.0).await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0]["id"], handed[0]["id"]);
    daemon
        .answer(
            again[0]["id"].as_str().unwrap(),
            200,
            json!({ "sessions": [] }),
        )
        .await;
    let response = read.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({ "sessions": [] })
    );
}

/// Updates that the relay committed for an upload cut short (the daemon's connection lost
/// while the store committed them) reach the change log's readers all the same: without a
/// reconnect once the commit is done, and at the latest when the relay tells the
/// reconnecting daemon it holds them (the daemon drops them from its outbox then, and
/// never sends them again). Uploads over HTTP/2 are cut at random points around their
/// commit time until several were cut after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_committed_for_an_upload_cut_short_are_visible_once_acknowledged() {
    use rand::Rng;
    let relay = TestRelay::start().await;
    let mut daemon = relay.daemon("cut").await;
    let client = relay.client(&["cut"]).await;
    // HTTP/2: the relay sees a cut request as its stream reset, at once.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let pad = "x".repeat(1000);
    let upload = |daemon: &Daemon, from: u64| {
        let updates: Vec<Value> = (from..from + 200)
            .map(|seq| json!({ "type": "tick", "data": { "n": seq, "pad": pad }, "seq": seq }))
            .collect();
        h2.post(format!("{}/sync/poll", relay.url))
            .bearer_auth(&daemon.key)
            .json(&json!({
                "daemon_id": daemon.daemon_id,
                "connection_id": daemon.connection_id,
                "updates": updates,
                "wait_for_commands": false,
            }))
            .send()
    };
    // The update `n` as readers see it, waiting up to `wait` s for it.
    let read = |n: u64, wait: u64| {
        let request = client.get(&format!(
            "/api/v1/daemons/cut/changes?since={}&limit=1&wait={wait}",
            n - 1
        ));
        async move {
            let page: Value = request.send().await.unwrap().json().await.unwrap();
            page["changes"][0]["data"]["n"] == n
        }
    };
    // How long an answered upload takes on a warm connection.
    assert_eq!(upload(&daemon, 1).await.unwrap().status(), 200);
    let started = std::time::Instant::now();
    assert_eq!(upload(&daemon, 201).await.unwrap().status(), 200);
    let commit = started.elapsed();
    let mut next = 401;
    let mut cut_after_commit = 0;
    for round in 0..100 {
        if cut_after_commit >= 5 {
            break;
        }
        let cut = commit.mul_f64(rand::thread_rng().gen_range(0.2..1.5));
        let answered = matches!(
            tokio::time::timeout(cut, upload(&daemon, next)).await,
            Ok(Ok(_))
        );
        let last = next + 199;
        let seen = read(last, 1).await;
        let acknowledged = daemon.connect().await["last_update_seq"].as_u64().unwrap();
        if acknowledged >= last {
            assert!(
                seen,
                "round {round}: update {last} committed, but readers saw it only after a reconnect"
            );
            cut_after_commit += usize::from(!answered);
        }
        // Told `acknowledged`, a daemon never sends those updates again: a reader must see
        // them now, not only once the daemon appends something else.
        assert!(
            read(acknowledged, 0).await,
            "round {round}: update {acknowledged} acknowledged but not in the change log"
        );
        next = acknowledged + 1;
    }
    assert!(
        cut_after_commit > 0,
        "no upload was cut after its commit in 100 tries (commit takes {commit:?})"
    );
}
