//! TLS on the real listener, spoken to by real TLS clients (reqwest/rustls and curl/OpenSSL):
//! ALPN `h2` and `http/1.1`, TLS 1.2 and 1.3, the certificate chain sent leaf first, no
//! plaintext HTTP on a TLS port, mutual TLS (a client certificate naming a daemon stands
//! for its daemon key; unverifiable certificates fail the handshake; keys keep working),
//! SIGHUP reloading the certificate while open connections continue (and a broken reload
//! keeping the old one), the handshake bounded by `header_read_timeout`, `init
//! --self-signed`, plaintext refused on a public address unless TLS is configured, and the
//! agent reaching a TLS relay with `relay_ca` and a client certificate instead of a key.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::certs::{Ca, Leaf};
use common::{eventually, RelayProcess, TestRelay};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The https base URL of a relay on `addr`, under the name its certificates carry.
fn base(addr: SocketAddr) -> String {
    format!("https://localhost:{}", addr.port())
}

/// A reqwest client builder that trusts exactly `roots` and resolves `localhost` to `addr`.
fn https(addr: SocketAddr, roots: &[&Ca]) -> reqwest::ClientBuilder {
    let mut builder = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .resolve("localhost", addr)
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60));
    for ca in roots {
        builder = builder.add_root_certificate(ca.reqwest_root());
    }
    builder
}

fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// The `[tls]` section for these files.
fn tls_section(cert: &Path, key: &Path, client_ca: Option<&Path>) -> String {
    let mut section = format!(
        "[tls]\ncert = {}\nkey = {}\n",
        toml_path(cert),
        toml_path(key)
    );
    if let Some(client_ca) = client_ca {
        section.push_str(&format!("client_ca = {}\n", toml_path(client_ca)));
    }
    section
}

/// A server CA, a server certificate from it, a client CA, and their files.
struct Pki {
    dir: tempfile::TempDir,
    server_ca: Ca,
    client_ca: Ca,
    cert: PathBuf,
    key: PathBuf,
    client_ca_file: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let server_ca = Ca::new("test server CA");
        let client_ca = Ca::new("test client CA");
        let (cert, key) = server_ca.server().write(dir.path(), "server");
        let client_ca_file = client_ca.write(dir.path(), "client-ca.pem");
        Pki {
            dir,
            server_ca,
            client_ca,
            cert,
            key,
            client_ca_file,
        }
    }

    /// `[tls]` without mutual TLS.
    fn tls(&self) -> String {
        tls_section(&self.cert, &self.key, None)
    }

    /// `[tls]` with `client_ca`.
    fn mtls(&self) -> String {
        tls_section(&self.cert, &self.key, Some(&self.client_ca_file))
    }

    /// A client trusting the server CA, optionally presenting `identity`.
    fn client(&self, addr: SocketAddr, identity: Option<&Leaf>) -> reqwest::Client {
        let mut builder = https(addr, &[&self.server_ca]);
        if let Some(identity) = identity {
            builder = builder.identity(identity.reqwest_identity());
        }
        builder.build().unwrap()
    }
}

/// Creates a key through the admin API over `http` and returns its token.
async fn create_key(http: &reqwest::Client, base: &str, admin: &str, body: Value) -> String {
    let response = http
        .post(format!("{base}/admin/keys"))
        .bearer_auth(admin)
        .json(&body)
        .send()
        .await
        .expect("relay reachable");
    assert_eq!(response.status(), 201, "create key {body}");
    let created: Value = response.json().await.unwrap();
    created["token"].as_str().unwrap().to_owned()
}

/// POSTs JSON, with a bearer token when given; status and body, or the transport error.
async fn post(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: &Value,
) -> reqwest::Result<(u16, Value)> {
    let mut request = http.post(url).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

fn connect_body(daemon_id: &str) -> Value {
    json!({ "daemon_id": daemon_id, "version": "1", "capabilities": [] })
}

/// GET /healthz over a fresh client: whether it answered 200.
async fn healthy(http: &reqwest::Client, base: &str) -> bool {
    matches!(
        http.get(format!("{base}/healthz")).send().await,
        Ok(response) if response.status() == 200
    )
}

/// The relay's count of failed TLS handshakes, from /metrics.
async fn handshake_failures(http: &reqwest::Client, base: &str) -> u64 {
    metric(http, base, "syncrelay_tls_handshake_failures_total").await
}

/// One value from /metrics.
async fn metric(http: &reqwest::Client, base: &str, name: &str) -> u64 {
    let response = http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200, "GET /metrics");
    let text = response.text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

/// Runs curl (bounded by `--max-time 20`) and returns its output.
async fn curl(args: &[&str]) -> std::process::Output {
    let run = tokio::process::Command::new("curl")
        .args(["--max-time", "20", "-sS"])
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("curl finished")
        .expect("curl runs (is it installed?)")
}

/// curl's `--resolve` argument pinning `localhost` to the relay.
fn curl_resolve(addr: SocketAddr) -> String {
    format!("localhost:{}:127.0.0.1", addr.port())
}

/// Reads from `stream` until EOF or a reset; returns what arrived. Panics after 10 s.
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the relay closed the connection within 10 s");
    received
}

// ---------------------------------------------------------------------------------------
// The real binary with a config file: its stdout's listening line and its log lines.

struct Served {
    relay: RelayProcess,
    addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Served {
    fn pid(&self) -> String {
        self.relay.child.id().to_string()
    }

    fn sighup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.pid()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP");
    }

    /// How many log lines so far contain `needle`.
    fn logged(&self, needle: &str) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// Awaits the `n`th log line containing `needle` (10 s at most).
    async fn await_logged(&self, needle: &str, n: usize) {
        let wait = async {
            while self.logged(needle) < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .is_err()
        {
            panic!(
                "no {n}th log line with {needle:?}; log: {:#?}",
                self.logs.lock().unwrap()
            );
        }
    }

    fn is_running(&mut self) -> bool {
        self.relay.child.try_wait().unwrap().is_none()
    }
}

/// Spawns `syncrelay serve --config CONFIG ARGS…` and waits (30 s at most) for its
/// listening line, which must say `scheme`.
fn serve(config: &Path, data_dir: &Path, args: &[&str], scheme: &str) -> Served {
    serve_in(data_dir.parent().unwrap(), config, data_dir, args, scheme)
}

/// [`serve`] with `cwd` as the working directory.
fn serve_in(cwd: &Path, config: &Path, data_dir: &Path, args: &[&str], scheme: &str) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_syncrelay"))
        .current_dir(cwd)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("SYNCRELAY_ADMIN_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn syncrelay serve");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let logs = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    // Owned by a RelayProcess at once, so that a failed start still kills the child.
    let mut relay = RelayProcess {
        child,
        url: String::new(),
        data_dir: data_dir.to_owned(),
    };
    let line = lines_rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|err| panic!("no listening line ({err}); log: {:?}", logs.lock().unwrap()));
    let url = line
        .trim()
        .strip_prefix("syncrelay listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    let addr = url
        .strip_prefix(&format!("{scheme}://"))
        .unwrap_or_else(|| panic!("listening line {line:?} should say {scheme}://"));
    let mut addr: SocketAddr = addr.parse().expect("listening address");
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Served {
        relay: {
            relay.url = url.to_owned();
            relay
        },
        addr,
        logs,
    }
}

/// Writes a config for the binary: loopback, `data_dir`, then `extra` sections.
fn write_config(dir: &Path, data_dir: &Path, listen: &str, extra: &str) -> PathBuf {
    let path = dir.join("relay.toml");
    let config = format!(
        "[server]\nlisten = {listen:?}\ndata_dir = {}\n\n{extra}",
        toml_path(data_dir)
    );
    std::fs::write(&path, config).unwrap();
    path
}

// ---------------------------------------------------------------------------------------
// ALPN, versions, chains, TLS only.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_negotiates_h2_and_http1_with_curl_and_reqwest() {
    let pki = Pki::new();
    let relay = TestRelay::start_with(&pki.tls()).await;
    let url = format!("{}/healthz", base(relay.addr));
    let ca_file = pki.server_ca.write(pki.dir.path(), "server-ca.pem");
    let ca_file = ca_file.to_str().unwrap();
    let resolve = curl_resolve(relay.addr);

    // `--no-alpn`: a client that offers no ALPN at all gets HTTP/1.1.
    for (flag, expected) in [("--http2", "2"), ("--http1.1", "1.1"), ("--no-alpn", "1.1")] {
        let output = curl(&[
            flag,
            "--cacert",
            ca_file,
            "--resolve",
            &resolve,
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            &url,
        ])
        .await;
        assert!(output.status.success(), "curl {flag}: {output:?}");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            format!("{expected} 200"),
            "curl {flag}"
        );
    }

    for (http1_only, expected) in [
        (false, reqwest::Version::HTTP_2),
        (true, reqwest::Version::HTTP_11),
    ] {
        let mut builder = https(relay.addr, &[&pki.server_ca]);
        if http1_only {
            builder = builder.http1_only();
        }
        let response = builder.build().unwrap().get(&url).send().await.unwrap();
        assert_eq!(response.version(), expected, "http1_only = {http1_only}");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.json::<Value>().await.unwrap(),
            json!({ "status": "ok" })
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_and_1_3_are_both_spoken() {
    let pki = Pki::new();
    let relay = TestRelay::start_with(&pki.tls()).await;
    let url = format!("{}/healthz", base(relay.addr));
    for version in [
        reqwest::tls::Version::TLS_1_2,
        reqwest::tls::Version::TLS_1_3,
    ] {
        let http = https(relay.addr, &[&pki.server_ca])
            .min_tls_version(version)
            .max_tls_version(version)
            .build()
            .unwrap();
        let response = http.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200, "{version:?}");
        assert_eq!(response.version(), reqwest::Version::HTTP_2, "{version:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cert_file_chain_is_sent_leaf_first() {
    let dir = tempfile::tempdir().unwrap();
    let root = Ca::new("root CA");
    let leaf = root.server_via_intermediate("intermediate CA");
    let (cert, key) = leaf.write(dir.path(), "chained");
    let relay = TestRelay::start_with(&tls_section(&cert, &key, None)).await;
    // The client knows only the root: the relay must send the intermediate too.
    let http = https(relay.addr, &[&root]).build().unwrap();
    assert!(healthy(&http, &base(relay.addr)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_http_to_the_tls_port_gets_no_http_answer() {
    let pki = Pki::new();
    let relay = TestRelay::start_with(&pki.tls()).await;

    let mut tcp = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let received = read_until_closed(&mut tcp).await;
    assert!(
        !received.starts_with(b"HTTP/"),
        "a TLS port must not answer plaintext HTTP: {:?}",
        String::from_utf8_lossy(&received)
    );

    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(format!("http://{}/healthz", relay.addr))
        .send()
        .await;
    assert!(plain.is_err(), "plaintext request answered: {plain:?}");

    // Prior-knowledge h2c is not served either.
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(format!("http://{}/healthz", relay.addr))
        .send()
        .await;
    assert!(h2c.is_err(), "h2c request answered: {h2c:?}");

    // The port still serves TLS.
    let http = https(relay.addr, &[&pki.server_ca]).build().unwrap();
    assert!(healthy(&http, &base(relay.addr)).await);
}

// ---------------------------------------------------------------------------------------
// Mutual TLS.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_authenticates_its_daemon() {
    let pki = Pki::new();
    let relay = TestRelay::start_with(&pki.mtls()).await;
    let url = base(relay.addr);
    let cert_d = pki.client_ca.client("d");

    for http1_only in [false, true] {
        let mut builder = https(relay.addr, &[&pki.server_ca]).identity(cert_d.reqwest_identity());
        if http1_only {
            builder = builder.http1_only();
        }
        let http = builder.build().unwrap();

        // No Authorization header: the certificate is the daemon key of "d".
        let response = http
            .post(format!("{url}/sync/connect"))
            .json(&connect_body("d"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.version(),
            if http1_only {
                reqwest::Version::HTTP_11
            } else {
                reqwest::Version::HTTP_2
            }
        );
        assert_eq!(response.status(), 200, "connect as d by certificate");
        let connected: Value = response.json().await.unwrap();
        let connection_id = connected["connection_id"].clone();
        assert!(connection_id.is_string(), "{connected}");

        // It polls as "d" too.
        let (status, polled) = post(
            &http,
            &format!("{url}/sync/poll"),
            None,
            &json!({ "daemon_id": "d", "connection_id": connection_id, "wait_for_commands": false, "timeout": 0, "updates": [] }),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{polled}");
        assert_eq!(polled["commands"], json!([]));

        // The same certificate cannot act as another daemon…
        let (status, body) = post(
            &http,
            &format!("{url}/sync/connect"),
            None,
            &connect_body("e"),
        )
        .await
        .unwrap();
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"]["code"], "forbidden");

        // …nor use the client or admin API.
        for route in ["/api/v1/daemons", "/admin/keys"] {
            let response = http.get(format!("{url}{route}")).send().await.unwrap();
            assert_eq!(response.status(), 403, "{route}");
        }
    }

    // A certificate from an intermediate of the client CA, sent with its chain.
    let chained = pki.client(
        relay.addr,
        Some(&pki.client_ca.client_via_intermediate("d")),
    );
    let (status, body) = post(
        &chained,
        &format!("{url}/sync/connect"),
        None,
        &connect_body("d"),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");

    // curl (OpenSSL) presenting the certificate gets the same.
    let dir = pki.dir.path();
    let (cert_file, key_file) = cert_d.write(dir, "client-d");
    let ca_file = pki.server_ca.write(dir, "server-ca.pem");
    let resolve = curl_resolve(relay.addr);
    let connect = connect_body("d").to_string();
    let output = curl(&[
        "--cacert",
        ca_file.to_str().unwrap(),
        "--cert",
        cert_file.to_str().unwrap(),
        "--key",
        key_file.to_str().unwrap(),
        "--resolve",
        &resolve,
        "-H",
        "content-type: application/json",
        "-d",
        &connect,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{url}/sync/connect"),
    ])
    .await;
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_key_takes_precedence_over_the_certificate() {
    let pki = Pki::new();
    let relay = TestRelay::start_with(&pki.mtls()).await;
    let url = base(relay.addr);
    let admin_http = pki.client(relay.addr, None);
    let key_e = create_key(
        &admin_http,
        &url,
        &relay.admin_token,
        json!({ "role": "daemon", "daemon": "e" }),
    )
    .await;
    let http = pki.client(relay.addr, Some(&pki.client_ca.client("d")));
    let connect = format!("{url}/sync/connect");

    // The key acts as "e", not the certificate's "d".
    let (status, body) = post(&http, &connect, Some(&key_e), &connect_body("e"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(&http, &connect, Some(&key_e), &connect_body("d"))
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    // An invalid key is not rescued by the certificate.
    let (status, body) = post(&http, &connect, Some("srk_nope_nope"), &connect_body("d"))
        .await
        .unwrap();
    assert_eq!(status, 401, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unverifiable_client_certificates_fail_and_keys_still_work() {
    let pki = Pki::new();
    let relay = TestRelay::start_with(&pki.mtls()).await;
    let url = base(relay.addr);
    let connect = format!("{url}/sync/connect");
    let plain = pki.client(relay.addr, None);
    let failures_before = handshake_failures(&plain, &url).await;

    // Signed by a CA the relay does not know.
    let stranger = Ca::new("unknown CA").client("d");
    let result = post(
        &pki.client(relay.addr, Some(&stranger)),
        &connect,
        None,
        &connect_body("d"),
    )
    .await;
    assert!(
        result.is_err(),
        "a certificate from an unknown CA must fail: {result:?}"
    );

    // Signed by the client CA but expired.
    let expired = pki.client_ca.expired_client("d");
    let result = post(
        &pki.client(relay.addr, Some(&expired)),
        &connect,
        None,
        &connect_body("d"),
    )
    .await;
    assert!(
        result.is_err(),
        "an expired certificate must fail: {result:?}"
    );

    // Both failed in the handshake, on the relay's side.
    eventually(Duration::from_secs(10), || {
        let (plain, url) = (plain.clone(), url.clone());
        async move { handshake_failures(&plain, &url).await >= failures_before + 2 }
    })
    .await;

    // Without a certificate, keys work as before.
    let key_d = create_key(
        &plain,
        &url,
        &relay.admin_token,
        json!({ "role": "daemon", "daemon": "d" }),
    )
    .await;
    let (status, body) = post(&plain, &connect, Some(&key_d), &connect_body("d"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(&plain, &connect, None, &connect_body("d"))
        .await
        .unwrap();
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");

    // A verified certificate whose CN is not a daemon id authenticates nobody.
    let odd = pki.client(relay.addr, Some(&pki.client_ca.client("not a daemon/id")));
    let (status, body) = post(&odd, &connect, None, &connect_body("d"))
        .await
        .unwrap();
    assert_eq!(status, 401, "{body}");
}

/// An mTLS relay allowing 3 failed authentications per address, with a daemon key for
/// "d": returns the relay, its base URL and the key.
async fn strict_mtls_relay(pki: &Pki) -> (TestRelay, String, String) {
    let relay = TestRelay::start_with(&format!(
        "{}\n[rate_limit]\nauth_failures_per_minute = 1\nauth_failures_burst = 3\n",
        pki.mtls()
    ))
    .await;
    let url = base(relay.addr);
    let key_d = create_key(
        &pki.client(relay.addr, None),
        &url,
        &relay.admin_token,
        json!({ "role": "daemon", "daemon": "d" }),
    )
    .await;
    (relay, url, key_d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_client_certificates_count_as_failed_authentications() {
    let pki = Pki::new();
    let (relay, url, key_d) = strict_mtls_relay(&pki).await;
    let connect = format!("{url}/sync/connect");
    let stranger = Ca::new("unknown CA").client("d");
    for _ in 0..5 {
        let refused = post(
            &pki.client(relay.addr, Some(&stranger)),
            &connect,
            None,
            &connect_body("d"),
        )
        .await;
        assert!(refused.is_err(), "{refused:?}");
    }
    // Past the budget, the address gets no TLS handshake at all: its new connections are
    // closed before the relay sends a byte. A handshake costs the relay far more CPU than
    // a 429 would, so a blocked attacker gets nothing to spend it on (a plaintext listener
    // answers 429 with Retry-After instead; README, "Limits").
    let fresh = pki.client(relay.addr, None);
    let refused = post(&fresh, &connect, Some(&key_d), &connect_body("d")).await;
    assert!(
        refused.is_err(),
        "no handshake for a blocked address: {refused:?}"
    );
    let mut raw = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    // The start of a ClientHello: the relay must not answer it.
    let _ = raw.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0x01]).await;
    let mut answer = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), raw.read(&mut answer))
        .await
        .expect("the relay closes a blocked address's connection at once");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "a blocked address got bytes: {:?}",
        read.map(|n| answer[..n].to_vec())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_clients_rejecting_the_server_certificate_do_not_block_the_address() {
    let pki = Pki::new();
    let (relay, url, key_d) = strict_mtls_relay(&pki).await;
    // Watches /metrics from another loopback address, which nothing here counts against.
    let observer = https(relay.addr, &[&pki.server_ca])
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    // Every connection below ends as a failed handshake, or is refused as rate limited.
    let settled = |observer: reqwest::Client, url: String| async move {
        handshake_failures(&observer, &url).await
            + metric(&observer, &url, "syncrelay_rate_limited_total").await
    };
    let before = settled(observer.clone(), url.clone()).await;

    // TCP health probes: connect and close without a byte.
    for _ in 0..5 {
        drop(tokio::net::TcpStream::connect(relay.addr).await.unwrap());
    }
    // Clients that do not trust the relay's certificate (e.g. a stale CA bundle while the
    // certificate is rotated) and abort the handshake.
    let mistrusting = https(relay.addr, &[&Ca::new("some other CA")])
        .build()
        .unwrap();
    for _ in 0..5 {
        assert!(!healthy(&mistrusting, &url).await);
    }
    eventually(Duration::from_secs(10), || {
        let settled = settled(observer.clone(), url.clone());
        async move { settled.await >= before + 10 }
    })
    .await;

    // None of them presented a credential: a client at the same address still gets in.
    let fresh = pki.client(relay.addr, None);
    let result = post(
        &fresh,
        &format!("{url}/sync/connect"),
        Some(&key_d),
        &connect_body("d"),
    )
    .await;
    assert!(
        matches!(result, Ok((200, _))),
        "a valid key from this address was refused: {result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_client_ca_a_certificate_authenticates_nobody() {
    let pki = Pki::new();
    let relay = TestRelay::start_with(&pki.tls()).await;
    let http = pki.client(relay.addr, Some(&pki.client_ca.client("d")));
    let (status, body) = post(
        &http,
        &format!("{}/sync/connect", base(relay.addr)),
        None,
        &connect_body("d"),
    )
    .await
    .unwrap();
    assert_eq!(status, 401, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reaches_the_relay_over_tls_with_only_its_client_certificate() {
    let pki = Pki::new();
    let relay = TestRelay::start_with(&pki.mtls()).await;
    let daemon = common::daemon::TestDaemon::start().await;
    let dir = pki.dir.path();
    let (cert, key) = pki.client_ca.client("d").write(dir, "agent");
    let raw = syncrelay::agent::RawAgent {
        relay: Some(vec![format!("https://127.0.0.1:{}", relay.addr.port())]),
        daemon_id: Some("d".into()),
        target: Some(daemon.target.clone()),
        events: Some(String::new()),
        state_dir: Some(dir.join("agent-state")),
        relay_ca: Some(pki.server_ca.write(dir, "server-ca.pem")),
        client_cert: Some(cert),
        client_key: Some(key),
        ..Default::default()
    };
    let agent = syncrelay::agent::Agent::for_http_target(raw.validate("tls agent").unwrap())
        .expect("agent");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(agent.run(async move {
        let _ = stop_rx.await;
    }));

    let http = pki.client(relay.addr, None);
    let url = base(relay.addr);
    let client_key = create_key(
        &http,
        &url,
        &relay.admin_token,
        json!({ "role": "client", "scope": ["d"] }),
    )
    .await;
    // The daemon exists once its certificate connected it (no key registered it).
    eventually(Duration::from_secs(10), || {
        let request = http
            .get(format!("{url}/api/v1/daemons/d"))
            .bearer_auth(&client_key);
        async move {
            let Ok(response) = request.send().await else {
                return false;
            };
            response
                .json::<Value>()
                .await
                .is_ok_and(|body| body["online"] == true)
        }
    })
    .await;
    let response = http
        .get(format!("{url}/api/v1/daemons/d/echo/x?y=1"))
        .bearer_auth(&client_key)
        .header("prefer", "wait=20")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-syncrelay-source"], "daemon");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["path"], "/api/v1/echo/x");

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .expect("the agent stops")
        .unwrap()
        .expect("the agent ran without a key");
}

// ---------------------------------------------------------------------------------------
// SIGHUP reloads (the real binary).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_open_connections_survive() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (ca1, ca2) = (Ca::new("CA one"), Ca::new("CA two"));
    let (client_ca1, client_ca2) = (Ca::new("client CA one"), Ca::new("client CA two"));
    let (cert, key) = ca1.server().write(dir.path(), "server");
    let client_ca_file = client_ca1.write(dir.path(), "client-ca.pem");
    let config = write_config(
        dir.path(),
        &data_dir,
        "127.0.0.1:0",
        &tls_section(&cert, &key, Some(&client_ca_file)),
    );
    let mut served = serve(&config, &data_dir, &[], "https");
    let url = base(served.addr);
    let both = https(served.addr, &[&ca1, &ca2]).build().unwrap();
    let admin = served.relay.admin_token();
    let daemon_key = create_key(
        &both,
        &url,
        &admin,
        json!({ "role": "daemon", "daemon": "d" }),
    )
    .await;
    let client_key = create_key(
        &both,
        &url,
        &admin,
        json!({ "role": "client", "scope": ["d"] }),
    )
    .await;
    let addr = served.addr;
    let only = |ca: &Ca| https(addr, &[ca]).build().unwrap();
    assert!(healthy(&only(&ca1), &url).await, "cert A is served");
    assert!(
        !healthy(&only(&ca2), &url).await,
        "cert B is not served yet"
    );

    // A long poll on a connection opened with cert A. Its daemon is online once it waits.
    let poll = tokio::spawn({
        let (both, url, key) = (both.clone(), url.clone(), daemon_key.clone());
        async move {
            post(
                &both,
                &format!("{url}/sync/poll"),
                Some(&key),
                &json!({ "daemon_id": "d", "wait_for_commands": true, "timeout": 20, "updates": [] }),
            )
            .await
        }
    });
    eventually(Duration::from_secs(10), || {
        let (both, url, key) = (both.clone(), url.clone(), client_key.clone());
        async move {
            let body: Value = both
                .get(format!("{url}/api/v1/daemons/d"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            body["online"] == true
        }
    })
    .await;

    // A daemon authenticated by a certificate from the first client CA, on a connection
    // the client keeps open.
    let by_cert = https(served.addr, &[&ca1, &ca2])
        .identity(client_ca1.client("c").reqwest_identity())
        .build()
        .unwrap();
    let (status, body) = post(
        &by_cert,
        &format!("{url}/sync/connect"),
        None,
        &connect_body("c"),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");

    // Swap in cert B (from CA2) and a new client CA, then SIGHUP.
    ca2.server().write(dir.path(), "server");
    client_ca2.write(dir.path(), "client-ca.pem");
    served.sighup();
    eventually(Duration::from_secs(10), || {
        let http = only(&ca2);
        let url = url.clone();
        async move { healthy(&http, &url).await }
    })
    .await;
    assert!(
        !healthy(&only(&ca1), &url).await,
        "cert A is no longer served"
    );
    assert!(served.is_running());

    // The certificate from the rotated-out client CA is cut off on its open connection:
    // an answer at all shows the connection is the old one (a new handshake would fail).
    let (status, body) = post(
        &by_cert,
        &format!("{url}/sync/connect"),
        None,
        &connect_body("c"),
    )
    .await
    .expect("the connection opened before the reload is still open");
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");

    // The client CA was re-read too: certificates from the new one authenticate.
    let by_new_ca = https(served.addr, &[&ca2])
        .identity(client_ca2.client("d2").reqwest_identity())
        .build()
        .unwrap();
    let (status, body) = post(
        &by_new_ca,
        &format!("{url}/sync/connect"),
        None,
        &connect_body("d2"),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let by_old_ca = https(served.addr, &[&ca2])
        .identity(client_ca1.client("d2").reqwest_identity())
        .build()
        .unwrap();
    assert!(
        post(
            &by_old_ca,
            &format!("{url}/sync/connect"),
            None,
            &connect_body("d2")
        )
        .await
        .is_err(),
        "the old client CA is no longer trusted"
    );

    // The poll waiting on the old connection still completes normally.
    assert!(!poll.is_finished(), "the long poll still waits");
    let queued = only(&ca2)
        .post(format!("{url}/api/v1/daemons/d/things"))
        .bearer_auth(&client_key)
        .header("prefer", "respond-async")
        .json(&json!({ "n": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(queued.status(), 202);
    let command_id = queued.json::<Value>().await.unwrap()["id"].clone();
    let (status, polled) = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("the long poll was answered")
        .unwrap()
        .expect("the connection opened before the reload survived it");
    assert_eq!(status, 200, "{polled}");
    assert_eq!(polled["commands"][0]["id"], command_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reload_keeps_the_old_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (ca1, ca2, ca3) = (Ca::new("CA one"), Ca::new("CA two"), Ca::new("CA three"));
    let (cert, key) = ca1.server().write(dir.path(), "server");
    let config = write_config(
        dir.path(),
        &data_dir,
        "127.0.0.1:0",
        &tls_section(&cert, &key, None),
    );
    let mut served = serve(&config, &data_dir, &[], "https");
    let url = base(served.addr);
    let addr = served.addr;
    let only = |ca: &Ca| https(addr, &[ca]).build().unwrap();
    assert!(healthy(&only(&ca1), &url).await);
    const FAILED: &str = "TLS reload failed";

    // A cert file that is not PEM.
    std::fs::write(&cert, "this is not a certificate\n").unwrap();
    served.sighup();
    served.await_logged(FAILED, 1).await;
    assert!(
        served.is_running(),
        "a failed reload must not stop the relay"
    );
    assert!(
        healthy(&only(&ca1), &url).await,
        "the old cert is still served"
    );

    // A valid cert with the old key: not a pair.
    let other = ca2.server();
    std::fs::write(&cert, other.full_chain_pem()).unwrap();
    served.sighup();
    served.await_logged(FAILED, 2).await;
    assert!(
        healthy(&only(&ca1), &url).await,
        "the old cert is still served"
    );
    assert!(!healthy(&only(&ca2), &url).await);

    // An empty key file.
    std::fs::write(&key, "").unwrap();
    served.sighup();
    served.await_logged(FAILED, 3).await;
    assert!(healthy(&only(&ca1), &url).await);

    // Reloads keep working after failures.
    let reloaded = served.logged("TLS certificate and key reloaded");
    ca3.server().write(dir.path(), "server");
    served.sighup();
    served
        .await_logged("TLS certificate and key reloaded", reloaded + 1)
        .await;
    eventually(Duration::from_secs(10), || {
        let http = only(&ca3);
        let url = url.clone();
        async move { healthy(&http, &url).await }
    })
    .await;
    assert!(served.is_running());

    // SIGTERM still shuts a TLS relay down cleanly.
    let status = Command::new("kill")
        .args(["-TERM", &served.pid()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut child = served;
    let exit = tokio::task::spawn_blocking(move || child.relay.child.wait().unwrap());
    let exit = tokio::time::timeout(Duration::from_secs(20), exit)
        .await
        .expect("the relay exits after SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_right_after_the_listening_line_reloads_instead_of_killing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("race CA");
    let (cert, key) = ca.server().write(dir.path(), "server");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let data_dir = dir.path().join("data");
    let config = write_config(
        dir.path(),
        &data_dir,
        "127.0.0.1:0",
        &tls_section(&cert, &key, None),
    );
    // bash's builtin `kill` signals as quickly as a supervisor reacting to the line would
    // (a forked /bin/kill is too slow to hit the window). The relay must survive the
    // SIGHUP and answer over TLS.
    let script = r#"
        for attempt in 1 2 3 4 5; do
            rm -rf "$DATA"
            coproc RELAY { exec "$BIN" serve --config "$CONFIG" 2>/dev/null; }
            pid=$RELAY_PID
            read -r line <&"${RELAY[0]}" || { echo "no listening line"; exit 1; }
            kill -HUP "$pid"
            port=${line##*:}
            if ! curl -sS --max-time 10 --cacert "$CA" --resolve "localhost:$port:127.0.0.1"                     -o /dev/null "https://localhost:$port/healthz"; then
                echo "attempt $attempt: the relay died of the SIGHUP sent after: $line"
                exit 1
            fi
            kill -TERM "$pid"
            wait "$pid"
        done
        echo survived
    "#;
    let run = tokio::process::Command::new("bash")
        .args(["-c", script])
        .env("BIN", env!("CARGO_BIN_EXE_syncrelay"))
        .env("CONFIG", &config)
        .env("DATA", &data_dir)
        .env("CA", &ca_file)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the script finished")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("survived"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

// ---------------------------------------------------------------------------------------
// Handshake timeout.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_handshakes_are_closed_after_header_read_timeout() {
    let pki = Pki::new();
    let relay = TestRelay::start_with(&format!(
        "{}\n[limits]\nheader_read_timeout = \"1s\"\n",
        pki.tls()
    ))
    .await;

    // Nothing at all.
    let started = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let received = read_until_closed(&mut silent).await;
    assert!(received.is_empty(), "{received:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "closed before the timeout: {:?}",
        started.elapsed()
    );

    // Half a ClientHello: a handshake record announcing 512 bytes, of which a few arrive.
    let started = Instant::now();
    let mut half = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    half.write_all(&[
        0x16, 0x03, 0x01, 0x02, 0x00, // handshake record, 512 bytes
        0x01, 0x00, 0x01, 0xfc, // ClientHello, 508 bytes
        0x03, 0x03, 0x00, 0x01, 0x02, 0x03,
    ])
    .await
    .unwrap();
    read_until_closed(&mut half).await;
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "closed before the timeout: {:?}",
        started.elapsed()
    );

    // A real client still gets through, and /metrics counts the two stalls.
    let http = pki.client(relay.addr, None);
    let url = base(relay.addr);
    assert!(healthy(&http, &url).await);
    eventually(Duration::from_secs(10), || {
        let (http, url) = (http.clone(), url.clone());
        async move { handshake_failures(&http, &url).await >= 2 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_a_stalled_tls_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let ca = Ca::new("shutdown CA");
    let (cert, key) = ca.server().write(dir.path(), "server");
    // The first line still belongs to [server]: a long grace and a long handshake limit.
    let extra = format!(
        "shutdown_grace = \"30s\"\n\n[limits]\nheader_read_timeout = \"30s\"\n\n{}",
        tls_section(&cert, &key, None)
    );
    let config = write_config(dir.path(), &data_dir, "127.0.0.1:0", &extra);
    let mut served = serve(&config, &data_dir, &[], "https");
    let url = base(served.addr);
    let http = https(served.addr, &[&ca]).build().unwrap();
    // This client's one (pooled) connection is counted; then the silent one must be too.
    let accepted = metric(&http, &url, "syncrelay_connections_accepted_total").await;
    let _silent = tokio::net::TcpStream::connect(served.addr).await.unwrap();
    eventually(Duration::from_secs(10), || {
        let (http, url) = (http.clone(), url.clone());
        async move { metric(&http, &url, "syncrelay_connections_accepted_total").await > accepted }
    })
    .await;
    drop(http);

    let started = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &served.pid()])
        .status()
        .unwrap();
    assert!(status.success());
    let exited = eventually(Duration::from_secs(10), || {
        let running = served.is_running();
        async move { !running }
    });
    exited.await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited {:?} for a connection that never said anything",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// The CLI: init --self-signed, plaintext refusal.

/// `syncrelay init --self-signed HOST --listen 127.0.0.1:0` into a fresh `relay/`
/// directory; returns the temp dir and that directory.
fn init_self_signed(host: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let setup = dir.path().join("relay");
    let output = Command::new(env!("CARGO_BIN_EXE_syncrelay"))
        .args(["init", "--self-signed", host, "--listen", "127.0.0.1:0"])
        .arg("--dir")
        .arg(&setup)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    (dir, setup)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_self_signed_then_serve_speaks_https_with_h2() {
    let (_dir, setup) = init_self_signed("localhost");
    let (cert, key, config) = (
        setup.join("cert.pem"),
        setup.join("key.pem"),
        setup.join("config.toml"),
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "key.pem is private");
    let written = std::fs::read_to_string(&config).unwrap();
    assert!(
        written.contains(&toml_path(&cert.canonicalize().unwrap())),
        "absolute cert path: {written}"
    );

    // Served from another working directory: the config's paths are absolute.
    let elsewhere = tempfile::tempdir().unwrap();
    let served = serve_in(elsewhere.path(), &config, &setup.join("data"), &[], "https");
    let url = base(served.addr);

    let resolve = curl_resolve(served.addr);
    let output = curl(&[
        "--http2",
        "--cacert",
        cert.to_str().unwrap(),
        "--resolve",
        &resolve,
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{http_code}",
        &format!("{url}/healthz"),
    ])
    .await;
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "2 200");

    let pem = std::fs::read(&cert).unwrap();
    let http = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .resolve("localhost", served.addr)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let response = http.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);

    // The admin CLI reaches the relay over HTTPS with the same config.
    let created = Command::new(env!("CARGO_BIN_EXE_syncrelay"))
        .args(["keys", "create", "--role", "client", "--scope", "*"])
        .arg("--config")
        .arg(&config)
        .args(["--url", &url])
        .env_remove("SYNCRELAY_ADMIN_KEY")
        .output()
        .unwrap();
    assert!(created.status.success(), "{created:?}");
    let token = String::from_utf8_lossy(&created.stdout)
        .lines()
        .last()
        .unwrap()
        .to_owned();
    let response = http
        .get(format!("{url}/api/v1/daemons"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_self_signed_certificate_names_the_host_and_localhost() {
    let (_dir, setup) = init_self_signed("relay.test");
    let served = serve(
        &setup.join("config.toml"),
        &setup.join("data"),
        &[],
        "https",
    );
    let pem = std::fs::read(setup.join("cert.pem")).unwrap();
    for host in ["relay.test", "localhost"] {
        let http = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .resolve(host, served.addr)
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let url = format!("https://{host}:{}", served.addr.port());
        assert!(healthy(&http, &url).await, "{host}");
    }

    // Existing files are kept unless --force.
    let again = Command::new(env!("CARGO_BIN_EXE_syncrelay"))
        .args(["init", "--self-signed", "other.test"])
        .arg("--dir")
        .arg(&setup)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert_eq!(std::fs::read(setup.join("cert.pem")).unwrap(), pem);
}

#[test]
fn an_unusable_certificate_stops_startup_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let ca = Ca::new("startup CA");
    let (cert, key) = ca.server().write(dir.path(), "server");
    let missing = dir.path().join("missing-cert.pem");
    let other_key = ca.server().write(dir.path(), "other").1;
    for (cert, key, named) in [(&missing, &key, &missing), (&cert, &other_key, &cert)] {
        let config = write_config(
            dir.path(),
            &data_dir,
            "127.0.0.1:0",
            &tls_section(cert, key, None),
        );
        let output = Command::new(env!("CARGO_BIN_EXE_syncrelay"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&named.display().to_string()),
            "the error names {}: {stderr}",
            named.display()
        );
        assert!(
            !String::from_utf8_lossy(&output.stdout).contains("listening"),
            "{output:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_on_a_public_address_is_refused_but_tls_starts() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let plain_config = write_config(dir.path(), &data_dir, "127.0.0.1:0", "");
    let output = Command::new(env!("CARGO_BIN_EXE_syncrelay"))
        .arg("serve")
        .arg("--config")
        .arg(&plain_config)
        .args(["--listen", "0.0.0.0:0"])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("insecure_plaintext"), "{stderr}");

    let ca = Ca::new("public CA");
    let (cert, key) = ca.server().write(dir.path(), "server");
    let tls_config = write_config(
        dir.path(),
        &data_dir,
        "127.0.0.1:0",
        &tls_section(&cert, &key, None),
    );
    let served = serve(&tls_config, &data_dir, &["--listen", "0.0.0.0:0"], "https");
    let http = https(served.addr, &[&ca]).build().unwrap();
    assert!(healthy(&http, &base(served.addr)).await);
}

/// A client certificate that expires while its connection is open stops authenticating
/// at once: the relay checks the expiry at each request, not only at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_expiring_on_an_open_connection_stops_authenticating() {
    let pki = Pki::new();
    let relay = TestRelay::start_with(&pki.mtls()).await;
    let now = time::OffsetDateTime::now_utc();
    // X.509 times have whole seconds: valid for 2 to 3 more seconds.
    let leaf = pki.client_ca.client_valid(
        "d",
        now - time::Duration::hours(1),
        now + time::Duration::seconds(2),
    );
    let http = pki.client(relay.addr, Some(&leaf));
    let url = base(relay.addr);
    let connect_url = format!("{url}/sync/connect");
    let hello = connect_body("d");
    let connect = || post(&http, &connect_url, None, &hello);
    let (status, body) = connect().await.unwrap();
    assert_eq!(status, 200, "{body}");
    let started = Instant::now();
    eventually(Duration::from_secs(10), || async {
        matches!(connect().await, Ok((401, _)))
    })
    .await;
    assert!(started.elapsed() >= Duration::from_secs(1));
}
