//! A simulated power loss for the tests: LazyFS (`../shared/tools/lazyfs`, a FUSE file
//! system with its own page cache) mounted over a directory of the test's. Data written to
//! it reaches the backing directory only when the writer fsyncs or fdatasyncs it;
//! [`LazyFs::power_cut`] drops everything else (`lazyfs::clear-cache`), unmounts, and mounts
//! again, which also empties the kernel's cache of the files. What survives is exactly
//! what was synced, as after a power cut on a disk that honours flushes.
//!
//! [`LazyFs::binary`] builds LazyFS once with the script beside its sources (`.ci/run`
//! does it before the tests). On a machine without `/dev/fuse`, root, the build tools, or
//! the sources, it prints one `SKIPPED:` line and the test returns, unless
//! `SYNCRELAY_REQUIRE_ENGINES=1`, which turns the skip into a failure.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// LazyFS's own page cache. It holds the synced pages of a mount as well as the others,
/// and a mount lives for one round of a loop; allocated (and zeroed) at every mount.
const CACHE_SIZE: &str = "512mb";
/// Longest wait for a mount, an unmount, or the cache to be cleared.
const WAIT_MAX: Duration = Duration::from_secs(60);

/// A LazyFS mount: `mnt` shows `backing` through LazyFS's cache.
pub struct LazyFs {
    binary: PathBuf,
    root: PathBuf,
    /// Where the program under test keeps its files.
    pub mnt: PathBuf,
    /// The backing directory: what a power cut would leave (once the cache is cleared).
    pub backing: PathBuf,
    child: Option<Child>,
    /// Power cuts so far.
    pub cuts: usize,
}

impl LazyFs {
    /// The LazyFS binary, built on first use; `None` after one loud `SKIPPED:` line when
    /// this machine cannot run it (a failure instead under `SYNCRELAY_REQUIRE_ENGINES=1`).
    pub fn binary(test: &str) -> Option<PathBuf> {
        static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        match BUILT.get_or_init(build) {
            Ok(binary) => Some(binary.clone()),
            Err(why) => {
                super::skip_or_fail(test, &format!("LazyFS not installed: {why}"));
                None
            }
        }
    }

    /// Mounts LazyFS over `root/backing` at `root/mnt`.
    pub fn mount(binary: &Path, root: &Path) -> LazyFs {
        let (mnt, backing) = (root.join("mnt"), root.join("backing"));
        std::fs::create_dir_all(&mnt).unwrap();
        std::fs::create_dir_all(&backing).unwrap();
        let config = format!(
            "[faults]\nfifo_path = {fifo:?}\n\
             [cache]\napply_eviction = false\n\
             [cache.simple]\ncustom_size = {CACHE_SIZE:?}\nblocks_per_page = 1\n\
             [filesystem]\nlog_all_operations = false\nlogfile = {log:?}\n",
            fifo = root.join("fifo").display().to_string(),
            log = root.join("lazyfs.log").display().to_string(),
        );
        std::fs::write(root.join("lazyfs.toml"), config).unwrap();
        let mut lazyfs = LazyFs {
            binary: binary.to_owned(),
            root: root.to_owned(),
            mnt,
            backing,
            child: None,
            cuts: 0,
        };
        lazyfs.start();
        lazyfs
    }

    fn start(&mut self) {
        // A fresh log each mount, so that waiting for "cache is cleared." sees this one's.
        let _ = std::fs::remove_file(self.root.join("lazyfs.log"));
        let child = Command::new(&self.binary)
            .arg(&self.mnt)
            .arg("--config-path")
            .arg(self.root.join("lazyfs.toml"))
            .args(["-o", "allow_other", "-o", "modules=subdir", "-o"])
            .arg(format!("subdir={}", self.backing.display()))
            .arg("-f")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn lazyfs");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT_MAX;
        while !self.mounted() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "lazyfs exited ({status}) before mounting {}; its log:\n{}",
                    self.mnt.display(),
                    self.log()
                );
            }
            assert!(Instant::now() < deadline, "lazyfs did not mount in time");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn mounted(&self) -> bool {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mnt = self.mnt.display().to_string();
        mounts
            .lines()
            .any(|line| line.split(' ').nth(1) == Some(mnt.as_str()))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("lazyfs.log")).unwrap_or_default()
    }

    /// A power cut. The programs using the mount must be dead (SIGKILLed and reaped):
    /// everything they wrote and did not sync is dropped, LazyFS is unmounted and mounted
    /// again, and the mount then holds exactly what was synced.
    pub fn power_cut(&mut self) {
        {
            let mut fifo = std::fs::OpenOptions::new()
                .write(true)
                .open(self.root.join("fifo"))
                .expect("open the lazyfs fifo");
            fifo.write_all(b"lazyfs::clear-cache\n").unwrap();
        }
        let deadline = Instant::now() + WAIT_MAX;
        while !self.log().contains("cache is cleared.") {
            assert!(Instant::now() < deadline, "lazyfs did not clear its cache");
            std::thread::sleep(Duration::from_millis(10));
        }
        self.unmount();
        self.cuts += 1;
        self.start();
    }

    fn unmount(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let deadline = Instant::now() + WAIT_MAX;
        while self.mounted() {
            let status = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status()
                .expect("run fusermount3");
            if status.success() {
                break;
            }
            // Busy: a process of the test still closing its files.
            assert!(Instant::now() < deadline, "could not unmount lazyfs");
            std::thread::sleep(Duration::from_millis(50));
        }
        // LazyFS ends itself once unmounted (with an abort message, which is harmless).
        let _ = child.wait();
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if self.mounted() {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.mnt)
                .status();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Builds LazyFS into `target/lazyfs` with the shared build script (once; the script
/// reuses an earlier build), or finds why this machine cannot run it.
fn build() -> Result<PathBuf, String> {
    if !Path::new("/dev/fuse").exists() {
        return Err("no /dev/fuse on this machine".into());
    }
    let uid = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            line.strip_prefix("Uid:")?
                .split_whitespace()
                .nth(1)
                .map(str::to_owned)
        });
    if uid.as_deref() != Some("0") {
        return Err("mounting it with allow_other needs root".into());
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = manifest.join("../shared/tools/lazyfs/build.sh");
    if !script.exists() {
        return Err(format!("no build script at {}", script.display()));
    }
    let out = manifest.join("target/lazyfs");
    let output = Command::new("bash")
        .arg(&script)
        .arg(&out)
        .output()
        .map_err(|err| format!("running {}: {err}", script.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let binary = out.join("lazyfs");
    if !binary.exists() {
        return Err(format!("the build left no {}", binary.display()));
    }
    Ok(binary)
}
