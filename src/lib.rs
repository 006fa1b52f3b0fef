//! candlewick turns a [Candle](https://github.com/huggingface/candle) model into
//! a production service component: replicas on a pool of devices, dynamic
//! batching and backpressure, all as [tower] services an application puts
//! behind its own HTTP or gRPC front end.
//!
//! # Quick start
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use candlewick::{BoxError, Serving, ServingConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! // A loader builds one model per replica on that replica's device.
//! let loader = |device: &Device| -> Result<_, BoxError> {
//!     let weights = Tensor::new(&[2f32, 3.0], device)?;
//!     // The model runs a whole batch at once and returns one output per input.
//!     Ok(move |batch: &[[f32; 2]]| -> Result<Vec<f32>, BoxError> {
//!         let xs: Vec<f32> = batch.iter().flatten().copied().collect();
//!         let xs = Tensor::from_vec(xs, (batch.len(), 2), weights.device())?;
//!         let ys = xs.broadcast_mul(&weights.reshape((1, 2))?)?.sum(1)?;
//!         Ok(ys.to_vec1::<f32>()?)
//!     })
//! };
//!
//! let serving = Serving::start(loader, ServingConfig::default())?;
//! assert_eq!(serving.infer([1.0, 1.0]).await?, 5.0);
//! # Ok(())
//! # }
//! ```
//!
//! # The data path
//!
//! ```text
//! caller ─► admission ─► queue ─► batch former ─► device pool ─► replica thread ─► model.forward(batch)
//! ```
//!
//! * [`Model`] and [`Loader`]: the model trait, shaped like candle's `Module`.
//! * [`pool`]: replicas on devices, each on its own OS thread, supervised.
//! * [`batch`]: the batching layer, which forms batches when a replica is free.
//! * [`Serving`]: both, assembled from one [`ServingConfig`].
//! * [`health`]: started / ready / live with reasons, probe endpoints, drain.
//! * [`metrics`]: every hop through the `metrics` facade, and a `/metrics`
//!   service.
//! * `k8s` (feature `k8s`): the Kubernetes objects to run it, derived from the
//!   same configuration.
//! * [`collate`]: padding token sequences into tensors and splitting outputs.
//! * [`error`]: the typed errors and the HTTP status each maps to.
//!
//! # Features
//!
//! | feature | what it enables |
//! |---------|-----------------|
//! | `prometheus` (default) | [`metrics::PrometheusService`], a `/metrics` endpoint |
//! | `serde` | `Serialize`/`Deserialize` for the configuration types |
//! | `full`  | every feature that builds on any machine (all but `cuda` and `metal`) |
//! | `cuda`  | replicas on CUDA GPUs (forwards to `candle-core/cuda`) |
//! | `metal` | replicas on Apple GPUs (forwards to `candle-core/metal`) |
//! | `k8s`   | the `k8s` module: Kubernetes objects derived from the serving configuration |
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod batch;
pub mod collate;
mod contain;
pub mod device;
pub mod error;
pub mod health;
#[cfg(feature = "k8s")]
#[cfg_attr(docsrs, doc(cfg(feature = "k8s")))]
pub mod k8s;
pub mod metrics;
mod model;
pub mod pool;
mod serving;

pub use model::{Approval, Loader, Model, ModelInfo};

// Compiles and runs the README's examples as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
pub use serving::{ResponseFuture, Serving, ServingConfig};

/// The error type of every service in this crate: inspect it with
/// `downcast_ref` for the types in [`error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
