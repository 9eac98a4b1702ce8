//! Wire types of the sync protocol (daemon → relay) and of the client API's JSON bodies,
//! field for field as `DESIGN.md` names them. These are the contract daemons and clients
//! are written against: unknown fields are ignored, optional fields are `Option`s, and
//! free-form payloads (`data`, `params`, `result`) stay raw JSON so the relay never
//! rewrites what it carries. The sync protocol's types derive both directions: the relay
//! parses what the agent writes with the same types, so a field renamed on one side does
//! not compile on the other.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

/// `POST /sync/connect` request.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConnectRequest {
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub daemon_id: String,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub capabilities: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConnectResponse {
    pub connection_id: String,
    /// Seconds.
    pub poll_timeout_max: u64,
    pub last_update_seq: u64,
    #[serde(default)]
    #[schema(value_type = String, required = true)]
    pub relay_version: Cow<'static, str>,
    /// The sync transports this relay offers: `poll` (`/sync/poll` and `/sync/results`)
    /// and `stream` (`/sync/stream`). Empty from a relay older than the stream.
    #[serde(default)]
    pub transports: Vec<Cow<'static, str>>,
}

/// One daemon-side event in a poll's `updates`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Update {
    /// 1 to 256 bytes.
    #[serde(rename = "type")]
    #[schema(min_length = 1, max_length = 256)]
    pub kind: String,
    /// Any JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<serde_json::Value>)]
    pub data: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// `POST /sync/poll` request.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PollRequest {
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub daemon_id: String,
    #[serde(default)]
    pub connection_id: Option<String>,
    #[serde(default)]
    pub updates: Vec<Update>,
    #[serde(default)]
    pub wait_for_commands: bool,
    /// Seconds; clamped to `poll_timeout_max`.
    #[serde(default)]
    pub timeout: Option<f64>,
}

/// A command as handed to a daemon: borrowed from the store when the relay writes it,
/// owned when the agent reads it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(as = Command)]
pub struct WireCommand<'a> {
    #[schema(value_type = String)]
    pub id: Cow<'a, str>,
    /// `http` for a mirrored call (`params` is then an `HttpCommandParams`), or the
    /// daemon's own method name.
    #[schema(value_type = String)]
    pub method: Cow<'a, str>,
    #[serde(default = "null_params")]
    #[schema(value_type = serde_json::Value)]
    pub params: Cow<'a, RawValue>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
}

/// A command without `params` has `null` ones.
fn null_params<'a>() -> Cow<'a, RawValue> {
    Cow::Owned(RawValue::from_string("null".to_owned()).expect("null is JSON"))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PollResponse<'a> {
    pub commands: Vec<WireCommand<'a>>,
    pub last_update_seq: u64,
}

/// `POST /sync/results` request. Entries stay raw so one bad entry can be reported by
/// index instead of failing the batch's parse.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ResultsRequest {
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub daemon_id: String,
    #[schema(value_type = Vec<ResultEntry>)]
    pub results: Vec<Box<RawValue>>,
}

/// One entry of `results`: a whole result, or (with `chunk`) a piece of a streamed one.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct ResultEntry {
    pub command_id: String,
    /// A whole result: any JSON (for `http` commands an `HttpResult`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<serde_json::Value>)]
    pub result: Option<Box<RawValue>>,
    /// The command failed: any JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<serde_json::Value>)]
    pub error: Option<Box<RawValue>>,
    /// Set for stream chunks: the chunk's index, from 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub chunk: Option<i64>,
    /// Chunk 0: the daemon's status and headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<std::collections::HashMap<String, String>>)]
    pub headers: Option<serde_json::Map<String, serde_json::Value>>,
    /// The chunk's bytes as UTF-8 text, or as base64 in `data_base64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    /// The last chunk.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub complete: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ResultsResponse {
    pub accepted: Vec<String>,
    pub unknown: Vec<String>,
}

/// One line a daemon writes on `POST /sync/stream`: updates, results (and chunks), or
/// both. Each line is answered by exactly one [`StreamDown`] line, in the order the lines
/// were written: `last_update_seq` once its updates are durable, `accepted` and `unknown`
/// once its results are, or an `error` when the line was refused.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct StreamUp {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updates: Option<Vec<Update>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<ResultEntry>>)]
    pub results: Option<Vec<Box<RawValue>>>,
}

/// One line the relay writes on `POST /sync/stream`: commands to run, the answer to one
/// daemon line, a keep-alive, or an error. `superseded` and `unauthorized` errors are the
/// last line of the stream; any other error answers one daemon line.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct StreamDown<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<WireCommand>>)]
    pub commands: Option<Vec<WireCommand<'a>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keepalive: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// Cuts a `/sync/stream` body into its lines (JSON objects, one a line), as pieces of
/// it arrive: both sides read the other's lines through it.
#[derive(Debug, Default)]
pub struct LineBuffer {
    pending: bytes::BytesMut,
    /// Bytes of `pending` known to hold no newline.
    scanned: usize,
}

impl LineBuffer {
    pub fn push(&mut self, piece: &[u8]) {
        self.pending.extend_from_slice(piece);
    }

    /// The next whole line, without its newline and surrounding blanks; blank lines are
    /// skipped.
    pub fn next_line(&mut self) -> Option<bytes::Bytes> {
        while let Some(at) = memchr::memchr(b'\n', &self.pending[self.scanned..]) {
            let mut line = self.pending.split_to(self.scanned + at + 1);
            self.scanned = 0;
            let start = line.len() - line.trim_ascii_start().len();
            let kept = line.trim_ascii_end().len();
            line.truncate(kept);
            let line = line.freeze().slice(start.min(kept)..);
            if !line.is_empty() {
                return Some(line);
            }
        }
        self.scanned = self.pending.len();
        None
    }

    /// Bytes of the line not yet ended.
    pub fn unfinished(&self) -> usize {
        self.pending.len()
    }

    /// What is left once the body has ended: a last line without its newline.
    pub fn rest(&mut self) -> Option<bytes::Bytes> {
        let rest = std::mem::take(&mut self.pending).freeze();
        self.scanned = 0;
        let trimmed = rest.trim_ascii();
        (!trimmed.is_empty()).then(|| rest.slice_ref(trimmed))
    }
}

impl StreamDown<'_> {
    /// An error that ends the stream rather than answering a line.
    pub fn is_final_error(&self) -> bool {
        self.error
            .as_ref()
            .is_some_and(|e| matches!(e.code.as_str(), "superseded" | "unauthorized" | "forbidden"))
    }
}

/// Params of an `http` command, as the relay builds them from a mirrored call.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(as = HttpCommandParams)]
pub struct HttpParams {
    pub method: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub query: String,
    #[serde(default)]
    #[schema(value_type = std::collections::HashMap<String, String>)]
    pub headers: serde_json::Map<String, serde_json::Value>,
    /// The body as JSON (or JSON text); `null` with `body_base64`.
    #[serde(default)]
    pub body: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
}

/// Result of an `http` command, as the daemon (or agent) posts it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HttpResult {
    #[schema(minimum = 100, maximum = 999)]
    pub status: u16,
    /// Header values: a string, or a list of strings.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub headers: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub body: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
}

/// `POST /api/v1/daemons/{id}/commands` request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NamedCommandRequest {
    #[schema(min_length = 1, max_length = 128)]
    pub method: String,
    /// Any JSON, handed to the daemon as is.
    #[serde(default)]
    #[schema(value_type = Option<serde_json::Value>)]
    pub params: Option<Box<RawValue>>,
}

/// `<daemon>` in listings.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Daemon)]
pub struct DaemonView {
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub daemon_id: String,
    pub online: bool,
    #[schema(required = true)]
    pub last_seen: Option<String>,
    #[schema(required = true)]
    pub version: Option<String>,
    pub capabilities: Vec<String>,
    pub queued: u64,
    pub last_seq: u64,
    /// In a cluster, the relay node holding the daemon's connection while it is online.
    /// Admin views only (`/admin/daemons`): clients need not know the relay's nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// One change-log entry as clients see it: its `seq` and the event.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Change)]
pub struct ChangeView<'a> {
    #[schema(minimum = 1)]
    pub seq: u64,
    #[serde(flatten)]
    pub event: StreamEvent<'a>,
}

/// `GET /api/v1/commands/{id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CommandView {
    pub id: String,
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub daemon_id: String,
    pub method: String,
    #[schema(value_type = crate::store::CommandState)]
    pub state: &'static str,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<serde_json::Value>)]
    pub result: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<serde_json::Value>)]
    pub error: Option<Box<RawValue>>,
    /// How often the command was handed to the daemon.
    pub deliveries: u32,
}

/// `POST /admin/keys` request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateKeyRequest {
    #[schema(value_type = crate::store::Role)]
    pub role: String,
    #[serde(default)]
    pub daemon: Option<String>,
    #[serde(default)]
    pub scope: Option<Vec<String>>,
    #[serde(default)]
    pub label: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyView {
    pub key_id: String,
    #[schema(value_type = crate::store::Role)]
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon: Option<String>,
    #[serde(default)]
    pub scope: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub created_at: String,
    /// Only in the answer to a create: the bearer token, shown once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Every error the relay answers with (`Error` in the OpenAPI document).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

impl ErrorBody {
    pub fn new(code: &str, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
                details: None,
            },
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable, e.g. `bad_request`, `queue_full`, `daemon_offline`.
    pub code: String,
    #[schema(min_length = 1)]
    pub message: String,
    /// More about the error, where the relay knows more (any JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<serde_json::Value>)]
    pub details: Option<Box<serde_json::Value>>,
}

/// `GET /api/v1/daemons` and `GET /admin/daemons`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DaemonList {
    pub daemons: Vec<DaemonView>,
}

/// `GET /admin/daemons/{daemon_id}/commands`: newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct CommandList {
    pub commands: Vec<CommandView>,
}

/// One cached context as the operator sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ContextView {
    pub context_id: u64,
    /// The daemon-side path and query it caches.
    pub key: String,
    /// `fetching`, `complete` or `failed`.
    pub state: &'static str,
    /// The daemon's status, once its first chunk arrived.
    #[schema(required = true)]
    pub status: Option<u16>,
    pub chunks: u64,
    pub bytes: u64,
    pub created_at: String,
    #[schema(required = true)]
    pub finished_at: Option<String>,
}

/// `GET /admin/daemons/{daemon_id}/contexts`: newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct ContextList {
    pub contexts: Vec<ContextView>,
}

/// A histogram as counters since start: a reader takes two and subtracts them for
/// what happened between.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistogramView {
    /// Upper bounds of the buckets; the last bucket, past them all, has none.
    pub bounds: Vec<f64>,
    /// Observations at or under each bound, and last all of them.
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum_seconds: f64,
}

/// Requests served since start.
#[derive(Debug, Serialize, ToSchema)]
pub struct RequestStats {
    pub total: u64,
    /// Seconds from request to response head, by route family (`sync`, `client`,
    /// `admin`, `health`, `other`); `sync` includes long polls.
    pub latency: std::collections::BTreeMap<&'static str, HistogramView>,
}

/// The store's durable writes since start.
#[derive(Debug, Serialize, ToSchema)]
pub struct StoreStats {
    /// `sled` or `postgres`.
    pub backend: &'static str,
    /// Flushes (sled's group commits, PostgreSQL's `COMMIT`s).
    pub flushes: u64,
    /// Writes they made durable.
    pub commits: u64,
    pub flush_micros: u64,
    /// On disk now; `null` when the store cannot say.
    #[schema(required = true)]
    pub disk_bytes: Option<u64>,
}

/// Daemons known and online now.
#[derive(Debug, Serialize, ToSchema)]
pub struct DaemonCounts {
    pub total: u64,
    pub online: u64,
}

/// Commands now.
#[derive(Debug, Serialize, ToSchema)]
pub struct CommandCounts {
    /// Queued or delivered, all daemons.
    pub unfinished: u64,
    /// By state, as of the last retention census (`null` before the first).
    #[schema(required = true)]
    pub by_state: Option<std::collections::BTreeMap<String, u64>>,
    #[schema(required = true)]
    pub census_at: Option<String>,
}

/// `GET /admin/stats`: the relay's own figures, for the console's live charts.
#[derive(Debug, Serialize, ToSchema)]
pub struct RelayStats {
    pub version: &'static str,
    pub uptime_ms: u64,
    pub requests: RequestStats,
    pub store: StoreStats,
    pub daemons: DaemonCounts,
    pub commands: CommandCounts,
    /// This node of a cluster; absent on a single relay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStats>,
}

/// A cluster node's view of the cluster (DESIGN.md, "Cluster"), since start.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterStats {
    /// This node's `cluster.node`.
    pub node: String,
    pub nats_connected: bool,
    /// Daemons whose connection this node holds: it answers other nodes' reads of them.
    pub daemons_held: u64,
    pub hints_sent: u64,
    pub hints_received: u64,
    /// Not sent: NATS unreachable, or the hint queue full.
    pub hints_dropped: u64,
    /// Times this node's waiters re-read the database (NATS away, or the safety re-read).
    pub fallback_rereads: u64,
    /// Seconds from a hint's publication on another node to its arrival here.
    pub hint_latency: HistogramView,
}

/// `GET /api/v1/daemons/{daemon_id}/changes`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChangesResponse<'a> {
    pub changes: Vec<ChangeView<'a>>,
    /// The last `seq` in `changes`, or `since` when there are none: the next `since`.
    pub last_seq: u64,
    /// Whether more changes follow after `last_seq`.
    pub more: bool,
}

/// The `data` of one event of `GET /api/v1/daemons/{daemon_id}/stream/events`, in hld's
/// shape (its `id:` line is the change's `seq`).
#[derive(Debug, Serialize, ToSchema)]
pub struct StreamEvent<'a> {
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'a str,
    pub timestamp: String,
    #[serde(serialize_with = "compact")]
    #[schema(value_type = serde_json::Value)]
    pub data: &'a RawValue,
}

/// `POST /admin/keys`: the new key, with its bearer token (shown once, never again).
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub key: KeyView,
    pub token: String,
}

/// `GET /admin/keys`.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<KeyView>,
}

/// `DELETE /admin/keys/{key_id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RevokedKey<'a> {
    #[schema(value_type = String)]
    pub revoked: &'a str,
}

/// `GET /healthz` (`ok`) and `GET /readyz` (`ready`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    #[schema(value_type = String)]
    pub status: &'static str,
}

/// `POST /admin/backup`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    /// An absolute path on the relay's host, to a directory that does not exist yet.
    #[schema(value_type = String)]
    pub to: std::path::PathBuf,
}

/// One NDJSON line of `POST /admin/backup`: progress, then the outcome.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum BackupLine {
    Progress {
        copied_bytes: u64,
        estimated_bytes: u64,
        entries: u64,
    },
    /// The backup is on disk.
    Done {
        done: bool,
        #[schema(value_type = String)]
        to: std::path::PathBuf,
        bytes: u64,
        entries: u64,
        writes_paused_ms: u64,
        elapsed_ms: u64,
    },
    Failed(ErrorBody),
}

/// Stored event data as one compact JSON text (keys in their order): a daemon's line
/// breaks would end an SSE `data:` line, and clients have always seen it compacted.
fn compact<S: serde::Serializer>(data: &&RawValue, serializer: S) -> Result<S::Ok, S::Error> {
    let value: serde_json::Value =
        serde_json::from_str(data.get()).map_err(serde::ser::Error::custom)?;
    value.serialize(serializer)
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1, plus `host` and
/// `content-length`, which each hop sets for itself): never carried in an `http` command
/// or its result, in either direction.
pub const HOP_BY_HOP_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// Whether `id` is a valid daemon id: `[A-Za-z0-9._-]{1,64}`, and not `.` or `..`, which
/// would be path segments rather than names in a URL.
pub fn valid_daemon_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Deepest nesting of arrays and objects the relay accepts in a JSON body. Everything it
/// stores it hands on inside another document (a command inside a poll's answer, an update
/// inside a change batch), and serde_json-based readers, the agent among them, stop at 128
/// levels: 100 leaves room for the wrapping, so nothing the relay acknowledges becomes a
/// document its readers cannot parse.
pub const MAX_JSON_DEPTH: usize = 100;

/// Deepest JSON payload that travels as JSON inside a command, a result or an update; a
/// deeper one (a mirrored body, a daemon's answer or event) travels as its text, byte for
/// byte, so the document that carries it stays within [`MAX_JSON_DEPTH`].
pub const MAX_CARRIED_JSON_DEPTH: usize = MAX_JSON_DEPTH - 8;

/// Why a JSON text is beyond what the relay carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonLimit {
    /// Arrays and objects nest deeper than the limit.
    TooDeep(usize),
    /// A number whose magnitude no f64 holds (`1e999`): serde_json readers refuse the
    /// whole document, though a raw-JSON field accepts it.
    NumberOutOfRange,
    /// A `\\uD800`-style escape without its pair: not a character, and serde_json readers
    /// of strings refuse the document, though a raw-JSON field accepts it.
    LoneSurrogate,
}

impl std::fmt::Display for JsonLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JsonLimit::TooDeep(max) => write!(f, "nested deeper than {max} levels"),
            JsonLimit::NumberOutOfRange => f.write_str("a number is out of range"),
            JsonLimit::LoneSurrogate => f.write_str("a \\u escape is half a surrogate pair"),
        }
    }
}

/// Checks that a JSON text nests arrays and objects at most `max_depth` deep, holds no
/// number out of f64's range and no unpaired UTF-16 surrogate escape: what every serde_json
/// reader of a document that carries it needs. One pass, no recursion, no allocation but for rare long or exponent numbers,
/// whatever the input; text that is not JSON is left for the parser to refuse.
pub fn json_within_limits(text: &[u8], max_depth: usize) -> Result<(), JsonLimit> {
    let mut depth = 0usize;
    let mut at = 0;
    while at < text.len() {
        match text[at] {
            b'"' => {
                at += 1;
                while at < text.len() && text[at] != b'"' {
                    if text[at] != b'\\' {
                        at += 1;
                        continue;
                    }
                    if text.get(at + 1) == Some(&b'u') {
                        if let Some(unit) = hex_unit(text, at + 2) {
                            if (0xDC00..0xE000).contains(&unit) {
                                return Err(JsonLimit::LoneSurrogate);
                            }
                            if (0xD800..0xDC00).contains(&unit) {
                                let low = (text.get(at + 6..at + 8) == Some(b"\\u"))
                                    .then(|| hex_unit(text, at + 8))
                                    .flatten();
                                if !low.is_some_and(|low| (0xDC00..0xE000).contains(&low)) {
                                    return Err(JsonLimit::LoneSurrogate);
                                }
                                at += 12;
                                continue;
                            }
                            at += 6;
                            continue;
                        }
                    }
                    at += 2;
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(JsonLimit::TooDeep(max_depth));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let start = at;
                while at < text.len()
                    && matches!(text[at], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    at += 1;
                }
                if number_out_of_range(&text[start..at]) {
                    return Err(JsonLimit::NumberOutOfRange);
                }
                continue;
            }
            _ => {}
        }
        at += 1;
    }
    Ok(())
}

/// The UTF-16 code unit of the four hex digits at `at`, if they are four hex digits.
fn hex_unit(text: &[u8], at: usize) -> Option<u32> {
    let digits = std::str::from_utf8(text.get(at..at + 4)?).ok()?;
    u32::from_str_radix(digits, 16)
        .ok()
        .filter(|_| digits.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether a number token is one serde_json refuses for its magnitude alone. Only an
/// exponent or 300+ digits can overflow an f64, so short plain numbers skip the check.
fn number_out_of_range(token: &[u8]) -> bool {
    if token.len() < 300 && !token.iter().any(|b| matches!(b, b'e' | b'E')) {
        return false;
    }
    let Ok(token) = std::str::from_utf8(token) else {
        return false;
    };
    serde_json::from_str::<f64>(token).is_err() && token.parse::<f64>().is_ok()
}

/// Milliseconds since the Unix epoch → RFC 3339 UTC with millisecond precision.
pub fn rfc3339(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00.000Z".to_owned())
}

/// RFC 3339 text (any offset) → milliseconds since the Unix epoch; `None` when invalid or
/// before 1970.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_ids() {
        for good in ["abc123", "a", "laptop.home", "x_y-z", &"a".repeat(64)] {
            assert!(valid_daemon_id(good), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", &"a".repeat(65), "a\0b"] {
            assert!(!valid_daemon_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn json_limits() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let check = |text: &[u8], max| json_within_limits(text, max);
        assert_eq!(check(nested(3).as_bytes(), 3), Ok(()));
        assert_eq!(check(nested(4).as_bytes(), 3), Err(JsonLimit::TooDeep(3)));
        assert_eq!(check(br#"{"a":"[[[[[[","b":"\\\"{{{{"}"#, 1), Ok(()));
        assert_eq!(
            check(br#"{"a":"\\","b":[[]]}"#, 2),
            Err(JsonLimit::TooDeep(2))
        );
        // Found by the sync_json fuzz target: raw-JSON fields took numbers that no reader
        // of the poll's answer could parse.
        for bad in [&b"1e999"[..], b"[-1E+400]", b"{\"a\":777E777777777777717}"] {
            assert_eq!(check(bad, 9), Err(JsonLimit::NumberOutOfRange), "{bad:?}");
            assert!(serde_json::from_slice::<serde_json::Value>(bad).is_err());
        }
        // Found in review: a raw-JSON field took `"\ud800"`, which no String reader takes.
        for bad in [
            &br#""\ud800""#[..],
            br#"["\udc00"]"#,
            br#""\uD800\u0041""#,
            br#""\ud800"#,
            br#"{"a":"x\ud83d"}"#,
        ] {
            assert_eq!(check(bad, 9), Err(JsonLimit::LoneSurrogate), "{bad:?}");
            assert!(serde_json::from_slice::<serde_json::Value>(bad).is_err());
        }
        for good in [&br#""\ud83d\ude00""#[..], br#""\\ud800""#, br#""\u00e9\n""#] {
            assert_eq!(check(good, 9), Ok(()), "{good:?}");
            assert!(serde_json::from_slice::<serde_json::Value>(good).is_ok());
        }
        let huge_integer = "9".repeat(400);
        assert_eq!(
            check(huge_integer.as_bytes(), 9),
            Err(JsonLimit::NumberOutOfRange)
        );
        for good in [
            &b"1e308"[..],
            b"-0.5e-999",
            b"12345678901234567890",
            b"\"1e999\"",
        ] {
            assert_eq!(check(good, 9), Ok(()), "{good:?}");
        }
        // What the limit is for: serde_json reads the deepest accepted body, wrapped twice.
        let wrapped = format!("{{\"a\":[{}]}}", nested(MAX_JSON_DEPTH));
        assert!(serde_json::from_str::<serde_json::Value>(&wrapped).is_ok());
    }

    #[test]
    fn times_round_trip() {
        let ms = 1_764_000_000_123;
        assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms));
        assert_eq!(
            parse_rfc3339("2025-01-01T01:00:00+01:00"),
            Some(1_735_689_600_000)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}

#[cfg(test)]
mod wire_tests {
    use super::*;

    #[test]
    fn lines_are_cut_wherever_the_pieces_end() {
        let mut lines = LineBuffer::default();
        lines.push(b"{\"a\":1}\n\n  \r\n{\"b\"");
        assert_eq!(lines.next_line().as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(lines.next_line(), None);
        assert_eq!(lines.unfinished(), 4);
        lines.push(b":2}\r");
        assert_eq!(lines.next_line(), None);
        lines.push(b"\n {\"c\":3}");
        assert_eq!(lines.next_line().as_deref(), Some(&b"{\"b\":2}"[..]));
        assert_eq!(lines.next_line(), None);
        assert_eq!(lines.rest().as_deref(), Some(&b"{\"c\":3}"[..]));
        assert_eq!(lines.rest(), None);
    }

    #[test]
    fn a_stream_line_answering_nothing_ends_only_on_final_errors() {
        let down: StreamDown<'static> =
            serde_json::from_str(r#"{"error":{"code":"chunk_gap","message":"m"}}"#).unwrap();
        assert!(!down.is_final_error());
        let down: StreamDown<'static> =
            serde_json::from_str(r#"{"error":{"code":"superseded","message":"m"}}"#).unwrap();
        assert!(down.is_final_error());
        let keepalive = serde_json::to_string(&StreamDown {
            keepalive: true,
            ..StreamDown::default()
        })
        .unwrap();
        assert_eq!(keepalive, r#"{"keepalive":true}"#);
    }

    #[test]
    fn the_relay_s_writing_and_the_agent_s_reading_agree() {
        // Relay side: borrowed from the store.
        let params = RawValue::from_string(r#"{"path":"/x"}"#.to_owned()).unwrap();
        let written = serde_json::to_string(&PollResponse {
            commands: vec![WireCommand {
                id: Cow::Borrowed("c1"),
                method: Cow::Borrowed("http"),
                params: Cow::Borrowed(&params),
                stream: false,
            }],
            last_update_seq: 7,
        })
        .unwrap();
        assert_eq!(
            written,
            r#"{"commands":[{"id":"c1","method":"http","params":{"path":"/x"}}],"last_update_seq":7}"#
        );
        // Agent side: owned.
        let read: PollResponse<'static> = serde_json::from_str(&written).unwrap();
        assert_eq!(read.commands[0].id, "c1");
        assert_eq!(read.commands[0].params.get(), r#"{"path":"/x"}"#);
        // A result entry as the agent writes it is what the relay reads.
        let entry = ResultEntry {
            command_id: "c1".into(),
            chunk: Some(0),
            status: Some(200),
            data: Some("id: 1\n".into()),
            ..ResultEntry::default()
        };
        let read: ResultEntry =
            serde_json::from_str(&serde_json::to_string(&entry).unwrap()).unwrap();
        assert_eq!(
            (read.chunk, read.status, read.complete),
            (Some(0), Some(200), false)
        );
    }
}

#[cfg(test)]
mod lenient_reading {
    use super::*;

    #[test]
    fn a_command_without_params_and_a_connect_without_version_still_parse() {
        let poll: PollResponse<'static> =
            serde_json::from_str(r#"{"commands":[{"id":"c","method":"m"}],"last_update_seq":0}"#)
                .unwrap();
        assert_eq!(poll.commands[0].params.get(), "null");
        let hello: ConnectResponse = serde_json::from_str(
            r#"{"connection_id":"x","poll_timeout_max":60,"last_update_seq":0}"#,
        )
        .unwrap();
        assert_eq!(hello.relay_version, "");
    }
}
