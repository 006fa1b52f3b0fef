//! A `/metrics` endpoint for applications that have no exporter yet.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use http::{Request, Response, header};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use tower::Service;

use super::{COUNT_BUCKETS, SECONDS_BUCKETS, describe, names};

/// How often the installed recorder's histograms are drained between scrapes.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A `tower::Service<http::Request<B>>` that renders every metric of the
/// process in the Prometheus text exposition format.
///
/// # Examples
///
/// ```no_run
/// use candlewick::metrics::PrometheusService;
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // Once per process, before the serving stack is built.
/// let metrics = PrometheusService::install()?;
/// let response = metrics.oneshot(http::Request::get("/metrics").body(())?).await?;
/// assert_eq!(response.status(), 200);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct PrometheusService {
    handle: PrometheusHandle,
    /// The process's CPU, memory, threads and file descriptors, read at each
    /// scrape; only when the recorder is the global one they go to.
    process: Option<metrics_process::Collector>,
}

impl PrometheusService {
    /// Installs a Prometheus recorder as the process's global recorder, with
    /// this crate's histogram buckets and metric descriptions. Each scrape
    /// also reports the process: `process_cpu_seconds_total`,
    /// `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
    /// `process_open_fds`, `process_max_fds`, `process_threads` (the
    /// standard names, from `metrics-process`).
    ///
    /// A thread drains the histograms' buffers every 5 s, as each scrape
    /// also does: a process nobody scrapes (no route mounted, Prometheus
    /// down) would otherwise keep every sample it ever recorded.
    ///
    /// Fails if a global recorder is already installed.
    pub fn install() -> Result<Self, BuildError> {
        let handle = Self::builder()?.install_recorder()?;
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("candlewick-metrics-upkeep".to_owned())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                }
            });
        if let Err(err) = spawned {
            tracing::warn!(%err, "no metrics upkeep thread: histograms drain only when scraped");
        }
        describe();
        let process = metrics_process::Collector::default();
        process.describe();
        Ok(Self {
            handle,
            process: Some(process),
        })
    }

    /// A builder with this crate's histogram buckets, for applications that
    /// want to adjust it before installing.
    pub fn builder() -> Result<PrometheusBuilder, BuildError> {
        PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)?
            .set_buckets_for_metric(Matcher::Full(names::BATCH_SIZE.to_owned()), COUNT_BUCKETS)?
            .set_buckets_for_metric(Matcher::Full(names::BATCH_COST.to_owned()), COUNT_BUCKETS)?
            .set_buckets_for_metric(
                Matcher::Full(names::BATCH_INPUT_COST.to_owned()),
                COUNT_BUCKETS,
            )
    }

    /// Serves the metrics of an installed recorder.
    ///
    /// Process metrics are not reported: they go through the global
    /// recorder, which this one may not be.
    pub fn from_handle(handle: PrometheusHandle) -> Self {
        Self {
            handle,
            process: None,
        }
    }

    /// The current exposition text.
    pub fn render(&self) -> String {
        if let Some(process) = &self.process {
            process.collect();
        }
        // Upkeep drains the histograms' buffers; once per scrape is enough.
        self.handle.run_upkeep();
        self.handle.render()
    }
}

impl PrometheusService {
    /// The exposition as an HTTP response, with its content type.
    pub fn response(&self) -> Response<String> {
        let mut response = Response::new(self.render());
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        response
    }
}

impl<B> Service<Request<B>> for PrometheusService {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = Ready<Result<Response<String>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<B>) -> Self::Future {
        ready(Ok(self.response()))
    }
}
