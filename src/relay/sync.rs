//! The sync protocol, the daemon's side of the relay: `/sync/connect`, `/sync/poll` and
//! `/sync/results`, and the steps [`super::sync_stream`] shares with them. Updates and results are committed to disk before the 200 that
//! acknowledges them; a waiting poll wakes the moment a command is queued.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use rand::RngCore;
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::auth::{authorize, Access, Principal};
use super::cluster::Hint;
use super::http::{json, ApiError};
use super::hub::{DaemonSignals, Read, ReadOutcome};
use super::{App, Response};
use crate::protocol::{
    parse_rfc3339, valid_daemon_id, ConnectRequest, ConnectResponse, HttpParams, HttpResult,
    PollRequest, PollResponse, ResultEntry, ResultsRequest, ResultsResponse, Update, WireCommand,
};
use crate::store::{
    now_ms, CachedResponse, ChunkLimits, ChunkOutcome, CompleteOutcome, ContextState, LeaseBatch,
    NewChange, NewChunk, Posted, PostedOutcome, StoreError,
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
    app.store.ensure_daemon(&request.daemon_id, now).await?;
    let signals = app.signals(&request.daemon_id).await?;
    let record = {
        // Store and publish as one step per daemon: concurrent connects can never leave
        // an older connection id published than stored. The old connection's polls are
        // answered `superseded` from here on (and `lease` refuses them already, since it
        // checks the stored id).
        let _serial = signals.connect_lock.lock().await;
        let record = app
            .store
            .connect_daemon(
                &request.daemon_id,
                request.version,
                request.capabilities,
                &connection_id,
                now,
            )
            .await?;
        signals.connection.send_replace(Some(connection_id.clone()));
        signals.requeue_reads(&connection_id);
        signals.bump_stored();
        record
    };
    app.hint(Hint::Connected(&request.daemon_id));
    signals.seen();
    // What the store holds is durable, and the daemon, told `last_update_seq`, will not
    // send it again: publish it all (an append cut short may not have; see
    // `append_updates`).
    signals.publish_update_seq(record.last_update_seq);
    signals.publish_changes(record.last_change_seq);
    tracing::info!(daemon_id = %request.daemon_id, %connection_id, "daemon connected");
    Ok(json(
        StatusCode::OK,
        &ConnectResponse {
            connection_id,
            poll_timeout_max: app.config.sync.poll_timeout_max.as_secs(),
            last_update_seq: record.last_update_seq,
            relay_version: env!("CARGO_PKG_VERSION").into(),
            transports: match app.config.sync.stream {
                true => vec!["poll".into(), "stream".into()],
                false => vec!["poll".into()],
            },
        },
    ))
}

/// In a cluster, a connection id this node has not seen may have been made on another
/// node a moment ago (its hint still on the way): the stored id decides before a request
/// of it is refused `superseded`. A lone relay's memory is exact and needs no read.
pub(super) async fn confirm_connection(
    app: &App,
    daemon_id: &str,
    signals: &DaemonSignals,
    claimed: &str,
) {
    if app.cluster.is_some() && signals.connection.borrow().as_deref() != Some(claimed) {
        super::cluster::reread_connection(app, daemon_id).await;
    }
}

/// Answers `POST /sync/poll`: stores updates, then hands out commands, waiting for one
/// when asked to.
pub async fn poll(
    app: &Arc<App>,
    principal: &Principal,
    request: PollRequest,
) -> Result<Response, ApiError> {
    let daemon_id = request.daemon_id.as_str();
    check_daemon(principal, daemon_id)?;
    check_update_count(app, request.updates.len())?;
    let timeout = poll_timeout(request.timeout, app.config.sync.poll_timeout_max)?;
    let updates = validate_updates(&request.updates)?;
    let signals = app.signals(daemon_id).await?;
    signals.seen();
    if let Some(id) = &request.connection_id {
        confirm_connection(app, daemon_id, &signals, id).await;
    }
    let mut connection_rx = signals.connection.subscribe();
    let my_connection = match &request.connection_id {
        Some(id) if connection_rx.borrow_and_update().as_deref() != Some(id.as_str()) => {
            return Err(ApiError::superseded());
        }
        Some(id) => Some(id.clone()),
        None => connection_rx.borrow_and_update().clone(),
    };
    // This node answers other nodes' reads of the daemon while it polls here.
    if let Some(cluster) = &app.cluster {
        cluster.hold(daemon_id, &signals);
    }

    touch(app, &signals, daemon_id).await;
    // Only durable values are reported: a daemon trims its outbox by this number.
    // Updates with no room in the daemon's disk budget are not stored (the daemon keeps
    // them, seeing `last_update_seq` unmoved), but the poll still hands out commands:
    // running them is what frees the budget. With nothing to hand out, it is a 429.
    let mut updates_refused = None;
    let last_update_seq = match append_updates(app, &signals, daemon_id, updates).await {
        Ok(seq) => seq,
        Err(err @ StoreError::OverBudget(_)) => {
            updates_refused = Some(ApiError::from(err));
            signals.durable_update_seq()
        }
        Err(err) => return Err(err.into()),
    };

    let deadline = Instant::now() + timeout;
    let max = app.config.sync.max_commands_per_poll;
    let mut _waiting = None;
    let (reads, batch) = loop {
        let mut queue_rx = signals.queue.subscribe();
        let (reads, batch) = next_commands(
            app,
            &signals,
            daemon_id,
            my_connection.as_deref(),
            max,
            true,
        )
        .await?;
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
    Ok(with_commands(&reads, &batch, |commands| {
        json(
            StatusCode::OK,
            &PollResponse {
                commands,
                last_update_seq,
            },
        )
    }))
}

/// At most `limits.max_updates_per_poll` updates in one poll or stream line.
pub(super) fn check_update_count(app: &App, count: usize) -> Result<(), ApiError> {
    let max = app.config.limits.max_updates_per_poll;
    if count > max {
        return Err(ApiError::payload_too_large(format!(
            "{count} updates in one poll; at most {max} are accepted"
        )));
    }
    Ok(())
}

/// The daemon's last-seen time, stored now and then; a hint, so a failure is only logged.
pub(super) async fn touch(app: &App, signals: &DaemonSignals, daemon_id: &str) {
    let now = now_ms();
    if signals.last_seen_due(now) {
        if let Err(err) = app.store.touch_daemon(daemon_id, now).await {
            tracing::debug!(daemon_id, error = %err, "last_seen not stored");
        }
    }
}

/// Appends checked updates to the daemon's change log; the `last_update_seq` now durable
/// (unchanged when there were none).
///
/// The append and the publishing of what it made durable run as one task of their own:
/// a request cut short while the store commits (a daemon's connection lost) must still
/// make the entries visible to readers. Were the publish skipped, readers would not see
/// them until the daemon's next append, while the daemon, told on reconnect that they are
/// stored, never sends them again.
pub(super) async fn append_updates(
    app: &Arc<App>,
    signals: &Arc<DaemonSignals>,
    daemon_id: &str,
    updates: Vec<NewChange>,
) -> Result<u64, StoreError> {
    if updates.is_empty() {
        return Ok(signals.durable_update_seq());
    }
    let tracker = app.sessions.clone();
    let (app, signals, daemon_id) = (app.clone(), signals.clone(), daemon_id.to_owned());
    // Tracked with the sessions: shutdown waits for it before it closes the store.
    let task = tracker.spawn(tracing::Instrument::in_current_span(async move {
        match app
            .store
            .append_changes(&daemon_id, updates, now_ms())
            .await
        {
            Ok(outcome) => {
                signals.publish_changes(outcome.last_change_seq);
                signals.publish_update_seq(outcome.last_update_seq);
                app.hint(Hint::Changes(&daemon_id, outcome.last_change_seq));
                Ok(outcome.last_update_seq)
            }
            Err(err) => {
                if matches!(err, StoreError::OverBudget(_)) {
                    tracing::warn!(
                        %daemon_id,
                        "updates refused: the daemon's disk budget is full"
                    );
                }
                Err(err)
            }
        }
    }));
    match task.await {
        Ok(outcome) => outcome,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(_) => Err(StoreError::Closed),
    }
}

/// One look for work: reads waiting (they cost the store nothing) first, then, with
/// `lease`, commands leased durably, up to `max` in all.
pub(super) async fn next_commands(
    app: &App,
    signals: &DaemonSignals,
    daemon_id: &str,
    connection: Option<&str>,
    max: usize,
    lease: bool,
) -> Result<(Vec<Read>, LeaseBatch), ApiError> {
    let reads = signals.take_reads(max, connection, |id| app.hub.read_waiting(id));
    if !lease {
        return Ok((reads, LeaseBatch::default()));
    }
    // Durable when it returns, leases included: a command is run only once it is on
    // disk, or a crash would take it back after the daemon ran it.
    let lease_ms = app.config.sync.lease_duration.as_millis() as u64;
    match app
        .store
        .lease(daemon_id, connection, max - reads.len(), lease_ms, now_ms())
        .await
    {
        Ok(batch) => Ok((reads, batch)),
        // The store is away (PostgreSQL restarting): reads need nothing of it, and their
        // clients are waiting.
        // Look again in a second, as if a lease ran out then.
        Err(StoreError::Unavailable(_)) if !reads.is_empty() => {
            let retry = LeaseBatch {
                commands: Vec::new(),
                next_lease_expiry_ms: Some(now_ms() + 1_000),
            };
            Ok((reads, retry))
        }
        Err(err) => {
            signals.return_reads(reads);
            Err(err.into())
        }
    }
}

/// Calls `f` with reads and leased commands as the wire lists them, their params passed
/// on as stored.
pub(super) fn with_commands<R>(
    reads: &[Read],
    batch: &LeaseBatch,
    f: impl FnOnce(Vec<WireCommand<'_>>) -> R,
) -> R {
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
    f(commands)
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
    let signals = app.signals(daemon_id).await?;
    let response = store_results(app, &signals, daemon_id, &request.results).await?;
    Ok(json(StatusCode::OK, &response))
}

/// Checks and stores a list of results and chunks (the first result of a command wins),
/// durably, then wakes the clients waiting for them.
pub(super) async fn store_results(
    app: &App,
    signals: &DaemonSignals,
    daemon_id: &str,
    results: &[Box<RawValue>],
) -> Result<ResultsResponse, ApiError> {
    if results.len() > app.config.limits.max_results_per_post {
        return Err(ApiError::payload_too_large(format!(
            "{} results in one post; at most {} are accepted",
            results.len(),
            app.config.limits.max_results_per_post
        )));
    }
    let mut entries = Vec::with_capacity(results.len());
    for (index, raw) in results.iter().enumerate() {
        let entry: ResultEntry = serde_json::from_str(raw.get())
            .map_err(|err| ApiError::bad_request(format!("results[{index}]: {err}")))?;
        entries.push(entry);
    }
    signals.seen();
    let now = now_ms();
    // Every entry is checked before anything is answered or stored: a bad one is a 400
    // for the whole post.
    let mut checked = Vec::with_capacity(entries.len());
    for (index, entry) in entries.into_iter().enumerate() {
        let posted = if entry.chunk.is_some() {
            Posted::Chunk {
                chunk: new_chunk(app, index, &entry)?,
                command_id: entry.command_id,
            }
        } else {
            let text = |raw: Option<Box<RawValue>>| {
                raw.map(|r| r.get().to_owned()).filter(|r| r != "null")
            };
            Posted::Result {
                command_id: entry.command_id,
                result_json: text(entry.result),
                error_json: text(entry.error),
            }
        };
        checked.push(posted);
    }
    // A read's client gets its answer straight away; nothing of it is stored.
    let mut to_store = Vec::with_capacity(checked.len());
    let mut order = Vec::with_capacity(checked.len());
    for posted in checked {
        let posted = match posted {
            Posted::Result {
                command_id,
                result_json,
                error_json,
            } => {
                let outcome = ReadOutcome {
                    result_json,
                    error_json,
                };
                match app.hub.answer_read(daemon_id, &command_id, outcome) {
                    Ok(()) => {
                        signals.read_answered(&command_id);
                        order.push((command_id, None));
                        continue;
                    }
                    Err(outcome) => Posted::Result {
                        command_id,
                        result_json: outcome.result_json,
                        error_json: outcome.error_json,
                    },
                }
            }
            chunk => chunk,
        };
        let command_id = match &posted {
            Posted::Result { command_id, .. } | Posted::Chunk { command_id, .. } => {
                command_id.clone()
            }
        };
        order.push((command_id, Some(to_store.len())));
        to_store.push(posted);
    }
    let limits = ChunkLimits {
        max_context_bytes: app.config.streams.context_max_size,
        lease_ms: app.config.sync.lease_duration.as_millis() as u64,
    };
    // Durable when it returns; the waiters are woken after. A retried post wakes them
    // again (a duplicate), should this request be cut short in between.
    let outcomes = app
        .store
        .post_results(daemon_id, to_store, limits, now)
        .await?;
    let mut response = ResultsResponse {
        accepted: Vec::new(),
        unknown: Vec::new(),
    };
    let mut gap = None;
    for (command_id, slot) in order {
        let Some(index) = slot else {
            response.accepted.push(command_id);
            continue;
        };
        let Some(outcome) = outcomes.get(index) else {
            break;
        };
        let accepted = match outcome {
            PostedOutcome::Result(CompleteOutcome::Completed(command)) => {
                app.hub.commands.notify(&command.id);
                app.hint(Hint::Done(&command.id));
                if let (true, Some(result_json)) = (command.method == "http", &command.result_json)
                {
                    remember_get(app, daemon_id, &command.params_json, result_json).await;
                }
                true
            }
            PostedOutcome::Result(CompleteOutcome::Duplicate) => {
                app.hub.commands.notify(&command_id);
                app.hint(Hint::Done(&command_id));
                true
            }
            PostedOutcome::Result(CompleteOutcome::Unknown) => false,
            PostedOutcome::Chunk(
                ChunkOutcome::Stored(record) | ChunkOutcome::Duplicate(record),
            ) => {
                let context_id = record.context_id.to_string();
                app.hub.contexts.notify(&context_id);
                app.hint(Hint::Context(&context_id));
                if record.state != ContextState::Fetching {
                    app.hub.commands.notify(&command_id);
                    app.hint(Hint::Done(&command_id));
                }
                true
            }
            // Too large: the fetch is over; `unknown` tells the daemon to stop sending.
            PostedOutcome::Chunk(ChunkOutcome::TooLarge(record)) => {
                let context_id = record.context_id.to_string();
                app.hub.contexts.notify(&context_id);
                app.hint(Hint::Context(&context_id));
                false
            }
            PostedOutcome::Chunk(ChunkOutcome::Unknown) => false,
            PostedOutcome::Chunk(ChunkOutcome::Gap { expected }) => {
                gap = Some((command_id, *expected));
                break;
            }
        };
        match accepted {
            true => response.accepted.push(command_id),
            false => response.unknown.push(command_id),
        }
    }
    if let Some((command_id, expected)) = gap {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "chunk_gap",
            format!("chunk out of order for {command_id}: the next one is {expected}"),
        )
        .with_details(serde_json::json!({ "command_id": command_id, "expected": expected })));
    }
    Ok(response)
}

/// One stream chunk (`results[index]`), checked.
fn new_chunk(app: &App, index: usize, entry: &ResultEntry) -> Result<NewChunk, ApiError> {
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
    Ok(NewChunk {
        index: chunk,
        status: entry.status,
        headers,
        data,
        complete: entry.complete,
        error_json: entry
            .error
            .as_ref()
            .map(|e| e.get().to_owned())
            .filter(|e| e != "null"),
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
pub(super) async fn remember_get(app: &App, daemon_id: &str, params_json: &str, result_json: &str) {
    let Ok(params) = serde_json::from_str::<HttpParams>(params_json) else {
        return;
    };
    if params.method != "GET" {
        return;
    }
    let Ok(result) = serde_json::from_str::<HttpResult>(result_json) else {
        return;
    };
    let Ok(rendered) = super::mirror::render_http_result(&result) else {
        return;
    };
    keep_copy(
        app,
        daemon_id,
        &super::mirror::cache_key(&params),
        &rendered,
    )
    .await;
}

/// Keeps a GET's rendered 2xx answer as the copy served while the daemon is offline.
pub(super) async fn keep_copy(
    app: &App,
    daemon_id: &str,
    cache_key: &str,
    rendered: &super::mirror::Rendered,
) -> bool {
    if !rendered.status.is_success() || rendered.body.len() > app.config.commands.get_cache_max_body
    {
        return false;
    }
    let cached = CachedResponse {
        status: rendered.status.as_u16(),
        headers: rendered.headers.clone(),
        body: rendered.body.clone(),
        stored_at_ms: now_ms(),
    };
    match app.store.cache_response(daemon_id, cache_key, cached).await {
        Ok(_) => true,
        Err(err) => {
            tracing::warn!(error = %err, "could not keep the offline copy of a GET");
            false
        }
    }
}

pub(super) fn check_daemon(principal: &Principal, daemon_id: &str) -> Result<(), ApiError> {
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

pub(super) fn validate_updates(updates: &[Update]) -> Result<Vec<NewChange>, ApiError> {
    updates
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
