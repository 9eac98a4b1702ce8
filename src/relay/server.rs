//! The accept loop. Each TCP connection gets a place under the connection caps (or is
//! closed at once), a TLS handshake bounded by `header_read_timeout` when TLS is on, the
//! same bound on its first bytes ([`FirstBytesDeadline`]), and then one hyper-util auto
//! connection: HTTP/2 when ALPN or the prior-knowledge preface
//! says so, HTTP/1.1 otherwise. CORS (tower-http) wraps the router when origins are
//! configured. Every connection is watched for graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, AGE, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use http::{HeaderValue, Method};
use hyper::body::Incoming;
use hyper::rt::{Read, Write};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::deadline::FirstBytesDeadline;
use super::limits::{AddrKey, ConnectionLimits};
use super::outlet::{self, StreamExecutor};
use super::tls::{ClientIdentity, TlsState};
use super::{router, App};
use crate::config::CorsConfig;

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// HTTP/2 PINGs keep idle long-poll connections alive through NATs and detect dead peers.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// What the router knows of a request's connection.
#[derive(Debug)]
pub struct Connection {
    pub peer: SocketAddr,
    /// The source address as the limits group it.
    pub addr: AddrKey,
    /// The daemon a verified TLS client certificate names.
    pub certificate: Option<ClientIdentity>,
}

/// Everything a connection task needs.
struct Shared {
    app: Arc<App>,
    routes: axum::Router,
    builder: auto::Builder<StreamExecutor>,
    tls: Option<Arc<TlsState>>,
    cors: Option<CorsLayer>,
}

pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    routes: axum::Router,
    tls: Option<Arc<TlsState>>,
    shutdown: impl Future<Output = ()>,
) {
    let limits = &app.config.limits;
    let mut builder = auto::Builder::new(StreamExecutor);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .max_concurrent_streams(limits.max_streams_per_connection)
        .max_header_list_size(limits.max_header_bytes as u32);
    let shared = Arc::new(Shared {
        cors: cors_layer(&app.config.cors),
        app: app.clone(),
        routes,
        builder,
        tls,
    });
    let connection_limits = Arc::new(ConnectionLimits::new(limits));
    // Every connection task, so that none can outlive `serve` and write to a closed store.
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            // Reap finished connections as we go.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = &mut shutdown => break,
        };
        let Some(permit) = connection_limits.admit(peer.ip()) else {
            app.metrics
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "connection cap reached; closing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        app.metrics
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        let open = OpenConnection::new(&app);
        let shared = shared.clone();
        // Every log line of the connection, and of each request on it, names the peer.
        let span = tracing::info_span!("connection", %peer);
        let task = tracing::Instrument::instrument(
            async move {
                let _open = open;
                let _permit = permit;
                let header_timeout = shared.app.config.limits.header_read_timeout;
                let mut connection = Connection {
                    peer,
                    addr: AddrKey::of(peer.ip()),
                    certificate: None,
                };
                match &shared.tls {
                    None => {
                        let io = FirstBytesDeadline::new(stream, header_timeout);
                        serve_io(&shared, TokioIo::new(io), connection).await;
                    }
                    // A handshake costs more than a request: it is charged to the address's
                    // request budget, and an address blocked for failed authentication or
                    // over its budget gets none.
                    Some(_) if shared.app.limits.check_address(connection.addr).is_err() => {
                        shared
                            .app
                            .metrics
                            .rate_limited
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Some(tls) => {
                        let handshake =
                            tokio::time::timeout(header_timeout, tls.acceptor().accept(stream));
                        // Shutdown does not wait for handshakes: they have nothing to finish.
                        let handshake = tokio::select! {
                            handshake = handshake => handshake,
                            _ = shared.app.shutdown.cancelled() => return,
                        };
                        match handshake {
                            Ok(Ok(stream)) => {
                                connection.certificate = stream
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|chain| tls.identity(chain));
                                let io = FirstBytesDeadline::new(stream, header_timeout);
                                serve_io(&shared, TokioIo::new(io), connection).await;
                            }
                            Ok(Err(err)) => {
                                shared
                                    .app
                                    .metrics
                                    .tls_handshake_failures
                                    .fetch_add(1, Ordering::Relaxed);
                                // A refused client certificate is a failed authentication;
                                // probes and clients that dislike our certificate are not.
                                if refused_client_certificate(&err) {
                                    let _ = shared.app.limits.auth_failed(connection.addr);
                                }
                                tracing::debug!(%peer, error = %err, "TLS handshake failed");
                            }
                            Err(_) => {
                                shared
                                    .app
                                    .metrics
                                    .tls_handshake_failures
                                    .fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(%peer, "TLS handshake timed out");
                            }
                        }
                    }
                }
            },
            span,
        );
        connections.spawn(task);
    }
    drop(listener);
    tracing::info!("shutting down: answering waiting requests");
    // Every connection task sees the token and shuts its connection down gracefully.
    app.shutdown.cancel();
    tokio::select! {
        _ = async { while connections.join_next().await.is_some() {} } => {}
        _ = tokio::time::sleep(app.config.server.shutdown_grace) => {
            tracing::warn!("connections still open after the grace period; closing them");
        }
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

/// Counts a connection in `connections_open` for as long as it lives.
struct OpenConnection(Arc<App>);

impl OpenConnection {
    fn new(app: &Arc<App>) -> OpenConnection {
        app.metrics.connections_open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(app.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0
            .metrics
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether a failed handshake failed on the client's certificate.
fn refused_client_certificate(err: &std::io::Error) -> bool {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|err| {
            matches!(
                err,
                rustls::Error::InvalidCertificate(_) | rustls::Error::InvalidCertRevocationList(_)
            )
        })
}

/// Requests in flight on one connection; a connection with none for a while is closed.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    /// Whether any request has begun on the connection.
    served: AtomicBool,
    changed: Notify,
}

/// One request in flight, until its response body is done (or dropped).
struct InFlight(Arc<Activity>);

impl Activity {
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.served.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
        InFlight(self.clone())
    }

    /// Resolves once no request has been in flight for `idle` (for `first` while none
    /// has begun yet).
    async fn idle(&self, first: Duration, idle: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) > 0 {
                changed.await;
                continue;
            }
            let limit = if self.served.load(Ordering::SeqCst) {
                idle
            } else {
                first
            };
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep(limit) => return,
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// A response body that keeps its request counted as in flight until it is done. (The
/// default, empty and counting nothing, is CORS's preflight answer.)
#[derive(Default)]
struct CountedBody {
    body: axum::body::Body,
    _in_flight: Option<InFlight>,
}

impl hyper::body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves HTTP on one (plain or TLS) stream until it closes: gracefully (in-flight
/// requests finish) at shutdown, or once idle for `idle_timeout` (`header_read_timeout`
/// before the first request: HTTP/2 has no header timeout of its own). An HTTP/1.1
/// response whose reader stalls closes it at once (see [`outlet`]).
async fn serve_io<I>(shared: &Shared, io: I, connection: Connection)
where
    I: Read + Write + Unpin + Send + 'static,
{
    let end = tokio_util::sync::CancellationToken::new();
    outlet::scope(end.clone(), serve_until(shared, io, connection, end)).await
}

async fn serve_until<I>(
    shared: &Shared,
    io: I,
    connection: Connection,
    end: tokio_util::sync::CancellationToken,
) where
    I: Read + Write + Unpin + Send + 'static,
{
    let peer = connection.peer;
    let app = shared.app.clone();
    let routes = shared.routes.clone();
    let connection = Arc::new(connection);
    let activity = Arc::new(Activity::default());
    let counted = activity.clone();
    let router = tower::service_fn(move |request: http::Request<Incoming>| {
        let app = app.clone();
        let routes = routes.clone();
        let connection = connection.clone();
        let in_flight = counted.begin();
        async move {
            // Boxed: hyper keeps each HTTP/2 stream's task (sized for this future) for
            // as long as the response body lives, and a sync stream's lives for hours.
            let response = Box::pin(router::handle(app, routes, connection, request)).await;
            Ok::<_, Infallible>(response.map(|body| CountedBody {
                body,
                _in_flight: Some(in_flight),
            }))
        }
    });
    let service = ServiceBuilder::new()
        .option_layer(shared.cors.clone())
        .service(router);
    let limits = &shared.app.config.limits;
    let connection = shared
        .builder
        .serve_connection(io, TowerToHyperService::new(service));
    tokio::pin!(connection);
    let mut closing = false;
    // An idle connection closing gracefully has nothing in flight: if the peer does not
    // take part (HTTP/2 waits for a PING answer), it is dropped after this.
    let idle_close = tokio::time::sleep(Duration::MAX);
    tokio::pin!(idle_close);
    let mut idle_closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(%peer, error = %err, "connection ended with an error");
                }
                return;
            }
            _ = shared.app.shutdown.cancelled(), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = activity.idle(limits.header_read_timeout, limits.idle_timeout), if !closing => {
                closing = true;
                idle_closing = true;
                idle_close
                    .as_mut()
                    .reset(tokio::time::Instant::now() + limits.header_read_timeout);
                connection.as_mut().graceful_shutdown();
            }
            _ = end.cancelled() => {
                tracing::debug!(%peer, "a response's reader stalled; closing its connection");
                return;
            }
            _ = &mut idle_close, if idle_closing => {
                tracing::debug!(%peer, "idle connection did not close gracefully; dropping it");
                return;
            }
        }
    }
}
/// The CORS policy for browser clients; `None` when no origin is allowed.
fn cors_layer(config: &CorsConfig) -> Option<CorsLayer> {
    if config.allowed_origins.is_empty() {
        return None;
    }
    let origins = if config.allowed_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            config
                .allowed_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    let header = HeaderName::from_static;
    Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([
                Method::GET,
                Method::HEAD,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([
                AUTHORIZATION,
                CONTENT_TYPE,
                CACHE_CONTROL,
                header("prefer"),
                header("idempotency-key"),
                header("last-event-id"),
                header("x-syncrelay-if-offline"),
            ])
            .expose_headers([
                LOCATION,
                AGE,
                http::header::RETRY_AFTER,
                header("preference-applied"),
                header("x-syncrelay-source"),
            ])
            .max_age(config.max_age),
    )
}
