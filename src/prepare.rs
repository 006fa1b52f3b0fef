// Counts and durations here run for months: every operation that could
// overflow says how it saturates.
#![warn(clippy::arithmetic_side_effects)]
//! The preparation stage: turning a raw request into model inputs (parsing,
//! tokenizing) on a bounded pool of threads of its own, never on the async
//! runtime's workers.
//!
//! Tokenizing a large request can take hundreds of milliseconds of CPU. Done
//! in a handler, it holds a runtime worker that should be reading requests,
//! answering probes and rejecting overload, so under load every answer waits
//! behind it. A [`Preparer`] runs such work on `threads` threads, queues at
//! most `queue_capacity` jobs, and answers the rest at once with
//! [`Overloaded`].
//!
//! The cheap checks come first: reserve room in the batcher's queue
//! ([`Batch::reserve`](crate::batch::Batch::reserve)) before preparing, so a
//! request that would be refused is refused before any work is spent on it.
//! If preparing fails, [`Reservation::refuse`](crate::batch::Reservation::refuse)
//! gives the room back and counts the request under its error's outcome.
//!
//! # Examples
//!
//! ```
//! use candlewick::BoxError;
//! use candlewick::prepare::{PrepareConfig, Preparer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let preparer = Preparer::new(PrepareConfig::default(), &Default::default())?;
//! let body = "one two three".to_owned();
//! // Runs on a preparation thread; the closure's own result comes back.
//! let words = preparer.run(move || body.split(' ').count()).await?;
//! assert_eq!(words, 3);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram};
use tokio::sync::oneshot;

use crate::BoxError;
use crate::ModelInfo;
use crate::contain::{catch, drop_contained, lock};
use crate::error::{Closed, FailureKind, ModelFailed, Overloaded};
use crate::metrics::names;

/// How many threads prepare requests, and how many jobs may wait for one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default))]
#[non_exhaustive]
pub struct PrepareConfig {
    /// Preparation threads. Default: the machine's available parallelism.
    pub threads: NonZeroUsize,
    /// Jobs waiting for a thread; more are refused with [`Overloaded`].
    /// Default: 64.
    pub queue_capacity: NonZeroUsize,
}

impl Default for PrepareConfig {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            queue_capacity: NonZeroUsize::new(64).expect("nonzero"),
        }
    }
}

impl PrepareConfig {
    /// Sets [`threads`](Self::threads).
    pub fn with_threads(mut self, threads: NonZeroUsize) -> Self {
        self.threads = threads;
        self
    }

    /// Sets [`queue_capacity`](Self::queue_capacity).
    pub fn with_queue_capacity(mut self, capacity: NonZeroUsize) -> Self {
        self.queue_capacity = capacity;
        self
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A bounded pool of preparation threads; see the [module docs](self).
/// Cheap to clone; the threads stop once the last clone is dropped and the
/// queued jobs are done.
#[derive(Clone)]
pub struct Preparer {
    shared: Arc<Shared>,
}

struct Shared {
    jobs: SyncSender<Job>,
    config: PrepareConfig,
    /// Jobs queued and not yet taken by a thread.
    queued: AtomicUsize,
    /// A moving average of one job's duration, in nanoseconds, for
    /// Retry-After.
    mean_nanos: AtomicU64,
    metrics: PrepareMetrics,
}

#[derive(Clone)]
struct PrepareMetrics {
    duration: Histogram,
    wait: Histogram,
    queue_depth: Gauge,
    rejected: Counter,
}

impl Preparer {
    /// Starts `config.threads` threads; metrics carry `model`'s labels.
    ///
    /// Fails if a thread cannot be started.
    pub fn new(config: PrepareConfig, model: &ModelInfo) -> std::io::Result<Self> {
        let labels = crate::metrics::labels(model, &[]);
        let metrics = PrepareMetrics {
            duration: metrics::histogram!(names::PREPARE_DURATION, labels.clone()),
            wait: metrics::histogram!(names::PREPARE_WAIT, labels.clone()),
            queue_depth: metrics::gauge!(names::PREPARE_QUEUE_DEPTH, labels.clone()),
            rejected: metrics::counter!(names::PREPARE_REJECTED, labels),
        };
        let (jobs, receiver) = mpsc::sync_channel::<Job>(config.queue_capacity.get());
        let receiver = Arc::new(Mutex::new(receiver));
        for index in 0..config.threads.get() {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("candlewick-prepare-{index}"))
                .spawn(move || {
                    loop {
                        // One thread waits on the channel at a time; the
                        // others wait for the lock. No user code runs under it.
                        let job = lock(&receiver).recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(Self {
            shared: Arc::new(Shared {
                jobs,
                config,
                queued: AtomicUsize::new(0),
                mean_nanos: AtomicU64::new(0),
                metrics,
            }),
        })
    }

    /// The configuration this pool runs with.
    pub fn config(&self) -> &PrepareConfig {
        &self.shared.config
    }

    /// Jobs waiting for a thread now.
    pub fn queue_depth(&self) -> usize {
        self.shared.queued.load(Ordering::Acquire)
    }

    /// Runs `work` on a preparation thread and returns what it returned.
    ///
    /// Fails at once with [`Overloaded`] when
    /// [`queue_capacity`](PrepareConfig::queue_capacity) jobs are waiting
    /// (with a Retry-After from the measured job time); with
    /// [`ModelFailed`] of kind `Panic` if `work` panicked; with [`Closed`] if
    /// the threads are gone. Dropping the future before a thread takes the
    /// job skips it.
    pub async fn run<T, F>(&self, work: F) -> Result<T, BoxError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let shared = self.shared.clone();
        let (reply, answer) = oneshot::channel();
        let queued_at = Instant::now();
        let job: Job = Box::new(move || {
            shared.left_queue();
            // The caller went away while it waited: skip the work.
            if reply.is_closed() {
                return drop_contained(work, "skipped preparation work");
            }
            let started = Instant::now();
            shared
                .metrics
                .wait
                .record(started.duration_since(queued_at));
            let result = catch(work);
            let took = started.elapsed();
            shared.metrics.duration.record(took);
            shared.record_mean(took);
            // The caller may have gone meanwhile; its answer is dropped.
            if let Err(unsent) = reply.send(result) {
                drop_contained(unsent, "a preparation nobody waited for");
            }
        });
        let shared = &self.shared;
        shared.entered_queue();
        match shared.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => {
                // The job holds the caller's closure: its `Drop` is user code.
                drop_contained(job, "a refused preparation");
                shared.left_queue();
                shared.metrics.rejected.increment(1);
                return Err(Overloaded::new(shared.retry_after()).into());
            }
            Err(TrySendError::Disconnected(job)) => {
                drop_contained(job, "a refused preparation");
                shared.left_queue();
                return Err(Closed::because("the preparation threads stopped").into());
            }
        }
        match answer.await {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(message)) => Err(ModelFailed::new(
                FailureKind::Panic,
                format!("the preparation panicked: {message}"),
            )
            .into()),
            Err(_) => Err(Closed::because("the preparation threads stopped").into()),
        }
    }
}

impl Shared {
    fn entered_queue(&self) {
        let depth = self.queued.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        self.metrics.queue_depth.set(depth as f64);
    }

    fn left_queue(&self) {
        let depth = self.queued.fetch_sub(1, Ordering::AcqRel).saturating_sub(1);
        self.metrics.queue_depth.set(depth as f64);
    }

    /// Folds `took` into the moving average (weight 1/8: recent jobs count).
    fn record_mean(&self, took: Duration) {
        let took = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .mean_nanos
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |mean| {
                Some(if mean == 0 {
                    took
                } else {
                    mean.saturating_sub(mean / 8).saturating_add(took / 8)
                })
            });
    }

    /// How long until the jobs queued now are done: their number times the
    /// mean job time, spread over the threads; a second before any job ran.
    fn retry_after(&self) -> Duration {
        let mean = self.mean_nanos.load(Ordering::Acquire);
        if mean == 0 {
            return Duration::from_secs(1);
        }
        let queued = self.queued.load(Ordering::Acquire).max(1) as u64;
        let threads = self.config.threads.get() as u64;
        let nanos = mean.saturating_mul(queued).checked_div(threads);
        Duration::from_nanos(nanos.unwrap_or(mean))
    }
}

impl fmt::Debug for Preparer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Preparer")
            .field("config", &self.shared.config)
            .field("queued", &self.queue_depth())
            .finish()
    }
}
