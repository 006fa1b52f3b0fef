// Counts, costs and times here come from callers and run for months:
// every operation that could overflow says how it saturates.
#![warn(clippy::arithmetic_side_effects)]
//! Dynamic batching: [`BatchLayer`] and [`Batch`].
//!
//! [`Batch`] is a `Service<Request<I>, Response = O>` over any inner
//! `Service<Vec<I>, Response = Vec<Result<O, E>>>`, such as a
//! [`Pool`](crate::pool::Pool): one result per input, so one failing input
//! fails its own request only (and counts as `outcome="model_error"`, or
//! `"invalid"` if `E` is [`InvalidInput`](crate::error::InvalidInput)).
//! Callers send single inputs, each as a [`Request`] with its own deadline
//! and priority; a background worker collects them into batches and hands
//! each request exactly its own answer.
//!
//! # How a batch is formed
//!
//! Batching here *pulls*: the worker forms a batch only once the inner service
//! is ready (for a pool: once some replica is idle). While every replica is
//! busy, requests accumulate, so the next free replica takes a full batch at
//! once. Once the inner service is ready, the worker dispatches
//!
//! * at once, if the queue holds at least [`max_batch_size`] requests or at
//!   least [`max_batch_cost`] of cost;
//! * otherwise, under [`WaitPolicy::Adaptive`] (the default), at once unless
//!   waiting pays (below), and then as soon as the batch fills or the wait
//!   it decided on ends; under [`WaitPolicy::Fixed`], as soon as it fills or
//!   [`max_wait`] after the oldest queued request arrived.
//!
//! A batch never holds more than [`max_batch_size`] requests nor, if set, more
//! than [`max_batch_cost`] of cost. Several batches run at once when the inner
//! service has room for several (a pool with several idle replicas).
//!
//! Given a pool's [`Staging`](crate::pool::Staging) handle
//! ([`BatchLayer::staging`]; [`Serving`](crate::Serving) passes it), the
//! worker also hands a *full* batch to a pool whose replicas are all busy:
//! the pool holds it and the first replica to free runs it at once (see
//! [`Pool::staging`](crate::pool::Pool::staging)). A batch that is not full
//! keeps waiting here, where later requests can still join it. Such a batch
//! leaves the queue up to one batch's time before it runs, so a
//! [`Priority::High`] request that arrives meanwhile runs after it.
//!
//! Requests are batched oldest first, except under [`CostMode::Padded`]:
//! there a batch holds the oldest request and, among the next
//! [`group_window`] queued ones, those nearest to it in cost, so that short
//! inputs are not padded to a long one's length and long ones run together.
//! A request passed over that has waited [`max_starvation`] goes before
//! any nearer in cost, oldest first, if it fits the cost budget.
//!
//! A request whose caller dropped its response future is removed before it
//! reaches the model.
//!
//! # Admission
//!
//! The queue holds at most [`queue_capacity`] requests. Input validation and
//! cost come from the model's [`Loader`](crate::Loader) (or from
//! [`BatchLayer::validate`] and [`BatchLayer::cost`]) and run in the caller's
//! task; an invalid input gets [`InvalidInput`](crate::error::InvalidInput) and
//! never enters a batch. When the queue is full, [`Admission`] decides between
//! rejecting at once with [`Overloaded`](crate::error::Overloaded) (carrying a
//! Retry-After estimated from the measured cost of batches) and classic tower
//! backpressure.
//!
//! A client request of several inputs is admitted as one group with
//! [`Batch::infer_all`]: all of its inputs or none, judged on the work queued
//! ahead of it, never on its own inputs. [`Batch::reserve`] takes the queue
//! room first, before the inputs are even parsed, so an overloaded service
//! refuses without spending work on the request; [`Reservation::infer_all`]
//! then runs the prepared inputs, or [`Reservation::refuse`] counts a
//! request whose preparation failed. A request that could not finish by its
//! deadline even on an idle service gets
//! [`TooLarge`](crate::error::TooLarge) (413, not retryable), never a 429.
//! If not even the smallest batch could finish by it, the service is slow
//! now, not the request large: a busy service answers
//! [`DeadlineExceeded`](crate::error::DeadlineExceeded) (504, retryable), and
//! an idle one tries the request, so that a passing slowness is measured as
//! passed. For the same reason, an idle service that measured no batch for
//! 5 s lets one request it would refuse as too large through.
//!
//! The time estimates come from a cost model measured online: a batch of
//! cost `c` takes `fixed + per_cost · c`, fit over the recent batches, with
//! the padding share and the parallelism they showed.
//!
//! # A note on choosing `max_wait`
//!
//! A free replica that takes whatever is queued pays a batch's fixed cost
//! (a kernel launch, a forward pass's overhead) for a partial batch. With
//! several replicas this fragments batches: each one that frees takes the
//! few requests that arrived since, and the fixed cost is paid again and
//! again. Waiting for a fuller batch pays when other replicas are busy and
//! the missing requests will arrive sooner than one fixed cost; it never
//! pays when the service would otherwise idle.
//!
//! [`WaitPolicy::Adaptive`] decides this from measurements: a batch's fixed
//! and per-input time from the cost model, the arrival rate from the
//! queue, and the replicas the recent batches showed (how many worked at
//! once, and whether several are kept busy). When a
//! replica frees, it aims for the smallest batch that keeps up with the
//! arrivals with a quarter to spare (`replicas · n / (fixed + per_input ·
//! n) ≥ 1.25 · rate`): near saturation a full one, at half load about half
//! of one, since a bigger batch would add latency and nothing else. It
//! waits for the missing requests if their expected arrival is within one
//! fixed cost and at most [`max_wait`] (default 2 ms), and dispatches at
//! once otherwise; with one replica busy, or an idle service, it never
//! waits.
//!
//! Measured with a virtual accelerator (2 ms + 20 µs per input, batches of
//! 64, four replicas; docs/benchmarks.md), against dispatching at once
//! (the default before): 0.96–0.975 of the closed-loop limit instead of
//! 0.83 (full batches of 64 instead of 49), and p99 at 0.9 of the limit
//! 4.6–6 ms instead of 6.2. At half load, p50 3.1 ms and p99 3.9–4.0 ms
//! (tower-batch-control 3.5 / 4.2 ms in the same runs). One replica is
//! unchanged.
//!
//! [`WaitPolicy::Fixed`] waits up to `max_wait` after the oldest request
//! whatever the load: for models whose batches cost the same however full.
//! `max_wait` zero never waits under either policy.
//!
//! # Examples
//!
//! ```
//! use candlewick::BoxError;
//! use candlewick::batch::{BatchConfig, BatchLayer};
//! use tower::{Layer, Service, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! // Any service answering a batch with one result per input can be batched.
//! let double_all = service_fn(|batch: Vec<u32>| async move {
//!     let doubled: Vec<Result<u32, BoxError>> = batch.into_iter().map(|x| Ok(x * 2)).collect();
//!     Ok::<_, BoxError>(doubled)
//! });
//! let mut service = BatchLayer::new(BatchConfig::default()).layer(double_all);
//! assert_eq!(service.ready().await?.call(21.into()).await?, 42);
//! # Ok(())
//! # }
//! ```
//!
//! With [`max_queue_time`] set, a request is also rejected when the work
//! already queued would take longer than that to serve, and a request whose
//! [deadline](Request::deadline) passes while it is queued is answered
//! with [`DeadlineExceeded`](crate::error::DeadlineExceeded) and never reaches
//! the model.
//!
//! # Priorities
//!
//! [`Priority::High`] requests are batched before [`Priority::Normal`] ones,
//! but a normal request never waits behind them longer than
//! [`max_starvation`].
//!
//! [`max_batch_size`]: BatchConfig::max_batch_size
//! [`max_queue_time`]: BatchConfig::max_queue_time
//! [`max_batch_cost`]: BatchConfig::max_batch_cost
//! [`max_wait`]: BatchConfig::max_wait
//! [`queue_capacity`]: BatchConfig::queue_capacity
//! [`group_window`]: BatchConfig::group_window
//! [`max_starvation`]: BatchConfig::max_starvation

mod admission;
pub mod future;
mod layer;
mod metrics;
mod queue;
mod rate;
mod service;
mod shared;
mod worker;

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

pub use layer::BatchLayer;
pub use service::{Batch, BatchStatus, DrainReport, Reservation};

use crate::BoxError;
use crate::contain::saturating_deadline;

/// What to do with a request when the queue is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum Admission {
    /// Reject it at once, in the caller's task, with
    /// [`Overloaded`](crate::error::Overloaded). `poll_ready` is always ready.
    #[default]
    Shed,
    /// Classic tower backpressure: `poll_ready` stays pending until a slot is
    /// free.
    Wait,
}

/// When a free replica waits for its batch to fill.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum WaitPolicy {
    /// Only when it pays: while other batches run, for the smallest batch
    /// that keeps up with the measured arrival rate, and only if its
    /// missing requests are expected sooner than a batch's measured fixed
    /// cost, up to [`max_wait`](BatchConfig::max_wait). Never when the
    /// service would otherwise idle.
    #[default]
    Adaptive,
    /// Up to [`max_wait`](BatchConfig::max_wait) after the oldest queued
    /// request arrived, whatever the load: for models whose batches cost
    /// the same however full, where a fuller batch is always worth a wait.
    Fixed,
}

/// How the costs of a batch's inputs add up toward
/// [`max_batch_cost`](BatchConfig::max_batch_cost).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum CostMode {
    /// The sum of the inputs' costs (e.g. real tokens).
    #[default]
    Sum,
    /// The largest cost times the number of inputs (e.g. tokens once every
    /// sequence is padded to the longest). Batches group inputs of similar
    /// cost (see [`group_window`](BatchConfig::group_window)).
    Padded,
}

/// How [`Batch`] forms batches and admits requests.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default))]
#[non_exhaustive]
pub struct BatchConfig {
    /// The most requests in one batch. Default: 32.
    pub max_batch_size: NonZeroUsize,
    /// The longest a batch waits to fill once the inner service is ready
    /// (under [`WaitPolicy::Fixed`], counted from the oldest request's
    /// arrival). Default: 2 ms (see the
    /// [note on choosing it](self#a-note-on-choosing-max_wait)).
    pub max_wait: Duration,
    /// When waiting for a fuller batch pays. Default:
    /// [`WaitPolicy::Adaptive`].
    pub wait_policy: WaitPolicy,
    /// The most cost in one batch, if any. Default: none.
    pub max_batch_cost: Option<NonZeroUsize>,
    /// How input costs add up toward `max_batch_cost`. Default: [`CostMode::Sum`].
    pub cost_mode: CostMode,
    /// The most requests waiting in the queue. Default: 1024.
    pub queue_capacity: NonZeroUsize,
    /// What happens when the queue is full. Default: [`Admission::Shed`].
    pub admission: Admission,
    /// Reject a request at admission when the work queued ahead of it would
    /// take longer than this to serve, as the measured cost of batches says, instead
    /// of admitting a request that will wait too long. `None` sheds only when
    /// the queue is full. Default: none.
    pub max_queue_time: Option<Duration>,
    /// The deadline of requests sent without one of their own, counted from
    /// admission. Default: none.
    pub default_timeout: Option<Duration>,
    /// How long the oldest [`Priority::Normal`] request may wait while
    /// [`Priority::High`] requests go first; past it, it is batched first.
    /// Also how long a request may be passed over for ones nearer in cost
    /// under [`CostMode::Padded`]. Default: 100 ms.
    pub max_starvation: Duration,
    /// Under [`CostMode::Padded`], how many queued requests beyond a batch's
    /// worth the batcher looks through for inputs of similar cost to the
    /// oldest one; 0 batches in arrival order. Ignored under
    /// [`CostMode::Sum`], where grouping saves nothing. Default: 256.
    pub group_window: usize,
}

/// The class of a request: [`High`](Priority::High) is batched first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Priority {
    /// Batched before any `Normal` request, within
    /// [`max_starvation`](BatchConfig::max_starvation).
    High,
    /// The default class.
    #[default]
    Normal,
}

/// One request to a [`Batch`]: the model's input, and the deadline and
/// priority it travels with through `Service::call`.
///
/// Any input converts into a request with no deadline of its own and
/// [`Priority::Normal`], so `batch.infer(input)` and
/// `batch.call(input.into())` both work. The options travel with the input
/// the way tower-http's extensions travel with an `http::Request`: a layer
/// in front of the batcher (or an axum handler) sets them.
///
/// ```
/// use std::time::Duration;
/// use candlewick::batch::{Priority, Request};
///
/// let request = Request::new("hello")
///     .with_timeout(Duration::from_millis(250))
///     .with_priority(Priority::High);
/// assert!(request.deadline.is_some());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Request<I> {
    /// What the model runs on.
    pub input: I,
    /// The instant after which the answer is no use. A request still queued
    /// then is answered with [`DeadlineExceeded`](crate::error::DeadlineExceeded)
    /// and never reaches the model. Default: admission time plus
    /// [`default_timeout`](BatchConfig::default_timeout), if set.
    pub deadline: Option<tokio::time::Instant>,
    /// The request's class.
    pub priority: Priority,
}

impl<I> Request<I> {
    /// A request for `input`, with no deadline of its own and
    /// [`Priority::Normal`].
    pub fn new(input: I) -> Self {
        Self {
            input,
            deadline: None,
            priority: Priority::Normal,
        }
    }

    /// Sets [`deadline`](Self::deadline).
    pub fn with_deadline(mut self, deadline: tokio::time::Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Sets [`deadline`](Self::deadline) to `timeout` from now. A timeout
    /// too large for an instant (such as `Duration::MAX`) means decades.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        self.with_deadline(saturating_deadline(tokio::time::Instant::now(), timeout))
    }

    /// Sets [`priority`](Self::priority).
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// The deadline, defaulted from `config` if the request has none.
    fn resolved_deadline(&self, config: &BatchConfig) -> Option<tokio::time::Instant> {
        self.deadline.or_else(|| {
            config
                .default_timeout
                .map(|timeout| saturating_deadline(tokio::time::Instant::now(), timeout))
        })
    }
}

impl<I> From<I> for Request<I> {
    fn from(input: I) -> Self {
        Self::new(input)
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_batch_size: NonZeroUsize::new(32).expect("nonzero"),
            max_wait: Duration::from_millis(2),
            wait_policy: WaitPolicy::Adaptive,
            max_batch_cost: None,
            cost_mode: CostMode::Sum,
            queue_capacity: NonZeroUsize::new(1024).expect("nonzero"),
            admission: Admission::Shed,
            max_queue_time: None,
            default_timeout: None,
            max_starvation: Duration::from_millis(100),
            group_window: 256,
        }
    }
}

impl BatchConfig {
    /// Sets [`max_batch_size`](Self::max_batch_size).
    pub fn with_max_batch_size(mut self, size: NonZeroUsize) -> Self {
        self.max_batch_size = size;
        self
    }

    /// Sets [`max_wait`](Self::max_wait).
    pub fn with_max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// Sets [`wait_policy`](Self::wait_policy).
    pub fn with_wait_policy(mut self, policy: WaitPolicy) -> Self {
        self.wait_policy = policy;
        self
    }

    /// Sets [`max_batch_cost`](Self::max_batch_cost) and
    /// [`cost_mode`](Self::cost_mode).
    pub fn with_max_batch_cost(mut self, cost: Option<NonZeroUsize>, mode: CostMode) -> Self {
        self.max_batch_cost = cost;
        self.cost_mode = mode;
        self
    }

    /// Sets [`queue_capacity`](Self::queue_capacity).
    pub fn with_queue_capacity(mut self, capacity: NonZeroUsize) -> Self {
        self.queue_capacity = capacity;
        self
    }

    /// Sets [`admission`](Self::admission).
    pub fn with_admission(mut self, admission: Admission) -> Self {
        self.admission = admission;
        self
    }

    /// Sets [`max_queue_time`](Self::max_queue_time).
    pub fn with_max_queue_time(mut self, time: Option<Duration>) -> Self {
        self.max_queue_time = time;
        self
    }

    /// Sets [`group_window`](Self::group_window).
    pub fn with_group_window(mut self, window: usize) -> Self {
        self.group_window = window;
        self
    }

    /// Sets [`default_timeout`](Self::default_timeout).
    pub fn with_default_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.default_timeout = timeout;
        self
    }

    /// Sets [`max_starvation`](Self::max_starvation).
    pub fn with_max_starvation(mut self, bound: Duration) -> Self {
        self.max_starvation = bound;
        self
    }
}

type CostFn<I> = dyn Fn(&I) -> usize + Send + Sync;
type ValidateFn<I> = dyn Fn(&I) -> Result<(), BoxError> + Send + Sync;

/// The per-input admission hooks.
struct Hooks<I> {
    cost: Arc<CostFn<I>>,
    validate: Arc<ValidateFn<I>>,
    /// Labels on every metric of this stack.
    labels: Vec<::metrics::Label>,
    /// The stage of the pool below, if the batcher may use it.
    staging: Option<crate::pool::Staging>,
}

impl<I> Default for Hooks<I> {
    fn default() -> Self {
        Self {
            cost: Arc::new(|_| 1),
            validate: Arc::new(|_| Ok(())),
            labels: crate::metrics::labels(&crate::ModelInfo::default(), &[]),
            staging: None,
        }
    }
}

impl<I> Clone for Hooks<I> {
    fn clone(&self) -> Self {
        Self {
            cost: self.cost.clone(),
            validate: self.validate.clone(),
            labels: self.labels.clone(),
            staging: self.staging.clone(),
        }
    }
}

impl<I> fmt::Debug for Hooks<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks").finish_non_exhaustive()
    }
}
