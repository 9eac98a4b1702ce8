//! The cache-and-serve acceptance test at size: a 100 MB SSE context served by a local
//! daemon through the agent to 20 concurrent clients. Every client receives byte-identical
//! events, all of them, and the daemon is asked once. Bodies are hashed as they arrive,
//! so the test itself holds no whole context in memory.

mod common;

use std::time::Duration;

use common::daemon::TestDaemon;
use common::{TestAgent, TestRelay};
use sha2::{Digest, Sha256};
use syncrelay::agent::RawAgent;

const CLIENTS: usize = 20;
/// 100,000 events of 1,000 data bytes: a little over 100 MB of SSE.
const EVENTS: u64 = 100_000;
const EVENT_BYTES: u64 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_context_reaches_20_clients_identically_from_one_fetch() {
    let relay = TestRelay::start_with("[streams]\ncontext_max_size = 536870912\n").await;
    let daemon = TestDaemon::start().await;
    let key = relay.key("daemon", Some("d"), None).await;
    let client = relay.client(&["d"]).await;
    let _agent = TestAgent::start(&relay.url, "d", &key, &daemon.target, RawAgent::default());
    client.await_online("d").await;

    let path = format!(
        "/api/v1/daemons/d/approvals/big/context/stream?events={EVENTS}&size={EVENT_BYTES}"
    );
    let readers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let request = client.get(&path);
            tokio::spawn(async move {
                let mut response = request.send().await.expect("relay reachable");
                assert_eq!(response.status(), 200);
                let mut hash = Sha256::new();
                let mut bytes = 0u64;
                let mut events = 0u64;
                let mut tail = Vec::new();
                while let Some(chunk) = response.chunk().await.expect("body") {
                    hash.update(&chunk);
                    bytes += chunk.len() as u64;
                    // Count events by their `id:` lines, also across chunk boundaries.
                    tail.extend_from_slice(&chunk);
                    let mut start = 0;
                    while let Some(pos) = tail[start..].windows(5).position(|w| w == b"\nid: ") {
                        events += 1;
                        start += pos + 5;
                    }
                    tail.drain(..start.max(tail.len().saturating_sub(4)));
                }
                (hash.finalize().to_vec(), bytes, events)
            })
        })
        .collect();
    let mut results = Vec::new();
    for reader in readers {
        let result = tokio::time::timeout(Duration::from_secs(600), reader)
            .await
            .expect("every client finished")
            .expect("client task");
        results.push(result);
    }
    let (first_hash, first_bytes, first_events) = results[0].clone();
    assert!(
        first_bytes > 100_000_000,
        "a 100 MB context: {first_bytes} bytes"
    );
    // `id:` lines after the first: every event arrived.
    assert_eq!(first_events, EVENTS - 1);
    for (hash, bytes, _) in &results {
        assert_eq!(
            (hash, bytes),
            (&first_hash, &first_bytes),
            "byte-identical for every client"
        );
    }
    assert_eq!(
        daemon.hits("/api/v1/approvals/big/context/stream"),
        1,
        "the daemon was asked once"
    );
}
