//! Small file helpers shared by the relay, the store and the CLI: a file written whole or
//! not at all, with its permission bits set from creation (keys and secrets are never
//! world-readable, not even for a moment), and the directory syncs that make a new name
//! survive a power cut (a synced file whose directory entry was not synced can vanish).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `contents` to `path` through a temporary file in the same directory, synced,
/// renamed over `path`, and the directory synced, created with `mode`: a crash or a power
/// cut leaves the old file or the new one, never half of one, and once this returns the
/// new one stays.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(tmp, path)?;
    sync_parent(path)
}

/// Copies `from` to `to` and syncs the copy and `to`'s directory.
pub fn copy_durable(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::copy(from, to)?;
    std::fs::File::open(to)?.sync_all()?;
    sync_parent(to)
}

/// fsyncs the directory `dir`, so that the names created, renamed or removed in it are
/// on disk.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// fsyncs the directory that holds `path` (the current directory for a bare name).
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => sync_dir(Path::new(".")),
    }
}
