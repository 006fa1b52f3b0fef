//! The [`Model`] trait and the [`Loader`] that builds one model on one device.
//!
//! A model is shaped like candle's `Module`: one `&self` method over a whole
//! batch. It lives on the dedicated thread of its replica, so it needs to be
//! neither `Send` nor `Sync`: GPU contexts and thread-bound state are fine.
//!
//! The admission hooks ([`Loader::cost`] and [`Loader::validate`]) live on the
//! loader, not on the model, because admission runs in the caller's task, before
//! any replica is involved and possibly before any replica has finished loading.
//!
//! # Examples
//!
//! Closures implement both traits, so a test needs no weights and no GPU:
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use candlewick::{BoxError, Loader, Model};
//!
//! // A "model" that sums each input vector on the replica's device.
//! let loader = |device: &Device| -> Result<_, BoxError> {
//!     let device = device.clone();
//!     Ok(move |batch: &[Vec<f32>]| -> Result<Vec<f32>, BoxError> {
//!         batch
//!             .iter()
//!             .map(|xs| Ok(Tensor::new(xs.as_slice(), &device)?.sum_all()?.to_scalar::<f32>()?))
//!             .collect()
//!     })
//! };
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let model = loader.load(&Device::Cpu).await?;
//! assert_eq!(model.forward(&[vec![1.0, 2.0], vec![3.0]])?, vec![3.0, 3.0]);
//! # Ok::<_, BoxError>(())
//! # }).unwrap();
//! ```

use async_trait::async_trait;
use candle_core::Device;

use crate::BoxError;

/// A model that computes one output per input over a whole batch.
///
/// Implemented for every `Fn(&[I]) -> Result<Vec<O>, BoxError>`.
pub trait Model<I> {
    /// The output for one input.
    type Output;

    /// Runs the model on a batch and returns one output per input, in order.
    ///
    /// Returning a different number of outputs than inputs is an error for the
    /// whole batch; it is never silently matched up.
    fn forward(&self, batch: &[I]) -> Result<Vec<Self::Output>, BoxError>;

    /// Inputs run once after loading, before the replica takes traffic.
    ///
    /// Use them to trigger lazy allocation, kernel compilation and caches so
    /// the first real request does not pay for it. Defaults to none.
    fn warmup_inputs(&self) -> Vec<I> {
        Vec::new()
    }
}

impl<I, O, F> Model<I> for F
where
    F: Fn(&[I]) -> Result<Vec<O>, BoxError>,
{
    type Output = O;

    fn forward(&self, batch: &[I]) -> Result<Vec<O>, BoxError> {
        self(batch)
    }
}

/// Builds one [`Model`] on one candle [`Device`], and judges inputs at admission.
///
/// [`load`](Loader::load) runs on the thread of the replica that will own the
/// model, inside a single-threaded tokio runtime, so it may use `tokio::fs` and
/// other async I/O. It is called again, with back-off, after a replica panics.
///
/// Implemented for every `Fn(&Device) -> Result<M, BoxError> + Send + Sync`
/// whose `M` is a model; such loaders admit every input at cost 1.
#[async_trait]
pub trait Loader<I>: Send + Sync + 'static {
    /// The model this loader builds.
    type Model: Model<I>;

    /// Builds a model on `device`.
    async fn load(&self, device: &Device) -> Result<Self::Model, BoxError>;

    /// The cost of one input toward a batch's cost budget, such as its number
    /// of tokens. Defaults to 1, which makes the budget a plain count.
    fn cost(&self, input: &I) -> usize {
        let _ = input;
        1
    }

    /// Checks one input at admission, in the caller's task.
    ///
    /// An input rejected here never enters a batch, so it cannot fail the
    /// other requests it would have been batched with. Defaults to accepting
    /// everything.
    fn validate(&self, input: &I) -> Result<(), BoxError> {
        let _ = input;
        Ok(())
    }
}

#[async_trait]
impl<I, M, F> Loader<I> for F
where
    F: Fn(&Device) -> Result<M, BoxError> + Send + Sync + 'static,
    M: Model<I>,
    I: 'static,
{
    type Model = M;

    async fn load(&self, device: &Device) -> Result<M, BoxError> {
        self(device)
    }
}

/// What is being served: attached to a serving stack, exported as metric
/// labels, and available for an `/info` endpoint and Kubernetes labels.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct ModelInfo {
    /// The model's name, e.g. `all-MiniLM-L6-v2`.
    pub name: String,
    /// Its version, e.g. `2024-05-01` or `v3`.
    pub version: String,
    /// The revision of the code or weights it was built from, if known.
    pub revision: Option<String>,
    /// The snapshot of the training data, if known.
    pub data_snapshot: Option<String>,
    /// Whether it was approved for serving.
    pub approval: Approval,
}

/// The review status of a model version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum Approval {
    /// Not reviewed.
    #[default]
    Unreviewed,
    /// Approved for production traffic.
    Approved,
    /// Allowed for limited traffic only, such as a canary.
    Experimental,
    /// Rejected; should not take traffic.
    Rejected,
}

impl Approval {
    /// The lowercase name used in labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unreviewed => "unreviewed",
            Self::Approved => "approved",
            Self::Experimental => "experimental",
            Self::Rejected => "rejected",
        }
    }
}

impl Default for ModelInfo {
    fn default() -> Self {
        Self::new("model", "0")
    }
}

impl ModelInfo {
    /// The environment variable a generated Deployment sets to its track's
    /// model [`version`](Self::version) (see [`k8s`](crate::k8s)): a server
    /// that labels its metrics from it reports the version each track
    /// really serves, which a canary analysis compares.
    pub const VERSION_ENV: &str = "CANDLEWICK_MODEL_VERSION";

    /// A model `name` at `version`, with no revision, data snapshot or review.
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            version: version.into(),
            revision: None,
            data_snapshot: None,
            approval: Approval::Unreviewed,
        }
    }

    /// Sets [`revision`](Self::revision).
    pub fn with_revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = Some(revision.into());
        self
    }

    /// Sets [`data_snapshot`](Self::data_snapshot).
    pub fn with_data_snapshot(mut self, snapshot: impl Into<String>) -> Self {
        self.data_snapshot = Some(snapshot.into());
        self
    }

    /// Sets [`approval`](Self::approval).
    pub fn with_approval(mut self, approval: Approval) -> Self {
        self.approval = approval;
        self
    }
}

/// A value loaded once and shared by the loads of every replica: model
/// weights read from disk once per process instead of once per replica.
///
/// Keep one in the [`Loader`] and build each replica's model from it. On the
/// CPU, candle tensors taken from it share its storage, so N replicas hold
/// one copy of the weights. A GPU replica copies them to its device, as it
/// must: each replica opens a device handle of its own, and candle does not
/// mix tensors of different handles. Cheap to clone; clones share the value.
///
/// If loading fails, the next caller tries again.
///
/// # Examples
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use candle_core::{Device, Tensor};
/// use candlewick::{BoxError, LoadOnce};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let weights: LoadOnce<HashMap<String, Tensor>> = LoadOnce::new();
/// let reads = AtomicUsize::new(0);
/// let read = || async {
///     reads.fetch_add(1, Ordering::SeqCst);
///     // In a real loader: candle_core::safetensors::load(path, &Device::Cpu)
///     let w = Tensor::ones((2, 2), candle_core::DType::F32, &Device::Cpu)?;
///     Ok::<_, BoxError>(HashMap::from([("w".to_owned(), w)]))
/// };
/// let first = weights.get_or_try_load(read).await?;
/// let second = weights.get_or_try_load(read).await?;
/// assert!(Arc::ptr_eq(&first, &second));
/// assert_eq!(reads.load(Ordering::SeqCst), 1);
/// # Ok::<_, BoxError>(())
/// # }).unwrap();
/// ```
pub struct LoadOnce<T> {
    cell: std::sync::Arc<tokio::sync::OnceCell<std::sync::Arc<T>>>,
}

impl<T> LoadOnce<T> {
    /// Nothing loaded yet.
    pub fn new() -> Self {
        Self {
            cell: std::sync::Arc::default(),
        }
    }

    /// The value, loaded by `load` if no caller has loaded it yet. Callers
    /// that arrive while a load runs wait for it rather than load again.
    pub async fn get_or_try_load<E, F, Fut>(&self, load: F) -> Result<std::sync::Arc<T>, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        self.cell
            .get_or_try_init(|| async { load().await.map(std::sync::Arc::new) })
            .await
            .cloned()
    }

    /// The value, if it was loaded.
    pub fn get(&self) -> Option<std::sync::Arc<T>> {
        self.cell.get().cloned()
    }
}

impl<T> Default for LoadOnce<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for LoadOnce<T> {
    fn clone(&self) -> Self {
        Self {
            cell: self.cell.clone(),
        }
    }
}

impl<T> std::fmt::Debug for LoadOnce<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOnce")
            .field("loaded", &self.cell.initialized())
            .finish()
    }
}
