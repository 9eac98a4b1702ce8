//! The seal: a small file beside the database that says how many group commits were on
//! disk when it was written, so that a damaged database is refused instead of used.
//!
//! sled 0.34 takes any log entry that fails its checksum for the torn tail of a crash and
//! recovers the entries before it: a `db` file truncated or with flipped bits opens
//! without an error, minus everything after the damage. So every group commit also bumps
//! a counter inside the database, and after a successful flush the flusher writes that
//! counter to the seal (at most once per [`SEAL_EVERY`], and once more when it stops). At
//! open, a counter behind the seal means flushed commits are gone: the store refuses to
//! open with [`StoreError::Corrupt`], naming both numbers and what to do.
//!
//! What the seal cannot see: damage that only removes commits made after the last seal
//! write before a crash (at most [`SEAL_EVERY`] of them); a deleted seal file (then nothing
//! is checked on that start, and a new seal is written); and damage to old pages that the
//! log's tail still covers, which shows only when they are read (as a decoding error,
//! never as wrong data: sled checksums every entry).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::synced::SyncedDb;
use super::{Result, StoreError};

/// Key of the commit counter in the `meta` tree (u64, big-endian).
pub const COMMITS_KEY: &[u8] = b"commits";

/// How often, at most, the flusher rewrites the seal while commits flow.
pub const SEAL_EVERY: Duration = Duration::from_secs(1);

const HEADER: &str = "syncrelay seal v1";

/// The flusher's handle on the counter and the seal file.
pub struct Seal {
    path: PathBuf,
    meta: sled::Tree,
    /// Commits counted so far (the value in the database after the next bump is this + 1).
    commits: u64,
    /// The counter as of the last successful flush: what the seal may say.
    durable: u64,
    /// The value the seal file holds.
    sealed: u64,
    written_at: Instant,
}

impl Seal {
    /// Checks the database's counter against the seal file `name` in `dir`, and returns
    /// the handle the flusher keeps them with. `restore` tells the reader what to do when
    /// the database is behind (where its backups are, or that it can be rebuilt). A seal
    /// that is missing or behind is brought up to date at once, after a flush.
    pub fn open(
        dir: &Path,
        name: &str,
        db: &SyncedDb,
        meta: sled::Tree,
        restore: &str,
    ) -> Result<Seal> {
        let path = dir.join(name);
        let commits = commits_in(&meta)?;
        let sealed = read(&path)?;
        if let Some(sealed) = sealed {
            if commits < sealed {
                return Err(StoreError::Corrupt(format!(
                    "{} group commits that were on disk are gone: the database in {} holds \
                     {commits} but {} says {sealed}. A crash or a power cut does not do this \
                     (every commit is fsynced before the seal counts it, and a restart after \
                     one starts by itself); this data dir lost writes its disk had confirmed. \
                     Either its files are damaged or truncated, or it was copied while the \
                     process was running, or the storage under it does not keep what it \
                     confirms (a drive or virtual disk that ignores flush commands, write \
                     caching without power-loss protection, a file system mounted with \
                     nobarrier): fix that before trusting it again. {restore} Deleting {} \
                     starts on what is left and accepts the loss; do that only for an older \
                     copy restored on purpose, or once you accept losing those commits",
                    sealed - commits,
                    dir.display(),
                    path.display(),
                    path.display()
                )));
            }
        }
        let mut seal = Seal {
            path,
            meta,
            commits,
            durable: commits,
            sealed: sealed.unwrap_or(0),
            written_at: Instant::now(),
        };
        if sealed != Some(commits) {
            // What sled recovered may sit only in the page cache after a crash.
            db.sync()
                .map_err(|err| StoreError::Unavailable(format!("{}: {err}", dir.display())))?;
            seal.sealed = u64::MAX;
            seal.flushed(true);
        }
        Ok(seal)
    }

    /// Bumps the counter; call before the flush that the commit is answered by.
    pub fn bump(&mut self) -> std::result::Result<(), String> {
        let next = self.commits + 1;
        self.meta
            .insert(COMMITS_KEY, &next.to_be_bytes())
            .map_err(|err| err.to_string())?;
        self.commits = next;
        Ok(())
    }

    /// After a successful flush: everything counted is on disk.
    pub fn flush_succeeded(&mut self) {
        self.durable = self.commits;
    }

    /// Writes the seal for the last successful flush when it is due (or `force`).
    pub fn flushed(&mut self, force: bool) {
        if self.sealed == self.durable || !(force || self.written_at.elapsed() >= SEAL_EVERY) {
            return;
        }
        match write(&self.path, self.durable) {
            Ok(()) => self.sealed = self.durable,
            Err(err) => tracing::warn!(
                error = %err,
                seal = %self.path.display(),
                "could not write the store's seal"
            ),
        }
        self.written_at = Instant::now();
    }
}

/// Writes a seal for `commits` into `path` (used by backups for their copy).
pub fn write(path: &Path, commits: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(render(commits).as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The counter value the database holds (0 when it has none).
pub fn commits_in(meta: &sled::Tree) -> Result<u64> {
    match meta.get(COMMITS_KEY)? {
        None => Ok(0),
        Some(bytes) => Ok(u64::from_be_bytes(bytes.as_ref().try_into().map_err(
            |_| StoreError::Corrupt("the commit counter is not 8 bytes".into()),
        )?)),
    }
}

fn render(commits: u64) -> String {
    format!("{HEADER}\ncommits {commits}\ncheck {}\n", check(commits))
}

fn check(commits: u64) -> String {
    let digest = Sha256::digest(format!("{HEADER} {commits}"));
    hex::encode(&digest[..8])
}

/// The seal's counter; `None` when there is no seal file.
fn read(path: &Path) -> Result<Option<u64>> {
    // Bytes, not text: a seal damaged into invalid UTF-8 is damaged, not unreadable.
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(StoreError::Unavailable(format!(
                "{}: {err}",
                path.display()
            )))
        }
    };
    let damaged = || {
        StoreError::Corrupt(format!(
            "the seal {} is damaged; it is not the file syncrelay writes. Restore the data \
             dir from a backup, or delete the seal to start without the check",
            path.display()
        ))
    };
    parse_bytes(&bytes).map(Some).ok_or_else(damaged)
}

/// [`parse`] of a seal file's bytes.
pub(super) fn parse_bytes(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok().and_then(parse)
}

/// The counter a seal file's text holds; `None` unless the text is exactly what
/// [`render`] writes for it.
pub(super) fn parse(text: &str) -> Option<u64> {
    let commits: u64 = text
        .strip_prefix(HEADER)?
        .strip_prefix("\ncommits ")?
        .split('\n')
        .next()?
        .parse()
        .ok()?;
    (text == render(commits)).then_some(commits)
}

/// A seal file's text for `commits` (for the fuzz entry's round trip).
pub(super) fn rendered(commits: u64) -> String {
    render(commits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_db(dir: &Path) -> (SyncedDb, sled::Tree) {
        let db = SyncedDb::open(sled::Config::new(), &dir.join("db")).unwrap();
        let meta = db.db().open_tree("meta").unwrap();
        (db, meta)
    }

    #[test]
    fn a_counter_behind_its_seal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (db, tree) = open_db(dir.path());
        let mut seal = Seal::open(dir.path(), "store.seal", &db, tree.clone(), "").unwrap();
        for _ in 0..3 {
            seal.bump().unwrap();
        }
        // Nothing counted is sealed before a flush succeeded.
        seal.flushed(true);
        assert_eq!(read(&dir.path().join("store.seal")).unwrap(), Some(0));
        seal.flush_succeeded();
        seal.flushed(true);
        assert_eq!(read(&dir.path().join("store.seal")).unwrap(), Some(3));
        // The same counter opens; a counter that lost commits does not.
        Seal::open(dir.path(), "store.seal", &db, tree.clone(), "").unwrap();
        tree.insert(COMMITS_KEY, &2u64.to_be_bytes()).unwrap();
        let err = Seal::open(dir.path(), "store.seal", &db, tree, "")
            .err()
            .unwrap();
        assert!(
            matches!(err, StoreError::Corrupt(ref m) if m.contains("1 group commits that were on disk are gone"))
        );
    }

    #[test]
    fn a_damaged_seal_is_refused_and_a_missing_one_is_not_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (db, tree) = open_db(dir.path());
        Seal::open(dir.path(), "store.seal", &db, tree.clone(), "").unwrap();
        let path = dir.path().join("store.seal");
        std::fs::write(&path, render(7).replace("commits 7", "commits 9")).unwrap();
        assert!(matches!(
            Seal::open(dir.path(), "store.seal", &db, tree, ""),
            Err(StoreError::Corrupt(_))
        ));
    }
}
