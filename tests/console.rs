//! The operator console (`/console`): its files and headers over HTTP, the admin read
//! routes it uses (401 without a key, 403 for client and daemon keys), and the console
//! itself in headless Chromium against a real relay and agent on loopback: sign in (a
//! wrong key and a client key refused with a clear message), a daemon online while its
//! agent runs and offline once it stops, an event the daemon posts appearing on its page
//! without a reload, a key created, used, revoked and then refused, a backup run to the
//! end with its progress shown. Screenshots of each view, at 1280 and at 390 pixels wide,
//! go to `target/console-screenshots/`. In a cluster (two nodes on PostgreSQL and NATS),
//! the console of one node shows its name, its NATS link and hint latency, which node
//! holds each daemon, and the live change log of a daemon held by the other node.

mod common;

use std::time::Duration;

use common::browser::Browser;
use common::daemon::TestDaemon;
use common::nats::NatsCluster;
use common::{create_key, eventually, postgres, AgentProcess, RelayProcess};
use serde_json::{json, Value};

/// The routes the console reads, under the admin role only.
const ADMIN_READS: &[&str] = &[
    "/admin/stats",
    "/admin/daemons/d",
    "/admin/daemons/d/changes",
    "/admin/daemons/d/events",
    "/admin/daemons/d/commands",
    "/admin/daemons/d/contexts",
];

/// A relay (daemons offline one second after their agent goes) with a daemon key for `d`.
fn relay(dir: &tempfile::TempDir, extra: &str) -> RelayProcess {
    let config = dir.path().join("config.toml");
    RelayProcess::spawn_with(
        &dir.path().join("data"),
        &config,
        &format!("[sync]\nonline_grace = \"1s\"\n{extra}"),
    )
}

async fn get(url: &str, token: Option<&str>, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = reqwest::Client::new().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.expect("relay reachable")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_served_safely_and_its_data_needs_an_admin_key() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(&dir, "");
    let url = relay.url.clone();
    let admin = relay.admin_token();

    // The page and its two files, with the headers that make them safe to expose.
    for (path, kind) in [
        ("/console", "text/html"),
        ("/console/console.js", "text/javascript"),
        ("/console/console.css", "text/css"),
    ] {
        let response = get(&format!("{url}{path}"), None, &[]).await;
        assert_eq!(response.status(), 200, "{path}");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        assert!(header("content-type").starts_with(kind), "{path}");
        let csp = header("content-security-policy");
        for directive in [
            "default-src 'self'",
            "script-src 'self'",
            "frame-ancestors 'none'",
            "object-src 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert_eq!(header("referrer-policy"), "no-referrer");
        assert_eq!(header("x-frame-options"), "DENY");
        // A browser keeps its copy until the binary changes.
        let etag = header("etag");
        let again = get(&format!("{url}{path}"), None, &[("if-none-match", &etag)]).await;
        assert_eq!(again.status(), 304, "{path}");
    }
    let missing = get(&format!("{url}/console/nothing.js"), None, &[]).await;
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");

    // The data behind it: 401 without a key, 403 for client and daemon keys.
    let client = create_key(&url, &admin, json!({ "role": "client", "scope": ["*"] })).await;
    let daemon = create_key(&url, &admin, json!({ "role": "daemon", "daemon": "d" })).await;
    for route in ADMIN_READS {
        let full = format!("{url}{route}");
        assert_eq!(get(&full, None, &[]).await.status(), 401, "{route}");
        assert_eq!(
            get(&full, Some("srk_x_y"), &[]).await.status(),
            401,
            "{route}"
        );
        assert_eq!(
            get(&full, Some(&client), &[]).await.status(),
            403,
            "{route}"
        );
        assert_eq!(
            get(&full, Some(&daemon), &[]).await.status(),
            403,
            "{route}"
        );
        let allowed = get(&full, Some(&admin), &[]).await;
        assert_eq!(allowed.status(), 200, "{route}");
    }
    let unknown = get(
        &format!("{url}/admin/daemons/nobody/commands"),
        Some(&admin),
        &[],
    )
    .await;
    assert_eq!(unknown.status(), 404);
    let invalid = get(
        &format!("{url}/admin/daemons/no%20body/commands"),
        Some(&admin),
        &[],
    )
    .await;
    assert_eq!(invalid.status(), 400);
    let stats: Value = get(&format!("{url}/admin/stats"), Some(&admin), &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(stats["store"]["backend"], "sled");
    assert_eq!(stats["daemons"]["total"], 1, "{stats}");
    assert!(stats["requests"]["total"].as_u64().unwrap() > 20, "{stats}");
    drop(relay);

    // Turned off, the page is gone; the admin routes stay.
    let off = tempfile::tempdir().unwrap();
    let relay = self::relay(&off, "[console]\nenabled = false\n");
    let response = get(&format!("{}/console", relay.url), None, &[]).await;
    assert_eq!(response.status(), 404);
    let stats = get(
        &format!("{}/admin/stats", relay.url),
        Some(&relay.admin_token()),
        &[],
    )
    .await;
    assert_eq!(stats.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() {
    let test = "the_console_in_a_real_browser";
    let Some(browser) = Browser::start(test).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(&dir, "");
    let url = relay.url.clone();
    let admin = relay.admin_token();
    let daemon_key = create_key(&url, &admin, json!({ "role": "daemon", "daemon": "d" })).await;
    let client_key = create_key(&url, &admin, json!({ "role": "client", "scope": ["d"] })).await;
    let daemon = TestDaemon::start().await;
    let agent_state = dir.path().join("agent");
    let agent = AgentProcess::spawn(&url, "d", &daemon_key, &daemon.target, &agent_state);

    // Sign-in: a wrong key and a client key are refused, each with a clear message.
    browser.goto(&url, "").await;
    browser.shown("#sign-in-form").await;
    browser.screenshot("sign-in-desktop").await;
    browser.fill("#key", "srk_0000_wrong").await;
    browser.click("#sign-in-form button[type=submit]").await;
    browser
        .text_where("#sign-in-error", |t| t.contains("refused this key"))
        .await;
    browser.fill("#key", &client_key).await;
    browser.click("#sign-in-form button[type=submit]").await;
    browser
        .text_where("#sign-in-error", |t| t.contains("not an admin key"))
        .await;
    browser.screenshot("sign-in-refused-desktop").await;
    // From the keyboard: the field has the focus when the page opens; Enter signs in.
    browser.goto(&url, "").await;
    browser.shown("#sign-in-form").await;
    let focused = browser.eval("return document.activeElement.id;").await;
    assert_eq!(focused, "key", "the key field has the focus");
    let enter = char::from(fantoccini::key::Key::Enter);
    browser
        .client
        .active_element()
        .await
        .unwrap()
        .send_keys(&format!("{admin}{enter}"))
        .await
        .unwrap();

    // Overview: live figures, sampled every 2 s.
    browser
        .text_where("#card-daemons .value", |t| t == "1 of 1")
        .await;
    browser.text_where("#card-rps .value", |t| t != "–").await;
    // The key is in this tab's sessionStorage only: not in the URL, not in localStorage.
    let storage = browser
        .eval(
            "return [location.href, localStorage.length, \
             sessionStorage.getItem('syncrelay.adminKey')];",
        )
        .await;
    assert!(!storage[0].as_str().unwrap().contains(&admin));
    assert_eq!(storage[1], 0, "nothing in localStorage");
    assert_eq!(storage[2], json!(admin));
    // The charts draw once there are two intervals.
    browser.shown("#card-rps svg polyline").await;
    browser.screenshot("overview-desktop").await;

    // Daemons: d is online while its agent runs.
    browser.goto(&url, "#/daemons").await;
    browser
        .text_where("#daemons tr[data-daemon=d] .badge", |t| t == "online")
        .await;
    browser.screenshot("daemons-desktop").await;

    // One daemon's page: its change log tails live; an event the daemon posts appears
    // without a reload. A write through the relay shows among its commands.
    browser.click("#daemons tr[data-daemon=d] a").await;
    browser.shown("#changes").await;
    let written = reqwest::Client::new()
        .post(format!("{url}/api/v1/daemons/d/echo/console-test"))
        .bearer_auth(&client_key)
        .json(&json!({ "from": "the console test" }))
        .send()
        .await
        .unwrap();
    assert_eq!(written.status(), 200);
    let before = browser.eval("return location.href;").await;
    daemon.emit(1);
    browser
        .text_where("#changes", |t| t.contains("tick") && t.contains("\"n\":1"))
        .await;
    assert_eq!(
        browser.eval("return location.href;").await,
        before,
        "no reload, no navigation"
    );
    browser
        .text_where("#commands", |t| {
            t.contains("http") && t.contains("completed")
        })
        .await;
    // A large context fetched through the relay shows among its cached contexts.
    let context = reqwest::Client::new()
        .get(format!(
            "{url}/api/v1/daemons/d/approvals/a1/context/stream?events=3&size=10"
        ))
        .bearer_auth(&client_key)
        .send()
        .await
        .unwrap();
    assert_eq!(context.status(), 200);
    assert!(context.text().await.unwrap().contains("event: context"));
    browser
        .text_where("#contexts", |t| {
            t.contains("approvals/a1/context/stream") && t.contains("complete")
        })
        .await;
    browser.screenshot("daemon-desktop").await;

    // Keys: create one (its token shown once), use it, revoke it, and it is refused.
    browser.goto(&url, "#/keys").await;
    browser.shown("#keys").await;
    browser.fill("#new-target", "d").await;
    browser.fill("#new-label", "phone").await;
    browser.click("#create-key button[type=submit]").await;
    let token = browser
        .text_where("#new-token", |t| t.starts_with("srk_"))
        .await;
    let key_id = token
        .trim_start_matches("srk_")
        .split('_')
        .next()
        .unwrap()
        .to_owned();
    let used = get(&format!("{url}/api/v1/daemons"), Some(&token), &[]).await;
    assert_eq!(used.status(), 200, "the new key works");
    browser.screenshot("keys-desktop").await;
    browser
        .click(&format!("#keys tr[data-key='{key_id}'] button"))
        .await;
    eventually(Duration::from_secs(10), || async {
        browser.client.get_alert_text().await.is_ok()
    })
    .await;
    let question = browser.client.get_alert_text().await.unwrap();
    assert!(question.contains(&key_id), "{question}");
    browser.client.accept_alert().await.unwrap();
    browser.text_where("#keys", |t| !t.contains(&key_id)).await;
    let refused = get(&format!("{url}/api/v1/daemons"), Some(&token), &[]).await;
    assert_eq!(refused.status(), 401, "a revoked key is refused");

    // Backup: started from the page, its progress shown to the end.
    let target = dir.path().join("backup-1");
    browser.goto(&url, "#/backup").await;
    browser.fill("#backup-to", target.to_str().unwrap()).await;
    browser.click("#backup-form button[type=submit]").await;
    browser
        .text_where("#backup-status", |t| t.starts_with("Backup done"))
        .await;
    let progress = browser
        .eval(
            "const p = document.querySelector('#backup-progress'); \
             return [p.value, p.max, p.hidden, \
                     document.querySelector('#backup-status').dataset.reports];",
        )
        .await;
    assert_eq!(progress[0], progress[1], "the bar ends full: {progress}");
    assert_eq!(progress[2], false);
    assert!(
        progress[3].as_str().unwrap_or("0").parse::<u32>().unwrap() >= 1,
        "progress was shown before the end: {progress}"
    );
    assert!(target.join("store.seal").exists() || target.read_dir().unwrap().count() > 0);
    browser.screenshot("backup-desktop").await;

    // The agent stops: d goes offline.
    agent.kill();
    browser.goto(&url, "#/daemons").await;
    browser
        .text_where("#daemons tr[data-daemon=d] .badge", |t| t == "offline")
        .await;
    browser.screenshot("daemons-offline-desktop").await;

    // On a phone: every view fits 390 pixels, nothing wider than the screen.
    browser.viewport(390, 844).await;
    for (view, ready) in [
        ("overview", "#card-daemons"),
        ("daemons", "#daemons"),
        ("daemons/d", "#changes"),
        ("keys", "#keys"),
        ("backup", "#backup-form"),
    ] {
        browser.goto(&url, &format!("#/{view}")).await;
        browser.shown(ready).await;
        let widths = browser
            .eval("return [document.documentElement.scrollWidth, window.innerWidth];")
            .await;
        // Every control is labelled, and reachable from the keyboard.
        let unlabelled = browser
            .eval(
                "return [...document.querySelectorAll('input, select, button, a')] \
                 .filter(e => e.offsetParent !== null) \
                 .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') \
                              && !e.textContent.trim() || e.tabIndex < 0) \
                 .map(e => e.outerHTML);",
            )
            .await;
        assert_eq!(
            unlabelled,
            json!([]),
            "{view}: unlabelled or unreachable controls"
        );
        assert!(
            widths[0].as_u64() <= widths[1].as_u64(),
            "{view}: the page is wider than the phone: {widths}"
        );
        browser
            .screenshot(&format!("{}-390", view.replace('/', "-")))
            .await;
    }
    // Signing out forgets the key.
    browser.click("#sign-out").await;
    browser.shown("#sign-in-form").await;
    let stored = browser
        .eval("return sessionStorage.getItem('syncrelay.adminKey');")
        .await;
    assert_eq!(stored, Value::Null);
    browser.screenshot("sign-in-390").await;
}

/// Signs in to the console at `url` with `key` (the key field has the focus).
async fn sign_in(browser: &Browser, url: &str, key: &str) {
    browser.goto(url, "").await;
    browser.shown("#sign-in-form").await;
    browser.fill("#key", key).await;
    browser.click("#sign-in-form button[type=submit]").await;
}

/// Two relay nodes ("a", "b") on one database and one NATS server, the daemon's agent on
/// node b and the console on node a: the overview names node a, its NATS link and hint
/// latency; the daemons table says node b holds `d`; the daemon's page, on node a, tails
/// the change log the agent fills through node b. With NATS gone, the overview says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_of_a_cluster_node_in_a_real_browser() {
    let test = "the_console_of_a_cluster_node_in_a_real_browser";
    let Some(pg) = postgres::shared(test) else {
        return;
    };
    let Some(mut nats) = NatsCluster::start(test, 1).await else {
        return;
    };
    let Some(browser) = Browser::start(test).await else {
        return;
    };
    let database = postgres::create_database(pg).await;
    let store = common::postgres_store(&pg.url(&database));
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let spawn = |index: usize| {
        let extra = format!(
            "{store}[cluster]\nnode = \"{}\"\nnats_urls = [\"{}\"]\n",
            ["a", "b"][index],
            nats.url(0)
        );
        let dir = dirs[index].path();
        RelayProcess::spawn_with(dir, &dir.join("config.toml"), &extra)
    };
    let a = spawn(0);
    // Node b finds the keys node a made in the database; its admin key is a's.
    std::fs::write(dirs[1].path().join("admin.key"), a.admin_token()).unwrap();
    let b = spawn(1);
    let admin = a.admin_token();
    let daemon_key = a
        .create_key(json!({ "role": "daemon", "daemon": "d" }))
        .await;
    let daemon = TestDaemon::start().await;
    let agent_state = dirs[1].path().join("agent");
    let _agent = AgentProcess::spawn(&b.url, "d", &daemon_key, &daemon.target, &agent_state);

    sign_in(&browser, &a.url, &admin).await;
    browser
        .text_where("#card-cluster .label", |t| t == "Node a")
        .await;
    browser
        .text_where("#card-cluster .value", |t| t == "NATS connected")
        .await;
    browser
        .text_where("#card-cluster .held", |t| t.starts_with("holds 0 "))
        .await;
    // Node b holds d: the table says so, as does d's page.
    browser.goto(&a.url, "#/daemons").await;
    browser
        .text_where("#daemons tr[data-daemon=d] td.node", |t| t == "b")
        .await;
    browser.screenshot("cluster-daemons-desktop").await;
    browser.click("#daemons tr[data-daemon=d] a").await;
    browser
        .text_where("main", |t| t.contains("on node b"))
        .await;
    // The agent posts an event through node b; node a's page shows it, woken by a hint.
    daemon.emit(1);
    browser
        .text_where("#changes", |t| t.contains("tick") && t.contains("\"n\":1"))
        .await;
    // That hint, and any before it, in node a's hint latency.
    browser.goto(&a.url, "#/overview").await;
    browser
        .text_where("#card-hints .value", |t| t.starts_with('≤'))
        .await;
    browser.screenshot("cluster-overview-desktop").await;
    sign_in(&browser, &b.url, &admin).await;
    browser
        .text_where("#card-cluster .held", |t| t.starts_with("holds 1 "))
        .await;

    // NATS gone: node b's overview says so.
    nats.kill(0);
    browser
        .text_where("#card-cluster .value", |t| t == "NATS unreachable")
        .await;
    browser.screenshot("cluster-nats-down-desktop").await;
}
