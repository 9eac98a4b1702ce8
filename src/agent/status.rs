//! State-change logging: each part of the agent (relay link, event stream) logs when its
//! state changes, once, not once per retry.

use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct StatusLog {
    /// Last state per part. The lock only guards the map; never held across `.await`.
    states: Mutex<HashMap<&'static str, String>>,
}

impl StatusLog {
    /// Records `state` for `part`; logs it only when it differs from the last one.
    pub fn set(&self, part: &'static str, state: &str) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        if states.get(part).map(String::as_str) == Some(state) {
            return;
        }
        tracing::info!(part, "{state}");
        states.insert(part, state.to_owned());
    }
}
