//! The operator CLI's side of the admin API: `syncrelay keys create|list|revoke` and
//! `syncrelay status` talk to a running relay over HTTP with the admin key (from
//! `SYNCRELAY_ADMIN_KEY` or `data_dir/admin.key`).

use std::path::Path;

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;

use crate::protocol::KeyView;

/// The admin key's file in the data dir.
pub const ADMIN_KEY_FILE: &str = "admin.key";

/// An admin-key HTTP client for one relay.
pub struct AdminClient {
    base_url: String,
    token: String,
    http: reqwest::Client,
}

/// The admin token: `SYNCRELAY_ADMIN_KEY`, else the file the relay wrote on first start.
pub fn admin_token(data_dir: &Path) -> anyhow::Result<String> {
    if let Ok(token) = std::env::var("SYNCRELAY_ADMIN_KEY") {
        if !token.trim().is_empty() {
            return Ok(token.trim().to_owned());
        }
    }
    let path = data_dir.join(ADMIN_KEY_FILE);
    let token = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no admin key: set SYNCRELAY_ADMIN_KEY or start the relay once so it writes {}",
            path.display()
        )
    })?;
    Ok(token.trim().to_owned())
}

impl AdminClient {
    pub fn new(base_url: &str, token: String, http: reqwest::Client) -> AdminClient {
        AdminClient {
            base_url: base_url.trim_end_matches('/').to_owned(),
            token,
            http,
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<T> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the relay at {}", self.base_url))?;
        let status = response.status();
        let body: serde_json::Value = response
            .json()
            .await
            .context("the relay's answer is not JSON")?;
        if !status.is_success() {
            let code = body["error"]["code"].as_str().unwrap_or("error");
            let message = body["error"]["message"].as_str().unwrap_or("");
            bail!("the relay answered {status}: {code}: {message}");
        }
        serde_json::from_value(body).context("unexpected answer from the relay")
    }

    pub async fn create_key(
        &self,
        role: &str,
        daemon: Option<&str>,
        scope: Option<Vec<String>>,
        label: Option<&str>,
    ) -> anyhow::Result<KeyView> {
        let body =
            serde_json::json!({ "role": role, "daemon": daemon, "scope": scope, "label": label });
        self.call(
            self.http
                .post(format!("{}/admin/keys", self.base_url))
                .json(&body),
        )
        .await
    }

    pub async fn list_keys(&self) -> anyhow::Result<Vec<KeyView>> {
        #[derive(serde::Deserialize)]
        struct Keys {
            keys: Vec<KeyView>,
        }
        let keys: Keys = self
            .call(self.http.get(format!("{}/admin/keys", self.base_url)))
            .await?;
        Ok(keys.keys)
    }

    pub async fn revoke_key(&self, key_id: &str) -> anyhow::Result<()> {
        let _: serde_json::Value = self
            .call(
                self.http
                    .delete(format!("{}/admin/keys/{key_id}", self.base_url)),
            )
            .await?;
        Ok(())
    }

    /// `syncrelay backup`: asks the relay to copy its database into `to` (a path on the
    /// relay's host) and hands each progress line to `progress`. Returns the final line
    /// (`{"done": true, …}`); an error line or a cut-off stream is an error.
    pub async fn backup(
        &self,
        to: &Path,
        mut progress: impl FnMut(&serde_json::Value),
    ) -> anyhow::Result<serde_json::Value> {
        let mut response = self
            .http
            .post(format!("{}/admin/backup", self.base_url))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({ "to": to }))
            .send()
            .await
            .with_context(|| format!("cannot reach the relay at {}", self.base_url))?;
        let status = response.status();
        if !status.is_success() {
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            let code = body["error"]["code"].as_str().unwrap_or("error");
            let message = body["error"]["message"].as_str().unwrap_or("");
            bail!("the relay answered {status}: {code}: {message}");
        }
        let mut pending = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .context("the connection to the relay broke during the backup")?
        {
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let value: serde_json::Value =
                    serde_json::from_slice(&line).context("unexpected answer from the relay")?;
                if value["done"] == true {
                    return Ok(value);
                }
                if let Some(error) = value.get("error") {
                    bail!(
                        "the backup failed: {}: {}",
                        error["code"].as_str().unwrap_or("error"),
                        error["message"].as_str().unwrap_or("")
                    );
                }
                progress(&value);
            }
        }
        bail!("the relay ended the backup without saying it finished; do not use the copy")
    }

    /// `GET /admin/stats`.
    pub async fn stats(&self) -> anyhow::Result<serde_json::Value> {
        self.call(self.http.get(format!("{}/admin/stats", self.base_url)))
            .await
    }

    pub async fn daemons(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let body: serde_json::Value = self
            .call(self.http.get(format!("{}/admin/daemons", self.base_url)))
            .await?;
        Ok(body["daemons"].as_array().cloned().unwrap_or_default())
    }
}

/// `syncrelay keys list` as a table.
pub fn format_keys(keys: &[KeyView]) -> String {
    let mut out = format!(
        "{:<18} {:<7} {:<24} {:<24} {}\n",
        "KEY ID", "ROLE", "DAEMON/SCOPE", "CREATED", "LABEL"
    );
    for key in keys {
        let target = key.daemon.clone().unwrap_or_else(|| key.scope.join(","));
        out += &format!(
            "{:<18} {:<7} {:<24} {:<24} {}\n",
            key.key_id,
            key.role,
            target,
            key.created_at,
            key.label.as_deref().unwrap_or("")
        );
    }
    out
}

/// The head of `syncrelay status` for a cluster node (`stats` from `/admin/stats`): its
/// name, NATS, the daemons it holds, hints and their latency. Empty on a single relay.
pub fn format_cluster(stats: &serde_json::Value) -> String {
    let cluster = &stats["cluster"];
    if !cluster.is_object() {
        return String::new();
    }
    let count = |key: &str| cluster[key].as_u64().unwrap_or(0);
    let latency = &cluster["hint_latency"];
    let quantiles = match (
        histogram_quantile(latency, 0.5),
        histogram_quantile(latency, 0.99),
    ) {
        (Some(p50), Some(p99)) => format!(
            "hint latency p50 ≤ {}, p99 ≤ {}",
            seconds_text(p50),
            seconds_text(p99)
        ),
        _ => "no hints received yet".to_owned(),
    };
    format!(
        "node {}: NATS {}; holds {} daemon connection(s); hints sent {}, received {}, dropped {}; \
         database re-reads {}; {quantiles}\n\n",
        cluster["node"].as_str().unwrap_or("?"),
        if cluster["nats_connected"] == true {
            "connected"
        } else {
            "UNREACHABLE (waiters re-read the database)"
        },
        count("daemons_held"),
        count("hints_sent"),
        count("hints_received"),
        count("hints_dropped"),
        count("fallback_rereads"),
    )
}

/// The bound of the bucket holding quantile `q` of a `HistogramView`; `None` when empty,
/// infinite past the last bound.
fn histogram_quantile(view: &serde_json::Value, q: f64) -> Option<f64> {
    let cumulative: Vec<u64> = view["cumulative"]
        .as_array()?
        .iter()
        .filter_map(serde_json::Value::as_u64)
        .collect();
    let total = *cumulative.last()?;
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let bucket = cumulative.iter().position(|&n| n >= rank)?;
    Some(
        view["bounds"]
            .get(bucket)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(f64::INFINITY),
    )
}

fn seconds_text(seconds: f64) -> String {
    if seconds.is_infinite() {
        "∞".to_owned()
    } else if seconds < 1.0 {
        // Trimmed: 0.00025 s is "0.25 ms", not "0.25000000000000006 ms".
        let text = format!("{:.3}", seconds * 1000.0);
        format!("{} ms", text.trim_end_matches('0').trim_end_matches('.'))
    } else {
        format!("{seconds} s")
    }
}

/// `syncrelay status` as a table; in a cluster, with the node holding each online daemon.
pub fn format_daemons(daemons: &[serde_json::Value]) -> String {
    // The node column, as wide as its widest name (none on a lone relay).
    let width = daemons
        .iter()
        .filter_map(|d| d["node"].as_str())
        .map(|node| node.chars().count().max(4))
        .max();
    let node = |text: &str| match width {
        Some(width) => format!(" {text:<width$}"),
        None => String::new(),
    };
    let mut out = format!(
        "{:<24} {:<7}{} {:<26} {:<10} {:>7} {:>10}\n",
        "DAEMON",
        "ONLINE",
        node("NODE"),
        "LAST SEEN",
        "VERSION",
        "QUEUED",
        "LAST SEQ"
    );
    for d in daemons {
        out += &format!(
            "{:<24} {:<7}{} {:<26} {:<10} {:>7} {:>10}\n",
            d["daemon_id"].as_str().unwrap_or(""),
            if d["online"].as_bool().unwrap_or(false) {
                "yes"
            } else {
                "no"
            },
            node(d["node"].as_str().unwrap_or("-")),
            d["last_seen"].as_str().unwrap_or("never"),
            d["version"].as_str().unwrap_or("-"),
            d["queued"].as_u64().unwrap_or(0),
            d["last_seq"].as_u64().unwrap_or(0),
        );
    }
    out
}

/// `syncrelay backup`'s progress bar on a terminal; nothing otherwise (logs stay clean).
pub struct ProgressBar {
    terminal: bool,
    drawn: bool,
}

impl ProgressBar {
    pub fn new(terminal: bool) -> ProgressBar {
        ProgressBar {
            terminal,
            drawn: false,
        }
    }

    pub fn show(&mut self, copied: u64, estimated: u64) {
        if !self.terminal {
            return;
        }
        eprint!("\r{}", progress_line(copied, estimated));
        self.drawn = true;
    }

    pub fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

/// `[#########...........]  45%  450.0 MiB of about 1.0 GiB`.
pub fn progress_line(copied: u64, estimated: u64) -> String {
    const WIDTH: u64 = 30;
    let estimated = estimated.max(copied).max(1);
    let filled = copied * WIDTH / estimated;
    format!(
        "[{}{}] {:>3}%  {} of about {}",
        "#".repeat(filled as usize),
        ".".repeat((WIDTH - filled) as usize),
        copied * 100 / estimated,
        human_bytes(copied),
        human_bytes(estimated)
    )
}

/// Bytes in binary units with one decimal (`1.5 GiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cluster_node_heads_the_status() {
        assert_eq!(format_cluster(&serde_json::json!({ "version": "x" })), "");
        let stats = serde_json::json!({ "cluster": {
            "node": "b", "nats_connected": true, "daemons_held": 2, "hints_sent": 7,
            "hints_received": 9, "hints_dropped": 0, "fallback_rereads": 1,
            "hint_latency": {
                "bounds": [0.0001, 0.00025, 0.0005, 0.001],
                "cumulative": [0, 6, 9, 9, 10], "count": 10, "sum_seconds": 0.01
            }
        }});
        assert_eq!(
            format_cluster(&stats),
            "node b: NATS connected; holds 2 daemon connection(s); hints sent 7, received 9, \
             dropped 0; database re-reads 1; hint latency p50 ≤ 0.25 ms, p99 ≤ ∞\n\n"
        );
        let mut quiet = stats.clone();
        quiet["cluster"]["nats_connected"] = false.into();
        quiet["cluster"]["hint_latency"]["cumulative"] = serde_json::json!([0, 0, 0, 0, 0]);
        let text = format_cluster(&quiet);
        assert!(text.contains("NATS UNREACHABLE"), "{text}");
        assert!(text.contains("no hints received yet"), "{text}");
    }

    use super::*;

    #[test]
    fn progress_line_fills_in_proportion() {
        assert_eq!(
            progress_line(512 << 20, 1 << 30),
            "[###############...............]  50%  512.0 MiB of about 1.0 GiB"
        );
        assert_eq!(human_bytes(999), "999 B");
        // An estimate that turns out low never shows more than 100%.
        assert!(progress_line(10, 5).contains("100%"));
    }
}
