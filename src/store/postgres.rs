//! The PostgreSQL backend's foundation (issue 20, first steps): connecting through a pool,
//! the checks a server must pass before the relay trusts it with acknowledged data, and
//! the schema, created and upgraded by versioned migrations embedded in the binary.
//!
//! - **Client.** `tokio-postgres` with a `deadpool-postgres` pool: plain async, prepared
//!   statements, binary `bytea`, no compile-time database (sqlx's checked queries need a
//!   live database or a prepared offline cache at build time, which `cargo build` on a
//!   fresh clone must not), and both are small and well kept.
//! - **Checks.** PostgreSQL 15 or newer; `fsync` and `synchronous_commit` on (so `COMMIT`
//!   returns only once the WAL is on disk), unless the operator sets
//!   `allow_unsafe_durability`.
//! - **Migrations.** `syncrelay_schema` holds the version; the pending migrations run in
//!   one transaction under an advisory lock (several relays may start at once); a
//!   database newer than this binary is refused, never written.
//!
//! Nothing starts a relay on this backend yet: the store's domain API over it is the next
//! step of issue 20.

mod backend;
mod inserter;

use std::time::Duration;

pub use backend::PgStore;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

/// The migrations, in order: version `n` is `MIGRATIONS[n - 1]`.
pub const MIGRATIONS: &[&str] = &[
    include_str!("postgres/0001_schema.sql"),
    include_str!("postgres/0002_holder.sql"),
];

/// The advisory lock migrations take (any fixed number; "syncrelay" in ASCII, truncated).
const MIGRATION_LOCK: i64 = 0x7379_6e63_7265_6c61;
/// The advisory lock the retention sweep and census hold: one relay node at a time.
pub const MAINTENANCE_LOCK: i64 = 0x7379_6e63_7377_6570;

/// Oldest server accepted, as `server_version_num`.
const MIN_SERVER_VERSION: i32 = 150_000;

/// How to reach the database. `Debug` never shows the password.
#[derive(Clone)]
pub struct PgSettings {
    /// A libpq-style URL or key=value string.
    pub url: String,
    pub pool_size: usize,
    /// Each statement's limit on the server (`statement_timeout`).
    pub statement_timeout: Duration,
    /// Accept a server with `fsync` or `synchronous_commit` off.
    pub allow_unsafe_durability: bool,
    /// In a cluster, this node's name: stored with each daemon's connect and last-seen
    /// time, so every node can say which node holds a daemon.
    pub node: Option<String>,
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSettings")
            .field("url", &redacted(&self.url))
            .field("pool_size", &self.pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .field("allow_unsafe_durability", &self.allow_unsafe_durability)
            .field("node", &self.node)
            .finish()
    }
}

/// Where `url` leads, for messages: `user@host:port/dbname` as the driver parses it, and
/// never the password, wherever the string carries it (userinfo, `?password=`, or
/// key=value with quotes and escapes).
pub fn redacted(url: &str) -> String {
    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
        return "<unparseable connection string>".to_owned();
    };
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(index, host)| {
            let host = match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            match config.get_ports().get(index).or(config.get_ports().first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    let password = if config.get_password().is_some() {
        ":***"
    } else {
        ""
    };
    format!(
        "postgres://{}{password}@{}/{}",
        config.get_user().unwrap_or(""),
        hosts.join(","),
        config.get_dbname().unwrap_or("")
    )
}

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("PostgreSQL at {url}: {message}")]
    Connect { url: String, message: String },
    #[error(
        "PostgreSQL {found} is too old: syncrelay needs PostgreSQL 15 or newer \
         (server_version_num {MIN_SERVER_VERSION})"
    )]
    TooOld { found: String },
    #[error(
        "PostgreSQL has {setting} = {value}: a COMMIT would return before the data is on \
         disk, so the relay could acknowledge what a crash loses. Set {setting} = on, or \
         `allow_unsafe_durability = true` in [store] to run anyway"
    )]
    UnsafeDurability {
        setting: &'static str,
        value: String,
    },
    #[error(
        "the database's syncrelay schema is version {database}, newer than this binary's \
         {binary}: upgrade syncrelay (nothing was written)"
    )]
    NewerSchema { database: i32, binary: i32 },
    #[error("PostgreSQL: {0}")]
    Query(String),
}

impl From<tokio_postgres::Error> for PgError {
    fn from(err: tokio_postgres::Error) -> PgError {
        PgError::Query(error_text(&err))
    }
}

/// The driver's error with the server's own message (its `Display` alone says only
/// "db error").
pub(crate) fn error_text(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(err) {
            Some(source) => format!("{err}: {source}"),
            None => err.to_string(),
        },
    }
}

impl From<deadpool_postgres::PoolError> for PgError {
    fn from(err: deadpool_postgres::PoolError) -> PgError {
        PgError::Query(err.to_string())
    }
}

fn connect_error(settings: &PgSettings, message: String) -> PgError {
    PgError::Connect {
        url: redacted(&settings.url),
        message,
    }
}

/// The connection string as the driver takes it, with a 10 s connect timeout unless it
/// names one.
fn parsed(settings: &PgSettings) -> Result<tokio_postgres::Config, PgError> {
    let mut config: tokio_postgres::Config = settings
        .url
        .parse()
        .map_err(|err: tokio_postgres::Error| connect_error(settings, err.to_string()))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    Ok(config)
}

/// A pool to a database that passed the checks and holds this binary's schema.
pub async fn open(settings: &PgSettings) -> Result<Pool, PgError> {
    let connect_error = |message: String| connect_error(settings, message);
    let mut config = parsed(settings)?;
    // Each session commits synchronously whatever a role or database setting says (the
    // start-up check reads one session; this holds for every pooled one).
    let mut options = config.get_options().unwrap_or("").to_owned();
    options.push_str(&format!(
        " -c statement_timeout={}",
        settings.statement_timeout.as_millis()
    ));
    if !settings.allow_unsafe_durability {
        options.push_str(" -c synchronous_commit=on");
    }
    // The backend's transactions are written for read committed (their row locks order
    // them), whatever default a role or database sets.
    options.push_str(" -c default_transaction_isolation=read\\ committed");
    config.options(options.trim());
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(settings.pool_size.max(1))
        .build()
        .map_err(|err| connect_error(err.to_string()))?;
    let mut client = pool
        .get()
        .await
        .map_err(|err| connect_error(err.to_string()))?;
    check_server(&client, settings.allow_unsafe_durability).await?;
    migrate(&mut client).await?;
    Ok(pool)
}

/// What `syncrelay config check` says of the database: it connects, passes the server
/// checks, and holds a schema this binary can use. Writes nothing.
pub async fn probe(settings: &PgSettings) -> Result<String, PgError> {
    let (client, connection) = parsed(settings)?
        .connect(NoTls)
        .await
        .map_err(|err| connect_error(settings, error_text(&err)))?;
    let connection = tokio::spawn(connection);
    let checked = async {
        check_server(&client, settings.allow_unsafe_durability).await?;
        let exists: bool = client
            .query_one("SELECT to_regclass('syncrelay_schema') IS NOT NULL", &[])
            .await?
            .get(0);
        let version: Option<i32> = match exists {
            true => client
                .query_one("SELECT max(version) FROM syncrelay_schema", &[])
                .await?
                .get(0),
            false => None,
        };
        let binary = MIGRATIONS.len() as i32;
        Ok(match version {
            Some(database) if database > binary => {
                return Err(PgError::NewerSchema { database, binary })
            }
            Some(database) if database == binary => {
                format!("{}: schema {database}", redacted(&settings.url))
            }
            Some(database) => format!(
                "{}: schema {database}, migrated to {binary} at start",
                redacted(&settings.url)
            ),
            None => format!(
                "{}: no syncrelay schema yet, created at start",
                redacted(&settings.url)
            ),
        })
    }
    .await;
    drop(client);
    let _ = connection.await;
    checked
}

/// PostgreSQL 15+, and `fsync` and `synchronous_commit` on unless allowed otherwise.
pub async fn check_server(
    client: &tokio_postgres::Client,
    allow_unsafe_durability: bool,
) -> Result<(), PgError> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version'), \
             current_setting('fsync'), current_setting('synchronous_commit')",
            &[],
        )
        .await?;
    let (number, version): (i32, String) = (row.get(0), row.get(1));
    if number < MIN_SERVER_VERSION {
        return Err(PgError::TooOld { found: version });
    }
    for (index, setting) in [(2, "fsync"), (3, "synchronous_commit")] {
        let value: String = row.get(index);
        // `remote_write`, `remote_apply` and `local` also wait for the local WAL flush.
        if value == "off" && !allow_unsafe_durability {
            return Err(PgError::UnsafeDurability { setting, value });
        }
        if value == "off" {
            tracing::warn!(
                setting,
                "PostgreSQL durability is off: allow_unsafe_durability"
            );
        }
    }
    Ok(())
}

/// Brings the schema to this binary's version; returns it.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<i32, PgError> {
    let binary = MIGRATIONS.len() as i32;
    // Read committed, so that a relay that waited for the lock sees what the one before
    // it committed; no statement timeout, so a long migration (or the wait) can finish.
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
        .start()
        .await?;
    tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    // Created only when missing: a role that may not create tables starts on a current
    // database (PostgreSQL checks the privilege before `IF NOT EXISTS`).
    let exists: bool = tx
        .query_one("SELECT to_regclass('syncrelay_schema') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        tx.batch_execute(
            "CREATE TABLE syncrelay_schema (
                 version    integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await?;
    }
    let database: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM syncrelay_schema",
            &[],
        )
        .await?
        .get(0);
    if database > binary {
        return Err(PgError::NewerSchema { database, binary });
    }
    for version in database + 1..=binary {
        tx.batch_execute(MIGRATIONS[version as usize - 1]).await?;
        tx.execute(
            "INSERT INTO syncrelay_schema (version) VALUES ($1)",
            &[&version],
        )
        .await?;
        tracing::info!(version, "PostgreSQL schema migrated");
    }
    tx.commit().await?;
    Ok(binary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        for (url, shown) in [
            (
                "postgres://relay:s3cret@db.example:5432/syncrelay?sslmode=require",
                "postgres://relay:***@db.example:5432/syncrelay",
            ),
            (
                "postgres://relay@db/syncrelay",
                "postgres://relay@db:5432/syncrelay",
            ),
            (
                "postgres://relay@db/x?password=s3cret",
                "postgres://relay:***@db:5432/x",
            ),
            (
                "postgres://relay:s3/c?ret@db/x",
                "postgres://relay:***@db:5432/x",
            ),
            (
                "host=db user=relay password = s3cret dbname=x",
                "postgres://relay:***@db/x",
            ),
            (
                "host=db user=relay password='s3 cret' dbname=x",
                "postgres://relay:***@db/x",
            ),
            ("not a url s3cret://", "<unparseable connection string>"),
        ] {
            let shown_now = redacted(url);
            assert_eq!(shown_now, shown, "{url}");
            assert!(!shown_now.contains("s3"), "{url}");
        }
        let settings = PgSettings {
            url: "postgresql://relay:s3cret@db/syncrelay".into(),
            pool_size: 4,
            statement_timeout: Duration::from_secs(5),
            allow_unsafe_durability: false,
            node: None,
        };
        assert!(!format!("{settings:?}").contains("s3cret"));
    }
}
