//! sled made durable against power loss. sled 0.34.7's `Db::flush` writes its log with
//! `pwrite` and ends in `sync_file_range`, which flushes neither the drive's write cache
//! nor the file's metadata (and FUSE does not even pass it on): data it "flushed" is gone
//! after a power cut, a kernel panic or a host crash (sled #1452). Only its background
//! thread calls `fsync`, every 500 ms. [`SyncedDb::sync`] is the flush the store's group
//! commit uses instead: sled's flush, then a real `fdatasync` of the log file through a
//! handle of our own, after every file that sled created since the last sync and the
//! directories that hold their names.
//!
//! The files sled 0.34.7 keeps in its directory: `conf` (written once, never synced by
//! sled), the log `db`, `snap.<lsn>` snapshots (synced by sled before their rename, but the
//! rename and the removal of the old one are directory changes), and `blobs/<lsn>`, one
//! file per log item over 128 KiB, written before the log item that points at it and never
//! synced by sled. The store writes no value over 4 KiB (`spill.rs`), so no blob should
//! appear; if one does, it is synced (and re-synced while it grows) before the log that
//! points at it. Opening syncs all of them, the directory, and its parent.
//!
//! A failed sync is returned as an error and the commit waiting on it fails, and so does
//! every later one: after a failed `fsync` Linux may have dropped the dirty pages and
//! reports the error only once, so a later sync could succeed over writes that never
//! reached the disk. Nothing is acknowledged again until the process restarts (`syncrelay
//! serve` exits on it, like PostgreSQL's PANIC, and sled's recovery at the next start finds
//! what was durable).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{Result, StoreError};

/// When set (to anything), [`SyncedDb::sync`] is sled's flush alone, as before
/// acknowledgements waited for an `fdatasync`. Only `cargo bench --bench relay` sets it, to
/// measure what the sync costs in the same run; the relay warns at start when it is set.
/// Never for real use: acknowledged writes do not survive a power cut then.
pub const UNSYNCED_FOR_BENCH_ENV: &str = "SYNCRELAY_BENCH_UNSYNCED_FLUSH";

/// A sled database and our own handle on its files.
pub struct SyncedDb {
    db: sled::Db,
    /// sled's directory (`data_dir/db`, `state_dir/agent-db`, a backup's `db`).
    dir: PathBuf,
    /// sled's log file, opened by us: sled keeps its own handle private.
    log: File,
    /// What was synced, so that each sync looks only for what is new. The lock is
    /// uncontended: one flusher thread syncs, and opening and closing happen around it.
    synced: Mutex<Synced>,
    /// `false` only under [`UNSYNCED_FOR_BENCH_ENV`].
    fsync: bool,
    /// The first sync failure; once set, every sync fails with it.
    failed: std::sync::OnceLock<String>,
}

/// Names (and, in `blobs`, lengths) as of the last sync.
#[derive(Default)]
struct Synced {
    top: BTreeMap<OsString, u64>,
    blobs: BTreeMap<OsString, u64>,
}

impl SyncedDb {
    /// Opens the database in `dir` with `config`'s other settings, and makes what is there
    /// durable: the files sled created or recovered, `dir`, and the two directories above
    /// it (either may have been created just now).
    pub fn open(config: sled::Config, dir: &Path) -> Result<SyncedDb> {
        let db = config.path(dir).open()?;
        let io_err = |err: io::Error| StoreError::Unavailable(format!("{}: {err}", dir.display()));
        let log = File::open(dir.join("db")).map_err(io_err)?;
        let fsync = std::env::var_os(UNSYNCED_FOR_BENCH_ENV).is_none();
        if !fsync {
            tracing::warn!(
                dir = %dir.display(),
                "{UNSYNCED_FOR_BENCH_ENV} is set: acknowledgements do not wait for fdatasync \
                 and do not survive a power cut (for benchmarks only)"
            );
        }
        let synced = SyncedDb {
            db,
            dir: dir.to_owned(),
            log,
            synced: Mutex::default(),
            fsync,
            failed: std::sync::OnceLock::new(),
        };
        synced.sync().map_err(io_err)?;
        if fsync {
            // The data dir, which holds sled's directory, and the one above it, where the
            // data dir may just have been created (best effort: it may not be readable).
            if let Some(parent) = dir.parent() {
                crate::files::sync_dir(parent).map_err(io_err)?;
                if let Err(err) = crate::files::sync_parent(parent) {
                    tracing::debug!(dir = %parent.display(), error = %err, "syncing the parent");
                }
            }
        }
        Ok(synced)
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Makes everything written to the database before this call durable: sled's flush,
    /// then new files and directory entries, then `fdatasync` of the log. Blocking; one
    /// call covers every writer that finished before it (group commit).
    pub fn sync(&self) -> io::Result<()> {
        if let Some(first) = self.failed.get() {
            return Err(io::Error::other(format!(
                "an earlier sync failed ({first}); nothing is durable until a restart"
            )));
        }
        self.sync_once().inspect_err(|err| {
            let _ = self.failed.set(err.to_string());
        })
    }

    fn sync_once(&self) -> io::Result<()> {
        self.db.flush()?;
        if !self.fsync {
            return Ok(());
        }
        {
            let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
            // Blobs first: a blob is written before the log item that points at it, and a
            // log synced before its blob could point at a file a power cut took.
            let blobs = self.dir.join("blobs");
            sync_new(&blobs, &mut synced.blobs, true)?;
            sync_new(&self.dir, &mut synced.top, false)?;
        }
        self.log.sync_data()
    }
}

/// Syncs the files in `dir` that are not in `synced` (or, with `by_length`, whose length
/// changed), then `dir` itself when a name came or went, and records what it saw.
fn sync_new(dir: &Path, synced: &mut BTreeMap<OsString, u64>, by_length: bool) -> io::Result<()> {
    let mut now = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        // A snapshot sled is renaming or removing may vanish between the listing and here.
        let meta = match entry.metadata() {
            Ok(meta) => meta,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        let length = if by_length { meta.len() } else { 0 };
        let name = entry.file_name();
        let seen = synced.get(&name) == Some(&length);
        if !seen && meta.is_file() {
            match File::open(entry.path()) {
                Ok(file) => file.sync_all()?,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            }
        }
        now.insert(name, length);
    }
    let names_changed = now.len() != synced.len() || now.keys().ne(synced.keys());
    if names_changed {
        crate::files::sync_dir(dir)?;
    }
    *synced = now;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_files_are_seen_once_and_a_growing_one_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut synced = BTreeMap::new();
        std::fs::write(dir.path().join("a"), b"1").unwrap();
        sync_new(dir.path(), &mut synced, true).unwrap();
        assert_eq!(synced.get(&OsString::from("a")), Some(&1));
        std::fs::write(dir.path().join("a"), b"12").unwrap();
        sync_new(dir.path(), &mut synced, true).unwrap();
        assert_eq!(synced.get(&OsString::from("a")), Some(&2));
        std::fs::remove_file(dir.path().join("a")).unwrap();
        sync_new(dir.path(), &mut synced, false).unwrap();
        assert!(synced.is_empty());
    }

    #[test]
    fn after_a_failed_sync_every_sync_fails() {
        let dir = tempfile::tempdir().unwrap();
        let synced = SyncedDb::open(sled::Config::new(), &dir.path().join("db")).unwrap();
        // The next sync cannot list sled's directory: it fails, and so does every later
        // one, even once the directory is back.
        let moved = dir.path().join("moved");
        std::fs::rename(dir.path().join("db/blobs"), &moved).unwrap();
        assert!(synced.sync().is_err());
        std::fs::rename(&moved, dir.path().join("db/blobs")).unwrap();
        let again = synced.sync().unwrap_err().to_string();
        assert!(again.contains("an earlier sync failed"), "{again}");
    }

    #[test]
    fn a_synced_db_reopens_with_what_was_synced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let synced = SyncedDb::open(sled::Config::new(), &path).unwrap();
            synced.db().insert(b"k", b"v").unwrap();
            synced.sync().unwrap();
            // sled's files are all known after a sync: conf, db, blobs.
            let names: Vec<_> = synced.synced.lock().unwrap().top.keys().cloned().collect();
            for name in ["blobs", "conf", "db"] {
                assert!(names.contains(&OsString::from(name)), "{names:?}");
            }
        }
        let reopened = SyncedDb::open(sled::Config::new(), &path).unwrap();
        assert_eq!(reopened.db().get(b"k").unwrap().unwrap().as_ref(), b"v");
    }
}
