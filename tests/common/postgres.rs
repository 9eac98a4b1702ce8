//! A throwaway PostgreSQL cluster for tests and benchmarks: `initdb` into a temp dir, a
//! free loopback port, `pg_ctl start` with the durability settings the relay demands
//! (`fsync=on`, `synchronous_commit=on`), and `pg_ctl stop -m immediate` on drop. The
//! server listens on 127.0.0.1 and on a Unix socket in the temp dir only; the role
//! `syncrelay` is its superuser, with trust authentication: any local user of the machine
//! could connect while a test runs (fine on CI's and a developer's own machine).
//!
//! PostgreSQL refuses to run as root, so as root (CI) the cluster belongs to, and runs as,
//! the `postgres` user that Debian's package creates. The binaries are found in
//! `SYNCRELAY_PG_BIN`, then the newest `/usr/lib/postgresql/<version>/bin`, then `PATH`.
//! Where they are missing or older than 15, [`PgCluster::start`] prints one `SKIPPED:`
//! line and returns `None`, unless `SYNCRELAY_REQUIRE_ENGINES=1` (set by `.ci/run`, which
//! installs them). A test process killed outright (not a panic) leaves its server running:
//! `pg_ctl` detaches it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The role tests connect as.
pub const ROLE: &str = "syncrelay";

/// A running (or stopped, between [`PgCluster::stop_immediate`] and
/// [`PgCluster::start_again`]) throwaway cluster.
pub struct PgCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// The user the server runs as, when this process is root.
    run_as: Option<String>,
    pub port: u16,
}

impl PgCluster {
    /// A new cluster, started; `None` after a loud skip where PostgreSQL is not installed.
    pub fn start(test: &str) -> Option<PgCluster> {
        let Some(bin) = binaries() else {
            super::skip_or_fail(test, "PostgreSQL not installed (initdb, pg_ctl)");
            return None;
        };
        match major_version(&bin) {
            Some(major) if major >= 15 => {}
            found => {
                let why = format!("PostgreSQL 15 or newer not installed (found {found:?})");
                super::skip_or_fail(test, &why);
                return None;
            }
        }
        let run_as = is_root().then(|| "postgres".to_owned());
        let dir = tempfile::Builder::new()
            .prefix("syncrelay-pg-")
            .tempdir()
            .expect("a temp dir");
        if let Some(user) = &run_as {
            let chown = Command::new("chown")
                .args(["-R", &format!("{user}:"), &path_str(dir.path())])
                .output()
                .expect("chown runs");
            assert!(chown.status.success(), "chown: {}", text(&chown));
        }
        let mut cluster = PgCluster {
            bin,
            dir,
            run_as,
            port: 0,
        };
        let data = path_str(&cluster.data());
        let init = cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                ROLE,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ],
        );
        assert!(init.status.success(), "initdb: {}", text(&init));
        // A free port can be taken between our probe and the server's bind: try again.
        for attempt in 0.. {
            cluster.port = free_port();
            if cluster.pg_ctl_start() {
                return Some(cluster);
            }
            assert!(attempt < 3, "pg_ctl start failed: {}", cluster.log());
        }
        unreachable!()
    }

    /// `postgres://syncrelay@127.0.0.1:<port>/<database>`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{ROLE}@127.0.0.1:{}/{database}", self.port)
    }

    /// Stops the server the way a crash or power cut would (`-m immediate`: no checkpoint,
    /// the next start replays the WAL).
    pub fn stop_immediate(&self) {
        let data = path_str(&self.data());
        let stop = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        assert!(stop.status.success(), "pg_ctl stop: {}", text(&stop));
    }

    /// Starts the server again on the same port after [`PgCluster::stop_immediate`].
    pub fn start_again(&self) {
        assert!(self.pg_ctl_start(), "pg_ctl start: {}", self.log());
    }

    /// The server's log so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn pg_ctl_start(&self) -> bool {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={dir} \
             -c fsync=on -c synchronous_commit=on -c full_page_writes=on \
             -c max_connections=300 -c shared_buffers=64MB",
            port = self.port,
            dir = path_str(self.dir.path()),
        );
        let data = path_str(&self.data());
        let log = path_str(&self.dir.path().join("server.log"));
        let start = self.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60", "start",
            ],
        );
        start.status.success()
    }

    /// Runs one of the cluster's binaries, as the cluster's user.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        let program = path_str(&self.bin.join(program));
        let mut command = match &self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--", &program]);
                command
            }
            None => Command::new(&program),
        };
        command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|err| panic!("{program}: {err}"))
    }
}

/// The cluster the relays of one test process share ([`shared`]).
static SHARED: std::sync::OnceLock<Option<PgCluster>> = std::sync::OnceLock::new();

/// One cluster for the whole test process, started on first use (`None` after a loud
/// skip). A static is never dropped, so it is stopped and removed at process exit.
pub fn shared(test: &str) -> Option<&'static PgCluster> {
    SHARED
        .get_or_init(|| {
            let cluster = PgCluster::start(test)?;
            extern "C" fn stop_shared() {
                if let Some(Some(cluster)) = SHARED.get() {
                    cluster.stop_and_remove();
                }
            }
            // SAFETY: registers a plain `extern "C"` function; it runs once at exit.
            unsafe { libc::atexit(stop_shared) };
            Some(cluster)
        })
        .as_ref()
}

/// A fresh database on `cluster` for one relay.
pub async fn create_database(cluster: &PgCluster) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let name = format!(
        "relay{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let (client, connection) =
        tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls)
            .await
            .expect("connect to the test cluster");
    let connection = tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("CREATE DATABASE");
    drop(client);
    let _ = connection.await;
    name
}

impl PgCluster {
    /// Stops the server and deletes its files (the shared cluster, at exit).
    fn stop_and_remove(&self) {
        let data = path_str(&self.data());
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        let _ = std::fs::remove_dir_all(self.dir.path());
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = path_str(&self.data());
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }
}

/// The directory holding `initdb` and `pg_ctl`.
fn binaries() -> Option<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("SYNCRELAY_PG_BIN").map(PathBuf::from) {
        return has_tools(&dir).then_some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            has_tools(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|dir| has_tools(dir))
}

/// The major version of the server in `bin` (`postgres (PostgreSQL) 15.18` → 15).
fn major_version(bin: &Path) -> Option<u32> {
    let output = Command::new(bin.join("postgres"))
        .arg("--version")
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .last()?
        .split('.')
        .next()?
        .parse()
        .ok()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("a UTF-8 temp path").to_owned()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
