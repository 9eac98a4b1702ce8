//! `POST /sync/stream`: one long-lived HTTP/2 stream per daemon connection that carries
//! what `/sync/poll` and `/sync/results` carry, as lines of JSON both ways.
//!
//! Two halves run for as long as the stream lives:
//! - the reader takes the daemon's lines one at a time and answers each with exactly one
//!   line, in order, once what it carried is durable (updates: `last_update_seq`; results
//!   and chunks: `accepted`/`unknown`), or with an error line when it is refused;
//! - the dispatcher hands out reads and leased commands the moment they are queued, as
//!   a poll would, and sends a keep-alive line when nothing else went out for a while.
//!
//! Back-pressure is HTTP/2's flow control on both sides: the reader reads the next line
//! only once the last one is answered, so a daemon that writes faster than the store
//! commits fills its send window and waits; the relay queues at most [`OUT_LINES`] lines
//! for the daemon, and the dispatcher leases nothing until one of them has gone, so a
//! daemon that stops reading holds at most that many lines of the relay's memory (and
//! the commands in them stay leased, to be handed out again as with a lost poll).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::auth::Principal;
use super::http::{query_value, ApiError};
use super::hub::DaemonSignals;
use super::sync::{
    append_updates, check_daemon, check_update_count, next_commands, store_results, touch,
    validate_updates, with_commands,
};
use super::{App, Response};
use crate::protocol::{ErrorDetail, LineBuffer, StreamDown, StreamUp};
use crate::store::now_ms;

/// Lines queued for the daemon beyond what HTTP/2 has taken.
pub const OUT_LINES: usize = 4;
/// The longest the relay stays silent on a stream (DESIGN.md: at least every 15 s).
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// Content type of both directions.
pub const NDJSON: &str = "application/x-ndjson";

/// Answers `POST /sync/stream?daemon_id=…&connection_id=…`: checks the caller and the
/// connection, then answers 200 at once and serves the stream from a task of its own.
pub async fn open(
    app: &Arc<App>,
    principal: &Principal,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    if !app.config.sync.stream {
        return Err(ApiError::not_found(
            "this relay does not serve /sync/stream (sync.stream = false); poll instead",
        ));
    }
    if request.version() != Version::HTTP_2 {
        return Err(ApiError::bad_request(
            "/sync/stream needs HTTP/2 (h2 over TLS, or prior-knowledge h2c); over HTTP/1.1 \
             use /sync/poll and /sync/results",
        ));
    }
    let query = request.uri().query();
    let daemon_id = query_value(query, "daemon_id")
        .ok_or_else(|| ApiError::bad_request("daemon_id is required in the query"))?;
    check_daemon(principal, &daemon_id)?;
    let connection_id = query_value(query, "connection_id").ok_or_else(|| {
        ApiError::bad_request("connection_id (from /sync/connect) is required in the query")
    })?;
    let signals = app.signals(&daemon_id).await?;
    super::sync::confirm_connection(app, &daemon_id, &signals, &connection_id).await;
    if signals.connection.borrow().as_deref() != Some(connection_id.as_str()) {
        return Err(ApiError::superseded());
    }
    signals.seen();
    if let Some(cluster) = &app.cluster {
        cluster.hold(&daemon_id, &signals);
    }
    let (out, lines) = mpsc::channel::<Bytes>(OUT_LINES);
    let session = Session {
        app: app.clone(),
        signals,
        daemon_id,
        connection_id,
        key_id: principal.key_id.clone(),
        out,
    };
    app.sessions.spawn(session.run(request.into_body()));
    let body = StreamBody::new(
        ReceiverStream::new(lines).map(|line| Ok::<_, Infallible>(Frame::data(line))),
    );
    let mut response = Response::new(http_body_util::combinators::BoxBody::new(body));
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    Ok(response)
}

/// One stream's state, shared by its reader and its dispatcher.
struct Session {
    app: Arc<App>,
    signals: Arc<DaemonSignals>,
    daemon_id: String,
    connection_id: String,
    key_id: String,
    out: mpsc::Sender<Bytes>,
}

impl Session {
    async fn run(self, body: axum::body::Body) {
        // The daemon counts as online while its stream is open, as while a poll waits.
        let _online = self.signals.waiting_poll();
        tracing::debug!(daemon_id = %self.daemon_id, connection_id = %self.connection_id, "sync stream opened");
        // Either half ending ends the stream; a store call cut short here still runs to
        // its end (the store's own task), unanswered, and the daemon sends it again.
        tokio::select! {
            () = self.read(body) => {}
            () = self.dispatch() => {}
            () = self.out.closed() => {}
        }
        tracing::debug!(daemon_id = %self.daemon_id, "sync stream closed");
    }

    /// Reads the daemon's lines until its side ends, answering each in turn.
    async fn read(&self, mut body: axum::body::Body) {
        let limit = self.app.config.limits.max_body_bytes;
        let mut lines = LineBuffer::default();
        loop {
            while let Some(line) = lines.next_line() {
                // Boxed: the store call's state lives only while a line is answered, not
                // in every idle session.
                let answer = Box::pin(self.answer(&line)).await;
                if self.out.send(answer).await.is_err() {
                    return;
                }
            }
            if lines.unfinished() > limit {
                let err = ApiError::payload_too_large(format!(
                    "a line of /sync/stream may hold at most {limit} bytes"
                ));
                let _ = self.out.send(error_line(err)).await;
                return;
            }
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        lines.push(&data);
                    }
                }
                // The daemon ended its side (or reset it): a last line without a newline
                // is answered too.
                Some(Err(_)) | None => {
                    if let Some(line) = lines.rest() {
                        let answer = Box::pin(self.answer(&line)).await;
                        let _ = self.out.send(answer).await;
                    }
                    return;
                }
            }
        }
    }

    /// The one line that answers a daemon's line.
    async fn answer(&self, line: &[u8]) -> Bytes {
        match self.store_line(line).await {
            Ok(down) => encode(&down),
            Err(err) => error_line(err),
        }
    }

    async fn store_line(&self, line: &[u8]) -> Result<StreamDown<'static>, ApiError> {
        let app = &self.app;
        // A line stands for a request: the key's rate limit counts it as one.
        if let Err(limited) = app.limits.check_key(&self.key_id) {
            app.metrics
                .rate_limited
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(ApiError::rate_limited(limited.retry_after_secs()));
        }
        let up: StreamUp = super::http::parse_json(line)?;
        self.signals.seen();
        touch(app, &self.signals, &self.daemon_id).await;
        let mut down = StreamDown::default();
        if let Some(updates) = &up.updates {
            check_update_count(app, updates.len())?;
            let updates = validate_updates(updates)?;
            let seq = append_updates(app, &self.signals, &self.daemon_id, updates).await?;
            down.last_update_seq = Some(seq);
        }
        if let Some(results) = &up.results {
            let answer = store_results(app, &self.signals, &self.daemon_id, results).await?;
            down.accepted = Some(answer.accepted);
            down.unknown = Some(answer.unknown);
        }
        if up.updates.is_none() && up.results.is_none() {
            down.last_update_seq = Some(self.signals.durable_update_seq());
        }
        Ok(down)
    }

    /// Hands out work as it is queued, for as long as this connection is the daemon's
    /// current one.
    async fn dispatch(&self) {
        let app = &self.app;
        let signals = &self.signals;
        let mine = Some(self.connection_id.clone());
        let mut connection_rx = signals.connection.subscribe();
        let max = app.config.sync.max_commands_per_poll;
        let mut keepalive_at = Instant::now() + KEEPALIVE;
        // The store is asked only when stored commands may be ready: the generation
        // moved since the last lease that left nothing behind, or a lease runs out.
        // Reads alone cost it nothing.
        let mut leased_at: Option<u64> = None;
        let mut lease_check: Option<Instant> = None;
        loop {
            // Room for one line first: nothing is leased that could not be sent.
            let Ok(permit) = self.out.reserve().await else {
                return;
            };
            if *connection_rx.borrow_and_update() != mine {
                permit.send(error_line(ApiError::superseded()));
                return;
            }
            let mut queue_rx = signals.queue.subscribe();
            let generation = signals.stored_generation();
            let lease =
                leased_at != Some(generation) || lease_check.is_some_and(|at| at <= Instant::now());
            let next = Box::pin(next_commands(
                app,
                signals,
                &self.daemon_id,
                mine.as_deref(),
                max,
                lease,
            ))
            .await;
            let (reads, batch) = match next {
                Ok(next) => next,
                Err(err) => {
                    tracing::warn!(daemon_id = %self.daemon_id, error = %err.message, "sync stream ends: commands cannot be leased");
                    permit.send(error_line(err));
                    return;
                }
            };
            if lease {
                lease_check = batch
                    .next_lease_expiry_ms
                    .map(|at| Instant::now() + Duration::from_millis(at.saturating_sub(now_ms())));
                // A full batch may have left commands behind, and commands just leased
                // have leases that will run out: look again at once (the next lease
                // returns when the earliest of them ends).
                let again = reads.len() + batch.commands.len() >= max || !batch.commands.is_empty();
                leased_at = (!again).then_some(generation);
            }
            if !reads.is_empty() || !batch.commands.is_empty() {
                signals.seen();
                let line = with_commands(&reads, &batch, |commands| {
                    encode(&StreamDown {
                        commands: Some(commands),
                        ..StreamDown::default()
                    })
                });
                permit.send(line);
                keepalive_at = Instant::now() + KEEPALIVE;
                continue;
            }
            tokio::select! {
                biased;
                changed = connection_rx.changed() => {
                    if changed.is_err() || *connection_rx.borrow_and_update() != mine {
                        permit.send(error_line(ApiError::superseded()));
                        return;
                    }
                }
                _ = queue_rx.changed() => {}
                _ = sleep_until(lease_check) => {}
                _ = tokio::time::sleep_until(keepalive_at) => {
                    permit.send(encode(&StreamDown { keepalive: true, ..StreamDown::default() }));
                    keepalive_at = Instant::now() + KEEPALIVE;
                    Box::pin(touch(app, signals, &self.daemon_id)).await;
                }
                _ = app.shutdown.cancelled() => return,
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A line: the value's JSON and a newline.
fn encode(down: &StreamDown<'_>) -> Bytes {
    let mut line = serde_json::to_vec(down).expect("wire types serialise");
    line.push(b'\n');
    Bytes::from(line)
}

/// An error line, in the design's error shape.
fn error_line(err: ApiError) -> Bytes {
    let mut details = err.details.map(|d| *d);
    if let Some(seconds) = err.retry_after {
        // A line has no `Retry-After` header: the seconds travel in `details`.
        let object = details.get_or_insert_with(|| serde_json::json!({}));
        if let Some(map) = object.as_object_mut() {
            map.insert("retry_after".into(), seconds.into());
        }
    }
    encode(&StreamDown {
        error: Some(ErrorDetail {
            code: err.code,
            message: err.message,
            details: details.map(Box::new),
        }),
        ..StreamDown::default()
    })
}
