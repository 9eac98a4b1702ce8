//! The HTTP target handler: executes `http` commands and mapped named methods against the
//! local daemon. The target URL stands for the daemon's `/api/v1`, so a command's
//! `/api/v1/x` becomes `<target>/x` (hld: `http://127.0.0.1:7777/api/v1`; Syncthing:
//! `http://127.0.0.1:8384/rest`). JSON stays JSON, text stays text, anything else travels
//! as base64. A target that is down or too slow yields an error result, never a lost
//! command.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use serde_json::{Map, Value};

use super::config::{AgentConfig, MethodRoute};
use super::handler::{Command, CommandHandler, Outcome, StreamReply};
use crate::protocol::{
    json_within_limits, HttpParams, HttpResult, HOP_BY_HOP_HEADERS, MAX_CARRIED_JSON_DEPTH,
};

#[derive(Clone)]
pub struct HttpTarget {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    target: reqwest::Url,
    methods: BTreeMap<String, MethodRoute>,
    request_timeout: Duration,
    max_body_bytes: usize,
}

/// The request header that carries a command's id to the local daemon, so a daemon that
/// cares can deduplicate: delivery is at-least-once, and an agent killed between running
/// a command and storing its result runs it again, with the same id.
pub const COMMAND_ID_HEADER: &str = "x-syncrelay-command-id";

/// Largest response body turned into one result; the relay's default body limit is 16 MiB
/// and base64 grows a body by a third.
pub const MAX_RESULT_BODY_BYTES: usize = 8 << 20;

impl HttpTarget {
    pub fn new(config: &AgentConfig) -> HttpTarget {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client without TLS options builds");
        HttpTarget {
            inner: Arc::new(Inner {
                client,
                target: config.target.clone(),
                methods: config.methods.clone(),
                request_timeout: config.request_timeout,
                max_body_bytes: MAX_RESULT_BODY_BYTES,
            }),
        }
    }

    /// `/api/v1/<rest>` → `<target>/<rest>`; anything else, or a path that would step out
    /// of the target's prefix, is refused. A backslash (raw or `%5c`) and a dot segment
    /// (raw or `%2e`) are refused outright, as the URL parser takes `\` for `/` and
    /// resolves dot segments; and the parsed URL must keep every segment of the target's
    /// path (a string prefix would let `/rest` pass `/restricted`).
    pub fn local_url(&self, path: &str, query: &str) -> Result<reqwest::Url, String> {
        let rest = path
            .strip_prefix("/api/v1")
            .filter(|rest| rest.is_empty() || rest.starts_with('/'))
            .ok_or_else(|| format!("path {path:?} is not under /api/v1"))?;
        let leaves = || format!("path {path:?} leaves the target");
        let lower = rest.to_ascii_lowercase();
        if lower.contains('\\')
            || lower.contains("%5c")
            || lower
                .split('/')
                .any(|s| matches!(s.replace("%2e", ".").as_str(), "." | ".."))
        {
            return Err(leaves());
        }
        let mut url = self.inner.target.clone();
        let base: Vec<String> = url
            .path_segments()
            .map(|s| s.filter(|s| !s.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default();
        let base_path = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base_path}{rest}"));
        let kept = url.path_segments().is_some_and(|segments| {
            segments
                .take(base.len())
                .eq(base.iter().map(String::as_str))
        });
        if !kept {
            return Err(leaves());
        }
        url.set_query((!query.is_empty()).then_some(query));
        Ok(url)
    }

    fn http_request(&self, params: &Value) -> Result<reqwest::RequestBuilder, String> {
        let params: HttpParams = serde_json::from_value(params.clone())
            .map_err(|err| format!("invalid http params: {err}"))?;
        let method = reqwest::Method::from_bytes(params.method.as_bytes())
            .map_err(|_| format!("invalid method {:?}", params.method))?;
        let url = self.local_url(&params.path, &params.query)?;
        let mut request = self.inner.client.request(method, url);
        let mut has_content_type = false;
        for (name, value) in &params.headers {
            let lower = name.to_ascii_lowercase();
            // The command id is the agent's to set (the relay strips `x-syncrelay-*` from
            // clients; a daemon speaking the protocol itself might not).
            if HOP_BY_HOP_HEADERS.contains(&lower.as_str()) || lower == COMMAND_ID_HEADER {
                continue;
            }
            has_content_type |= lower == "content-type";
            let values: Vec<&str> = match value {
                Value::String(text) => vec![text.as_str()],
                Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
                _ => continue,
            };
            for text in values {
                request = request.header(name.as_str(), text);
            }
        }
        if let Some(encoded) = &params.body_base64 {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|err| format!("body_base64: {err}"))?;
            request = request.body(bytes);
        } else {
            match &params.body {
                Value::Null => {}
                Value::String(text) => request = request.body(text.clone()),
                other => {
                    if !has_content_type {
                        request = request.header("content-type", "application/json");
                    }
                    request = request.body(other.to_string());
                }
            }
        }
        Ok(request)
    }

    /// A named method through its mapping: `{param}` placeholders come from the params;
    /// the remaining params become the query (GET, HEAD, DELETE) or a JSON body.
    fn named_request(
        &self,
        name: &str,
        params: &Value,
    ) -> Result<reqwest::RequestBuilder, Outcome> {
        let route = self.inner.methods.get(name).ok_or_else(|| {
            Outcome::error(
                "unknown_method",
                format!("no mapping for method {name:?} in [agent.methods]"),
            )
        })?;
        let mut rest: Map<String, Value> = params.as_object().cloned().unwrap_or_default();
        let mut path = String::new();
        let mut remaining = route.path.as_str();
        while let Some(open) = remaining.find('{') {
            let close = remaining[open..]
                .find('}')
                .map(|c| open + c)
                .ok_or_else(|| {
                    Outcome::error("bad_request", format!("unclosed {{ in {}", route.path))
                })?;
            let key = &remaining[open + 1..close];
            let value = match rest.remove(key) {
                Some(Value::String(text)) => text,
                Some(Value::Number(number)) => number.to_string(),
                _ => {
                    return Err(Outcome::error(
                        "bad_request",
                        format!("param {key:?} is required"),
                    ))
                }
            };
            path.push_str(&remaining[..open]);
            path.push_str(&percent_encode_segment(&value));
            remaining = &remaining[close + 1..];
        }
        path.push_str(remaining);
        let method = reqwest::Method::from_bytes(route.method.as_bytes()).map_err(|_| {
            Outcome::error("bad_request", format!("invalid method {}", route.method))
        })?;
        let url = self
            .local_url(&path, "")
            .map_err(|m| Outcome::error("bad_request", m))?;
        let mut request = self.inner.client.request(method.clone(), url);
        if matches!(
            method,
            reqwest::Method::GET | reqwest::Method::HEAD | reqwest::Method::DELETE
        ) {
            let pairs: Vec<(String, String)> = rest
                .into_iter()
                .map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
                .collect();
            if !pairs.is_empty() {
                request = request.query(&pairs);
            }
        } else if !rest.is_empty() {
            request = request.json(&rest);
        }
        Ok(request)
    }

    async fn execute(self, command: Command) -> Outcome {
        let named = command.method != "http";
        let request = if named {
            match self.named_request(&command.method, &command.params) {
                Ok(request) => request,
                Err(outcome) => return outcome,
            }
        } else {
            match self.http_request(&command.params) {
                Ok(request) => request,
                Err(message) => return Outcome::error("bad_request", message),
            }
        };
        let request = request.header(COMMAND_ID_HEADER, command.id.as_str());
        let timeout = self.inner.request_timeout;
        let response = match tokio::time::timeout(timeout, request.send()).await {
            Err(_) => {
                return Outcome::error(
                    "timeout",
                    format!("the daemon did not answer within {timeout:?}"),
                )
            }
            Ok(Err(err)) => return transport_error(&err),
            Ok(Ok(response)) => response,
        };
        let status = response.status().as_u16();
        let headers = header_map(response.headers());
        if command.stream {
            let body = response
                .bytes_stream()
                .map(|item| item.map_err(|err| err.to_string()))
                .boxed();
            return Outcome::Stream(StreamReply {
                status,
                headers,
                body,
            });
        }
        let is_json = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("json"));
        let body =
            match tokio::time::timeout(timeout, read_limited(response, self.inner.max_body_bytes))
                .await
            {
                Err(_) => {
                    return Outcome::error(
                        "timeout",
                        format!("the daemon's body took over {timeout:?}"),
                    )
                }
                Ok(Err(outcome)) => return outcome,
                Ok(Ok(body)) => body,
            };
        let (body, body_base64) = encode_body(&body, is_json);
        if named {
            return if (200..300).contains(&status) {
                Outcome::Result(body)
            } else {
                Outcome::Error {
                    code: "daemon_error".into(),
                    message: format!("the daemon answered {status}: {body}"),
                }
            };
        }
        let result = HttpResult {
            status,
            headers,
            body,
            body_base64,
        };
        Outcome::Result(serde_json::to_value(result).expect("an http result serialises"))
    }
}

impl CommandHandler for HttpTarget {
    fn handle(&self, command: Command) -> BoxFuture<'static, Outcome> {
        Box::pin(self.clone().execute(command))
    }
}

fn transport_error(err: &reqwest::Error) -> Outcome {
    if err.is_timeout() {
        Outcome::error("timeout", format!("the daemon timed out: {err}"))
    } else if err.is_connect() {
        Outcome::error(
            "target_unreachable",
            format!("cannot reach the daemon: {err}"),
        )
    } else {
        Outcome::error(
            "target_error",
            format!("the request to the daemon failed: {err}"),
        )
    }
}

async fn read_limited(response: reqwest::Response, limit: usize) -> Result<Vec<u8>, Outcome> {
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|err| transport_error(&err))?;
        if body.len() + piece.len() > limit {
            return Err(Outcome::error(
                "response_too_large",
                format!("the daemon's response exceeds {limit} bytes"),
            ));
        }
        body.extend_from_slice(&piece);
    }
    Ok(body)
}

/// JSON stays JSON, UTF-8 stays text, anything else is base64 (`body` is then null).
fn encode_body(bytes: &[u8], is_json: bool) -> (Value, Option<String>) {
    if bytes.is_empty() {
        return (Value::Null, None);
    }
    if is_json && json_within_limits(bytes, MAX_CARRIED_JSON_DEPTH).is_ok() {
        if let Ok(value) = serde_json::from_slice(bytes) {
            return (value, None);
        }
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => (Value::String(text.to_owned()), None),
        Err(_) => (
            Value::Null,
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    }
}

/// Response headers as the `headers` object: one string, or an array for repeated names.
fn header_map(headers: &reqwest::header::HeaderMap) -> Map<String, Value> {
    let mut out = Map::new();
    for (name, value) in headers {
        if HOP_BY_HOP_HEADERS.contains(&name.as_str()) {
            continue;
        }
        let Ok(text) = value.to_str() else { continue };
        match out.get_mut(name.as_str()) {
            None => {
                out.insert(name.as_str().to_owned(), Value::String(text.to_owned()));
            }
            Some(Value::Array(items)) => items.push(Value::String(text.to_owned())),
            Some(existing) => {
                let first = existing.take();
                *existing = Value::Array(vec![first, Value::String(text.to_owned())]);
            }
        }
    }
    out
}

fn percent_encode_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::config::RawAgent;

    fn target(url: &str) -> HttpTarget {
        let raw = RawAgent {
            relay: Some(vec!["http://127.0.0.1:1".into()]),
            daemon_id: Some("d".into()),
            key: Some("k".into()),
            target: Some(url.into()),
            ..RawAgent::default()
        };
        HttpTarget::new(&raw.validate("test").unwrap())
    }

    #[test]
    fn paths_are_mapped_onto_the_target() {
        let hld = target("http://127.0.0.1:7777/api/v1");
        assert_eq!(
            hld.local_url("/api/v1/sessions", "leafOnly=true")
                .unwrap()
                .as_str(),
            "http://127.0.0.1:7777/api/v1/sessions?leafOnly=true"
        );
        let syncthing = target("http://127.0.0.1:8384/rest");
        assert_eq!(
            syncthing
                .local_url("/api/v1/system/status", "")
                .unwrap()
                .as_str(),
            "http://127.0.0.1:8384/rest/system/status"
        );
        assert!(syncthing.local_url("/other/x", "").is_err());
        assert!(syncthing.local_url("/api/v1x", "").is_err());
        assert!(syncthing.local_url("/api/v1/../../etc", "").is_err());
    }

    /// Issue 18, finding 2: backslashes and encoded dot segments walked out of the target.
    #[test]
    fn backslashes_and_dot_segments_never_leave_the_target() {
        let syncthing = target("http://127.0.0.1:8384/rest");
        for path in [
            "/api/v1/..\\restricted/secret",
            "/api/v1/%2e%2e\\restart",
            "/api/v1/%2e%2e%5crestart",
            "/api/v1/%2E%2E%5Crestart",
            "/api/v1/x/..\\..\\restart",
            "/api/v1/%2e%2e/restart",
            "/api/v1/a\\b",
        ] {
            assert!(syncthing.local_url(path, "").is_err(), "{path}");
        }
        // Segment boundaries, not string prefixes: still fine inside the target.
        assert_eq!(
            syncthing
                .local_url("/api/v1/restricted", "")
                .unwrap()
                .path(),
            "/rest/restricted"
        );
        let root = target("http://127.0.0.1:8384");
        assert_eq!(root.local_url("/api/v1/x", "").unwrap().path(), "/x");
    }

    #[test]
    fn a_command_id_header_in_the_params_never_reaches_the_daemon() {
        let hld = target("http://127.0.0.1:7777/api/v1");
        let params = serde_json::json!({
            "method": "POST",
            "path": "/api/v1/sessions",
            "query": "",
            "headers": {"X-SyncRelay-Command-Id": "forged", "x-fine": "yes"},
            "body": null,
        });
        let request = hld.http_request(&params).unwrap().build().unwrap();
        assert!(request.headers().get(COMMAND_ID_HEADER).is_none());
        assert_eq!(request.headers()["x-fine"], "yes");
    }

    #[test]
    fn bodies_keep_their_kind() {
        assert_eq!(
            encode_body(br#"{"a":1}"#, true),
            (serde_json::json!({"a":1}), None)
        );
        assert_eq!(
            encode_body(b"hi", false),
            (Value::String("hi".into()), None)
        );
        assert_eq!(
            encode_body(&[0xff, 0], false),
            (Value::Null, Some("/wA=".into()))
        );
        assert_eq!(encode_body(b"", true), (Value::Null, None));
        // JSON too deep to travel inside a result travels as its text, byte for byte.
        let deep = format!("{}{}", "[".repeat(150), "]".repeat(150));
        assert_eq!(
            encode_body(deep.as_bytes(), true),
            (Value::String(deep), None)
        );
    }
}
