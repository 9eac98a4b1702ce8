//! The README walkthrough, end to end: keys, connect, a mirrored GET answered by the daemon.

mod common;

use common::{serve_daemon, TestRelay};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_get_round_trip() {
    let relay = TestRelay::start().await;
    let daemon = relay.daemon("laptop").await;
    let client = relay.client(&["laptop"]).await;
    let server = serve_daemon(daemon, |command| {
        assert_eq!(command["method"], "http");
        json!({ "status": 200, "headers": { "content-type": "application/json" },
                "body": { "path": command["params"]["path"], "query": command["params"]["query"] } })
    });
    let response = client
        .get("/api/v1/daemons/laptop/sessions?leafOnly=true")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-syncrelay-source"], "daemon");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({ "path": "/api/v1/sessions", "query": "leafOnly=true" })
    );
    server.abort();
}
