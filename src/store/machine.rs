//! The rules of the store, written once and applied by every backend: a command's life
//! (queue limit, lease and redelivery, expiry, first result wins), the change log's
//! de-duplication by the daemon's `seq`, and a context's chunk rules (no gaps, a retry is
//! ignored, a refetch cut otherwise fails the fetch, the size limit). Each function takes
//! the records a backend has read (under its lock or in its transaction) and says what
//! becomes of them; the backend only reads and writes.

use super::changes::ChangeRecord;
use super::{
    new_command_id, CommandRecord, CommandState, ContextRecord, ContextRequest, ContextState,
    NewChange, NewChunk, NewCommand, Result, StoreError,
};

// ---- commands ----------------------------------------------------------------------

/// A new command at `queue_seq`, or `QueueFull` when the daemon already has `queued`
/// unfinished commands and the limit allows no more.
pub(super) fn new_command(
    new: NewCommand,
    queued: u64,
    queue_seq: u64,
    now_ms: u64,
) -> Result<CommandRecord> {
    if queued >= new.queue_limit {
        return Err(StoreError::QueueFull {
            daemon_id: new.daemon_id,
            limit: new.queue_limit,
        });
    }
    Ok(CommandRecord {
        id: new_command_id(),
        daemon_id: new.daemon_id,
        method: new.method,
        params_json: new.params_json,
        stream: new.stream,
        state: CommandState::Queued,
        created_at_ms: now_ms,
        expires_at_ms: now_ms.saturating_add(new.ttl_ms),
        queue_seq,
        lease_until_ms: 0,
        deliveries: 0,
        finished_at_ms: 0,
        result_json: None,
        error_json: None,
        idempotency: new.idempotency,
    })
}

/// What a poll does with one command of the daemon's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LeaseStep {
    /// Final already: it only leaves the queue.
    Unqueue,
    /// Leased to the daemon until then: not now.
    Running(u64),
    /// Past its TTL: it expires.
    Expire,
    /// Handed out now.
    Lease,
}

pub(super) fn lease_step(command: &CommandRecord, now_ms: u64) -> LeaseStep {
    if command.state.is_final() {
        LeaseStep::Unqueue
    } else if command.state == CommandState::Delivered && command.lease_until_ms > now_ms {
        LeaseStep::Running(command.lease_until_ms)
    } else if command.expires_at_ms <= now_ms {
        LeaseStep::Expire
    } else {
        LeaseStep::Lease
    }
}

/// Hands the command out for `lease_ms`.
pub(super) fn lease(command: &mut CommandRecord, lease_ms: u64, now_ms: u64) {
    command.state = CommandState::Delivered;
    command.lease_until_ms = now_ms.saturating_add(lease_ms);
    command.deliveries += 1;
}

/// A reconnect takes back the command's lease; `true` when it had one.
pub(super) fn release(command: &mut CommandRecord) -> bool {
    if command.state != CommandState::Delivered {
        return false;
    }
    command.state = CommandState::Queued;
    command.lease_until_ms = 0;
    true
}

/// What a posted result does to its command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CompleteStep {
    /// Not this daemon's, unknown, or expired.
    Unknown,
    /// It already has a result: the first one wins.
    Duplicate,
    /// It ends in this state.
    Finish(CommandState),
}

pub(super) fn complete_step(
    command: Option<&CommandRecord>,
    daemon_id: &str,
    is_error: bool,
) -> CompleteStep {
    let Some(command) = command.filter(|c| c.daemon_id == daemon_id) else {
        return CompleteStep::Unknown;
    };
    match command.state {
        CommandState::Completed | CommandState::Failed => CompleteStep::Duplicate,
        CommandState::Expired => CompleteStep::Unknown,
        CommandState::Queued | CommandState::Delivered => CompleteStep::Finish(match is_error {
            true => CommandState::Failed,
            false => CommandState::Completed,
        }),
    }
}

/// Moves the command to a final state.
pub(super) fn finish(
    command: &mut CommandRecord,
    state: CommandState,
    result_json: Option<String>,
    error_json: Option<String>,
    now_ms: u64,
) {
    command.state = state;
    command.finished_at_ms = now_ms;
    command.result_json = result_json;
    command.error_json = error_json;
}

// ---- change log --------------------------------------------------------------------

/// The updates to store, numbered after `last_change_seq`, dropping those whose daemon
/// `seq` is at or below `last_update_seq` (retries); both counters move past them.
pub(super) fn admit_updates(
    last_update_seq: &mut u64,
    last_change_seq: &mut u64,
    updates: Vec<NewChange>,
    now_ms: u64,
) -> Vec<(u64, ChangeRecord)> {
    let mut rows = Vec::with_capacity(updates.len());
    for update in updates {
        if let Some(seq) = update.daemon_seq {
            if seq <= *last_update_seq {
                continue;
            }
            *last_update_seq = seq;
        }
        *last_change_seq += 1;
        rows.push((
            *last_change_seq,
            ChangeRecord {
                kind: update.kind,
                timestamp_ms: update.timestamp_ms.unwrap_or(now_ms),
                stored_at_ms: now_ms,
                data_json: update.data_json,
                daemon_seq: update.daemon_seq,
            },
        ));
    }
    rows
}

// ---- contexts ----------------------------------------------------------------------

/// Whether a request may be served from `record` rather than fetch again: complete and
/// fresh, or still being fetched by a command (`command`, as stored) that can still
/// deliver.
pub(super) fn context_usable(
    record: &ContextRecord,
    command: Option<&CommandRecord>,
    ttl_ms: u64,
    now_ms: u64,
) -> bool {
    if !record.servable() {
        return false;
    }
    match record.state {
        ContextState::Complete => record.created_at_ms.saturating_add(ttl_ms) > now_ms,
        ContextState::Fetching => {
            command.is_some_and(|c| !c.state.is_final() && !c.due_to_expire(now_ms))
        }
        ContextState::Failed => false,
    }
}

/// The stream command that fetches a context.
pub(super) fn stream_command(request: &ContextRequest) -> NewCommand {
    NewCommand {
        daemon_id: request.daemon_id.clone(),
        method: "http".into(),
        params_json: request.params_json.clone(),
        stream: true,
        ttl_ms: request.command_ttl_ms,
        idempotency: None,
        queue_limit: request.queue_limit,
    }
}

/// A new fetch's record.
pub(super) fn new_context(
    context_id: u64,
    request: ContextRequest,
    command_id: String,
    now_ms: u64,
) -> ContextRecord {
    ContextRecord {
        context_id,
        daemon_id: request.daemon_id,
        key: request.key,
        command_id,
        state: ContextState::Fetching,
        status: None,
        headers: Vec::new(),
        chunks: 0,
        bytes: 0,
        created_at_ms: now_ms,
        finished_at_ms: 0,
        error_json: None,
    }
}

/// Whether checking a chunk needs the stored bytes of the same index: a repeated index
/// while the fetch runs, which must be a retry of the same bytes.
pub(super) fn chunk_needs_stored(record: &ContextRecord, index: u64) -> bool {
    index < record.chunks && record.state == ContextState::Fetching
}

/// What a posted chunk does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChunkStep {
    /// No fetch for it (unknown, another daemon's, or over).
    Unknown,
    /// A repeated index with other bytes: the daemon's response was fetched again and cut
    /// otherwise, so appending would garble the context. The fetch fails
    /// ([`restarted`]) and its command finishes; the next request starts a clean one.
    Restarted,
    /// A retry, ignored; `finish_command` when the context ended without its command (a
    /// crash in between), which finishes now.
    Duplicate { finish_command: bool },
    /// The index skips ahead; `expected` is the next one needed.
    Gap { expected: u64 },
    /// The next chunk: append it ([`append_chunk`]).
    Append,
}

/// `same_as_stored`: for a chunk that [`chunk_needs_stored`], whether its bytes equal the
/// stored ones.
pub(super) fn chunk_step(
    record: Option<&ContextRecord>,
    command: Option<&CommandRecord>,
    daemon_id: &str,
    index: u64,
    same_as_stored: bool,
) -> ChunkStep {
    let (Some(record), Some(command)) = (record, command) else {
        return ChunkStep::Unknown;
    };
    if record.daemon_id != daemon_id {
        return ChunkStep::Unknown;
    }
    if chunk_needs_stored(record, index) && !same_as_stored {
        return ChunkStep::Restarted;
    }
    if index < record.chunks {
        return ChunkStep::Duplicate {
            finish_command: record.state != ContextState::Fetching && !command.state.is_final(),
        };
    }
    if record.state != ContextState::Fetching || command.state.is_final() {
        return ChunkStep::Unknown;
    }
    if index > record.chunks {
        return ChunkStep::Gap {
            expected: record.chunks,
        };
    }
    ChunkStep::Append
}

/// Fails a fetch whose response came again cut otherwise.
pub(super) fn restarted(record: &mut ContextRecord, now_ms: u64) {
    record.state = ContextState::Failed;
    record.finished_at_ms = now_ms;
    record.error_json = Some(
        serde_json::json!({
            "code": "stream_restarted",
            "message": "the daemon's response was fetched again and differs"
        })
        .to_string(),
    );
}

/// Why a chunk cannot be stored: the context would pass `max_context_bytes`.
pub(super) fn too_large(
    record: &ContextRecord,
    len: usize,
    max_context_bytes: u64,
) -> Option<String> {
    (record.bytes + len as u64 > max_context_bytes).then(|| {
        serde_json::json!({
            "code": "payload_too_large",
            "message": format!("the context exceeds {max_context_bytes} bytes")
        })
        .to_string()
    })
}

/// Why a chunk cannot be stored: the daemon's disk budget is used up.
pub(super) fn over_budget(daemon_id: &str) -> String {
    serde_json::json!({
        "code": "queue_full",
        "message": format!("daemon {daemon_id} has used its disk budget")
    })
    .to_string()
}

/// Applies the next chunk to its context, or fails the fetch with `refusal`. Returns the
/// bytes to store as chunk `chunk.index`, if any. Whether the command goes on is
/// [`stream_finish`] of the record afterwards.
pub(super) fn append_chunk(
    record: &mut ContextRecord,
    chunk: NewChunk,
    refusal: Option<String>,
    now_ms: u64,
) -> Option<Vec<u8>> {
    if let Some(refusal) = refusal {
        record.state = ContextState::Failed;
        record.error_json = Some(refusal);
        record.finished_at_ms = now_ms;
        return None;
    }
    if chunk.index == 0 {
        record.status = chunk.status;
        record.headers = chunk.headers;
    }
    record.chunks += 1;
    record.bytes += chunk.data.len() as u64;
    if chunk.complete {
        record.state = if chunk.error_json.is_some() {
            ContextState::Failed
        } else {
            ContextState::Complete
        };
        record.error_json = chunk.error_json;
        record.finished_at_ms = now_ms;
    }
    Some(chunk.data)
}

/// How a stream command ends with its context: `None` while the fetch runs (the lease is
/// renewed instead), else its final state, result (a summary: the body lives in the
/// context) and error.
pub(super) fn stream_finish(
    record: &ContextRecord,
) -> Option<(CommandState, Option<String>, Option<String>)> {
    if record.state == ContextState::Fetching {
        return None;
    }
    let summary = serde_json::json!({
        "status": record.status,
        "context_id": record.context_id,
        "chunks": record.chunks,
        "bytes": record.bytes,
    })
    .to_string();
    Some(match record.state {
        ContextState::Failed => (
            CommandState::Failed,
            Some(summary),
            Some(
                record
                    .error_json
                    .clone()
                    .unwrap_or_else(|| "{\"code\":\"stream_failed\"}".into()),
            ),
        ),
        _ => (CommandState::Completed, Some(summary), None),
    })
}

/// Whether a context is over for good and may be retired: ended, or abandoned (a fetch
/// whose command, as stored, ended or is due to expire).
pub(super) fn context_abandoned(
    record: &ContextRecord,
    command: Option<&CommandRecord>,
    now_ms: u64,
) -> bool {
    record.state == ContextState::Fetching
        && command.is_none_or(|c| c.state.is_final() || c.due_to_expire(now_ms))
}
