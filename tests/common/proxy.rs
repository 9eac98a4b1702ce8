//! A fault-injecting TCP proxy on loopback, for the agent (or a client) to dial instead of
//! the relay. It counts the connections it accepts, can hold what the agent sends (bytes
//! wait in the proxy, nothing is dropped) while the relay's answers keep flowing, and can
//! switch its upstream (to a restarted relay, or to none while it is down), which cuts
//! every open connection as a dead relay would.
//!
//! With [`Proxy::inject`] every new connection gets a [`Fault`] from a generator: a reset
//! (RST, both ways) once a given number of bytes went towards the relay (a request cut
//! mid-way) or back (an answer lost after the relay committed), a half-open connection
//! (forwarding stops after some bytes, nothing is closed), latency, a bandwidth cap, or a
//! plain close after a lifetime. [`Proxy::injected`] counts the faults that fired.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What happens to one proxied connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    None,
    /// Reset once this many bytes went towards the relay: a request cut mid-way.
    ResetUp(usize),
    /// Reset once this many bytes came back: an answer lost, perhaps after a commit.
    ResetDown(usize),
    /// Forward this many bytes (both ways together), then nothing more, without closing:
    /// a half-open connection, as a dead NAT mapping leaves it.
    HalfOpen(usize),
    /// Every piece waits this long, both ways; the connection closes after the second
    /// duration (else a slow connection would be the last one).
    Latency(Duration, Duration),
    /// At most this many bytes per second, both ways; closed after the duration.
    Bandwidth(u64, Duration),
    /// A clean close (FIN both ways) after this long, wherever the traffic is.
    CloseAfter(Duration),
}

impl Fault {
    fn name(&self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::ResetUp(_) => "reset towards the relay",
            Fault::ResetDown(_) => "reset towards the client",
            Fault::HalfOpen(_) => "half-open",
            Fault::Latency(..) => "latency",
            Fault::Bandwidth(..) => "bandwidth cap",
            Fault::CloseAfter(_) => "close mid-flight",
        }
    }
}

type Generator = Box<dyn FnMut() -> Fault + Send>;

pub struct Proxy {
    pub url: String,
    accepted: Arc<AtomicUsize>,
    hold: watch::Sender<bool>,
    upstream: Arc<watch::Sender<Option<SocketAddr>>>,
    generator: Arc<Mutex<Option<Generator>>>,
    injected: Arc<Mutex<BTreeMap<&'static str, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let (hold, hold_rx) = watch::channel(false);
        let upstream = Arc::new(watch::Sender::new(Some(upstream)));
        let generator: Arc<Mutex<Option<Generator>>> = Arc::new(Mutex::new(None));
        let injected = Arc::new(Mutex::new(BTreeMap::new()));
        let (counter, shared) = (accepted.clone(), upstream.clone());
        let (faults, fired) = (generator.clone(), injected.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let mut changed = shared.subscribe();
                let target = *changed.borrow_and_update();
                let hold_rx = hold_rx.clone();
                let fault = faults.lock().unwrap().as_mut().map_or(Fault::None, |g| g());
                let fired = fired.clone();
                tokio::spawn(async move {
                    let Some(target) = target else { return };
                    tokio::select! {
                        _ = pipe(inbound, target, hold_rx, fault, fired) => {}
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
            generator,
            injected,
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

    /// From now on each new connection gets the fault `generator` returns (`None` stops).
    pub fn inject(&self, generator: Option<Generator>) {
        *self.generator.lock().unwrap() = generator;
    }

    /// Faults that fired, by kind (latency and bandwidth count once per connection).
    pub fn injected(&self) -> BTreeMap<&'static str, usize> {
        self.injected.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.upstream.send_replace(None);
    }
}

/// One connection's shared state: bytes forwarded each way, and how it ends.
struct Flow {
    fault: Fault,
    up: AtomicUsize,
    down: AtomicUsize,
    /// Ends the connection; `reset` says whether with RST.
    end: CancellationToken,
    reset: AtomicBool,
    /// Forwarding has stopped (half-open).
    stalled: CancellationToken,
    fired: Arc<Mutex<BTreeMap<&'static str, usize>>>,
}

impl Flow {
    fn fire(&self) {
        *self
            .fired
            .lock()
            .unwrap()
            .entry(self.fault.name())
            .or_default() += 1;
    }

    /// How many of `n` bytes may pass now in direction `up`, and what follows.
    fn admit(&self, up: bool, n: usize) -> usize {
        if self.end.is_cancelled() {
            return 0;
        }
        let counter = if up { &self.up } else { &self.down };
        let before = counter.fetch_add(n, Ordering::SeqCst);
        let limit = match self.fault {
            Fault::ResetUp(k) if up => k,
            Fault::ResetDown(k) if !up => k,
            Fault::HalfOpen(k) => {
                let both = self.up.load(Ordering::SeqCst) + self.down.load(Ordering::SeqCst);
                if both >= k && !self.stalled.is_cancelled() {
                    self.stalled.cancel();
                    self.fire();
                }
                return if self.stalled.is_cancelled() {
                    (k + n).saturating_sub(both).min(n)
                } else {
                    n
                };
            }
            _ => return n,
        };
        if before + n >= limit && !self.end.is_cancelled() {
            self.reset.store(true, Ordering::SeqCst);
            self.end.cancel();
            self.fire();
        }
        limit.saturating_sub(before).min(n)
    }
}

/// Pipes one connection both ways, applying `fault`.
async fn pipe(
    inbound: TcpStream,
    upstream: SocketAddr,
    hold: watch::Receiver<bool>,
    fault: Fault,
    fired: Arc<Mutex<BTreeMap<&'static str, usize>>>,
) {
    let Ok(outbound) = TcpStream::connect(upstream).await else {
        return;
    };
    for stream in [&inbound, &outbound] {
        let _ = stream.set_nodelay(true);
        if matches!(fault, Fault::ResetUp(_) | Fault::ResetDown(_)) {
            // Closing then sends RST, as a reset connection does. (Deprecated because a
            // positive linger blocks the thread on drop; a zero one never does.)
            #[allow(deprecated)]
            let _ = stream.set_linger(Some(Duration::ZERO));
        }
    }
    let flow = Arc::new(Flow {
        fault,
        up: AtomicUsize::new(0),
        down: AtomicUsize::new(0),
        end: CancellationToken::new(),
        reset: AtomicBool::new(false),
        stalled: CancellationToken::new(),
        fired,
    });
    let life = match fault {
        Fault::Latency(_, life) | Fault::Bandwidth(_, life) => {
            flow.fire();
            Some(life)
        }
        Fault::CloseAfter(life) => Some(life),
        _ => None,
    };
    if let Some(life) = life {
        let flow = flow.clone();
        tokio::spawn(async move {
            tokio::time::sleep(life).await;
            if !flow.end.is_cancelled() {
                if matches!(flow.fault, Fault::CloseAfter(_)) {
                    flow.fire();
                }
                flow.end.cancel();
            }
        });
    }
    let (from_agent, to_agent) = inbound.into_split();
    let (from_relay, to_relay) = outbound.into_split();
    let up = copy(from_agent, to_relay, true, flow.clone(), Some(hold));
    let down = copy(from_relay, to_agent, false, flow.clone(), None);
    tokio::join!(up, down);
}

/// One direction, until either side or the fault ends the connection.
async fn copy(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    up: bool,
    flow: Arc<Flow>,
    mut hold: Option<watch::Receiver<bool>>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        // `biased`: once the connection has ended, nothing more is read or passed on.
        let n = tokio::select! {
            biased;
            _ = flow.end.cancelled() => break,
            read = from.read(&mut buffer) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
        };
        let delay = match flow.fault {
            Fault::Latency(delay, _) => delay,
            Fault::Bandwidth(per_second, _) => {
                Duration::from_secs_f64(n as f64 / per_second as f64)
            }
            _ => Duration::ZERO,
        };
        let ready = async {
            if let Some(hold) = hold.as_mut() {
                if hold.wait_for(|held| !held).await.is_err() {
                    return false;
                }
            }
            tokio::time::sleep(delay).await;
            true
        };
        let ready = tokio::select! {
            biased;
            _ = flow.end.cancelled() => false,
            ready = ready => ready,
        };
        if !ready {
            break;
        }
        let pass = flow.admit(up, n);
        let written = tokio::select! {
            biased;
            // The fault that ended the connection may be this very piece's: its bytes
            // before the cut still go out.
            _ = flow.end.cancelled(), if pass == 0 => false,
            written = to.write_all(&buffer[..pass]) => written.is_ok(),
        };
        if !written || flow.end.is_cancelled() {
            break;
        }
        if flow.stalled.is_cancelled() {
            // Half-open: keep both sockets open and swallow what comes, until a peer
            // gives up and closes (or the proxy goes).
            loop {
                tokio::select! {
                    biased;
                    _ = flow.end.cancelled() => break,
                    read = from.read(&mut buffer) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    },
                }
            }
            break;
        }
    }
    flow.end.cancel();
    if flow.reset.load(Ordering::SeqCst) {
        // Dropping a write half would send FIN first; the peer must see only the RST
        // that closing the socket (linger 0) sends once both halves are gone.
        to.forget();
    } else {
        let _ = to.shutdown().await;
    }
}
