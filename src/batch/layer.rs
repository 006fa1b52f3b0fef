use std::fmt;
use std::sync::Arc;

use tower::{Layer, Service};

use super::{Batch, BatchConfig, Hooks};
use crate::BoxError;
use crate::model::Loader;

/// Wraps a `Service<Vec<I>>` in a [`Batch`]. See the [module docs](super).
pub struct BatchLayer<I> {
    config: BatchConfig,
    hooks: Hooks<I>,
}

impl<I> BatchLayer<I> {
    /// A layer with `config`, admitting every input at cost 1.
    pub fn new(config: BatchConfig) -> Self {
        Self {
            config,
            hooks: Hooks::default(),
        }
    }

    /// Measures each input's cost toward
    /// [`max_batch_cost`](BatchConfig::max_batch_cost) with `cost`.
    pub fn cost(mut self, cost: impl Fn(&I) -> usize + Send + Sync + 'static) -> Self {
        self.hooks.cost = Arc::new(cost);
        self
    }

    /// Checks each input at admission with `validate`.
    pub fn validate(
        mut self,
        validate: impl Fn(&I) -> Result<(), BoxError> + Send + Sync + 'static,
    ) -> Self {
        self.hooks.validate = Arc::new(validate);
        self
    }

    /// Labels every metric of the service with the model's name and version.
    pub fn model(mut self, model: &crate::ModelInfo) -> Self {
        self.hooks.labels = crate::metrics::labels(model, &[]);
        self
    }

    /// Lets the batcher hand the pool below a full batch while all its
    /// replicas are busy, to start the moment one frees: see
    /// [`Pool::staging`](crate::pool::Pool::staging). Without it, a batch is
    /// formed only once the inner service is ready.
    pub fn staging(mut self, staging: crate::pool::Staging) -> Self {
        self.hooks.staging = Some(staging);
        self
    }

    /// Takes [`cost`](Self::cost) and [`validate`](Self::validate) from the
    /// model's loader.
    pub fn hooks_from<L: Loader<I>>(self, loader: Arc<L>) -> Self
    where
        I: 'static,
    {
        let validator = loader.clone();
        self.cost(move |input| loader.cost(input))
            .validate(move |input| validator.validate(input))
    }
}

impl<I> Clone for BatchLayer<I> {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            hooks: self.hooks.clone(),
        }
    }
}

impl<I> fmt::Debug for BatchLayer<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchLayer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S, I, O, E> Layer<S> for BatchLayer<I>
where
    S: Service<Vec<I>, Response = Vec<Result<O, E>>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    I: Send + 'static,
    O: Send + 'static,
    E: Into<BoxError>,
{
    type Service = Batch<I, O>;

    /// Spawns the batch worker on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    fn layer(&self, inner: S) -> Batch<I, O> {
        Batch::with_hooks(inner, self.config.clone(), self.hooks.clone())
    }
}
