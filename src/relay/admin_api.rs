//! `/admin/*`: key management for the `syncrelay keys` CLI (create, list, revoke; revoking
//! takes effect on the next request, since every request looks its key up) and the
//! operator's view of all daemons.

use http::StatusCode;

use super::auth::new_key;
use super::http::{json, parse_json, ApiError};
use super::{App, Response};
use crate::protocol::{rfc3339, valid_daemon_id, CreateKeyRequest, KeyView};
use crate::store::{now_ms, KeyRecord, Role};

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
pub async fn create_key(app: &App, body: &[u8]) -> Result<Response, ApiError> {
    let request: CreateKeyRequest = parse_json(body)?;
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
    if let Some(daemon) = &daemon_id {
        // The daemon is known from now on: clients can queue writes for it before it
        // first connects.
        app.store.ensure_daemon(daemon, now_ms())?;
    }
    let key = new_key(role, daemon_id, scope, request.label);
    app.store.put_key(&key.record)?;
    app.store.commit().await?;
    tracing::info!(key_id = %key.record.key_id, role = role.as_str(), "key created");
    Ok(json(
        StatusCode::CREATED,
        &key_view(&key.record, Some(key.token.0)),
    ))
}

/// `GET /admin/keys`.
pub fn list_keys(app: &App) -> Result<Response, ApiError> {
    let keys: Vec<KeyView> = app
        .store
        .keys()?
        .iter()
        .map(|k| key_view(k, None))
        .collect();
    Ok(json(StatusCode::OK, &serde_json::json!({ "keys": keys })))
}

/// `DELETE /admin/keys/{id}`.
pub async fn revoke_key(app: &App, key_id: &str) -> Result<Response, ApiError> {
    if !app.store.remove_key(key_id)? {
        return Err(ApiError::not_found(format!("no key {key_id}")));
    }
    // Signal first: open requests of the key look it up again, and the removal is already
    // visible to lookups, even if the commit below fails.
    app.hub.revocations.revoked();
    app.store.commit().await?;
    tracing::info!(%key_id, "key revoked");
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "revoked": key_id }),
    ))
}
