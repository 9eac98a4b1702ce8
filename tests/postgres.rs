//! The throwaway PostgreSQL cluster of `tests/common/postgres.rs`, on which the PostgreSQL
//! backend's tests and benchmarks stand: it runs with the durability settings the relay
//! demands (PostgreSQL 15 or newer, `fsync` and `synchronous_commit` on), it is reachable
//! on loopback only, and a committed row survives an immediate stop (what a crash leaves)
//! and a restart, while the server refuses connections in between. And the PostgreSQL
//! backend's foundation on it: migrations (a database of an older schema upgraded with its
//! rows), the refusal of a server whose COMMIT does not wait for the disk, and the lock
//! that keeps the retention sweep to one relay node at a time.

mod common;

use common::postgres::PgCluster;
use syncrelay::store::postgres::{self, PgError, PgSettings, MIGRATIONS};
use tokio_postgres::NoTls;

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throwaway_cluster_is_durable_and_survives_an_immediate_stop() {
    let test = "a_throwaway_cluster_is_durable_and_survives_an_immediate_stop";
    let Some(cluster) = PgCluster::start(test) else {
        return;
    };
    let url = cluster.url("postgres");
    let client = connect(&url)
        .await
        .expect("the cluster accepts connections");
    for (setting, wanted) in [("fsync", "on"), ("synchronous_commit", "on")] {
        let row = client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), wanted, "{setting}");
    }
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    assert!(version >= 150_000, "PostgreSQL 15 or newer, not {version}");
    let listen: String = client
        .query_one("SHOW listen_addresses", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(listen, "127.0.0.1");

    client
        .batch_execute("CREATE TABLE commands (id bigint PRIMARY KEY, body bytea NOT NULL)")
        .await
        .unwrap();
    let insert = client
        .prepare("INSERT INTO commands (id, body) VALUES ($1, $2)")
        .await
        .unwrap();
    for id in 0..100_i64 {
        client
            .execute(&insert, &[&id, &vec![id as u8; 256]])
            .await
            .unwrap();
    }
    drop(client);

    cluster.stop_immediate();
    assert!(
        connect(&url).await.is_err(),
        "a stopped cluster refuses connections"
    );
    cluster.start_again();
    let client = connect(&url).await.expect("the cluster is back");
    let rows = client
        .query("SELECT id, body FROM commands ORDER BY id", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 100, "every committed row survived");
    for (index, row) in rows.iter().enumerate() {
        assert_eq!(row.get::<_, i64>(0), index as i64);
        assert_eq!(row.get::<_, Vec<u8>>(1), vec![index as u8; 256]);
    }
}

fn settings(url: String, allow_unsafe_durability: bool) -> PgSettings {
    PgSettings {
        url,
        pool_size: 4,
        statement_timeout: std::time::Duration::from_secs(10),
        allow_unsafe_durability,
        node: None,
    }
}

/// The schema is created once (a second start finds it current), with every table of the
/// domain; a database whose schema is newer than the binary is refused, and nothing of it
/// is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_create_the_schema_once_and_refuse_a_newer_database() {
    let test = "migrations_create_the_schema_once_and_refuse_a_newer_database";
    let Some(cluster) = PgCluster::start(test) else {
        return;
    };
    let settings = settings(cluster.url("postgres"), false);
    let pool = postgres::open(&settings).await.expect("a fresh database");
    let client = pool.get().await.unwrap();
    let versions: Vec<i32> = client
        .query("SELECT version FROM syncrelay_schema ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(versions, (1..=MIGRATIONS.len() as i32).collect::<Vec<_>>());
    for table in [
        "daemons",
        "keys",
        "commands",
        "changes",
        "contexts",
        "context_chunks",
        "responses",
    ] {
        let found: Option<String> = client
            .query_one("SELECT to_regclass($1)::text", &[&table])
            .await
            .unwrap()
            .get(0);
        assert_eq!(found.as_deref(), Some(table), "table {table}");
    }
    drop(client);
    drop(pool);

    // Again: nothing to do, the same versions.
    let pool = postgres::open(&settings).await.expect("a current database");
    let client = pool.get().await.unwrap();
    let count: i64 = client
        .query_one("SELECT count(*) FROM syncrelay_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, MIGRATIONS.len() as i64);

    // A newer binary migrated this database: this one must not touch it.
    client
        .execute("INSERT INTO syncrelay_schema (version) VALUES (999)", &[])
        .await
        .unwrap();
    drop(client);
    drop(pool);
    let err = postgres::open(&settings).await.expect_err("a newer schema");
    assert!(
        matches!(err, PgError::NewerSchema { database: 999, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("newer than this binary"), "{err}");
}

/// A server whose COMMIT would not wait for the disk is refused, with the setting named,
/// unless the operator allows it; the relay's own sessions commit synchronously even where
/// the database says otherwise; the password never appears in an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_durability_is_refused_unless_allowed() {
    let test = "unsafe_durability_is_refused_unless_allowed";
    let Some(cluster) = PgCluster::start(test) else {
        return;
    };
    let admin = connect(&cluster.url("postgres")).await.unwrap();
    // As a database's setting (the server's own is fixed on its command line).
    admin
        .batch_execute("ALTER DATABASE postgres SET synchronous_commit = off")
        .await
        .unwrap();
    let session = connect(&cluster.url("postgres")).await.unwrap();
    let value: String = session
        .query_one("SHOW synchronous_commit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(value, "off", "a new session sees the database's setting");

    // A server whose sessions would commit asynchronously is refused, naming the
    // setting, unless the operator allows it.
    let err = postgres::check_server(&session, false)
        .await
        .expect_err("synchronous_commit = off is refused");
    assert!(
        matches!(
            err,
            PgError::UnsafeDurability {
                setting: "synchronous_commit",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("allow_unsafe_durability"), "{err}");
    postgres::check_server(&session, true)
        .await
        .expect("allowed by the operator");
    // The relay's own sessions commit synchronously whatever the database says.
    let pool = postgres::open(&settings(cluster.url("postgres"), false))
        .await
        .expect("the relay's sessions override the database's setting");
    let value: String = pool
        .get()
        .await
        .unwrap()
        .query_one("SHOW synchronous_commit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(value, "on", "a pooled session commits synchronously");

    // A wrong password is reported with the URL, never the password.
    let url = format!(
        "postgres://nobody:s3cret@127.0.0.1:{}/postgres?connect_timeout=5",
        cluster.port
    );
    let err = postgres::open(&settings(url, false))
        .await
        .expect_err("no such role");
    assert!(!err.to_string().contains("s3cret"), "{err}");
    assert!(err.to_string().contains("nobody:***@"), "{err}");
}

/// A store on `url` as relay node `node` would open it.
async fn node_store(url: String, node: &str) -> syncrelay::store::Store {
    let settings = PgSettings {
        node: Some(node.to_owned()),
        ..settings(url, false)
    };
    syncrelay::store::Store::open(&syncrelay::store::StoreSettings::Postgres(settings))
        .await
        .expect("PostgreSQL opens")
}

/// A database of schema 1 (before nodes were stored), with a daemon in it, is upgraded
/// at start; the daemon is kept, held by no node until it connects, then by the node it
/// connected to last. Last-seen times only move forward.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_schema_is_upgraded_and_each_connect_names_its_node() {
    let test = "an_older_schema_is_upgraded_and_each_connect_names_its_node";
    let Some(cluster) = common::postgres::shared(test) else {
        return;
    };
    let database = common::postgres::create_database(cluster).await;
    let url = cluster.url(&database);
    let client = connect(&url).await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE TABLE syncrelay_schema (version integer PRIMARY KEY, \
             applied_at timestamptz NOT NULL DEFAULT now()); {} \
             INSERT INTO syncrelay_schema (version) VALUES (1); \
             INSERT INTO daemons (daemon_id, version, created_ms, last_seen_ms) \
             VALUES ('old', '0.9', 5, 7);",
            MIGRATIONS[0]
        ))
        .await
        .unwrap();
    let a = node_store(url.clone(), "a").await;
    let version: i32 = client
        .query_one("SELECT max(version) FROM syncrelay_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, MIGRATIONS.len() as i32);
    let old = a.daemon("old").await.unwrap().expect("kept by the upgrade");
    assert_eq!(
        (old.version.as_deref(), old.last_seen_ms, old.node),
        (Some("0.9"), Some(7), None)
    );

    a.connect_daemon("old", None, vec![], "c1", 1_000)
        .await
        .unwrap();
    assert_eq!(
        a.daemon("old").await.unwrap().unwrap().node.as_deref(),
        Some("a")
    );
    // It moves to node b; a late last-seen time from node a changes nothing.
    let b = node_store(url.clone(), "b").await;
    b.connect_daemon("old", None, vec![], "c2", 2_000)
        .await
        .unwrap();
    b.touch_daemon("old", 3_000).await.unwrap();
    a.touch_daemon("old", 2_500).await.unwrap();
    let moved = a.daemon("old").await.unwrap().unwrap();
    assert_eq!(
        (moved.node.as_deref(), moved.last_seen_ms),
        (Some("b"), Some(3_000))
    );
    // Nor does one from a node whose clock runs ahead: only a connect moves the daemon.
    a.touch_daemon("old", 4_000).await.unwrap();
    let still = a.daemon("old").await.unwrap().unwrap();
    assert_eq!(
        (still.node.as_deref(), still.last_seen_ms),
        (Some("b"), Some(4_000))
    );
}

/// While one node holds the maintenance lock, another node's sweep is skipped (nothing
/// removed); once it is released, the sweep runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_at_a_time_runs_the_retention_sweep() {
    let test = "one_node_at_a_time_runs_the_retention_sweep";
    let Some(cluster) = common::postgres::shared(test) else {
        return;
    };
    let database = common::postgres::create_database(cluster).await;
    let url = cluster.url(&database);
    let store = node_store(url.clone(), "a").await;
    store.ensure_daemon("d", 0).await.unwrap();
    let updates = (1..=10)
        .map(|n| syncrelay::store::NewChange {
            kind: "e".into(),
            timestamp_ms: None,
            data_json: "{}".into(),
            daemon_seq: Some(n),
        })
        .collect();
    store.append_changes("d", updates, 0).await.unwrap();
    let work = || syncrelay::store::Maintenance {
        retention: syncrelay::store::RetentionPolicy {
            changes_max_entries: 4,
            changes_max_age_ms: 1_000_000,
            results_max_age_ms: 1_000_000,
            responses_max_age_ms: 1_000_000,
        },
        context_ttl_ms: 1_000_000,
        contexts_max_bytes: 1 << 30,
        context_garbage_grace_ms: 1_000,
        census_interval: std::time::Duration::from_secs(60),
    };
    // Node b sweeping: its session holds the lock.
    let other = connect(&url).await.unwrap();
    let held: bool = other
        .query_one(
            "SELECT pg_try_advisory_lock($1)",
            &[&postgres::MAINTENANCE_LOCK],
        )
        .await
        .unwrap()
        .get(0);
    assert!(held);
    assert!(
        store.maintain(work(), 1_000).await.unwrap().is_none(),
        "skipped while another node sweeps"
    );
    let kept = store.changes_page("d", 0, 100, usize::MAX).await.unwrap();
    assert_eq!(kept.len(), 10, "nothing removed by the skipped sweep");
    other
        .query_one(
            "SELECT pg_advisory_unlock($1)",
            &[&postgres::MAINTENANCE_LOCK],
        )
        .await
        .unwrap();
    let (stats, _) = store
        .maintain(work(), 1_000)
        .await
        .unwrap()
        .expect("runs once the lock is free");
    assert_eq!(stats.changes_removed, 6);
}
