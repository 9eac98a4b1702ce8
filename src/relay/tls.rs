//! TLS for the relay's listener, by rustls with the `ring` provider: the certificate chain
//! and key come from PEM files, ALPN offers `h2` then `http/1.1`, and only TLS 1.2 and 1.3
//! are spoken. [`TlsState::reload`] re-reads the files (on SIGHUP) and swaps the config
//! that new handshakes use; connections already open keep the config they started with.
//!
//! Mutual TLS is optional: with `client_ca`, a client may present a certificate signed by
//! that CA; its subject CN, when it is a valid daemon id, authenticates that daemon. A
//! client without a certificate still authenticates by key. A certificate that fails
//! verification (unknown CA, expired) fails the handshake. On an open connection the
//! certificate is checked again at each use once it has expired or the files were
//! reloaded ([`ClientIdentity::still_valid`]), so rotating `client_ca` cuts it off.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
use crate::protocol::valid_daemon_id;

/// The TLS configuration new connections are accepted with.
pub struct TlsState {
    files: TlsConfig,
    current: RwLock<Arc<Loaded>>,
}

/// One load of the files.
struct Loaded {
    config: Arc<ServerConfig>,
    /// The client-certificate verifier, with `client_ca`.
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// Counts loads, so connections can tell their handshake predates a reload.
    generation: u64,
}

impl TlsState {
    /// Loads the files; errors name the file and what is wrong with it.
    pub fn load(files: &TlsConfig) -> anyhow::Result<TlsState> {
        Ok(TlsState {
            current: RwLock::new(Arc::new(load(files, 0)?)),
            files: files.clone(),
        })
    }

    /// Re-reads the files. On error the old configuration stays in use.
    pub fn reload(&self) -> anyhow::Result<()> {
        let generation = self.loaded().generation + 1;
        let fresh = Arc::new(load(&self.files, generation)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    fn loaded(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// An acceptor for one new connection, with the current configuration.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.loaded().config.clone())
    }

    /// The identity a verified client certificate chain gives its connection: the leaf's
    /// subject CN, when that is a valid daemon id. (The verifier has already checked the
    /// chain and validity dates.)
    pub fn identity(self: &Arc<Self>, chain: &[CertificateDer<'_>]) -> Option<ClientIdentity> {
        let leaf = chain.first()?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
        let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
        Some(ClientIdentity {
            daemon_id: valid_daemon_id(cn).then(|| cn.to_owned())?,
            not_after: u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0),
            chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
            verified_generation: AtomicU64::new(self.loaded().generation),
            tls: self.clone(),
        })
    }
}

/// A daemon authenticated by its TLS client certificate, for the life of a connection.
/// Each use re-checks what may have changed since the handshake: the certificate's
/// expiry, and after a reload, whether the current `client_ca` still trusts it.
pub struct ClientIdentity {
    pub daemon_id: String,
    /// Unix seconds.
    not_after: u64,
    chain: Vec<CertificateDer<'static>>,
    verified_generation: AtomicU64,
    tls: Arc<TlsState>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("daemon_id", &self.daemon_id)
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl ClientIdentity {
    /// Whether the certificate is still valid and trusted now.
    pub fn still_valid(&self) -> bool {
        let now = UnixTime::now();
        if now.as_secs() > self.not_after {
            return false;
        }
        let loaded = self.tls.loaded();
        if self.verified_generation.load(Ordering::Acquire) == loaded.generation {
            return true;
        }
        let Some(verifier) = &loaded.verifier else {
            return false;
        };
        let (leaf, intermediates) = self.chain.split_first().expect("a chain has a leaf");
        if verifier
            .verify_client_cert(leaf, intermediates, now)
            .is_err()
        {
            return false;
        }
        self.verified_generation
            .store(loaded.generation, Ordering::Release);
        true
    }
}

fn load(files: &TlsConfig, generation: u64) -> anyhow::Result<Loaded> {
    let (config, verifier) = server_config(files)?;
    Ok(Loaded {
        config: Arc::new(config),
        verifier,
        generation,
    })
}

fn server_config(
    files: &TlsConfig,
) -> anyhow::Result<(ServerConfig, Option<Arc<dyn ClientCertVerifier>>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).with_context(|| {
        format!(
            "tls.key {}: no PEM private key could be read",
            files.key.display()
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("choosing TLS versions")?;
    let mut client_verifier = None;
    let builder = match &files.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(path)? {
                roots
                    .add(cert)
                    .with_context(|| format!("tls.client_ca {}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .with_context(|| format!("tls.client_ca {}", path.display()))?;
            client_verifier = Some(verifier.clone());
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).with_context(|| {
        format!(
            "tls.cert {} and tls.key {} do not make a usable pair",
            files.cert.display(),
            files.key.display()
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((config, client_verifier))
}

/// The PEM certificates in a file, in order.
pub fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not PEM certificates", path.display()))?;
    if certs.is_empty() {
        bail!("{}: holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// The first DNS name of the first certificate in a PEM file, if it has one.
pub fn first_dns_name(path: &Path) -> anyhow::Result<Option<String>> {
    use x509_parser::extensions::GeneralName;
    let certs = read_certs(path)?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs[0].as_ref())
        .map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))?;
    let names = cert.subject_alternative_name().ok().flatten();
    Ok(names.and_then(|san| {
        san.value.general_names.iter().find_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            _ => None,
        })
    }))
}
