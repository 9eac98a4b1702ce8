//! Crash safety with real processes: a workload of clients queueing writes and fetching
//! stream contexts, and a daemon posting updates, results and stream chunks, runs against
//! the `syncrelay` binary, which is SIGKILLed mid-flight and restarted on the same data
//! dir, several times. Afterwards every acknowledged command is delivered, every
//! acknowledged result and change-log entry is there, in order, exactly once, and every
//! acknowledged chunk is stored: resuming an upload after the first unacknowledged chunk
//! never meets a gap, and the finished context replays byte-exact.
//!
//! The short version (3 kills) runs in CI. The long one is
//! `cargo test --release --test crash -- --ignored` (100 kills, or
//! `SYNCRELAY_CRASH_KILLS=N`); each kill comes at a random moment, 0–40 ms after the
//! workload has made progress, and sled must open cleanly (and its seal agree) on every
//! restart. RELIABILITY.md has the latest long-run figures.
//!
//! The second loop puts the agent in: the `syncrelay agent` binary serves a
//! [`TestDaemon`] (events, an echo API, large stream contexts), clients queue writes with
//! `Idempotency-Key` and fetch contexts (chunk uploads), and each kill strikes the relay or
//! the agent at random. The end check is `common::chaos::check`. Short: 4 kills in CI;
//! long: `cargo test --release --test crash -- --ignored` (same `SYNCRELAY_CRASH_KILLS`).

mod common;

use common::chaos;
use common::crash_loop::{agent_crash_loop, crash_loop, Strike};

/// Kill/restart rounds in the short run.
const ROUNDS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    crash_loop(dir.path(), ROUNDS, 50, || {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 100 kills; cargo test --release --test crash -- --ignored"]
async fn sigkill_loop_long() {
    let kills = chaos::env_count("SYNCRELAY_CRASH_KILLS", 100);
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let acked = crash_loop(dir.path(), kills, 20, || {}).await;
    eprintln!(
        "crash loop: {kills} kills in {:.0} s; checked {} acknowledged commands, {} results, \
         {} updates, {} keys, {} chunks of {} stream contexts ({} resumed part-way, {} finished \
         after the last restart, {} finished with the answer to their last chunk lost); lost 0",
        started.elapsed().as_secs_f64(),
        acked.commands.len(),
        acked.results.len(),
        acked.update_seq,
        acked.keys.len(),
        acked.chunk_acks,
        acked.streams.len(),
        acked.resumed_mid_stream,
        acked.streams_resumed,
        acked.streams_unconfirmed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_and_agent_sigkilled_at_random_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("agent");
    agent_crash_loop(
        dir.path(),
        &state_dir,
        4,
        30,
        Strike::RelayOrAgent,
        "stream",
        || {},
    )
    .await;
}

/// The same with the agent long-polling (`--sync poll`), as daemons written before
/// `/sync/stream` do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_and_agent_sigkilled_at_random_lose_nothing_polling() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("agent");
    agent_crash_loop(
        dir.path(),
        &state_dir,
        4,
        30,
        Strike::RelayOrAgent,
        "poll",
        || {},
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 100 kills of the relay or the agent; cargo test --release --test crash -- --ignored"]
async fn relay_and_agent_sigkill_loop_long() {
    let kills = chaos::env_count("SYNCRELAY_CRASH_KILLS", 100);
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("agent");
    agent_crash_loop(
        dir.path(),
        &state_dir,
        kills,
        15,
        Strike::RelayOrAgent,
        "stream",
        || {},
    )
    .await;
}
