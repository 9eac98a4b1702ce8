//! The event watcher: follows the daemon's SSE stream (hld's `/api/v1/stream/events`) and
//! turns every event into an outbox entry, committed to the agent's state before anything
//! else happens with it. The stream position (`id:`) is stored with the entries, and sent
//! as `Last-Event-ID` on reconnect, so a daemon that can replay loses nothing while the
//! agent was down, and nothing is recorded twice. Reconnects back off with jitter.

use std::sync::Arc;

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::status::StatusLog;
use crate::protocol::{json_within_limits, parse_rfc3339, MAX_CARRIED_JSON_DEPTH};
use crate::store::{AgentStore, OutboxEvent};

/// Events appended (and committed) together when they arrive back to back.
const APPEND_BATCH: usize = 256;

pub struct EventWatcher {
    pub url: reqwest::Url,
    pub store: Arc<AgentStore>,
    /// Carries the last outbox seq, to wake the uploader.
    pub outbox_tx: watch::Sender<u64>,
    pub status: Arc<StatusLog>,
}

impl EventWatcher {
    pub async fn run(self, shutdown: CancellationToken) {
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()
            .expect("an HTTP client without TLS options builds");
        let mut backoff = Backoff::new();
        loop {
            let outcome = tokio::select! {
                outcome = self.follow(&client, &mut backoff) => outcome,
                _ = shutdown.cancelled() => return,
            };
            self.status.set(
                "events",
                &format!("daemon event stream unavailable: {outcome}"),
            );
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Follows the stream until it fails or ends; returns why.
    async fn follow(&self, client: &reqwest::Client, backoff: &mut Backoff) -> String {
        let mut request = client
            .get(self.url.clone())
            .header("accept", "text/event-stream");
        match self.store.last_event_id() {
            Ok(Some(id)) => request = request.header("last-event-id", id),
            Ok(None) => {}
            Err(err) => return format!("agent state unreadable: {err}"),
        }
        let response = match request.send().await {
            Ok(response) if response.status().is_success() => response,
            Ok(response) => return format!("{} answered {}", self.url, response.status()),
            Err(err) => return format!("{}: {err}", self.url),
        };
        self.status
            .set("events", "following the daemon's event stream");
        backoff.reset();
        let mut events = response
            .bytes_stream()
            .eventsource()
            .ready_chunks(APPEND_BATCH);
        while let Some(batch) = events.next().await {
            let mut entries = Vec::with_capacity(batch.len());
            let mut last_id = None;
            for item in batch {
                match item {
                    Ok(event) => {
                        if !event.id.is_empty() {
                            last_id = Some(event.id.clone());
                        }
                        entries.push(to_outbox(&event.event, &event.data));
                    }
                    Err(err) => return format!("event stream broke: {err}"),
                }
            }
            let appended = self
                .store
                .append_events(&entries, last_id.as_deref())
                .map_err(|err| err.to_string());
            let committed = match appended {
                Ok(seq) => self
                    .store
                    .commit()
                    .await
                    .map(|_| seq)
                    .map_err(|e| e.to_string()),
                Err(err) => Err(err),
            };
            match committed {
                Ok(seq) => {
                    self.outbox_tx.send_replace(seq);
                }
                Err(err) => return format!("cannot store events: {err}"),
            }
        }
        "the daemon closed its event stream".to_owned()
    }
}

/// hld's events are `{"type","timestamp","data"}`; anything else becomes an event of the
/// SSE `event:` name (or `message`) whose data is the payload.
pub fn to_outbox(event_name: &str, data: &str) -> OutboxEvent {
    let parsed: Option<Value> =
        if json_within_limits(data.as_bytes(), MAX_CARRIED_JSON_DEPTH).is_err() {
            None
        } else {
            serde_json::from_str(data).ok()
        };
    if let Some(Value::Object(object)) = &parsed {
        if let Some(Value::String(kind)) = object.get("type") {
            if !kind.is_empty() && kind.len() <= 256 {
                let timestamp = object
                    .get("timestamp")
                    .and_then(Value::as_str)
                    .filter(|t| parse_rfc3339(t).is_some())
                    .map(str::to_owned);
                let data_json = object
                    .get("data")
                    .map_or_else(|| "null".to_owned(), Value::to_string);
                return OutboxEvent {
                    kind: kind.clone(),
                    timestamp,
                    data_json,
                };
            }
        }
    }
    let kind = if event_name.is_empty() || event_name.len() > 256 {
        "message".to_owned()
    } else {
        event_name.to_owned()
    };
    OutboxEvent {
        kind,
        timestamp: None,
        data_json: parsed.map_or_else(
            || Value::String(data.to_owned()).to_string(),
            |v| v.to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hld_events_and_others() {
        let hld = to_outbox(
            "",
            r#"{"type":"new_approval","timestamp":"2026-01-01T00:00:00Z","data":{"session_id":"s1"}}"#,
        );
        assert_eq!(hld.kind, "new_approval");
        assert_eq!(hld.timestamp.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(hld.data_json, r#"{"session_id":"s1"}"#);
        let bad_time = to_outbox("", r#"{"type":"x","timestamp":"yesterday"}"#);
        assert_eq!(
            (bad_time.timestamp, bad_time.data_json.as_str()),
            (None, "null")
        );
        let plain = to_outbox("ping", "hello");
        assert_eq!(
            (plain.kind.as_str(), plain.data_json.as_str()),
            ("ping", "\"hello\"")
        );
        assert_eq!(to_outbox("", "[1]").kind, "message");
        // An event too deep to travel inside a poll travels as its text.
        let deep = format!(
            r#"{{"type":"x","data":{}{}}}"#,
            "[".repeat(120),
            "]".repeat(120)
        );
        let carried = to_outbox("", &deep);
        assert_eq!(carried.kind, "message");
        assert_eq!(
            serde_json::from_str::<Value>(&carried.data_json).unwrap(),
            Value::String(deep)
        );
    }
}
