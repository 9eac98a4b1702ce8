//! The last 2xx response of each GET path+query per daemon, served while the daemon is
//! offline. A cache, not an acknowledgement: it is written without a commit.

use serde::{Deserialize, Serialize};

use super::usage::{stored_size, Trim};
use super::{layout, Result, SledStore, StoreError};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// As bytes (the bincode layout of a `Vec<u8>`, read without a call per byte).
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    pub stored_at_ms: u64,
}

/// A copy identical to the one stored and younger than this is not written again: a GET
/// answered many times a second costs one write a second, and its age is off by at most
/// this much.
pub const RESPONSE_REFRESH_MS: u64 = 1_000;

impl SledStore {
    /// Keeps `response` as the offline copy of `path_and_query`, unless the stored copy
    /// is the same and younger than [`RESPONSE_REFRESH_MS`], or the daemon's disk budget
    /// has no room for it. Returns whether it wrote.
    pub fn put_response(
        &self,
        daemon_id: &str,
        path_and_query: &str,
        response: &CachedResponse,
    ) -> Result<bool> {
        let _guard = self.lock_daemon(daemon_id);
        let key = layout::daemon_text_key(daemon_id, &[path_and_query]);
        let mut old_size = 0;
        if let Some(raw) = self.responses.get(&key)? {
            let stored: CachedResponse = self.decode(&raw)?;
            if response.stored_at_ms.saturating_sub(stored.stored_at_ms) < RESPONSE_REFRESH_MS
                && stored.status == response.status
                && stored.headers == response.headers
                && stored.body == response.body
            {
                return Ok(false);
            }
            old_size = stored_size(&key, &raw);
        }
        let value = self.encoded(response)?;
        // The budget is charged what the daemon's data grows by.
        let new_size = stored_size(&key, &value);
        if new_size > old_size {
            let grows = new_size - old_size;
            match self.reserve_budget(daemon_id, grows, Trim::Cache, response.stored_at_ms) {
                Ok(()) => {}
                // The copy is a convenience: without room, the daemon keeps its older data.
                Err(StoreError::OverBudget(_)) => return Ok(false),
                Err(err) => return Err(err),
            }
        } else {
            self.release_budget(daemon_id, old_size - new_size);
        }
        self.responses.insert(key, value)?;
        Ok(true)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::temp_store;

    fn copy(body: &[u8], stored_at_ms: u64) -> CachedResponse {
        CachedResponse {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_vec(),
            stored_at_ms,
        }
    }

    #[test]
    fn an_unchanged_copy_is_rewritten_at_most_once_per_refresh_interval() {
        let (_dir, store) = temp_store();
        assert!(store
            .put_response("d", "/sessions", &copy(b"[]", 10_000))
            .unwrap());
        assert!(!store
            .put_response("d", "/sessions", &copy(b"[]", 10_500))
            .unwrap());
        assert_eq!(
            store
                .response("d", "/sessions")
                .unwrap()
                .unwrap()
                .stored_at_ms,
            10_000
        );
        // A changed body is written at once; an unchanged one once it is stale.
        assert!(store
            .put_response("d", "/sessions", &copy(b"[1]", 10_600))
            .unwrap());
        assert!(store
            .put_response(
                "d",
                "/sessions",
                &copy(b"[1]", 10_600 + RESPONSE_REFRESH_MS)
            )
            .unwrap());
        assert_eq!(
            store.response("d", "/sessions").unwrap().unwrap().body,
            b"[1]"
        );
    }
}
