//! Helpers shared by the benches: latency percentiles and keys made through a relay's
//! admin API.
#![allow(dead_code)]

use std::time::Duration;

use serde_json::Value;

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Creates a key (`body` as for `POST /admin/keys`) and returns its token.
pub async fn create_key(http: &reqwest::Client, url: &str, admin: &str, body: Value) -> String {
    let created: Value = http
        .post(format!("{url}/admin/keys"))
        .bearer_auth(admin)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["token"].as_str().unwrap().to_owned()
}

/// One long poll of `daemon_id` that waits for commands (up to `timeout` s); its answer,
/// or `None` once the relay is gone.
pub async fn wait_poll(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    daemon_id: &str,
    connection_id: &Value,
    timeout: u64,
) -> Option<Value> {
    let poll = serde_json::json!({ "daemon_id": daemon_id, "connection_id": connection_id,
                                   "wait_for_commands": true, "timeout": timeout });
    let response = http
        .post(format!("{url}/sync/poll"))
        .bearer_auth(key)
        .json(&poll)
        .send()
        .await
        .ok()?;
    response.json::<Value>().await.ok()
}
