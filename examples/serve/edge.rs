//! The HTTP edge: a bounded number of connections, each held to timeouts
//! from hyper (headers, idle keep-alive), tower-http (body, whole request)
//! and [`WriteTimeout`] (a response nobody reads), with JSON errors wherever
//! a response is still possible, and a graceful close on shutdown. W3C
//! `traceparent` continues into the request span.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::{Request, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use pin_project::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tower::ServiceBuilder;
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;

use crate::api::{self, ApiError};

/// The limits a client is held to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// To send a request's headers, counted from when the connection waits
    /// for a request: it also closes idle keep-alive connections.
    pub(crate) header_timeout: Duration,
    /// For a response write to make any progress.
    pub(crate) write_timeout: Duration,
    /// Between two pieces of a request body.
    pub(crate) body_timeout: Duration,
    /// For a whole request, from its headers to its response.
    pub(crate) request_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub(crate) max_connections: usize,
}

/// Wraps `app` in the request-level limits and the trace span.
pub(crate) fn layers(app: Router, limits: Limits) -> Router {
    app.layer(
        ServiceBuilder::new()
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(request_span)
                    // Errors are answered and counted (candlewick_requests_total);
                    // a log line each would flood the logs under overload.
                    .on_failure(DefaultOnFailure::new().level(Level::DEBUG)),
            )
            .layer(HandleErrorLayer::new(
                |uri: Uri, _: tower::BoxError| async move {
                    let err = ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "timeout",
                        "the request took longer than the server's request timeout",
                    );
                    api::in_shape_of(&uri, err)
                },
            ))
            .timeout(limits.request_timeout)
            .layer(RequestBodyTimeoutLayer::new(limits.body_timeout)),
    )
}

/// The span of one HTTP request; it continues the caller's W3C trace when a
/// valid `traceparent` header came with it.
fn request_span<B>(request: &Request<B>) -> tracing::Span {
    let (trace_id, parent_id) = request
        .headers()
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .and_then(parse_traceparent)
        .unzip();
    tracing::info_span!(
        "http.request",
        method = %request.method(),
        path = request.uri().path(),
        trace_id,
        parent_span_id = parent_id,
    )
}

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`; the ids, if valid.
fn parse_traceparent(value: &str) -> Option<(&str, &str)> {
    let mut parts = value.trim().split('-');
    let (version, trace_id, parent_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    (version == "00"
        && parts.next().is_none()
        && hex(trace_id, 32)
        && nonzero(trace_id)
        && hex(parent_id, 16)
        && nonzero(parent_id)
        && hex(flags, 2))
    .then_some((trace_id, parent_id))
}

/// Serves `app` on `listener` until `shutdown` completes, then stops
/// accepting and lets open connections finish their requests (at most
/// `grace`).
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let connections = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors, most likely: back off.
                    tracing::warn!(%err, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let stream = WriteTimeout::new(stream, limits.write_timeout);
        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            let _slot = slot;
            let _ = connection.await;
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, connections.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "connections still open after the grace period; closing"
        );
    }
}

/// A connection whose writes must make progress within `timeout`. Once the
/// socket's buffers are full, a client that stops reading would otherwise
/// hold its connection, and one of the server's connection slots, forever:
/// hyper has no write timeout, and the request timeout ends when the
/// response is handed over, not when it is sent.
#[pin_project]
struct WriteTimeout<S> {
    #[pin]
    inner: S,
    timeout: Duration,
    /// Runs while a write is blocked; made once, then reset.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether `timer` runs: a write blocked, with no progress since.
    stalled: bool,
}

impl<S> WriteTimeout<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            timer: None,
            stalled: false,
        }
    }
}

/// `poll`, an operation of a write, under the stall timer: started when it
/// blocks, stopped by any progress, an error once it ran out.
fn timed<T>(
    timer: &mut Option<Pin<Box<Sleep>>>,
    stalled: &mut bool,
    timeout: Duration,
    cx: &mut Context<'_>,
    poll: Poll<io::Result<T>>,
) -> Poll<io::Result<T>> {
    if poll.is_ready() {
        *stalled = false;
        return poll;
    }
    if !std::mem::replace(stalled, true) {
        // A timeout too long for the clock never runs out.
        match tokio::time::Instant::now().checked_add(timeout) {
            Some(deadline) => match timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => *timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            },
            None => *timer = None,
        }
    }
    let Some(timer) = timer else {
        return Poll::Pending;
    };
    match timer.as_mut().poll(cx) {
        Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading its response",
        ))),
        Poll::Pending => Poll::Pending,
    }
}

impl<S: AsyncRead> AsyncRead for WriteTimeout<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite> AsyncWrite for WriteTimeout<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let poll = this.inner.poll_write(cx, buf);
        timed(this.timer, this.stalled, *this.timeout, cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let poll = this.inner.poll_write_vectored(cx, bufs);
        timed(this.timer, this.stalled, *this.timeout, cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let poll = this.inner.poll_flush(cx);
        timed(this.timer, this.stalled, *this.timeout, cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let poll = this.inner.poll_shutdown(cx);
        timed(this.timer, this.stalled, *this.timeout, cx, poll)
    }
}
