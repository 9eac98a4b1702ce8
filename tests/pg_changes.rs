//! The changes suite (`tests/changes.rs`) again, its relays on PostgreSQL: the same
//! tests, the same guarantees. `common::on_postgres` knows this binary by its `pg_` name.

#[path = "changes.rs"]
mod suite;
