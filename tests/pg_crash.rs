//! The crash suite (`tests/crash.rs`) again, its relays on PostgreSQL: SIGKILLs of the
//! relay (and of the agent) lose nothing acknowledged there either. Short runs in CI; the
//! long ones are `cargo test --release --test pg_crash -- --ignored`.

#[path = "crash.rs"]
mod suite;
