//! A fault-injecting TCP proxy on loopback, for the agent to dial instead of the relay.
//! It counts the connections it accepts, can hold what the agent sends (bytes wait in the
//! proxy, nothing is dropped) while the relay's answers keep flowing, and can switch its
//! upstream (to a restarted relay, or to none while it is down), which cuts every open
//! connection as a dead relay would.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub url: String,
    accepted: Arc<AtomicUsize>,
    hold: watch::Sender<bool>,
    upstream: Arc<watch::Sender<Option<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let (hold, hold_rx) = watch::channel(false);
        let upstream = Arc::new(watch::Sender::new(Some(upstream)));
        let (counter, shared) = (accepted.clone(), upstream.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let mut changed = shared.subscribe();
                let target = *changed.borrow_and_update();
                let hold_rx = hold_rx.clone();
                tokio::spawn(async move {
                    let Some(target) = target else { return };
                    tokio::select! {
                        _ = pipe(inbound, target, hold_rx) => {}
                        _ = changed.changed() => {}
                    }
                });
            }
        });
        Proxy {
            url,
            accepted,
            hold,
            upstream,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Holds (`true`) or releases (`false`) what the agent sends to the relay.
    pub fn hold(&self, held: bool) {
        self.hold.send_replace(held);
    }

    /// Points new connections at `upstream` (none: accept and close) and cuts open ones.
    pub fn switch(&self, upstream: Option<SocketAddr>) {
        self.upstream.send_replace(upstream);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.upstream.send_replace(None);
    }
}

/// Pipes one connection: relay→agent with `tokio::io::copy`, agent→relay by hand so that
/// it can wait while `hold` is set.
async fn pipe(inbound: TcpStream, upstream: SocketAddr, mut hold: watch::Receiver<bool>) {
    let Ok(outbound) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut from_agent, mut to_agent) = inbound.into_split();
    let (mut from_relay, mut to_relay) = outbound.into_split();
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from_relay, &mut to_agent).await;
        let _ = to_agent.shutdown().await;
    });
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from_agent.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if hold.wait_for(|held| !held).await.is_err() {
            break;
        }
        if to_relay.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to_relay.shutdown().await;
    down.abort();
}
