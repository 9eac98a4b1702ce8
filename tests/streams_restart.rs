//! A relay restart in the middle of a context upload, with real processes: the relay binary
//! is SIGKILLed while the agent uploads a slow SSE context and restarted on the same data
//! dir and port. The agent resumes from the last stored chunk; a client then receives the
//! whole context, every event once and in order, and the daemon was asked once.

mod common;

use std::time::Duration;

use common::daemon::TestDaemon;
use common::{RelayProcess, TestAgent};
use syncrelay::agent::RawAgent;

const EVENTS: u64 = 300;
const SIZE: usize = 200;

/// The context as the relay frames it: relay ids from 1, the daemon's ids dropped.
fn expected_context() -> String {
    (0..EVENTS)
        .map(|n| {
            let fill = ((b'a' + (n % 26) as u8) as char).to_string().repeat(SIZE);
            format!(
                "id: {}\nevent: context\ndata: {{\"n\":{n},\"text\":\"{fill}\"}}\n\n",
                n + 1
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_resumes_after_a_relay_restart() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::spawn(dir.path());
    let listen = relay.url.trim_start_matches("http://").to_owned();
    let (daemon_key, client_key) = relay.daemon_and_client_keys("d").await;
    let daemon = TestDaemon::start().await;
    let _agent = TestAgent::start(
        &relay.url,
        "d",
        &daemon_key,
        &daemon.target,
        RawAgent::default(),
    );
    let client = common::Client {
        url: relay.url.clone(),
        key: client_key,
        http: reqwest::Client::new(),
    };
    client.await_online("d").await;

    // The daemon produces one event every 10 ms: the upload takes about 3 s.
    let path = format!(
        "/api/v1/daemons/d/approvals/a1/context/stream?events={EVENTS}&size={SIZE}&delay_ms=10"
    );
    let mut first = client.get(&path).send().await.unwrap();
    assert_eq!(first.status(), 200);
    // Some of the context is stored and being forwarded: now the relay dies.
    tokio::time::timeout(Duration::from_secs(10), first.chunk())
        .await
        .expect("the first events arrive")
        .unwrap()
        .expect("a first chunk");
    relay.kill();
    assert!(
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(Some(_)) = first.chunk().await {}
        })
        .await
        .is_ok(),
        "the first reader's stream ends with the relay"
    );

    let relay = RelayProcess::spawn_at(dir.path(), &listen);
    assert_eq!(
        relay.url, client.url,
        "same address: the agent finds it again"
    );
    client.await_online("d").await;
    let body = tokio::time::timeout(Duration::from_secs(60), async {
        client
            .get(&path)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    })
    .await
    .expect("the whole context within a minute");
    assert_eq!(body.len(), expected_context().len());
    assert!(
        body == expected_context(),
        "every event once, in order, byte-exact"
    );
    assert_eq!(
        daemon.hits("/api/v1/approvals/a1/context/stream"),
        1,
        "the upload resumed; the daemon was not asked again"
    );
    relay.kill();
}
