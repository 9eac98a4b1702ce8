//! The agent end to end: a relay, the agent (through the library) and a local HTTP daemon
//! on loopback; clients call the daemon through the relay's mirrored API.

mod common;

use common::daemon::TestDaemon;
use common::{TestAgent, TestRelay};
use serde_json::Value;
use syncrelay::agent::RawAgent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirrored_get_reaches_the_local_daemon() {
    let relay = TestRelay::start().await;
    let daemon = TestDaemon::start().await;
    let key = relay.key("daemon", Some("d"), None).await;
    let client = relay.client(&["d"]).await;
    let _agent = TestAgent::start(&relay.url, "d", &key, &daemon.target, RawAgent::default());
    client.await_online("d").await;
    let response = client
        .get("/api/v1/daemons/d/echo/x?y=1")
        .header("prefer", "wait=10")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-syncrelay-source"], "daemon");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["path"], "/api/v1/echo/x");
    assert_eq!(body["query"], "y=1");
}
