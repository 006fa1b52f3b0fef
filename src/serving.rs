//! The standard stack in one call: a [`Pool`] of replicas behind a [`Batch`],
//! with [`Health`] and metrics attached.

use std::sync::Arc;
use std::time::Duration;

use tower::layer::util::{Identity, Stack};
use tower::{Layer, Service, ServiceBuilder};

use crate::BoxError;
use crate::batch::future::ResponseFuture;
use crate::batch::{Batch, BatchConfig, BatchLayer, DrainReport, Request};
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
/// Also a `Service<Request<I>, Response = O>` for use inside tower stacks.
///
/// # Examples
///
/// ```
/// use candle_core::Device;
/// use candlewick::{BoxError, Serving, ServingConfig};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let loader = |_: &Device| -> Result<_, BoxError> {
///     Ok(|batch: &[String]| -> Result<Vec<usize>, BoxError> {
///         Ok(batch.iter().map(|text| text.len()).collect())
///     })
/// };
/// let serving = Serving::start(loader, ServingConfig::default())?;
///
/// // A cheap handle: clone it into every task that needs the model.
/// let handle = serving.clone();
/// let n = tokio::spawn(async move { handle.infer("hello".to_owned()).await }).await??;
/// assert_eq!(n, 5);
/// # Ok(())
/// # }
/// ```
pub struct Serving<I, O> {
    batch: Batch<I, O>,
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
    /// `loader`, and the batch worker on the current tokio runtime. Use
    /// [`ServingBuilder`] to add layers between the batcher and the pool.
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
        ServingBuilder::new(loader, config).start()
    }

    /// Runs the model on one input, or on a [`Request`] with a deadline and
    /// priority of its own. See [`Batch::infer`].
    pub async fn infer(&self, request: impl Into<Request<I>>) -> Result<O, BoxError> {
        self.batch.infer(request).await
    }
}

impl<I, O> Serving<I, O> {
    /// The batching service, which answers each input with the outcome of the
    /// model for it.
    pub fn batch(&self) -> &Batch<I, O> {
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
        self.health.set_lifecycle(Lifecycle::Draining);
        let report = self.batch.drain(deadline).await;
        self.health.set_lifecycle(Lifecycle::Stopped);
        report
    }

    /// [`shutdown`](Self::shutdown) within the configured
    /// [`drain_timeout`](ServingConfig::drain_timeout) from now.
    pub async fn shutdown_within(&self) -> DrainReport {
        self.health.set_lifecycle(Lifecycle::Draining);
        let report = self.batch.drain_within(self.drain_timeout).await;
        self.health.set_lifecycle(Lifecycle::Stopped);
        report
    }
}

impl<I, O> Service<Request<I>> for Serving<I, O>
where
    I: Send + 'static,
    O: Send + 'static,
{
    type Response = O;
    type Error = BoxError;
    type Future = ResponseFuture<O>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.batch.poll_ready(cx)
    }

    fn call(&mut self, request: Request<I>) -> Self::Future {
        self.batch.call(request)
    }
}

/// Builds a [`Serving`] with tower layers between the batcher and the pool.
///
/// Layers apply in the order added, the first outermost, as with tower's
/// `ServiceBuilder`; each sees whole batches (`Vec<I>`) and must answer with
/// one result per input.
///
/// ```
/// use std::time::Duration;
///
/// use candle_core::Device;
/// use candlewick::{BoxError, Serving, ServingBuilder, ServingConfig};
/// use tower::timeout::TimeoutLayer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let loader = |_: &Device| -> Result<_, BoxError> {
///     Ok(|batch: &[u32]| -> Result<Vec<u32>, BoxError> { Ok(batch.to_vec()) })
/// };
/// let serving: Serving<u32, u32> = ServingBuilder::new(loader, ServingConfig::default())
///     .layer(TimeoutLayer::new(Duration::from_secs(10)))
///     .start()?;
/// assert_eq!(serving.infer(7).await?, 7);
/// # Ok(())
/// # }
/// ```
pub struct ServingBuilder<L, M = Identity> {
    loader: L,
    config: ServingConfig,
    layers: ServiceBuilder<M>,
}

impl<L> ServingBuilder<L> {
    /// A builder for the stack of `config`, whose replicas load with `loader`.
    pub fn new(loader: L, config: ServingConfig) -> Self {
        Self {
            loader,
            config,
            layers: ServiceBuilder::new(),
        }
    }
}

impl<L, M> ServingBuilder<L, M> {
    /// Adds `layer` between the batcher and the pool, inside the layers
    /// added before it.
    pub fn layer<T>(self, layer: T) -> ServingBuilder<L, Stack<T, M>> {
        ServingBuilder {
            loader: self.loader,
            config: self.config,
            layers: self.layers.layer(layer),
        }
    }

    /// Starts the stack, as [`Serving::start`] does.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn start<I, O, E>(self) -> Result<Serving<I, O>, PoolError>
    where
        I: Send + 'static,
        O: Send + 'static,
        L: Loader<I>,
        L::Model: Model<I, Output = O>,
        M: Layer<Pool<I, O>>,
        M::Service: Service<Vec<I>, Response = Vec<Result<O, E>>> + Send + 'static,
        <M::Service as Service<Vec<I>>>::Error: Into<BoxError>,
        <M::Service as Service<Vec<I>>>::Future: Send + 'static,
        E: Into<BoxError>,
    {
        let Self {
            loader,
            config,
            layers,
        } = self;
        let loader = Arc::new(loader);
        let model = config.model;
        let pool = Pool::from_arc(loader.clone(), config.pool, &model)?;
        let batch = ServiceBuilder::new()
            .layer(
                BatchLayer::new(config.batch)
                    .hooks_from(loader)
                    .model(&model)
                    .staging(pool.staging()),
            )
            .layer(layers.into_inner())
            .service(pool.clone());
        let health = Health::new(config.health, pool.status());
        health.watch_batch(batch.status());
        health.publish_metrics(&model);
        crate::metrics::record_model_info(&model);
        Ok(Serving {
            batch,
            pool,
            health,
            probes: config.probes,
            model: Arc::new(model),
            drain_timeout: config.drain_timeout,
        })
    }
}

impl<L, M: std::fmt::Debug> std::fmt::Debug for ServingBuilder<L, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingBuilder")
            .field("config", &self.config)
            .field("layers", &self.layers)
            .finish_non_exhaustive()
    }
}
