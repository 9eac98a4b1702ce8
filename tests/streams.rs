//! Cache-and-serve streaming end to end: relay, agent and a local daemon serving a large
//! SSE context; clients read it through the relay.

mod common;

use std::time::Duration;

use common::daemon::TestDaemon;
use common::{Client, TestAgent, TestRelay};
use syncrelay::agent::RawAgent;

const CONTEXT: &str = "/api/v1/daemons/d/approvals/a1/context/stream";

/// Reads a whole response body (bounded in time).
async fn read_all(client: &Client, path: &str) -> (u16, String, String) {
    let response = tokio::time::timeout(Duration::from_secs(60), client.get(path).send())
        .await
        .expect("answer in time")
        .unwrap();
    let status = response.status().as_u16();
    let source = response.headers()["x-syncrelay-source"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = tokio::time::timeout(Duration::from_secs(60), response.text())
        .await
        .expect("body in time")
        .unwrap();
    (status, source, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_is_fetched_once_and_replayed() {
    let relay = TestRelay::start().await;
    let daemon = TestDaemon::start().await;
    let key = relay.key("daemon", Some("d"), None).await;
    let client = relay.client(&["d"]).await;
    let _agent = TestAgent::start(&relay.url, "d", &key, &daemon.target, RawAgent::default());
    client.await_online("d").await;
    let path = format!("{CONTEXT}?events=50&size=1000");
    let (status, source, first) = read_all(&client, &path).await;
    assert_eq!(status, 200);
    assert_eq!(source, "daemon");
    assert_eq!(first.matches("\nevent: context\n").count(), 50);
    assert!(
        first.starts_with("id: 1\nevent: context\ndata: {\"n\":0,"),
        "{}",
        &first[..80]
    );
    let (status, source, second) = read_all(&client, &path).await;
    assert_eq!((status, source.as_str()), (200, "cache"));
    assert_eq!(first, second, "byte-identical replay");
    assert_eq!(
        daemon.hits("/api/v1/approvals/a1/context/stream"),
        1,
        "the daemon was asked once"
    );
}
