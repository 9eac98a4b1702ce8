//! A deadline for a connection's first bytes. hyper's `header_read_timeout` only starts
//! once hyper-util's auto builder has told HTTP/1.1 from HTTP/2, and that detection waits
//! for up to 24 bytes with no time limit: a client that connects and stays silent (or
//! stops inside the HTTP/2 preface) would hold its connection slot forever.
//! [`FirstBytesDeadline`] fails the read with `TimedOut` if the protocol is not known by
//! the deadline: when the first bytes differ from the HTTP/2 preface it is HTTP/1.1 (and
//! hyper's header timeout takes over), when the whole preface has arrived it is HTTP/2
//! (and keep-alive PINGs take over). After that the wrapper only passes bytes through.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub struct FirstBytesDeadline<I> {
    inner: I,
    /// `None` once the protocol is known.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Bytes of the HTTP/2 preface matched so far.
    matched: usize,
}

impl<I> FirstBytesDeadline<I> {
    pub fn new(inner: I, timeout: Duration) -> Self {
        FirstBytesDeadline {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            matched: 0,
        }
    }

    /// Follows the preface over newly read bytes; disarms once the protocol is known.
    fn observe(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if H2_PREFACE[self.matched] != byte {
                self.deadline = None;
                return;
            }
            self.matched += 1;
            if self.matched == H2_PREFACE.len() {
                self.deadline = None;
                return;
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FirstBytesDeadline<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.deadline.is_some() {
                    let fresh = buf.filled()[before..].to_vec();
                    this.observe(&fresh);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request within the timeout",
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FirstBytesDeadline<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn silence_times_out_but_http1_and_h2_disarm_it() {
        let timeout = Duration::from_millis(100);
        // Silent: the read fails at the deadline.
        let (client, server) = tokio::io::duplex(64);
        let mut io = FirstBytesDeadline::new(server, timeout);
        let err = io.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(client);

        // Half a preface, then silence: still armed.
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = FirstBytesDeadline::new(server, timeout);
        client.write_all(&H2_PREFACE[..5]).await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(io.read(&mut buf).await.unwrap(), 5);
        assert!(io.read(&mut buf).await.is_err());

        // HTTP/1.1 and the full preface disarm it: later silence is someone else's job.
        for first in [&b"GET / HTTP/1.1\r\n"[..], H2_PREFACE] {
            let (mut client, server) = tokio::io::duplex(64);
            let mut io = FirstBytesDeadline::new(server, timeout);
            client.write_all(first).await.unwrap();
            io.read_exact(&mut vec![0u8; first.len()]).await.unwrap();
            let late = tokio::time::timeout(timeout * 3, io.read(&mut buf)).await;
            assert!(late.is_err(), "no error while the client is quiet");
        }
    }
}
