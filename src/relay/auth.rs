//! Authentication: bearer tokens → a [`Principal`]. Tokens look like
//! `srk_<key id>_<secret>`; only the SHA-256 of the secret is stored, and it is compared in
//! constant time. Tokens are never logged: [`Token`] masks itself in `Debug`.
//!
//! Authorization is [`authorize`], the one place the matrix lives: a daemon key acts only
//! as its own daemon on `/sync/*`, a client key reaches only the daemons in its scope on
//! `/api/v1/*`, an admin key only `/admin/*`. A verified TLS client certificate whose CN
//! is a daemon id stands for a daemon key of that daemon.

use std::path::{Path, PathBuf};

use http::header::AUTHORIZATION;
use http::HeaderMap;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::http::ApiError;
use crate::store::{now_ms, KeyRecord, Role, Store, StoreError};

const TOKEN_PREFIX: &str = "srk_";

/// A bearer token. `Debug` prints `MASKED` so it never reaches a log.
pub struct Token(pub String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(MASKED)")
    }
}

/// Who a request acts as.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The key's id; `cert:<daemon id>` for a client certificate.
    pub key_id: String,
    pub role: Role,
    pub daemon_id: Option<String>,
    pub scope: Vec<String>,
    /// Authenticated by a TLS client certificate rather than a key.
    pub by_certificate: bool,
}

/// What a route needs of its caller: the route families of the authorization matrix.
#[derive(Debug, Clone, Copy)]
pub enum Access<'a> {
    /// `/sync/*`, as this daemon once the body names it.
    Sync(Option<&'a str>),
    /// `/api/v1/*`, on this daemon when the path names one.
    Client(Option<&'a str>),
    /// `/admin/*`.
    Admin,
}

impl Principal {
    /// The principal of a verified client certificate naming `daemon_id`.
    pub fn certificate(daemon_id: String) -> Principal {
        Principal {
            key_id: format!("cert:{daemon_id}"),
            role: Role::Daemon,
            daemon_id: Some(daemon_id),
            scope: Vec::new(),
            by_certificate: true,
        }
    }

    /// For client keys: whether `daemon_id` is in scope.
    pub fn can_see(&self, daemon_id: &str) -> bool {
        self.role == Role::Client && self.scope.iter().any(|s| s == "*" || s == daemon_id)
    }
}

/// The authorization matrix, in one place. Each role has one route family (another
/// family → 403); a daemon key acts only as its own daemon (another id → 403); a client
/// key reaches only the daemons in its scope (others → 404, so ids do not leak).
pub fn authorize(principal: &Principal, access: Access<'_>) -> Result<(), ApiError> {
    let (role, family) = match access {
        Access::Sync(_) => (Role::Daemon, "/sync/*"),
        Access::Client(_) => (Role::Client, "/api/v1/*"),
        Access::Admin => (Role::Admin, "/admin/*"),
    };
    if principal.role != role {
        return Err(ApiError::forbidden(format!(
            "a {} key cannot use {family}",
            principal.role.as_str()
        )));
    }
    match access {
        Access::Sync(Some(daemon_id)) if principal.daemon_id.as_deref() != Some(daemon_id) => Err(
            ApiError::forbidden(format!("this key does not act as daemon {daemon_id}")),
        ),
        Access::Client(Some(daemon_id)) if !principal.can_see(daemon_id) => {
            Err(ApiError::not_found(format!("no daemon {daemon_id}")))
        }
        _ => Ok(()),
    }
}

/// A freshly made key: the record to store and the token to hand out once.
pub struct NewKey {
    pub record: KeyRecord,
    pub token: Token,
}

/// Makes a key with a random id and secret.
pub fn new_key(
    role: Role,
    daemon_id: Option<String>,
    scope: Vec<String>,
    label: Option<String>,
) -> NewKey {
    let mut rng = rand::thread_rng();
    let mut id_bytes = [0u8; 8];
    let mut secret_bytes = [0u8; 32];
    rng.fill_bytes(&mut id_bytes);
    rng.fill_bytes(&mut secret_bytes);
    let key_id = hex::encode(id_bytes);
    let secret = hex::encode(secret_bytes);
    NewKey {
        token: Token(format!("{TOKEN_PREFIX}{key_id}_{secret}")),
        record: KeyRecord {
            key_id,
            role,
            daemon_id,
            scope,
            label,
            secret_sha256: Sha256::digest(secret.as_bytes()).into(),
            created_at_ms: now_ms(),
        },
    }
}

/// The bearer token of a request: the `Authorization` header, or `?access_token=` where
/// `allow_query` (SSE routes, since `EventSource` cannot set headers).
pub fn bearer(headers: &HeaderMap, query: Option<&str>, allow_query: bool) -> Option<Token> {
    if let Some(value) = headers.get(AUTHORIZATION) {
        let text = value.to_str().ok()?;
        let (scheme, token) = text.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| Token(token.trim().to_owned()));
    }
    if allow_query {
        return super::http::query_value(query, "access_token").map(Token);
    }
    None
}

/// Resolves a token to its principal.
pub async fn authenticate(store: &Store, token: Option<Token>) -> Result<Principal, ApiError> {
    let token = token.ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
    let invalid = || ApiError::unauthorized("invalid or revoked key");
    let (key_id, secret) = token
        .0
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|rest| rest.split_once('_'))
        .ok_or_else(invalid)?;
    if key_id.is_empty() || key_id.len() > 64 {
        return Err(invalid());
    }
    let record = store.key(key_id).await?.ok_or_else(invalid)?;
    let presented: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    if !bool::from(presented.ct_eq(&record.secret_sha256)) {
        return Err(invalid());
    }
    Ok(Principal {
        key_id: record.key_id,
        role: record.role,
        daemon_id: record.daemon_id,
        scope: record.scope,
        by_certificate: false,
    })
}

/// On first start (no keys at all), creates an admin key and writes its token to
/// `data_dir/admin.key` with mode 0600. Returns the file's path when it made one.
pub async fn ensure_admin_key(
    store: &Store,
    data_dir: &Path,
) -> Result<Option<PathBuf>, StoreError> {
    if store.has_keys().await? {
        return Ok(None);
    }
    let key = new_key(
        Role::Admin,
        None,
        Vec::new(),
        Some("created on first start".into()),
    );
    let path = data_dir.join(crate::admin::ADMIN_KEY_FILE);
    // The file first: a crash before the key is stored leaves no keys, so the next start
    // makes a new key and overwrites it; never a stored admin key nobody can read.
    crate::files::write_atomic(&path, format!("{}\n", key.token.0).as_bytes(), 0o600)
        .map_err(|err| StoreError::Unavailable(format!("{}: {err}", path.display())))?;
    store.create_key(key.record, now_ms()).await?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::temp_relay_store as temp_store;

    #[tokio::test]
    async fn tokens_authenticate_and_mask() {
        let (_dir, store) = temp_store();
        let key = new_key(Role::Client, None, vec!["a".into()], None);
        store.create_key(key.record.clone(), 0).await.unwrap();
        assert_eq!(format!("{:?}", key.token), "Token(MASKED)");
        let principal = authenticate(&store, Some(Token(key.token.0.clone())))
            .await
            .unwrap();
        assert!(principal.can_see("a") && !principal.can_see("b"));
        let mut forged = key.token.0.clone();
        forged.pop();
        forged.push('x');
        assert_eq!(
            authenticate(&store, Some(Token(forged)))
                .await
                .unwrap_err()
                .code,
            "unauthorized"
        );
        assert_eq!(
            authenticate(&store, Some(Token("junk".into())))
                .await
                .unwrap_err()
                .code,
            "unauthorized"
        );
        assert_eq!(
            authenticate(&store, None).await.unwrap_err().code,
            "unauthorized"
        );
    }

    #[tokio::test]
    async fn first_start_writes_a_private_admin_key() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, store) = temp_store();
        let path = ensure_admin_key(&store, dir.path()).await.unwrap().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let token = std::fs::read_to_string(&path).unwrap();
        let principal = authenticate(&store, Some(Token(token.trim().into())))
            .await
            .unwrap();
        assert_eq!(principal.role, Role::Admin);
        assert!(ensure_admin_key(&store, dir.path())
            .await
            .unwrap()
            .is_none());
    }
}
