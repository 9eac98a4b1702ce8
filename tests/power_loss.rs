//! Power loss: the relay and, separately, the agent keep their data on LazyFS
//! (`common::lazyfs`), which drops everything not fsynced when the power is "cut". Under
//! the mixed load of the crash loops (`common::crash_loop`: client writes, daemon results
//! and updates, stream context chunks, keys created by an operator; for the agent, daemon
//! events, writes run through it and context uploads), the process is SIGKILLed at a random
//! moment, LazyFS drops what was not synced, and the process starts again on what is left.
//! It must start by itself every time (no seal refusal, no damaged database), and
//! everything it acknowledged must be there, once: nothing lost, nothing duplicated.
//!
//! A third test cuts the power right after `syncrelay backup` printed `backed up`, with
//! the backup's directory on LazyFS: the copy must start as a relay with everything.
//!
//! Short in CI (a few cuts each). Long: `cargo test --release --test power_loss --
//! --ignored --nocapture` (100 cuts each, or `SYNCRELAY_POWER_CUTS=N`). Without
//! `/dev/fuse`, root or the LazyFS sources the tests skip loudly, unless
//! `SYNCRELAY_REQUIRE_ENGINES=1`.

mod common;

use common::chaos;
use common::crash_loop::{agent_crash_loop, crash_loop, Strike};
use common::lazyfs::LazyFs;
use common::{Daemon, RelayProcess};
use serde_json::{json, Value};

/// Power cuts in the short runs.
const CUTS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_power_cuts_lose_nothing_acknowledged() {
    relay_power_loop(
        "power_loss::relay_power_cuts_lose_nothing_acknowledged",
        CUTS,
        50,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 100 power cuts; cargo test --release --test power_loss -- --ignored"]
async fn relay_power_cut_loop_long() {
    let cuts = chaos::env_count("SYNCRELAY_POWER_CUTS", 100);
    relay_power_loop("power_loss::relay_power_cut_loop_long", cuts, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_power_cuts_lose_nothing_acknowledged() {
    agent_power_loop(
        "power_loss::agent_power_cuts_lose_nothing_acknowledged",
        CUTS + 1,
        30,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 100 power cuts of the agent; cargo test --release --test power_loss -- --ignored"]
async fn agent_power_cut_loop_long() {
    let cuts = chaos::env_count("SYNCRELAY_POWER_CUTS", 100);
    agent_power_loop("power_loss::agent_power_cut_loop_long", cuts, 15).await;
}

/// `cuts` power cuts of the relay, its data dir on LazyFS.
async fn relay_power_loop(test: &str, cuts: usize, progress: usize) {
    let Some(binary) = LazyFs::binary(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut lazyfs = LazyFs::mount(&binary, dir.path());
    let data_dir = lazyfs.mnt.join("data");
    let started = std::time::Instant::now();
    let acked = crash_loop(&data_dir, cuts, progress, || {
        tokio::task::block_in_place(|| lazyfs.power_cut())
    })
    .await;
    assert_eq!(lazyfs.cuts, cuts);
    eprintln!(
        "relay power loss: {cuts} cuts in {:.0} s, a clean start after each; checked {} \
         acknowledged commands, {} results, {} updates, {} keys, {} chunks of {} stream \
         contexts ({} resumed part-way); lost 0, duplicated 0",
        started.elapsed().as_secs_f64(),
        acked.commands.len(),
        acked.results.len(),
        acked.update_seq,
        acked.keys.len(),
        acked.chunk_acks,
        acked.streams.len(),
        acked.resumed_mid_stream,
    );
}

/// `cuts` power cuts of the agent, its state dir on LazyFS (the relay's on a plain disk).
async fn agent_power_loop(test: &str, cuts: usize, progress: usize) {
    let Some(binary) = LazyFs::binary(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut lazyfs = LazyFs::mount(&binary, &dir.path().join("lazyfs"));
    let state_dir = lazyfs.mnt.join("agent");
    let started = std::time::Instant::now();
    let run = agent_crash_loop(
        dir.path(),
        &state_dir,
        cuts,
        progress,
        Strike::Agent,
        "stream",
        || tokio::task::block_in_place(|| lazyfs.power_cut()),
    )
    .await;
    assert_eq!((run.agent_kills, lazyfs.cuts), (cuts, cuts));
    eprintln!(
        "agent power loss: {cuts} cuts in {:.0} s, a clean start after each; checked {:?}; \
         lost 0, duplicated 0",
        started.elapsed().as_secs_f64(),
        run.checked,
    );
}

/// A backup is durable once `syncrelay backup` says `backed up`: a power cut right after
/// it leaves a copy that starts as a relay holding everything acknowledged before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_survives_a_power_cut_right_after_it_is_reported() {
    let test = "power_loss::a_backup_survives_a_power_cut_right_after_it_is_reported";
    let Some(binary) = LazyFs::binary(test) else {
        return;
    };
    let original = tempfile::tempdir().unwrap();
    let relay = RelayProcess::spawn(original.path());
    let admin = relay.admin_token();
    let (daemon_key, client_key) = relay.daemon_and_client_keys("d").await;
    let mut daemon = Daemon::new(&relay.url, "d", &daemon_key);
    daemon.connect().await;
    let updates: Vec<Value> = (1..=500)
        .map(|seq| json!({ "type": "tick", "seq": seq, "data": { "n": seq } }))
        .collect();
    let (status, _) = daemon.poll_raw(json!(updates), false, 0.0).await;
    assert_eq!(status, 200);
    let http = reqwest::Client::new();
    let mut commands = Vec::new();
    for n in 0..200 {
        let response = http
            .post(format!("{}/api/v1/daemons/d/jobs", relay.url))
            .bearer_auth(&client_key)
            .header("prefer", "respond-async")
            .json(&json!({ "n": n, "fill": "x".repeat(n * 37 % 6_000) }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        commands.push(body["id"].as_str().unwrap().to_owned());
    }

    let lazy_root = tempfile::tempdir().unwrap();
    let mut lazyfs = LazyFs::mount(&binary, lazy_root.path());
    let copy = lazyfs.mnt.join("backups/today");
    let output = relay.backup(&copy).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.starts_with("backed up "),
        "backup: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The power goes at once (the relay itself runs on another disk, and closed the copy).
    tokio::task::block_in_place(|| lazyfs.power_cut());
    relay.kill();

    let restored = RelayProcess::spawn(&copy);
    assert_eq!(
        restored.admin_token(),
        admin,
        "the admin key is in the copy"
    );
    for id in &commands {
        let response = http
            .get(format!("{}/api/v1/commands/{id}", restored.url))
            .bearer_auth(&client_key)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "command {id} is in the copy");
    }
    let page: Value = http
        .get(format!(
            "{}/api/v1/daemons/d/changes?since=0&limit=1000",
            restored.url
        ))
        .bearer_auth(&client_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        page["changes"].as_array().unwrap().len(),
        500,
        "the change log is in the copy"
    );
    restored.kill();
}
