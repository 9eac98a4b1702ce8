//! The throwaway PostgreSQL cluster of `tests/common/postgres.rs`, on which the PostgreSQL
//! backend's tests and benchmarks stand: it runs with the durability settings the relay
//! demands (PostgreSQL 15 or newer, `fsync` and `synchronous_commit` on), it is reachable
//! on loopback only, and a committed row survives an immediate stop (what a crash leaves)
//! and a restart, while the server refuses connections in between.

mod common;

use common::postgres::PgCluster;
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
