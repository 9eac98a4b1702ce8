//! `syncrelay init --self-signed HOSTNAME`: a quick-start HTTPS setup. It writes a
//! self-signed certificate for HOSTNAME (and `localhost`), its private key (mode 0600) and
//! a config that serves HTTPS with them, all with absolute paths so the relay can be
//! started from any directory. Agents and clients trust the certificate file itself.
//! Existing files are never replaced unless asked to.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// What `init` wrote.
#[derive(Debug)]
pub struct Written {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub config: PathBuf,
}

/// How long the self-signed certificate is valid.
const VALIDITY: time::Duration = time::Duration::days(825);

pub fn self_signed(
    hostname: &str,
    dir: &Path,
    listen: SocketAddr,
    force: bool,
) -> anyhow::Result<Written> {
    let hostname = hostname.trim();
    if hostname.is_empty() {
        bail!("--self-signed needs the host name clients will use");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let written = Written {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        config: dir.join("config.toml"),
    };
    if !force {
        for path in [&written.cert, &written.key, &written.config] {
            if path.exists() {
                bail!("{} exists; pass --force to replace it", path.display());
            }
        }
    }
    let mut names = vec![hostname.to_owned()];
    if hostname != "localhost" {
        names.push("localhost".to_owned());
    }
    let mut params = rcgen::CertificateParams::new(names)
        .with_context(|| format!("{hostname:?} is not a usable host name"))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, hostname);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + VALIDITY;
    let key = rcgen::KeyPair::generate().context("generating a key")?;
    let cert = params
        .self_signed(&key)
        .context("signing the certificate")?;

    write_file(&written.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&written.cert, cert.pem().as_bytes(), 0o644)?;
    let config = format!(
        "# Written by `syncrelay init --self-signed {hostname}`. Every other key keeps its\n\
         # default; see the documented config.toml for the full list.\n\
         \n\
         [server]\n\
         listen = \"{listen}\"\n\
         data_dir = {data:?}\n\
         \n\
         [tls]\n\
         # Self-signed: agents and clients must trust this file (agent: relay_ca).\n\
         # Swap in a CA-issued pair later and send the relay SIGHUP to reload.\n\
         cert = {cert:?}\n\
         key = {key:?}\n",
        data = dir.join("data").display().to_string(),
        cert = written.cert.display().to_string(),
        key = written.key.display().to_string(),
    );
    write_file(&written.config, config.as_bytes(), 0o644)?;
    Ok(written)
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    crate::files::write_atomic(path, contents, mode)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn writes_a_config_that_loads_with_its_pair() {
        let dir = tempfile::tempdir().unwrap();
        let written = self_signed(
            "relay.example.org",
            dir.path(),
            "127.0.0.1:0".parse().unwrap(),
            false,
        )
        .unwrap();
        let config = Config::from_file(&written.config).unwrap();
        let tls = config.tls.expect("the config serves TLS");
        crate::relay::tls::TlsState::load(&tls).unwrap();
        assert_eq!(
            crate::relay::tls::first_dns_name(&tls.cert)
                .unwrap()
                .as_deref(),
            Some("relay.example.org")
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&written.key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = self_signed("x", dir.path(), "127.0.0.1:0".parse().unwrap(), false);
        assert!(again.unwrap_err().to_string().contains("--force"));
    }
}
