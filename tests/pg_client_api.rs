//! The client api suite (`tests/client_api.rs`) again, its relays on PostgreSQL: the same
//! tests, the same guarantees. `common::on_postgres` knows this binary by its `pg_` name.

#[path = "client_api.rs"]
mod suite;
