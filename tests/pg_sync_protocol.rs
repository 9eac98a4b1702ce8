//! The sync protocol suite (`tests/sync_protocol.rs`) again, its relays on PostgreSQL: the same
//! tests, the same guarantees. `common::on_postgres` knows this binary by its `pg_` name.

#[path = "sync_protocol.rs"]
mod suite;
