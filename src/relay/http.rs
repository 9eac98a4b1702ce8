//! HTTP plumbing shared by the handlers: the response body type, JSON and error responses
//! in the design's error shape (`{"error":{"code","message","details?"}}`), bounded body
//! reading, query-string parsing and the `X-Syncrelay-Source` header.

use std::convert::Infallible;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, LengthLimitError, Limited};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::protocol::{ErrorBody, ErrorDetail};
use crate::store::StoreError;

/// Every response body the relay sends.
pub type Body = BoxBody<Bytes, Infallible>;

pub const SOURCE: HeaderName = HeaderName::from_static("x-syncrelay-source");

/// Where a response came from, as `X-Syncrelay-Source` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Daemon,
    Cache,
    Relay,
}

impl Source {
    pub fn header(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Source::Daemon => "daemon",
            Source::Cache => "cache",
            Source::Relay => "relay",
        })
    }
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

pub fn empty() -> Body {
    Empty::new().boxed()
}

/// A JSON response made by the relay itself.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(value).expect("response types serialise");
    let mut response = Response::new(full(bytes));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
        .headers_mut()
        .insert(SOURCE, Source::Relay.header());
    response
}

/// An error the relay answers with, in the design's error shape.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub details: Option<Box<serde_json::Value>>,
    /// Seconds, sent as `Retry-After`.
    pub retry_after: Option<u64>,
    /// Sent as `Allow` with 405.
    pub allow: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_owned(),
            message: message.into(),
            details: None,
            retry_after: None,
            allow: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn payload_too_large(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    pub fn daemon_offline(daemon_id: &str) -> ApiError {
        let mut err = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "daemon_offline",
            format!("daemon {daemon_id} is offline"),
        );
        err.retry_after = Some(5);
        err
    }

    pub fn timeout(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message)
    }

    pub fn rate_limited(retry_after_secs: u64) -> ApiError {
        let mut err = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many requests; retry after {retry_after_secs}s"),
        );
        err.retry_after = Some(retry_after_secs);
        err
    }

    pub fn superseded() -> ApiError {
        Self::new(
            StatusCode::CONFLICT,
            "superseded",
            "a newer /sync/connect replaced this connection",
        )
    }

    pub fn with_details(mut self, details: serde_json::Value) -> ApiError {
        self.details = Some(Box::new(details));
        self
    }

    /// The response in the design's error shape.
    pub fn to_response(self) -> Response<Body> {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                details: self.details,
            },
        };
        let mut response = json(self.status, &body);
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(allow) = self.allow {
            response.headers_mut().insert(
                ALLOW,
                HeaderValue::from_str(&allow).expect("method names are header values"),
            );
        }
        response
    }
}

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        self.to_response().map(axum::body::Body::new)
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> ApiError {
        match err {
            StoreError::QueueFull { daemon_id, limit } => {
                let mut api = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "queue_full",
                    format!("daemon {daemon_id} has {limit} commands waiting; try again later"),
                );
                api.retry_after = Some(30);
                api
            }
            StoreError::OverBudget(daemon_id) => {
                let mut api = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "queue_full",
                    format!(
                        "daemon {daemon_id} has used its disk budget and nothing of it can be \
                         dropped to make room; try again once it has taken its commands"
                    ),
                );
                api.retry_after = Some(30);
                api
            }
            StoreError::UnknownDaemon(id) => ApiError::not_found(format!("no daemon {id}")),
            StoreError::Superseded => ApiError::superseded(),
            StoreError::Unsupported(message) => ApiError::bad_request(message),
            other => {
                tracing::error!(error = %other, "storage failure");
                let mut api = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage_unavailable",
                    "the relay cannot write to its store; nothing was acknowledged",
                );
                api.retry_after = Some(5);
                api
            }
        }
    }
}

/// Reads a whole request body of at most `limit` bytes.
/// Reads a request body of at most `limit` bytes. A body that makes no progress for
/// `stall` (nothing arrives: a declared length never sent, or a byte every few minutes) is
/// answered 408 `timeout`, so an authenticated client cannot hold a request open forever.
pub async fn read_body<B>(
    body: B,
    headers: &HeaderMap,
    limit: usize,
    stall: std::time::Duration,
) -> Result<Bytes, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let too_large = || ApiError::payload_too_large(format!("the body exceeds {limit} bytes"));
    if let Some(length) = headers.get(CONTENT_LENGTH) {
        let length: u64 = length
            .to_str()
            .ok()
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| ApiError::bad_request("invalid Content-Length"))?;
        if length > limit as u64 {
            return Err(too_large());
        }
    }
    let mut body = Limited::new(body, limit);
    let mut collected = bytes::BytesMut::new();
    loop {
        let frame = tokio::time::timeout(stall, body.frame())
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    format!(
                        "the request body made no progress for {} s",
                        stall.as_secs_f64()
                    ),
                )
            })?;
        match frame {
            None => return Ok(collected.freeze()),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    collected.extend_from_slice(&data);
                }
            }
            Some(Err(err)) if err.is::<LengthLimitError>() => return Err(too_large()),
            Some(Err(err)) => {
                return Err(ApiError::bad_request(format!(
                    "could not read the body: {err}"
                )))
            }
        }
    }
}

/// Parses a JSON body; the message names the field or type at fault.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    if let Err(limit) = crate::protocol::json_within_limits(bytes, crate::protocol::MAX_JSON_DEPTH)
    {
        return Err(ApiError::bad_request(format!("invalid JSON body: {limit}")));
    }
    serde_json::from_slice(bytes)
        .map_err(|err| ApiError::bad_request(format!("invalid JSON body: {err}")))
}

/// `key=value` pairs of a query string, percent-decoded.
pub fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .map(|q| {
            q.split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(key), percent_decode(value))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The first value of `name` in a query string.
pub fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query_pairs(query)
        .into_iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value)
}

/// The query string without the relay's own `access_token` parameter: a credential for
/// the relay is never forwarded to a daemon, nor part of a cache key.
pub fn forwarded_query(query: Option<&str>) -> String {
    query
        .unwrap_or("")
        .split('&')
        .filter(|pair| {
            !pair.is_empty()
                && percent_decode(pair.split('=').next().unwrap_or("")) != "access_token"
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (bytes[i], escaped) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (other, _) => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        let pairs = query_pairs(Some("a=1&b=x%20y&c&eventTypes=a%2Cb&d=%zz&e=%4"));
        assert_eq!(
            pairs,
            [
                ("a".into(), "1".into()),
                ("b".into(), "x y".into()),
                ("c".into(), "".into()),
                ("eventTypes".into(), "a,b".into()),
                ("d".into(), "%zz".into()),
                ("e".into(), "%4".into()),
            ]
        );
        assert_eq!(
            query_value(Some("x=1&since=5"), "since").as_deref(),
            Some("5")
        );
    }

    #[test]
    fn access_tokens_are_not_forwarded() {
        assert_eq!(
            forwarded_query(Some("access_token=srk_a_b&events=3&acc%65ss_token=x&b")),
            "events=3&b"
        );
        assert_eq!(forwarded_query(None), "");
        assert_eq!(forwarded_query(Some("access_token=x")), "");
    }
}
