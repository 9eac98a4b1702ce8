//! The agent's configuration: the `[agent]` section of a TOML file (other sections belong
//! to `syncrelay serve` and are ignored here), overridden by CLI flags, validated into an
//! [`AgentConfig`]. Every bad key is reported by name; the key itself never is.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::protocol::valid_daemon_id;

/// The daemon key; `Debug` prints `MASKED`.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MASKED")
    }
}

/// A named method's local request: `GET /api/v1/approvals/{approval_id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodRoute {
    pub method: String,
    /// Path as the daemon serves it, with `{param}` placeholders filled from the params.
    pub path: String,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Base URLs of the relay's nodes, at least one, all `http://` (h2c prior knowledge)
    /// or all `https://` (ALPN). The agent uses one at a time and moves to the next when
    /// it cannot connect (a cluster's node gone: DESIGN.md, "Cluster").
    pub relays: Vec<reqwest::Url>,
    pub daemon_id: String,
    /// The daemon key; `None` when a client certificate authenticates instead.
    pub key: Option<Secret>,
    /// The URL that stands for the daemon's `/api/v1`.
    pub target: reqwest::Url,
    /// The daemon's SSE path relative to `target`; `None` disables event watching.
    pub events: Option<String>,
    pub state_dir: PathBuf,
    /// PEM file of a CA to trust for an `https://` relay with a private certificate.
    pub relay_ca: Option<PathBuf>,
    /// Mutual TLS: PEM certificate (CN = the daemon id) and private key presented to an
    /// `https://` relay whose `client_ca` signed it.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub methods: BTreeMap<String, MethodRoute>,
    /// Commands executed at once.
    pub concurrency: usize,
    /// Longest a local request may take before the result is a `timeout` error.
    pub request_timeout: Duration,
    /// `timeout` asked of each long poll.
    pub poll_timeout: Duration,
    /// Results kept for answering redelivered commands.
    pub results_max_age: Duration,
    /// Largest piece of a streamed response posted as one chunk.
    pub chunk_bytes: usize,
    /// How the agent talks to the relay.
    pub sync: SyncMode,
}

/// The sync transport: `stream` (one HTTP/2 stream per connection, when the relay offers
/// it, else long polling) or `poll` (long polling always).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    Stream,
    Poll,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    /// One URL, or several (a TOML list, or separated by commas): a cluster's nodes.
    #[serde(default, deserialize_with = "one_or_many")]
    pub relay: Option<Vec<String>>,
    pub daemon_id: Option<String>,
    pub key: Option<String>,
    pub key_file: Option<PathBuf>,
    pub target: Option<String>,
    pub events: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub relay_ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub concurrency: Option<usize>,
    pub request_timeout: Option<String>,
    pub poll_timeout: Option<String>,
    pub results_max_age: Option<String>,
    pub chunk_bytes: Option<usize>,
    /// `"stream"` (the default) or `"poll"`.
    pub sync: Option<String>,
    #[serde(default)]
    pub methods: BTreeMap<String, String>,
}

/// `relay = "http://a"`, `relay = "http://a,http://b"` or `relay = ["http://a", "http://b"]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<String>>, D::Error> {
    struct Urls;
    impl<'de> serde::de::Visitor<'de> for Urls {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a URL, URLs separated by commas, or a list of URLs")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Vec<String>, E> {
            Ok(split_urls(text))
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<String>, A::Error> {
            let mut urls = Vec::new();
            while let Some(url) = seq.next_element::<String>()? {
                urls.push(url);
            }
            Ok(urls)
        }
    }
    deserializer.deserialize_any(Urls).map(Some)
}

/// The URLs of one `--relay` value or TOML string: separated by commas.
pub fn split_urls(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::to_owned)
        .collect()
}

#[derive(Debug, Deserialize)]
struct RawFile {
    #[serde(default)]
    agent: Option<toml::Value>,
}

#[derive(Debug, thiserror::Error)]
#[error("{origin}: {}", .problems.join("; "))]
pub struct AgentConfigError {
    pub origin: String,
    pub problems: Vec<String>,
}

impl RawAgent {
    /// The `[agent]` section of a config file (empty when the file has none).
    pub fn from_file(path: &Path) -> Result<RawAgent, AgentConfigError> {
        let fail = |message: String| AgentConfigError {
            origin: path.display().to_string(),
            problems: vec![message],
        };
        let text =
            std::fs::read_to_string(path).map_err(|err| fail(format!("cannot read: {err}")))?;
        let file: RawFile = toml::from_str(&text).map_err(|err| fail(err.message().to_owned()))?;
        match file.agent {
            None => Ok(RawAgent::default()),
            Some(value) => value
                .try_into()
                .map_err(|err: toml::de::Error| fail(format!("[agent]: {}", err.message()))),
        }
    }

    /// Validates into an [`AgentConfig`]; `origin` names the file (or "command line").
    pub fn validate(self, origin: &str) -> Result<AgentConfig, AgentConfigError> {
        let mut problems = Vec::new();
        let url = |key: &str, text: &str| -> Result<reqwest::Url, String> {
            match reqwest::Url::parse(text) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(url),
                _ => Err(format!("agent.{key} = {text:?} is not an http(s) URL")),
            }
        };
        let relay_texts: Vec<String> = self.relay.unwrap_or_default();
        if relay_texts.is_empty() {
            problems.push("agent.relay is required".to_owned());
        }
        let mut relays: Vec<reqwest::Url> = Vec::new();
        for text in &relay_texts {
            match url("relay", text) {
                Ok(relay) if relays.contains(&relay) => {
                    problems.push(format!("agent.relay lists {text:?} twice"))
                }
                Ok(relay) => relays.push(relay),
                Err(problem) => problems.push(problem),
            }
        }
        if relays.iter().any(|r| r.scheme() != relays[0].scheme()) {
            problems.push("agent.relay URLs must be all http:// or all https://".into());
        }
        let target = url(
            "target",
            self.target
                .as_deref()
                .unwrap_or("http://127.0.0.1:7777/api/v1"),
        )
        .map_err(|problem| problems.push(problem))
        .ok();
        let daemon_id = self.daemon_id.unwrap_or_default();
        if !valid_daemon_id(&daemon_id) {
            problems.push("agent.daemon_id must be 1 to 64 characters of A-Z a-z 0-9 . _ -".into());
        }
        let client_cert = match (self.client_cert, self.client_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                problems.push("agent.client_cert and agent.client_key go together".into());
                None
            }
        };
        if client_cert.is_some() && relays.iter().any(|r| r.scheme() != "https") {
            problems.push("agent.client_cert needs an https:// relay".into());
        }
        let key = match (self.key, self.key_file) {
            (Some(key), None) => Some(Some(key)),
            (None, Some(file)) => match std::fs::read_to_string(&file) {
                Ok(text) => Some(Some(text.trim().to_owned())),
                Err(err) => {
                    problems.push(format!("agent.key_file {}: {err}", file.display()));
                    None
                }
            },
            (Some(_), Some(_)) => {
                problems.push("agent.key and agent.key_file are exclusive".into());
                None
            }
            (None, None) if client_cert.is_some() => Some(None),
            (None, None) => {
                problems
                    .push("agent.key or agent.key_file (or agent.client_cert) is required".into());
                None
            }
        };
        let mut duration = |key: &str, value: Option<String>, default: &str| -> Duration {
            let text = value.unwrap_or_else(|| default.to_owned());
            humantime::parse_duration(&text).unwrap_or_else(|_| {
                problems.push(format!(
                    "agent.{key} = {text:?} is not a duration like \"30s\""
                ));
                Duration::from_secs(1)
            })
        };
        let request_timeout = duration("request_timeout", self.request_timeout, "60s");
        let poll_timeout = duration("poll_timeout", self.poll_timeout, "30s");
        let results_max_age = duration("results_max_age", self.results_max_age, "24h");
        let mut methods = BTreeMap::new();
        for (name, route) in self.methods {
            match route.split_once(' ') {
                Some((verb, path)) if path.starts_with('/') && !verb.is_empty() => {
                    methods.insert(
                        name,
                        MethodRoute {
                            method: verb.to_ascii_uppercase(),
                            path: path.trim().to_owned(),
                        },
                    );
                }
                _ => problems.push(format!(
                    "agent.methods.{name} = {route:?} must look like \"GET /api/v1/approvals/{{approval_id}}\""
                )),
            }
        }
        let concurrency = self.concurrency.unwrap_or(16);
        if concurrency == 0 {
            problems.push("agent.concurrency must be greater than 0".into());
        }
        let chunk_bytes = self.chunk_bytes.unwrap_or(64 * 1024);
        if chunk_bytes == 0 {
            problems.push("agent.chunk_bytes must be greater than 0".into());
        }
        let sync = match self.sync.as_deref().map(str::trim) {
            None | Some("stream") => SyncMode::Stream,
            Some("poll") => SyncMode::Poll,
            Some(other) => {
                problems.push(format!(
                    "agent.sync = {other:?} must be \"stream\" or \"poll\""
                ));
                SyncMode::Stream
            }
        };
        let events = match self.events {
            None => Some("stream/events".to_owned()),
            Some(path) if path.trim().is_empty() => None,
            Some(path) => Some(path.trim_start_matches('/').to_owned()),
        };
        match (target, key) {
            (Some(target), Some(key)) if problems.is_empty() => Ok(AgentConfig {
                relays,
                daemon_id,
                key: key.map(Secret),
                target,
                events,
                state_dir: self
                    .state_dir
                    .unwrap_or_else(|| PathBuf::from("./agent-state")),
                relay_ca: self.relay_ca,
                client_cert,
                methods,
                concurrency,
                request_timeout,
                poll_timeout,
                results_max_age,
                chunk_bytes,
                sync,
            }),
            _ => Err(AgentConfigError {
                origin: origin.to_owned(),
                problems,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_problems() {
        let raw = RawAgent {
            relay: Some(vec!["http://127.0.0.1:8080".into()]),
            daemon_id: Some("laptop".into()),
            key: Some("srk_x_y".into()),
            ..RawAgent::default()
        };
        let config = raw.validate("test").unwrap();
        assert_eq!(config.target.as_str(), "http://127.0.0.1:7777/api/v1");
        assert_eq!(config.events.as_deref(), Some("stream/events"));
        assert_eq!(format!("{:?}", config.key), "Some(MASKED)");

        let raw = RawAgent {
            relay: Some(vec!["ftp://x".into()]),
            daemon_id: Some("a/b".into()),
            methods: [("getApproval".to_owned(), "nonsense".to_owned())].into(),
            ..RawAgent::default()
        };
        let err = raw.validate("agent.toml").unwrap_err().to_string();
        for key in [
            "agent.relay",
            "agent.daemon_id",
            "agent.key",
            "agent.methods.getApproval",
            "agent.toml",
        ] {
            assert!(err.contains(key), "{key} missing from {err}");
        }
    }

    /// A cluster's nodes: a TOML list, or commas (one CLI flag); each URL once, one scheme.
    #[test]
    fn several_relay_urls() {
        let from_toml = |text: &str| -> Result<AgentConfig, AgentConfigError> {
            let file: RawFile = toml::from_str(text).unwrap();
            let raw: RawAgent = file.agent.unwrap().try_into().unwrap();
            RawAgent {
                daemon_id: Some("laptop".into()),
                key: Some("srk_x_y".into()),
                ..raw
            }
            .validate("t.toml")
        };
        let one = from_toml("[agent]\nrelay = \"http://a:8080\"").unwrap();
        assert_eq!(one.relays.len(), 1);
        let list = from_toml("[agent]\nrelay = [\"http://a:8080\", \"http://b:8080\"]").unwrap();
        let commas = from_toml("[agent]\nrelay = \"http://a:8080, http://b:8080\"").unwrap();
        for config in [list, commas] {
            let urls: Vec<&str> = config.relays.iter().map(reqwest::Url::as_str).collect();
            assert_eq!(urls, ["http://a:8080/", "http://b:8080/"]);
        }
        for (text, problem) in [
            ("relay = []", "agent.relay is required"),
            ("relay = [\"http://a\", \"http://a/\"]", "twice"),
            (
                "relay = [\"http://a\", \"https://b\"]",
                "all http:// or all https://",
            ),
            (
                "relay = \"http://a,ftp://b\"",
                "\"ftp://b\" is not an http(s) URL",
            ),
        ] {
            let err = from_toml(&format!("[agent]\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(problem), "{text}: {err}");
        }
        let file: RawFile = toml::from_str("[agent]\nrelay = 5").unwrap();
        let err = file.agent.unwrap().try_into::<RawAgent>().unwrap_err();
        let expected = "a URL, URLs separated by commas, or a list of URLs";
        assert!(err.message().contains(expected), "{err}");
    }
}
