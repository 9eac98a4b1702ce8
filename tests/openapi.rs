//! `GET /openapi.json` (generated from the relay's handlers) checked against the real
//! relay: the document parses, is OpenAPI 3.1.0 and every `$ref` resolves; every route the
//! router matches is documented, with exactly the methods it answers; and real traffic through every documented path and method (a daemon
//! driven by hand and one served by a loop, clients, admin calls, health routes) answers
//! only with status codes the document lists for the operation, with the documented
//! required headers, and with JSON bodies that validate against the documented schemas
//! (JSON Schema 2020-12, as OpenAPI 3.1 uses it, by the `jsonschema` crate).
//! Methods a path does not document must be answered 405 with an `Allow` header naming
//! exactly the documented ones.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, Reply, TestRelay};
use reqwest::header::HeaderMap;
use reqwest::RequestBuilder;
use serde_json::{json, Value};

/// Quick offline detection, small bodies (413) and a short queue (429 `queue_full`).
const CONFIG: &str = "[sync]\nonline_grace = \"2s\"\n\
                      [limits]\nmax_body_bytes = 65536\n\
                      [commands]\nqueue_limit = 4\n";

/// Upper bound for any single exchange.
const LIMIT: Duration = Duration::from_secs(20);

/// How long a probe of a route waits for its answer's head.
const PROBE: Duration = Duration::from_secs(3);

const HTTP_METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

// --- The document ----------------------------------------------------------------------

/// The document, and which operations real traffic has reached.
struct Spec {
    doc: Value,
    covered: Mutex<BTreeMap<(String, String), BTreeSet<u16>>>,
}

impl Spec {
    async fn fetch(url: &str) -> Spec {
        let response = reqwest::get(format!("{url}/openapi.json")).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "content type of /openapi.json"
        );
        let text = response.text().await.unwrap();
        let doc: Value = serde_json::from_str(&text).expect("/openapi.json is JSON");
        Spec {
            doc,
            covered: Mutex::new(BTreeMap::new()),
        }
    }

    fn paths(&self) -> &serde_json::Map<String, Value> {
        self.doc["paths"].as_object().expect("paths is an object")
    }

    /// The target of a local `$ref` (`#/…`, a JSON pointer).
    fn target(&self, reference: &str) -> Option<&Value> {
        let pointer = reference.strip_prefix('#')?;
        self.doc.pointer(pointer)
    }

    /// Follows `$ref`s of reusable objects (responses, parameters, headers).
    fn deref<'a>(&'a self, mut value: &'a Value) -> &'a Value {
        for _ in 0..16 {
            match value.get("$ref").and_then(Value::as_str) {
                Some(reference) => {
                    value = self
                        .target(reference)
                        .unwrap_or_else(|| panic!("unresolved $ref {reference}"))
                }
                None => return value,
            }
        }
        panic!("$ref chain too long")
    }

    /// The methods a path documents, upper case.
    fn methods(&self, template: &str) -> BTreeSet<String> {
        let item = &self.paths()[template];
        HTTP_METHODS
            .iter()
            .filter(|m| item.get(**m).is_some())
            .map(|m| m.to_ascii_uppercase())
            .collect()
    }

    /// The documented path a concrete path falls under: the matching template with the
    /// most literal segments (OpenAPI's rule: concrete paths before templated ones). A
    /// trailing `{path}` stands for one or more segments.
    fn template_for(&self, path: &str) -> Option<String> {
        self.paths()
            .keys()
            .filter_map(|template| match_template(template, path).map(|n| (n, template)))
            .max_by_key(|(n, _)| *n)
            .map(|(_, template)| template.clone())
    }

    /// Validates `value` against `schema` (which may `$ref` the document's components).
    fn check(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        let root = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "components": self.doc["components"],
            "allOf": [schema],
        });
        let validator = jsonschema::draft202012::new(&root)
            .map_err(|err| format!("{at}: invalid schema {schema}: {err}"))?;
        let errors: Vec<String> = validator
            .iter_errors(value)
            .map(|err| format!("{at}{}: {err}", err.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Sends a request, reads the answer and checks it against the document.
    async fn send(&self, request: RequestBuilder) -> Reply {
        let request = request.build().expect("a valid request");
        let method = request.method().as_str().to_ascii_lowercase();
        let path = request.url().path().to_owned();
        let sends_json = request
            .headers()
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap_or("").contains("json"));
        let request_json = match request.body().and_then(|b| b.as_bytes()) {
            Some(bytes) if sends_json => serde_json::from_slice::<Value>(bytes).ok(),
            _ => None,
        };
        let template = self
            .template_for(&path)
            .unwrap_or_else(|| panic!("{method} {path}: no documented path matches"));
        let response = tokio::time::timeout(LIMIT, reqwest::Client::new().execute(request))
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no response within {LIMIT:?}"))
            .expect("relay reachable");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let event_stream = content_type(&headers) == "text/event-stream";
        let body = if event_stream {
            // Headers only: the stream stays open; dropping the response ends it.
            drop(response);
            Vec::new()
        } else {
            tokio::time::timeout(LIMIT, response.bytes())
                .await
                .expect("body within the limit")
                .expect("body")
                .to_vec()
        };
        let reply = Reply {
            status,
            headers,
            body,
        };
        let what = format!("{} {path} ({template}) → {status}", method.to_uppercase());
        self.validate(&template, &method, &reply, request_json.as_ref(), &what);
        reply
    }

    /// Sends and asserts the status.
    async fn expect(&self, request: RequestBuilder, status: u16) -> Reply {
        let reply = self.send(request).await;
        assert_eq!(
            reply.status,
            status,
            "unexpected status; body: {}",
            String::from_utf8_lossy(&reply.body)
        );
        reply
    }

    fn validate(
        &self,
        template: &str,
        method: &str,
        reply: &Reply,
        request_json: Option<&Value>,
        what: &str,
    ) {
        let source = reply
            .header("x-syncrelay-source")
            .unwrap_or_else(|| panic!("{what}: no X-Syncrelay-Source"))
            .to_owned();
        assert!(
            ["daemon", "cache", "relay"].contains(&source.as_str()),
            "{what}: X-Syncrelay-Source {source}"
        );
        let item = &self.paths()[template];
        let Some(operation) = item.get(method) else {
            // Not documented for this path: the router must refuse it, naming exactly the
            // documented methods.
            assert_eq!(reply.status, 405, "{what}: undocumented method answered");
            let allow: BTreeSet<String> = reply
                .header("allow")
                .unwrap_or_else(|| panic!("{what}: 405 without Allow"))
                .split(',')
                .map(|m| m.trim().to_owned())
                .collect();
            assert_eq!(allow, self.methods(template), "{what}: Allow vs document");
            let error = self.doc["components"]["schemas"]["Error"].clone();
            self.check(&error, &reply.json(), "body")
                .unwrap_or_else(|err| panic!("{what}: {err}"));
            return;
        };
        self.covered
            .lock()
            .unwrap()
            .entry((template.to_owned(), method.to_owned()))
            .or_default()
            .insert(reply.status);
        let responses = operation["responses"].as_object().expect("responses");
        let status = reply.status.to_string();
        // The daemon's own non-2xx answers (mirrored calls) fall under `default`; the
        // relay's own must be listed by code.
        let success = (200..300).contains(&reply.status);
        let entry = match (responses.get(&status), responses.get("default")) {
            (Some(entry), _) if success => entry,
            (_, Some(default)) if source != "relay" => default,
            (Some(entry), _) => entry,
            _ => panic!(
                "{what}: status not documented (source {source}); documented: {:?}",
                responses.keys().collect::<Vec<_>>()
            ),
        };
        let entry = self.deref(entry);
        for (name, header) in entry["headers"].as_object().into_iter().flatten() {
            let header = self.deref(header);
            if header["required"] == true {
                assert!(
                    reply.headers.contains_key(name.as_str()),
                    "{what}: required header {name} missing"
                );
            }
        }
        // A cached copy says how old it is wherever the document lists `Age`.
        if source == "cache" && entry.pointer("/headers/Age").is_some() {
            assert!(
                reply.headers.contains_key("age"),
                "{what}: cache without Age"
            );
        }
        let content = entry.get("content").and_then(Value::as_object);
        let media_type = content_type(&reply.headers);
        let ndjson = media_type == "application/x-ndjson";
        let is_json = media_type.contains("json") && !ndjson;
        if media_type == "text/event-stream" {
            assert!(
                content.is_some_and(|c| c.contains_key("text/event-stream")),
                "{what}: an event stream is not documented here"
            );
        } else if !reply.body.is_empty() {
            let content =
                content.unwrap_or_else(|| panic!("{what}: a body, but no documented content"));
            let media = content
                .get(&media_type)
                .or_else(|| content.get("*/*"))
                .unwrap_or_else(|| panic!("{what}: content type {media_type:?} not documented"));
            let schema = media.get("schema").cloned().unwrap_or(json!({}));
            if is_json {
                self.check(&schema, &reply.json(), "body")
                    .unwrap_or_else(|err| panic!("{what}: {err}"));
            }
            if ndjson {
                for line in String::from_utf8_lossy(&reply.body).lines() {
                    let value: Value = serde_json::from_str(line)
                        .unwrap_or_else(|err| panic!("{what}: line {line:?}: {err}"));
                    self.check(&schema, &value, "line")
                        .unwrap_or_else(|err| panic!("{what}: {err}"));
                }
            }
        }
        // A request the relay accepted must match its documented request body.
        if let (true, Some(body)) = ((200..300).contains(&reply.status), request_json) {
            if let Some(schema) = operation.pointer("/requestBody/content/application~1json/schema")
            {
                self.check(schema, body, "request")
                    .unwrap_or_else(|err| panic!("{what}: {err}"));
            }
        }
    }
}

/// The number of literal segments when `template` matches `path`.
fn match_template(template: &str, path: &str) -> Option<usize> {
    let wanted: Vec<&str> = template.trim_start_matches('/').split('/').collect();
    let actual: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut literals = 0;
    for (i, segment) in wanted.iter().enumerate() {
        if *segment == "{path}" && i == wanted.len() - 1 {
            let rest = actual.get(i..)?;
            return (!rest.is_empty() && rest.iter().all(|s| !s.is_empty())).then_some(literals);
        }
        let given = actual.get(i)?;
        if segment.starts_with('{') {
            if given.is_empty() {
                return None;
            }
        } else if segment != given {
            return None;
        } else {
            literals += 1;
        }
    }
    (wanted.len() == actual.len()).then_some(literals)
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Every `$ref` string in `value`, with where it occurs.
fn refs(value: &Value, at: String, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                if key == "$ref" {
                    out.push((at.clone(), child.as_str().unwrap_or("").to_owned()));
                } else {
                    refs(child, format!("{at}/{key}"), out);
                }
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                refs(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

// --- The document itself --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_is_openapi_3_1_and_every_ref_resolves() {
    let relay = TestRelay::start().await;
    let spec = Spec::fetch(&relay.url).await;
    let doc = &spec.doc;
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    assert_eq!(doc["servers"][0]["url"], "/");
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    assert_eq!(schemes["bearerAuth"]["scheme"], "bearer");
    assert_eq!(schemes["accessToken"]["in"], "query");
    assert_eq!(schemes["accessToken"]["name"], "access_token");
    assert_eq!(schemes["mutualTLS"]["type"], "mutualTLS");

    let mut found = Vec::new();
    refs(doc, String::new(), &mut found);
    assert!(found.len() > 50, "suspiciously few $refs: {}", found.len());
    for (at, reference) in &found {
        assert!(
            spec.target(reference).is_some(),
            "{at}: $ref {reference:?} does not resolve"
        );
    }

    // Every wire type has a schema.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "Error",
        "ConnectRequest",
        "ConnectResponse",
        "Update",
        "PollRequest",
        "PollResponse",
        "Command",
        "HttpCommandParams",
        "HttpResult",
        "ResultsRequest",
        "ResultEntry",
        "ResultsResponse",
        "CommandView",
        "CommandState",
        "Daemon",
        "DaemonList",
        "Change",
        "ChangesResponse",
        "StreamEvent",
        "NamedCommandRequest",
        "CreateKeyRequest",
        "KeyView",
        "CreatedKey",
        "KeyList",
        "RevokedKey",
    ] {
        assert!(schemas.contains_key(name), "no schema {name}");
    }
    assert_eq!(
        schemas["CommandState"]["enum"],
        json!(["queued", "delivered", "completed", "failed", "expired"])
    );

    // Operations: unique ids; every error response is the Error schema; every path
    // parameter is declared.
    let mut ids = BTreeSet::new();
    for (template, item) in spec.paths() {
        let mut declared: BTreeSet<String> = BTreeSet::new();
        for parameter in item["parameters"].as_array().into_iter().flatten() {
            let parameter = spec.deref(parameter);
            if parameter["in"] == "path" {
                declared.insert(parameter["name"].as_str().unwrap().to_owned());
            }
        }
        for method in HTTP_METHODS {
            let Some(operation) = item.get(*method) else {
                continue;
            };
            let id = operation["operationId"].as_str().unwrap();
            assert!(ids.insert(id.to_owned()), "duplicate operationId {id}");
            assert!(operation["security"].is_array(), "{id}: no security");
            let responses = operation["responses"].as_object().unwrap();
            assert!(!responses.is_empty(), "{id}: no responses");
            for (code, response) in responses {
                let response = spec.deref(response);
                assert!(response["description"].is_string(), "{id} {code}");
                if code.starts_with('4') || (code.starts_with('5') && code != "501") {
                    let schema = &response["content"]["application/json"]["schema"];
                    assert_eq!(
                        schema["$ref"], "#/components/schemas/Error",
                        "{id} {code}: errors use the Error schema"
                    );
                }
            }
            let mut all = declared.clone();
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                let parameter = spec.deref(parameter);
                if parameter["in"] == "path" {
                    all.insert(parameter["name"].as_str().unwrap().to_owned());
                }
            }
            let in_template: BTreeSet<String> = template
                .split('/')
                .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                .map(str::to_owned)
                .collect();
            assert_eq!(all, in_template, "{template} {method}: path parameters");
        }
    }

    // The schema checker itself: it must reject what the schemas forbid.
    let error = json!({ "$ref": "#/components/schemas/Error" });
    assert!(spec
        .check(
            &error,
            &json!({"error": {"code": "x", "message": "y"}}),
            "e"
        )
        .is_ok());
    assert!(spec
        .check(&error, &json!({"error": {"code": "x"}}), "e")
        .is_err());
    assert!(spec
        .check(&error, &json!({"error": {"code": 1, "message": "y"}}), "e")
        .is_err());
    let daemon = json!({ "$ref": "#/components/schemas/Daemon" });
    let mut view = json!({"daemon_id": "d", "online": true, "last_seen": null, "version": null,
                          "capabilities": [], "queued": 0, "last_seq": 0});
    assert!(spec.check(&daemon, &view, "d").is_ok());
    view["last_seen"] = json!(5);
    assert!(spec.check(&daemon, &view, "d").is_err());
    let state = json!({ "$ref": "#/components/schemas/CommandState" });
    assert!(spec.check(&state, &json!("running"), "s").is_err());
    let entry = json!({ "$ref": "#/components/schemas/ResultEntry" });
    assert!(spec
        .check(&entry, &json!({"command_id": "c", "chunk": 0}), "r")
        .is_ok());
    assert!(spec.check(&entry, &json!({"chunk": 0}), "r").is_err());
}

// --- The router's routes ---------------------------------------------------------------

/// `syncrelay_requests_total` by route template: what the router matched.
async fn route_counts(url: &str) -> BTreeMap<String, f64> {
    common::metrics_text(&reqwest::Client::new(), url)
        .await
        .lines()
        .filter_map(|line| line.strip_prefix("syncrelay_requests_total{route=\""))
        .map(|rest| {
            let (template, count) = rest.split_once("\"} ").expect("a counter line");
            (template.to_owned(), count.parse().expect("a count"))
        })
        .collect()
}

/// A concrete path for a documented template.
fn concrete(template: &str) -> String {
    template
        .replace("{daemon_id}", "d")
        .replace("{path}", "sessions")
        .replace('{', "x-")
        .replace('}', "")
}

/// Every method on every documented path: the route the router matched (as `/metrics`
/// counts it) is always a documented one, and it answers exactly the methods the document
/// lists there; any other is 405 with `Allow` naming exactly those. The handlers' routes
/// and their documentation are registered together (utoipa-axum), so a route without a
/// document would have to bypass that; this is the black-box check that none does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_routed_path_is_documented() {
    let relay = TestRelay::start().await;
    let spec = Spec::fetch(&relay.url).await;
    // "d" never connects: mirrored calls answer 503 at once.
    let client = relay.key("client", None, Some(&["*"])).await;
    let daemon = relay.key("daemon", Some("d"), None).await;
    let documented: BTreeSet<String> = spec.paths().keys().cloned().collect();
    let before = route_counts(&relay.url).await;
    for template in &documented {
        assert!(before.contains_key(template), "{template} is not counted");
    }
    let http = reqwest::Client::new();
    for template in &documented {
        let path = concrete(template);
        let token = match path.split('/').nth(1) {
            Some("admin") => &relay.admin_token,
            Some("sync") => &daemon,
            _ => &client,
        };
        for method in HTTP_METHODS {
            let method =
                reqwest::Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
            let before = route_counts(&relay.url).await;
            let request = http
                .request(method.clone(), format!("{}{path}", relay.url))
                .bearer_auth(token)
                // Writes to the offline daemon are queued, not waited for.
                .header("prefer", "respond-async")
                .timeout(PROBE)
                .send();
            // No answer in time: a handler is waiting (a context stream waits for its
            // daemon), which a refused method never does.
            let (status, allow) = match request.await {
                Ok(response) => (
                    response.status().as_u16(),
                    response
                        .headers()
                        .get("allow")
                        .map(|v| v.to_str().unwrap().to_owned()),
                ),
                Err(err) if err.is_timeout() => (0, None),
                Err(err) => panic!("{method} {path}: {err}"),
            };
            let mut after = route_counts(&relay.url).await;
            // The scrape counts itself.
            *after.get_mut("/metrics").unwrap() -= 1.0;
            let matched: Vec<&String> = after
                .iter()
                .filter(|(t, n)| **n > before.get(*t).copied().unwrap_or(0.0))
                .map(|(t, _)| t)
                .collect();
            let what = format!("{method} {path}");
            assert_eq!(matched.len(), 1, "{what}: matched {matched:?}");
            let route = matched[0];
            assert!(
                documented.contains(route),
                "{what}: the router matched {route}, which the document lacks"
            );
            let methods = spec.methods(route);
            if methods.contains(method.as_str()) {
                assert_ne!(status, 405, "{what}: a documented method refused");
            } else {
                assert_eq!(status, 405, "{what}: an undocumented method answered");
                let allow: BTreeSet<String> = allow
                    .unwrap_or_else(|| panic!("{what}: 405 without Allow"))
                    .split(',')
                    .map(|m| m.trim().to_owned())
                    .collect();
                assert_eq!(allow, methods, "{what}: Allow vs document");
            }
        }
    }
    // A path no route matches is counted as such, and is 404.
    let before = route_counts(&relay.url).await["unmatched"];
    let reply = http
        .get(format!("{}/nothing/here", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 404);
    assert_eq!(route_counts(&relay.url).await["unmatched"], before + 1.0);
}

// --- Real traffic ----------------------------------------------------------------------

/// A key made through `POST /admin/keys` (checked): its token and id.
async fn create_key(spec: &Spec, relay: &TestRelay, body: Value) -> (String, String) {
    let reply = spec
        .expect(
            admin(relay, reqwest::Method::POST, "/admin/keys").json(&body),
            201,
        )
        .await;
    let created = reply.json();
    (
        created["token"].as_str().unwrap().to_owned(),
        created["key_id"].as_str().unwrap().to_owned(),
    )
}

fn admin(relay: &TestRelay, method: reqwest::Method, path: &str) -> RequestBuilder {
    authed(relay, method, path, &relay.admin_token)
}

fn authed(relay: &TestRelay, method: reqwest::Method, path: &str, token: &str) -> RequestBuilder {
    anonymous(relay, method, path).bearer_auth(token)
}

fn anonymous(relay: &TestRelay, method: reqwest::Method, path: &str) -> RequestBuilder {
    reqwest::Client::new().request(method, format!("{}{path}", relay.url))
}

/// A daemon speaking the sync protocol through the checker.
#[derive(Clone)]
struct Daemon {
    spec: Arc<Spec>,
    url: String,
    id: String,
    key: String,
    connection_id: String,
}

impl Daemon {
    fn post(&self, route: &str, body: Value) -> RequestBuilder {
        reqwest::Client::new()
            .post(format!("{}{route}", self.url))
            .bearer_auth(&self.key)
            .json(&body)
    }

    async fn connect(spec: &Arc<Spec>, relay: &TestRelay, id: &str, key: &str) -> Daemon {
        let mut daemon = Daemon {
            spec: spec.clone(),
            url: relay.url.clone(),
            id: id.to_owned(),
            key: key.to_owned(),
            connection_id: String::new(),
        };
        let body = json!({ "daemon_id": id, "version": "1.2.3", "capabilities": ["sessions", "streaming"] });
        let reply = spec.expect(daemon.post("/sync/connect", body), 200).await;
        daemon.connection_id = reply.json()["connection_id"].as_str().unwrap().to_owned();
        daemon
    }

    async fn poll(&self, wait: f64) -> Vec<Value> {
        let body = json!({
            "daemon_id": self.id, "connection_id": self.connection_id,
            "updates": [], "wait_for_commands": wait > 0.0, "timeout": wait,
        });
        let reply = self.spec.expect(self.post("/sync/poll", body), 200).await;
        reply.json()["commands"].as_array().cloned().unwrap()
    }

    /// A poll on its own task, so the test can play the client meanwhile.
    fn spawn_poll(&self, wait: f64) -> tokio::task::JoinHandle<Vec<Value>> {
        let daemon = self.clone();
        tokio::spawn(async move { daemon.poll(wait).await })
    }

    async fn results(&self, results: Value, status: u16) -> Value {
        let body = json!({ "daemon_id": self.id, "results": results });
        self.spec
            .expect(self.post("/sync/results", body), status)
            .await
            .json()
    }
}

async fn joined<T>(task: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(LIMIT, task)
        .await
        .expect("finished in time")
        .expect("task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_traffic_matches_the_document() {
    use reqwest::Method;
    let relay = TestRelay::start_with(CONFIG).await;
    let spec = Arc::new(Spec::fetch(&relay.url).await);
    let get = |path: &str, token: &str| authed(&relay, Method::GET, path, token);

    // Operations routes: no credentials.
    let health = spec
        .expect(anonymous(&relay, Method::GET, "/healthz"), 200)
        .await;
    assert_eq!(health.json(), json!({ "status": "ok" }));
    spec.expect(anonymous(&relay, Method::HEAD, "/healthz"), 200)
        .await;
    spec.expect(anonymous(&relay, Method::GET, "/readyz"), 200)
        .await;
    spec.expect(anonymous(&relay, Method::HEAD, "/readyz"), 200)
        .await;
    let metrics = spec
        .expect(anonymous(&relay, Method::GET, "/metrics"), 200)
        .await;
    assert!(String::from_utf8_lossy(&metrics.body).contains("syncrelay_"));
    spec.expect(anonymous(&relay, Method::GET, "/openapi.json"), 200)
        .await;
    for (method, path) in [
        (Method::PUT, "/healthz"),
        (Method::POST, "/readyz"),
        (Method::POST, "/metrics"),
        (Method::DELETE, "/openapi.json"),
    ] {
        spec.expect(anonymous(&relay, method, path), 405).await;
    }

    // Admin: keys and the operator's daemon list.
    let (d1_key, _) = create_key(&spec, &relay, json!({"role": "daemon", "daemon": "d1"})).await;
    let (d2_key, _) = create_key(
        &spec,
        &relay,
        json!({"role": "daemon", "daemon": "d2", "label": "second"}),
    )
    .await;
    create_key(&spec, &relay, json!({"role": "daemon", "daemon": "off"})).await;
    let (client, _) = create_key(
        &spec,
        &relay,
        json!({"role": "client", "scope": ["d1", "d2", "off"], "label": "phone"}),
    )
    .await;
    let (stranger, _) = create_key(
        &spec,
        &relay,
        json!({"role": "client", "scope": ["elsewhere"]}),
    )
    .await;
    let (_, temp_id) = create_key(&spec, &relay, json!({"role": "admin", "label": "temp"})).await;
    let bad_role = admin(&relay, Method::POST, "/admin/keys").json(&json!({"role": "wizard"}));
    spec.expect(bad_role, 400).await;
    let unauthenticated =
        anonymous(&relay, Method::POST, "/admin/keys").json(&json!({"role": "admin"}));
    spec.expect(unauthenticated, 401).await;
    let huge = admin(&relay, Method::POST, "/admin/keys")
        .header("content-type", "application/json")
        .body(format!(
            "{{\"role\":\"admin\",\"label\":\"{}\"}}",
            "x".repeat(70_000)
        ));
    spec.expect(huge, 413).await;
    let keys = spec
        .expect(admin(&relay, Method::GET, "/admin/keys"), 200)
        .await
        .json();
    assert!(keys["keys"].as_array().unwrap().len() >= 7, "{keys}");
    assert!(keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k.get("token").is_none()));
    spec.expect(get("/admin/keys", &client), 403).await;
    spec.expect(admin(&relay, Method::PUT, "/admin/keys"), 405)
        .await;
    let revoke = format!("/admin/keys/{temp_id}");
    let revoked = spec
        .expect(admin(&relay, Method::DELETE, &revoke), 200)
        .await;
    assert_eq!(revoked.json(), json!({ "revoked": temp_id }));
    spec.expect(admin(&relay, Method::DELETE, &revoke), 404)
        .await;
    spec.expect(admin(&relay, Method::GET, &revoke), 405).await;
    let all = spec
        .expect(admin(&relay, Method::GET, "/admin/daemons"), 200)
        .await
        .json();
    assert_eq!(all["daemons"].as_array().unwrap().len(), 3, "{all}");
    spec.expect(admin(&relay, Method::POST, "/admin/daemons"), 405)
        .await;
    spec.expect(get("/admin/daemons", &client), 403).await;
    // The operator's read routes (the console's data) and the console's own files.
    let stats = spec
        .expect(admin(&relay, Method::GET, "/admin/stats"), 200)
        .await
        .json();
    assert_eq!(stats["daemons"]["total"], 3, "{stats}");
    spec.expect(get("/admin/stats", &client), 403).await;
    spec.expect(anonymous(&relay, Method::GET, "/admin/stats"), 401)
        .await;
    for tail in [
        "",
        "/changes?since=0",
        "/commands?limit=5",
        "/contexts",
        "/events",
    ] {
        spec.expect(
            admin(&relay, Method::GET, &format!("/admin/daemons/d1{tail}")),
            200,
        )
        .await;
        spec.expect(get(&format!("/admin/daemons/d1{tail}"), &client), 403)
            .await;
    }
    spec.expect(
        admin(&relay, Method::GET, "/admin/daemons/nobody/commands"),
        404,
    )
    .await;
    spec.expect(
        admin(&relay, Method::GET, "/admin/daemons/d1/commands?limit=0"),
        400,
    )
    .await;
    spec.expect(admin(&relay, Method::POST, "/admin/stats"), 405)
        .await;
    let page = spec
        .expect(anonymous(&relay, Method::GET, "/console"), 200)
        .await;
    let etag = page.header("etag").unwrap().to_owned();
    spec.expect(
        anonymous(&relay, Method::GET, "/console").header("if-none-match", etag),
        304,
    )
    .await;
    for asset in ["console.js", "console.css"] {
        spec.expect(
            anonymous(&relay, Method::GET, &format!("/console/{asset}")),
            200,
        )
        .await;
    }
    spec.expect(anonymous(&relay, Method::GET, "/console/missing.js"), 404)
        .await;
    spec.expect(anonymous(&relay, Method::POST, "/console"), 405)
        .await;
    let backups = tempfile::tempdir().unwrap();
    let into = backups.path().join("copy");
    let backup =
        |to: &Path| admin(&relay, Method::POST, "/admin/backup").json(&json!({ "to": to }));
    let lines = spec.expect(backup(&into), 200).await.text();
    let last: Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    assert_eq!(last["done"], true, "{lines}");
    assert!(into.join("db").is_dir() && into.join("admin.key").is_file());
    let again = spec.expect(backup(&into), 400).await;
    assert!(again.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not empty"));
    spec.expect(backup(Path::new("relative/dir")), 400).await;
    spec.expect(admin(&relay, Method::GET, "/admin/backup"), 405)
        .await;
    let as_client = authed(&relay, Method::POST, "/admin/backup", &client)
        .json(&json!({ "to": backups.path().join("other") }));
    spec.expect(as_client, 403).await;

    // The sync protocol, daemon d1 driven by hand.
    let d1 = Daemon::connect(&spec, &relay, "d1", &d1_key).await;
    let wrong = d1.post("/sync/connect", json!({ "daemon_id": "d2" }));
    spec.expect(wrong, 403).await;
    let as_client =
        authed(&relay, Method::POST, "/sync/connect", &client).json(&json!({ "daemon_id": "d1" }));
    spec.expect(as_client, 403).await;
    let not_json = authed(&relay, Method::POST, "/sync/connect", &d1_key)
        .header("content-type", "application/json")
        .body("{");
    spec.expect(not_json, 400).await;
    spec.expect(get("/sync/poll", &d1_key), 405).await;
    let updates = json!({
        "daemon_id": "d1", "connection_id": d1.connection_id, "wait_for_commands": false,
        "updates": [
            { "type": "session_created", "data": { "session_id": "s1" },
              "timestamp": "2026-01-01T00:00:00Z", "seq": 1 },
            { "type": "approval_requested", "data": { "session_id": "s1", "approval_id": "a1" }, "seq": 2 },
        ],
    });
    let polled = spec
        .expect(d1.post("/sync/poll", updates), 200)
        .await
        .json();
    assert_eq!(polled["last_update_seq"], 2);
    let stale = json!({ "daemon_id": "d1", "connection_id": "conn-stale" });
    let superseded = spec.expect(d1.post("/sync/poll", stale), 409).await.json();
    assert_eq!(superseded["error"]["code"], "superseded");
    let unknown = d1
        .results(
            json!([{ "command_id": "cmd-nope", "result": { "status": 200 } }]),
            200,
        )
        .await;
    assert_eq!(unknown, json!({ "accepted": [], "unknown": ["cmd-nope"] }));
    let oversized = d1.post("/sync/results", json!({})).body(format!(
        "{{\"daemon_id\":\"d1\",\"results\":[],\"x\":\"{}\"}}",
        "y".repeat(70_000)
    ));
    spec.expect(oversized, 413).await;
    // This client speaks HTTP/1.1: the stream refuses it in the documented error shape
    // (tests/sync_stream.rs speaks the stream itself, over HTTP/2).
    let stream_path = format!(
        "/sync/stream?daemon_id=d1&connection_id={}",
        d1.connection_id
    );
    let http1 = authed(&relay, Method::POST, &stream_path, &d1_key).body("{}\n");
    let refused = spec.expect(http1, 400).await.json();
    assert!(refused["error"]["message"]
        .as_str()
        .unwrap()
        .contains("HTTP/2"));

    // The client API the relay answers itself.
    let listed = spec
        .expect(get("/api/v1/daemons", &client), 200)
        .await
        .json();
    assert_eq!(listed["daemons"].as_array().unwrap().len(), 3, "{listed}");
    spec.expect(anonymous(&relay, Method::GET, "/api/v1/daemons"), 401)
        .await;
    spec.expect(get("/api/v1/daemons", &d1_key), 403).await;
    spec.expect(
        authed(&relay, Method::POST, "/api/v1/daemons", &client),
        405,
    )
    .await;
    let one = spec
        .expect(get("/api/v1/daemons/d1", &client), 200)
        .await
        .json();
    assert_eq!(
        (one["online"].clone(), one["last_seq"].clone()),
        (json!(true), json!(2))
    );
    spec.expect(get("/api/v1/daemons/d1", &stranger), 404).await;
    spec.expect(get("/api/v1/daemons/bad%20id", &client), 400)
        .await;
    spec.expect(
        authed(&relay, Method::DELETE, "/api/v1/daemons/d1", &client),
        405,
    )
    .await;
    let changes = spec
        .expect(
            get("/api/v1/daemons/d1/changes?since=0&limit=10", &client),
            200,
        )
        .await
        .json();
    assert_eq!(changes["changes"].as_array().unwrap().len(), 2, "{changes}");
    assert_eq!(changes["last_seq"], 2);
    spec.expect(get("/api/v1/daemons/d1/changes?limit=0", &client), 400)
        .await;
    spec.expect(get("/api/v1/daemons/d1/changes", &stranger), 404)
        .await;
    spec.expect(
        authed(&relay, Method::POST, "/api/v1/daemons/d1/changes", &client),
        405,
    )
    .await;
    let events = format!("/api/v1/daemons/d1/stream/events?since=0&access_token={client}");
    let sse = spec
        .expect(anonymous(&relay, Method::GET, &events), 200)
        .await;
    assert_eq!(sse.header("cache-control"), Some("no-cache"));
    let bad_resume = get("/api/v1/daemons/d1/stream/events", &client).header("last-event-id", "x");
    spec.expect(bad_resume, 400).await;
    spec.expect(
        anonymous(&relay, Method::GET, "/api/v1/daemons/d1/stream/events"),
        401,
    )
    .await;
    let events_post = authed(
        &relay,
        Method::POST,
        "/api/v1/daemons/d1/stream/events",
        &client,
    );
    spec.expect(events_post, 405).await;
    spec.expect(get("/api/v1/daemons/d1/commands", &client), 405)
        .await;

    // A named command answered by d1, then looked up.
    let named = authed(&relay, Method::POST, "/api/v1/daemons/d1/commands", &client)
        .header("prefer", "wait=10")
        .json(&json!({ "method": "getApproval", "params": { "approval_id": "a1" } }));
    let pending = {
        let spec = spec.clone();
        tokio::spawn(async move { spec.send(named).await })
    };
    let commands = d1.poll(5.0).await;
    assert_eq!(commands.len(), 1, "{commands:?}");
    assert_eq!(commands[0]["method"], "getApproval");
    let command_id = commands[0]["id"].as_str().unwrap().to_owned();
    let taken = d1
        .results(json!([{ "command_id": command_id, "result": { "approval": { "id": "a1" } }, "error": null }]), 200)
        .await;
    assert_eq!(taken["accepted"], json!([command_id]));
    let answered = joined(pending).await;
    assert_eq!(
        (answered.status, answered.header("x-syncrelay-source")),
        (200, Some("daemon"))
    );
    assert_eq!(answered.json(), json!({ "approval": { "id": "a1" } }));
    let lookup = format!("/api/v1/commands/{command_id}");
    let view = spec
        .expect(get(&format!("{lookup}?wait=1"), &client), 200)
        .await
        .json();
    assert_eq!(
        (view["state"].clone(), view["deliveries"].clone()),
        (json!("completed"), json!(1))
    );
    spec.expect(get(&lookup, &stranger), 404).await;
    spec.expect(get(&format!("{lookup}?wait=soon"), &client), 400)
        .await;
    spec.expect(get(&lookup, &d1_key), 403).await;
    spec.expect(authed(&relay, Method::DELETE, &lookup, &client), 405)
        .await;
    spec.expect(get("/api/v1/commands/cmd-none", &client), 404)
        .await;
    let empty_name = authed(&relay, Method::POST, "/api/v1/daemons/d1/commands", &client)
        .json(&json!({ "method": "" }));
    spec.expect(empty_name, 400).await;

    // A named command the daemon fails: 502 with the daemon's own error.
    let failing = authed(&relay, Method::POST, "/api/v1/daemons/d1/commands", &client)
        .header("prefer", "wait=10")
        .json(&json!({ "method": "deleteEverything" }));
    let pending = {
        let spec = spec.clone();
        tokio::spawn(async move { spec.send(failing).await })
    };
    let commands = d1.poll(5.0).await;
    let id = commands[0]["id"].as_str().unwrap().to_owned();
    let error = json!({ "code": "denied", "message": "not allowed", "details": { "why": "test" } });
    d1.results(json!([{ "command_id": id, "error": error }]), 200)
        .await;
    let failed = joined(pending).await;
    assert_eq!(failed.status, 502);
    assert_eq!(failed.json()["error"]["code"], "denied");
    let view = spec
        .expect(get(&format!("/api/v1/commands/{id}"), &client), 200)
        .await
        .json();
    assert_eq!(view["state"], "failed");

    // A read d1 does not answer in time: 504.
    let poll = d1.spawn_poll(5.0);
    let slow = get("/api/v1/daemons/d1/sessions", &client).header("prefer", "wait=1");
    let timed_out = spec.expect(slow, 504).await.json();
    assert_eq!(timed_out["error"]["code"], "timeout");
    assert_eq!(joined(poll).await.len(), 1);

    // Cache-and-serve: a stream path fetched once with stream chunks, then replayed.
    let stream_path = "/api/v1/daemons/d1/approvals/a1/context/stream";
    let poll = d1.spawn_poll(5.0);
    let fetch = get(stream_path, &client);
    let pending = {
        let spec = spec.clone();
        tokio::spawn(async move { spec.send(fetch).await })
    };
    let commands = joined(poll).await;
    assert_eq!(commands.len(), 1, "{commands:?}");
    assert_eq!(commands[0]["stream"], true);
    let id = commands[0]["id"].as_str().unwrap().to_owned();
    let first = json!([{
        "command_id": id, "chunk": 0, "status": 200,
        "headers": { "content-type": "text/event-stream" },
        "data": "data: a\n\n", "complete": false,
    }]);
    d1.results(first, 200).await;
    let gap = d1
        .results(json!([{ "command_id": id, "chunk": 5, "data": "x" }]), 409)
        .await;
    assert_eq!(gap["error"]["details"]["expected"], 1, "{gap}");
    let last =
        json!([{ "command_id": id, "chunk": 1, "data_base64": "ZGF0YTogYgoK", "complete": true }]);
    d1.results(last, 200).await;
    let streamed = joined(pending).await;
    assert_eq!(
        (streamed.status, streamed.header("x-syncrelay-source")),
        (200, Some("daemon"))
    );
    let replay = format!("{stream_path}?access_token={client}");
    let replayed = spec
        .expect(anonymous(&relay, Method::GET, &replay), 200)
        .await;
    assert_eq!(replayed.header("x-syncrelay-source"), Some("cache"));

    // Mirrored calls answered by daemon d2's loop.
    let d2 = Daemon::connect(&spec, &relay, "d2", &d2_key).await;
    let serving = {
        let d2 = d2.clone();
        tokio::spawn(async move {
            loop {
                for command in d2.poll(5.0).await {
                    let params = &command["params"];
                    let result = if params["path"] == "/api/v1/missing" {
                        json!({ "status": 404, "headers": { "content-type": "application/json" },
                                "body": { "error": { "code": "not_found", "message": "no such thing" } } })
                    } else {
                        json!({ "status": 200, "headers": { "content-type": "application/json", "x-daemon": "d2" },
                                "body": { "method": params["method"], "path": params["path"], "query": params["query"] } })
                    };
                    d2.results(
                        json!([{ "command_id": command["id"], "result": result }]),
                        200,
                    )
                    .await;
                }
            }
        })
    };
    let read =
        get("/api/v1/daemons/d2/sessions?leafOnly=true", &client).header("prefer", "wait=10");
    let answer = spec.expect(read, 200).await;
    assert_eq!(answer.header("x-syncrelay-source"), Some("daemon"));
    assert_eq!(answer.json()["query"], "leafOnly=true");
    let head = authed(&relay, Method::HEAD, "/api/v1/daemons/d2/sessions", &client);
    spec.expect(head, 200).await;
    let options = authed(
        &relay,
        Method::OPTIONS,
        "/api/v1/daemons/d2/sessions",
        &client,
    );
    spec.expect(options, 200).await;
    let trace = authed(
        &relay,
        Method::TRACE,
        "/api/v1/daemons/d2/sessions",
        &client,
    );
    spec.expect(trace, 200).await;
    for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
        let write = authed(
            &relay,
            method.clone(),
            "/api/v1/daemons/d2/sessions/s1/messages",
            &client,
        )
        .header("prefer", "wait=10")
        .json(&json!({ "text": "hello" }));
        let answer = spec.expect(write, 200).await.json();
        assert_eq!(answer["method"], method.as_str());
    }
    let missing = spec
        .expect(get("/api/v1/daemons/d2/missing", &client), 404)
        .await;
    assert_eq!(missing.header("x-syncrelay-source"), Some("daemon"));
    let token_in_query = format!("/api/v1/daemons/d2/sessions?access_token={client}");
    spec.expect(anonymous(&relay, Method::GET, &token_in_query), 401)
        .await;
    spec.expect(get("/api/v1/daemons/d2/sessions", &stranger), 404)
        .await;
    spec.expect(get("/api/v1/daemons/d2/sessions", &d2_key), 403)
        .await;
    let too_big =
        authed(&relay, Method::POST, "/api/v1/daemons/d2/upload", &client).body(vec![b'z'; 70_000]);
    spec.expect(too_big, 413).await;

    // d2 goes away: its last GET is served from the cache, other reads are 503.
    serving.abort();
    let _ = serving.await;
    eventually(Duration::from_secs(15), || {
        let (spec, request) = (spec.clone(), get("/api/v1/daemons/d2", &client));
        async move { spec.expect(request, 200).await.json()["online"] == false }
    })
    .await;
    let cached = spec
        .expect(
            get("/api/v1/daemons/d2/sessions?leafOnly=true", &client),
            200,
        )
        .await;
    assert_eq!(cached.header("x-syncrelay-source"), Some("cache"));
    let offline = spec
        .expect(get("/api/v1/daemons/d2/other", &client), 503)
        .await;
    assert_eq!(offline.json()["error"]["code"], "daemon_offline");

    // Daemon "off" never connects: writes are queued (202), reads are not.
    let fail_fast = authed(
        &relay,
        Method::POST,
        "/api/v1/daemons/off/sessions",
        &client,
    )
    .header("x-syncrelay-if-offline", "fail")
    .json(&json!({}));
    spec.expect(fail_fast, 503).await;
    let queued = authed(
        &relay,
        Method::POST,
        "/api/v1/daemons/off/sessions",
        &client,
    )
    .header("prefer", "respond-async")
    .json(&json!({ "query": "later" }));
    let queued = spec.expect(queued, 202).await;
    let location = queued.header("location").unwrap().to_owned();
    assert_eq!(
        location,
        format!("/api/v1/commands/{}", queued.json()["id"].as_str().unwrap())
    );
    let view = spec.expect(get(&location, &client), 200).await.json();
    assert_eq!(view["state"], "queued");
    let mut ids = BTreeSet::new();
    for _ in 0..2 {
        let retry = authed(
            &relay,
            Method::PUT,
            "/api/v1/daemons/off/sessions/s9",
            &client,
        )
        .header("prefer", "wait=0")
        .header("idempotency-key", "k-1")
        .json(&json!({ "title": "once" }));
        let reply = spec.expect(retry, 202).await.json();
        ids.insert(reply["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1, "Idempotency-Key made two commands: {ids:?}");
    let named_later = authed(
        &relay,
        Method::POST,
        "/api/v1/daemons/off/commands",
        &client,
    )
    .header("prefer", "respond-async")
    .json(&json!({ "method": "ping" }));
    spec.expect(named_later, 202).await;
    spec.expect(get("/api/v1/daemons/off/sessions", &client), 503)
        .await;
    let mut full = None;
    for _ in 0..10 {
        let more = authed(
            &relay,
            Method::DELETE,
            "/api/v1/daemons/off/sessions/s1",
            &client,
        )
        .header("prefer", "respond-async");
        let reply = spec.send(more).await;
        if reply.status == 429 {
            full = Some(reply);
            break;
        }
        assert_eq!(reply.status, 202);
    }
    let full = full.expect("the queue limit was never reached");
    assert_eq!(full.json()["error"]["code"], "queue_full");

    // Every documented operation was reached.
    let covered = spec.covered.lock().unwrap().clone();
    let mut missing = Vec::new();
    for (template, item) in spec.paths() {
        for method in HTTP_METHODS {
            if item.get(*method).is_some()
                && !covered.contains_key(&(template.clone(), (*method).to_owned()))
            {
                missing.push(format!("{} {template}", method.to_uppercase()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "operations never exercised: {missing:?}"
    );
    // What the router matched meanwhile: only documented templates.
    for (route, count) in route_counts(&relay.url).await {
        assert!(
            route == "unmatched" || spec.paths().contains_key(&route),
            "the router matched {route} ({count} requests), which the document lacks"
        );
    }

    // Last, since it locks this address out: failed authentications end in 429.
    let mut limited = None;
    for _ in 0..60 {
        let reply = spec
            .send(get("/api/v1/daemons", "srk_0000000000000000_wrong"))
            .await;
        if reply.status == 429 {
            limited = Some(reply);
            break;
        }
        assert_eq!(reply.status, 401);
    }
    let limited = limited.expect("failed authentications were never rate limited");
    assert_eq!(limited.json()["error"]["code"], "rate_limited");
    for ((template, method), statuses) in &covered {
        eprintln!("{} {template}: {statuses:?}", method.to_uppercase());
    }
}
