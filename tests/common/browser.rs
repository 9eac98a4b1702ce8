//! A real browser for the console tests: Debian's headless Chromium driven through
//! `chromedriver` (WebDriver) with `fantoccini`. [`Browser::start`] runs `chromedriver` on
//! a free loopback port with a profile of its own in a temp dir; where `chromium` or
//! `chromedriver` is missing it prints one `SKIPPED:` line and returns `None`, unless
//! `SYNCRELAY_REQUIRE_ENGINES=1` (set by `.ci/run`, which installs both with apt).
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Map, Value};

/// How long a condition in the page may take (a live view samples every 2 s).
pub const PATIENCE: Duration = Duration::from_secs(20);

pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

/// The first of `names` found in `PATH`.
fn find_binary(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

impl Browser {
    /// A browser session at a 1280×900 window, or `None` after a `SKIPPED:` line.
    pub async fn start(test: &str) -> Option<Browser> {
        let chromium = find_binary(&["chromium", "chromium-browser"]);
        let driver = find_binary(&["chromedriver"]);
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            super::skip_or_fail(
                test,
                "Chromium not installed (apt-get install chromium chromium-driver)",
            );
            return None;
        };
        // A port found free can be taken before chromedriver binds it, and then it exits:
        // start again on another (up to 3 times), and say why from its log otherwise.
        let profile = tempfile::tempdir().unwrap();
        let mut failures = Vec::new();
        for attempt in 0..3 {
            let dir = profile.path().join(format!("attempt-{attempt}"));
            std::fs::create_dir_all(&dir).unwrap();
            match Self::session(&chromium, &driver, &dir).await {
                Ok((client, driver)) => {
                    return Some(Browser {
                        client,
                        driver,
                        _profile: profile,
                    })
                }
                Err(why) => failures.push(why),
            }
        }
        panic!("{test}: no WebDriver session with chromedriver: {failures:#?}");
    }

    /// One try: chromedriver on a free port logging into `dir`, and a session of a
    /// Chromium whose profile is in `dir`; why not, with the end of chromedriver's log.
    async fn session(
        chromium: &Path,
        driver: &Path,
        dir: &Path,
    ) -> Result<(Client, Child), String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = dir.join("chromedriver.log");
        let mut driver = Command::new(driver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let log_tail = || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        let mut options = Map::new();
        options.insert("binary".into(), json!(chromium));
        options.insert(
            "args".into(),
            json!([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-extensions",
                "--window-size=1280,900",
                format!("--user-data-dir={}", dir.join("profile").display()),
            ]),
        );
        let mut capabilities = Map::new();
        capabilities.insert("goog:chromeOptions".into(), Value::Object(options));
        let url = format!("http://127.0.0.1:{port}");
        let mut builder =
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        builder.capabilities(capabilities);
        // chromedriver takes a moment to listen.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = driver.try_wait() {
                return Err(format!(
                    "chromedriver exited ({status}); its log:\n{}",
                    log_tail()
                ));
            }
            match builder.connect(&url).await {
                Ok(client) => return Ok((client, driver)),
                Err(err) if std::time::Instant::now() < deadline => {
                    let _ = err;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => {
                    let _ = driver.kill();
                    let _ = driver.wait();
                    return Err(format!(
                        "{err} after 30 s; chromedriver's log:\n{}",
                        log_tail()
                    ));
                }
            }
        }
    }

    /// Opens the console of the relay at `url`, at `view` (`#/keys`; empty: the page).
    pub async fn goto(&self, url: &str, view: &str) {
        self.client
            .goto(&format!("{url}/console{view}"))
            .await
            .expect("open the console");
    }

    /// Sets the viewport to `width`×`height` CSS pixels.
    pub async fn viewport(&self, width: u32, height: u32) {
        // The window includes no browser chrome in headless mode.
        self.client
            .set_window_size(width, height)
            .await
            .expect("resize the window");
    }

    /// Writes a PNG of the page to `target/console-screenshots/{name}.png`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let png = self.client.screenshot().await.expect("a screenshot");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Waits until the element at `css` exists and its text satisfies `check`; returns
    /// the text. Fails with what the page showed last.
    pub async fn text_where(&self, css: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut last = None;
        loop {
            if let Ok(element) = self.client.find(Locator::Css(css)).await {
                if let Ok(text) = element.text().await {
                    if check(&text) {
                        return text;
                    }
                    last = Some(text);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let status = self.status_line().await;
                panic!("{css}: not as expected within {PATIENCE:?}; it read {last:?} (status line {status:?})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the element at `css` to exist and be shown.
    pub async fn shown(&self, css: &str) -> fantoccini::elements::Element {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok(element) = self.client.find(Locator::Css(css)).await {
                if element.is_displayed().await.unwrap_or(false) {
                    return element;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let status = self.status_line().await;
                panic!("{css}: not shown within {PATIENCE:?} (status line {status:?})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn status_line(&self) -> Option<String> {
        let element = self.client.find(Locator::Css("#status")).await.ok()?;
        element.text().await.ok()
    }

    /// Types `text` into the field at `css`, replacing what it held.
    pub async fn fill(&self, css: &str, text: &str) {
        let field = self.shown(css).await;
        field.clear().await.expect("clear the field");
        field.send_keys(text).await.expect("type");
    }

    pub async fn click(&self, css: &str) {
        self.shown(css).await.click().await.expect("click");
    }

    /// Evaluates `script` (a function body) in the page.
    pub async fn eval(&self, script: &str) -> Value {
        self.client
            .execute(script, Vec::new())
            .await
            .expect("run script")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // Chromium outlives a killed driver: end every process of this session's profile.
        let profile = self._profile.path().display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&profile) {
                // SAFETY: kill(2) on a pid this test's browser started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}
