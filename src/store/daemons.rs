//! Daemon records: identity, what the daemon said of itself on connect, its current
//! connection, and the counters other trees hang off (change-log and queue sequences, queue
//! depth). A record exists from the moment a daemon key is created for the id or the daemon
//! first connects.

use serde::{Deserialize, Serialize};

use super::{layout, machine, CommandRecord, Result, SledStore};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonRecord {
    pub daemon_id: String,
    pub version: Option<String>,
    pub capabilities: Vec<String>,
    pub created_at_ms: u64,
    pub last_seen_ms: Option<u64>,
    /// The connection a poll must name; a newer connect supersedes it.
    pub connection_id: Option<String>,
    /// Highest daemon-side update `seq` stored; updates at or below it are retries.
    pub last_update_seq: u64,
    /// Highest relay sequence number of the change log (0: empty).
    pub last_change_seq: u64,
    /// Last sequence number used in the queue tree. The store keeps the live counters in
    /// memory (`QueueCounters`) and no longer rewrites the record for each command: on
    /// disk this is a lower bound; records read through the store carry the live value.
    pub next_queue_seq: u64,
    /// Commands queued or delivered, not yet completed or expired (live when read through
    /// the store, as `next_queue_seq`).
    pub queued: u64,
    /// In a cluster, the node the daemon last connected through: the one holding its
    /// connection while it is online. Not in sled's encoding (a lone
    /// relay holds every daemon itself), so records on disk keep their format.
    #[serde(skip)]
    pub node: Option<String>,
}

impl DaemonRecord {
    fn new(daemon_id: &str, now_ms: u64) -> DaemonRecord {
        DaemonRecord {
            daemon_id: daemon_id.to_owned(),
            version: None,
            capabilities: Vec::new(),
            created_at_ms: now_ms,
            last_seen_ms: None,
            connection_id: None,
            last_update_seq: 0,
            last_change_seq: 0,
            next_queue_seq: 0,
            queued: 0,
            node: None,
        }
    }
}

impl SledStore {
    /// Creates the daemon's record if it has none; returns the record.
    pub fn ensure_daemon(&self, daemon_id: &str, now_ms: u64) -> Result<DaemonRecord> {
        let _guard = self.lock_daemon(daemon_id);
        if let Some(record) = self.get_decoded(&self.daemons, daemon_id.as_bytes())? {
            return Ok(record);
        }
        let record = DaemonRecord::new(daemon_id, now_ms);
        self.daemons
            .insert(daemon_id.as_bytes(), self.encoded(&record)?)?;
        Ok(record)
    }

    /// Registers a (re)connect: stores version, capabilities and the new connection id, and
    /// releases every lease so that commands handed to the old connection go out again.
    pub fn connect_daemon(
        &self,
        daemon_id: &str,
        version: Option<String>,
        capabilities: Vec<String>,
        connection_id: &str,
        now_ms: u64,
    ) -> Result<DaemonRecord> {
        let _guard = self.lock_daemon(daemon_id);
        let mut record = self
            .get_decoded(&self.daemons, daemon_id.as_bytes())?
            .unwrap_or_else(|| DaemonRecord::new(daemon_id, now_ms));
        record.version = version;
        record.capabilities = capabilities;
        record.last_seen_ms = Some(now_ms);
        record.connection_id = Some(connection_id.to_owned());
        for item in self.queue.scan_prefix(layout::daemon_prefix(daemon_id)) {
            let (_, command_id) = item?;
            if let Some(mut command) =
                self.get_decoded::<CommandRecord>(&self.commands, &command_id)?
            {
                if machine::release(&mut command) {
                    let bytes = self.encoded(&command)?;
                    self.committer
                        .tracked(|| self.commands.insert(&command_id, bytes))?;
                }
            }
        }
        self.daemons
            .insert(daemon_id.as_bytes(), self.encoded(&record)?)?;
        Ok(record)
    }

    /// Records that the daemon was heard from.
    pub fn touch_daemon(&self, daemon_id: &str, now_ms: u64) -> Result<()> {
        let _guard = self.lock_daemon(daemon_id);
        if let Some(mut record) =
            self.get_decoded::<DaemonRecord>(&self.daemons, daemon_id.as_bytes())?
        {
            record.last_seen_ms = Some(now_ms);
            self.daemons
                .insert(daemon_id.as_bytes(), self.encoded(&record)?)?;
        }
        Ok(())
    }

    pub fn daemon(&self, daemon_id: &str) -> Result<Option<DaemonRecord>> {
        self.get_decoded(&self.daemons, daemon_id.as_bytes())?
            .map(|record| self.with_queue_counters(record))
            .transpose()
    }

    /// Every daemon, ordered by id.
    pub fn daemons(&self) -> Result<Vec<DaemonRecord>> {
        self.daemons
            .iter()
            .map(|item| {
                let (_, value) = item?;
                self.with_queue_counters(self.decode(&value)?)
            })
            .collect()
    }

    /// The record with its live queue counters: cached ones, or counted from the tree
    /// now (without caching them: only a writer holding the daemon's lock may).
    fn with_queue_counters(&self, mut record: DaemonRecord) -> Result<DaemonRecord> {
        let counters = match self.cached_queue_counters(&record.daemon_id) {
            Some(counters) => counters,
            None => self.count_queue(&record.daemon_id)?,
        };
        record.next_queue_seq = record.next_queue_seq.max(counters.last_seq);
        record.queued = counters.queued;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use crate::store::test_support::temp_store;

    #[test]
    fn connect_creates_and_refreshes() {
        let (_dir, store) = temp_store();
        assert!(store.daemon("a").unwrap().is_none());
        store
            .connect_daemon("a", Some("1.0".into()), vec!["x".into()], "c1", 10)
            .unwrap();
        let record = store
            .connect_daemon("a", Some("1.1".into()), vec![], "c2", 20)
            .unwrap();
        assert_eq!(record.version.as_deref(), Some("1.1"));
        assert_eq!(record.connection_id.as_deref(), Some("c2"));
        assert_eq!(record.created_at_ms, 10);
        assert_eq!(store.daemons().unwrap().len(), 1);
    }
}
