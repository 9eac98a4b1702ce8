//! The cluster under chaos (DESIGN.md, "Cluster"; `--ignored`, not in CI): three relay
//! nodes as real `syncrelay serve` processes on one PostgreSQL, with a 3-server NATS
//! cluster, all on loopback. The agent is given all three nodes' URLs. Clients reach the
//! nodes through a load balancer's stand-in (`common::proxy`), which points at one live node
//! and moves to the next at every step. The workload is the network-fault loop's
//! (`common::chaos`: daemon events, writes retried with `Idempotency-Key` until
//! acknowledged, large stream contexts). Each step, after fresh progress, takes down in turn:
//! - a relay node, SIGKILLed and restarted on its address (the balancer leaves it first, as
//!   a health check would);
//! - a NATS server, SIGKILLed and restarted;
//! - PostgreSQL, `pg_ctl stop -m immediate`, then started again.
//!
//! Afterwards the crash loops' end check: every daemon event in the change log once and in
//! order, every acknowledged write completed as its one command and run once at the daemon,
//! every stream context whole and byte-exact.
//!
//! `cargo test --release --test cluster_chaos -- --ignored --nocapture`
//! (`SYNCRELAY_CLUSTER_CHAOS=N` steps, default 30); RELIABILITY.md, "Latest results", has
//! its figures.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::chaos::{self, Ledger, DAEMON};
use common::daemon::TestDaemon;
use common::nats::NatsCluster;
use common::proxy::Proxy;
use common::{create_key, eventually, metric_at, postgres, RelayProcess, TestAgent};
use rand::Rng;
use serde_json::json;
use syncrelay::agent::RawAgent;
use tokio_util::sync::CancellationToken;

const NODES: [&str; 3] = ["a", "b", "c"];

/// A pause of up to a second: how long a node, server or database stays down.
fn downtime() -> Duration {
    Duration::from_millis(rand::thread_rng().gen_range(0..1000))
}

/// Runs `f` on the blocking pool; its panic is the test's.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: cargo test --release --test cluster_chaos -- --ignored --nocapture"]
async fn relay_nodes_nats_servers_and_postgres_killed_in_turn_lose_nothing() {
    let test = "relay_nodes_nats_servers_and_postgres_killed_in_turn_lose_nothing";
    let Some(pg) = postgres::PgCluster::start(test).map(Arc::new) else {
        return;
    };
    let Some(mut nats) = NatsCluster::start(test, 3).await else {
        return;
    };
    let database = postgres::create_database(&pg).await;
    let store = common::postgres_store(&pg.url(&database));
    let root = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = NODES.iter().map(|node| root.path().join(node)).collect();
    let mut relays: Vec<Option<RelayProcess>> = Vec::new();
    for (dir, node) in dirs.iter().zip(NODES) {
        std::fs::create_dir_all(dir).unwrap();
        let config = format!(
            "{store}[cluster]\nnode = \"{node}\"\nnats_urls = {}\nfallback_interval = \"500ms\"\n",
            nats.urls_toml()
        );
        std::fs::write(dir.join(common::STORE_FILE), config).unwrap();
        // The first node makes the admin key; the others find the keys in the database.
        if let Some(Some(first)) = relays.first() {
            std::fs::write(dir.join("admin.key"), first.admin_token()).unwrap();
        }
        relays.push(Some(RelayProcess::spawn(dir)));
    }
    let urls: Vec<String> = relays.iter().flatten().map(|r| r.url.clone()).collect();
    let addrs: Vec<SocketAddr> = urls
        .iter()
        .map(|url| url.trim_start_matches("http://").parse().unwrap())
        .collect();
    let http = chaos::http_client();
    for url in &urls {
        eventually(Duration::from_secs(14), || async {
            metric_at(&http, url, "syncrelay_cluster_nats_connected").await == Some(1.0)
        })
        .await;
    }
    let admin = relays[0].as_ref().unwrap().admin_token();
    let daemon_body = json!({ "role": "daemon", "daemon": DAEMON });
    let daemon_key = create_key(&urls[0], &admin, daemon_body).await;
    let client_body = json!({ "role": "client", "scope": [DAEMON] });
    let client_key = create_key(&urls[0], &admin, client_body).await;
    let daemon = Arc::new(TestDaemon::start().await);
    let _agent = TestAgent::start(
        &urls.join(","),
        DAEMON,
        &daemon_key,
        &daemon.target,
        RawAgent {
            request_timeout: Some("10s".into()),
            ..RawAgent::default()
        },
    );
    let balancer = Proxy::start(addrs[0]).await;
    common::Client {
        url: urls[0].clone(),
        key: client_key.clone(),
        http: http.clone(),
    }
    .await_online(DAEMON)
    .await;

    let ledger = Arc::new(Ledger::default());
    let stop = CancellationToken::new();
    let tasks = chaos::spawn_workload(&balancer.url, &client_key, &daemon, &ledger, &stop);
    let steps = chaos::env_count("SYNCRELAY_CLUSTER_CHAOS", 30);
    let started = Instant::now();
    let (mut relay_kills, mut nats_kills, mut pg_restarts) = (0, 0, 0);
    let mut serving = 0;
    for step in 0..steps {
        // Fresh progress first: writes acknowledged and events logged since the last step.
        let writes = ledger.acknowledged_writes();
        let logged = chaos::log_len(&http, &balancer.url, &client_key).await;
        let (url, key, http_ref, ledger_ref) = (&balancer.url, &client_key, &http, &ledger);
        eventually(Duration::from_secs(90), || async move {
            ledger_ref.acknowledged_writes() >= writes + 5
                && chaos::log_len(http_ref, url, key).await >= logged + 5
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rand::thread_rng().gen_range(0..200))).await;
        // Killing, restarting and waiting for processes blocks: off the runtime's two
        // workers, which carry the agent, the daemon and the workload meanwhile.
        match step % 3 {
            0 => {
                let node = rand::thread_rng().gen_range(0..NODES.len());
                if serving == node {
                    serving = (node + 1) % NODES.len();
                    balancer.switch(Some(addrs[serving]));
                }
                let relay = relays[node].take().unwrap();
                blocking(move || relay.kill()).await;
                tokio::time::sleep(downtime()).await;
                let (dir, listen) = (dirs[node].clone(), addrs[node].to_string());
                let relay = blocking(move || RelayProcess::spawn_at(&dir, &listen)).await;
                relays[node] = Some(relay);
                relay_kills += 1;
            }
            1 => {
                let server = rand::thread_rng().gen_range(0..3);
                nats.kill(server);
                tokio::time::sleep(downtime()).await;
                nats.restart(server).await;
                nats_kills += 1;
            }
            _ => {
                let cluster = pg.clone();
                blocking(move || cluster.stop_immediate()).await;
                tokio::time::sleep(downtime()).await;
                let cluster = pg.clone();
                blocking(move || cluster.start_again()).await;
                pg_restarts += 1;
            }
        }
        // The clients move on to the next node (their open connections are cut).
        serving = (serving + 1) % NODES.len();
        balancer.switch(Some(addrs[serving]));
    }
    chaos::stop_workload(stop, tasks).await;
    let checked = chaos::check(&urls[0], &client_key, &daemon, &ledger, true).await;
    assert!(
        checked.writes > 0 && checked.events > 0 && checked.streams > 0,
        "the workload ran through the chaos: {checked:?}"
    );
    eprintln!(
        "cluster chaos: {steps} steps in {:.0} s ({relay_kills} relay node kills, {nats_kills} \
         NATS server kills, {pg_restarts} PostgreSQL restarts); {} client retries; checked \
         {checked:?}; lost 0",
        started.elapsed().as_secs_f64(),
        ledger.retries.load(std::sync::atomic::Ordering::Relaxed),
    );
}
