//! The accept loop. Each TCP connection gets a place under the connection caps (or is
//! closed at once), a TLS handshake bounded by `header_read_timeout` when TLS is on, the
//! same bound on its first bytes ([`FirstBytesDeadline`]), and then one hyper-util auto
//! connection: HTTP/2 when ALPN or the prior-knowledge preface
//! says so, HTTP/1.1 otherwise. CORS (tower-http) wraps the router when origins are
//! configured. Every connection is watched for graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, AGE, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use http::{HeaderValue, Method};
use hyper::body::Incoming;
use hyper::rt::{Read, Write};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::deadline::FirstBytesDeadline;
use super::limits::{AddrKey, ConnectionLimits};
use super::tls::{daemon_of_certificate, TlsState};
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
    pub certificate_daemon: Option<String>,
}

/// Everything a connection task needs.
struct Shared {
    app: Arc<App>,
    builder: auto::Builder<TokioExecutor>,
    tls: Option<Arc<TlsState>>,
    cors: Option<CorsLayer>,
}

pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    tls: Option<Arc<TlsState>>,
    shutdown: impl Future<Output = ()>,
) {
    let limits = &app.config.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
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
        builder,
        tls,
    });
    let connection_limits = Arc::new(ConnectionLimits::new(limits));
    let graceful = GracefulShutdown::new();
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
        let watcher = graceful.watcher();
        connections.spawn(async move {
            let _open = open;
            let _permit = permit;
            let header_timeout = shared.app.config.limits.header_read_timeout;
            let mut connection = Connection {
                peer,
                addr: AddrKey::of(peer.ip()),
                certificate_daemon: None,
            };
            match &shared.tls {
                None => {
                    let io = FirstBytesDeadline::new(stream, header_timeout);
                    serve_io(&shared, watcher, TokioIo::new(io), connection).await;
                }
                // An address blocked for failed authentication gets no TLS handshake.
                Some(_) if shared.app.limits.is_blocked(connection.addr) => {
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
                            connection.certificate_daemon = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|chain| chain.first())
                                .and_then(daemon_of_certificate);
                            let io = FirstBytesDeadline::new(stream, header_timeout);
                            serve_io(&shared, watcher, TokioIo::new(io), connection).await;
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
        });
    }
    drop(listener);
    tracing::info!("shutting down: answering waiting requests");
    app.shutdown.cancel();
    tokio::select! {
        _ = graceful.shutdown() => {}
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

/// Serves HTTP on one (plain or TLS) stream until it closes.
async fn serve_io<I>(shared: &Shared, watcher: Watcher, io: I, connection: Connection)
where
    I: Read + Write + Unpin + Send + 'static,
{
    let peer = connection.peer;
    let app = shared.app.clone();
    let connection = Arc::new(connection);
    let router = tower::service_fn(move |request: http::Request<Incoming>| {
        let app = app.clone();
        let connection = connection.clone();
        async move { Ok::<_, Infallible>(router::handle(app, connection, request).await) }
    });
    let service = ServiceBuilder::new()
        .option_layer(shared.cors.clone())
        .service(router);
    let connection = shared
        .builder
        .serve_connection(io, TowerToHyperService::new(service))
        .into_owned();
    if let Err(err) = watcher.watch(connection).await {
        tracing::debug!(%peer, error = %err, "connection ended with an error");
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
