//! The relay's routes: an axum `Router` whose handlers carry their own OpenAPI
//! description, so `/openapi.json` is generated from the code that serves it
//! (utoipa-axum registers each handler's route and its documentation together).
//! Each route is registered with its [`Guard`]: who may call it, and whether a wrong
//! method is refused before the credentials are looked at (sync and client routes) or
//! after (daemon-scoped and admin routes, so a caller without credentials learns nothing
//! of what exists there). One layer ([`super::router::policy`]) applies the guards.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use std::collections::BTreeMap;

use axum::middleware::from_fn_with_state;
use http::request::Parts;
use http::{Method, StatusCode};
use serde::de::DeserializeOwned;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi as Document, PathItem, RefOr};
use utoipa::{Modify, OpenApi, ToResponse};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::routes;

use super::auth::Principal;
use super::http::{json, parse_json, read_body, ApiError};
use super::router::{has_backslash, is_dot_segment};
use super::{
    admin_api, changes, client, console, mirror, router, streams, sync, sync_stream, App, Response,
};
use crate::protocol::{
    BackupLine, BackupRequest, ChangesResponse, CommandList, CommandView, ConnectRequest,
    ConnectResponse, ContextList, CreateKeyRequest, CreatedKey, DaemonList, DaemonView, ErrorBody,
    Health, KeyList, NamedCommandRequest, PollRequest, PollResponse, RelayStats, ResultsRequest,
    ResultsResponse, RevokedKey, StreamDown, StreamUp,
};

type AppState = State<Arc<App>>;

/// The relay's router, before its state, and the OpenAPI document of every route in it.
///
/// Each route names its [`Guard`] where it is registered; one layer ([`router::policy`])
/// applies it. Each route answers exactly the methods its document lists (a `GET` route
/// does not answer `HEAD` unless it says so): any other is 405 with `Allow` naming those.
pub fn router() -> (axum::Router<Arc<App>>, Document) {
    use router::Need::{Admin, Client, Daemon, Sync};
    use Guard::{CredentialsFirst, MethodFirst, Open};
    let mut guards = Guards::default();
    let g = &mut guards;
    let (routes, mut document) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(g.add(Open, routes!(healthz)))
        .routes(g.add(Open, routes!(readyz)))
        .routes(g.add(Open, routes!(metrics)))
        .routes(g.add(Open, routes!(openapi)))
        .routes(g.add(MethodFirst(Sync), routes!(sync_connect)))
        .routes(g.add(MethodFirst(Sync), routes!(sync_poll)))
        .routes(g.add(MethodFirst(Sync), routes!(sync_results)))
        .routes(g.add(MethodFirst(Sync), routes!(sync_stream)))
        .routes(g.add(MethodFirst(Client), routes!(list_daemons)))
        .routes(g.add(MethodFirst(Client), routes!(get_command)))
        .routes(g.add(CredentialsFirst(Daemon), routes!(get_daemon)))
        .routes(g.add(CredentialsFirst(Daemon), routes!(get_changes)))
        .routes(g.add(CredentialsFirst(Daemon), routes!(stream_events)))
        .routes(g.add(CredentialsFirst(Daemon), routes!(post_named_command)))
        .routes(g.any_method(CredentialsFirst(Daemon), routes!(mirror_call)))
        .routes(g.add(CredentialsFirst(Admin), routes!(list_keys, create_key)))
        .routes(g.add(CredentialsFirst(Admin), routes!(revoke_key)))
        .routes(g.add(CredentialsFirst(Admin), routes!(admin_list_daemons)))
        .routes(g.add(CredentialsFirst(Admin), routes!(admin_get_daemon)))
        .routes(g.add(CredentialsFirst(Admin), routes!(admin_get_changes)))
        .routes(g.add(CredentialsFirst(Admin), routes!(admin_stream_events)))
        .routes(g.add(CredentialsFirst(Admin), routes!(admin_recent_commands)))
        .routes(g.add(CredentialsFirst(Admin), routes!(admin_daemon_contexts)))
        .routes(g.add(CredentialsFirst(Admin), routes!(admin_stats)))
        .routes(g.add(CredentialsFirst(Admin), routes!(backup)))
        .routes(g.add(Open, routes!(console_page)))
        .routes(g.add(Open, routes!(console_asset)))
        .split_for_parts();
    conventions(&mut document);
    let policies = Arc::new(guards.policies(&document));
    let routes = routes
        .fallback(fallback)
        .layer(from_fn_with_state(policies, router::policy));
    (routes, document)
}

/// Who may call a route, and whether a wrong method is refused before the credentials
/// are looked at or after.
#[derive(Clone, Copy, Debug)]
pub enum Guard {
    /// No credentials: the operations routes.
    Open,
    /// 405 first: the sync routes and the client routes that name no daemon.
    MethodFirst(router::Need),
    /// Credentials first, so a caller without them learns nothing of what is there:
    /// daemon-scoped and admin routes.
    CredentialsFirst(router::Need),
}

/// What [`router::policy`] knows of one route (by the template axum matched).
pub struct Policy {
    /// The documented template: a metrics label and a log field.
    pub label: String,
    /// The documented methods; `None`: every method (the mirrored route).
    pub methods: Option<Vec<Method>>,
    /// `Allow` for a 405: the documented methods.
    pub allow: String,
    pub guard: Guard,
}

/// The guard of every route as it is registered.
#[derive(Default)]
struct Guards(Vec<(String, Guard, bool)>);

impl Guards {
    /// A route whose other methods are 405.
    fn add(
        &mut self,
        guard: Guard,
        (schemas, paths, methods): UtoipaMethodRouter<Arc<App>>,
    ) -> UtoipaMethodRouter<Arc<App>> {
        for template in paths.paths.keys() {
            self.0.push((template.clone(), guard, false));
        }
        (schemas, paths, methods.fallback(method_not_allowed))
    }

    /// The mirrored route: it forwards every method to the daemon, also those no document
    /// can list (`CONNECT`, WebDAV's, `QUERY`): its fallback is its handler.
    fn any_method(
        &mut self,
        guard: Guard,
        (schemas, paths, methods): UtoipaMethodRouter<Arc<App>>,
    ) -> UtoipaMethodRouter<Arc<App>> {
        for template in paths.paths.keys() {
            self.0.push((template.clone(), guard, true));
        }
        (schemas, paths, methods.fallback(mirror_call))
    }

    fn policies(self, document: &Document) -> BTreeMap<String, Policy> {
        self.0
            .into_iter()
            .map(|(template, guard, any_method)| {
                let label = template.replace("{*", "{");
                let mut item = document.paths.paths[&label].clone();
                let documented: Vec<Method> = operations(&mut item)
                    .filter_map(|(name, _)| {
                        Method::from_bytes(name.to_ascii_uppercase().as_bytes()).ok()
                    })
                    .collect();
                let allow = documented
                    .iter()
                    .map(Method::as_str)
                    .collect::<Vec<_>>()
                    .join(", ");
                let policy = Policy {
                    label,
                    methods: (!any_method).then_some(documented),
                    allow,
                    guard,
                };
                (template, policy)
            })
            .collect()
    }
}

/// A method the route does not serve (where [`router::policy`] did not answer first).
async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("this route does not accept {method}; see Allow"),
    )
}

/// No route matched. Under `/admin` the caller must be the admin before learning that;
/// under `/api/v1/daemons/` every path is the daemon's (the router's templates need a
/// non-empty segment where the relay mirrors an empty one).
async fn fallback(mut request: Request) -> Response {
    let path = request.uri().path().to_owned();
    let result = if path == "/admin" || path.starts_with("/admin/") {
        match router::authorize(&mut request, router::Need::Admin).await {
            Ok(()) => Err(ApiError::not_found(format!("no route {path}"))),
            Err(err) => Err(err),
        }
    } else if path.starts_with(router::DAEMONS_PREFIX) {
        match router::authorize(&mut request, router::Need::Daemon).await {
            Ok(()) => {
                let app = router::request_app(&request);
                mirror_any(&app, request).await
            }
            Err(err) => Err(err),
        }
    } else {
        Err(ApiError::not_found(format!("no route {path}")))
    };
    result.unwrap_or_else(ApiError::to_response)
}

// --- Extractors -------------------------------------------------------------------------

/// The authenticated caller, as the route's guard established it.
pub struct Caller(pub Arc<Principal>);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Caller, ApiError> {
        parts
            .extensions
            .get::<Arc<Principal>>()
            .cloned()
            .map(Caller)
            .ok_or_else(|| ApiError::unauthorized("no credentials"))
    }
}

/// The daemon a daemon-scoped path names and the rest of the path, both as sent (never
/// percent-decoded: `%2F` stays inside a segment, `%2e%2e` stays visible to the checks).
#[derive(Clone)]
pub struct DaemonScope {
    /// The request's path (shares the request's bytes).
    path: http::uri::PathAndQuery,
    /// Where the daemon id ends in `path`.
    id_end: usize,
}

impl DaemonScope {
    /// The scope of a path under `/api/v1/daemons/` (the id may still be invalid).
    pub fn of(uri: &http::Uri) -> DaemonScope {
        let path = uri.path();
        let rest = path.get(router::DAEMONS_PREFIX.len()..).unwrap_or("");
        let id_end = router::DAEMONS_PREFIX.len() + rest.find('/').unwrap_or(rest.len());
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        DaemonScope {
            id_end: id_end.min(path.path().len()),
            path,
        }
    }

    pub fn daemon_id(&self) -> &str {
        self.path
            .path()
            .get(router::DAEMONS_PREFIX.len()..self.id_end)
            .unwrap_or("")
    }

    /// After `/api/v1/daemons/{daemon_id}/`; empty for the daemon itself.
    pub fn tail(&self) -> &str {
        self.path.path().get(self.id_end + 1..).unwrap_or("")
    }
}

impl<S: Send + Sync> FromRequestParts<S> for DaemonScope {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<DaemonScope, ApiError> {
        parts
            .extensions
            .get::<DaemonScope>()
            .cloned()
            .ok_or_else(|| ApiError::bad_request("invalid daemon id"))
    }
}

/// The last path segment as sent: a command or key id.
struct LastSegment(String);

impl<S: Send + Sync> FromRequestParts<S> for LastSegment {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<LastSegment, ApiError> {
        let path = parts.uri.path();
        Ok(LastSegment(
            path[path.rfind('/').map_or(0, |i| i + 1)..].to_owned(),
        ))
    }
}

/// A JSON body of at most `limits.max_body_bytes`, read with the stall timeout, within
/// the relay's nesting and number limits; any failure is the design's 400, 408 or 413.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<App>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, app: &Arc<App>) -> Result<JsonBody<T>, ApiError> {
        let (parts, body) = request.into_parts();
        let bytes = read_body(
            body,
            &parts.headers,
            app.config.limits.max_body_bytes,
            app.config.limits.body_read_timeout,
        )
        .await?;
        parse_json(&bytes).map(JsonBody)
    }
}

// --- Operations -------------------------------------------------------------------------

/// Liveness: the process answers.
#[utoipa::path(method(get, head), path = "/healthz", tag = "operations", operation_id = "health",
    security(()),
    responses(
        (status = 200, description = "The relay is up.", body = Health),
        Public,
    ))]
async fn healthz() -> Response {
    json(StatusCode::OK, &Health { status: "ok" })
}

/// Readiness: the store takes a durable write (a group commit) right now.
#[utoipa::path(method(get, head), path = "/readyz", tag = "operations", operation_id = "ready",
    security(()),
    responses(
        (status = 200, description = "The store commits.", body = Health),
        (status = 405, response = MethodNotAllowed),
        Stored,
    ))]
async fn readyz(State(app): AppState) -> Result<Response, ApiError> {
    app.store.check().await?;
    Ok(json(StatusCode::OK, &Health { status: "ready" }))
}

/// Prometheus text format: counters and gauges, no daemon ids or keys, so no credentials.
#[utoipa::path(get, path = "/metrics", tag = "operations", operation_id = "getMetrics",
    security(()),
    responses(
        (status = 200, description = "Prometheus text exposition format 0.0.4.",
            content_type = "text/plain", body = String),
        Public,
    ))]
async fn metrics(State(app): AppState) -> Response {
    router::metrics(&app).await
}

/// This document, generated from the relay's routes.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", operation_id = "getOpenApi",
    security(()),
    responses(
        (status = 200, description = "The OpenAPI 3.1 document.", body = Object),
        Public,
    ))]
async fn openapi(State(app): AppState) -> Response {
    let mut response = Response::new(super::http::full(app.openapi.clone()));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

// --- Sync protocol ----------------------------------------------------------------------

/// A daemon announces itself; a newer connect supersedes older polls (409 `superseded`).
#[utoipa::path(post, path = "/sync/connect", tag = "sync", operation_id = "syncConnect",
    security(("bearerAuth" = []), ("mutualTLS" = [])),
    request_body = ConnectRequest,
    responses(
        (status = 200, description = "Connected.", body = ConnectResponse),
        Authenticated,
        JsonRequest,
        Stored,
    ))]
async fn sync_connect(
    State(app): AppState,
    Caller(principal): Caller,
    JsonBody(request): JsonBody<ConnectRequest>,
) -> Result<Response, ApiError> {
    sync::connect(&app, &principal, request).await
}

/// Posts updates (acknowledged by `last_update_seq` once durable) and long-polls for
/// commands (leased until `delivery_timeout`).
#[utoipa::path(post, path = "/sync/poll", tag = "sync", operation_id = "syncPoll",
    security(("bearerAuth" = []), ("mutualTLS" = [])),
    request_body = PollRequest,
    responses(
        (status = 200, description = "Commands, and the updates now durable.",
            body = PollResponse),
        (status = 409, description = "`superseded`: a newer connect replaced this one.",
            body = ErrorBody),
        (status = 429, response = RateLimitedOrQueueFull),
        (status = 503, response = StorageUnavailable),
        Authenticated,
        JsonRequest,
    ))]
async fn sync_poll(
    State(app): AppState,
    Caller(principal): Caller,
    JsonBody(request): JsonBody<PollRequest>,
) -> Result<Response, ApiError> {
    sync::poll(&app, &principal, request).await
}

/// Posts results and stream chunks; the first result of a command wins.
#[utoipa::path(post, path = "/sync/results", tag = "sync", operation_id = "syncResults",
    security(("bearerAuth" = []), ("mutualTLS" = [])),
    request_body = ResultsRequest,
    responses(
        (status = 200, description = "Which results are durable, and which were for \
            unknown commands.", body = ResultsResponse),
        (status = 409, description = "A chunk out of order (`details` says which).",
            body = ErrorBody),
        Authenticated,
        JsonRequest,
        Stored,
    ))]
async fn sync_results(
    State(app): AppState,
    Caller(principal): Caller,
    JsonBody(request): JsonBody<ResultsRequest>,
) -> Result<Response, ApiError> {
    sync::results(&app, &principal, request).await
}

/// One long-lived HTTP/2 stream for a connection: the daemon writes update and result
/// lines, the relay writes commands, one answer per daemon line once it is durable,
/// keep-alives, and a last error line when the connection is superseded.
#[utoipa::path(post, path = "/sync/stream", tag = "sync", operation_id = "syncStream",
    security(("bearerAuth" = []), ("mutualTLS" = [])),
    params(
        ("daemon_id" = String, Query, pattern = "^[A-Za-z0-9._-]{1,64}$"),
        ("connection_id" = String, Query, description = "From `/sync/connect`."),
    ),
    request_body(content = StreamUp, content_type = "application/x-ndjson",
        description = "One `StreamUp` object a line, for as long as the stream lives."),
    responses(
        (status = 200, description = "One `StreamDown` object a line.",
            content_type = "application/x-ndjson", body = StreamDown),
        (status = 400, description = "Not HTTP/2, or the query lacks an id.", body = ErrorBody),
        (status = 404, response = NotFound),
        (status = 409, description = "`superseded`: a newer connect replaced this one.",
            body = ErrorBody),
        Authenticated,
    ))]
async fn sync_stream(
    State(app): AppState,
    Caller(principal): Caller,
    request: Request,
) -> Result<Response, ApiError> {
    sync_stream::open(&app, &principal, request).await
}

// --- Client API -------------------------------------------------------------------------

/// The daemons this key may see.
#[utoipa::path(get, path = "/api/v1/daemons", tag = "client", operation_id = "listDaemons",
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The daemons in the key's scope.", body = DaemonList),
        Authenticated,
        Stored,
    ))]
async fn list_daemons(
    State(app): AppState,
    Caller(principal): Caller,
) -> Result<Response, ApiError> {
    client::list_daemons(&app, &principal, false).await
}

/// A command's state, and its result once there is one; `wait` long-polls for it.
#[utoipa::path(get, path = "/api/v1/commands/{command_id}", tag = "client",
    operation_id = "getCommand",
    security(("bearerAuth" = [])),
    params(
        ("command_id" = String, Path, description = "As the 202 answer named it."),
        ("wait" = Option<String>, Query, description = "Seconds to wait for a result \
            (at most `commands.max_wait`)."),
    ),
    responses(
        (status = 200, description = "The command.", body = CommandView),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        Authenticated,
        Stored,
    ))]
async fn get_command(
    State(app): AppState,
    Caller(principal): Caller,
    LastSegment(command_id): LastSegment,
    request: Request,
) -> Result<Response, ApiError> {
    client::get_command(&app, &principal, &command_id, request.uri().query()).await
}

/// One daemon: online or not, and what is queued for it.
#[utoipa::path(get, path = "/api/v1/daemons/{daemon_id}", tag = "client",
    operation_id = "getDaemon",
    security(("bearerAuth" = [])),
    params(DaemonIdPath),
    responses(
        (status = 200, description = "The daemon.", body = DaemonView),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        Authenticated,
        Stored,
    ))]
async fn get_daemon(State(app): AppState, scope: DaemonScope) -> Result<Response, ApiError> {
    client::get_daemon(&app, scope.daemon_id(), false).await
}

/// The daemon's change log after `since`, a page at a time; `wait` long-polls.
#[utoipa::path(get, path = "/api/v1/daemons/{daemon_id}/changes", tag = "client",
    operation_id = "getChanges",
    security(("bearerAuth" = [])),
    params(
        DaemonIdPath,
        ("since" = Option<String>, Query, description = "A `seq`, or an RFC 3339 time."),
        ("limit" = Option<u32>, Query, description = "At most this many changes."),
        ("wait" = Option<String>, Query, description = "Seconds to wait for a change."),
    ),
    responses(
        (status = 200, description = "Changes after `since`.", body = ChangesResponse),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        Authenticated,
        Stored,
    ))]
async fn get_changes(
    State(app): AppState,
    scope: DaemonScope,
    request: Request,
) -> Result<Response, ApiError> {
    changes::changes(&app, scope.daemon_id(), request.uri().query()).await
}

/// hld's event stream, replayed from the change log: `Last-Event-ID` or `since` resumes.
#[utoipa::path(get, path = "/api/v1/daemons/{daemon_id}/stream/events", tag = "client",
    operation_id = "streamEvents",
    security(("bearerAuth" = []), ("accessToken" = [])),
    params(
        DaemonIdPath,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this `seq`."),
        ("since" = Option<String>, Query, description = "A `seq`, or an RFC 3339 time."),
        ("eventTypes" = Option<String>, Query, description = "Comma-separated types."),
        ("sessionId" = Option<String>, Query),
        ("runId" = Option<String>, Query),
    ),
    responses(
        (status = 200, description = "Server-sent events; each `data:` is a StreamEvent.",
            content_type = "text/event-stream", body = String),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        Authenticated,
        Stored,
    ))]
async fn stream_events(
    State(app): AppState,
    scope: DaemonScope,
    request: Request,
) -> Result<Response, ApiError> {
    changes::stream_events(
        &app,
        scope.daemon_id(),
        request.headers(),
        request.uri().query(),
    )
    .await
}

/// A named command (the daemon's own method), queued durably; `Prefer: wait` waits for
/// its result.
#[utoipa::path(post, path = "/api/v1/daemons/{daemon_id}/commands", tag = "client",
    operation_id = "postNamedCommand",
    security(("bearerAuth" = [])),
    params(DaemonIdPath, Prefer, IdempotencyKey, IfOffline),
    request_body = NamedCommandRequest,
    responses(
        (status = 200, description = "`Prefer: wait`: the command's result.",
            content_type = "application/json"),
        (status = 202, description = "Queued durably; `Location` names the command.",
            body = CommandView, headers(("Location" = String))),
        (status = 404, response = NotFound),
        Authenticated,
        JsonRequest,
        DaemonAnswers,
    ))]
async fn post_named_command(
    State(app): AppState,
    Caller(principal): Caller,
    scope: DaemonScope,
    request: Request,
) -> Result<Response, ApiError> {
    let headers = request.headers().clone();
    let JsonBody(body) = JsonBody::<NamedCommandRequest>::from_request(request, &app).await?;
    mirror::named(&app, &principal, scope.daemon_id(), &headers, body).await
}

/// The daemon's own REST API, mirrored: reads are served from the relay's cache when the
/// daemon is offline (`X-Syncrelay-Source: cache`, with `Age`), writes are queued durably
/// and answered by the daemon, or 202 with `Prefer: respond-async` or when it is offline
/// and `X-Syncrelay-If-Offline: queue`. Context streams (`streams.paths`) are fetched once
/// and replayed to every client. Any other method (`CONNECT`, WebDAV's) is forwarded too.
#[utoipa::path(method(get, head, options, post, put, patch, delete, trace),
    path = "/api/v1/daemons/{daemon_id}/{*path}", tag = "mirrored",
    operation_id = "mirror",
    security(("bearerAuth" = [])),
    params(
        DaemonIdPath,
        ("path" = String, Path, description = "The daemon's path, one or more segments; \
            no `.` or `..` segments or backslashes."),
        Prefer, IdempotencyKey, IfOffline,
    ),
    request_body(content = serde_json::Value, content_type = "*/*",
        description = "Forwarded as is."),
    responses(
        (status = 200, description = "The daemon's answer (or the cached one, with `Age`).",
            content_type = "*/*", headers(("Age" = Option<u64>))),
        (status = 202, description = "Queued durably; `Location` names the command.",
            body = CommandView, headers(("Location" = String))),
        (status = "default", description = "The daemon's own answer, whatever its status.",
            content_type = "*/*"),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        JsonRequest,
        DaemonAnswers,
    ))]
async fn mirror_call(State(app): AppState, request: Request) -> Result<Response, ApiError> {
    mirror_any(&app, request).await
}

/// A context stream (`streams.paths`), fetched from the daemon once, stored whole and
/// replayed to every client as server-sent events. Served by the mirrored route.
#[utoipa::path(get,
    path = "/api/v1/daemons/{daemon_id}/approvals/{approval_id}/context/stream",
    tag = "client", operation_id = "getContextStream",
    security(("bearerAuth" = []), ("accessToken" = [])),
    params(
        DaemonIdPath,
        ("approval_id" = String, Path),
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this chunk."),
        ("Cache-Control" = Option<String>, Header,
            description = "`no-cache` fetches the context again."),
    ),
    responses(
        (status = 200, description = "Server-sent events of the context's chunks.",
            content_type = "text/event-stream", body = String),
        (status = "default", description = "The daemon's own answer when it does not \
            stream.", content_type = "*/*"),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        DaemonAnswers,
    ))]
#[allow(dead_code)]
fn context_stream() {}

/// Any method on the daemon's API: a context stream, or a mirrored call.
async fn mirror_any(app: &Arc<App>, request: Request) -> Result<Response, ApiError> {
    let scope = request
        .extensions()
        .get::<DaemonScope>()
        .cloned()
        .ok_or_else(|| ApiError::bad_request("invalid daemon id"))?;
    let principal = request
        .extensions()
        .get::<Arc<Principal>>()
        .cloned()
        .ok_or_else(|| ApiError::unauthorized("no credentials"))?;
    let (daemon_id, tail) = (scope.daemon_id(), scope.tail());
    if tail
        .split('/')
        .any(|segment| is_dot_segment(segment) || has_backslash(segment))
    {
        return Err(ApiError::bad_request(
            "a path may not contain . or .. segments or backslashes",
        ));
    }
    let (parts, body) = request.into_parts();
    if parts.method == Method::GET && streams::is_stream_path(&app.config.streams.paths, tail) {
        return streams::serve(app, daemon_id, tail, &parts).await;
    }
    let body = read_body(
        body,
        &parts.headers,
        app.config.limits.max_body_bytes,
        app.config.limits.body_read_timeout,
    )
    .await?;
    mirror::mirrored(app, &principal, daemon_id, tail, &parts, body).await
}

// --- Admin ------------------------------------------------------------------------------

/// Every key (never a token).
#[utoipa::path(get, path = "/admin/keys", tag = "admin", operation_id = "listKeys",
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The keys.", body = KeyList),
        Authenticated,
        Stored,
    ))]
async fn list_keys(State(app): AppState) -> Result<Response, ApiError> {
    admin_api::list_keys(&app).await
}

/// A new key, durable before the answer; its token is shown once.
#[utoipa::path(post, path = "/admin/keys", tag = "admin", operation_id = "createKey",
    security(("bearerAuth" = [])),
    request_body = CreateKeyRequest,
    responses(
        (status = 201, description = "The key, with its `token`.", body = CreatedKey),
        Authenticated,
        JsonRequest,
        Stored,
    ))]
async fn create_key(
    State(app): AppState,
    JsonBody(request): JsonBody<CreateKeyRequest>,
) -> Result<Response, ApiError> {
    admin_api::create_key(&app, request).await
}

/// Revokes a key: its open requests and streams end with 401 at once.
#[utoipa::path(delete, path = "/admin/keys/{key_id}", tag = "admin", operation_id = "revokeKey",
    security(("bearerAuth" = [])),
    params(("key_id" = String, Path)),
    responses(
        (status = 200, description = "Revoked.", body = RevokedKey),
        (status = 404, response = NotFound),
        Authenticated,
        Stored,
    ))]
async fn revoke_key(
    State(app): AppState,
    LastSegment(key_id): LastSegment,
) -> Result<Response, ApiError> {
    admin_api::revoke_key(&app, &key_id).await
}

/// Every daemon.
#[utoipa::path(get, path = "/admin/daemons", tag = "admin", operation_id = "adminListDaemons",
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "All daemons.", body = DaemonList),
        Authenticated,
        Stored,
    ))]
async fn admin_list_daemons(
    State(app): AppState,
    Caller(principal): Caller,
) -> Result<Response, ApiError> {
    client::list_daemons(&app, &principal, true).await
}

/// The segment after `/admin/daemons/`, as sent.
struct AdminDaemonId(String);

impl<S: Send + Sync> FromRequestParts<S> for AdminDaemonId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<AdminDaemonId, ApiError> {
        let rest = parts
            .uri
            .path()
            .strip_prefix("/admin/daemons/")
            .unwrap_or("");
        Ok(AdminDaemonId(
            rest.split('/').next().unwrap_or("").to_owned(),
        ))
    }
}

/// One daemon, as `GET /api/v1/daemons/{daemon_id}` shows it.
#[utoipa::path(get, path = "/admin/daemons/{daemon_id}", tag = "admin",
    operation_id = "adminGetDaemon",
    security(("bearerAuth" = [])),
    params(DaemonIdPath),
    responses(
        (status = 200, description = "The daemon.", body = DaemonView),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        Authenticated,
        Stored,
    ))]
async fn admin_get_daemon(
    State(app): AppState,
    AdminDaemonId(daemon_id): AdminDaemonId,
) -> Result<Response, ApiError> {
    admin_api::daemon(&app, &daemon_id).await
}

/// A daemon's change log, as `GET /api/v1/daemons/{daemon_id}/changes` reads it.
#[utoipa::path(get, path = "/admin/daemons/{daemon_id}/changes", tag = "admin",
    operation_id = "adminGetChanges",
    security(("bearerAuth" = [])),
    params(
        DaemonIdPath,
        ("since" = Option<String>, Query, description = "A `seq`, or an RFC 3339 time."),
        ("limit" = Option<u32>, Query, description = "At most this many changes."),
        ("wait" = Option<String>, Query, description = "Seconds to wait for a change."),
    ),
    responses(
        (status = 200, description = "Changes after `since`.", body = ChangesResponse),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        Authenticated,
        Stored,
    ))]
async fn admin_get_changes(
    State(app): AppState,
    AdminDaemonId(daemon_id): AdminDaemonId,
    request: Request,
) -> Result<Response, ApiError> {
    admin_api::changes(&app, &daemon_id, request.uri().query()).await
}

/// A daemon's change log live, as `GET /api/v1/daemons/{daemon_id}/stream/events` serves
/// it: `Last-Event-ID` or `since` resumes, keep-alive comments while idle.
#[utoipa::path(get, path = "/admin/daemons/{daemon_id}/events", tag = "admin",
    operation_id = "adminStreamEvents",
    security(("bearerAuth" = [])),
    params(
        DaemonIdPath,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this `seq`."),
        ("since" = Option<String>, Query, description = "A `seq`, or an RFC 3339 time."),
    ),
    responses(
        (status = 200, description = "Server-sent events; each `data:` is a StreamEvent.",
            content_type = "text/event-stream", body = String),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        Authenticated,
        Stored,
    ))]
async fn admin_stream_events(
    State(app): AppState,
    AdminDaemonId(daemon_id): AdminDaemonId,
    request: Request,
) -> Result<Response, ApiError> {
    admin_api::events(&app, &daemon_id, request.headers(), request.uri().query()).await
}

/// A daemon's commands, newest first: its unfinished ones, then finished ones among the
/// relay's 10,000 newest commands.
#[utoipa::path(get, path = "/admin/daemons/{daemon_id}/commands", tag = "admin",
    operation_id = "adminRecentCommands",
    security(("bearerAuth" = [])),
    params(
        DaemonIdPath,
        ("limit" = Option<u32>, Query, description = "1 to 500; 50 when absent."),
    ),
    responses(
        (status = 200, description = "The commands.", body = CommandList),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        Authenticated,
        Stored,
    ))]
async fn admin_recent_commands(
    State(app): AppState,
    AdminDaemonId(daemon_id): AdminDaemonId,
    request: Request,
) -> Result<Response, ApiError> {
    admin_api::recent_commands(&app, &daemon_id, request.uri().query()).await
}

/// A daemon's cached contexts (cache-and-serve), newest first.
#[utoipa::path(get, path = "/admin/daemons/{daemon_id}/contexts", tag = "admin",
    operation_id = "adminDaemonContexts",
    security(("bearerAuth" = [])),
    params(
        DaemonIdPath,
        ("limit" = Option<u32>, Query, description = "1 to 1000; 100 when absent."),
    ),
    responses(
        (status = 200, description = "The contexts.", body = ContextList),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        Authenticated,
        Stored,
    ))]
async fn admin_daemon_contexts(
    State(app): AppState,
    AdminDaemonId(daemon_id): AdminDaemonId,
    request: Request,
) -> Result<Response, ApiError> {
    admin_api::daemon_contexts(&app, &daemon_id, request.uri().query()).await
}

/// The relay's own figures as counters since start (requests and their latency, durable
/// writes and flushes, daemons, commands, disk): sample it twice for rates.
#[utoipa::path(get, path = "/admin/stats", tag = "admin", operation_id = "adminStats",
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The figures.", body = RelayStats),
        Authenticated,
        Stored,
    ))]
async fn admin_stats(State(app): AppState) -> Result<Response, ApiError> {
    admin_api::stats(&app).await
}

/// The operator console's page. It holds no data and needs no key; the page asks for an
/// admin key and calls the `/admin/*` routes with it.
#[utoipa::path(get, path = "/console", tag = "console", operation_id = "consolePage",
    security(()),
    responses(
        (status = 200, description = "The page.", content_type = "text/html", body = String),
        (status = 304, description = "Unchanged (`If-None-Match`)."),
        (status = 404, response = NotFound),
        Public,
    ))]
async fn console_page(
    State(app): AppState,
    headers: http::HeaderMap,
) -> Result<Response, ApiError> {
    console::asset(&app, "", &headers)
}

/// The console's script and stylesheet.
#[utoipa::path(get, path = "/console/{asset}", tag = "console", operation_id = "consoleAsset",
    security(()),
    params(("asset" = String, Path, description = "`console.js` or `console.css`.")),
    responses(
        (status = 200, description = "The file.",
            content((String = "text/javascript"), (String = "text/css"))),
        (status = 304, description = "Unchanged (`If-None-Match`)."),
        (status = 404, response = NotFound),
        Public,
    ))]
async fn console_asset(
    State(app): AppState,
    LastSegment(asset): LastSegment,
    headers: http::HeaderMap,
) -> Result<Response, ApiError> {
    console::asset(&app, &asset, &headers)
}

/// An online backup into a new directory on the relay's host, streamed as NDJSON: only the
/// last line (`done`, or an error) says whether the backup exists.
#[utoipa::path(post, path = "/admin/backup", tag = "admin", operation_id = "backup",
    security(("bearerAuth" = [])),
    request_body = BackupRequest,
    responses(
        (status = 200, description = "Progress lines, then the outcome.",
            content_type = "application/x-ndjson", body = BackupLine),
        (status = 409, description = "A backup is already running.", body = ErrorBody),
        Authenticated,
        JsonRequest,
        Stored,
    ))]
async fn backup(
    State(app): AppState,
    JsonBody(request): JsonBody<BackupRequest>,
) -> Result<Response, ApiError> {
    admin_api::backup(&app, request).await
}

// --- The document -----------------------------------------------------------------------

#[derive(OpenApi)]
#[openapi(
    info(
        title = "syncrelay",
        description = "The relay's own routes: the sync protocol daemons speak (`/sync/*`), \
            the client API (`/api/v1/*`, which mirrors the daemon's REST API under \
            `/api/v1/daemons/{daemon_id}/`), key management (`/admin/*`) and operations \
            routes. Every response carries `X-Syncrelay-Source` (`relay`, `daemon` or \
            `cache`); every error the relay makes is an `Error`. Nothing is acknowledged \
            (2xx) before it is durable.",
    ),
    servers((url = "/", description = "The relay itself.")),
    tags(
        (name = "sync", description = "Daemon → relay sync protocol."),
        (name = "client", description = "Client API answered by the relay."),
        (name = "mirrored", description = "The daemon's own API, mirrored through the relay."),
        (name = "admin", description = "Key management and the operator's view."),
        (name = "console", description = "The operator's page (HTML and its files; the \
            data comes from `/admin/*`)."),
        (name = "operations", description = "Health, readiness, metrics and this document \
            (no credentials)."),
    ),
    components(
        schemas(ErrorBody, crate::protocol::ResultEntry, crate::protocol::HttpParams,
            crate::protocol::HttpResult, crate::protocol::Update,
            crate::protocol::StreamEvent, crate::store::CommandState, crate::store::Role),
        responses(BadRequest, Unauthorized, Forbidden, NotFound, MethodNotAllowed,
            RequestTimeout, PayloadTooLarge, RateLimited, RateLimitedOrQueueFull,
            StorageUnavailable, DaemonOfflineOrStorage, BadGateway, GatewayTimeout),
    ),
    paths(context_stream),
    modifiers(&SecuritySchemes),
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, document: &mut Document) {
        let components = document.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearerAuth",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key: `Authorization: Bearer srk_…`."))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "accessToken",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "access_token",
                "The key as `?access_token=`, only on event streams (a browser's \
                 EventSource cannot send headers).",
            ))),
        );
        components.add_security_scheme(
            "mutualTLS",
            SecurityScheme::MutualTls {
                description: Some(
                    "A client certificate from `tls.client_ca`, naming the daemon.".into(),
                ),
                extensions: None,
            },
        );
    }
}

/// What the annotations cannot say: the mirrored route's wildcard is a plain `{path}`
/// parameter, and one handler serving several methods gets one operation id per method.
fn conventions(document: &mut Document) {
    let paths = std::mem::take(&mut document.paths.paths);
    for (template, mut item) in paths {
        let template = template.replace("{*", "{");
        let shared = operations(&mut item)
            .filter_map(|(_, op)| op.operation_id.clone())
            .collect::<Vec<_>>();
        for (method, operation) in operations(&mut item) {
            let id = operation.operation_id.clone().unwrap_or_default();
            if shared.iter().filter(|other| **other == id).count() > 1 {
                operation.operation_id = Some(format!("{id}{method}"));
            }
        }
        document.paths.paths.insert(template, item);
    }
}

fn operations(
    item: &mut PathItem,
) -> impl Iterator<Item = (&'static str, &mut utoipa::openapi::path::Operation)> {
    [
        ("Get", &mut item.get),
        ("Head", &mut item.head),
        ("Options", &mut item.options),
        ("Post", &mut item.post),
        ("Put", &mut item.put),
        ("Patch", &mut item.patch),
        ("Delete", &mut item.delete),
        ("Trace", &mut item.trace),
    ]
    .into_iter()
    .filter_map(|(method, operation)| operation.as_mut().map(|op| (method, op)))
}

// --- Reusable parameters and responses ----------------------------------------------------

/// `{daemon_id}`: `[A-Za-z0-9._-]{1,64}`, as sent (percent-escapes are not decoded).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct DaemonIdPath {
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    daemon_id: String,
}

/// `Prefer`: `wait` (or `wait=<seconds>`) waits for the result; `respond-async` answers
/// 202 at once.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct Prefer {
    #[param(rename = "Prefer")]
    prefer: Option<String>,
}

/// `Idempotency-Key`: a retry with the same key finds the command it created.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct IdempotencyKey {
    #[param(rename = "Idempotency-Key")]
    idempotency_key: Option<String>,
}

/// `X-Syncrelay-If-Offline: queue` queues a write for an offline daemon (202).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct IfOffline {
    #[param(rename = "X-Syncrelay-If-Offline")]
    if_offline: Option<String>,
}

/// Answers many routes share, as references to the reusable responses above.
macro_rules! response_groups {
    ($($(#[$doc:meta])* $name:ident: $(($status:literal, $response:ident)),*;)*) => {$(
        $(#[$doc])*
        struct $name;

        impl utoipa::IntoResponses for $name {
            fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
                [$(($status, stringify!($response))),*]
                    .into_iter()
                    .map(|(status, name)| {
                        (status.to_owned(), RefOr::Ref(utoipa::openapi::Ref::from_response_name(name)))
                    })
                    .collect()
            }
        }
    )*};
}

response_groups! {
    /// No credentials needed.
    Public: ("405", MethodNotAllowed), ("429", RateLimited);
    /// Credentials checked by the route's layer.
    Authenticated: ("401", Unauthorized), ("403", Forbidden), ("405", MethodNotAllowed);
    /// A JSON body read within the limits.
    JsonRequest: ("400", BadRequest), ("408", RequestTimeout), ("413", PayloadTooLarge);
    /// Reads or writes the store.
    Stored: ("429", RateLimited), ("503", StorageUnavailable);
    /// Waits for the daemon's answer.
    DaemonAnswers: ("429", RateLimitedOrQueueFull), ("502", BadGateway),
        ("503", DaemonOfflineOrStorage), ("504", GatewayTimeout);
}

macro_rules! error_responses {
    ($($name:ident: $description:literal;)*) => {$(
        #[derive(ToResponse)]
        #[response(description = $description)]
        #[allow(dead_code)]
        struct $name(ErrorBody);
    )*};
}

error_responses! {
    BadRequest: "`bad_request`: the request is malformed; the message names the fault.";
    Unauthorized: "`unauthorized`: no valid credentials (or the key was revoked).";
    Forbidden: "`forbidden`: the key's role or scope does not cover this.";
    NotFound: "`not_found`: no such route, daemon, command or key.";
    MethodNotAllowed: "`method_not_allowed`; `Allow` names the route's methods.";
    RequestTimeout: "`timeout`: the request body made no progress.";
    PayloadTooLarge: "`payload_too_large`: over `limits.max_body_bytes` (or another \
        limit the message names).";
    RateLimited: "`rate_limited`; `Retry-After` says when to retry.";
    RateLimitedOrQueueFull: "`rate_limited`, or `queue_full` (the daemon's queue or disk \
        budget is full); `Retry-After` says when to retry.";
    StorageUnavailable: "`storage_unavailable`: nothing was acknowledged; `Retry-After`.";
    DaemonOfflineOrStorage: "`daemon_offline` (nothing was queued) or \
        `storage_unavailable`; `Retry-After`.";
    BadGateway: "`bad_gateway`: the daemon's answer could not be relayed.";
    GatewayTimeout: "`timeout`: the daemon did not answer in time.";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_names_the_mirrored_wildcard_as_a_parameter() {
        let (_, document) = router();
        let paths = &document.paths.paths;
        assert!(paths.contains_key("/api/v1/daemons/{daemon_id}/{path}"));
        assert!(!paths.keys().any(|p| p.contains("{*")));
        assert!(paths["/healthz"].head.is_some());
        assert!(paths["/metrics"].head.is_none());
        let mirrored = &paths["/api/v1/daemons/{daemon_id}/{path}"];
        let ids: Vec<_> = [&mirrored.get, &mirrored.post, &mirrored.delete]
            .iter()
            .map(|op| op.as_ref().unwrap().operation_id.clone().unwrap())
            .collect();
        assert_eq!(ids, ["mirrorGet", "mirrorPost", "mirrorDelete"]);
        if let Ok(path) = std::env::var("SYNCRELAY_DUMP_OPENAPI") {
            std::fs::write(path, document.to_pretty_json().unwrap()).unwrap();
        }
    }
}
