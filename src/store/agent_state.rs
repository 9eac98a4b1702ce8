//! The agent's own durable state, in a sled database under its `state_dir` (separate from
//! any relay's): the outbox of daemon events waiting for the relay's acknowledgement, the
//! results of recent commands (so a redelivered command is answered again, not executed
//! twice), and where the daemon's event stream was left off.
//!
//! Outbox entries get the agent's local `seq`, dense and increasing; the relay's
//! `last_update_seq` acknowledges a prefix of them, which is then deleted.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sled::transaction::ConflictableTransactionResult;
use sled::Transactional;

use super::{codec, commit, spill::Spill, synced::SyncedDb, Result, StoreError};

const NEXT_SEQ_KEY: &[u8] = b"next_seq";
const ACKED_KEY: &[u8] = b"acked_seq";
const EVENT_ID_KEY: &[u8] = b"last_event_id";
/// Present once a relay's `last_update_seq` has been taken as this outbox's baseline.
const SYNCED_KEY: &[u8] = b"synced";

/// A daemon event as the relay will receive it in `updates`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEvent {
    pub kind: String,
    /// RFC 3339, as the daemon sent it (or the agent's clock).
    pub timestamp: Option<String>,
    /// JSON text.
    pub data_json: String,
}

/// A command's outcome as the agent keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredResult {
    pub result_json: Option<String>,
    pub error_json: Option<String>,
    pub finished_at_ms: u64,
    /// Whether the relay has accepted it (or said it no longer knows the command).
    pub delivered: bool,
}

pub struct AgentStore {
    /// The database, with the sync that makes it durable.
    synced: Arc<SyncedDb>,
    outbox: sled::Tree,
    results: sled::Tree,
    meta: sled::Tree,
    /// Large outbox events and results, as pieces (see `store::spill`).
    spill: Spill,
    committer: commit::GroupCommit,
    /// Serialises appends and acknowledgements, which read and then write the outbox's
    /// numbering. Held only across synchronous sled calls.
    writer: std::sync::Mutex<()>,
}

/// A small value of the `meta` tree.
fn read_meta<T: serde::de::DeserializeOwned>(tree: &sled::Tree, key: &[u8]) -> Result<Option<T>> {
    tree.get(key)?
        .map(|value| codec::decode(&value))
        .transpose()
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<u64> {
    Ok(read_meta::<u64>(tree, key)?.unwrap_or(0))
}

impl AgentStore {
    pub fn open(dir: &Path) -> Result<AgentStore> {
        std::fs::create_dir_all(dir)
            .map_err(|err| StoreError::Unavailable(format!("{}: {err}", dir.display())))?;
        let synced = Arc::new(SyncedDb::open(sled::Config::new(), &dir.join("agent-db"))?);
        let db = synced.db().clone();
        let meta = db.open_tree("meta")?;
        let seal = super::seal::Seal::open(
            dir,
            "agent.seal",
            &synced,
            meta.clone(),
            "The agent's state can be rebuilt: move the state dir aside and start the agent \
             again (commands whose results were not yet posted are handed out again and \
             run a second time).",
        )?;
        Ok(AgentStore {
            outbox: db.open_tree("outbox")?,
            results: db.open_tree("results")?,
            meta,
            spill: Spill::open(&db)?,
            committer: commit::GroupCommit::start(synced.clone(), Some(seal)),
            writer: std::sync::Mutex::new(()),
            synced,
        })
    }

    /// Resolves once everything written before is on disk (group commit).
    pub async fn commit(&self) -> Result<()> {
        self.committer.commit().await
    }

    /// Resolves once every outbox change visible now (appended events, a renumbering) is
    /// on disk, including those whose writer still waits for its commit; at once when they
    /// already are. Call it between reading the outbox and sending it: an event the relay
    /// stored must never be taken back by a power cut here, or the agent would read it
    /// from the daemon again under a new seq, and the relay would hold it twice.
    pub async fn commit_visible(&self) -> Result<()> {
        self.committer.commit_visible().await
    }

    pub fn close(&self) -> Result<()> {
        self.committer.stop();
        self.synced
            .sync()
            .map_err(|err| StoreError::Unavailable(err.to_string()))
    }

    /// Appends events with the next local seqs, and records `last_event_id` (the daemon
    /// stream's position) in the same atomic step, so a restart resumes the stream exactly
    /// after what the outbox holds. Returns the last seq assigned.
    pub fn append_events(
        &self,
        events: &[OutboxEvent],
        last_event_id: Option<&str>,
    ) -> Result<u64> {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let first = self.next_seq()?;
        let rows: Vec<([u8; 8], Vec<u8>)> = events
            .iter()
            .zip(first..)
            .map(|(event, seq)| Ok((seq.to_be_bytes(), self.spill.encoded(event)?)))
            .collect::<Result<_>>()?;
        let next = first + events.len() as u64;
        let event_id = last_event_id.map(|id| codec::encode(&id.to_owned()));
        self.committer.tracked(|| {
            (&self.outbox, &self.meta).transaction(
                |(outbox, meta)| -> ConflictableTransactionResult<(), StoreError> {
                    for (key, value) in &rows {
                        outbox.insert(key, value.as_slice())?;
                    }
                    meta.insert(NEXT_SEQ_KEY, codec::encode(&next))?;
                    if let Some(id) = &event_id {
                        meta.insert(EVENT_ID_KEY, id.as_slice())?;
                    }
                    Ok(())
                },
            )
        })?;
        Ok(next - 1)
    }

    /// The daemon stream's position recorded with the last append.
    pub fn last_event_id(&self) -> Result<Option<String>> {
        read_meta(&self.meta, EVENT_ID_KEY)
    }

    fn next_seq(&self) -> Result<u64> {
        Ok(read_meta::<u64>(&self.meta, NEXT_SEQ_KEY)?.unwrap_or(1))
    }

    /// Up to `limit` unacknowledged events, oldest first, with their seqs.
    pub fn pending(&self, limit: usize) -> Result<Vec<(u64, OutboxEvent)>> {
        let acked = read_u64(&self.meta, ACKED_KEY)?;
        self.outbox
            .range((acked + 1).to_be_bytes()..)
            .take(limit)
            .map(|item| {
                let (key, value) = item?;
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&key);
                Ok((u64::from_be_bytes(seq), self.spill.decode(&value)?))
            })
            .collect()
    }

    /// Takes the relay's `last_update_seq` (it holds every update up to it):
    /// - normally, the outbox numbered what the relay holds: entries up to it were sent
    ///   and are dropped;
    /// - on a fresh outbox's first contact, or when the relay holds seqs this outbox never
    ///   assigned (its state dir was replaced), nothing here was sent: every entry is
    ///   renumbered after the relay's seq, in order, so the relay takes them all.
    ///
    /// One atomic step, serialised with appends.
    pub fn acknowledge(&self, relay_seq: u64) -> Result<()> {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let acked = read_u64(&self.meta, ACKED_KEY)?;
        let next = self.next_seq()?;
        let synced = self.meta.contains_key(SYNCED_KEY)?;
        let mut removes: Vec<sled::IVec> = Vec::new();
        let mut inserts: Vec<([u8; 8], sled::IVec)> = Vec::new();
        let (new_acked, new_next) = if !synced || relay_seq >= next {
            let mut seq = relay_seq;
            for item in self.outbox.iter() {
                let (key, value) = item?;
                seq += 1;
                removes.push(key);
                inserts.push((seq.to_be_bytes(), value));
            }
            (relay_seq, seq + 1)
        } else if relay_seq > acked {
            for item in self.outbox.range(..=relay_seq.to_be_bytes()) {
                removes.push(item?.0);
            }
            (relay_seq, next)
        } else {
            return Ok(());
        };
        self.committer.tracked(|| {
            (&self.outbox, &self.meta).transaction(
                |(outbox, meta)| -> ConflictableTransactionResult<(), StoreError> {
                    for key in &removes {
                        outbox.remove(key)?;
                    }
                    for (key, value) in &inserts {
                        outbox.insert(key, value)?;
                    }
                    meta.insert(ACKED_KEY, codec::encode(&new_acked))?;
                    meta.insert(NEXT_SEQ_KEY, codec::encode(&new_next))?;
                    meta.insert(SYNCED_KEY, &[1])?;
                    Ok(())
                },
            )
        })?;
        Ok(())
    }

    pub fn acknowledged_seq(&self) -> Result<u64> {
        read_u64(&self.meta, ACKED_KEY)
    }

    pub fn put_result(&self, command_id: &str, result: &StoredResult) -> Result<()> {
        self.results
            .insert(command_id.as_bytes(), self.spill.encoded(result)?)?;
        Ok(())
    }

    pub fn result(&self, command_id: &str) -> Result<Option<StoredResult>> {
        self.spill.get_decoded(&self.results, command_id.as_bytes())
    }

    /// Results the relay has not accepted yet, e.g. after a restart.
    pub fn undelivered_results(&self) -> Result<Vec<(String, StoredResult)>> {
        let mut out = Vec::new();
        for item in self.results.iter() {
            let (key, value) = item?;
            let result: StoredResult = self.spill.decode(&value)?;
            if !result.delivered {
                out.push((String::from_utf8_lossy(&key).into_owned(), result));
            }
        }
        Ok(out)
    }

    /// Forgets results finished before `cutoff_ms`, and deletes the pieces of large values
    /// nothing points at any more; returns how many results went.
    pub fn prune_results(&self, cutoff_ms: u64) -> Result<usize> {
        let watermark = self.spill.watermark()?;
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        let mut referenced = std::collections::HashSet::new();
        for item in self.results.iter() {
            let (key, value) = item?;
            let result: StoredResult = self.spill.decode(&value)?;
            if result.delivered && result.finished_at_ms < cutoff_ms {
                batch.remove(key);
                removed += 1;
            } else if let Some((owner, _)) = super::spill::spilled(&value) {
                referenced.insert(owner);
            }
        }
        self.results.apply_batch(batch)?;
        for item in self.outbox.iter() {
            if let Some((owner, _)) = super::spill::spilled(&item?.1) {
                referenced.insert(owner);
            }
        }
        self.spill
            .collect(&referenced, watermark, std::time::Duration::from_secs(60))?;
        Ok(removed)
    }
}

impl Drop for AgentStore {
    fn drop(&mut self) {
        self.committer.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u32) -> OutboxEvent {
        OutboxEvent {
            kind: "e".into(),
            timestamp: None,
            data_json: format!("{{\"n\":{n}}}"),
        }
    }

    #[test]
    fn outbox_assigns_dense_seqs_and_acknowledges_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        let store = AgentStore::open(dir.path()).unwrap();
        assert_eq!(
            store
                .append_events(&[event(1), event(2)], Some("7"))
                .unwrap(),
            2
        );
        // First contact: the relay holds nothing of this daemon yet.
        store.acknowledge(0).unwrap();
        assert_eq!(store.append_events(&[event(3)], Some("8")).unwrap(), 3);
        assert_eq!(store.last_event_id().unwrap().as_deref(), Some("8"));
        store.acknowledge(2).unwrap();
        let pending = store.pending(10).unwrap();
        assert_eq!(pending, vec![(3, event(3))]);
        drop(store);
        let store = AgentStore::open(dir.path()).unwrap();
        assert_eq!(store.pending(10).unwrap().len(), 1, "survives a reopen");
        // The relay holds seqs this outbox never assigned (another state dir sent them):
        // what is pending here was never sent, and is renumbered after them.
        store.acknowledge(40).unwrap();
        assert_eq!(store.pending(10).unwrap(), vec![(41, event(3))]);
        assert_eq!(store.append_events(&[event(4)], None).unwrap(), 42);
    }

    #[tokio::test]
    async fn outbox_changes_are_reported_unflushed_until_a_commit_covers_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = AgentStore::open(dir.path()).unwrap();
        assert!(store.committer.tracked_durable(), "nothing written yet");
        store.append_events(&[event(1)], Some("1")).unwrap();
        assert!(
            !store.committer.tracked_durable(),
            "an append waits for a commit"
        );
        store.commit_visible().await.unwrap();
        assert!(store.committer.tracked_durable());
        // A renumbering (first contact) is an outbox change the uplink must not send
        // before it is on disk.
        store.acknowledge(5).unwrap();
        assert!(
            !store.committer.tracked_durable(),
            "a renumbering waits too"
        );
        store.commit_visible().await.unwrap();
        assert!(store.committer.tracked_durable());
        assert_eq!(store.pending(10).unwrap(), vec![(6, event(1))]);
    }

    #[test]
    fn a_fresh_outbox_keeps_its_events_whatever_the_relay_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = AgentStore::open(dir.path()).unwrap();
        let events: Vec<OutboxEvent> = (1..=50).map(event).collect();
        store.append_events(&events, None).unwrap();
        // A replaced state dir: the relay already holds 40 updates from before.
        store.acknowledge(40).unwrap();
        let pending = store.pending(100).unwrap();
        assert_eq!(pending.len(), 50, "nothing unsent is dropped");
        assert_eq!(pending.first().unwrap(), &(41, event(1)));
        assert_eq!(pending.last().unwrap(), &(90, event(50)));
        store.acknowledge(90).unwrap();
        assert!(store.pending(100).unwrap().is_empty());
    }

    #[test]
    fn results_are_kept_until_delivered_and_old() {
        let dir = tempfile::tempdir().unwrap();
        let store = AgentStore::open(dir.path()).unwrap();
        let mut result = StoredResult {
            result_json: Some("1".into()),
            error_json: None,
            finished_at_ms: 10,
            delivered: false,
        };
        store.put_result("a", &result).unwrap();
        assert_eq!(store.undelivered_results().unwrap().len(), 1);
        assert_eq!(
            store.prune_results(100).unwrap(),
            0,
            "undelivered results stay"
        );
        result.delivered = true;
        store.put_result("a", &result).unwrap();
        assert!(store.undelivered_results().unwrap().is_empty());
        assert_eq!(store.prune_results(100).unwrap(), 1);
        assert!(store.result("a").unwrap().is_none());
    }
}
