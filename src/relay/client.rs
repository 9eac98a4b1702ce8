//! Client API routes that the relay answers itself: the daemon listing, one daemon's
//! status, and a command's state (`GET /api/v1/commands/{id}?wait=`).

use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

use super::auth::Principal;
use super::http::{json, query_value, ApiError};
use super::mirror::command_view;
use super::sync_stream::KEEPALIVE;
use super::{App, Response};
use crate::protocol::{rfc3339, DaemonList, DaemonView};
use crate::store::{now_ms, CommandRecord, DaemonRecord};

/// A daemon as clients see it; `admin`: with the node holding it (see [`holder`]).
pub fn daemon_view(app: &App, record: DaemonRecord, admin: bool) -> DaemonView {
    DaemonView {
        node: if admin { holder(app, &record) } else { None },
        online: is_online(app, &record),
        last_seen: record
            .last_seen_ms
            .max(app.hub.last_seen_ms(&record.daemon_id))
            .map(rfc3339),
        // Only durable entries count, as for the change log's readers.
        last_seq: app
            .hub
            .committed_changes(&record.daemon_id)
            .unwrap_or(record.last_change_seq),
        daemon_id: record.daemon_id,
        version: record.version,
        capabilities: record.capabilities,
        queued: record.queued,
    }
}

/// A daemon's `online` as clients see it: heard from here within `online_grace` (or a poll
/// or stream open here), or, in a cluster, [`online_elsewhere`].
pub fn is_online(app: &App, record: &DaemonRecord) -> bool {
    app.hub
        .online(&record.daemon_id, app.config.sync.online_grace)
        || online_elsewhere(app, record)
}

/// In a cluster, whether the daemon is online on another node: the node holding it stores
/// its last-seen time at least every [`KEEPALIVE`] while its poll or stream is open (the
/// stream's keep-alive, or the holder's own tick while a poll waits), and with every
/// request; a time within `online_grace` plus that is a daemon still held. So a daemon
/// that left is seen offline on every node up to `KEEPALIVE` later than a single relay
/// would say.
fn online_elsewhere(app: &App, record: &DaemonRecord) -> bool {
    let limit = app.config.sync.online_grace + KEEPALIVE;
    app.cluster.is_some()
        && record
            .last_seen_ms
            .is_some_and(|seen| now_ms().saturating_sub(seen) <= limit.as_millis() as u64)
}

/// In a cluster, the node holding an online daemon: this one while it polls or streams
/// here or was heard from within `online_grace`, else the node it last connected through
/// while it is online elsewhere ([`online_elsewhere`]; an agent polls or streams on the
/// node it connected to, over its one HTTP/2 connection). `None` on a lone relay and for
/// a daemon offline everywhere.
fn holder(app: &App, record: &DaemonRecord) -> Option<String> {
    let cluster = app.cluster.as_ref()?;
    if app
        .hub
        .online(&record.daemon_id, app.config.sync.online_grace)
    {
        Some(cluster.node.clone())
    } else if online_elsewhere(app, record) {
        record.node.clone()
    } else {
        None
    }
}

/// `GET /api/v1/daemons` (client keys: their scope) and, `admin`, `GET /admin/daemons`
/// (all, with the node holding each).
pub async fn list_daemons(
    app: &App,
    principal: &Principal,
    admin: bool,
) -> Result<Response, ApiError> {
    let daemons: Vec<DaemonView> = app
        .store
        .daemons()
        .await?
        .into_iter()
        .filter(|d| principal.role == crate::store::Role::Admin || principal.can_see(&d.daemon_id))
        .map(|d| daemon_view(app, d, admin))
        .collect();
    Ok(json(StatusCode::OK, &DaemonList { daemons }))
}

/// `GET /api/v1/daemons/{id}`, and for `admin` `GET /admin/daemons/{id}`.
pub async fn get_daemon(app: &App, daemon_id: &str, admin: bool) -> Result<Response, ApiError> {
    let record = app
        .store
        .daemon(daemon_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no daemon {daemon_id}")))?;
    Ok(json(StatusCode::OK, &daemon_view(app, record, admin)))
}

/// `GET /api/v1/commands/{id}?wait=N`: waits up to N seconds for a final state.
pub async fn get_command(
    app: &App,
    principal: &Principal,
    command_id: &str,
    query: Option<&str>,
) -> Result<Response, ApiError> {
    let wait = wait_param(query, app.config.commands.wait_max)?;
    let not_found = || ApiError::not_found(format!("no command {command_id}"));
    // Scope is checked before waiting, so a foreign id cannot be used to hold a request.
    let command = app
        .store
        .command(command_id, now_ms())
        .await?
        .ok_or_else(not_found)?;
    if !principal.can_see(&command.daemon_id) {
        return Err(not_found());
    }
    let command = await_command(app, command_id, wait)
        .await?
        .ok_or_else(not_found)?;
    Ok(json(StatusCode::OK, &command_view(&command)))
}

/// The command once it is final, or as it is when `wait` runs out (or shutdown begins).
/// Wakes on the completion signal, and at the command's own expiry time so that `expired`
/// shows when due. `None` when there is no such command.
pub async fn await_command(
    app: &App,
    command_id: &str,
    wait: Duration,
) -> Result<Option<CommandRecord>, ApiError> {
    let mut watch = app.hub.commands.watch(command_id);
    let deadline = Instant::now() + wait;
    loop {
        let now = now_ms();
        // Durable when read: a crash can never change an outcome a client was shown.
        let Some(command) = app.store.command(command_id, now).await? else {
            return Ok(None);
        };
        if command.state.is_final() {
            return Ok(Some(command));
        }
        if Instant::now() >= deadline {
            return Ok(Some(command));
        }
        let due =
            Instant::now() + Duration::from_millis(command.next_deadline_ms().saturating_sub(now));
        tokio::select! {
            _ = watch.changed() => {}
            _ = tokio::time::sleep_until(deadline.min(due)) => {}
            _ = app.shutdown.cancelled() => return Ok(Some(command)),
        }
    }
}

/// `?wait=N` in seconds, clamped to `max`; absent means no waiting.
pub fn wait_param(query: Option<&str>, max: Duration) -> Result<Duration, ApiError> {
    match query_value(query, "wait") {
        None => Ok(Duration::ZERO),
        Some(text) => text
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s.min(max.as_secs_f64())))
            .ok_or_else(|| ApiError::bad_request("wait must be a number of seconds ≥ 0")),
    }
}
