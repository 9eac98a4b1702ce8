//! API keys. Only a SHA-256 of each key's secret is stored; the relay module makes and
//! checks tokens, this module keeps the records.

use serde::{Deserialize, Serialize};

use super::{Result, SledStore};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum Role {
    Daemon,
    Client,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Daemon => "daemon",
            Role::Client => "client",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "daemon" => Some(Role::Daemon),
            "client" => Some(Role::Client),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: String,
    pub role: Role,
    /// For daemon keys: the one daemon id the key acts as.
    pub daemon_id: Option<String>,
    /// For client keys: the daemon ids it may reach; `*` means all.
    pub scope: Vec<String>,
    pub label: Option<String>,
    pub secret_sha256: [u8; 32],
    pub created_at_ms: u64,
}

impl SledStore {
    /// Stores a key; call [`SledStore::commit`] before handing out its token.
    pub fn put_key(&self, record: &KeyRecord) -> Result<()> {
        let _gate = self.gate.shared();
        self.credentials
            .insert(record.key_id.as_bytes(), self.encoded(record)?)?;
        Ok(())
    }

    pub fn key(&self, key_id: &str) -> Result<Option<KeyRecord>> {
        self.get_decoded(&self.credentials, key_id.as_bytes())
    }

    pub fn keys(&self) -> Result<Vec<KeyRecord>> {
        self.credentials
            .iter()
            .map(|item| {
                let (_, value) = item?;
                self.decode(&value)
            })
            .collect()
    }

    /// Removes a key; false when there was none.
    pub fn remove_key(&self, key_id: &str) -> Result<bool> {
        let _gate = self.gate.shared();
        Ok(self.credentials.remove(key_id.as_bytes())?.is_some())
    }

    pub fn has_keys(&self) -> Result<bool> {
        Ok(!self.credentials.is_empty())
    }
}
