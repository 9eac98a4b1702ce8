//! The last 2xx response of each GET path+query per daemon, served while the daemon is
//! offline. A cache, not an acknowledgement: it is written without a commit.

use serde::{Deserialize, Serialize};

use super::{layout, Result, Store};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub stored_at_ms: u64,
}

impl Store {
    pub fn put_response(
        &self,
        daemon_id: &str,
        path_and_query: &str,
        response: &CachedResponse,
    ) -> Result<()> {
        let _gate = self.gate.shared();
        self.responses.insert(
            layout::daemon_text_key(daemon_id, &[path_and_query]),
            self.encoded(response)?,
        )?;
        Ok(())
    }

    pub fn response(
        &self,
        daemon_id: &str,
        path_and_query: &str,
    ) -> Result<Option<CachedResponse>> {
        self.get_decoded(
            &self.responses,
            &layout::daemon_text_key(daemon_id, &[path_and_query]),
        )
    }
}
