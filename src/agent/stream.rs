//! The agent's side of `POST /sync/stream`: lines written to the relay, and the relay's
//! lines read back. The relay answers each line the agent writes with exactly one line,
//! in order, so an answer goes to the oldest line still waiting for one; commands and
//! keep-alives come in between. A call that waits too long gives up (its answer, should
//! it still come, goes to its own place in the queue and is dropped there).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::link::{classify, LinkError, MAX_RETRY_AFTER_SECS, MAX_THROTTLED};
use crate::protocol::{ErrorDetail, LineBuffer, StreamDown, StreamUp};

/// A relay line, owning its commands.
pub type Down = StreamDown<'static>;

/// Longest wait for the answer to one line (a commit, under load).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// The relay sends something at least every 15 s; three times that without a line means
/// the stream is dead even if the connection looks alive.
pub const SILENCE: Duration = Duration::from_secs(45);
/// Longest line the agent reads from the relay.
const MAX_LINE: usize = 256 << 20;

/// The writing half of a stream, shared by the loops that send lines.
pub struct StreamLink {
    /// `None` once the stream has ended. The lock orders writes with their place in
    /// `waiting`.
    writer: tokio::sync::Mutex<Option<mpsc::Sender<Bytes>>>,
    /// Where the answers go, in the order their lines were written.
    waiting: Mutex<VecDeque<oneshot::Sender<Down>>>,
}

impl StreamLink {
    pub fn new(writer: mpsc::Sender<Bytes>) -> StreamLink {
        StreamLink {
            writer: tokio::sync::Mutex::new(Some(writer)),
            waiting: Mutex::default(),
        }
    }

    /// Sends one line and waits for its answer; a `rate_limited` or `queue_full` answer
    /// is waited out and the line sent again, as a throttled request would be.
    pub async fn call(&self, up: &StreamUp) -> Result<Down, LinkError> {
        let mut line = serde_json::to_vec(up).expect("wire types serialise");
        line.push(b'\n');
        let line = Bytes::from(line);
        let mut throttled = 0;
        loop {
            let answer = {
                let writer = self.writer.lock().await;
                let Some(writer) = writer.as_ref() else {
                    return Err(ended());
                };
                let (tx, rx) = oneshot::channel();
                self.lock_waiting().push_back(tx);
                writer.send(line.clone()).await.map_err(|_| ended())?;
                rx
            };
            let down = match tokio::time::timeout(ANSWER_TIMEOUT, answer).await {
                Ok(Ok(down)) => down,
                Ok(Err(_)) => return Err(ended()),
                Err(_) => {
                    return Err(LinkError::Transient(
                        "the relay did not answer a line of the sync stream in time".into(),
                    ))
                }
            };
            let Some(error) = &down.error else {
                return Ok(down);
            };
            let err = link_error(error);
            if matches!(error.code.as_str(), "rate_limited" | "queue_full")
                && throttled < MAX_THROTTLED
            {
                throttled += 1;
                let wait = error
                    .details
                    .as_ref()
                    .and_then(|d| d["retry_after"].as_u64())
                    .unwrap_or(1)
                    .clamp(1, MAX_RETRY_AFTER_SECS);
                tracing::debug!(wait, "a stream line was throttled by the relay; waiting");
                tokio::time::sleep(Duration::from_secs(wait)).await;
                continue;
            }
            return Err(err);
        }
    }

    /// Hands an answer to the oldest line waiting for one; `false` when none waits.
    fn answer(&self, down: Down) -> bool {
        match self.lock_waiting().pop_front() {
            Some(waiting) => {
                let _ = waiting.send(down);
                true
            }
            None => false,
        }
    }

    /// Ends the writing half: the relay sees the end of the request body, and every
    /// call still waiting fails.
    pub async fn close(&self) {
        self.writer.lock().await.take();
        self.lock_waiting().clear();
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, VecDeque<oneshot::Sender<Down>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn ended() -> LinkError {
    LinkError::Transient("the sync stream ended".into())
}

fn link_error(error: &ErrorDetail) -> LinkError {
    classify(None, &error.code, &error.message)
}

/// Reads the relay's lines until the stream ends, handing commands to `commands` and
/// answers to the calls waiting on `link`; the error says why it ended.
pub async fn read_lines(
    response: reqwest::Response,
    link: &StreamLink,
    mut commands: impl FnMut(Vec<crate::protocol::WireCommand<'static>>),
) -> LinkError {
    let mut body = response.bytes_stream();
    let mut lines = LineBuffer::default();
    loop {
        while let Some(line) = lines.next_line() {
            let down: Down = match serde_json::from_slice(&line) {
                Ok(down) => down,
                Err(err) => {
                    return LinkError::Transient(format!("unreadable line from the relay: {err}"))
                }
            };
            if let Some(list) = down.commands {
                commands(list);
                continue;
            }
            if down.keepalive {
                continue;
            }
            if down.is_final_error() {
                return down.error.as_ref().map(link_error).unwrap_or_else(ended);
            }
            // An error with no line waiting for it is why the relay ends the stream.
            let error = down.error.as_ref().map(link_error);
            if !link.answer(down) {
                return error.unwrap_or_else(|| {
                    LinkError::Transient("the relay answered a line never sent".into())
                });
            }
        }
        if lines.unfinished() > MAX_LINE {
            return LinkError::Transient("a line from the relay is too long".into());
        }
        match tokio::time::timeout(SILENCE, body.next()).await {
            Ok(Some(Ok(bytes))) => lines.push(&bytes),
            Ok(Some(Err(err))) => {
                return LinkError::Transient(format!("the sync stream broke: {err}"))
            }
            Ok(None) => return ended(),
            Err(_) => {
                return LinkError::Transient(format!(
                    "the relay sent nothing for {}s",
                    SILENCE.as_secs()
                ))
            }
        }
    }
}
