//! The authorization matrix end to end, as one table (DESIGN.md, "Security" and "Client
//! API"): every role (no key, malformed, wrong scheme, unknown, forged and revoked keys, a
//! daemon key of "a", client keys scoped to ["a"] and ["*"], an admin key) against every
//! route family (`/sync/*`, the client API's per-daemon routes, listings and commands,
//! `/admin/*`, the open `/healthz`, `/readyz`, `/metrics`) and every daemon id ("a" in
//! scope and online, "b" existing but offline and outside ["a"], "zzz" not existing), with
//! the token in the `Authorization` header and as `?access_token=` (accepted on SSE GET
//! routes only). Each case asserts the exact status and, for errors, the `code` of the
//! design's error JSON `{"error":{"code","message"}}`. All mismatches are collected and
//! reported together.

mod common;

use std::collections::BTreeSet;
use std::fmt;
use std::time::{Duration, Instant};

use common::{Client, Daemon, TestRelay};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::Method;
use serde_json::{json, Value};

/// Every 401 case below is a failed authentication from 127.0.0.1, far more than the
/// default failed-auth limit per source address (10/min, burst 20) allows: past it the
/// relay answers 429 `rate_limited` instead. `auth_failures_per_minute = 0` turns that
/// limit off, so each case sees the authorization answer itself. (The general per-address
/// limit, 1000 req/s with a burst of 2000, stays on; the table is well below it.)
const CONFIG: &str = "[rate_limit]\nauth_failures_per_minute = 0\n";

/// Upper bound for any single request.
const REQUEST_LIMIT: Duration = Duration::from_secs(20);

/// Who sends a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// No `Authorization` header at all.
    NoKey,
    /// `Bearer` with something that is not a key.
    Malformed,
    /// A valid client key, but under the `Basic` scheme.
    WrongScheme,
    /// A well-formed token the relay never issued.
    Unknown,
    /// A real key id with the wrong secret.
    Forged,
    /// A client key (scope `*`) revoked through `DELETE /admin/keys/{id}`.
    Revoked,
    /// A daemon key bound to "a".
    Daemon,
    /// A client key scoped to ["a"].
    ClientA,
    /// A client key scoped to ["*"].
    ClientAll,
    /// An admin key.
    Admin,
}

use Role::*;

/// Keys that never authenticate.
const BAD_KEYS: [Role; 6] = [NoKey, Malformed, WrongScheme, Unknown, Forged, Revoked];
/// Keys that authenticate.
const ROLES: [Role; 4] = [Daemon, ClientA, ClientAll, Admin];

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            NoKey => "no key",
            Malformed => "malformed",
            WrongScheme => "basic scheme",
            Unknown => "unknown key",
            Forged => "forged key",
            Revoked => "revoked key",
            Daemon => "daemon(a)",
            ClientA => "client[a]",
            ClientAll => "client[*]",
            Admin => "admin",
        };
        f.pad(name)
    }
}

/// Where the token travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// `Authorization` header (or none, for the bad-key variants that have none).
    Header,
    /// `?access_token=` only, no header.
    Query,
}

/// What a 2xx answer must show beyond its status.
#[derive(Clone, Copy, Debug)]
enum Check {
    Nothing,
    /// `Content-Type: text/event-stream`; the body is dropped unread.
    EventStream,
    /// `{"daemons":[…]}` listing exactly these ids.
    Daemons(&'static [&'static str]),
}

/// One row of the table.
struct Case {
    role: Role,
    via: Via,
    method: Method,
    path: String,
    body: Option<Value>,
    expect_status: u16,
    expect_code: Option<&'static str>,
    check: Check,
}

/// An expected answer: status and, for errors, the error code.
type Expect = (u16, Option<&'static str>);

const OK: Expect = (200, None);
const CREATED: Expect = (201, None);
const UNAUTHORIZED: Expect = (401, Some("unauthorized"));
const FORBIDDEN: Expect = (403, Some("forbidden"));
const NOT_FOUND: Expect = (404, Some("not_found"));
const OFFLINE: Expect = (503, Some("daemon_offline"));

/// The daemon ids every per-daemon route is tried with.
const IDS: [&str; 3] = ["a", "b", "zzz"];

/// The tokens of each role.
struct Keys {
    daemon: String,
    client_a: String,
    client_all: String,
    admin: String,
    unknown: String,
    forged: String,
    revoked: String,
}

impl Keys {
    /// The token a role presents (`None`: it has none).
    fn token(&self, role: Role) -> Option<&str> {
        match role {
            NoKey | Malformed | WrongScheme => None,
            Unknown => Some(&self.unknown),
            Forged => Some(&self.forged),
            Revoked => Some(&self.revoked),
            Daemon => Some(&self.daemon),
            ClientA => Some(&self.client_a),
            ClientAll => Some(&self.client_all),
            Admin => Some(&self.admin),
        }
    }

    /// The `Authorization` header a role sends.
    fn authorization(&self, role: Role) -> Option<String> {
        match role {
            NoKey => None,
            Malformed => Some("Bearer not-a-key".to_owned()),
            WrongScheme => Some(format!("Basic {}", self.client_a)),
            _ => self.token(role).map(|token| format!("Bearer {token}")),
        }
    }
}

/// A per-daemon client API route family, `/api/v1/daemons/{id}{rest}`, and what a client
/// key whose scope covers the daemon gets on the online "a" and on the offline "b".
struct Family {
    method: Method,
    rest: &'static str,
    body: Option<Value>,
    /// An SSE GET route: `?access_token=` is accepted here.
    sse: bool,
    online: Expect,
    offline: Expect,
}

fn families() -> Vec<Family> {
    let family = |method, rest, body, sse, online, offline| Family {
        method,
        rest,
        body,
        sse,
        online,
        offline,
    };
    vec![
        family(Method::GET, "", None, false, OK, OK),
        family(Method::GET, "/changes", None, false, OK, OK),
        // Served from the change log: works while the daemon is offline.
        family(Method::GET, "/stream/events", None, true, OK, OK),
        // Cache-and-serve: fetched from the online daemon; nothing stored for "b".
        family(
            Method::GET,
            "/approvals/x/context/stream",
            None,
            true,
            OK,
            OFFLINE,
        ),
        family(
            Method::POST,
            "/commands",
            Some(json!({ "method": "getApproval", "params": {} })),
            false,
            OK,
            OFFLINE,
        ),
        family(Method::GET, "/sessions", None, false, OK, OFFLINE),
        family(
            Method::POST,
            "/sessions",
            Some(json!({ "query": "authz", "model": "sonnet" })),
            false,
            CREATED,
            OFFLINE,
        ),
    ]
}

/// Builds the whole table. `a_cmd` and `b_cmd` are commands queued for "a" (by the
/// client[a] key) and for "b" (by the client[*] key); `victim` is a key id the admin
/// revokes in the very last case, after every other role failed to.
fn table(a_cmd: &str, b_cmd: &str, victim: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut add = |role: Role,
                   via: Via,
                   method: Method,
                   path: String,
                   body: Option<Value>,
                   (expect_status, expect_code): Expect,
                   check: Check| {
        cases.push(Case {
            role,
            via,
            method,
            path,
            body,
            expect_status,
            expect_code,
            check,
        })
    };
    let all_roles = || BAD_KEYS.into_iter().chain(ROLES);

    // Open routes: no key needed, and no key (even a bad one) is held against them.
    for role in all_roles() {
        for path in ["/healthz", "/readyz", "/metrics"] {
            add(
                role,
                Via::Header,
                Method::GET,
                path.into(),
                None,
                OK,
                Check::Nothing,
            );
        }
    }

    // `/sync/*`: only the daemon key, only as its own daemon.
    for action in ["connect", "poll", "results"] {
        let path = format!("/sync/{action}");
        for id in IDS {
            let body = match action {
                "connect" => {
                    json!({ "daemon_id": id, "version": "1.0.0", "capabilities": ["sessions"] })
                }
                "poll" => json!({ "daemon_id": id, "updates": [], "wait_for_commands": false }),
                _ => json!({ "daemon_id": id, "results": [] }),
            };
            for role in all_roles() {
                let expect = match role {
                    Daemon if id == "a" => OK,
                    Daemon | ClientA | ClientAll | Admin => FORBIDDEN,
                    _ => UNAUTHORIZED,
                };
                let body = Some(body.clone());
                add(
                    role,
                    Via::Header,
                    Method::POST,
                    path.clone(),
                    body,
                    expect,
                    Check::Nothing,
                );
            }
        }
        // Not an SSE route: the daemon's own token in the query is ignored.
        let body = json!({ "daemon_id": "a", "results": [], "updates": [], "version": "1.0.0" });
        add(
            Daemon,
            Via::Query,
            Method::POST,
            path.clone(),
            Some(body),
            UNAUTHORIZED,
            Check::Nothing,
        );
    }

    // The client API on each daemon id.
    for family in families() {
        for id in IDS {
            let path = format!("/api/v1/daemons/{id}{}", family.rest);
            let check = if family.sse && id != "zzz" {
                Check::EventStream
            } else {
                Check::Nothing
            };
            let in_scope = |role: Role| match (role, id) {
                (ClientA, "a") | (ClientAll, "a") => Some(family.online),
                (ClientAll, "b") => Some(family.offline),
                _ => None,
            };
            let expect = |role: Role| match role {
                ClientA | ClientAll => in_scope(role).unwrap_or(NOT_FOUND),
                Daemon | Admin => FORBIDDEN,
                _ => UNAUTHORIZED,
            };
            let check_for = |role: Role| {
                if in_scope(role).is_some_and(|(status, _)| status == 200) {
                    check
                } else {
                    Check::Nothing
                }
            };
            for role in all_roles() {
                add(
                    role,
                    Via::Header,
                    family.method.clone(),
                    path.clone(),
                    family.body.clone(),
                    expect(role),
                    check_for(role),
                );
            }
            if family.sse {
                // `?access_token=` works here exactly like the header.
                for role in ROLES.into_iter().chain([Unknown, Revoked]) {
                    add(
                        role,
                        Via::Query,
                        Method::GET,
                        path.clone(),
                        None,
                        expect(role),
                        check_for(role),
                    );
                }
                // …but only for GET: a POST to the same path ignores it.
                add(
                    ClientAll,
                    Via::Query,
                    Method::POST,
                    path.clone(),
                    Some(json!({})),
                    UNAUTHORIZED,
                    Check::Nothing,
                );
            } else {
                // Anywhere else a query token is ignored, even a key that would be let in.
                for role in [ClientA, ClientAll] {
                    add(
                        role,
                        Via::Query,
                        family.method.clone(),
                        path.clone(),
                        family.body.clone(),
                        UNAUTHORIZED,
                        Check::Nothing,
                    );
                }
            }
        }
    }

    // The daemon listing shows what the key may see.
    for role in all_roles() {
        let (expect, check) = match role {
            ClientA => (OK, Check::Daemons(&["a"])),
            ClientAll => (OK, Check::Daemons(&["a", "b"])),
            Daemon | Admin => (FORBIDDEN, Check::Nothing),
            _ => (UNAUTHORIZED, Check::Nothing),
        };
        add(
            role,
            Via::Header,
            Method::GET,
            "/api/v1/daemons".into(),
            None,
            expect,
            check,
        );
    }
    add(
        ClientA,
        Via::Query,
        Method::GET,
        "/api/v1/daemons".into(),
        None,
        UNAUTHORIZED,
        Check::Nothing,
    );

    // Commands by id: a command of another daemon is as absent as one that never was.
    for (command, owner) in [(a_cmd, Some("a")), (b_cmd, Some("b")), ("cmd-nope", None)] {
        let path = format!("/api/v1/commands/{command}");
        for role in all_roles() {
            let expect = match (role, owner) {
                (ClientA, Some("a")) | (ClientAll, Some(_)) => OK,
                (ClientA | ClientAll, _) => NOT_FOUND,
                (Daemon | Admin, _) => FORBIDDEN,
                _ => UNAUTHORIZED,
            };
            add(
                role,
                Via::Header,
                Method::GET,
                path.clone(),
                None,
                expect,
                Check::Nothing,
            );
        }
        add(
            ClientAll,
            Via::Query,
            Method::GET,
            path,
            None,
            UNAUTHORIZED,
            Check::Nothing,
        );
    }

    // `/admin/*`: only the admin key. The admin's revocation of `victim` comes last.
    let new_key = json!({ "role": "client", "scope": ["a"], "label": "authz" });
    let admin_routes: [(Method, String, Option<Value>, Expect, Check); 6] = [
        (Method::GET, "/admin/keys".into(), None, OK, Check::Nothing),
        (
            Method::POST,
            "/admin/keys".into(),
            Some(new_key),
            CREATED,
            Check::Nothing,
        ),
        (
            Method::GET,
            "/admin/daemons".into(),
            None,
            OK,
            Check::Daemons(&["a", "b"]),
        ),
        (
            Method::DELETE,
            "/admin/keys/0000000000000000".into(),
            None,
            NOT_FOUND,
            Check::Nothing,
        ),
        (
            Method::GET,
            "/admin/nope".into(),
            None,
            NOT_FOUND,
            Check::Nothing,
        ),
        (
            Method::DELETE,
            format!("/admin/keys/{victim}"),
            None,
            OK,
            Check::Nothing,
        ),
    ];
    let mut last = None;
    for (method, path, body, admin_expect, admin_check) in admin_routes {
        for role in all_roles() {
            let (expect, check) = match role {
                Admin => (admin_expect, admin_check),
                Daemon | ClientA | ClientAll => (FORBIDDEN, Check::Nothing),
                _ => (UNAUTHORIZED, Check::Nothing),
            };
            if role == Admin && path.ends_with(victim) {
                last = Some((method.clone(), path.clone(), expect));
                continue;
            }
            add(
                role,
                Via::Header,
                method.clone(),
                path.clone(),
                body.clone(),
                expect,
                check,
            );
        }
        add(
            Admin,
            Via::Query,
            method,
            path,
            body,
            UNAUTHORIZED,
            Check::Nothing,
        );
    }
    let (method, path, expect) = last.expect("the admin's revocation");
    add(
        Admin,
        Via::Header,
        method,
        path,
        None,
        expect,
        Check::Nothing,
    );

    cases
}

/// Sends one case and describes how its answer differs from the table, if it does.
async fn run(relay: &TestRelay, keys: &Keys, case: &Case) -> Result<(), String> {
    let mut url = format!("{}{}", relay.url, case.path);
    let mut request;
    match case.via {
        Via::Header => {
            request = relay.http.request(case.method.clone(), &url);
            if let Some(value) = keys.authorization(case.role) {
                request = request.header(AUTHORIZATION, value);
            }
        }
        Via::Query => {
            let token = keys.token(case.role).expect("a query case needs a token");
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str("access_token=");
            url.push_str(token);
            request = relay.http.request(case.method.clone(), &url);
        }
    }
    // Never wait long for a daemon: an offline one fails at once, an online one answers.
    request = request
        .header("x-syncrelay-if-offline", "fail")
        .header("prefer", "wait=10");
    if let Some(body) = &case.body {
        request = request.json(body);
    }
    let response = tokio::time::timeout(REQUEST_LIMIT, request.send())
        .await
        .map_err(|_| "no answer within the limit".to_owned())?
        .map_err(|err| format!("request failed: {err}"))?;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    // An event stream never ends: check its head and drop it unread.
    let body = if content_type.starts_with("text/event-stream") {
        drop(response);
        None
    } else {
        let bytes = tokio::time::timeout(REQUEST_LIMIT, response.bytes())
            .await
            .map_err(|_| format!("status {status}: no body within the limit"))?
            .map_err(|err| format!("status {status}: body: {err}"))?;
        Some(String::from_utf8_lossy(&bytes).into_owned())
    };
    let shown = || match &body {
        None => format!("status {status}, {content_type}"),
        Some(text) => {
            let text: String = text.chars().take(160).collect();
            format!("status {status}: {text}")
        }
    };
    let json = || {
        body.as_deref()
            .and_then(|text| serde_json::from_str::<Value>(text).ok())
    };
    if status != case.expect_status {
        return Err(format!("expected {}, got {}", case.expect_status, shown()));
    }
    if let Some(code) = case.expect_code {
        let error = json().map(|body| body["error"].clone()).unwrap_or_default();
        let has_message = error["message"].as_str().is_some_and(|m| !m.is_empty());
        if error["code"] != code || !has_message {
            return Err(format!(
                "expected {} {{\"error\":{{\"code\":\"{code}\",\"message\"}}}}, got {}",
                case.expect_status,
                shown()
            ));
        }
    }
    match case.check {
        Check::Nothing => {}
        Check::EventStream => {
            if !content_type.starts_with("text/event-stream") {
                return Err(format!("expected an event stream, got {}", shown()));
            }
        }
        Check::Daemons(expected) => {
            let listed: Option<BTreeSet<String>> = json().and_then(|body| {
                body["daemons"].as_array().map(|daemons| {
                    daemons
                        .iter()
                        .map(|d| d["daemon_id"].as_str().unwrap_or("?").to_owned())
                        .collect()
                })
            });
            let expected: BTreeSet<String> = expected.iter().map(|&id| id.to_owned()).collect();
            if listed.as_ref() != Some(&expected) {
                return Err(format!("expected daemons {expected:?}, got {}", shown()));
            }
        }
    }
    Ok(())
}

/// Keeps daemon "a" online: polls, answers `http` commands (201 for POST, 200 otherwise),
/// named commands with a JSON result and stream commands with a one-event context. A
/// `/sync/connect` of the table's daemon key supersedes its connection: it reconnects.
fn serve_a(mut daemon: Daemon) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let (status, body) = daemon.poll_raw(json!([]), true, 2.0).await;
            if status == 409 {
                daemon.connect().await;
                continue;
            }
            assert_eq!(status, 200, "daemon a poll: {body}");
            let commands = body["commands"].as_array().cloned().unwrap_or_default();
            if commands.is_empty() {
                continue;
            }
            let results: Vec<Value> = commands.iter().map(answer).collect();
            daemon.results(Value::Array(results)).await;
        }
    })
}

fn answer(command: &Value) -> Value {
    let id = &command["id"];
    if command["stream"] == true {
        return json!({
            "command_id": id,
            "chunk": 0,
            "status": 200,
            "headers": { "content-type": "text/event-stream" },
            "data": "id: 1\ndata: {\"context\":\"x\"}\n\n",
            "complete": true,
        });
    }
    if command["method"] == "http" {
        let status = if command["params"]["method"] == "POST" {
            201
        } else {
            200
        };
        return json!({
            "command_id": id,
            "result": {
                "status": status,
                "headers": { "content-type": "application/json" },
                "body": { "daemon": "a", "path": command["params"]["path"] },
            },
        });
    }
    json!({ "command_id": id, "result": { "daemon": "a", "method": command["method"] } })
}

/// `POST /admin/keys`: the new key's id and token.
async fn create_key(relay: &TestRelay, body: Value) -> (String, String) {
    let response = relay
        .http
        .post(format!("{}/admin/keys", relay.url))
        .bearer_auth(&relay.admin_token)
        .json(&body)
        .send()
        .await
        .expect("relay reachable");
    assert_eq!(response.status(), 201, "create key {body}");
    let created: Value = response.json().await.unwrap();
    let field = |name: &str| created[name].as_str().unwrap().to_owned();
    (field("key_id"), field("token"))
}

/// Queues a named command with `Prefer: respond-async` and returns its id.
async fn queue_command(client: &Client, daemon_id: &str) -> String {
    let response = client
        .post(&format!("/api/v1/daemons/{daemon_id}/commands"))
        .header("prefer", "respond-async")
        .json(&json!({ "method": "getApproval", "params": {} }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "queue a command for {daemon_id}");
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_on_every_route_and_daemon() {
    let relay = TestRelay::start_with(CONFIG).await;

    // Keys. A daemon key registers its daemon: "a" and "b" exist, "zzz" never does.
    let daemon = relay.key("daemon", Some("a"), None).await;
    relay.key("daemon", Some("b"), None).await;
    let client_a = relay.key("client", None, Some(&["a"])).await;
    let (client_all_id, client_all) =
        create_key(&relay, json!({ "role": "client", "scope": ["*"] })).await;
    let admin = relay.key("admin", None, None).await;
    let (revoked_id, revoked) =
        create_key(&relay, json!({ "role": "client", "scope": ["*"] })).await;
    let response = relay
        .http
        .delete(format!("{}/admin/keys/{revoked_id}", relay.url))
        .bearer_auth(&relay.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "revoke");
    let (victim, _) = create_key(&relay, json!({ "role": "client", "scope": ["a"] })).await;
    let keys = Keys {
        daemon,
        client_a: client_a.clone(),
        client_all: client_all.clone(),
        admin,
        unknown: format!("srk_00000000deadbeef_{}", "0".repeat(64)),
        forged: format!("srk_{client_all_id}_{}", "f".repeat(64)),
        revoked,
    };

    // "a" online and answering; "b" never connects.
    let serving = serve_a(relay.daemon("a").await);
    let as_a = Client {
        url: relay.url.clone(),
        key: client_a,
        http: reqwest::Client::new(),
    };
    let as_all = Client {
        key: client_all,
        ..as_a.clone()
    };
    as_a.await_online("a").await;

    // A command of "a", answered by the daemon, and one queued for "b" by another key.
    let a_cmd = queue_command(&as_a, "a").await;
    let state: Value = as_a
        .get(&format!("/api/v1/commands/{a_cmd}?wait=10"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["state"], "completed", "{state}");
    let b_cmd = queue_command(&as_all, "b").await;

    let cases = table(&a_cmd, &b_cmd, &victim);
    let started = Instant::now();
    let mut mismatches = Vec::new();
    for case in &cases {
        if let Err(why) = run(&relay, &keys, case).await {
            let via = match case.via {
                Via::Header => "",
                Via::Query => " ?access_token",
            };
            mismatches.push(format!(
                "{:<12} {:<6} {}{via}: {why}",
                case.role, case.method, case.path
            ));
        }
    }
    println!(
        "authz: {} cases in {:.2?}, {} mismatches",
        cases.len(),
        started.elapsed(),
        mismatches.len()
    );
    serving.abort();
    assert!(
        mismatches.is_empty(),
        "{} of {} cases broke the authorization rules:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
}
