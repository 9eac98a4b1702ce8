//! HTTP/2 on the plaintext listener: prior-knowledge h2c and HTTP/1.1 share one port, and
//! one HTTP/2 connection carries a waiting poll and result posts at the same time, as a
//! daemon behind NAT uses it.

mod common;

use bytes::Bytes;
use common::TestRelay;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use std::time::Duration;

type Sender = http2::SendRequest<Full<Bytes>>;

async fn post(
    sender: &mut Sender,
    url: &str,
    token: &str,
    route: &str,
    body: Value,
) -> (u16, Value) {
    let request = hyper::Request::post(format!("{url}{route}"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = sender.send_request(request).await.expect("h2 request");
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_carries_a_waiting_poll_and_results() {
    let relay = TestRelay::start().await;
    let daemon_key = relay.key("daemon", Some("d"), None).await;
    let client = relay.client(&["d"]).await;

    // Exactly one TCP connection, spoken as HTTP/2 with prior knowledge.
    let tcp = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut sender: Sender = sender;
    let url = relay.url.clone();

    let (status, connect) = post(
        &mut sender,
        &url,
        &daemon_key,
        "/sync/connect",
        json!({ "daemon_id": "d", "version": "1", "capabilities": [] }),
    )
    .await;
    assert_eq!(status, 200);
    let connection_id = connect["connection_id"].clone();
    let poll_body = json!({ "daemon_id": "d", "connection_id": connection_id, "wait_for_commands": true, "timeout": 30 });

    // Command A reaches the daemon.
    let first = client
        .post("/api/v1/daemons/d/things")
        .header("prefer", "respond-async")
        .json(&json!({ "n": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 202);
    let (status, polled) = post(
        &mut sender,
        &url,
        &daemon_key,
        "/sync/poll",
        poll_body.clone(),
    )
    .await;
    assert_eq!(status, 200);
    let command_a = polled["commands"][0]["id"].as_str().unwrap().to_owned();

    // A second poll waits on the connection while A's result travels on the same one.
    let mut poll_sender = sender.clone();
    let (poll_url, poll_key) = (url.clone(), daemon_key.clone());
    let waiting_poll = tokio::spawn(async move {
        post(
            &mut poll_sender,
            &poll_url,
            &poll_key,
            "/sync/poll",
            poll_body,
        )
        .await
    });
    let (status, accepted) = post(
        &mut sender,
        &url,
        &daemon_key,
        "/sync/results",
        json!({ "daemon_id": "d", "results": [{ "command_id": command_a, "result": { "status": 200, "body": "done" } }] }),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(accepted["accepted"], json!([command_a]));
    assert!(
        !waiting_poll.is_finished(),
        "the poll still waits: nothing is queued"
    );

    // Queuing command B answers the waiting poll.
    let second = client
        .post("/api/v1/daemons/d/things")
        .header("prefer", "respond-async")
        .json(&json!({ "n": 2 }))
        .send()
        .await
        .unwrap();
    let command_b = second.json::<Value>().await.unwrap()["id"].clone();
    let (status, polled) = tokio::time::timeout(Duration::from_secs(10), waiting_poll)
        .await
        .expect("the poll woke")
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(polled["commands"][0]["id"], command_b);

    // The result posted over HTTP/2 is what the client sees.
    let state: Value = client
        .get(&format!("/api/v1/commands/{command_a}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["state"], "completed");
    assert_eq!(state["result"]["body"], "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_h2c_share_the_port() {
    let relay = TestRelay::start().await;
    let client = relay.client(&["*"]).await;
    for http2_only in [false, true] {
        let mut builder = reqwest::Client::builder();
        if http2_only {
            builder = builder.http2_prior_knowledge();
        }
        let http = builder.build().unwrap();
        let response = http
            .get(format!("{}/api/v1/daemons", relay.url))
            .bearer_auth(&client.key)
            .send()
            .await
            .unwrap();
        let expected = if http2_only {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        };
        assert_eq!(response.version(), expected);
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.json::<Value>().await.unwrap(),
            json!({ "daemons": [] })
        );
    }
}
