//! Shared helpers of the end-to-end tests: a relay on `127.0.0.1:0` (in-process, or as a
//! real child process for crash tests), keys made through the admin API, a `Daemon` that
//! speaks the sync protocol over real HTTP, and `eventually` for awaiting conditions
//! without fixed sleeps.
#![allow(dead_code)]

pub mod browser;
pub mod certs;
pub mod chaos;
pub mod crash_loop;
pub mod daemon;
pub mod lazyfs;
pub mod nats;
pub mod postgres;
pub mod proxy;

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use syncrelay::config::Config;
use syncrelay::relay::{Process, Relay};
use tokio::sync::oneshot;

/// With `SYNCRELAY_TEST_LOG=<filter>` (e.g. `syncrelay=debug`), the in-process relays and
/// agents of a test log to stderr: how to see what led up to a failure. Off by default.
pub fn test_log() {
    if let Ok(filter) = std::env::var("SYNCRELAY_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// Config overrides every test relay gets: quick retention so tests never wait on it.
const BASE_CONFIG: &str = "[retention]\ninterval = \"1h\"\n";

/// A relay served in-process on a loopback port, with its own data dir.
pub struct TestRelay {
    pub url: String,
    pub addr: std::net::SocketAddr,
    pub admin_token: String,
    pub data_dir: tempfile::TempDir,
    pub http: reqwest::Client,
    stop_tx: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestRelay {
    pub async fn start() -> TestRelay {
        Self::start_with("").await
    }

    /// Starts a relay whose config is the defaults plus `extra_toml`.
    pub async fn start_with(extra_toml: &str) -> TestRelay {
        let data_dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(data_dir, extra_toml).await
    }

    /// Starts a relay through the entry point `syncrelay serve` uses, on a free port. In
    /// a `pg_*` suite ([`on_postgres`]) its store is a PostgreSQL database of its own.
    pub async fn start_in(data_dir: tempfile::TempDir, extra_toml: &str) -> TestRelay {
        test_log();
        let base = format!("{BASE_CONFIG}{}", store_toml(data_dir.path()).await);
        let toml = merge_toml(&base, extra_toml, data_dir.path());
        let config = Config::from_toml(&toml, Path::new("test.toml")).expect("test config");
        let relay = Relay::start(config, Process::EMBEDDED)
            .await
            .expect("relay starts");
        let admin_token = std::fs::read_to_string(data_dir.path().join("admin.key"))
            .expect("admin.key")
            .trim()
            .to_owned();
        let addr = relay.local_addr();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(relay.serve(async move {
            let _ = stop_rx.await;
        }));
        TestRelay {
            url: format!("http://{addr}"),
            addr,
            admin_token,
            data_dir,
            http: reqwest::Client::new(),
            stop_tx: Some(stop_tx),
            task: Some(task),
        }
    }

    /// Shuts the relay down gracefully and returns its data dir for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.stop_tx.take().map(|tx| tx.send(()));
        if let Some(task) = self.task.take() {
            task.await.expect("relay task").expect("relay run");
        }
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.data_dir, dir)
    }

    /// One sample of `/metrics`: the value of `series` (`name` or `name{labels}`).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric_at(&self.http, &self.url, series).await
    }

    /// Creates a key through the admin API and returns its token.
    pub async fn key(&self, role: &str, daemon: Option<&str>, scope: Option<&[&str]>) -> String {
        let body = json!({ "role": role, "daemon": daemon, "scope": scope });
        create_key(&self.url, &self.admin_token, body).await
    }

    /// A daemon with its own key, connected.
    pub async fn daemon(&self, daemon_id: &str) -> Daemon {
        let key = self.key("daemon", Some(daemon_id), None).await;
        let mut daemon = Daemon::new(&self.url, daemon_id, &key);
        daemon.connect().await;
        daemon
    }

    /// A client key scoped to `scope`, as a ready client.
    pub async fn client(&self, scope: &[&str]) -> Client {
        let key = self.key("client", None, Some(scope)).await;
        Client {
            url: self.url.clone(),
            key,
            http: reqwest::Client::new(),
        }
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.stop_tx.take().map(|tx| tx.send(()));
    }
}

/// The `/metrics` text of the relay at `url`.
pub async fn metrics_text(http: &reqwest::Client, url: &str) -> String {
    http.get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// One sample of the `/metrics` of the relay at `url`: the value of `series`.
pub async fn metric_at(http: &reqwest::Client, url: &str, series: &str) -> Option<f64> {
    metrics_text(http, url)
        .await
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The file in a data dir that names the `[store]` its relay processes run on (tests
/// only; a relay ignores it).
pub const STORE_FILE: &str = "test-store.toml";

/// The `[store]` table [`RelayProcess`] runs a relay over `data_dir` with: the data dir's
/// [`STORE_FILE`], which a `pg_*` suite writes on first use (a database of its own in the
/// process's shared cluster); `None`: the shipped sled.
fn store_of(data_dir: &Path) -> Option<String> {
    let file = data_dir.join(STORE_FILE);
    if let Ok(store) = std::fs::read_to_string(&file) {
        return Some(store);
    }
    if !on_postgres() {
        return None;
    }
    let cluster = postgres::shared("end-to-end suite on PostgreSQL")?;
    // From any context, a runtime of its own for the one statement.
    let database = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime")
                    .block_on(postgres::create_database(cluster))
            })
            .join()
            .expect("create a database")
    });
    let store = postgres_store(&cluster.url(&database));
    std::fs::create_dir_all(data_dir).expect("data dir");
    std::fs::write(&file, &store).expect("write the store file");
    Some(store)
}

/// A `[store]` table for the database at `url`.
pub fn postgres_store(url: &str) -> String {
    format!("[store]\nbackend = \"postgres\"\nurl = \"{url}\"\npool_size = 8\n")
}

/// Whether this test binary runs its relays on PostgreSQL: the `pg_*` twins of the
/// end-to-end suites (`tests/pg_sync_protocol.rs`, …) do, the suites themselves on sled.
pub fn on_postgres() -> bool {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.file_name()?.to_string_lossy().starts_with("pg_")))
        .unwrap_or(false)
}

/// The `[store]` table of an in-process relay over `data_dir` (see [`store_of`]).
async fn store_toml(data_dir: &Path) -> String {
    store_of(data_dir).unwrap_or_default()
}

fn merge_toml(base: &str, extra: &str, data_dir: &Path) -> String {
    // Later tables win key by key: parse both and merge one level deep.
    let mut merged: toml::Table = toml::from_str(base).unwrap();
    let extra: toml::Table = toml::from_str(extra).expect("extra toml");
    for (section, values) in extra {
        let target = merged
            .entry(section)
            .or_insert_with(|| toml::Value::Table(Default::default()));
        if let (Some(target), toml::Value::Table(values)) = (target.as_table_mut(), values) {
            target.extend(values);
        }
    }
    let server = merged
        .entry("server")
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .unwrap();
    server.insert(
        "data_dir".into(),
        toml::Value::String(data_dir.display().to_string()),
    );
    server
        .entry("listen")
        .or_insert_with(|| toml::Value::String("127.0.0.1:0".into()));
    toml::to_string(&merged).unwrap()
}

/// A client of the client API.
#[derive(Clone)]
pub struct Client {
    pub url: String,
    pub key: String,
    pub http: reqwest::Client,
}

impl Client {
    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::GET, path)
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::POST, path)
    }

    /// `GET /api/v1/daemons/{daemon_id}`: the daemon as this client sees it.
    pub async fn daemon(&self, daemon_id: &str) -> Value {
        let response = self
            .get(&format!("/api/v1/daemons/{daemon_id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "GET of daemon {daemon_id}");
        response.json().await.unwrap()
    }

    /// Awaits the relay reporting the daemon online (bounded by 10 s).
    pub async fn await_online(&self, daemon_id: &str) {
        eventually(Duration::from_secs(10), || async move {
            self.daemon(daemon_id).await["online"] == true
        })
        .await;
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.key)
    }
}

/// A daemon speaking the sync protocol over real HTTP.
#[derive(Clone)]
pub struct Daemon {
    pub url: String,
    pub daemon_id: String,
    pub key: String,
    pub connection_id: Option<String>,
    pub last_update_seq: u64,
    pub http: reqwest::Client,
}

impl Daemon {
    pub fn new(url: &str, daemon_id: &str, key: &str) -> Daemon {
        Daemon {
            url: url.to_owned(),
            daemon_id: daemon_id.to_owned(),
            key: key.to_owned(),
            connection_id: None,
            last_update_seq: 0,
            http: reqwest::Client::new(),
        }
    }

    pub async fn post(&self, route: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}{route}", self.url))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await
            .expect("relay reachable");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn connect(&mut self) -> Value {
        let (status, body) = self
            .post(
                "/sync/connect",
                json!({ "daemon_id": self.daemon_id, "version": "1.0.0", "capabilities": ["sessions"] }),
            )
            .await;
        assert_eq!(status, 200, "connect: {body}");
        self.connection_id = body["connection_id"].as_str().map(str::to_owned);
        self.last_update_seq = body["last_update_seq"].as_u64().unwrap();
        body
    }

    /// One poll; returns status and body.
    pub async fn poll_raw(&self, updates: Value, wait: bool, timeout: f64) -> (u16, Value) {
        self.post(
            "/sync/poll",
            json!({
                "daemon_id": self.daemon_id,
                "connection_id": self.connection_id,
                "updates": updates,
                "wait_for_commands": wait,
                "timeout": timeout,
            }),
        )
        .await
    }

    /// Polls (waiting up to `timeout` s) and returns the commands.
    pub async fn poll(&self, timeout: f64) -> Vec<Value> {
        let (status, body) = self.poll_raw(json!([]), timeout > 0.0, timeout).await;
        assert_eq!(status, 200, "poll: {body}");
        body["commands"].as_array().cloned().unwrap_or_default()
    }

    /// Polls until at least one command arrives (bounded by 10 s).
    pub async fn next_commands(&self) -> Vec<Value> {
        for _ in 0..10 {
            let commands = self.poll(1.0).await;
            if !commands.is_empty() {
                return commands;
            }
        }
        panic!("no command reached daemon {}", self.daemon_id);
    }

    pub async fn results(&self, results: Value) -> Value {
        let (status, body) = self
            .post(
                "/sync/results",
                json!({ "daemon_id": self.daemon_id, "results": results }),
            )
            .await;
        assert_eq!(status, 200, "results: {body}");
        body
    }

    /// Answers an `http` command with a JSON body.
    pub async fn answer(&self, command_id: &str, status: u16, body: Value) -> Value {
        self.results(json!([{
            "command_id": command_id,
            "result": { "status": status, "headers": { "content-type": "application/json" }, "body": body },
        }]))
        .await
    }
}

/// Keeps a daemon online: a loop that polls and answers every `http` command with `answer`.
pub fn serve_daemon<F>(daemon: Daemon, answer: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(&Value) -> Value + Send + Sync + 'static,
{
    tokio::spawn(async move {
        loop {
            let (status, body) = daemon.poll_raw(json!([]), true, 5.0).await;
            if status != 200 {
                return;
            }
            let commands = body["commands"].as_array().cloned().unwrap_or_default();
            if commands.is_empty() {
                continue;
            }
            let results: Vec<Value> = commands
                .iter()
                .map(|c| json!({ "command_id": c["id"], "result": answer(c) }))
                .collect();
            daemon.results(Value::Array(results)).await;
        }
    })
}

/// Awaits `check` returning true, retrying every 20 ms for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates a key through a relay's admin API (`body` as for `POST /admin/keys`) and
/// returns its token.
pub async fn create_key(url: &str, admin_token: &str, body: Value) -> String {
    let response = reqwest::Client::new()
        .post(format!("{url}/admin/keys"))
        .bearer_auth(admin_token)
        .json(&body)
        .send()
        .await
        .expect("relay reachable");
    assert_eq!(response.status(), 201, "create key {body}");
    let created: Value = response.json().await.unwrap();
    created["token"].as_str().unwrap().to_owned()
}

/// The relay binary as a child process, for crash tests.
pub struct RelayProcess {
    pub child: Child,
    pub url: String,
    pub data_dir: PathBuf,
}

impl RelayProcess {
    /// Spawns `syncrelay serve` on a free loopback port over `data_dir`.
    pub fn spawn(data_dir: &Path) -> RelayProcess {
        Self::spawn_at(data_dir, "127.0.0.1:0")
    }

    /// Spawns `syncrelay serve` on `listen` (e.g. the port of a relay just killed, so that
    /// agents find it again at the same URL).
    pub fn spawn_at(data_dir: &Path, listen: &str) -> RelayProcess {
        Self::start(data_dir, listen, Stdio::inherit())
            .unwrap_or_else(|(_, stderr)| panic!("syncrelay did not start: {stderr}"))
    }

    /// Spawns `syncrelay serve` on `data_dir` expecting that it may refuse to start: the
    /// running relay, or its exit success and stderr.
    pub fn try_spawn(data_dir: &Path) -> Result<RelayProcess, (bool, String)> {
        Self::start(data_dir, "127.0.0.1:0", Stdio::piped())
    }

    /// Spawns `syncrelay serve` on a free loopback port over `data_dir`, with the shipped
    /// config plus `extra_toml` (written to `config`).
    pub fn spawn_with(data_dir: &Path, config: &Path, extra_toml: &str) -> RelayProcess {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let shipped = std::fs::read_to_string(shipped).expect("config.toml");
        std::fs::write(config, merge_toml(&shipped, extra_toml, data_dir)).expect("write config");
        Self::start_with(data_dir, "127.0.0.1:0", config, (Stdio::inherit(), "warn"))
            .unwrap_or_else(|(_, stderr)| panic!("syncrelay did not start: {stderr}"))
    }

    /// Spawns `syncrelay serve` over `data_dir` logging at `info` into the file `log`.
    pub fn spawn_logging(data_dir: &Path, log: &Path) -> RelayProcess {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let log = std::fs::File::create(log).expect("create the log file");
        Self::start_with(data_dir, "127.0.0.1:0", &shipped, (log.into(), "info"))
            .unwrap_or_else(|(_, stderr)| panic!("syncrelay did not start: {stderr}"))
    }

    fn start(data_dir: &Path, listen: &str, stderr: Stdio) -> Result<RelayProcess, (bool, String)> {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let config = match store_of(data_dir) {
            None => shipped,
            // The shipped config with the data dir's store, beside the data dir.
            Some(store) => {
                let text = std::fs::read_to_string(&shipped).expect("config.toml");
                let config = data_dir.join("test-config.toml");
                std::fs::write(&config, merge_toml(&text, &store, data_dir)).expect("write config");
                config
            }
        };
        Self::start_with(data_dir, listen, &config, (stderr, "warn"))
    }

    /// `(stderr, level)`: where the relay logs, and from which `RUST_LOG` level.
    fn start_with(
        data_dir: &Path,
        listen: &str,
        config: &Path,
        (stderr, level): (Stdio, &str),
    ) -> Result<RelayProcess, (bool, String)> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_syncrelay"))
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", level)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn syncrelay");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read the listening line");
        match line.trim().strip_prefix("syncrelay listening on ") {
            Some(url) => Ok(RelayProcess {
                url: url.to_owned(),
                child,
                data_dir: data_dir.to_owned(),
            }),
            None => {
                let out = child.wait_with_output().expect("reap");
                Err((
                    out.status.success(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                ))
            }
        }
    }

    /// Runs `syncrelay backup --to DIR` against this relay (its admin key from its data
    /// dir) and returns the CLI's output.
    pub async fn backup(&self, to: &Path) -> std::process::Output {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_syncrelay"))
            .args(["backup", "--url", &self.url, "--data-dir"])
            .arg(&self.data_dir)
            .arg("--to")
            .arg(to)
            .output()
            .await
            .unwrap()
    }

    /// Creates a key through the admin API (`body`: role, daemon, scope) with the admin
    /// key from the data dir, and returns its token.
    pub async fn create_key(&self, body: Value) -> String {
        create_key(&self.url, &self.admin_token(), body).await
    }

    /// A daemon key for `daemon_id` and a client key scoped to it.
    pub async fn daemon_and_client_keys(&self, daemon_id: &str) -> (String, String) {
        let daemon = json!({ "role": "daemon", "daemon": daemon_id });
        let client = json!({ "role": "client", "scope": [daemon_id] });
        (self.create_key(daemon).await, self.create_key(client).await)
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin.key"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An agent run in-process through the library, for a daemon at `target`.
pub struct TestAgent {
    pub state_dir: tempfile::TempDir,
    stop_tx: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<Result<(), syncrelay::agent::AgentError>>>,
}

impl TestAgent {
    /// Starts an agent; `extra` sets further `[agent]` fields (e.g. `concurrency`).
    pub fn start(
        relay_url: &str,
        daemon_id: &str,
        key: &str,
        target: &str,
        extra: syncrelay::agent::RawAgent,
    ) -> TestAgent {
        let state_dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(state_dir, relay_url, daemon_id, key, target, extra)
    }

    pub fn start_in(
        state_dir: tempfile::TempDir,
        relay_url: &str,
        daemon_id: &str,
        key: &str,
        target: &str,
        extra: syncrelay::agent::RawAgent,
    ) -> TestAgent {
        test_log();
        let raw = syncrelay::agent::RawAgent {
            // Several nodes' URLs separated by commas, as `--relay` takes them.
            relay: Some(syncrelay::agent::split_urls(relay_url)),
            daemon_id: Some(daemon_id.to_owned()),
            key: Some(key.to_owned()),
            target: Some(target.to_owned()),
            state_dir: Some(state_dir.path().to_owned()),
            ..extra
        };
        let config = raw.validate("test agent").expect("agent config");
        let agent = syncrelay::agent::Agent::for_http_target(config).expect("agent");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(agent.run(async move {
            let _ = stop_rx.await;
        }));
        TestAgent {
            state_dir,
            stop_tx: Some(stop_tx),
            task: Some(task),
        }
    }

    /// Stops the agent and returns its state dir.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.stop_tx.take().map(|tx| tx.send(()));
        if let Some(task) = self.task.take() {
            task.await.expect("agent task").expect("agent run");
        }
        std::mem::replace(&mut self.state_dir, tempfile::tempdir().unwrap())
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.stop_tx.take().map(|tx| tx.send(()));
    }
}

/// `syncrelay agent` as a child process, for crash tests.
pub struct AgentProcess {
    pub child: Child,
}

impl AgentProcess {
    pub fn spawn(
        relay_url: &str,
        daemon_id: &str,
        key: &str,
        target: &str,
        state_dir: &Path,
    ) -> AgentProcess {
        Self::spawn_syncing(relay_url, daemon_id, key, target, state_dir, "stream")
    }

    /// As [`AgentProcess::spawn`], with `--sync <sync>` (`stream` or `poll`).
    pub fn spawn_syncing(
        relay_url: &str,
        daemon_id: &str,
        key: &str,
        target: &str,
        state_dir: &Path,
        sync: &str,
    ) -> AgentProcess {
        // Synced, as an operator's provisioned key file is: it may sit on a LazyFS mount
        // that a power cut empties of everything not synced.
        let key_file = state_dir.with_extension("key");
        syncrelay::files::write_atomic(&key_file, key.as_bytes(), 0o600).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_syncrelay"))
            .args([
                "agent",
                "--relay",
                relay_url,
                "--daemon-id",
                daemon_id,
                "--target",
                target,
            ])
            .arg("--key-file")
            .arg(&key_file)
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--sync", sync])
            .env("RUST_LOG", "warn")
            .env_remove("SYNCRELAY_AGENT_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn syncrelay agent");
        AgentProcess { child }
    }

    /// SIGKILL.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response read in full (event streams: headers only, where a test says so).
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "status {}: body is not JSON ({err}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("UTF-8 body")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `X-Syncrelay-Source`, which every response carries.
    pub fn source(&self) -> &str {
        self.header("x-syncrelay-source").unwrap()
    }
}

/// A test that needs something this machine lacks: one loud `SKIPPED:` line and the
/// caller returns; under `SYNCRELAY_REQUIRE_ENGINES=1` (set by `.ci/run`, which installs
/// everything) a failure instead.
pub fn skip_or_fail(test: &str, why: &str) {
    if std::env::var("SYNCRELAY_REQUIRE_ENGINES").as_deref() == Ok("1") {
        panic!("{test}: {why} (SYNCRELAY_REQUIRE_ENGINES=1)");
    }
    eprintln!("SKIPPED: {test}: {why}");
}
