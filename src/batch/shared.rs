//! The state the service's handles and the batch worker share.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::metrics::BatchMetrics;
use super::queue::Queue;
use super::rate::CostModel;
use super::{BatchConfig, Hooks};
use crate::error::Closed;

/// What the handles and the worker share.
pub(super) struct Shared<I, O> {
    pub(super) queue: Queue<I, O>,
    pub(super) metrics: BatchMetrics,
    pub(super) config: BatchConfig,
    pub(super) hooks: Hooks<I>,
    /// One permit per free queue slot.
    pub(super) slots: Arc<Semaphore>,
    /// Why the worker stopped for good, once it did.
    pub(super) closed: OnceLock<Closed>,
    /// What a batch costs in time, measured.
    pub(super) rate: Mutex<CostModel>,
    /// Set when a drain began: admit nothing more, dispatch without waiting.
    pub(super) draining: AtomicBool,
    /// Cancelled when a drain runs out of time.
    pub(super) abort: CancellationToken,
    /// Response futures dropped before their answer: the queue may hold
    /// cancelled requests.
    pub(super) abandoned: Arc<AtomicUsize>,
    /// Requests answered by the inner service.
    pub(super) completed: AtomicU64,
    /// The id of the next request, for tracing.
    pub(super) next_id: AtomicU64,
    /// Requests refused because the service was draining.
    pub(super) rejected: AtomicU64,
    /// Requests answered with [`Closed`] when a drain ran out of time.
    pub(super) aborted: AtomicU64,
    /// Reservations holding room and not yet queued: accepted requests a
    /// drain waits for.
    pub(super) reservations: AtomicUsize,
    /// Batches staged in the pool that no replica took yet, oldest first:
    /// each finished batch frees a replica, which takes the oldest.
    pub(super) staged: Mutex<VecDeque<Arc<Begun>>>,
}

/// When a staged batch began to run, and how many batches ran then, itself
/// included: set when the batch before it finished.
pub(super) type Begun = OnceLock<(Instant, usize)>;

impl<I, O> Shared<I, O> {
    pub(super) fn new(mut config: BatchConfig, hooks: Hooks<I>) -> Self {
        // More room than a semaphore can count is no bound at all.
        config.queue_capacity = config
            .queue_capacity
            .min(std::num::NonZeroUsize::new(Semaphore::MAX_PERMITS).expect("a positive constant"));
        let metrics = BatchMetrics::new(&hooks.labels);
        Self {
            queue: Queue::new(metrics.clone(), &config),
            metrics,
            slots: Arc::new(Semaphore::new(config.queue_capacity.get())),
            config,
            hooks,
            closed: OnceLock::new(),
            rate: Mutex::new(CostModel::new()),
            draining: AtomicBool::new(false),
            abort: CancellationToken::new(),
            abandoned: Arc::default(),
            completed: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
            aborted: AtomicU64::new(0),
            reservations: AtomicUsize::new(0),
            staged: Mutex::default(),
        }
    }

    /// Whether the worker has stopped for good: its queue slots are closed.
    pub(super) fn is_closed(&self) -> bool {
        self.slots.is_closed()
    }

    pub(super) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The error for requests refused because the worker stopped.
    pub(super) fn closed(&self) -> Closed {
        self.closed.get().cloned().unwrap_or_default()
    }

    /// Stops admitting requests and answers every queued one with `closed`
    /// (the first reason given wins).
    pub(super) fn close(&self, closed: Closed) {
        let _ = self.closed.set(closed);
        self.slots.close();
        self.queue.close(&self.closed());
    }
}

/// Closes the queue when the worker task ends or unwinds.
pub(super) struct CloseOnExit<I, O>(pub(super) Arc<Shared<I, O>>);

impl<I, O> Drop for CloseOnExit<I, O> {
    fn drop(&mut self) {
        let closed = if std::thread::panicking() {
            Closed::because("the batch worker panicked")
        } else {
            Closed::new()
        };
        self.0.close(closed);
    }
}
