//! The control plane on a listener and a thread of its own.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Semaphore, oneshot};

use super::ProbeService;

/// The longest header timeout taken as given.
const A_YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// Probes (and, with the `prometheus` feature, `/metrics`) served on a
/// listener of their own by a thread of their own, with its own
/// single-threaded runtime: the control plane never waits behind the data
/// plane, however busy the application's runtime and the replicas are.
///
/// Like Envoy's admin listener or linkerd's admin port: Kubernetes probes
/// and Prometheus scrapes go to this port, and answer from health state
/// alone. Dropping the server (or [`shutdown`](Self::shutdown)) stops it.
///
/// # Examples
///
/// ```
/// use candle_core::Device;
/// use candlewick::{BoxError, Serving, ServingConfig};
/// use std::io::{Read, Write};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let loader = |_: &Device| -> Result<_, BoxError> {
///     Ok(|batch: &[u8]| -> Result<Vec<u8>, BoxError> { Ok(batch.to_vec()) })
/// };
/// let serving = Serving::start(loader, ServingConfig::default())?;
/// let admin = serving.admin().bind("127.0.0.1:0".parse()?)?;
///
/// // Any HTTP client; here, by hand.
/// let mut stream = std::net::TcpStream::connect(admin.local_addr())?;
/// stream.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
/// let mut response = String::new();
/// stream.read_to_string(&mut response)?;
/// assert!(response.starts_with("HTTP/1.1 200"));
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct AdminServer {
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Settings of an [`AdminServer`]; see [`AdminServer::builder`].
#[derive(Debug, Clone)]
pub struct AdminBuilder {
    routes: Routes,
    max_connections: usize,
    header_timeout: Duration,
}

#[derive(Debug, Clone)]
struct Routes {
    probes: ProbeService,
    #[cfg(feature = "prometheus")]
    metrics: Option<(String, crate::metrics::PrometheusService)>,
}

impl AdminServer {
    /// A server answering `probes`, with at most 256 connections at once, a
    /// 2 s limit to send a request's headers (which also closes idle
    /// connections), and connections closed after six times that. Probes
    /// and scrapes send their request at once, so a client that holds a
    /// connection silent gives its slot back soon.
    pub fn builder(probes: ProbeService) -> AdminBuilder {
        AdminBuilder {
            routes: Routes {
                probes,
                #[cfg(feature = "prometheus")]
                metrics: None,
            },
            max_connections: 256,
            header_timeout: Duration::from_secs(2),
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes the connections and joins the thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

impl AdminBuilder {
    /// Also serves `service`'s Prometheus text on `path` (e.g. `/metrics`).
    #[cfg(feature = "prometheus")]
    #[cfg_attr(docsrs, doc(cfg(feature = "prometheus")))]
    pub fn metrics(
        mut self,
        path: impl Into<String>,
        service: crate::metrics::PrometheusService,
    ) -> Self {
        self.routes.metrics = Some((path.into(), service));
        self
    }

    /// At most `connections` at once; further ones wait in the listen
    /// backlog. Default: 256.
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections.clamp(1, Semaphore::MAX_PERMITS);
        self
    }

    /// How long a client may take to send a request's headers, counted
    /// from when the connection waits for a request (so it also closes idle
    /// connections). Default: 2 s. (Zero would close every connection
    /// before its first request: choose at least the time a client needs.
    /// Beyond a year is a year: hyper adds it to the clock.)
    pub fn header_timeout(mut self, timeout: Duration) -> Self {
        self.header_timeout = timeout.min(A_YEAR);
        self
    }

    /// Binds `addr` and starts serving on a thread of its own.
    ///
    /// # Errors
    ///
    /// When the address cannot be bound, or the thread or its runtime
    /// cannot be started.
    pub fn bind(self, addr: SocketAddr) -> std::io::Result<AdminServer> {
        let runtime = OwnRuntime(Some(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        ));
        let listener = {
            let _runtime = runtime.get().enter();
            listen(addr, 1024)?
        };
        let local_addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("candlewick-admin".to_owned())
            .spawn(move || runtime.get().block_on(self.serve(listener, stopped)))?;
        Ok(AdminServer {
            local_addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    async fn serve(self, listener: tokio::net::TcpListener, mut stopped: oneshot::Receiver<()>) {
        let slots = Arc::new(Semaphore::new(self.max_connections));
        loop {
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => slot.expect("never closed"),
                _ = &mut stopped => return,
            };
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        // Out of file descriptors, most likely: back off.
                        tracing::warn!(%err, "admin listener cannot accept");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut stopped => return,
            };
            let routes = self.routes.clone();
            let lifetime = self.header_timeout.saturating_mul(6);
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(self.header_timeout)
                .serve_connection(
                    TokioIo::new(stream),
                    hyper::service::service_fn(move |request| {
                        std::future::ready(Ok::<_, Infallible>(routes.answer(&request)))
                    }),
                );
            tokio::spawn(async move {
                let _slot = slot;
                // Probes are short: a connection that outlives this (a
                // client that stops reading its responses) gives its slot back.
                let _ = tokio::time::timeout(lifetime, connection).await;
            });
        }
    }
}

/// The admin thread's runtime. Dropped on an error path in the caller (maybe
/// inside an async context, where dropping a runtime panics), it shuts down
/// in the background instead.
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl OwnRuntime {
    fn get(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("present until dropped")
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// A listener on `addr` with room for `backlog` connections not yet
/// accepted (the standard library's default, 128, drops connections of a
/// burst the acceptor has not reached yet).
pub fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

impl Routes {
    fn answer<B>(&self, request: &Request<B>) -> Response<String> {
        let path = request.uri().path();
        #[cfg(feature = "prometheus")]
        if let Some((metrics_path, metrics)) = &self.metrics
            && path == metrics_path
        {
            return metrics.response();
        }
        self.probes.respond(path)
    }
}
