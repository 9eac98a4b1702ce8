//! Test PKI made with `rcgen`: certificate authorities (roots and intermediates), server
//! certificates for `localhost` / `127.0.0.1`, and client certificates whose subject CN
//! names a daemon, valid or expired, as PEM strings and files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// A certificate authority that signs server and client certificates.
pub struct Ca {
    /// The CA's own certificate, PEM.
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate with its private key (PEM), and the chain above it that a server sends
/// (intermediates, without the root).
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub chain_pem: String,
}

/// One day either side of now: valid today.
fn valid_now() -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (now - Duration::days(1), now + Duration::days(30))
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    (params.not_before, params.not_after) = valid_now();
    params
}

impl Ca {
    /// A self-signed root CA named `name`.
    pub fn new(name: &str) -> Ca {
        let params = ca_params(name);
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-sign CA");
        Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// An intermediate CA signed by this one.
    pub fn intermediate(&self, name: &str) -> Ca {
        let mut params = ca_params(name);
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("intermediate key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign intermediate");
        Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn sign(&self, mut params: CertificateParams) -> Leaf {
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            chain_pem: String::new(),
        }
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    pub fn server(&self) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
        (params.not_before, params.not_after) = valid_now();
        self.sign(params)
    }

    /// A server certificate signed by an intermediate of this CA: its chain holds the
    /// intermediate, so a client trusting only this root can verify it.
    pub fn server_via_intermediate(&self, name: &str) -> Leaf {
        let intermediate = self.intermediate(name);
        let mut leaf = intermediate.server();
        leaf.chain_pem = intermediate.cert_pem.clone();
        leaf
    }

    /// A client certificate whose subject CN is `cn`, valid today.
    pub fn client(&self, cn: &str) -> Leaf {
        let (not_before, not_after) = valid_now();
        self.client_valid(cn, not_before, not_after)
    }

    /// A client certificate whose subject CN is `cn`, valid between the given times.
    pub fn client_valid(
        &self,
        cn: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
        params.not_before = not_before;
        params.not_after = not_after;
        self.sign(params)
    }

    /// A client certificate for `cn` signed by a new intermediate of this CA, which its
    /// chain carries.
    pub fn client_via_intermediate(&self, cn: &str) -> Leaf {
        let intermediate = self.intermediate("client intermediate CA");
        let mut leaf = intermediate.client(cn);
        leaf.chain_pem = intermediate.cert_pem.clone();
        leaf
    }

    /// A client certificate that expired yesterday.
    pub fn expired_client(&self, cn: &str) -> Leaf {
        let now = OffsetDateTime::now_utc();
        self.client_valid(cn, now - Duration::days(10), now - Duration::days(1))
    }

    /// Writes the CA certificate to `dir/name` and returns its path.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.cert_pem).expect("write CA");
        path
    }

    /// The CA certificate as a `reqwest` root.
    pub fn reqwest_root(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.cert_pem.as_bytes()).expect("CA PEM")
    }
}

impl Leaf {
    /// The certificate followed by its chain: what a server's cert file holds (leaf first).
    pub fn full_chain_pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.chain_pem)
    }

    /// Certificate, chain and key in one PEM, as `reqwest::Identity::from_pem` takes them.
    pub fn reqwest_identity(&self) -> reqwest::Identity {
        reqwest::Identity::from_pem(format!("{}{}", self.full_chain_pem(), self.key_pem).as_bytes())
            .expect("identity PEM")
    }

    /// Writes `dir/{name}.pem` (the certificate and chain, leaf first) and
    /// `dir/{name}-key.pem` (the key) and returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert, self.full_chain_pem()).expect("write cert");
        std::fs::write(&key, &self.key_pem).expect("write key");
        (cert, key)
    }
}
