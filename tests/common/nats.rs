//! A throwaway NATS cluster for the cluster tests: `nats-server` processes (Debian's
//! package) on free loopback ports, joined by routes on 127.0.0.1, core NATS only (no
//! JetStream), with a message limit ([`MAX_PAYLOAD`]) far below NATS's default so that
//! the tests' larger answers cross nodes in pieces. Each server can be killed (SIGKILL) and started again on its ports.
//! Readiness is awaited, not slept for: each server's monitoring endpoint (`/routez`)
//! reports its routes to all the others (the cluster tests then await a probe hint from
//! each relay node at every other one). Where `nats-server` is missing, [`NatsCluster::start`]
//! prints one `SKIPPED:` line and returns `None`, unless `SYNCRELAY_REQUIRE_ENGINES=1`.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `max_payload` of the test servers: 64 KiB (NATS's default is 1 MiB).
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// One server's ports and, while it runs, its process.
struct Server {
    client_port: u16,
    route_port: u16,
    monitor_port: u16,
    child: Option<Child>,
}

pub struct NatsCluster {
    bin: PathBuf,
    servers: Vec<Server>,
    /// The servers' log files.
    logs: tempfile::TempDir,
}

impl NatsCluster {
    /// `size` servers, started and routed to each other; `None` after a loud skip.
    pub async fn start(test: &str, size: usize) -> Option<NatsCluster> {
        let Some(bin) = binary() else {
            super::skip_or_fail(test, "nats-server not installed");
            return None;
        };
        // A port found free can be taken by another process before the server binds it:
        // then the server exits, and the cluster starts again on other ports.
        let mut failures = Vec::new();
        for _ in 0..3 {
            let servers = (0..size)
                .map(|_| Server {
                    client_port: free_port(),
                    route_port: free_port(),
                    monitor_port: free_port(),
                    child: None,
                })
                .collect();
            let logs = tempfile::tempdir().expect("a temp dir");
            let mut cluster = NatsCluster {
                bin: bin.clone(),
                servers,
                logs,
            };
            for index in 0..size {
                cluster.spawn(index);
            }
            let mut ready = Ok(());
            for index in 0..size {
                ready = ready.and(cluster.await_ready(index).await);
            }
            match ready {
                Ok(()) => return Some(cluster),
                Err(why) => failures.push(why),
            }
        }
        panic!("{test}: the NATS cluster did not start: {failures:#?}");
    }

    /// `nats://127.0.0.1:<port>` of server `index`.
    pub fn url(&self, index: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[index].client_port)
    }

    /// Every server's URL, as a TOML array.
    pub fn urls_toml(&self) -> String {
        let urls: Vec<String> = (0..self.servers.len())
            .map(|i| format!("\"{}\"", self.url(i)))
            .collect();
        format!("[{}]", urls.join(", "))
    }

    /// SIGKILLs server `index` (no goodbye to clients or routes).
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.servers[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts server `index` again on its ports and awaits its routes.
    pub async fn restart(&mut self, index: usize) {
        self.kill(index);
        self.spawn(index);
        if let Err(why) = self.await_ready(index).await {
            panic!("restarting nats-server {index}: {why}");
        }
    }

    fn spawn(&mut self, index: usize) {
        let routes: Vec<String> = self
            .servers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(_, s)| format!("nats://127.0.0.1:{}", s.route_port))
            .collect();
        let server = &self.servers[index];
        let config = self.logs.path().join("nats.conf");
        std::fs::write(&config, format!("max_payload: {MAX_PAYLOAD}\n")).unwrap();
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&config)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &server.client_port.to_string(),
                "-m",
                &server.monitor_port.to_string(),
                "-n",
                &format!("sr-test-{index}"),
                "--cluster_name",
                "sr-test",
                "--cluster",
                &format!("nats://127.0.0.1:{}", server.route_port),
                "--routes",
                &routes.join(","),
                "-l",
                &self.log(index).display().to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.servers[index].child = Some(child);
    }

    /// Awaits server `index` routed to every other server that runs (bounded by 15 s);
    /// why not, with the end of its log.
    async fn await_ready(&mut self, index: usize) -> Result<(), String> {
        let running = self.servers.iter().filter(|s| s.child.is_some()).count();
        let url = format!(
            "http://127.0.0.1:{}/routez",
            self.servers[index].monitor_port
        );
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let exited = self.servers[index]
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.servers[index].child = None;
                return Err(format!(
                    "nats-server {index} exited ({status}): {}",
                    self.log_tail(index)
                ));
            }
            if let Ok(response) = http.get(&url).send().await {
                if let Ok(body) = response.json::<serde_json::Value>().await {
                    // Routes are counted per remote server (pooled routes may add more).
                    if body["num_routes"].as_u64().unwrap_or(0) as usize >= running - 1 {
                        return Ok(());
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "nats-server {index} not routed to the {} others within 15 s: {}",
                    running - 1,
                    self.log_tail(index)
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self, index: usize) -> PathBuf {
        self.logs.path().join(format!("nats-{index}.log"))
    }

    fn log_tail(&self, index: usize) -> String {
        let text = std::fs::read_to_string(self.log(index)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for index in 0..self.servers.len() {
            self.kill(index);
        }
    }
}

/// `nats-server` from `PATH` or Debian's `/usr/sbin`.
fn binary() -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    });
    from_path.or_else(|| {
        let debian = PathBuf::from("/usr/sbin/nats-server");
        debian.is_file().then_some(debian)
    })
}

/// A port free on 127.0.0.1 a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}
