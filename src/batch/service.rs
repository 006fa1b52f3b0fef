use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::PollSemaphore;
use tower::Service;

use super::future::ResponseFuture;
use super::metrics::Outcome;
use super::shared::{CloseOnExit, Shared};
use super::{Admission, BatchConfig, Hooks, Priority, Request, worker};
use crate::BoxError;
use crate::contain::{Contained, drop_contained, lock, saturating_deadline};
use crate::error::{Closed, DeadlineExceeded};

/// What a [`Batch::drain`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainReport {
    /// Requests the inner service answered after the drain began.
    pub completed: u64,
    /// Requests refused with [`Draining`](crate::error::Draining).
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
    /// service works off batches the size of the recent ones, across the
    /// replicas seen working at once; `None` before the first batch.
    pub fn service_rate(&self) -> Option<f64> {
        lock(&self.shared.rate).per_second()
    }

    /// How long a request arriving now would wait for the work queued and
    /// running ahead of it, as
    /// [`Overloaded::retry_after`](crate::error::Overloaded::retry_after)
    /// reports it.
    pub fn estimated_wait(&self) -> Duration {
        self.shared.estimated_wait()
    }

    /// [`drain`](Self::drain) with a deadline `timeout` from now (saturating:
    /// `Duration::MAX` waits as long as the work takes).
    pub async fn drain_within(&self, timeout: Duration) -> DrainReport {
        self.drain(saturating_deadline(Instant::now(), timeout))
            .await
    }

    /// Stops admitting requests (they get [`Draining`]), lets queued and
    /// running ones finish until `deadline`, then answers what is left with
    /// [`Closed`].
    ///
    /// [`Draining`]: crate::error::Draining
    ///
    /// Queued requests are dispatched without waiting for
    /// [`max_wait`](BatchConfig::max_wait). Requests that expire or are
    /// cancelled meanwhile count in none of the report's numbers.
    pub async fn drain(&self, deadline: Instant) -> DrainReport {
        let shared = &self.shared;
        let before = |count: &std::sync::atomic::AtomicU64| count.load(Ordering::Relaxed);
        let (completed_before, rejected_before, aborted_before) = (
            before(&shared.completed),
            before(&shared.rejected),
            before(&shared.aborted),
        );
        shared.draining.store(true, Ordering::Release);
        shared.queue.wake.notify_one();
        let finished = async {
            loop {
                // Requests whose callers left count as done.
                shared.queue.remove_cancelled();
                let progress = shared.queue.progress.notified();
                // Room reserved before the drain began belongs to accepted
                // requests still being prepared: wait for them too.
                if shared.queue.is_idle() && shared.reservations.load(Ordering::Acquire) == 0 {
                    return;
                }
                // Cancellations and reservations do not notify; look again
                // now and then.
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
            completed: before(&shared.completed).saturating_sub(completed_before),
            rejected: before(&shared.rejected).saturating_sub(rejected_before),
            aborted: before(&shared.aborted).saturating_sub(aborted_before),
        }
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
        let deadline = request.resolved_deadline(&self.shared.config);
        let slot = match self.shared.config.admission {
            Admission::Shed => None,
            Admission::Wait => match self.wait_for_slots(1, deadline).await {
                Ok(slot) => Some(slot),
                Err(err) => {
                    drop_contained(request, REFUSED);
                    return Err(self.refused(err, 1));
                }
            },
        };
        self.enqueue(request, deadline, slot).await
    }

    /// Reserves queue room for a request of `n` inputs before they exist:
    /// checks that the service is open and that the work ahead leaves time
    /// (see [`max_queue_time`](BatchConfig::max_queue_time); never refused
    /// with nothing ahead), and claims `n` queue slots, all or none. Under
    /// [`Admission::Shed`] it never waits; under [`Admission::Wait`] it waits
    /// for the slots, up to the default timeout (slots are granted in
    /// order, so a large reservation waiting for room holds up the callers
    /// behind it).
    ///
    /// It costs a few atomic operations: call it before parsing, tokenizing
    /// or any work a refusal would waste, then run the prepared inputs with
    /// [`Reservation::infer_all`]. Fails with [`Overloaded`], [`Draining`],
    /// [`Closed`] or, for more inputs than the queue holds, [`TooLarge`].
    ///
    /// [`Overloaded`]: crate::error::Overloaded
    /// [`Draining`]: crate::error::Draining
    /// [`TooLarge`]: crate::error::TooLarge
    pub async fn reserve(&self, n: usize) -> Result<Reservation<I, O>, BoxError> {
        let shared = &self.shared;
        let slots = if n == 0 {
            shared.check_open(0)?;
            None
        } else {
            let deadline = Request::new(()).resolved_deadline(&shared.config);
            let admitted = async {
                shared.check_open(n)?;
                shared.check_ahead()?;
                match shared.config.admission {
                    Admission::Shed => shared.claim(n),
                    Admission::Wait => self.wait_for_slots(n, deadline).await,
                }
            };
            let slots = admitted.await.map_err(|err| self.refused(err, n))?;
            shared.reservations.fetch_add(1, Ordering::AcqRel);
            Some(slots)
        };
        Ok(Reservation {
            batch: self.clone(),
            counted: slots.is_some(),
            slots,
            spent: false,
        })
    }

    /// Runs every request, admitted or refused as one (see [`reserve`]
    /// and [`Reservation::infer_all`]). The answers come in order.
    ///
    /// [`reserve`]: Self::reserve
    pub async fn infer_all(&self, requests: Vec<Request<I>>) -> Result<Vec<O>, BoxError> {
        match self.reserve(requests.len()).await {
            Ok(reservation) => reservation.infer_all(requests).await,
            Err(err) => {
                drop_contained(requests, REFUSED);
                Err(err)
            }
        }
    }

    /// Waits for `n` queue slots until `deadline`.
    async fn wait_for_slots(
        &self,
        n: usize,
        deadline: Option<Instant>,
    ) -> Result<OwnedSemaphorePermit, BoxError> {
        let shared = &self.shared;
        let acquire = shared
            .slots
            .clone()
            .acquire_many_owned(shared.permits_for(n)?);
        let slots = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, acquire)
                .await
                .map_err(|_| BoxError::from(DeadlineExceeded::new()))?,
            None => acquire.await,
        };
        slots.map_err(|_| shared.closed().into())
    }

    /// Admits and queues `request`, which expires at `deadline` (its own, or
    /// the configured default), on `slot` if one was reserved.
    fn enqueue(
        &self,
        request: Request<I>,
        deadline: Option<Instant>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> ResponseFuture<O> {
        let shared = &self.shared;
        let now = Instant::now();
        let Request {
            input, priority, ..
        } = request;
        let input = Contained::new(input, REFUSED);
        // Bad input hears why before overload is considered.
        let admitted = (|| {
            shared.check_open(1)?;
            let admitted = shared.admit_input(input)?;
            shared.check_budget(1, admitted.cost, deadline, now)?;
            shared.check_ahead()?;
            let slot = match slot {
                Some(slot) => slot,
                None => shared.claim(1)?,
            };
            shared.enqueue_one(admitted, priority, deadline, slot, now)
        })();
        admitted.unwrap_or_else(|err| ResponseFuture::failed(self.refused(err, 1)))
    }

    /// Counts `n` requests refused with `err`.
    fn refused(&self, err: BoxError, n: usize) -> BoxError {
        self.shared.metrics.outcome_n(Outcome::of_error(&*err), n);
        err
    }
}

/// What a panic in the `Drop` of a refused request's input is logged as.
const REFUSED: &str = "a refused request's input";

/// Queue room reserved for one client request's inputs before they were
/// prepared (see [`Batch::reserve`]). Dropping it frees the room.
pub struct Reservation<I, O> {
    batch: Batch<I, O>,
    slots: Option<OwnedSemaphorePermit>,
    /// Counted in the batcher's reservations until dropped, so that a drain
    /// waits for it (and for its inputs once queued).
    counted: bool,
    /// Called as a tower service already.
    spent: bool,
}

impl<I, O> Reservation<I, O> {
    /// The number of inputs reserved for.
    pub fn len(&self) -> usize {
        self.slots
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }

    /// Whether nothing was reserved.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Gives the room back, counting the requests it was reserved for as
    /// answered with `err` in `candlewick_requests_total` (under `err`'s
    /// outcome, as [`classify`](crate::error::classify) labels it).
    ///
    /// For a client request that fails between [`Batch::reserve`] and its
    /// call: its preparation found it invalid or panicked, or the
    /// preparation queue was full. Dropping the reservation instead gives
    /// the room back uncounted, so the error ratio a canary is judged by
    /// would miss such failures.
    pub fn refuse(self, err: &(dyn std::error::Error + 'static)) {
        let n = self.len();
        self.batch
            .shared
            .metrics
            .outcome_n(Outcome::of_error(err), n);
    }

    /// Runs `requests` as one: every input is validated and measured first,
    /// and the group is queued only if all pass and its own estimated
    /// service time fits its earliest deadline
    /// ([`TooLarge`](crate::error::TooLarge) otherwise; see the
    /// [module docs](super) for a deadline not even the smallest batch
    /// meets). A
    /// group larger than the reservation claims the difference, all or
    /// none. The inputs may run in several batches; the answers come in
    /// order. The first failure answers the whole group, and dropping the
    /// future (or that failure) cancels every input still queued. The group
    /// is batched as [`Priority::High`] if any of its requests is.
    pub async fn infer_all(mut self, requests: Vec<Request<I>>) -> Result<Vec<O>, BoxError> {
        let n = requests.len();
        let futures = self
            .queue_all(requests)
            .map_err(|err| self.batch.refused(err, n))?;
        answer_all(futures).await
    }

    fn queue_all(&mut self, requests: Vec<Request<I>>) -> Result<Vec<ResponseFuture<O>>, BoxError> {
        let shared = &self.batch.shared;
        let now = Instant::now();
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let deadline = requests
            .iter()
            .filter_map(|request| request.resolved_deadline(&shared.config))
            .min();
        let priority = if requests.iter().any(|r| r.priority == Priority::High) {
            Priority::High
        } else {
            Priority::Normal
        };
        let inputs: Vec<Contained<I>> = requests
            .into_iter()
            .map(|request| Contained::new(request.input, REFUSED))
            .collect();
        // Room reserved before a drain began was accepted: only a stopped
        // worker refuses it.
        if self.slots.is_none() || shared.is_closed() {
            shared.check_open(inputs.len())?;
        }
        let admitted = inputs
            .into_iter()
            .map(|input| shared.admit_input(input))
            .collect::<Result<Vec<_>, _>>()?;
        let cost = admitted
            .iter()
            .fold(0usize, |sum, input| sum.saturating_add(input.cost));
        shared.check_budget(admitted.len(), cost, deadline, now)?;
        let slots = take_slots(&mut self.slots, shared, admitted.len())?;
        shared.enqueue_all(admitted, priority, deadline, slots, now)
    }
}

/// `n` slots: those `reserved`, with the difference claimed (all or none)
/// or given back.
fn take_slots<I, O>(
    reserved: &mut Option<OwnedSemaphorePermit>,
    shared: &Shared<I, O>,
    n: usize,
) -> Result<OwnedSemaphorePermit, BoxError> {
    let Some(mut slots) = reserved.take() else {
        shared.check_ahead()?;
        return shared.claim(n);
    };
    // The whole group must fit in the queue, not just what it adds.
    shared.permits_for(n)?;
    let held = slots.num_permits();
    if n > held {
        // The inputs beyond the reservation are new work: admitted as a
        // single request's would be, without waiting.
        shared.check_ahead()?;
        slots.merge(shared.claim(n.saturating_sub(held))?);
    } else if n < held {
        drop(slots.split(held.saturating_sub(n)));
    }
    Ok(slots)
}

/// A reservation is also a one-shot tower service: `oneshot(requests)` runs
/// them as [`infer_all`](Reservation::infer_all) does, queued at the call,
/// so a stack of tower layers can wrap the group's call. `poll_ready` fails
/// once it was called.
impl<I, O> Service<Vec<Request<I>>> for Reservation<I, O>
where
    I: Send + 'static,
    O: Send + 'static,
{
    type Response = Vec<O>;
    type Error = BoxError;
    type Future = super::future::GroupFuture<O>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(if self.spent {
            Err("a reservation serves one call".into())
        } else {
            Ok(())
        })
    }

    fn call(&mut self, requests: Vec<Request<I>>) -> Self::Future {
        if std::mem::replace(&mut self.spent, true) {
            return Box::pin(std::future::ready(Err(
                "a reservation serves one call".into()
            )));
        }
        // The room moves into the call; this handle keeps none of it.
        let mut reservation = Reservation {
            batch: self.batch.clone(),
            slots: self.slots.take(),
            counted: std::mem::take(&mut self.counted),
            spent: true,
        };
        // Queued at the call, as tower's `Buffer` does, not at first poll.
        let n = requests.len();
        let queued = reservation
            .queue_all(requests)
            .map_err(|err| reservation.batch.refused(err, n));
        Box::pin(async move {
            let answers = answer_all(queued?).await;
            // Counted until answered, as `infer_all` keeps it.
            drop(reservation);
            answers
        })
    }
}

impl<I, O> Drop for Reservation<I, O> {
    fn drop(&mut self) {
        if self.counted {
            self.batch
                .shared
                .reservations
                .fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Every answer of a group, in order; the first failure at once, dropping
/// (and so cancelling) the rest.
async fn answer_all<O>(futures: Vec<ResponseFuture<O>>) -> Result<Vec<O>, BoxError> {
    let mut pending: Vec<_> = futures.into_iter().map(|f| Some(Box::pin(f))).collect();
    let mut outputs: Vec<Option<O>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (future, output) in pending.iter_mut().zip(outputs.iter_mut()) {
            let Some(answer) = future.as_mut().map(|future| future.as_mut().poll(cx)) else {
                continue;
            };
            match answer {
                Poll::Ready(Ok(answer)) => {
                    *output = Some(answer);
                    *future = None;
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => done = false,
            }
        }
        if done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await?;
    Ok(outputs.into_iter().flatten().collect())
}

impl<I, O> fmt::Debug for Reservation<I, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("len", &self.len())
            .finish()
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
