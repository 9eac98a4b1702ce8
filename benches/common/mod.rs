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
