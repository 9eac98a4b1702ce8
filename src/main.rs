//! The `syncrelay` binary: parses the command line and hands the command to the library
//! ([`syncrelay::cli::dispatch`]) on a tokio runtime.

use clap::Parser;
use syncrelay::cli::{Cli, Command};

/// mimalloc instead of glibc's malloc: the relay's request path allocates and frees many
/// small buffers across threads, where glibc's arenas spent a fifth of a durable write's
/// CPU (BENCHMARKS.md, "The write path").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // No transparent huge pages for this process: where the kernel's THP setting is
    // `always` (Debian's default), a 2 MiB page backs any touched part of mimalloc's
    // eagerly committed arenas, and each idle daemon cost a third more RSS (57 instead of
    // 43 KiB at 10,000, BENCHMARKS.md). Small allocations gain nothing from huge pages.
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and changes only this process's
    // paging policy.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    let cli = Cli::parse();
    // The agent is a small forwarder beside the daemon: one thread does its work with
    // fewer cross-thread wake-ups and context switches than a pool (BENCHMARKS.md). The
    // relay and the admin commands use a thread per core.
    let runtime = match cli.command {
        Command::Agent { .. } => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()
    .expect("start the tokio runtime");
    let outcome = runtime.block_on(syncrelay::cli::dispatch(cli.command));
    // Do not wait on blocking work that cannot finish (a wedged store flush, given up on
    // at shutdown after everything acknowledged was flushed).
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("syncrelay: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
