//! The sync protocol, the daemon's side of the relay: `/sync/connect`, `/sync/poll` and
//! `/sync/results`. Updates and results are committed to disk before the 200 that
//! acknowledges them; a waiting poll wakes the moment a command is queued.

use std::time::Duration;

use http::StatusCode;
use rand::RngCore;
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::auth::{authorize, Access, Principal};
use super::http::{json, ApiError};
use super::hub::ReadOutcome;
use super::{App, Response};
use crate::protocol::{
    parse_rfc3339, valid_daemon_id, ConnectRequest, ConnectResponse, HttpParams, HttpResult,
    PollRequest, PollResponse, ResultEntry, ResultsRequest, ResultsResponse, WireCommand,
};
use crate::store::{
    now_ms, CachedResponse, ChunkOutcome, CompleteOutcome, ContextState, NewChange, NewChunk,
    StoreError,
};
use base64::Engine;

/// Answers `POST /sync/connect`.
pub async fn connect(
    app: &App,
    principal: &Principal,
    request: ConnectRequest,
) -> Result<Response, ApiError> {
    check_daemon(principal, &request.daemon_id)?;
    let mut bytes = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut bytes);
    let connection_id = format!("conn-{}", hex::encode(bytes));
    let now = now_ms();
    app.store.ensure_daemon(&request.daemon_id, now)?;
    let signals = app.signals(&request.daemon_id)?;
    let record = {
        // Store and publish as one step per daemon: concurrent connects can never leave
        // an older connection id published than stored. The old connection's polls are
        // answered `superseded` from here on.
        let _serial = signals
            .connect_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let record = app.store.connect_daemon(
            &request.daemon_id,
            request.version,
            request.capabilities,
            &connection_id,
            now,
        )?;
        signals.connection.send_replace(Some(connection_id.clone()));
        signals.requeue_reads(&connection_id);
        signals.bump_queue();
        record
    };
    signals.seen();
    app.store.commit().await?;
    signals.publish_update_seq(record.last_update_seq);
    tracing::info!(daemon_id = %request.daemon_id, %connection_id, "daemon connected");
    Ok(json(
        StatusCode::OK,
        &ConnectResponse {
            connection_id,
            poll_timeout_max: app.config.sync.poll_timeout_max.as_secs(),
            last_update_seq: record.last_update_seq,
            relay_version: env!("CARGO_PKG_VERSION").into(),
        },
    ))
}

/// Answers `POST /sync/poll`: stores updates, then hands out commands, waiting for one
/// when asked to.
pub async fn poll(
    app: &App,
    principal: &Principal,
    request: PollRequest,
) -> Result<Response, ApiError> {
    let daemon_id = request.daemon_id.as_str();
    check_daemon(principal, daemon_id)?;
    let limits = &app.config.limits;
    if request.updates.len() > limits.max_updates_per_poll {
        return Err(ApiError::payload_too_large(format!(
            "{} updates in one poll; at most {} are accepted",
            request.updates.len(),
            limits.max_updates_per_poll
        )));
    }
    let timeout = poll_timeout(request.timeout, app.config.sync.poll_timeout_max)?;
    let updates = validate_updates(&request)?;
    let signals = app.signals(daemon_id)?;
    signals.seen();
    let mut connection_rx = signals.connection.subscribe();
    let my_connection = match &request.connection_id {
        Some(id) if connection_rx.borrow_and_update().as_deref() != Some(id.as_str()) => {
            return Err(ApiError::superseded());
        }
        Some(id) => Some(id.clone()),
        None => connection_rx.borrow_and_update().clone(),
    };

    let now = now_ms();
    if signals.last_seen_due(now) {
        app.store.touch_daemon(daemon_id, now)?;
    }
    // Only durable values are reported: a daemon trims its outbox by this number.
    // Updates with no room in the daemon's disk budget are not stored (the daemon keeps
    // them, seeing `last_update_seq` unmoved), but the poll still hands out commands:
    // running them is what frees the budget. With nothing to hand out, it is a 429.
    let mut updates_refused = None;
    let last_update_seq = if updates.is_empty() {
        signals.durable_update_seq()
    } else {
        match app.store.append_changes(daemon_id, updates, now) {
            Ok(outcome) => {
                app.store.commit().await?;
                signals.publish_changes(outcome.last_change_seq);
                signals.publish_update_seq(outcome.last_update_seq);
                outcome.last_update_seq
            }
            Err(err @ StoreError::OverBudget(_)) => {
                tracing::warn!(
                    daemon_id,
                    "updates refused: the daemon's disk budget is full"
                );
                updates_refused = Some(ApiError::from(err));
                signals.durable_update_seq()
            }
            Err(err) => return Err(err.into()),
        }
    };

    let deadline = Instant::now() + timeout;
    let lease_ms = app.config.sync.lease_duration.as_millis() as u64;
    let max = app.config.sync.max_commands_per_poll;
    let mut _waiting = None;
    let (reads, batch) = loop {
        let mut queue_rx = signals.queue.subscribe();
        // Reads first: a client waits for each, and they cost the store nothing.
        let reads =
            signals.take_reads(max, my_connection.as_deref(), |id| app.hub.read_waiting(id));
        let batch = match app.store.lease(
            daemon_id,
            my_connection.as_deref(),
            max - reads.len(),
            lease_ms,
            now_ms(),
        ) {
            Ok(batch) => batch,
            Err(err) => {
                signals.return_reads(reads);
                return Err(err.into());
            }
        };
        if !reads.is_empty()
            || !batch.commands.is_empty()
            || !request.wait_for_commands
            || updates_refused.is_some()
            || Instant::now() >= deadline
        {
            break (reads, batch);
        }
        _waiting.get_or_insert_with(|| signals.waiting_poll());
        let lease_check = batch
            .next_lease_expiry_ms
            .map(|at| Instant::now() + Duration::from_millis(at.saturating_sub(now_ms())))
            .unwrap_or(deadline)
            .min(deadline);
        // Connection first, so a superseded poll answers 409 at once; `lease` checks again
        // under the daemon's lock, which closes the race this check cannot see.
        tokio::select! {
            biased;
            changed = connection_rx.changed() => {
                if changed.is_err() || *connection_rx.borrow_and_update() != my_connection {
                    return Err(ApiError::superseded());
                }
            }
            _ = queue_rx.changed() => {}
            _ = tokio::time::sleep_until(lease_check) => {}
            _ = app.shutdown.cancelled() => break (reads, batch),
        }
    };
    signals.seen();
    if let Some(refused) = updates_refused {
        if reads.is_empty() && batch.commands.is_empty() {
            return Err(refused);
        }
    }
    // A command is run only once it is on disk: one queued a moment ago may still wait for
    // its flush, and a crash would take it back after the daemon ran it.
    if !batch.commands.is_empty() {
        if let Err(err) = app.store.commit_visible().await {
            signals.return_reads(reads);
            return Err(err.into());
        }
    }
    let listed: Vec<(&str, &str, &str, bool)> = reads
        .iter()
        .map(|read| (&*read.id, &*read.method, &*read.params_json, false))
        .chain(
            batch
                .commands
                .iter()
                .map(|c| (&*c.id, &*c.method, &*c.params_json, c.stream)),
        )
        .collect();
    let params: Vec<Box<RawValue>> = listed
        .iter()
        .map(|(_, _, params, _)| {
            RawValue::from_string((*params).to_owned()).unwrap_or_else(|_| null_raw())
        })
        .collect();
    let commands = listed
        .iter()
        .zip(&params)
        .map(|((id, method, _, stream), params)| WireCommand {
            id: (*id).into(),
            method: (*method).into(),
            params: std::borrow::Cow::Borrowed(&**params),
            stream: *stream,
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &PollResponse {
            commands,
            last_update_seq,
        },
    ))
}

/// Answers `POST /sync/results`: stores each result (first one wins), commits, then wakes
/// the clients waiting for them.
pub async fn results(
    app: &App,
    principal: &Principal,
    request: ResultsRequest,
) -> Result<Response, ApiError> {
    let daemon_id = request.daemon_id.as_str();
    check_daemon(principal, daemon_id)?;
    if request.results.len() > app.config.limits.max_results_per_post {
        return Err(ApiError::payload_too_large(format!(
            "{} results in one post; at most {} are accepted",
            request.results.len(),
            app.config.limits.max_results_per_post
        )));
    }
    let mut entries = Vec::with_capacity(request.results.len());
    for (index, raw) in request.results.iter().enumerate() {
        let entry: ResultEntry = serde_json::from_str(raw.get())
            .map_err(|err| ApiError::bad_request(format!("results[{index}]: {err}")))?;
        entries.push(entry);
    }
    let signals = app.signals(daemon_id)?;
    signals.seen();
    let now = now_ms();
    let mut response = ResultsResponse {
        accepted: Vec::new(),
        unknown: Vec::new(),
    };
    let mut finished = Vec::new();
    let mut contexts = Vec::new();
    // Whether the answer acknowledges anything that must survive a crash: every stored
    // result and every chunk answer (a read's result goes to its client in memory and is
    // never stored).
    let mut durable = false;
    let mut gap = None;
    for (index, entry) in entries.into_iter().enumerate() {
        if entry.chunk.is_some() {
            match store_chunk(app, daemon_id, index, &entry, now)? {
                ChunkAnswer::Taken(context_id, finished) => {
                    durable = true;
                    contexts.push(context_id);
                    if finished {
                        app.hub.commands.notify(&entry.command_id);
                    }
                    response.accepted.push(entry.command_id);
                }
                ChunkAnswer::Unknown => {
                    // It may have ended the fetch (too large, or fetched again and cut
                    // otherwise): the daemon stops sending only once that is on disk.
                    durable = true;
                    response.unknown.push(entry.command_id);
                }
                ChunkAnswer::Gap(expected) => {
                    gap = Some((entry.command_id, expected));
                    break;
                }
            }
            continue;
        }
        let result = entry
            .result
            .map(|r| r.get().to_owned())
            .filter(|r| r != "null");
        let error = entry
            .error
            .map(|e| e.get().to_owned())
            .filter(|e| e != "null");
        // A read's client gets its answer straight away; nothing is stored.
        let outcome = ReadOutcome {
            result_json: result,
            error_json: error,
        };
        let outcome = match app.hub.answer_read(daemon_id, &entry.command_id, outcome) {
            Ok(()) => {
                signals.read_answered(&entry.command_id);
                response.accepted.push(entry.command_id);
                continue;
            }
            Err(outcome) => outcome,
        };
        let (result, error) = (outcome.result_json, outcome.error_json);
        match app
            .store
            .complete(daemon_id, &entry.command_id, result, error, now)?
        {
            CompleteOutcome::Completed(command) => {
                durable = true;
                finished.push(command);
                response.accepted.push(entry.command_id);
            }
            CompleteOutcome::Duplicate => {
                durable = true;
                response.accepted.push(entry.command_id);
            }
            CompleteOutcome::Unknown => response.unknown.push(entry.command_id),
        }
    }
    for context_id in contexts {
        app.hub.contexts.notify(&context_id.to_string());
    }
    // Wake waiters before the commit: nothing can cancel this step, and a waiter commits
    // itself before it shows a final state (see `client::await_command`).
    for command in &finished {
        app.hub.commands.notify(&command.id);
        if let (true, Some(result_json)) = (command.method == "http", &command.result_json) {
            remember_get(app, daemon_id, &command.params_json, result_json);
        }
    }
    // A duplicate may be the retry of a result whose first commit failed or was cut short:
    // it is acknowledged only once it is on disk too.
    if durable {
        app.store.commit().await?;
    }
    if let Some((command_id, expected)) = gap {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "chunk_gap",
            format!("chunk out of order for {command_id}: the next one is {expected}"),
        )
        .with_details(serde_json::json!({ "command_id": command_id, "expected": expected })));
    }
    Ok(json(StatusCode::OK, &response))
}

enum ChunkAnswer {
    /// Stored or already stored: the context, and whether the stream is now over.
    Taken(u64, bool),
    Unknown,
    Gap(u64),
}

/// Stores one stream chunk (`results[index]`).
fn store_chunk(
    app: &App,
    daemon_id: &str,
    index: usize,
    entry: &ResultEntry,
    now: u64,
) -> Result<ChunkAnswer, ApiError> {
    let (chunk, data) = chunk_data(index, entry)?;
    let limit = app.config.streams.max_chunk_bytes;
    if data.len() > limit {
        return Err(ApiError::payload_too_large(format!(
            "results[{index}]: a chunk may carry at most {limit} bytes"
        )));
    }
    let headers = entry
        .headers
        .iter()
        .flatten()
        .filter_map(|(name, value)| {
            value
                .as_str()
                .map(|v| (name.to_ascii_lowercase(), v.to_owned()))
        })
        .collect();
    let outcome = app.store.append_chunk(
        daemon_id,
        &entry.command_id,
        NewChunk {
            index: chunk,
            status: entry.status,
            headers,
            data: &data,
            complete: entry.complete,
            error_json: entry
                .error
                .as_ref()
                .map(|e| e.get().to_owned())
                .filter(|e| e != "null"),
        },
        app.config.streams.context_max_size,
        app.config.sync.lease_duration.as_millis() as u64,
        now,
    )?;
    Ok(match outcome {
        ChunkOutcome::Stored(record) | ChunkOutcome::Duplicate(record) => {
            ChunkAnswer::Taken(record.context_id, record.state != ContextState::Fetching)
        }
        // Too large: the fetch is over; `unknown` tells the daemon to stop sending.
        ChunkOutcome::TooLarge(record) => {
            app.hub.contexts.notify(&record.context_id.to_string());
            ChunkAnswer::Unknown
        }
        ChunkOutcome::Unknown => ChunkAnswer::Unknown,
        ChunkOutcome::Gap { expected } => ChunkAnswer::Gap(expected),
    })
}

/// A chunk's index and bytes (`data` as UTF-8, or `data_base64`), as `results[index]`
/// carries them.
pub(super) fn chunk_data(index: usize, entry: &ResultEntry) -> Result<(u64, Vec<u8>), ApiError> {
    let chunk = u64::try_from(entry.chunk.unwrap_or(0))
        .map_err(|_| ApiError::bad_request(format!("results[{index}].chunk must be 0 or more")))?;
    let data = match (&entry.data, &entry.data_base64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(format!(
                "results[{index}] has both data and data_base64"
            )))
        }
        (Some(text), None) => text.as_bytes().to_vec(),
        (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|err| ApiError::bad_request(format!("results[{index}].data_base64: {err}")))?,
        (None, None) => Vec::new(),
    };
    Ok((chunk, data))
}

/// Keeps the 2xx answer of a mirrored GET as the copy served while the daemon is offline.
pub(super) fn remember_get(app: &App, daemon_id: &str, params_json: &str, result_json: &str) {
    let Ok(params) = serde_json::from_str::<HttpParams>(params_json) else {
        return;
    };
    if params.method != "GET" {
        return;
    }
    let Ok(result) = serde_json::from_str::<HttpResult>(result_json) else {
        return;
    };
    if !(200..300).contains(&result.status) {
        return;
    }
    let Ok(rendered) = super::mirror::render_http_result(&result) else {
        return;
    };
    if rendered.body.len() > app.config.commands.get_cache_max_body {
        return;
    }
    let cached = CachedResponse {
        status: result.status,
        headers: rendered.headers,
        body: rendered.body,
        stored_at_ms: now_ms(),
    };
    if let Err(err) = app
        .store
        .put_response(daemon_id, &super::mirror::cache_key(&params), &cached)
    {
        tracing::warn!(error = %err, "could not keep the offline copy of a GET");
    }
}

fn check_daemon(principal: &Principal, daemon_id: &str) -> Result<(), ApiError> {
    if !valid_daemon_id(daemon_id) {
        return Err(ApiError::bad_request(
            "daemon_id must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
        ));
    }
    authorize(principal, Access::Sync(Some(daemon_id)))
}

pub(super) fn poll_timeout(requested: Option<f64>, max: Duration) -> Result<Duration, ApiError> {
    match requested {
        None => Ok(max.min(Duration::from_secs(30))),
        Some(seconds) if seconds.is_finite() && seconds >= 0.0 => {
            Ok(Duration::from_secs_f64(seconds.min(max.as_secs_f64())))
        }
        Some(_) => Err(ApiError::bad_request(
            "timeout must be a number of seconds ≥ 0",
        )),
    }
}

pub(super) fn validate_updates(request: &PollRequest) -> Result<Vec<NewChange>, ApiError> {
    request
        .updates
        .iter()
        .enumerate()
        .map(|(index, update)| {
            if update.kind.is_empty() || update.kind.len() > 256 {
                return Err(ApiError::bad_request(format!(
                    "updates[{index}].type must be 1 to 256 characters"
                )));
            }
            let timestamp_ms = match &update.timestamp {
                None => None,
                Some(text) => Some(parse_rfc3339(text).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "updates[{index}].timestamp is not an RFC 3339 time"
                    ))
                })?),
            };
            Ok(NewChange {
                kind: update.kind.clone(),
                timestamp_ms,
                data_json: update
                    .data
                    .as_ref()
                    .map_or_else(|| "null".to_owned(), |d| d.get().to_owned()),
                daemon_seq: update.seq,
            })
        })
        .collect()
}

pub(super) fn null_raw() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).expect("null is JSON")
}
