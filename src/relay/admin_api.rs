//! `/admin/*`: key management for the `syncrelay keys` CLI (create, list, revoke; revoking
//! takes effect on the next request, since every request looks its key up) and the
//! operator's view of all daemons.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::auth::new_key;
use super::http::{json, ApiError, Source, SOURCE};
use super::{App, Response};
use crate::protocol::{
    rfc3339, valid_daemon_id, BackupLine, BackupRequest, CreateKeyRequest, CreatedKey, ErrorBody,
    KeyList, KeyView, RevokedKey,
};
use crate::store::{now_ms, KeyRecord, Role, StoreError};

fn key_view(record: &KeyRecord, token: Option<String>) -> KeyView {
    KeyView {
        key_id: record.key_id.clone(),
        role: record.role.as_str().to_owned(),
        daemon: record.daemon_id.clone(),
        scope: record.scope.clone(),
        label: record.label.clone(),
        created_at: rfc3339(record.created_at_ms),
        token,
    }
}

/// `POST /admin/keys`.
pub async fn create_key(app: &App, request: CreateKeyRequest) -> Result<Response, ApiError> {
    let role = Role::parse(&request.role)
        .ok_or_else(|| ApiError::bad_request("role must be daemon, client or admin"))?;
    let (daemon_id, scope) = match role {
        Role::Daemon => {
            let daemon = request
                .daemon
                .filter(|d| valid_daemon_id(d))
                .ok_or_else(|| ApiError::bad_request("a daemon key needs a valid daemon id"))?;
            if request.scope.is_some() {
                return Err(ApiError::bad_request("a daemon key has no scope"));
            }
            (Some(daemon), Vec::new())
        }
        Role::Client => {
            let scope = request.scope.filter(|s| !s.is_empty()).ok_or_else(|| {
                ApiError::bad_request("a client key needs a scope: daemon ids or \"*\"")
            })?;
            if let Some(bad) = scope.iter().find(|s| *s != "*" && !valid_daemon_id(s)) {
                return Err(ApiError::bad_request(format!(
                    "invalid daemon id in scope: {bad:?}"
                )));
            }
            if request.daemon.is_some() {
                return Err(ApiError::bad_request(
                    "a client key takes a scope, not a daemon",
                ));
            }
            (None, scope)
        }
        Role::Admin => {
            if request.daemon.is_some() || request.scope.is_some() {
                return Err(ApiError::bad_request(
                    "an admin key has neither daemon nor scope",
                ));
            }
            (None, Vec::new())
        }
    };
    let key = new_key(role, daemon_id, scope, request.label);
    // A daemon key's daemon is known from now on: clients can queue writes for it before
    // it first connects.
    app.store.create_key(key.record.clone(), now_ms()).await?;
    tracing::info!(key_id = %key.record.key_id, role = role.as_str(), "key created");
    Ok(json(
        StatusCode::CREATED,
        &CreatedKey {
            key: key_view(&key.record, None),
            token: key.token.0,
        },
    ))
}

/// `GET /admin/keys`.
pub async fn list_keys(app: &App) -> Result<Response, ApiError> {
    let keys: Vec<KeyView> = app
        .store
        .keys()
        .await?
        .iter()
        .map(|k| key_view(k, None))
        .collect();
    Ok(json(StatusCode::OK, &KeyList { keys }))
}

/// `DELETE /admin/keys/{id}`.
pub async fn revoke_key(app: &App, key_id: &str) -> Result<Response, ApiError> {
    let removed = app.store.remove_key(key_id).await;
    // Signal even if the removal's commit failed: open requests of the key look it up
    // again, and the removal may already be visible to lookups.
    app.hub.revocations.revoked();
    app.hint(super::cluster::Hint::KeyRevoked(key_id));
    if !removed? {
        return Err(ApiError::not_found(format!("no key {key_id}")));
    }
    tracing::info!(%key_id, "key revoked");
    Ok(json(StatusCode::OK, &RevokedKey { revoked: key_id }))
}

/// `POST /admin/backup` `{"to": "/abs/dir"}`: copies the database, consistently, into a
/// directory on the relay's host while the relay keeps serving, with the admin key next to
/// it, so the directory is a data dir to start a relay on. The answer streams NDJSON:
/// progress lines, then `{"done": true, …}` once the copy is on disk, or `{"error": …}`.
/// Only that last line says the backup exists; the 200 only says it started.
pub async fn backup(app: &Arc<App>, request: BackupRequest) -> Result<Response, ApiError> {
    app.store.can_back_up()?;
    let to = request.to;
    if !to.is_absolute() {
        return Err(ApiError::bad_request(
            "`to` must be an absolute path on the relay's host",
        ));
    }
    let data_dir = std::path::absolute(&app.config.server.data_dir)
        .map_err(|err| StoreError::Unavailable(err.to_string()))?;
    if to.starts_with(&data_dir) || data_dir.starts_with(&to) {
        return Err(ApiError::bad_request(format!(
            "{} overlaps the data dir {}",
            to.display(),
            data_dir.display()
        )));
    }
    match std::fs::read_dir(&to).map(|mut entries| entries.next().is_none()) {
        Ok(false) => {
            return Err(ApiError::bad_request(format!(
                "{} is not empty; back up into a new directory",
                to.display()
            )))
        }
        Ok(true) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => {
            return Err(ApiError::bad_request(format!("{}: {err}", to.display())));
        }
    }
    if app.backup_running.swap(true, Ordering::AcqRel) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "backup_in_progress",
            "another backup is running; try again when it has finished",
        ));
    }
    let (lines_tx, lines_rx) = mpsc::channel::<Bytes>(8);
    let task_app = app.clone();
    tokio::spawn(async move {
        let app = task_app;
        let store = app.store.clone();
        let progress_tx = lines_tx.clone();
        let dir = to.clone();
        let admin_key = data_dir.join(crate::admin::ADMIN_KEY_FILE);
        let copy = tokio::task::spawn_blocking(move || {
            let summary = store.backup_to(&dir, |progress| {
                // Progress is best effort: a slow reader must not slow the copy.
                let _ = progress_tx.try_send(ndjson(&BackupLine::Progress {
                    copied_bytes: progress.copied_bytes,
                    estimated_bytes: progress.estimated_bytes,
                    entries: progress.entries,
                }));
            })?;
            if admin_key.exists() {
                let copied = dir.join(crate::admin::ADMIN_KEY_FILE);
                crate::files::copy_durable(&admin_key, &copied).map_err(|err| {
                    StoreError::Unavailable(format!("{}: {err}", copied.display()))
                })?;
            }
            Ok::<_, StoreError>(summary)
        })
        .await;
        app.backup_running.store(false, Ordering::Release);
        let last = match copy {
            Ok(Ok(summary)) => {
                tracing::info!(
                    to = %to.display(),
                    bytes = summary.bytes,
                    entries = summary.entries,
                    writes_paused_ms = summary.writes_paused.as_millis() as u64,
                    "backup written"
                );
                BackupLine::Done {
                    done: true,
                    to: to.clone(),
                    bytes: summary.bytes,
                    entries: summary.entries,
                    writes_paused_ms: summary.writes_paused.as_millis() as u64,
                    elapsed_ms: summary.elapsed.as_millis() as u64,
                }
            }
            Ok(Err(err)) => {
                tracing::error!(to = %to.display(), error = %err, "backup failed");
                BackupLine::Failed(ErrorBody::new("storage_unavailable", err.to_string()))
            }
            Err(err) => {
                tracing::error!(to = %to.display(), error = %err, "backup panicked");
                BackupLine::Failed(ErrorBody::new(
                    "storage_unavailable",
                    "the backup stopped unexpectedly",
                ))
            }
        };
        let _ = lines_tx.send(ndjson(&last)).await;
    });
    let stream = ReceiverStream::new(lines_rx).map(|line| Ok::<_, Infallible>(Frame::data(line)));
    let mut response = Response::new(StreamBody::new(stream).boxed());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    response
        .headers_mut()
        .insert(SOURCE, Source::Relay.header());
    Ok(response)
}

fn ndjson(value: &BackupLine) -> Bytes {
    let mut line = serde_json::to_string(value).expect("backup lines serialise");
    line.push('\n');
    Bytes::from(line)
}

// ---- The operator's read routes (the console) -------------------------------------------

/// `GET /admin/stats`.
pub async fn stats(app: &App) -> Result<Response, ApiError> {
    use crate::protocol::{
        CommandCounts, DaemonCounts, HistogramView, RelayStats, RequestStats, StoreStats,
    };
    let m = &app.metrics;
    let latency = super::RouteFamily::ALL
        .iter()
        .map(|family| {
            let histogram = &m.request_seconds[*family as usize];
            let (cumulative, sum_seconds) = histogram.snapshot();
            let view = HistogramView {
                bounds: histogram.bounds().to_vec(),
                count: cumulative.last().copied().unwrap_or(0),
                cumulative,
                sum_seconds,
            };
            (family.label(), view)
        })
        .collect();
    let commit = app.store.commit_stats();
    let daemons = app.store.daemons().await?;
    let census = app
        .usage
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(|(at_ms, usage)| {
            let by_state = usage
                .commands
                .iter()
                .map(|(state, count)| (state.to_string(), *count))
                .collect();
            (by_state, rfc3339(*at_ms))
        });
    let (by_state, census_at) = census.unzip();
    let stats = RelayStats {
        version: env!("CARGO_PKG_VERSION"),
        uptime_ms: m.started.elapsed().as_millis() as u64,
        requests: RequestStats {
            total: m.routes.total(),
            latency,
        },
        store: StoreStats {
            backend: app.store.backend_name(),
            flushes: commit.flushes,
            commits: commit.commits,
            flush_micros: commit.flush_micros,
            disk_bytes: app.store.size_on_disk().await.ok(),
        },
        daemons: DaemonCounts {
            total: daemons.len() as u64,
            // As `GET /api/v1/daemons` says it: in a cluster, online on any node.
            online: daemons
                .iter()
                .filter(|d| super::client::is_online(app, d))
                .count() as u64,
        },
        commands: CommandCounts {
            unfinished: daemons.iter().map(|d| d.queued).sum(),
            by_state,
            census_at,
        },
        cluster: app.cluster.as_ref().map(|cluster| cluster.stats()),
    };
    Ok(json(StatusCode::OK, &stats))
}

/// The daemon id an `/admin/daemons/{daemon_id}/…` route names, checked before any read.
fn valid_id(daemon_id: &str) -> Result<(), ApiError> {
    if valid_daemon_id(daemon_id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "a daemon id is 1 to 64 of [A-Za-z0-9._-]",
        ))
    }
}

/// [`valid_id`], and the daemon exists (the list routes' store reads would answer an
/// unknown daemon with an empty list).
async fn known_daemon(app: &App, daemon_id: &str) -> Result<(), ApiError> {
    valid_id(daemon_id)?;
    match app.store.daemon(daemon_id).await? {
        Some(_) => Ok(()),
        None => Err(ApiError::not_found(format!("no daemon {daemon_id}"))),
    }
}

/// `limit` of the operator's lists: 1 to `max`, `default` when absent.
fn list_limit(query: Option<&str>, default: usize, max: usize) -> Result<usize, ApiError> {
    match super::http::query_value(query, "limit") {
        None => Ok(default),
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=max).contains(l))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit must be an integer from 1 to {max}"))
            }),
    }
}

/// `GET /admin/daemons/{daemon_id}/commands`.
pub async fn recent_commands(
    app: &App,
    daemon_id: &str,
    query: Option<&str>,
) -> Result<Response, ApiError> {
    known_daemon(app, daemon_id).await?;
    let limit = list_limit(query, 50, 500)?;
    let commands = app.store.recent_commands(daemon_id, limit).await?;
    let commands = commands.iter().map(super::mirror::command_view).collect();
    Ok(json(
        StatusCode::OK,
        &crate::protocol::CommandList { commands },
    ))
}

/// `GET /admin/daemons/{daemon_id}/contexts`.
pub async fn daemon_contexts(
    app: &App,
    daemon_id: &str,
    query: Option<&str>,
) -> Result<Response, ApiError> {
    use crate::store::ContextState;
    known_daemon(app, daemon_id).await?;
    let limit = list_limit(query, 100, 1000)?;
    let contexts = app
        .store
        .daemon_contexts(daemon_id, limit)
        .await?
        .into_iter()
        .map(|c| crate::protocol::ContextView {
            context_id: c.context_id,
            key: c.key,
            state: match c.state {
                ContextState::Fetching => "fetching",
                ContextState::Complete => "complete",
                ContextState::Failed => "failed",
            },
            status: c.status,
            chunks: c.chunks,
            bytes: c.bytes,
            created_at: rfc3339(c.created_at_ms),
            finished_at: (c.finished_at_ms > 0).then(|| rfc3339(c.finished_at_ms)),
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &crate::protocol::ContextList { contexts },
    ))
}

/// `GET /admin/daemons/{daemon_id}`, `…/changes` and `…/events`: the client routes'
/// answers, for the admin key (they answer an unknown daemon with 404 themselves).
pub async fn daemon(app: &App, daemon_id: &str) -> Result<Response, ApiError> {
    valid_id(daemon_id)?;
    super::client::get_daemon(app, daemon_id, true).await
}

pub async fn changes(
    app: &App,
    daemon_id: &str,
    query: Option<&str>,
) -> Result<Response, ApiError> {
    valid_id(daemon_id)?;
    super::changes::changes(app, daemon_id, query).await
}

pub async fn events(
    app: &Arc<App>,
    daemon_id: &str,
    headers: &http::HeaderMap,
    query: Option<&str>,
) -> Result<Response, ApiError> {
    valid_id(daemon_id)?;
    super::changes::stream_events(app, daemon_id, headers, query).await
}
