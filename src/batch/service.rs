use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, TryAcquireError, oneshot};
use tokio::time::Instant;
use tokio_util::sync::PollSemaphore;
use tower::Service;

use super::future::ResponseFuture;
use super::metrics::Outcome;
use super::queue::Entry;
use super::shared::{CloseOnExit, Shared};
use super::{Admission, BatchConfig, Hooks, Request, worker};
use crate::BoxError;
use crate::contain::{catch, lock};
use crate::error::{
    Closed, DeadlineExceeded, Draining, FailureKind, InvalidInput, ModelFailed, Overloaded,
};

/// What a [`Batch::drain`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainReport {
    /// Requests the inner service answered after the drain began.
    pub completed: u64,
    /// Requests refused with [`Draining`].
    pub rejected: u64,
    /// Requests answered with [`Closed`] when the deadline passed.
    pub aborted: u64,
}

/// A `Service<Request<I>, Response = O>` that collects requests into batches
/// for an inner `Service<Vec<I>, Response = Vec<Result<O, E>>>`. See the
/// [module docs](super).
///
/// Clones are cheap and share one queue and worker. A clone holds no
/// reservation.
pub struct Batch<I, O> {
    shared: Arc<Shared<I, O>>,
    slots: PollSemaphore,
    /// A queue slot reserved by `poll_ready` under [`Admission::Wait`].
    reserved: Option<OwnedSemaphorePermit>,
}

impl<I, O> Batch<I, O>
where
    I: Send + 'static,
    O: Send + 'static,
{
    /// Wraps `inner`, spawning the batch worker on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    ///
    /// Every input is admitted at cost 1 and metrics carry the default
    /// model labels; [`BatchLayer`](super::BatchLayer) sets admission hooks
    /// and labels.
    pub fn new<S, E>(inner: S, config: BatchConfig) -> Self
    where
        S: Service<Vec<I>, Response = Vec<Result<O, E>>> + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        E: Into<BoxError>,
    {
        Self::with_hooks(inner, config, Hooks::default())
    }

    /// Like [`new`](Self::new), with admission hooks and metric labels.
    pub(super) fn with_hooks<S, E>(inner: S, config: BatchConfig, hooks: Hooks<I>) -> Self
    where
        S: Service<Vec<I>, Response = Vec<Result<O, E>>> + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        E: Into<BoxError>,
    {
        let shared = Arc::new(Shared::new(config, hooks));
        let slots = shared.slots.clone();
        let worker = shared.clone();
        tokio::spawn(async move {
            // However the worker ends (all handles gone, the inner service
            // failed, a panic inside it), nothing queued is left unanswered
            // and nothing more is admitted.
            let _close = CloseOnExit(worker.clone());
            worker::run(inner, worker).await;
        });
        Self {
            shared,
            slots: PollSemaphore::new(slots),
            reserved: None,
        }
    }
}

impl<I, O> Batch<I, O> {
    /// The configuration this service runs with.
    pub fn config(&self) -> &BatchConfig {
        &self.shared.config
    }

    /// The number of queued requests and the sum of their costs.
    pub fn queue_depth(&self) -> (usize, usize) {
        self.shared.queue.depth()
    }

    /// Whether the worker has stopped for good (its inner service failed or
    /// panicked): every request is then answered with [`Closed`].
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    /// A view of this service that does not keep its worker running, for
    /// [`Health`](crate::health::Health).
    pub fn status(&self) -> BatchStatus
    where
        I: Send + 'static,
        O: Send + 'static,
    {
        let shared: Weak<dyn Stoppable> = Arc::downgrade(&self.shared) as _;
        BatchStatus { shared }
    }

    /// The number of batches running in the inner service.
    pub fn batches_in_flight(&self) -> usize {
        self.shared.queue.batches_in_flight()
    }

    /// The measured rate, in cost units per second, at which the inner
    /// service works off queued requests; `None` before the first batch.
    pub fn service_rate(&self) -> Option<f64> {
        lock(&self.shared.rate).per_second()
    }

    /// How long a request arriving now would wait for the work queued and
    /// running ahead of it, as [`Overloaded::retry_after`] reports it.
    pub fn estimated_wait(&self) -> Duration {
        self.retry_after(self.shared.queue.outstanding_cost())
    }

    /// Stops admitting requests (they get [`Draining`]), lets queued and
    /// running ones finish until `deadline`, then answers what is left with
    /// [`Closed`].
    ///
    /// Queued requests are dispatched without waiting for
    /// [`max_wait`](BatchConfig::max_wait). Requests that expire or are
    /// cancelled meanwhile count in none of the report's numbers.
    pub async fn drain(&self, deadline: Instant) -> DrainReport {
        let shared = &self.shared;
        let completed_before = shared.completed.load(Ordering::Relaxed);
        shared.draining.store(true, Ordering::Release);
        shared.queue.wake.notify_one();
        let finished = async {
            loop {
                // Requests whose callers left count as done.
                shared.queue.remove_cancelled();
                let progress = shared.queue.progress.notified();
                if shared.queue.is_idle() {
                    return;
                }
                // Cancellations do not notify; look again now and then.
                let _ = tokio::time::timeout(Duration::from_millis(10), progress).await;
            }
        };
        if tokio::time::timeout_at(deadline, finished).await.is_err() {
            let queued = shared.queue.close(&Closed::new());
            shared.aborted.fetch_add(queued as u64, Ordering::Relaxed);
            shared.abort.cancel();
            // Every running batch answers at once now; wait for their tasks.
            loop {
                let progress = shared.queue.progress.notified();
                if shared.queue.batches_in_flight() == 0 {
                    break;
                }
                progress.await;
            }
        }
        DrainReport {
            completed: shared
                .completed
                .load(Ordering::Relaxed)
                .saturating_sub(completed_before),
            rejected: shared.rejected.load(Ordering::Relaxed),
            aborted: shared.aborted.load(Ordering::Relaxed),
        }
    }

    fn retry_after(&self, queued_cost: usize) -> Duration {
        let measured = lock(&self.shared.rate).time_for(queued_cost);
        // Before anything was measured, a second is a modest, honest guess.
        measured.unwrap_or(Duration::from_secs(1))
    }

    /// Sends one request through the queue without going through
    /// `poll_ready`: under [`Admission::Wait`] it waits for a queue slot.
    /// Takes an input, or a [`Request`] with a deadline and priority of its
    /// own.
    ///
    /// This is what [`Service::call`] does, for callers that share one
    /// `&Batch` between tasks instead of cloning it.
    pub async fn infer(&self, request: impl Into<Request<I>>) -> Result<O, BoxError> {
        let request = request.into();
        let shared = &self.shared;
        let deadline = request.resolved_deadline(&shared.config);
        let slot = match shared.config.admission {
            Admission::Shed => None,
            Admission::Wait => {
                let acquire = shared.slots.clone().acquire_owned();
                let slot = match deadline {
                    Some(deadline) => tokio::time::timeout_at(deadline, acquire)
                        .await
                        .map_err(|_| BoxError::from(DeadlineExceeded::new())),
                    None => Ok(acquire.await),
                }
                .and_then(|slot| slot.map_err(|_| shared.closed().into()));
                match slot {
                    Ok(slot) => Some(slot),
                    Err(err) => {
                        shared.metrics.outcome(Outcome::of_error(&*err));
                        return Err(err);
                    }
                }
            }
        };
        self.enqueue(request, deadline, slot).await
    }

    /// Admits and queues `request`, which expires at `deadline` (its own, or
    /// the configured default).
    fn enqueue(
        &self,
        request: Request<I>,
        deadline: Option<Instant>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> ResponseFuture<O> {
        let now = Instant::now();
        let Request {
            input, priority, ..
        } = request;
        let refuse = |err: BoxError| {
            self.shared.metrics.outcome(Outcome::of_error(&*err));
            ResponseFuture::failed(err)
        };
        let (cost, slot) = match self.admit(&input, now, deadline, slot) {
            Ok(admitted) => admitted,
            Err(err) => return refuse(err),
        };
        let (reply, rx) = oneshot::channel();
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::debug_span!("candlewick.request", id, cost, priority = ?priority);
        let entry = Entry {
            id,
            input,
            cost,
            arrived: now,
            deadline,
            priority,
            reply,
            _slot: slot,
            span,
        };
        // The worker stopped after admission checked: nothing was queued.
        if self.shared.queue.push(entry).is_err() {
            return refuse(self.shared.closed().into());
        }
        ResponseFuture::new(rx, deadline, self.shared.abandoned.clone())
    }

    /// Checks `input` and claims a queue slot for it.
    fn admit(
        &self,
        input: &I,
        now: Instant,
        deadline: Option<Instant>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Result<(usize, OwnedSemaphorePermit), BoxError> {
        let shared = &self.shared;
        if shared.is_closed() {
            return Err(shared.closed().into());
        }
        if shared.is_draining() {
            shared.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(Draining::new().into());
        }
        // The hooks are user code: a panic there fails this request alone.
        catch(|| (shared.hooks.validate)(input))
            .map_err(|message| hook_panicked("validate", message))?
            .map_err(InvalidInput::new)?;
        let cost = catch(|| (shared.hooks.cost)(input))
            .map_err(|message| hook_panicked("cost", message))?;
        if let Some(budget) = shared.config.max_batch_cost
            && cost > budget.get()
        {
            return Err(InvalidInput::new(format!(
                "input cost {cost} exceeds the batch cost budget {budget}"
            ))
            .into());
        }
        if deadline.is_some_and(|deadline| deadline <= now) {
            return Err(DeadlineExceeded::new().into());
        }
        if let Some(max) = shared.config.max_queue_time {
            let ahead = shared.queue.outstanding_cost();
            let wait = lock(&shared.rate).time_for(ahead);
            if let Some(wait) = wait.filter(|wait| *wait > max) {
                return Err(Overloaded::new(wait).into());
            }
        }
        let slot = match slot {
            Some(slot) => slot,
            None => self.try_claim_slot()?,
        };
        Ok((cost, slot))
    }

    fn try_claim_slot(&self) -> Result<OwnedSemaphorePermit, BoxError> {
        let slots = &self.shared.slots;
        match slots.clone().try_acquire_owned() {
            Ok(slot) => return Ok(slot),
            Err(TryAcquireError::Closed) => return Err(self.shared.closed().into()),
            Err(TryAcquireError::NoPermits) => {}
        }
        // Requests whose callers went away still hold slots until the worker
        // meets them; reclaim those before turning anyone away (and only
        // when some went away: the scan costs a pass over the queue).
        if self.shared.abandoned.swap(0, Ordering::AcqRel) > 0
            && self.shared.queue.remove_cancelled() > 0
            && let Ok(slot) = slots.clone().try_acquire_owned()
        {
            return Ok(slot);
        }
        Err(Overloaded::new(self.estimated_wait()).into())
    }
}

impl<I, O> Clone for Batch<I, O> {
    fn clone(&self) -> Self {
        self.shared.queue.add_handle();
        Self {
            shared: self.shared.clone(),
            slots: self.slots.clone(),
            reserved: None,
        }
    }
}

impl<I, O> Drop for Batch<I, O> {
    fn drop(&mut self) {
        self.shared.queue.remove_handle();
    }
}

impl<I, O> fmt::Debug for Batch<I, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (depth, cost) = self.shared.queue.depth();
        f.debug_struct("Batch")
            .field("config", &self.shared.config)
            .field("queued", &depth)
            .field("queued_cost", &cost)
            .field("batches_in_flight", &self.batches_in_flight())
            .finish()
    }
}

impl<I, O> Service<Request<I>> for Batch<I, O>
where
    I: Send + 'static,
    O: Send + 'static,
{
    type Response = O;
    type Error = BoxError;
    type Future = ResponseFuture<O>;

    /// Fails with [`Closed`] once the worker stopped for good, as tower's
    /// `Buffer` does.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self.shared.config.admission {
            Admission::Shed if self.shared.is_closed() => {
                Poll::Ready(Err(self.shared.closed().into()))
            }
            // Rejections happen in `call`, so that one refused request never
            // looks like a failed service to the caller's stack.
            Admission::Shed => Poll::Ready(Ok(())),
            Admission::Wait => {
                if self.reserved.is_none() {
                    let slot =
                        ready!(self.slots.poll_acquire(cx)).ok_or_else(|| self.shared.closed())?;
                    self.reserved = Some(slot);
                }
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, request: Request<I>) -> Self::Future {
        let slot = self.reserved.take();
        let deadline = request.resolved_deadline(&self.shared.config);
        self.enqueue(request, deadline, slot)
    }
}

/// A view of a [`Batch`] that does not keep its worker running (see
/// [`Batch::status`]).
#[derive(Clone)]
pub struct BatchStatus {
    shared: Weak<dyn Stoppable>,
}

impl BatchStatus {
    /// Whether the worker has stopped: for good (its inner service failed),
    /// or because every handle is gone.
    pub fn is_stopped(&self) -> bool {
        self.shared
            .upgrade()
            .is_none_or(|shared| shared.is_stopped())
    }
}

impl fmt::Debug for BatchStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchStatus")
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

/// What a [`BatchStatus`] asks of the worker's state, whatever its types.
trait Stoppable: Send + Sync {
    fn is_stopped(&self) -> bool;
}

impl<I: Send, O: Send> Stoppable for Shared<I, O> {
    fn is_stopped(&self) -> bool {
        self.is_closed()
    }
}

/// The error for a request whose admission hook panicked.
fn hook_panicked(hook: &str, message: String) -> BoxError {
    ModelFailed::new(
        FailureKind::Panic,
        format!("the model's {hook} hook panicked: {message}"),
    )
    .into()
}
