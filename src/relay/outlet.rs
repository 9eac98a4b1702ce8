//! Pumped response bodies (context streams, event streams) and how they end when their
//! reader stops reading. A pump task writes frames into an [`Outlet`], a channel of
//! [`FRAMES_AHEAD`] frames that the response body drains, and asks for room before it
//! reads what it will send: a stream holds at most that many frames ahead of its reader,
//! plus the one hyper has taken and is waiting to write.
//!
//! Flow control alone never ends a stream: hyper polls a body only when the peer's window
//! has room, so a reader that opens no window leaves the stream, and what it holds, open
//! forever. A watchdog per response ends it once the body has had a frame waiting to be
//! written for `limits.body_write_timeout` without hyper coming back for the next. The end
//! comes from outside the body: every HTTP/2 stream task is spawned by [`StreamExecutor`]
//! under its own cancellation token, and dropping the task resets the stream
//! (`RST_STREAM CANCEL`); an HTTP/1.1 response is served by its connection's task, whose
//! token ([`scope`]) closes the connection. A handler finds its token with
//! [`response_end`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::http::Body;

/// Frames a pump may have written that its reader has not yet taken.
pub const FRAMES_AHEAD: usize = 2;

tokio::task_local! {
    /// Cancelling it ends the response being served by this task.
    static RESPONSE_END: CancellationToken;
}

/// hyper's executor for HTTP/2 stream tasks: each runs under a token of its own (see
/// [`response_end`]), and is dropped, resetting its stream, when the token is cancelled.
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamExecutor;

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, task: F) {
        let end = CancellationToken::new();
        // In the connection's span: hyper spawns the task from the connection's.
        let task = tracing::Instrument::in_current_span(task);
        tokio::spawn(RESPONSE_END.scope(end.clone(), async move {
            tokio::select! {
                () = task => {}
                () = end.cancelled() => {}
            }
        }));
    }
}

/// Runs a connection's task under `end`: HTTP/1.1 responses are served on that task, so
/// ending one of them means closing the connection, which the caller does once `end` is
/// cancelled.
pub fn scope<F: Future>(end: CancellationToken, task: F) -> impl Future<Output = F::Output> {
    RESPONSE_END.scope(end, task)
}

/// The token that ends the response this task serves (`None` outside a connection, e.g.
/// in unit tests: such a response is never ended for stalling).
pub fn response_end() -> Option<CancellationToken> {
    RESPONSE_END.try_with(CancellationToken::clone).ok()
}

/// Gauges and counters of pumped responses, for `/metrics`.
#[derive(Debug, Default)]
pub struct OutletMetrics {
    /// Pumped responses open.
    pub open: AtomicI64,
    /// Pumps waiting for their reader to take a frame.
    pub waiting: AtomicI64,
    /// Responses ended because their reader took nothing for `body_write_timeout`.
    pub stalled: AtomicU64,
}

/// The writing end of a pumped response.
pub struct Outlet {
    tx: mpsc::Sender<Bytes>,
    metrics: Arc<OutletMetrics>,
}

/// A permit to write one frame, held while the frame is produced.
pub type Room<'a> = mpsc::Permit<'a, Bytes>;

impl Outlet {
    /// A pumped response: the outlet for its pump and the body to answer with. The body's
    /// watchdog ends the response through `end` once its reader stalls for `stall`.
    pub fn open(
        metrics: &Arc<OutletMetrics>,
        stall: Duration,
        end: Option<CancellationToken>,
    ) -> (Outlet, Body) {
        let (tx, rx) = mpsc::channel(FRAMES_AHEAD);
        let watch = Arc::new(Watch::default());
        let done = CancellationToken::new();
        if let Some(end) = end {
            tokio::spawn(tracing::Instrument::in_current_span(watchdog(
                watch.clone(),
                stall,
                end,
                done.clone(),
                metrics.clone(),
            )));
        }
        metrics.open.fetch_add(1, Relaxed);
        let body = OutletBody {
            rx,
            rest: Bytes::new(),
            watch,
            metrics: metrics.clone(),
            _done: done.drop_guard(),
        };
        let outlet = Outlet {
            tx,
            metrics: metrics.clone(),
        };
        (outlet, body.boxed())
    }

    /// Waits until the reader has room for one more frame; `None` once the response is
    /// gone (the reader left, or was ended for stalling).
    pub async fn room(&self) -> Option<Room<'_>> {
        match self.tx.try_reserve() {
            Ok(permit) => Some(permit),
            Err(mpsc::error::TrySendError::Closed(())) => None,
            Err(mpsc::error::TrySendError::Full(())) => {
                self.metrics.waiting.fetch_add(1, Relaxed);
                let permit = self.tx.reserve().await.ok();
                self.metrics.waiting.fetch_sub(1, Relaxed);
                permit
            }
        }
    }

    /// Room for one more frame if the reader has it now.
    pub fn try_room(&self) -> Option<Room<'_>> {
        self.tx.try_reserve().ok()
    }

    /// Writes one frame once there is room; false once the response is gone.
    pub async fn send(&self, frame: Bytes) -> bool {
        match self.room().await {
            Some(room) => {
                room.send(frame);
                true
            }
            None => false,
        }
    }

    /// Resolves once the response is gone.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// What the watchdog knows of a body: when it last handed hyper a frame that hyper has
/// not yet finished with (it comes back for the next one only after writing it).
#[derive(Default)]
struct Watch {
    waiting_since: Mutex<Option<Instant>>,
}

/// Ends the response once a frame has waited `stall` for its reader.
async fn watchdog(
    watch: Arc<Watch>,
    stall: Duration,
    end: CancellationToken,
    done: CancellationToken,
    metrics: Arc<OutletMetrics>,
) {
    let mut check_at = Instant::now() + stall;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(check_at) => {}
            () = done.cancelled() => return,
            () = end.cancelled() => return,
        }
        let now = Instant::now();
        match *watch.waiting_since.lock().unwrap() {
            Some(since) if since + stall <= now => break,
            Some(since) => check_at = since + stall,
            None => check_at = now + stall,
        }
    }
    metrics.stalled.fetch_add(1, Relaxed);
    tracing::debug!(
        stall_secs = stall.as_secs_f64(),
        "a response's reader took nothing; ending it"
    );
    end.cancel();
}

/// The most of a frame handed to hyper at once (the agent's chunk size). A large frame (an
/// SSE event of several MiB) goes out in pieces, so a slow reader's progress shows within one piece, and the
/// watchdog never ends a reader that is still taking bytes.
const PIECE_BYTES: usize = 64 << 10;

/// The reading end: the response body hyper polls.
struct OutletBody {
    rx: mpsc::Receiver<Bytes>,
    /// The rest of the frame being handed out.
    rest: Bytes,
    watch: Arc<Watch>,
    metrics: Arc<OutletMetrics>,
    _done: DropGuard,
}

impl hyper::body::Body for OutletBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = match this.rest.is_empty() {
            true => this.rx.poll_recv(cx),
            false => Poll::Ready(Some(std::mem::take(&mut this.rest))),
        };
        let piece = polled.map(|frame| {
            frame.map(|mut frame| {
                if frame.len() > PIECE_BYTES {
                    this.rest = frame.split_off(PIECE_BYTES);
                }
                Ok(Frame::data(frame))
            })
        });
        // Back for more: the last piece is written (or buffered by hyper within its
        // limits). A piece handed out now waits until hyper comes back.
        *this.watch.waiting_since.lock().unwrap() = match piece {
            Poll::Ready(Some(_)) => Some(Instant::now()),
            _ => None,
        };
        piece
    }
}

impl Drop for OutletBody {
    fn drop(&mut self) {
        self.metrics.open.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_takes_nothing_is_ended_and_one_that_reads_is_not() {
        let metrics = Arc::new(OutletMetrics::default());
        let stall = Duration::from_secs(5);
        // Stalled: the body hands out one frame and is never polled again.
        let end = CancellationToken::new();
        let (outlet, mut body) = Outlet::open(&metrics, stall, Some(end.clone()));
        assert!(outlet.send(Bytes::from_static(b"a")).await);
        assert!(body.frame().await.is_some());
        for _ in 0..FRAMES_AHEAD {
            assert!(outlet.send(Bytes::from_static(b"b")).await);
        }
        // No room beyond FRAMES_AHEAD while the reader stalls.
        assert!(outlet.tx.try_reserve().is_err());
        tokio::time::sleep(stall - Duration::from_millis(10)).await;
        assert!(!end.is_cancelled());
        end.cancelled().await;
        assert_eq!(metrics.stalled.load(Relaxed), 1);

        // Reading slowly, a frame a second: never ended.
        let end = CancellationToken::new();
        let (outlet, mut body) = Outlet::open(&metrics, stall, Some(end.clone()));
        let pump = tokio::spawn(async move {
            for _ in 0..20 {
                if !outlet.send(Bytes::from_static(b"c")).await {
                    return false;
                }
            }
            true
        });
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(body.frame().await.is_some());
        }
        assert!(pump.await.unwrap());
        assert!(body.frame().await.is_none(), "the pump is done");
        assert!(!end.is_cancelled());
        // A large frame goes out in pieces, each of which counts as progress.
        let end = CancellationToken::new();
        let (outlet, mut body) = Outlet::open(&metrics, stall, Some(end.clone()));
        assert!(
            outlet
                .send(Bytes::from(vec![7u8; 5 * PIECE_BYTES + 1]))
                .await
        );
        drop(outlet);
        let mut pieces = Vec::new();
        while let Some(frame) = body.frame().await {
            tokio::time::sleep(stall / 2).await;
            pieces.push(frame.unwrap().into_data().unwrap().len());
        }
        assert_eq!(
            pieces,
            [
                PIECE_BYTES,
                PIECE_BYTES,
                PIECE_BYTES,
                PIECE_BYTES,
                PIECE_BYTES,
                1
            ]
        );
        assert!(!end.is_cancelled());
        drop(body);
        // Waiting for its pump (nothing to send) is not stalling either.
        let end = CancellationToken::new();
        let (_outlet, body) = Outlet::open(&metrics, stall, Some(end.clone()));
        tokio::time::sleep(stall * 3).await;
        assert!(!end.is_cancelled());
        assert_eq!(metrics.stalled.load(Relaxed), 1);
        assert_eq!(metrics.open.load(Relaxed), 3);
        drop(body);
        assert_eq!(metrics.open.load(Relaxed), 2);
    }
}
