//! Routing: one match over method and path segments, with authentication and the route
//! family's role check before any body is read. Every response carries
//! `X-Syncrelay-Source`; every failure is the design's error JSON.

use std::sync::Arc;

use http::{Method, Request};
use hyper::body::Incoming;

use super::auth::{authenticate, bearer, Principal};
use super::http::{json, read_body, ApiError, Source, SOURCE};
use super::{admin_api, changes, client, mirror, streams, sync, App, Response};
use crate::protocol::valid_daemon_id;
use crate::store::Role;

pub async fn handle(app: Arc<App>, request: Request<Incoming>) -> Response {
    let mut response = route(&app, request)
        .await
        .unwrap_or_else(ApiError::into_response);
    if !response.headers().contains_key(SOURCE) {
        response
            .headers_mut()
            .insert(SOURCE, Source::Relay.header());
    }
    response
}

async fn route(app: &Arc<App>, request: Request<Incoming>) -> Result<Response, ApiError> {
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = request.method().clone();
    match segments.as_slice() {
        ["healthz"] => {
            only(&method, &[Method::GET, Method::HEAD], "GET, HEAD")?;
            Ok(json(
                http::StatusCode::OK,
                &serde_json::json!({ "status": "ok" }),
            ))
        }
        ["metrics"] => {
            only(&method, &[Method::GET], "GET")?;
            Ok(metrics(app))
        }
        ["readyz"] => {
            only(&method, &[Method::GET, Method::HEAD], "GET, HEAD")?;
            app.store.commit().await?;
            Ok(json(
                http::StatusCode::OK,
                &serde_json::json!({ "status": "ready" }),
            ))
        }
        ["sync", action @ ("connect" | "poll" | "results")] => {
            only(&method, &[Method::POST], "POST")?;
            let principal = principal(app, &request, false)?;
            principal.require_role(Role::Daemon)?;
            let body = body(app, request).await?;
            match *action {
                "connect" => sync::connect(app, &principal, &body).await,
                "poll" => sync::poll(app, &principal, &body).await,
                _ => sync::results(app, &principal, &body).await,
            }
        }
        ["api", "v1", "daemons"] => {
            only(&method, &[Method::GET], "GET")?;
            let principal = principal(app, &request, false)?;
            principal.require_role(Role::Client)?;
            client::list_daemons(app, &principal)
        }
        ["api", "v1", "daemons", daemon_id, rest @ ..] => {
            let daemon_id = daemon_id.to_string();
            let is_sse = matches!(rest, ["stream", "events"]) && method == Method::GET;
            let principal = principal(app, &request, is_sse)?;
            if !valid_daemon_id(&daemon_id) {
                return Err(ApiError::bad_request("invalid daemon id"));
            }
            principal.require_scope(&daemon_id)?;
            let query = request.uri().query().map(str::to_owned);
            match rest {
                [] => {
                    only(&method, &[Method::GET], "GET")?;
                    client::get_daemon(app, &daemon_id)
                }
                ["changes"] => {
                    only(&method, &[Method::GET], "GET")?;
                    changes::changes(app, &daemon_id, query.as_deref()).await
                }
                ["stream", "events"] => {
                    only(&method, &[Method::GET], "GET")?;
                    changes::stream_events(app, &daemon_id, request.headers(), query.as_deref())
                }
                // Reserved for the relay like `changes` and `stream/events`: never mirrored.
                ["commands"] => {
                    only(&method, &[Method::POST], "POST")?;
                    let headers = request.headers().clone();
                    let body = body(app, request).await?;
                    mirror::named(app, &principal, &daemon_id, &headers, &body).await
                }
                _ if rest.iter().any(|segment| is_dot_segment(segment)) => Err(
                    ApiError::bad_request("a path may not contain . or .. segments"),
                ),
                _ => {
                    let prefix_len = "/api/v1/daemons/".len() + daemon_id.len() + 1;
                    let rest_path = path.get(prefix_len..).unwrap_or("").to_owned();
                    if method == Method::GET
                        && streams::is_stream_path(&app.config.streams.paths, &rest_path)
                    {
                        let (parts, _) = request.into_parts();
                        return streams::serve(app, &daemon_id, &rest_path, &parts).await;
                    }
                    let (parts, incoming) = request.into_parts();
                    let body =
                        read_body(incoming, &parts.headers, app.config.limits.max_body_bytes)
                            .await?;
                    mirror::mirrored(app, &principal, &daemon_id, &rest_path, &parts, body).await
                }
            }
        }
        ["api", "v1", "commands", command_id] => {
            only(&method, &[Method::GET], "GET")?;
            let principal = principal(app, &request, false)?;
            principal.require_role(Role::Client)?;
            client::get_command(app, &principal, command_id, request.uri().query()).await
        }
        ["admin", rest @ ..] => {
            let principal = principal(app, &request, false)?;
            principal.require_role(Role::Admin)?;
            match rest {
                ["keys"] if method == Method::GET => admin_api::list_keys(app),
                ["keys"] if method == Method::POST => {
                    let body = body(app, request).await?;
                    admin_api::create_key(app, &body).await
                }
                ["keys"] => Err(ApiError::method_not_allowed("GET, POST")),
                ["keys", key_id] => {
                    only(&method, &[Method::DELETE], "DELETE")?;
                    admin_api::revoke_key(app, key_id).await
                }
                ["daemons"] => {
                    only(&method, &[Method::GET], "GET")?;
                    client::list_daemons(app, &principal)
                }
                _ => Err(ApiError::not_found(format!("no route {path}"))),
            }
        }
        _ => Err(ApiError::not_found(format!("no route {path}"))),
    }
}

/// `/metrics`: counters only, no ids or keys, so it needs no credentials.
fn metrics(app: &App) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let stats = app.store.commit_stats();
    let text = format!(
        "# TYPE syncrelay_connections_accepted_total counter\n\
         syncrelay_connections_accepted_total {}\n\
         # TYPE syncrelay_connections_open gauge\n\
         syncrelay_connections_open {}\n\
         # TYPE syncrelay_polls_waiting gauge\n\
         syncrelay_polls_waiting {}\n\
         # TYPE syncrelay_store_flushes_total counter\n\
         syncrelay_store_flushes_total {}\n\
         # TYPE syncrelay_store_commits_total counter\n\
         syncrelay_store_commits_total {}\n",
        app.metrics.connections_accepted.load(Relaxed),
        app.metrics.connections_open.load(Relaxed),
        app.hub.polls_waiting(),
        stats.flushes,
        stats.commits,
    );
    let mut response = Response::new(super::http::full(text));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// `.` or `..`, also percent-encoded: forwarded, it would step outside the daemon's API.
fn is_dot_segment(segment: &str) -> bool {
    let decoded = segment.replace("%2e", ".").replace("%2E", ".");
    decoded == "." || decoded == ".."
}

fn only(method: &Method, allowed: &[Method], allow: &'static str) -> Result<(), ApiError> {
    if allowed.contains(method) {
        Ok(())
    } else {
        Err(ApiError::method_not_allowed(allow))
    }
}

fn principal(
    app: &App,
    request: &Request<Incoming>,
    allow_query_token: bool,
) -> Result<Principal, ApiError> {
    authenticate(
        &app.store,
        bearer(request.headers(), request.uri().query(), allow_query_token),
    )
}

async fn body(app: &App, request: Request<Incoming>) -> Result<bytes::Bytes, ApiError> {
    let (parts, incoming) = request.into_parts();
    read_body(incoming, &parts.headers, app.config.limits.max_body_bytes).await
}
