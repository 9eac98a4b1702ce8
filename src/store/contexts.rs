//! Cached contexts for cache-and-serve streaming: a large response (an SSE context) is
//! fetched from the daemon once, as numbered chunks, stored whole, and replayed to every
//! client. One record per fetch (`contexts`, by context id), an index from the daemon's
//! path+query to its current fetch (`context_index`), one from the stream command to its
//! context (`context_commands`), and the chunks themselves (`context_chunks`, keyed by
//! context id and chunk index, so a context is one ordered range).
//!
//! A replaced or evicted context is not deleted at once: readers may still be replaying
//! it. It is listed in `context_garbage` and its chunks go in a later sweep.

use serde::{Deserialize, Serialize};
use sled::transaction::ConflictableTransactionResult;
use sled::Transactional;

use super::commands::prepare_command;
use super::daemons::DaemonRecord;
use super::machine::{self, ChunkStep};
use super::usage::{context_body_size, stored_size, Trim};
use super::{codec, layout, CommandRecord, Result, SledStore, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContextState {
    /// Chunks are arriving.
    Fetching,
    /// The last chunk arrived.
    Complete,
    /// The fetch failed part-way, or grew past the size limit.
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContextRecord {
    pub context_id: u64,
    pub daemon_id: String,
    /// The daemon-side path and query.
    pub key: String,
    pub command_id: String,
    pub state: ContextState,
    /// The daemon's status and headers, from chunk 0.
    pub status: Option<u16>,
    pub headers: Vec<(String, String)>,
    /// Chunks stored: indexes `0..chunks`.
    pub chunks: u64,
    pub bytes: u64,
    pub created_at_ms: u64,
    pub finished_at_ms: u64,
    pub error_json: Option<String>,
}

impl ContextRecord {
    /// Whether later requests may be served from this fetch.
    pub fn servable(&self) -> bool {
        self.state != ContextState::Failed && self.status.is_none_or(|s| (200..300).contains(&s))
    }
}

/// A request for a context.
#[derive(Debug, Clone)]
pub struct ContextRequest {
    pub daemon_id: String,
    pub key: String,
    /// Params of the stream command, should a fetch be needed.
    pub params_json: String,
    /// `Cache-Control: no-cache`: fetch again even if a usable copy exists.
    pub refresh: bool,
    /// A complete context older than this is fetched again.
    pub ttl_ms: u64,
    /// How long the stream command waits for a daemon to take it.
    pub command_ttl_ms: u64,
    pub queue_limit: u64,
}

#[derive(Debug)]
pub enum Opened {
    /// A fetch in progress, or a complete fresh copy.
    Existing(ContextRecord),
    /// A new fetch: the stream command is queued.
    Started(ContextRecord),
}

/// One chunk as posted by the daemon.
#[derive(Debug)]
pub struct NewChunk {
    pub index: u64,
    pub status: Option<u16>,
    pub headers: Vec<(String, String)>,
    pub data: Vec<u8>,
    pub complete: bool,
    pub error_json: Option<String>,
}

#[derive(Debug)]
pub enum ChunkOutcome {
    Stored(ContextRecord),
    /// Already stored (a retry); ignored.
    Duplicate(ContextRecord),
    /// The index skips ahead: `expected` is the next one the relay needs.
    Gap {
        expected: u64,
    },
    /// No fetch for that command (unknown, another daemon's, or finished).
    Unknown,
    /// The context grew past the size limit; the fetch is failed.
    TooLarge(ContextRecord),
}

pub(super) fn chunk_key(context_id: u64, index: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&context_id.to_be_bytes());
    key[8..].copy_from_slice(&index.to_be_bytes());
    key
}

impl SledStore {
    /// The fetch to serve `request` from: an existing usable one, or a new one whose stream
    /// command is queued in the same atomic step. Concurrent first requests therefore share
    /// one fetch. Call [`SledStore::commit`] before relying on a started fetch.
    pub fn open_context(&self, request: ContextRequest, now_ms: u64) -> Result<Opened> {
        let _guard = self.lock_daemon(&request.daemon_id);
        let index_key = layout::daemon_text_key(&request.daemon_id, &[&request.key]);
        let current: Option<ContextRecord> = match self.context_index.get(&index_key)? {
            Some(id) => self.get_decoded(&self.contexts, &id)?,
            None => None,
        };
        if let Some(record) = &current {
            if !request.refresh && self.context_usable(record, request.ttl_ms, now_ms)? {
                return Ok(Opened::Existing(record.clone()));
            }
        }
        let daemon: DaemonRecord = self
            .get_decoded(&self.daemons, request.daemon_id.as_bytes())?
            .ok_or_else(|| StoreError::UnknownDaemon(request.daemon_id.clone()))?;
        let mut counters = self.queue_counters(&request.daemon_id, daemon.next_queue_seq)?;
        let command = prepare_command(&mut counters, machine::stream_command(&request), now_ms)?;
        let daemon_id = request.daemon_id.clone();
        let record =
            machine::new_context(self.spill.next_id()?, request, command.id.clone(), now_ms);
        let id_bytes = record.context_id.to_be_bytes();
        let (command_bytes, record_bytes) = (self.encoded(&command)?, self.encoded(&record)?);
        let queue_key = layout::daemon_seq_key(&command.daemon_id, command.queue_seq);
        self.reserve_budget(
            &daemon_id,
            stored_size(command.id.as_bytes(), &command_bytes)
                + stored_size(&id_bytes, &record_bytes)
                + (queue_key.len() + index_key.len() + 2 * command.id.len() + 16) as u64,
            Trim::Cache,
            now_ms,
        )?;
        let replaced = current.as_ref().map(|old| old.context_id.to_be_bytes());
        // Tracked: a poll may lease the command before this request's commit resolves.
        self.committer.tracked(|| {
            (
                &self.commands,
                &self.queue,
                &self.contexts,
                &self.context_index,
                &self.context_commands,
                &self.context_garbage,
            )
                .transaction(
                    |(commands, queue, contexts, index, by_command, garbage)| -> ConflictableTransactionResult<(), StoreError> {
                        commands.insert(command.id.as_bytes(), command_bytes.as_slice())?;
                        queue.insert(queue_key.as_slice(), command.id.as_bytes())?;
                        contexts.insert(&id_bytes, record_bytes.as_slice())?;
                        index.insert(index_key.as_slice(), &id_bytes)?;
                        by_command.insert(command.id.as_bytes(), &id_bytes)?;
                        if let Some(old) = &replaced {
                            garbage.insert(old, codec::encode(&now_ms))?;
                        }
                        Ok(())
                    },
                )
        })?;
        self.set_queue_counters(&daemon_id, counters);
        if let Some(old) = &current {
            // Retired: no longer counted against the daemon.
            self.release_budget(&old.daemon_id, context_body_size(old));
        }
        Ok(Opened::Started(record))
    }

    /// [`machine::context_usable`], with the command as stored.
    fn context_usable(&self, record: &ContextRecord, ttl_ms: u64, now_ms: u64) -> Result<bool> {
        let command: Option<CommandRecord> = match record.state {
            ContextState::Fetching => {
                self.get_decoded(&self.commands, record.command_id.as_bytes())?
            }
            _ => None,
        };
        Ok(machine::context_usable(
            record,
            command.as_ref(),
            ttl_ms,
            now_ms,
        ))
    }

    /// The current fetch for a daemon's path+query, whatever its state.
    pub fn current_context(&self, daemon_id: &str, key: &str) -> Result<Option<ContextRecord>> {
        match self
            .context_index
            .get(layout::daemon_text_key(daemon_id, &[key]))?
        {
            Some(id) => self.get_decoded(&self.contexts, &id),
            None => Ok(None),
        }
    }

    pub fn context(&self, context_id: u64) -> Result<Option<ContextRecord>> {
        self.get_decoded(&self.contexts, &context_id.to_be_bytes())
    }

    /// Up to `limit` chunks from index `from`.
    pub fn context_chunks(&self, context_id: u64, from: u64, limit: usize) -> Result<Vec<Vec<u8>>> {
        self.context_chunks
            .range(chunk_key(context_id, from)..chunk_key(context_id + 1, 0))
            .take(limit)
            .map(|item| {
                let (_, value) = item?;
                // As bytes: serde's `Vec<u8>` decodes element by element, which took half
                // of a replay's CPU. Same bincode layout either way.
                Ok(self.decode::<serde_bytes::ByteBuf>(&value)?.into_vec())
            })
            .collect()
    }

    /// Stores one chunk of a stream command's response. Indexes start at 0 with no gaps;
    /// a repeated index is ignored. The last chunk completes the command. Call
    /// [`SledStore::commit`] before acknowledging.
    pub fn append_chunk(
        &self,
        daemon_id: &str,
        command_id: &str,
        chunk: NewChunk,
        max_context_bytes: u64,
        lease_ms: u64,
        now_ms: u64,
    ) -> Result<ChunkOutcome> {
        let _guard = self.lock_daemon(daemon_id);
        // Tracked: a client's pump may read the chunk (or the context's end) before this
        // post's commit resolves.
        self.committer.tracked(|| {
            let id_bytes = self.context_commands.get(command_id.as_bytes())?;
            let record = match &id_bytes {
                Some(id) => self.get_decoded::<ContextRecord>(&self.contexts, id)?,
                None => None,
            };
            let command =
                self.get_decoded::<CommandRecord>(&self.commands, command_id.as_bytes())?;
            let same_as_stored = match &record {
                Some(record) if machine::chunk_needs_stored(record, chunk.index) => self
                    .context_chunks
                    .get(chunk_key(record.context_id, chunk.index))?
                    .map(|bytes| self.decode::<serde_bytes::ByteBuf>(&bytes))
                    .transpose()?
                    .is_some_and(|bytes| bytes.as_slice() == chunk.data.as_slice()),
                _ => true,
            };
            let step = machine::chunk_step(
                record.as_ref(),
                command.as_ref(),
                daemon_id,
                chunk.index,
                same_as_stored,
            );
            let (Some(id_bytes), Some(mut record), Some(mut command)) = (id_bytes, record, command)
            else {
                return Ok(ChunkOutcome::Unknown);
            };
            match step {
                ChunkStep::Unknown => return Ok(ChunkOutcome::Unknown),
                ChunkStep::Gap { expected } => return Ok(ChunkOutcome::Gap { expected }),
                ChunkStep::Restarted => {
                    machine::restarted(&mut record, now_ms);
                    self.contexts.insert(&id_bytes, self.encoded(&record)?)?;
                    self.finish_stream_command(&mut command, &record, now_ms)?;
                    return Ok(ChunkOutcome::Unknown);
                }
                ChunkStep::Duplicate { finish_command } => {
                    if finish_command {
                        self.finish_stream_command(&mut command, &record, now_ms)?;
                    }
                    return Ok(ChunkOutcome::Duplicate(record));
                }
                ChunkStep::Append => {}
            }
            let key = chunk_key(record.context_id, chunk.index);
            let refusal = match machine::too_large(&record, chunk.data.len(), max_context_bytes) {
                Some(refusal) => Some(refusal),
                // Approximate: the stored chunk is its bytes and a few of framing.
                None => match self.reserve_budget(
                    daemon_id,
                    stored_size(&key, &chunk.data) + 8,
                    Trim::Cache,
                    now_ms,
                ) {
                    Ok(()) => None,
                    Err(StoreError::OverBudget(_)) => Some(machine::over_budget(daemon_id)),
                    Err(err) => return Err(err),
                },
            };
            let too_large = refusal.is_some();
            let data = machine::append_chunk(&mut record, chunk, refusal, now_ms)
                .map(|data| self.encoded(&serde_bytes::ByteBuf::from(data)))
                .transpose()?;
            let record_bytes = self.encoded(&record)?;
            (&self.contexts, &self.context_chunks).transaction(
                |(contexts, chunks)| -> ConflictableTransactionResult<(), StoreError> {
                    contexts.insert(&id_bytes, record_bytes.as_slice())?;
                    if let Some(data) = &data {
                        chunks.insert(&key, data.as_slice())?;
                    }
                    Ok(())
                },
            )?;
            if record.state == ContextState::Fetching {
                // Chunks flowing: the daemon is working on it, keep the lease.
                command.lease_until_ms = now_ms.saturating_add(lease_ms);
                self.commands
                    .insert(command_id.as_bytes(), self.encoded(&command)?)?;
            } else {
                self.finish_stream_command(&mut command, &record, now_ms)?;
            }
            Ok(if too_large {
                ChunkOutcome::TooLarge(record)
            } else {
                ChunkOutcome::Stored(record)
            })
        })
    }

    /// Ends a stream command with its context ([`machine::stream_finish`]).
    fn finish_stream_command(
        &self,
        command: &mut CommandRecord,
        record: &ContextRecord,
        now_ms: u64,
    ) -> Result<()> {
        match machine::stream_finish(record) {
            Some((state, result, error)) => {
                self.finish_locked(command, state, result, error, now_ms)
            }
            None => Ok(()),
        }
    }

    /// The daemon's current contexts (one per cached path), newest first, up to `limit`.
    pub fn daemon_contexts(&self, daemon_id: &str, limit: usize) -> Result<Vec<ContextRecord>> {
        let mut listed = Vec::new();
        for item in self
            .context_index
            .scan_prefix(layout::daemon_prefix(daemon_id))
        {
            let (_, id) = item?;
            if let Some(record) = self.get_decoded::<ContextRecord>(&self.contexts, &id)? {
                listed.push(record);
            }
        }
        listed.sort_by_key(|c: &ContextRecord| std::cmp::Reverse(c.created_at_ms));
        listed.truncate(limit);
        Ok(listed)
    }

    /// Retention for contexts: drops complete or failed ones past `ttl_ms`, evicts the
    /// oldest while the total exceeds `max_total_bytes`, and deletes the chunks of contexts
    /// retired longer than `garbage_grace_ms` ago. Returns (contexts retired, chunks deleted).
    pub fn sweep_contexts(
        &self,
        ttl_ms: u64,
        max_total_bytes: u64,
        garbage_grace_ms: u64,
        now_ms: u64,
    ) -> Result<(u64, u64)> {
        // Retired contexts wait for deletion; they no longer count against the budget.
        let mut listed: Vec<ContextRecord> = Vec::new();
        for item in self.contexts.iter() {
            let (id, value) = item?;
            if !self.context_garbage.contains_key(&id)? {
                listed.push(self.decode(&value)?);
            }
        }
        listed.sort_by_key(|r| r.created_at_ms);
        let mut total: u64 = listed.iter().map(|r| r.bytes).sum();
        let mut retired = 0;
        for record in &listed {
            // A fetch whose command ended without completing it will never go on.
            let abandoned = record.state == ContextState::Fetching
                && machine::context_abandoned(
                    record,
                    self.get_decoded::<CommandRecord>(
                        &self.commands,
                        record.command_id.as_bytes(),
                    )?
                    .as_ref(),
                    now_ms,
                );
            let finished = record.state != ContextState::Fetching || abandoned;
            let expired = finished && record.created_at_ms.saturating_add(ttl_ms) <= now_ms;
            let over_budget = finished && total > max_total_bytes;
            if expired || over_budget || abandoned {
                self.retire_context(record, now_ms)?;
                total -= record.bytes;
                retired += 1;
            }
        }
        let mut deleted = 0;
        for item in self.context_garbage.iter() {
            let (id_bytes, value) = item?;
            let retired_at: u64 = self.decode(&value)?;
            if retired_at.saturating_add(garbage_grace_ms) > now_ms {
                continue;
            }
            let mut id = [0u8; 8];
            id.copy_from_slice(&id_bytes);
            let context_id = u64::from_be_bytes(id);
            let _gate = self.gate.shared();
            let mut batch = sled::Batch::default();
            for chunk in self
                .context_chunks
                .range(chunk_key(context_id, 0)..chunk_key(context_id + 1, 0))
            {
                let (key, _) = chunk?;
                batch.remove(key);
                deleted += 1;
            }
            self.context_chunks.apply_batch(batch)?;
            if let Some(record) = self.get_decoded::<ContextRecord>(&self.contexts, &id_bytes)? {
                self.context_commands.remove(record.command_id.as_bytes())?;
            }
            self.contexts.remove(&id_bytes)?;
            self.context_garbage.remove(&id_bytes)?;
        }
        Ok((retired, deleted))
    }

    /// Unlists a context (new requests fetch again) and schedules its chunks for deletion.
    pub(super) fn retire_context(&self, record: &ContextRecord, now_ms: u64) -> Result<()> {
        let _guard = self.lock_daemon(&record.daemon_id);
        self.retire_context_locked(record, now_ms)
    }

    /// [`SledStore::retire_context`] for a caller that holds the daemon's lock.
    pub(super) fn retire_context_locked(&self, record: &ContextRecord, now_ms: u64) -> Result<()> {
        let index_key = layout::daemon_text_key(&record.daemon_id, &[&record.key]);
        let id_bytes = record.context_id.to_be_bytes();
        if self.context_garbage.contains_key(id_bytes)? {
            return Ok(());
        }
        let listed = self
            .context_index
            .get(&index_key)?
            .is_some_and(|id| id.as_ref() == id_bytes);
        (&self.context_index, &self.context_garbage).transaction(
            |(index, garbage)| -> ConflictableTransactionResult<(), StoreError> {
                if listed {
                    index.remove(index_key.as_slice())?;
                }
                garbage.insert(&id_bytes, codec::encode(&now_ms))?;
                Ok(())
            },
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::temp_store;
    use crate::store::CommandState;

    fn request(refresh: bool) -> ContextRequest {
        ContextRequest {
            daemon_id: "d".into(),
            key: "/api/v1/approvals/a/context/stream".into(),
            params_json: "{}".into(),
            refresh,
            ttl_ms: 1_000,
            command_ttl_ms: 100,
            queue_limit: 10,
        }
    }

    fn chunk(index: u64, data: &[u8], complete: bool) -> NewChunk {
        NewChunk {
            index,
            status: Some(200),
            headers: vec![],
            data: data.to_vec(),
            complete,
            error_json: None,
        }
    }

    #[tokio::test]
    async fn a_stored_chunk_is_reported_unflushed_until_a_commit_covers_it() {
        let (_dir, store) = temp_store();
        store.ensure_daemon("d", 0).unwrap();
        let Opened::Started(first) = store.open_context(request(false), 0).unwrap() else {
            panic!()
        };
        store.commit().await.unwrap();
        assert!(store.visible_durable(), "the fetch is on disk");
        let command = first.command_id.as_str();
        store
            .append_chunk("d", command, chunk(0, b"ab", true), 100, 50, 1)
            .unwrap();
        assert!(
            !store.visible_durable(),
            "a pump must not send this chunk unflushed"
        );
        store.commit_visible().await.unwrap();
        assert!(store.visible_durable());
    }

    #[test]
    fn one_fetch_chunks_in_order_then_replay_and_expiry() {
        let (_dir, store) = temp_store();
        store.ensure_daemon("d", 0).unwrap();
        let Opened::Started(first) = store.open_context(request(false), 0).unwrap() else {
            panic!()
        };
        let Opened::Existing(same) = store.open_context(request(false), 1).unwrap() else {
            panic!("shared fetch")
        };
        assert_eq!(same.context_id, first.context_id);
        let command = first.command_id.as_str();
        assert!(matches!(
            store
                .append_chunk("d", command, chunk(1, b"x", false), 100, 50, 2)
                .unwrap(),
            ChunkOutcome::Gap { expected: 0 }
        ));
        assert!(matches!(
            store
                .append_chunk("d", command, chunk(0, b"ab", false), 100, 50, 2)
                .unwrap(),
            ChunkOutcome::Stored(_)
        ));
        assert!(matches!(
            store
                .append_chunk("d", command, chunk(0, b"ab", false), 100, 50, 3)
                .unwrap(),
            ChunkOutcome::Duplicate(_)
        ));
        assert!(matches!(
            store
                .append_chunk("other", command, chunk(1, b"c", true), 100, 50, 3)
                .unwrap(),
            ChunkOutcome::Unknown
        ));
        let ChunkOutcome::Stored(done) = store
            .append_chunk("d", command, chunk(1, b"c", true), 100, 50, 4)
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (done.state, done.chunks, done.bytes),
            (ContextState::Complete, 2, 3)
        );
        assert_eq!(
            store.context_chunks(done.context_id, 0, 10).unwrap(),
            vec![b"ab".to_vec(), b"c".to_vec()]
        );
        assert_eq!(
            store.command(command).unwrap().unwrap().state,
            CommandState::Completed
        );
        // Fresh: served again. Past its TTL it is retired, its chunks go after the grace
        // period, and the next request fetches again; a refresh always does.
        assert!(matches!(
            store.open_context(request(false), 500).unwrap(),
            Opened::Existing(_)
        ));
        assert_eq!(
            store.sweep_contexts(1_000, u64::MAX, 10, 2_000).unwrap(),
            (1, 0)
        );
        assert_eq!(
            store.sweep_contexts(1_000, u64::MAX, 10, 3_000).unwrap(),
            (0, 2)
        );
        assert!(store.context(done.context_id).unwrap().is_none());
        assert!(matches!(
            store.open_context(request(false), 3_000).unwrap(),
            Opened::Started(_)
        ));
        assert!(matches!(
            store.open_context(request(true), 3_001).unwrap(),
            Opened::Started(_)
        ));
    }

    #[test]
    fn a_refetch_with_other_bytes_fails_instead_of_garbling() {
        let (_dir, store) = temp_store();
        store.ensure_daemon("d", 0).unwrap();
        let Opened::Started(ctx) = store.open_context(request(false), 0).unwrap() else {
            panic!()
        };
        let command = ctx.command_id.as_str();
        store
            .append_chunk("d", command, chunk(0, b"abc", false), 100, 50, 1)
            .unwrap();
        assert!(matches!(
            store
                .append_chunk("d", command, chunk(0, b"abc", false), 100, 50, 2)
                .unwrap(),
            ChunkOutcome::Duplicate(_)
        ));
        assert!(matches!(
            store
                .append_chunk("d", command, chunk(0, b"ab", false), 100, 50, 3)
                .unwrap(),
            ChunkOutcome::Unknown
        ));
        assert_eq!(
            store.context(ctx.context_id).unwrap().unwrap().state,
            ContextState::Failed
        );
        assert!(matches!(
            store.open_context(request(false), 4).unwrap(),
            Opened::Started(_)
        ));
    }

    #[test]
    fn abandoned_fetches_are_swept() {
        let (_dir, store) = temp_store();
        store.ensure_daemon("d", 0).unwrap();
        let Opened::Started(ctx) = store.open_context(request(false), 0).unwrap() else {
            panic!()
        };
        // Nobody took the stream command before its TTL (100 ms).
        assert_eq!(
            store.sweep_contexts(1_000_000, u64::MAX, 0, 50).unwrap(),
            (0, 0)
        );
        assert_eq!(
            store.sweep_contexts(1_000_000, u64::MAX, 0, 200).unwrap().0,
            1
        );
        assert!(store.context(ctx.context_id).unwrap().is_none());
    }

    #[test]
    fn size_limit_fails_the_fetch() {
        let (_dir, store) = temp_store();
        store.ensure_daemon("d", 0).unwrap();
        let Opened::Started(ctx) = store.open_context(request(false), 0).unwrap() else {
            panic!()
        };
        let outcome = store
            .append_chunk("d", &ctx.command_id, chunk(0, &[0; 10], false), 5, 50, 1)
            .unwrap();
        assert!(matches!(outcome, ChunkOutcome::TooLarge(_)));
        assert_eq!(
            store.command(&ctx.command_id).unwrap().unwrap().state,
            CommandState::Failed
        );
        assert!(
            matches!(
                store.open_context(request(false), 2).unwrap(),
                Opened::Started(_)
            ),
            "failed fetches are not served"
        );
    }
}
