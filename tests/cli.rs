//! The `syncrelay` binary as an operator uses it: `keys create|list|revoke` against a
//! running relay (token alone on the last line), `config check` naming bad keys, refusing
//! plaintext on a public address, and a graceful SIGTERM that answers waiting polls.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::RelayProcess;
use serde_json::{json, Value};

fn syncrelay(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_syncrelay"))
        .args(args)
        .env_remove("SYNCRELAY_ADMIN_KEY")
        .output()
        .expect("run syncrelay")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn status_with(url: &str, token: &str, route: &str) -> u16 {
    reqwest::Client::new()
        .get(format!("{url}{route}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_create_list_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::spawn(dir.path());
    let data_dir = dir.path().to_str().unwrap();
    let base = ["--url", relay.url.as_str(), "--data-dir", data_dir];

    let mut args = vec![
        "keys",
        "create",
        "--role",
        "client",
        "--scope",
        "laptop,desk",
    ];
    args.extend(base);
    let created = syncrelay(&args);
    assert!(created.status.success(), "{created:?}");
    let token = stdout(&created).lines().last().unwrap().to_owned();
    assert!(
        token.starts_with("srk_"),
        "token alone on the last line: {token:?}"
    );
    assert_eq!(
        status_with(&relay.url, &token, "/api/v1/daemons").await,
        200
    );

    let mut args = vec!["keys", "create", "--role", "daemon", "--daemon", "laptop"];
    args.extend(base);
    assert!(syncrelay(&args).status.success());

    let mut args = vec!["keys", "list"];
    args.extend(base);
    let listed = stdout(&syncrelay(&args));
    let key_id = token
        .strip_prefix("srk_")
        .unwrap()
        .split('_')
        .next()
        .unwrap();
    assert!(
        listed.contains(key_id) && listed.contains("laptop,desk"),
        "{listed}"
    );
    assert!(!listed.contains(&token), "list never shows tokens");

    let mut args = vec!["keys", "revoke", key_id];
    args.extend(base);
    assert!(syncrelay(&args).status.success());
    assert_eq!(
        status_with(&relay.url, &token, "/api/v1/daemons").await,
        401,
        "revoked at once"
    );

    // A bad request is reported with the relay's error code.
    let mut args = vec!["keys", "create", "--role", "daemon", "--daemon", "../etc"];
    args.extend(base);
    let refused = syncrelay(&args);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("bad_request"));

    let mut args = vec!["status"];
    args.extend(base);
    let status = stdout(&syncrelay(&args));
    assert!(status.contains("laptop"), "{status}");
}

#[test]
fn config_check_names_the_bad_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, "[sync]\npoll_timeout = \"5s\"\n").unwrap();
    let output = syncrelay(&["config", "check", "--config", path.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("poll_timeout") && stderr.contains("relay.toml"),
        "{stderr}"
    );

    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let output = syncrelay(&["config", "check", "--config", shipped]);
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn plaintext_on_a_public_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let output = syncrelay(&[
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("insecure_plaintext"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_waiting_polls_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = RelayProcess::spawn(dir.path());
    let admin = relay.admin_token();
    let http = reqwest::Client::new();
    let token = common::create_key(
        &relay.url,
        &admin,
        json!({ "role": "daemon", "daemon": "d" }),
    )
    .await;
    let poll = http
        .post(format!("{}/sync/poll", relay.url))
        .bearer_auth(&token)
        .json(&json!({ "daemon_id": "d", "wait_for_commands": true, "timeout": 60 }))
        .send();
    let poll = tokio::spawn(poll);
    // The poll is waiting once the relay reports the daemon online.
    let client_token = common::create_key(
        &relay.url,
        &admin,
        json!({ "role": "client", "scope": ["d"] }),
    )
    .await;
    common::eventually(Duration::from_secs(10), || {
        let (http, url, token) = (http.clone(), relay.url.clone(), client_token.clone());
        async move {
            let body: Value = http
                .get(format!("{url}/api/v1/daemons/d"))
                .bearer_auth(token)
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
    let pid = relay.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let response = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("the waiting poll is answered at shutdown")
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap()["commands"],
        json!([])
    );
    let exit = tokio::task::spawn_blocking(move || relay.child.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// Issue 19: a log line says which connection and request it belongs to (peer, route
/// template, key id, daemon id) and never carries a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_name_their_connection_and_request_but_never_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("relay.log");
    let mut relay = RelayProcess::spawn_logging(&dir.path().join("data"), &log_path);
    let (url, admin) = (relay.url.clone(), relay.admin_token());
    let token = relay
        .create_key(json!({ "role": "daemon", "daemon": "d" }))
        .await;
    let connected = reqwest::Client::new()
        .post(format!("{url}/sync/connect"))
        .bearer_auth(&token)
        .json(&json!({ "daemon_id": "d" }))
        .send()
        .await
        .unwrap();
    assert_eq!(connected.status(), 200);
    assert!(Command::new("kill")
        .args(["-TERM", &relay.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    assert!(relay.child.wait().unwrap().success());
    let log = std::fs::read_to_string(&log_path).unwrap();
    let line = log
        .lines()
        .find(|line| line.contains("daemon connected"))
        .unwrap_or_else(|| panic!("no connect line in:\n{log}"));
    for part in [
        "connection{peer=127.0.0.1:",
        "request{method=POST route=/sync/connect key_id=",
        "daemon_id=d",
    ] {
        assert!(line.contains(part), "{part:?} missing from {line:?}");
    }
    assert!(!line.contains('\x1b'), "no colours in a log file: {line:?}");
    let secret = token.rsplit('_').next().unwrap();
    assert!(
        !log.contains(&token) && !log.contains(secret),
        "a token in the log"
    );
    assert!(!log.contains(&admin), "the admin key in the log");
}

/// The plaintext refusal is about serving: `config check` reports it, while the operator
/// commands, which only read the address and data dir, still work with such a config.
#[test]
fn config_check_reports_plaintext_off_loopback_and_operator_commands_still_run() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::spawn(&dir.path().join("data"));
    let config = dir.path().join("public.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"0.0.0.0:8080\"\ndata_dir = {:?}\n",
            dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();
    let checked = syncrelay(&["config", "check", "--config", config.to_str().unwrap()]);
    assert!(!checked.status.success());
    let stderr = String::from_utf8_lossy(&checked.stderr);
    assert!(stderr.contains("insecure_plaintext"), "{stderr}");
    let status = syncrelay(&[
        "status",
        "--config",
        config.to_str().unwrap(),
        "--url",
        &relay.url,
    ]);
    assert!(status.status.success(), "{status:?}");
}
