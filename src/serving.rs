//! The standard stack in one call: a [`Pool`] of replicas behind a [`Batch`].
//!
//! # Examples
//!
//! ```
//! use candle_core::Device;
//! use candlewick::{BoxError, Serving, ServingConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let loader = |_: &Device| -> Result<_, BoxError> {
//!     Ok(|batch: &[String]| -> Result<Vec<usize>, BoxError> {
//!         Ok(batch.iter().map(|text| text.len()).collect())
//!     })
//! };
//! let serving = Serving::start(loader, ServingConfig::default())?;
//!
//! // A cheap handle: clone it into every task that needs the model.
//! let handle = serving.clone();
//! let n = tokio::spawn(async move { handle.infer("hello".to_owned()).await }).await??;
//! assert_eq!(n, 5);
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project::pin_project;
use tower::Service;

use crate::BoxError;
use crate::batch::{self, Batch, BatchConfig, BatchLayer, DrainReport, RequestOptions};
use crate::error::ModelFailed;
use crate::health::{Health, HealthConfig, Lifecycle, ProbePaths, ProbeService};
use crate::model::{Loader, Model, ModelInfo};
use crate::pool::{Pool, PoolConfig, PoolError, ReplicaStatus};

/// Everything the standard stack runs with.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default))]
#[non_exhaustive]
pub struct ServingConfig {
    /// Where the replicas run.
    pub pool: PoolConfig,
    /// How requests are batched and admitted.
    pub batch: BatchConfig,
    /// When the service counts as started, ready and live.
    pub health: HealthConfig,
    /// What is being served: labels every metric, and is reported by
    /// [`Serving::model`].
    pub model: ModelInfo,
    /// How long a shutdown may take to finish accepted work
    /// ([`Serving::shutdown_within`]); the generated Kubernetes grace period
    /// is derived from it. Default: 30 s.
    pub drain_timeout: Duration,
    /// Where the probes are served (used by [`ProbeService`] and by the
    /// generated Kubernetes probes).
    ///
    /// [`ProbeService`]: crate::health::ProbeService
    pub probes: ProbePaths,
    /// The port of the admin listener, when probes and metrics are served
    /// apart from the data plane ([`Serving::admin`]); the generated
    /// Kubernetes objects then point probes and Prometheus at it. Default:
    /// none (they share the application's port).
    pub admin_port: Option<u16>,
}

impl Default for ServingConfig {
    fn default() -> Self {
        Self {
            pool: PoolConfig::default(),
            batch: BatchConfig::default(),
            health: HealthConfig::default(),
            model: ModelInfo::default(),
            drain_timeout: Duration::from_secs(30),
            probes: ProbePaths::default(),
            admin_port: None,
        }
    }
}

impl ServingConfig {
    /// A configuration from its pool and batching parts, with default health
    /// thresholds and probe paths.
    pub fn new(pool: PoolConfig, batch: BatchConfig) -> Self {
        Self {
            pool,
            batch,
            ..Self::default()
        }
    }

    /// Sets [`model`](Self::model).
    pub fn with_model(mut self, model: ModelInfo) -> Self {
        self.model = model;
        self
    }

    /// Sets [`drain_timeout`](Self::drain_timeout).
    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Sets [`health`](Self::health).
    pub fn with_health(mut self, health: HealthConfig) -> Self {
        self.health = health;
        self
    }

    /// Sets [`admin_port`](Self::admin_port).
    pub fn with_admin_port(mut self, port: Option<u16>) -> Self {
        self.admin_port = port;
        self
    }

    /// Sets [`probes`](Self::probes).
    pub fn with_probes(mut self, probes: ProbePaths) -> Self {
        self.probes = probes;
        self
    }
}

/// A running model: replicas on devices behind a batching queue.
///
/// Cheap to clone; all clones share the replicas and the queue. The replicas
/// stop once the last clone is dropped and the queued requests are answered.
/// Also a `Service<I, Response = O>` for use inside tower stacks.
pub struct Serving<I, O> {
    batch: Batch<I, Result<O, ModelFailed>>,
    pool: Pool<I, O>,
    health: Health,
    probes: ProbePaths,
    model: Arc<ModelInfo>,
    drain_timeout: Duration,
}

impl<I, O> std::fmt::Debug for Serving<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving")
            .field("model", &self.model)
            .field("batch", &self.batch)
            .field("pool", &self.pool)
            .field("health", &self.health)
            .finish()
    }
}

impl<O> std::fmt::Debug for ResponseFuture<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<I, O> Clone for Serving<I, O> {
    fn clone(&self) -> Self {
        Self {
            batch: self.batch.clone(),
            pool: self.pool.clone(),
            health: self.health.clone(),
            probes: self.probes.clone(),
            model: self.model.clone(),
            drain_timeout: self.drain_timeout,
        }
    }
}

impl<I, O> Serving<I, O>
where
    I: Send + 'static,
    O: Send + 'static,
{
    /// Starts the replicas of `config.pool`, each loading a model with
    /// `loader`, and the batch worker on the current tokio runtime.
    ///
    /// Returns at once; the replicas load in the background.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn start<L>(loader: L, config: ServingConfig) -> Result<Self, PoolError>
    where
        L: Loader<I>,
        L::Model: Model<I, Output = O>,
    {
        let loader = Arc::new(loader);
        let model = config.model;
        let pool = Pool::from_arc(loader.clone(), config.pool, &model)?;
        let (batch_config, hooks) = BatchLayer::new(config.batch)
            .hooks_from(loader)
            .model(&model)
            .into_hooks();
        let batch = Batch::with_hooks(pool.clone(), batch_config, hooks, Result::is_err);
        let health = Health::new(config.health, pool.roster_source(), batch.stopped_probe());
        health.publish_state(&crate::metrics::labels(&model, &[]));
        publish_model_info(&model);
        Ok(Self {
            batch,
            pool,
            health,
            probes: config.probes,
            model: Arc::new(model),
            drain_timeout: config.drain_timeout,
        })
    }

    /// Runs the model on one input. See [`Batch::infer`].
    pub async fn infer(&self, input: I) -> Result<O, BoxError> {
        Ok(self.batch.infer(input).await??)
    }

    /// Like [`infer`](Self::infer), with a deadline and priority of its own.
    pub async fn infer_with(&self, input: I, options: RequestOptions) -> Result<O, BoxError> {
        Ok(self.batch.infer_with(input, options).await??)
    }
}

impl<I, O> Serving<I, O> {
    /// The batching service, which answers each input with the outcome of the
    /// model for it.
    pub fn batch(&self) -> &Batch<I, Result<O, ModelFailed>> {
        &self.batch
    }

    /// A snapshot of every replica.
    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        self.pool.replicas()
    }

    /// What this stack serves.
    pub fn model(&self) -> &ModelInfo {
        &self.model
    }

    /// The health of this stack: started, ready, live.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Waits until every replica has loaded once or settled as failed (see
    /// [`Health::started`]).
    ///
    /// Fails with [`Closed`](crate::error::Closed), naming each replica's
    /// reason, when no replica can ever serve: every one failed for good
    /// (its loader reported an [`Unrecoverable`](crate::error::Unrecoverable)
    /// error, or its thread could not start). A server that must not run
    /// without its model awaits this beside its listener and exits with the
    /// message.
    pub async fn started(&self) -> Result<(), BoxError> {
        let mut watch = self.health.watch();
        loop {
            // Started first: failing for good never reverses, so a replica
            // that settled by failing is seen as such below.
            let started = self.health.started().ok;
            if let Some(closed) = self.pool.unavailable() {
                return Err(closed.into());
            }
            if started {
                return Ok(());
            }
            watch.changed().await;
        }
    }

    /// The probe endpoints for this stack, on the configured paths.
    pub fn probes(&self) -> ProbeService {
        ProbeService::new(self.health.clone(), self.probes.clone())
    }

    /// An [`AdminServer`](crate::health::AdminServer) for this stack's
    /// probes on the configured paths: add `/metrics` and bind it.
    #[cfg(feature = "admin")]
    #[cfg_attr(docsrs, doc(cfg(feature = "admin")))]
    pub fn admin(&self) -> crate::health::AdminBuilder {
        crate::health::AdminServer::builder(self.probes())
    }

    /// Shuts down gracefully: readiness turns off at once, new requests get
    /// [`Draining`](crate::error::Draining), queued and running requests
    /// finish until `deadline`, and whatever is left then is answered with
    /// [`Closed`](crate::error::Closed). See [`Batch::drain`].
    pub async fn shutdown(&self, deadline: tokio::time::Instant) -> DrainReport {
        self.shutdown_until(deadline).await
    }

    /// [`shutdown`](Self::shutdown) within the configured
    /// [`drain_timeout`](ServingConfig::drain_timeout) from now.
    pub async fn shutdown_within(&self) -> DrainReport {
        let now = tokio::time::Instant::now();
        self.shutdown_until(crate::contain::saturating_deadline(now, self.drain_timeout))
            .await
    }

    async fn shutdown_until(&self, deadline: tokio::time::Instant) -> DrainReport {
        self.health.set_lifecycle(Lifecycle::Draining);
        let report = self.batch.drain(deadline).await;
        self.health.set_lifecycle(Lifecycle::Stopped);
        report
    }
}

impl<I, O> Service<I> for Serving<I, O>
where
    I: Send + 'static,
    O: Send + 'static,
{
    type Response = O;
    type Error = BoxError;
    type Future = ResponseFuture<O>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.batch.poll_ready(cx)
    }

    fn call(&mut self, input: I) -> Self::Future {
        ResponseFuture {
            inner: self.batch.call(input),
        }
    }
}

/// Sets the [`MODEL_INFO`](crate::metrics::names::MODEL_INFO) gauge.
fn publish_model_info(model: &ModelInfo) {
    let unknown = || "unknown".to_owned();
    let labels = crate::metrics::labels(
        model,
        &[
            ("revision", model.revision.clone().unwrap_or_else(unknown)),
            (
                "data_snapshot",
                model.data_snapshot.clone().unwrap_or_else(unknown),
            ),
            ("approval", model.approval.as_str().to_owned()),
        ],
    );
    metrics::gauge!(crate::metrics::names::MODEL_INFO, labels).set(1.0);
}

/// The answer of a [`Serving`] to one request.
#[pin_project]
pub struct ResponseFuture<O> {
    #[pin]
    inner: batch::future::ResponseFuture<Result<O, ModelFailed>>,
}

impl<O> Future for ResponseFuture<O> {
    type Output = Result<O, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(ready!(self.project().inner.poll(cx))??))
    }
}
