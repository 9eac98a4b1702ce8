//! syncrelay: a durable store-and-forward relay between remote clients and daemons behind
//! NAT.
//!
//! - [`config`]: `config.toml` → validated [`config::Config`].
//! - [`protocol`]: the JSON wire types of the sync protocol and the client API.
//! - [`store`]: the sled database behind a domain API, with group commit.
//! - [`relay`]: the HTTP server: sync handlers for daemons, the mirrored client API,
//!   change-log feeds, admin endpoints, and the in-memory hub that wakes waiting requests.
//! - [`cli`]: the `syncrelay` command line; `src/main.rs` only parses it and calls in.
//! - [`admin`]: the operator CLI (`syncrelay keys …`) talking to a running relay.
//! - [`init`]: `syncrelay init --self-signed`, a quick-start certificate and config.
//! - [`metrics`]: the Prometheus histogram behind `/metrics`.
//! - [`files`]: atomic, permission-safe file writes.
//!
//! Data flow: a client request becomes a command in the store (committed to disk before
//! any acknowledgement), the hub wakes the daemon's waiting poll, the daemon posts the
//! result, the store commits it, and the hub wakes the client still waiting for it.
#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod cli;
pub mod config;
pub mod files;
pub mod init;
pub mod metrics;
pub mod protocol;
pub mod relay;
pub mod store;
