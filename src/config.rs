//! `config.toml` → validated [`Config`]. Two stages, as the style guide asks: the raw serde
//! types mirror the file (`deny_unknown_fields`, every key optional with a documented
//! default), and [`Config::from_raw`] turns them into a validated value with `Duration`s and
//! no "must be Some at runtime" fields. Every bad key is reported, naming the key and the
//! file, before a port is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A fully validated relay configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub sync: SyncConfig,
    pub commands: CommandsConfig,
    pub changes: ChangesConfig,
    pub limits: LimitsConfig,
    pub retention: RetentionConfig,
    pub streams: StreamsConfig,
    /// HTTPS; `None` serves plaintext (loopback, or `insecure_plaintext`).
    pub tls: Option<TlsConfig>,
    pub rate_limit: RateLimitConfig,
    pub cors: CorsConfig,
    /// `[store]`: where the data lives.
    pub store: StoreBackend,
    pub console: ConsoleConfig,
    /// `[cluster]`: one node of several on one PostgreSQL database; `None`: a lone relay.
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: this node's name and the NATS cluster that carries hints between nodes
/// (DESIGN.md, "Cluster"). Needs `store.backend = "postgres"`.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Unique among the nodes: letters, digits, `-` and `_`.
    pub node: String,
    /// `nats://host:port` (or `tls://`) of one or more NATS servers.
    pub nats_urls: Vec<String>,
    /// A NATS `.creds` file (JWT and NKey seed).
    pub nats_credentials_file: Option<PathBuf>,
    /// A file whose contents are the NATS token.
    pub nats_token_file: Option<PathBuf>,
    /// PEM root certificates that sign the NATS servers' certificates.
    pub nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate and key, for NATS servers that verify clients.
    pub nats_tls_client: Option<(PathBuf, PathBuf)>,
    /// Refuse a NATS connection without TLS.
    pub nats_tls_required: bool,
    /// While NATS is unreachable, how often waiters re-read the database.
    pub fallback_interval: Duration,
}

/// `[console]`: the operator's page at `/console`.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// Serve it; off, `/console` is 404 (the admin routes stay).
    pub enabled: bool,
}

/// `[store] backend`.
#[derive(Debug, Clone)]
pub enum StoreBackend {
    /// The embedded database in `server.data_dir`.
    Sled,
    /// PostgreSQL 15+ (`Debug` never shows the password).
    Postgres(crate::store::postgres::PgSettings),
}

/// `[tls]`: PEM files, re-read on SIGHUP.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Mutual TLS: client certificates signed by these CAs, whose subject CN is a daemon
    /// id, authenticate that daemon.
    pub client_ca: Option<PathBuf>,
}

/// `[rate_limit]`: GCRA quotas (`governor`); a rate of 0 turns that limit off.
#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    /// Requests per second per key (after authentication).
    pub per_key_per_second: u32,
    pub per_key_burst: u32,
    /// Requests per second per source address (IPv4 address, IPv6 /64), before
    /// authentication.
    pub per_address_per_second: u32,
    pub per_address_burst: u32,
    /// Failed authentications per minute per source address; beyond it the address is
    /// answered 429 without looking at its keys.
    pub auth_failures_per_minute: u32,
    pub auth_failures_burst: u32,
    /// Source addresses tracked at once; beyond it new addresses share one budget.
    pub max_tracked_addresses: usize,
}

/// `[cors]`: browser clients.
#[derive(Debug, Clone)]
pub struct CorsConfig {
    /// Exact origins (`https://app.example.com`), or `"*"`; empty turns CORS off.
    pub allowed_origins: Vec<String>,
    /// How long a browser may cache a preflight answer.
    pub max_age: Duration,
}

/// Cache-and-serve streaming.
#[derive(Debug, Clone)]
pub struct StreamsConfig {
    /// Path patterns under a daemon's `/api/v1/`, one glob (`*`) per segment.
    pub paths: Vec<Vec<String>>,
    /// A complete context older than this is fetched again.
    pub context_ttl: Duration,
    /// All contexts together; the oldest are evicted beyond it.
    pub context_max_bytes: u64,
    /// One context; a larger fetch fails.
    pub context_max_size: u64,
    /// One posted chunk.
    pub max_chunk_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Allows a plaintext listener on a non-loopback address (behind a TLS proxy).
    pub insecure_plaintext: bool,
    pub log_format: LogFormat,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// Reverse proxies whose `X-Forwarded-For` names the client for rate limits.
    pub trusted_proxies: Vec<IpNet>,
}

/// An address block: `10.0.0.0/8`, `fd00::/8`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn parse(text: &str) -> Option<IpNet> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr.parse().ok()?, Some(prefix.parse::<u8>().ok()?)),
            None => (text.parse().ok()?, None),
        };
        let max = if matches!(addr, std::net::IpAddr::V4(_)) {
            32
        } else {
            128
        };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(IpNet { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        let ip = match ip {
            V6(v6) => v6.to_ipv4_mapped().map_or(V6(v6), V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (V4(net), V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (V6(net), V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Upper bound for a poll's `timeout`; announced to daemons as `poll_timeout_max`.
    pub poll_timeout_max: Duration,
    /// How long a handed-out command stays leased before it is handed out again.
    pub lease_duration: Duration,
    /// A daemon counts as online while a poll is waiting or for this long after its last
    /// sync request.
    pub online_grace: Duration,
    /// Most commands handed out by one poll (or one line of a sync stream).
    pub max_commands_per_poll: usize,
    /// Serve `POST /sync/stream` and offer it in the connect answer.
    pub stream: bool,
}

#[derive(Debug, Clone)]
pub struct CommandsConfig {
    /// Writes not delivered by then expire (state `expired`).
    pub command_ttl: Duration,
    /// Commands queued or delivered but not completed, per daemon; more → `queue_full`.
    pub queue_limit: u64,
    /// Default `Prefer: wait=N` for mirrored calls.
    pub wait_default: Duration,
    /// Largest accepted `Prefer: wait=N` / `?wait=`.
    pub wait_max: Duration,
    /// Largest response body kept as the offline copy of a GET.
    pub get_cache_max_body: usize,
}

#[derive(Debug, Clone)]
pub struct ChangesConfig {
    /// Interval of SSE keep-alive comments.
    pub sse_keepalive: Duration,
    /// Largest `limit` of one `/changes` batch.
    pub batch_max: usize,
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub max_body_bytes: usize,
    pub max_updates_per_poll: usize,
    pub max_results_per_post: usize,
    /// Request headers (and the TLS handshake) must arrive within this.
    pub header_read_timeout: Duration,
    /// Longest a request body may go without any of it arriving (408 `timeout`).
    pub body_read_timeout: Duration,
    /// Longest a streamed response may wait for its reader to take anything before it is
    /// ended.
    pub body_write_timeout: Duration,
    /// Bytes of request headers (HTTP/1.1 read buffer, HTTP/2 header list).
    pub max_header_bytes: usize,
    /// Number of request headers (HTTP/1.1).
    pub max_headers: usize,
    /// Open connections in all; more are closed at once.
    pub max_connections: usize,
    /// Open connections from one source address (IPv4 address, IPv6 /64).
    pub max_connections_per_address: usize,
    /// Concurrent HTTP/2 streams on one connection.
    pub max_streams_per_connection: u32,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// How often the background sweep runs.
    pub interval: Duration,
    /// Newest change-log entries kept per daemon.
    pub changes_max_entries: u64,
    /// Change-log entries older than this (by the relay's receipt time) are dropped.
    pub changes_max_age: Duration,
    /// Completed, failed and expired commands are forgotten after this.
    pub results_max_age: Duration,
    /// Offline copies of GET responses older than this are dropped.
    pub get_cache_max_age: Duration,
    /// Bytes one daemon may occupy (0: no budget).
    pub daemon_max_bytes: u64,
}

/// Reasons a configuration is rejected; every message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {}", .problems.join("; "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub sync: RawSync,
    #[serde(default)]
    pub commands: RawCommands,
    #[serde(default)]
    pub changes: RawChanges,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub retention: RawRetention,
    #[serde(default)]
    pub streams: RawStreams,
    #[serde(default)]
    pub tls: RawTls,
    #[serde(default)]
    pub rate_limit: RawRateLimit,
    #[serde(default)]
    pub cors: RawCors,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub console: RawConsole,
    #[serde(default)]
    pub cluster: Option<RawCluster>,
    /// Read by `syncrelay agent`; accepted here so one file can serve both.
    #[serde(default)]
    pub agent: Option<toml::Table>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub insecure_plaintext: Option<bool>,
    pub log_format: Option<String>,
    pub shutdown_grace: Option<String>,
    pub trusted_proxies: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSync {
    pub poll_timeout_max: Option<String>,
    pub lease_duration: Option<String>,
    pub online_grace: Option<String>,
    pub max_commands_per_poll: Option<usize>,
    pub stream: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCommands {
    pub command_ttl: Option<String>,
    pub queue_limit: Option<u64>,
    pub wait_default: Option<String>,
    pub wait_max: Option<String>,
    pub get_cache_max_body: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawChanges {
    pub sse_keepalive: Option<String>,
    pub batch_max: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_body_bytes: Option<usize>,
    pub max_updates_per_poll: Option<usize>,
    pub max_results_per_post: Option<usize>,
    pub header_read_timeout: Option<String>,
    pub body_read_timeout: Option<String>,
    pub body_write_timeout: Option<String>,
    pub max_header_bytes: Option<usize>,
    pub max_headers: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_connections_per_address: Option<usize>,
    pub max_streams_per_connection: Option<u32>,
    pub idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub per_key_per_second: Option<u32>,
    pub per_key_burst: Option<u32>,
    pub per_address_per_second: Option<u32>,
    pub per_address_burst: Option<u32>,
    pub auth_failures_per_minute: Option<u32>,
    pub auth_failures_burst: Option<u32>,
    pub max_tracked_addresses: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCors {
    pub allowed_origins: Option<Vec<String>>,
    pub max_age: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsole {
    pub enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub node: Option<String>,
    pub nats_urls: Option<Vec<String>>,
    pub nats_credentials_file: Option<PathBuf>,
    pub nats_token_file: Option<PathBuf>,
    pub nats_tls_ca: Option<PathBuf>,
    pub nats_tls_cert: Option<PathBuf>,
    pub nats_tls_key: Option<PathBuf>,
    pub nats_tls_required: Option<bool>,
    pub fallback_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStreams {
    pub paths: Option<Vec<String>>,
    pub context_ttl: Option<String>,
    pub context_max_bytes: Option<u64>,
    pub context_max_size: Option<u64>,
    pub max_chunk_bytes: Option<usize>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub backend: Option<String>,
    pub url: Option<String>,
    pub url_file: Option<PathBuf>,
    pub pool_size: Option<usize>,
    pub statement_timeout: Option<String>,
    pub allow_unsafe_durability: Option<bool>,
}

impl std::fmt::Debug for RawStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawStore")
            .field("backend", &self.backend)
            .field(
                "url",
                &self.url.as_deref().map(crate::store::postgres::redacted),
            )
            .field("url_file", &self.url_file)
            .field("pool_size", &self.pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .field("allow_unsafe_durability", &self.allow_unsafe_durability)
            .finish()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetention {
    pub interval: Option<String>,
    pub changes_max_entries: Option<u64>,
    pub changes_max_age: Option<String>,
    pub results_max_age: Option<String>,
    pub get_cache_max_age: Option<String>,
    pub daemon_max_bytes: Option<u64>,
}

/// Collects problems so that every bad key is reported at once.
struct Checker {
    problems: Vec<String>,
}

impl Checker {
    fn duration(&mut self, key: &str, raw: &Option<String>, default: &str) -> Duration {
        let text = raw.as_deref().unwrap_or(default);
        match humantime::parse_duration(text) {
            Ok(d) => d,
            Err(err) => {
                self.problems.push(format!(
                    "{key} = {text:?} is not a duration like \"30s\" ({err})"
                ));
                humantime::parse_duration(default).expect("defaults parse")
            }
        }
    }

    fn positive<T: PartialOrd + Default + Copy>(
        &mut self,
        key: &str,
        raw: Option<T>,
        default: T,
    ) -> T {
        let value = raw.unwrap_or(default);
        if value <= T::default() {
            self.problems.push(format!("{key} must be greater than 0"));
            return default;
        }
        value
    }

    fn require(&mut self, ok: bool, message: impl Into<String>) {
        if !ok {
            self.problems.push(message.into());
        }
    }
}

impl RawConfig {
    /// Reads a config file, unvalidated (command-line overrides go in before
    /// [`RawConfig::validate`]).
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses config text; `path` only names the file in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
        toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.to_owned(),
            message: err.message().to_owned()
                + &err
                    .span()
                    .map(|span| format!(" (at byte {})", span.start))
                    .unwrap_or_default(),
        })
    }

    /// Checks every value; `path` names the file (or "defaults") in errors.
    pub fn validate(self, path: &Path) -> Result<Config, ConfigError> {
        Config::from_raw(self).map_err(|problems| ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }
}

impl Config {
    /// What serving this config would get wrong, beyond its values: plaintext HTTP off
    /// loopback (keys and tokens would cross the network in the clear). Checked by
    /// `syncrelay serve` and `syncrelay config check`; the operator commands, which only
    /// read the address and data dir, do not need it.
    pub fn check_serving(&self) -> Result<(), String> {
        let listen = self.server.listen;
        if self.tls.is_none() && !listen.ip().is_loopback() && !self.server.insecure_plaintext {
            return Err(format!(
                "refusing plaintext HTTP on the non-loopback address {listen}: set [tls] cert \
                 and key (see `syncrelay init --self-signed`), serve on loopback, or set \
                 server.insecure_plaintext = true behind a TLS-terminating proxy"
            ));
        }
        Ok(())
    }

    /// Reads and validates a config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        RawConfig::from_file(path)?.validate(path)
    }

    /// Parses and validates config text; `path` only names the file in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        RawConfig::from_toml(text, path)?.validate(path)
    }

    /// The built-in defaults, exactly the values the shipped `config.toml` documents.
    pub fn defaults() -> Config {
        Self::from_raw(RawConfig::default()).expect("defaults are valid")
    }

    pub fn from_raw(raw: RawConfig) -> Result<Config, Vec<String>> {
        let mut check = Checker {
            problems: Vec::new(),
        };
        let listen_text = raw.server.listen.as_deref().unwrap_or("127.0.0.1:8080");
        let listen = match listen_text.parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => {
                check.problems.push(format!(
                    "server.listen = {listen_text:?} is not an address like \"127.0.0.1:8080\""
                ));
                SocketAddr::from(([127, 0, 0, 1], 8080))
            }
        };
        let log_format = match raw.server.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                check.problems.push(format!(
                    "server.log_format = {other:?} must be \"text\" or \"json\""
                ));
                LogFormat::Text
            }
        };
        let mut server = ServerConfig {
            listen,
            data_dir: raw
                .server
                .data_dir
                .unwrap_or_else(|| PathBuf::from("./data")),
            insecure_plaintext: raw.server.insecure_plaintext.unwrap_or(false),
            log_format,
            shutdown_grace: check.duration(
                "server.shutdown_grace",
                &raw.server.shutdown_grace,
                "10s",
            ),
            trusted_proxies: Vec::new(),
        };
        for text in raw.server.trusted_proxies.unwrap_or_default() {
            match IpNet::parse(&text) {
                Some(net) => server.trusted_proxies.push(net),
                None => check.problems.push(format!(
                    "server.trusted_proxies: {text:?} is not an address or block like \"10.0.0.0/8\""
                )),
            }
        }
        let sync = SyncConfig {
            poll_timeout_max: check.duration(
                "sync.poll_timeout_max",
                &raw.sync.poll_timeout_max,
                "60s",
            ),
            lease_duration: check.duration("sync.lease_duration", &raw.sync.lease_duration, "60s"),
            online_grace: check.duration("sync.online_grace", &raw.sync.online_grace, "15s"),
            max_commands_per_poll: check.positive(
                "sync.max_commands_per_poll",
                raw.sync.max_commands_per_poll,
                64,
            ),
            stream: raw.sync.stream.unwrap_or(true),
        };
        check.require(
            sync.poll_timeout_max >= Duration::from_secs(1),
            "sync.poll_timeout_max must be at least 1s",
        );
        check.require(
            sync.lease_duration >= Duration::from_secs(1),
            "sync.lease_duration must be at least 1s",
        );
        let commands = CommandsConfig {
            command_ttl: check.duration("commands.command_ttl", &raw.commands.command_ttl, "24h"),
            queue_limit: check.positive("commands.queue_limit", raw.commands.queue_limit, 10_000),
            wait_default: check.duration(
                "commands.wait_default",
                &raw.commands.wait_default,
                "30s",
            ),
            wait_max: check.duration("commands.wait_max", &raw.commands.wait_max, "120s"),
            get_cache_max_body: raw.commands.get_cache_max_body.unwrap_or(1 << 20),
        };
        check.require(
            commands.wait_default <= commands.wait_max,
            "commands.wait_default must not exceed commands.wait_max",
        );
        check.require(
            commands.command_ttl >= Duration::from_secs(1),
            "commands.command_ttl must be at least 1s",
        );
        let changes = ChangesConfig {
            sse_keepalive: check.duration(
                "changes.sse_keepalive",
                &raw.changes.sse_keepalive,
                "15s",
            ),
            batch_max: check.positive("changes.batch_max", raw.changes.batch_max, 1000),
        };
        check.require(
            changes.sse_keepalive >= Duration::from_millis(100),
            "changes.sse_keepalive must be at least 100ms",
        );
        let limits = LimitsConfig {
            max_body_bytes: check.positive(
                "limits.max_body_bytes",
                raw.limits.max_body_bytes,
                16 << 20,
            ),
            max_updates_per_poll: check.positive(
                "limits.max_updates_per_poll",
                raw.limits.max_updates_per_poll,
                1000,
            ),
            max_results_per_post: check.positive(
                "limits.max_results_per_post",
                raw.limits.max_results_per_post,
                1000,
            ),
            header_read_timeout: check.duration(
                "limits.header_read_timeout",
                &raw.limits.header_read_timeout,
                "10s",
            ),
            body_read_timeout: check.duration(
                "limits.body_read_timeout",
                &raw.limits.body_read_timeout,
                "10s",
            ),
            body_write_timeout: check.duration(
                "limits.body_write_timeout",
                &raw.limits.body_write_timeout,
                "60s",
            ),
            max_header_bytes: raw.limits.max_header_bytes.unwrap_or(16 << 10),
            max_headers: check.positive("limits.max_headers", raw.limits.max_headers, 64),
            max_connections: check.positive(
                "limits.max_connections",
                raw.limits.max_connections,
                4096,
            ),
            max_connections_per_address: check.positive(
                "limits.max_connections_per_address",
                raw.limits.max_connections_per_address,
                256,
            ),
            max_streams_per_connection: check.positive(
                "limits.max_streams_per_connection",
                raw.limits.max_streams_per_connection,
                128,
            ),
            idle_timeout: check.duration("limits.idle_timeout", &raw.limits.idle_timeout, "2m"),
        };
        check.require(
            limits.idle_timeout >= Duration::from_secs(1),
            "limits.idle_timeout must be at least 1s",
        );
        check.require(
            (8192..=1 << 20).contains(&limits.max_header_bytes),
            "limits.max_header_bytes must be between 8192 and 1048576",
        );
        check.require(
            limits.header_read_timeout >= Duration::from_millis(100),
            "limits.header_read_timeout must be at least 100ms",
        );
        check.require(
            limits.body_read_timeout >= Duration::from_millis(100),
            "limits.body_read_timeout must be at least 100ms",
        );
        check.require(
            limits.body_write_timeout >= Duration::from_millis(100),
            "limits.body_write_timeout must be at least 100ms",
        );
        let tls = match (raw.tls.cert, raw.tls.key) {
            (Some(cert), Some(key)) => Some(TlsConfig {
                cert,
                key,
                client_ca: raw.tls.client_ca,
            }),
            (None, None) => {
                check.require(
                    raw.tls.client_ca.is_none(),
                    "tls.client_ca needs tls.cert and tls.key",
                );
                None
            }
            _ => {
                check
                    .problems
                    .push("tls.cert and tls.key must be set together".into());
                None
            }
        };
        let rl = &raw.rate_limit;
        let rate_limit = RateLimitConfig {
            per_key_per_second: rl.per_key_per_second.unwrap_or(1000),
            per_key_burst: check.positive("rate_limit.per_key_burst", rl.per_key_burst, 2000),
            per_address_per_second: rl.per_address_per_second.unwrap_or(1000),
            per_address_burst: check.positive(
                "rate_limit.per_address_burst",
                rl.per_address_burst,
                2000,
            ),
            auth_failures_per_minute: rl.auth_failures_per_minute.unwrap_or(10),
            auth_failures_burst: check.positive(
                "rate_limit.auth_failures_burst",
                rl.auth_failures_burst,
                20,
            ),
            max_tracked_addresses: check.positive(
                "rate_limit.max_tracked_addresses",
                rl.max_tracked_addresses,
                100_000,
            ),
        };
        let cors = CorsConfig {
            allowed_origins: raw.cors.allowed_origins.unwrap_or_default(),
            max_age: check.duration("cors.max_age", &raw.cors.max_age, "1h"),
        };
        for origin in &cors.allowed_origins {
            let valid = origin == "*"
                || ((origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin.ends_with('/')
                    && http::HeaderValue::from_str(origin).is_ok());
            check.require(
                valid,
                format!(
                    "cors.allowed_origins: {origin:?} is not an origin like \"https://app.example.com\" or \"*\""
                ),
            );
        }
        let retention = RetentionConfig {
            interval: check.duration("retention.interval", &raw.retention.interval, "60s"),
            changes_max_entries: check.positive(
                "retention.changes_max_entries",
                raw.retention.changes_max_entries,
                100_000,
            ),
            changes_max_age: check.duration(
                "retention.changes_max_age",
                &raw.retention.changes_max_age,
                "7days",
            ),
            results_max_age: check.duration(
                "retention.results_max_age",
                &raw.retention.results_max_age,
                "24h",
            ),
            get_cache_max_age: check.duration(
                "retention.get_cache_max_age",
                &raw.retention.get_cache_max_age,
                "7days",
            ),
            daemon_max_bytes: raw.retention.daemon_max_bytes.unwrap_or(1 << 30),
        };
        check.require(
            retention.interval >= Duration::from_millis(10),
            "retention.interval must be at least 10ms",
        );
        let mut paths = Vec::new();
        for pattern in raw
            .streams
            .paths
            .unwrap_or_else(|| vec!["approvals/*/context/stream".to_owned()])
        {
            let segments: Vec<String> = pattern
                .trim_matches('/')
                .split('/')
                .map(str::to_owned)
                .collect();
            if segments
                .iter()
                .any(|s| s.is_empty() || s == "." || s == "..")
            {
                check.problems.push(format!(
                    "streams.paths: {pattern:?} has an empty or dot segment"
                ));
            } else {
                paths.push(segments);
            }
        }
        let streams = StreamsConfig {
            paths,
            context_ttl: check.duration("streams.context_ttl", &raw.streams.context_ttl, "1h"),
            context_max_bytes: check.positive(
                "streams.context_max_bytes",
                raw.streams.context_max_bytes,
                1 << 30,
            ),
            context_max_size: check.positive(
                "streams.context_max_size",
                raw.streams.context_max_size,
                256 << 20,
            ),
            max_chunk_bytes: check.positive(
                "streams.max_chunk_bytes",
                raw.streams.max_chunk_bytes,
                1 << 20,
            ),
        };
        let store = store_backend(&mut check, raw.store);
        let cluster = raw
            .cluster
            .map(|raw| cluster_config(&mut check, raw, &store));
        if streams.max_chunk_bytes > MAX_CHUNK_BYTES {
            check.problems.push(format!(
                "streams.max_chunk_bytes must be at most {MAX_CHUNK_BYTES} (16 MiB)"
            ));
        }
        if check.problems.is_empty() {
            Ok(Config {
                store,
                console: ConsoleConfig {
                    enabled: raw.console.enabled.unwrap_or(true),
                },
                cluster,
                tls,
                rate_limit,
                cors,
                streams,
                server,
                sync,
                commands,
                changes,
                limits,
                retention,
            })
        } else {
            Err(check.problems)
        }
    }
}

/// Largest chunk a daemon may post: chunks are stored as one row or value each.
const MAX_CHUNK_BYTES: usize = 16 << 20;

/// `[store]`, checked; a `url_file` is read here, so a missing one is a config problem.
fn store_backend(check: &mut Checker, raw: RawStore) -> StoreBackend {
    let statement_timeout =
        check.duration("store.statement_timeout", &raw.statement_timeout, "30s");
    let pool_size = check.positive("store.pool_size", raw.pool_size, 16);
    match raw.backend.as_deref().unwrap_or("sled") {
        "sled" => {
            for (key, set) in [
                ("url", raw.url.is_some()),
                ("url_file", raw.url_file.is_some()),
            ] {
                check.require(
                    !set,
                    format!("store.{key} is only read with backend = \"postgres\""),
                );
            }
            StoreBackend::Sled
        }
        "postgres" => {
            let url = match (raw.url, raw.url_file) {
                (Some(url), None) => url,
                (None, Some(path)) => match std::fs::read_to_string(&path) {
                    Ok(text) => text.trim().to_owned(),
                    Err(err) => {
                        check
                            .problems
                            .push(format!("store.url_file {}: {err}", path.display()));
                        String::new()
                    }
                },
                _ => {
                    check.problems.push(
                        "backend = \"postgres\" needs exactly one of store.url and \
                         store.url_file"
                            .into(),
                    );
                    String::new()
                }
            };
            if !url.is_empty() && url.parse::<tokio_postgres::Config>().is_err() {
                check.problems.push(format!(
                    "store.url {} is not a PostgreSQL connection string",
                    crate::store::postgres::redacted(&url)
                ));
            }
            // Maintenance holds one connection while it asks for another.
            check.require(pool_size >= 2, "store.pool_size must be at least 2");
            StoreBackend::Postgres(crate::store::postgres::PgSettings {
                url,
                pool_size,
                statement_timeout,
                allow_unsafe_durability: raw.allow_unsafe_durability.unwrap_or(false),
                node: None,
            })
        }
        other => {
            check.problems.push(format!(
                "store.backend = {other:?}: use \"sled\" or \"postgres\""
            ));
            StoreBackend::Sled
        }
    }
}

/// `[cluster]`, checked: a node name, at least one NATS URL, PostgreSQL as the store.
fn cluster_config(check: &mut Checker, raw: RawCluster, store: &StoreBackend) -> ClusterConfig {
    check.require(
        matches!(store, StoreBackend::Postgres(_)),
        "[cluster] needs store.backend = \"postgres\": the nodes share one PostgreSQL \
         database, the system of record (a sled store belongs to one process)",
    );
    let node = raw.node.unwrap_or_default();
    check.require(
        (1..=64).contains(&node.len())
            && node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        format!(
            "cluster.node = {node:?}: name this node uniquely, 1 to 64 letters, digits, \
             '-' or '_'"
        ),
    );
    let nats_urls = raw.nats_urls.unwrap_or_default();
    check.require(
        !nats_urls.is_empty(),
        "cluster.nats_urls: list at least one NATS server, e.g. [\"nats://127.0.0.1:4222\"]",
    );
    for url in &nats_urls {
        if url.parse::<async_nats::ServerAddr>().is_err() {
            check.problems.push(format!(
                "cluster.nats_urls: {url:?} is not a NATS server address (nats://host:port)"
            ));
        }
    }
    check.require(
        raw.nats_credentials_file.is_none() || raw.nats_token_file.is_none(),
        "cluster: set at most one of nats_credentials_file and nats_token_file",
    );
    let nats_tls_client = match (raw.nats_tls_cert, raw.nats_tls_key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => {
            check
                .problems
                .push("cluster: nats_tls_cert and nats_tls_key go together".into());
            None
        }
    };
    let fallback_interval =
        check.duration("cluster.fallback_interval", &raw.fallback_interval, "1s");
    check.require(
        fallback_interval >= Duration::from_millis(100)
            && fallback_interval <= Duration::from_secs(60),
        "cluster.fallback_interval must be between 100ms and 60s",
    );
    ClusterConfig {
        node,
        nats_urls,
        nats_credentials_file: raw.nats_credentials_file,
        nats_token_file: raw.nats_token_file,
        nats_tls_ca: raw.nats_tls_ca,
        nats_tls_client,
        nats_tls_required: raw.nats_tls_required.unwrap_or(false),
        fallback_interval,
    }
}

impl Config {
    /// Where the store lives, for [`crate::store::Store::open`].
    pub fn store_settings(&self) -> crate::store::StoreSettings {
        match &self.store {
            StoreBackend::Sled => crate::store::StoreSettings::Sled(self.server.data_dir.clone()),
            StoreBackend::Postgres(pg) => {
                crate::store::StoreSettings::Postgres(crate::store::postgres::PgSettings {
                    node: self.cluster.as_ref().map(|cluster| cluster.node.clone()),
                    ..pg.clone()
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_off_loopback_is_a_serving_problem() {
        let check = |toml: &str| {
            Config::from_toml(toml, Path::new("t.toml"))
                .unwrap()
                .check_serving()
        };
        let refused = check("[server]\nlisten = \"0.0.0.0:8080\"\n").unwrap_err();
        assert!(refused.contains("insecure_plaintext"), "{refused}");
        check("[server]\nlisten = \"0.0.0.0:8080\"\ninsecure_plaintext = true\n").unwrap();
        check("[server]\nlisten = \"[::1]:8080\"\n").unwrap();
        // A command-line address goes in before the check.
        let mut raw =
            RawConfig::from_toml("[server]\nlisten = \"0.0.0.0:8080\"\n", Path::new("t.toml"))
                .unwrap();
        raw.server.listen = Some("127.0.0.1:0".into());
        let config = raw.validate(Path::new("t.toml")).unwrap();
        config.check_serving().unwrap();
    }

    #[test]
    fn shipped_config_parses_and_equals_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let shipped = Config::from_file(&path).expect("shipped config.toml is valid");
        let defaults = Config::defaults();
        assert_eq!(format!("{shipped:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn address_blocks() {
        let net = IpNet::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        let one = IpNet::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(IpNet::parse("fd00::/8")
            .unwrap()
            .contains("fd12::1".parse().unwrap()));
        assert!(IpNet::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(IpNet::parse("10.0.0.0/33").is_none());
        assert!(IpNet::parse("nonsense").is_none());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[sync]\npoll_timeout_mx = \"5s\"\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("poll_timeout_mx"), "{err}");
        assert!(err.contains("x.toml"), "{err}");
    }

    #[test]
    fn every_bad_value_is_reported() {
        let text = "[server]\nlisten = \"nowhere\"\n[sync]\nlease_duration = \"soon\"\n";
        let err = Config::from_toml(text, Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.listen"), "{err}");
        assert!(err.contains("sync.lease_duration"), "{err}");
    }
}
