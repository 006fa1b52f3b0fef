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
//! caller ─► reserve ─► prepare ─► admission ─► queue ─► batch former ─► device pool ─► replica thread ─► model.forward(batch)
//!           (slots,     (parse,    (validate,   (all-or-
//!            429 before  tokenize   cost,        nothing,
//!            any work)   off the    deadline)    cancel-
//!                        runtime)                aware)
//! ```
//!
//! * [`Model`] and [`Loader`]: the model trait, shaped like candle's `Module`.
//! * [`pool`]: replicas on devices, each on its own OS thread, supervised.
//! * [`batch`]: the batching layer, which forms batches when a replica is free,
//!   and admits single requests or all-or-nothing groups.
//! * [`prepare`]: parsing and tokenizing on threads of their own, bounded,
//!   so the async runtime only reads requests, admits and answers.
//! * [`Serving`]: both, assembled from one [`ServingConfig`], with health and
//!   metrics attached; [`ServingBuilder`] adds tower layers between the
//!   batcher and the pool, and [the same stack by hand](#build-it-yourself)
//!   takes a few lines of public API.
//! * [`health`]: started / ready / live with reasons, probe endpoints, drain,
//!   and an admin listener that answers them on a thread of its own.
//! * [`metrics`]: every hop through the `metrics` facade, and a `/metrics`
//!   service.
//! * `k8s` (feature `k8s`): the Kubernetes objects to run it, derived from the
//!   same configuration.
//! * [`collate`]: padding token sequences into tensors and splitting outputs.
//! * [`error`]: the typed errors and the HTTP status each maps to.
//!
//! # Build it yourself
//!
//! [`Serving`] is a convenience built from public parts only. The same stack by
//! hand, with tower's `ServiceBuilder`, behaves the same: the same admission
//! hooks, the same metrics (per-input model errors count as
//! `outcome="model_error"`), the same health, the same per-request deadlines.
//! Build it this way to put your own layers anywhere in the stack, or to
//! share one pool between several batchers.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use candle_core::Device;
//! use candlewick::batch::{BatchLayer, Priority, Request};
//! use candlewick::health::{Health, HealthState, Lifecycle};
//! use candlewick::pool::Pool;
//! use candlewick::{BoxError, ServingConfig};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! // One loader: the pool builds the models with it, and the batcher asks
//! // it for each input's cost and validity at admission.
//! let loader = Arc::new(|_: &Device| -> Result<_, BoxError> {
//!     Ok(|batch: &[String]| -> Result<Vec<usize>, BoxError> {
//!         Ok(batch.iter().map(|text| text.len()).collect())
//!     })
//! });
//! let config = ServingConfig::default();
//! let model = &config.model;
//!
//! // The replicas, then the batcher in front of them, with any tower layer
//! // in between (here a time limit per batch).
//! let pool = Pool::from_arc(loader.clone(), config.pool.clone(), model)?;
//! let batch = ServiceBuilder::new()
//!     .layer(
//!         BatchLayer::new(config.batch.clone())
//!             .hooks_from(loader)
//!             .model(model)
//!             .staging(pool.staging()),
//!     )
//!     .timeout(Duration::from_secs(30))
//!     .service(pool.clone());
//!
//! // Health reads the pool and the batcher without keeping them running;
//! // the gauges are the ones `Serving` publishes.
//! let health = Health::new(config.health.clone(), pool.status());
//! health.watch_batch(batch.status());
//! health.publish_metrics(model);
//! candlewick::metrics::record_model_info(model);
//!
//! // Each request carries its own deadline and priority through
//! // `Service::call`, as tower-http requests carry extensions.
//! let request = Request::new("hello".to_owned())
//!     .with_timeout(Duration::from_secs(1))
//!     .with_priority(Priority::High);
//! assert_eq!(batch.clone().oneshot(request).await?, 5);
//!
//! let mut watch = health.watch();
//! while !health.ready().ok {
//!     watch.changed().await;
//! }
//! assert_eq!(health.report().state, HealthState::Ready);
//!
//! // Shutdown, as `Serving::shutdown` does it.
//! health.set_lifecycle(Lifecycle::Draining);
//! batch.drain_within(config.drain_timeout).await;
//! health.set_lifecycle(Lifecycle::Stopped);
//! # Ok(())
//! # }
//! ```
//!
//! # When your model misbehaves
//!
//! User code may fail anywhere; each way has one observable result, and
//! every accepted request still gets exactly one answer. HTTP statuses are
//! those of [`error::status_code`].
//!
//! | what happens | the requests concerned get | the service | where it shows |
//! |---|---|---|---|
//! | `forward` returns an error | under [`FailurePolicy::Bisect`](pool::FailurePolicy::Bisect) (the default), only the poisoned inputs: [`ModelFailed`](error::ModelFailed) of kind `Error` (500); the others their outputs | keeps serving | `candlewick_requests_total{outcome="model_error"}` |
//! | every input fails (a lost device, a model bug) | all of them, `ModelFailed` `Error`, after at most 1 + 2·⌈log2 n⌉ forward passes for a batch of n | keeps serving | `candlewick_batch_systemic_failures_total` |
//! | `forward` returns the wrong number of outputs | the whole batch, `ModelFailed` `OutputCount` (500) | keeps serving | `outcome="model_error"` |
//! | `forward` panics | the whole batch, `ModelFailed` `Panic` (500) | the replica drops its model and reloads it with back-off; the others serve meanwhile | [`ReplicaStatus::restarts`](pool::ReplicaStatus::restarts), `candlewick_replicas{state="restarting"}` |
//! | `load` or the warm-up errs or panics | nothing: requests wait for a serving replica, bounded by their deadline | the load is retried with back-off | `load_failures`, `last_error`, the readiness reason |
//! | `load` fails with [`Unrecoverable`](error::Unrecoverable) | once no replica can serve, every request at once: [`Closed`](error::Closed) naming each replica's reason (503) | that replica fails for good; [`Serving::started`] fails once all have | not live, naming the replica |
//! | a device this build cannot run (`cuda:0` without `cuda`) | — | [`Serving::start`] fails with [`PoolError::DeviceUnsupported`](pool::PoolError::DeviceUnsupported) | the error |
//! | `forward` runs past [`stall_timeout`](pool::PoolConfig::stall_timeout) | the batch at once, `ModelFailed` `Stalled` (500) | the replica is replaced; the stuck thread keeps its model until `forward` returns. With [`max_stuck_threads`](pool::PoolConfig::max_stuck_threads) stuck, the replica fails for good instead, so a device that hangs again and again cannot pile up models in memory | `stalls`, `stuck_threads`; not live, naming the replica |
//! | the model's `Drop`, or an input's or output's, panics | nothing | logged; the replica (or the batcher) goes on | an `ERROR` log line |
//! | [`Loader::cost`] or [`Loader::validate`] panics | that request, `ModelFailed` `Panic` (500) | goes on | `outcome="model_error"` |
//! | [`Loader::validate`] rejects | that request, [`InvalidInput`](error::InvalidInput) (422), before any batch | goes on | `outcome="invalid"` |
//! | a hand-built inner service panics in `call` or its future | that batch, `ModelFailed` `Panic` (500) | goes on | `outcome="model_error"` |
//! | a hand-built inner service fails or panics in `poll_ready` | every queued and later request, `Closed` with the reason (503) | the batcher stops for good | not live: "the batching worker stopped" |
//!
//! A caller may pass `Duration::MAX` for any timeout: deadlines saturate (to
//! decades) instead of overflowing.
//!
//! # Features
//!
//! | feature | what it enables |
//! |---------|-----------------|
//! | `prometheus` (default) | [`metrics::PrometheusService`], a `/metrics` endpoint |
//! | `admin` (default) | [`health::AdminServer`]: probes and metrics on a listener and thread of their own (hyper) |
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
pub mod prepare;
mod serving;

pub use model::{Approval, LoadOnce, Loader, Model, ModelInfo};

// Compiles and runs the README's examples as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
pub use serving::{Serving, ServingBuilder, ServingConfig};

/// The error type of every service in this crate: inspect it with
/// `downcast_ref` for the types in [`error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
