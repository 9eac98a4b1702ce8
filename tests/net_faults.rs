//! Network faults between the agent and the relay, and between clients and the relay:
//! both dial the relay through fault-injecting proxies on loopback (`common::proxy`) that
//! give every new connection a fault: a reset part-way through a request (a poll or a
//! result post cut mid-way), a reset part-way through an answer (a response lost after the
//! relay committed), a half-open connection, latency, a bandwidth cap, or a close
//! mid-flight. Meanwhile the daemon produces events, clients queue writes with
//! `Idempotency-Key` and retry them until acknowledged, and clients fetch large stream
//! contexts (chunk uploads). After the faults stop, the same invariants as the crash loop
//! hold (`common::chaos::check`): every event in the change log once and in order, every
//! acknowledged write completed with the daemon's answer (a retry never made a second
//! command), every context whole and byte-exact.
//!
//! The short run (CI) injects 40 faults at the agent's proxy, one of them half-open, and as
//! many at the clients'. The long one is
//! `cargo test --release --test net_faults -- --ignored --nocapture`
//! (`SYNCRELAY_NET_FAULTS=N`, default 500); RELIABILITY.md has its latest figures.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::chaos::{self, Ledger, DAEMON};
use common::daemon::TestDaemon;
use common::proxy::{Fault, Proxy};
use common::{TestAgent, TestRelay};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use syncrelay::agent::RawAgent;
use tokio_util::sync::CancellationToken;

/// A fault for the next connection. Resets strike within the first `reach` bytes, so they
/// land in requests and answers of every kind, polls and results alike. Slow connections
/// close after a while, so the next connection gets the next fault.
fn random_fault(rng: &mut StdRng, reach: usize) -> Fault {
    match rng.gen_range(0..6) {
        0 => Fault::ResetUp(rng.gen_range(0..reach)),
        1 => Fault::ResetDown(rng.gen_range(0..reach)),
        2 => Fault::Latency(
            Duration::from_millis(rng.gen_range(5..40)),
            Duration::from_millis(rng.gen_range(200..2000)),
        ),
        3 => Fault::Bandwidth(
            rng.gen_range(20_000..200_000),
            Duration::from_millis(rng.gen_range(200..2000)),
        ),
        _ => Fault::CloseAfter(Duration::from_millis(rng.gen_range(50..800))),
    }
}

/// The agent's proxy: random faults, and a half-open connection every `half_open_every`.
fn agent_faults(seed: u64, half_open_every: usize) -> Box<dyn FnMut() -> Fault + Send> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut connection = 0;
    Box::new(move || {
        connection += 1;
        if connection % half_open_every == 0 {
            Fault::HalfOpen(rng.gen_range(0..20_000))
        } else {
            random_fault(&mut rng, 20_000)
        }
    })
}

/// The clients' proxy: random faults, no half-open connections (each would only stall one
/// client for its request timeout).
fn client_faults(seed: u64) -> Box<dyn FnMut() -> Fault + Send> {
    let mut rng = StdRng::seed_from_u64(seed);
    Box::new(move || random_fault(&mut rng, 4_000))
}

fn total(proxy: &Proxy) -> usize {
    proxy.injected().values().sum()
}

async fn faults_loop(target: usize, half_open_every: usize, sync: &str) {
    let relay = TestRelay::start().await;
    let daemon_key = relay.key("daemon", Some(DAEMON), None).await;
    let client = relay.client(&[DAEMON]).await;
    let daemon = Arc::new(TestDaemon::start().await);
    let agent_proxy = Proxy::start(relay.addr).await;
    let client_proxy = Proxy::start(relay.addr).await;
    let _agent = TestAgent::start(
        &agent_proxy.url,
        DAEMON,
        &daemon_key,
        &daemon.target,
        RawAgent {
            poll_timeout: Some("2s".into()),
            request_timeout: Some("10s".into()),
            sync: Some(sync.into()),
            ..RawAgent::default()
        },
    );
    client.await_online(DAEMON).await;

    let ledger = Arc::new(Ledger::default());
    let stop = CancellationToken::new();
    let tasks = chaos::spawn_workload(&client_proxy.url, &client.key, &daemon, &ledger, &stop);

    let started = Instant::now();
    agent_proxy.inject(Some(agent_faults(7, half_open_every)));
    client_proxy.inject(Some(client_faults(11)));
    // Cut the clean connections made so far: from here on every connection has a fault.
    agent_proxy.switch(Some(relay.addr));
    client_proxy.switch(Some(relay.addr));
    // About two faults a second at the agent, plus ~30 s for each half-open connection.
    let limit = Duration::from_secs(60 + target as u64 * 2);
    let half_open = |proxy: &Proxy| proxy.injected().get("half-open").copied().unwrap_or(0);
    while total(&agent_proxy) < target
        || total(&client_proxy) < target
        || (target >= half_open_every && half_open(&agent_proxy) == 0)
    {
        assert!(
            started.elapsed() < limit,
            "only {} + {} faults injected in {limit:?}: the workload stalled",
            total(&agent_proxy),
            total(&client_proxy)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Faults over: new connections are clean, open ones are cut once more.
    agent_proxy.inject(None);
    client_proxy.inject(None);
    agent_proxy.switch(Some(relay.addr));
    client_proxy.switch(Some(relay.addr));
    chaos::stop_workload(stop, tasks).await;

    let checked = chaos::check(&relay.url, &client.key, &daemon, &ledger, true).await;
    assert!(
        checked.writes > 20
            && checked.events > 100
            && checked.streams > 2
            && checked.streams_replayed > 0,
        "the workload ran through the faults: {checked:?}"
    );
    // The faults that matter most fired: requests cut on the way in, answers lost on the
    // way out, and at the agent's side a half-open connection; some client writes were
    // cut and retried with their key (whether before or after the relay committed them,
    // the check above found each run once).
    for (side, proxy) in [("agent", &agent_proxy), ("client", &client_proxy)] {
        let fired = proxy.injected();
        for kind in ["reset towards the relay", "reset towards the client"] {
            assert!(
                fired.get(kind).is_some_and(|&n| n > 0),
                "{side} side: no {kind} fired: {fired:?}"
            );
        }
    }
    assert!(
        half_open(&agent_proxy) > 0,
        "no half-open connection at the agent's side"
    );
    assert!(
        ledger.retries.load(Ordering::Relaxed) > 0,
        "no client write was cut and retried"
    );
    eprintln!(
        "net faults: {} s; agent side {:?}; client side {:?}; {} client retries; checked {checked:?}; lost 0",
        started.elapsed().as_secs(),
        agent_proxy.injected(),
        client_proxy.injected(),
        ledger.retries.load(Ordering::Relaxed),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_on_every_connection_lose_and_duplicate_nothing() {
    faults_loop(40, 25, "stream").await;
}

/// The same with the agent long-polling, as daemons written before `/sync/stream` do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_on_every_connection_lose_and_duplicate_nothing_polling() {
    faults_loop(40, 25, "poll").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 500 faults at each proxy; cargo test --release --test net_faults -- --ignored"]
async fn faults_on_every_connection_long() {
    let faults = chaos::env_count("SYNCRELAY_NET_FAULTS", 500);
    faults_loop(faults, 50, "stream").await;
}
