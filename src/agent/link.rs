//! The agent's side of the sync protocol: one HTTP/2 client to the relay (prior knowledge
//! for `http://`, ALPN for `https://`) that carries the long poll, update uploads and
//! result posts concurrently over one connection. Failures are classified so the agent
//! knows whether to retry (`Transient`), reconnect (`Superseded`) or stop (`Rejected`).
//! Given several relay URLs (a cluster's nodes), the link talks to one at a time and
//! [`RelayLink::rotate`]s to the next when a connect to it fails.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::config::AgentConfig;
use crate::protocol::{
    ConnectRequest, ConnectResponse, PollRequest, PollResponse, ResultsRequest, ResultsResponse,
    Update,
};

/// The relay's answer to a connect.
pub type Hello = ConnectResponse;
/// A poll's answer, owning its commands.
pub type PollReply = PollResponse<'static>;
/// A command handed to the agent.
pub type WireCommand = crate::protocol::WireCommand<'static>;

/// Slack on top of a poll's own timeout before the HTTP request gives up.
const POLL_SLACK: Duration = Duration::from_secs(15);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A request answered 429 is sent again after `Retry-After` (at most this long), this
/// many times, before the caller sees a transient error.
pub const MAX_THROTTLED: u32 = 10;
pub const MAX_RETRY_AFTER_SECS: u64 = 60;
/// Lines queued for the relay beyond what HTTP/2 has taken.
const STREAM_LINES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The relay refused the key (401/403): retrying cannot help.
    #[error("the relay rejected this agent: {0}")]
    Rejected(String),
    /// Another connect for this daemon replaced ours.
    #[error("superseded by a newer connection")]
    Superseded,
    /// The relay refused this one request (4xx): sending it again cannot help.
    #[error("{0}")]
    Refused(String),
    /// The relay is unreachable, restarting or overloaded: try again later.
    #[error("{0}")]
    Transient(String),
}

pub struct RelayLink {
    http: reqwest::Client,
    /// The relay's nodes; requests go to `bases[current]`.
    bases: Vec<reqwest::Url>,
    current: AtomicUsize,
    daemon_id: String,
    /// `None` when the client certificate authenticates.
    key: Option<String>,
}

impl RelayLink {
    pub fn new(config: &AgentConfig) -> Result<RelayLink, String> {
        let Some(first) = config.relays.first() else {
            return Err("no relay URL".into());
        };
        if config.relays.iter().any(|r| r.scheme() != first.scheme()) {
            return Err("relay URLs must be all http:// or all https://".into());
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .http2_keep_alive_while_idle(true)
            .pool_max_idle_per_host(1);
        if first.scheme() == "http" {
            builder = builder.http2_prior_knowledge();
        }
        if let Some(path) = &config.relay_ca {
            let pem =
                std::fs::read(path).map_err(|err| format!("relay_ca {}: {err}", path.display()))?;
            let certificate = reqwest::Certificate::from_pem(&pem)
                .map_err(|err| format!("relay_ca {}: {err}", path.display()))?;
            builder = builder.add_root_certificate(certificate);
        }
        if let Some((cert, key)) = &config.client_cert {
            let mut pem = std::fs::read(cert)
                .map_err(|err| format!("client_cert {}: {err}", cert.display()))?;
            pem.push(b'\n');
            pem.extend(
                std::fs::read(key).map_err(|err| format!("client_key {}: {err}", key.display()))?,
            );
            let identity = reqwest::Identity::from_pem(&pem)
                .map_err(|err| format!("client_cert {}: {err}", cert.display()))?;
            builder = builder.identity(identity);
        }
        Ok(RelayLink {
            http: builder.build().map_err(|err| err.to_string())?,
            bases: config.relays.clone(),
            current: AtomicUsize::new(0),
            daemon_id: config.daemon_id.clone(),
            key: config.key.as_ref().map(|key| key.0.clone()),
        })
    }

    /// The relay URL requests go to now.
    pub fn base(&self) -> &reqwest::Url {
        &self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()]
    }

    /// Moves on to the next relay URL (a no-op with one); returns it.
    pub fn rotate(&self) -> &reqwest::Url {
        self.current.fetch_add(1, Ordering::Relaxed);
        self.base()
    }

    /// Whether there is another URL to move to.
    pub fn has_alternatives(&self) -> bool {
        self.bases.len() > 1
    }

    async fn post<T: DeserializeOwned>(
        &self,
        route: &str,
        body: &impl Serialize,
        timeout: Duration,
    ) -> Result<T, LinkError> {
        let url = self
            .base()
            .join(route)
            .map_err(|err| LinkError::Transient(err.to_string()))?;
        let mut throttled = 0;
        loop {
            let mut request = self.http.post(url.clone());
            if let Some(key) = &self.key {
                request = request.bearer_auth(key);
            }
            let response = request
                .json(body)
                .timeout(timeout)
                .send()
                .await
                .map_err(|err| {
                    LinkError::Transient(format!("relay unreachable: {}", root_cause(&err)))
                })?;
            let status = response.status();
            if status.is_success() {
                return response.json().await.map_err(|err| {
                    LinkError::Transient(format!("unreadable answer from the relay: {err}"))
                });
            }
            // Rate limited: wait as long as the relay asks, then send the same request.
            if status == reqwest::StatusCode::TOO_MANY_REQUESTS && throttled < MAX_THROTTLED {
                throttled += 1;
                let wait = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(1)
                    .clamp(1, MAX_RETRY_AFTER_SECS);
                tracing::debug!(route, wait, "rate limited by the relay; waiting");
                tokio::time::sleep(Duration::from_secs(wait)).await;
                continue;
            }
            return Err(refusal(response).await);
        }
    }

    /// Opens `POST /sync/stream` for the connection: `Ok(None)` when the relay does not
    /// serve it (an older relay: 404; HTTP/1.1 only: 400), so the caller polls instead.
    /// The lines written to the returned sender are the request body; the response's body
    /// is the relay's lines.
    pub async fn open_stream(
        &self,
        connection_id: &str,
    ) -> Result<Option<(reqwest::Response, mpsc::Sender<Bytes>)>, LinkError> {
        let url = self
            .base()
            .join("sync/stream")
            .map_err(|err| LinkError::Transient(err.to_string()))?;
        let (lines, body) = mpsc::channel::<Bytes>(STREAM_LINES);
        let body = ReceiverStream::new(body).map(Ok::<_, std::io::Error>);
        let mut request = self
            .http
            .post(url)
            .query(&[
                ("daemon_id", self.daemon_id.as_str()),
                ("connection_id", connection_id),
            ])
            .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
            .body(reqwest::Body::wrap_stream(body));
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        // Bounded by its head only: the stream itself lives as long as the connection.
        let response = tokio::time::timeout(REQUEST_TIMEOUT, request.send())
            .await
            .map_err(|_| LinkError::Transient("the relay did not answer the stream".into()))?
            .map_err(|err| {
                LinkError::Transient(format!("relay unreachable: {}", root_cause(&err)))
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(Some((response, lines)));
        }
        match refusal(response).await {
            LinkError::Refused(message) if matches!(status.as_u16(), 400 | 404 | 405) => {
                tracing::info!(%message, "the relay does not serve /sync/stream; polling");
                Ok(None)
            }
            err => Err(err),
        }
    }

    pub async fn connect(&self) -> Result<Hello, LinkError> {
        let body = ConnectRequest {
            daemon_id: self.daemon_id.clone(),
            version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            capabilities: ["http", "streaming", "events"].map(String::from).to_vec(),
        };
        self.post("sync/connect", &body, REQUEST_TIMEOUT).await
    }

    /// One poll: uploads `updates` and, with `wait`, holds until a command is queued or
    /// `timeout` passes.
    pub async fn poll(
        &self,
        connection_id: &str,
        updates: Vec<Update>,
        wait: bool,
        timeout: Duration,
    ) -> Result<PollReply, LinkError> {
        let body = PollRequest {
            daemon_id: self.daemon_id.clone(),
            connection_id: Some(connection_id.to_owned()),
            updates,
            wait_for_commands: wait,
            timeout: Some(timeout.as_secs_f64()),
        };
        self.post("sync/poll", &body, timeout + POLL_SLACK).await
    }

    /// Posts result (or chunk) entries ([`crate::protocol::ResultEntry`], as raw JSON).
    pub async fn results(&self, results: Vec<Box<RawValue>>) -> Result<ResultsResponse, LinkError> {
        let body = ResultsRequest {
            daemon_id: self.daemon_id.clone(),
            results,
        };
        self.post("sync/results", &body, REQUEST_TIMEOUT).await
    }
}

/// A non-2xx answer, classified.
async fn refusal(response: reqwest::Response) -> LinkError {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let code = body["error"]["code"].as_str().unwrap_or("");
    let message = body["error"]["message"].as_str().unwrap_or("");
    classify(Some(status.as_u16()), code, message)
}

/// What an error the relay answered means to the agent, by status when there is one (a
/// request) or by code alone (a line of the stream).
pub fn classify(status: Option<u16>, code: &str, message: &str) -> LinkError {
    let status = status.unwrap_or(match code {
        "unauthorized" => 401,
        "forbidden" => 403,
        "superseded" | "chunk_gap" => 409,
        "rate_limited" | "queue_full" => 429,
        "storage_unavailable" | "daemon_offline" | "timeout" => 503,
        _ => 400,
    });
    let text = format!("relay answered {status} {code}: {message}");
    match status {
        401 | 403 => LinkError::Rejected(text),
        409 if code == "superseded" => LinkError::Superseded,
        429 => LinkError::Transient(text),
        400..=499 => LinkError::Refused(text),
        _ => LinkError::Transient(text),
    }
}

/// The innermost error, which says what actually happened (refused, reset, …).
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}
