//! Small file helpers shared by the relay and the CLI: a file written whole or not at all,
//! with its permission bits set from creation (keys and secrets are never world-readable,
//! not even for a moment).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `contents` to `path` through a temporary file in the same directory, synced and
/// then renamed over `path`, created with `mode`: a crash leaves the old file or the new
/// one, never half of one.
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
    std::fs::rename(tmp, path)
}
