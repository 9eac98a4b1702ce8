//! The command line of the `syncrelay` binary (`serve`, `agent`, `keys`, `status`,
//! `backup`, `init`, `config check`): its arguments, and what each command does with the
//! library. `src/main.rs` parses the arguments and hands the command to [`dispatch`].

use std::io::IsTerminal;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::agent::{split_urls, Agent, RawAgent};
use crate::config::{Config, LogFormat, RawConfig};
use crate::{admin, relay};

#[derive(Parser)]
#[command(
    name = "syncrelay",
    version,
    about = "A durable relay for daemons behind NAT"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the relay.
    Serve {
        /// Config file (default: ./config.toml when present, else built-in defaults).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address, overriding server.listen.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Data directory, overriding server.data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Make a local HTTP daemon reachable through a relay.
    Agent {
        /// Config file with an [agent] section.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Relay URL (http:// or https://); a cluster's nodes: repeat the flag, or separate
        /// them with commas. The agent moves to the next when it cannot connect.
        #[arg(long)]
        relay: Vec<String>,
        #[arg(long)]
        daemon_id: Option<String>,
        /// The daemon key (prefer --key-file or SYNCRELAY_AGENT_KEY: flags show in `ps`).
        #[arg(long, env = "SYNCRELAY_AGENT_KEY", hide_env_values = true)]
        key: Option<String>,
        #[arg(long, conflicts_with = "key")]
        key_file: Option<PathBuf>,
        /// The URL standing for the daemon's /api/v1 (default http://127.0.0.1:7777/api/v1).
        #[arg(long)]
        target: Option<String>,
        /// The daemon's SSE path relative to the target (default stream/events; "" disables).
        #[arg(long)]
        events: Option<String>,
        /// Where the outbox and recent results live (default ./agent-state).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// `stream` (default: one HTTP/2 stream, long polling when the relay lacks it) or
        /// `poll` (long polling always).
        #[arg(long, value_parser = ["stream", "poll"])]
        sync: Option<String>,
    },
    /// Manage API keys on a running relay.
    Keys {
        #[command(flatten)]
        target: RelayTarget,
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Show the daemons of a running relay.
    Status {
        #[command(flatten)]
        target: RelayTarget,
    },
    /// Copy a running relay's database, consistently, into a new directory on the relay's
    /// host (writes pause while entries are copied). Restore by starting a relay on it.
    Backup {
        #[command(flatten)]
        target: RelayTarget,
        /// The directory to create (or an empty one), as a path on the relay's host.
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
    },
    /// Write a quick-start TLS setup: a self-signed certificate and key for HOSTNAME, and
    /// a config serving HTTPS with them.
    Init {
        /// The name (or IP address) clients will use to reach the relay.
        #[arg(long, value_name = "HOSTNAME")]
        self_signed: String,
        /// Directory for cert.pem, key.pem, config.toml and data/.
        #[arg(long, default_value = "syncrelay")]
        dir: PathBuf,
        /// The address the config listens on.
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: SocketAddr,
        /// Replace files that already exist.
        #[arg(long)]
        force: bool,
    },
    /// Work with the config file.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Args)]
pub struct RelayTarget {
    /// Config file naming the relay's address and data dir.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Relay URL (default: http:// + server.listen).
    #[arg(long, global = true)]
    url: Option<String>,
    /// Data dir holding admin.key (default: server.data_dir).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum KeysAction {
    /// Create a key; its token is printed alone on the last line.
    Create {
        #[arg(long, value_parser = ["daemon", "client", "admin"])]
        role: String,
        /// The daemon id a daemon key acts as.
        #[arg(long)]
        daemon: Option<String>,
        /// Daemon ids a client key may reach, comma-separated, or "*".
        #[arg(long)]
        scope: Option<String>,
        #[arg(long)]
        label: Option<String>,
    },
    /// List keys (never their tokens).
    List,
    /// Revoke a key at once.
    Revoke { key_id: String },
}

#[derive(Subcommand)]
pub enum ConfigAction {
    /// Validate a config file and report every problem.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// Runs one command of the command line.
pub async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve {
            config,
            listen,
            data_dir,
        } => {
            // The flags go in before validation, which checks the address served.
            let (mut raw, origin) = load_raw(config.as_deref())?;
            if let Some(listen) = listen {
                raw.server.listen = Some(listen.to_string());
            }
            if let Some(data_dir) = data_dir {
                raw.server.data_dir = Some(data_dir);
            }
            let config = raw.validate(&origin)?;
            init_tracing(config.server.log_format);
            serve(config).await
        }
        Command::Agent {
            config,
            relay,
            daemon_id,
            key,
            key_file,
            target,
            events,
            state_dir,
            sync,
        } => {
            let mut raw = match &config {
                Some(path) => RawAgent::from_file(path)?,
                None => RawAgent::default(),
            };
            let origin =
                config.map_or_else(|| "command line".to_owned(), |p| p.display().to_string());
            if !relay.is_empty() {
                let urls = relay.iter().flat_map(|text| split_urls(text)).collect();
                raw.relay = Some(urls);
            }
            raw.daemon_id = daemon_id.or(raw.daemon_id);
            if key.is_some() || key_file.is_some() {
                raw.key = key;
                raw.key_file = key_file;
            }
            raw.target = target.or(raw.target);
            raw.events = events.or(raw.events);
            raw.state_dir = state_dir.or(raw.state_dir);
            raw.sync = sync.or(raw.sync);
            let config = raw.validate(&origin)?;
            init_tracing(LogFormat::Text);
            tracing::info!(relays = ?config.relays.iter().map(reqwest::Url::as_str).collect::<Vec<_>>(), daemon_id = %config.daemon_id, target = %config.target, "agent starting");
            crate::store::exit_on_storage_failure();
            Agent::for_http_target(config)?
                .run(shutdown_signal())
                .await?;
            Ok(())
        }
        Command::Keys { target, action } => {
            let client = admin_client(&target)?;
            match action {
                KeysAction::Create {
                    role,
                    daemon,
                    scope,
                    label,
                } => {
                    let scope = scope.map(|s| s.split(',').map(|p| p.trim().to_owned()).collect());
                    let key = client
                        .create_key(&role, daemon.as_deref(), scope, label.as_deref())
                        .await?;
                    let target = key.daemon.clone().unwrap_or_else(|| key.scope.join(","));
                    println!("created {} key {} ({target})", key.role, key.key_id);
                    println!("{}", key.token.unwrap_or_default());
                }
                KeysAction::List => print!("{}", admin::format_keys(&client.list_keys().await?)),
                KeysAction::Revoke { key_id } => {
                    client.revoke_key(&key_id).await?;
                    println!("revoked {key_id}");
                }
            }
            Ok(())
        }
        Command::Status { target } => {
            let client = admin_client(&target)?;
            // The cluster's head line is a bonus: the table does not depend on it.
            if let Ok(stats) = client.stats().await {
                print!("{}", admin::format_cluster(&stats));
            }
            print!("{}", admin::format_daemons(&client.daemons().await?));
            Ok(())
        }
        Command::Backup { target, to } => {
            let client = admin_client(&target)?;
            let to = std::path::absolute(&to)?;
            let mut bar = admin::ProgressBar::new(std::io::stderr().is_terminal());
            let done = client
                .backup(&to, |line| {
                    bar.show(
                        line["copied_bytes"].as_u64().unwrap_or(0),
                        line["estimated_bytes"].as_u64().unwrap_or(0),
                    )
                })
                .await;
            bar.finish();
            let done = done?;
            println!(
                "backed up {} entries ({}) to {} in {} ms (writes paused {} ms)",
                done["entries"],
                admin::human_bytes(done["bytes"].as_u64().unwrap_or(0)),
                to.display(),
                done["elapsed_ms"],
                done["writes_paused_ms"],
            );
            println!("restore: syncrelay serve --data-dir {}", to.display());
            Ok(())
        }
        Command::Init {
            self_signed,
            dir,
            listen,
            force,
        } => {
            let written = crate::init::self_signed(&self_signed, &dir, listen, force)?;
            println!(
                "wrote {}, {} and {}",
                written.cert.display(),
                written.key.display(),
                written.config.display()
            );
            println!(
                "start the relay:  syncrelay serve --config {}",
                written.config.display()
            );
            println!(
                "agents and clients trust {} (e.g. relay_ca = {:?} in [agent])",
                written.cert.display(),
                written.cert.display().to_string()
            );
            Ok(())
        }
        Command::Config {
            action: ConfigAction::Check { config },
        } => {
            let path = config.unwrap_or_else(|| PathBuf::from("config.toml"));
            let config = Config::from_file(&path)?;
            config
                .check_serving()
                .map_err(|problem| anyhow::anyhow!("{}: {problem}", path.display()))?;
            if let crate::config::StoreBackend::Postgres(pg) = &config.store {
                let database = crate::store::postgres::probe(pg)
                    .await
                    .map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))?;
                println!("{database}");
            }
            println!("{}: ok", path.display());
            Ok(())
        }
    }
}

/// `--config`, else `./config.toml` when present, else the built-in defaults; unvalidated,
/// with the name to report problems under.
fn load_raw(path: Option<&Path>) -> anyhow::Result<(RawConfig, PathBuf)> {
    let path = match path {
        Some(path) => path,
        None if Path::new("config.toml").exists() => Path::new("config.toml"),
        None => return Ok((RawConfig::default(), PathBuf::from("defaults"))),
    };
    Ok((RawConfig::from_file(path)?, path.to_owned()))
}

/// [`load_raw`], validated.
fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    let (raw, origin) = load_raw(path)?;
    Ok(raw.validate(&origin)?)
}

/// The admin client for a relay: `--url`, else the config's listen address, over HTTPS
/// when the config has `[tls]` (trusting its certificate file, under the certificate's
/// own name resolved to the listen address, so a self-signed setup works as is).
fn admin_client(target: &RelayTarget) -> anyhow::Result<admin::AdminClient> {
    let config = load_config(target.config.as_deref())?;
    let data_dir = target
        .data_dir
        .clone()
        .unwrap_or(config.server.data_dir.clone());
    let mut addr = config.server.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut http = reqwest::Client::builder();
    let mut url = format!("http://{addr}");
    if let Some(tls) = &config.tls {
        for cert in relay::tls::read_certs(&tls.cert)? {
            http = http.add_root_certificate(reqwest::Certificate::from_der(cert.as_ref())?);
        }
        let host = relay::tls::first_dns_name(&tls.cert)?.unwrap_or_else(|| "localhost".into());
        http = http.resolve(&host, addr);
        url = format!("https://{host}:{}", addr.port());
    }
    Ok(admin::AdminClient::new(
        target.url.as_deref().unwrap_or(&url),
        admin::admin_token(&data_dir)?,
        http.build()?,
    ))
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into a log file or the journal.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let relay = relay::Relay::start(config, relay::Process::SERVE).await?;
    // Scripts and tests read the bound address (port 0 picks one) from this line.
    println!("syncrelay listening on {}", relay.url());
    std::io::stdout().flush()?;
    relay.serve(shutdown_signal()).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
