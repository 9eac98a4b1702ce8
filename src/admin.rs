//! The operator CLI's side of the admin API: `syncrelay keys create|list|revoke` and
//! `syncrelay status` talk to a running relay over HTTP with the admin key (from
//! `SYNCRELAY_ADMIN_KEY` or `data_dir/admin.key`).

use std::path::Path;

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;

use crate::protocol::KeyView;

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
    let path = data_dir.join("admin.key");
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

/// `syncrelay status` as a table.
pub fn format_daemons(daemons: &[serde_json::Value]) -> String {
    let mut out = format!(
        "{:<24} {:<7} {:<26} {:<10} {:>7} {:>10}\n",
        "DAEMON", "ONLINE", "LAST SEEN", "VERSION", "QUEUED", "LAST SEQ"
    );
    for d in daemons {
        out += &format!(
            "{:<24} {:<7} {:<26} {:<10} {:>7} {:>10}\n",
            d["daemon_id"].as_str().unwrap_or(""),
            if d["online"].as_bool().unwrap_or(false) {
                "yes"
            } else {
                "no"
            },
            d["last_seen"].as_str().unwrap_or("never"),
            d["version"].as_str().unwrap_or("-"),
            d["queued"].as_u64().unwrap_or(0),
            d["last_seq"].as_u64().unwrap_or(0),
        );
    }
    out
}
