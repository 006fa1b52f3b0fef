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
