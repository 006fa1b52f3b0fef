//! Admission: the checks a request passes before it is queued, cheapest
//! first, shared by single requests and all-or-nothing groups.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, TryAcquireError, oneshot};
use tokio::time::Instant;

use super::Priority;
use super::future::ResponseFuture;
use super::queue::Entry;
use super::shared::Shared;
use crate::BoxError;
use crate::contain::{Contained, catch, drop_contained, lock};
use crate::error::{
    DeadlineExceeded, Draining, FailureKind, InvalidInput, ModelFailed, Overloaded, TooLarge,
};

/// An input that passed its own checks, with its cost.
pub(super) struct Admitted<I> {
    /// Dropped contained until queued: a later check may still refuse it.
    pub(super) input: Contained<I>,
    pub(super) cost: usize,
}

impl<I, O> Shared<I, O> {
    /// Refuses `n` requests once the worker stopped or a drain began.
    pub(super) fn check_open(&self, n: usize) -> Result<(), BoxError> {
        if self.is_closed() {
            return Err(self.closed().into());
        }
        if self.is_draining() {
            self.rejected.fetch_add(n as u64, Ordering::Relaxed);
            return Err(Draining::new().into());
        }
        Ok(())
    }

    /// Predictive shedding: [`Overloaded`] when the work queued and running
    /// ahead would take longer than `max_queue_time` to serve at the
    /// measured rate. Work-conserving: with nothing ahead, never.
    pub(super) fn check_ahead(&self) -> Result<(), BoxError> {
        let Some(max) = self.config.max_queue_time else {
            return Ok(());
        };
        let (items, raw) = self.queue.outstanding();
        if items == 0 {
            return Ok(());
        }
        match lock(&self.rate).time_for(items, raw, &self.config) {
            Some(wait) if wait > max => Err(Overloaded::new(wait).into()),
            _ => Ok(()),
        }
    }

    /// Claims `n` queue slots, all or none, without waiting.
    pub(super) fn claim(&self, n: usize) -> Result<OwnedSemaphorePermit, BoxError> {
        let permits = self.permits_for(n)?;
        match self.slots.clone().try_acquire_many_owned(permits) {
            Ok(slots) => return Ok(slots),
            Err(TryAcquireError::Closed) => return Err(self.closed().into()),
            Err(TryAcquireError::NoPermits) => {}
        }
        // Requests whose callers went away still hold slots until the worker
        // meets them; reclaim those before turning anyone away (and only
        // when some went away: the scan costs a pass over the queue).
        if self.abandoned.swap(0, Ordering::AcqRel) > 0
            && self.queue.remove_cancelled() > 0
            && let Ok(slots) = self.slots.clone().try_acquire_many_owned(permits)
        {
            return Ok(slots);
        }
        Err(Overloaded::new(self.estimated_wait()).into())
    }

    /// `n` as a number of queue slots to claim: [`TooLarge`] if the queue
    /// can never hold that many.
    pub(super) fn permits_for(&self, n: usize) -> Result<u32, BoxError> {
        let capacity = self.config.queue_capacity.get();
        u32::try_from(n)
            .ok()
            .filter(|_| n <= capacity)
            .ok_or_else(|| TooLarge::more_inputs(n, capacity).into())
    }

    /// How long a request arriving now would wait for the work queued and
    /// running ahead of it: a second before anything was measured.
    pub(super) fn estimated_wait(&self) -> Duration {
        let (items, raw) = self.queue.outstanding();
        lock(&self.rate)
            .time_for(items, raw, &self.config)
            .unwrap_or(Duration::from_secs(1))
    }

    /// Validates `input` and measures its cost with the model's hooks.
    pub(super) fn admit_input(&self, input: Contained<I>) -> Result<Admitted<I>, BoxError> {
        // The hooks are user code: a panic there fails this request alone.
        catch(|| (self.hooks.validate)(input.get()))
            .map_err(|message| hook_panicked("validate", message))?
            .map_err(InvalidInput::new)?;
        let cost = catch(|| (self.hooks.cost)(input.get()))
            .map_err(|message| hook_panicked("cost", message))?;
        if let Some(budget) = self.config.max_batch_cost
            && cost > budget.get()
        {
            return Err(InvalidInput::new(format!(
                "input cost {cost} exceeds the batch cost budget {budget}"
            ))
            .into());
        }
        Ok(Admitted { input, cost })
    }

    /// Refuses a request of `items` inputs of own costs summing to `cost`
    /// whose deadline passed, or whose own service, as the cost model
    /// estimates it at the least, would outlast its deadline even on an
    /// idle service ([`TooLarge`]: retrying cannot help).
    ///
    /// If even the smallest batch would outlast it, the service is slow now
    /// (a passing contention, a throttled device), not the request large:
    /// that is a [`DeadlineExceeded`], retryable, and an idle service admits
    /// the request anyway if it fits one batch.
    ///
    /// The model learns only from batches that run, so refusing would keep
    /// a passing slowness on the books, and every such request refused, for
    /// good. So an idle service that measured nothing for
    /// [`CostModel::PROBE_AFTER`](super::rate::CostModel::PROBE_AFTER) also
    /// lets one request it would refuse as too large through, if it fits
    /// one batch, to measure again.
    pub(super) fn check_budget(
        &self,
        items: usize,
        cost: usize,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Result<(), BoxError> {
        let Some(deadline) = deadline else {
            return Ok(());
        };
        if deadline <= now {
            return Err(DeadlineExceeded::new().into());
        }
        let budget = deadline.saturating_duration_since(now);
        let (estimate, floor) = {
            let rate = lock(&self.rate);
            (
                rate.least_time_for(items, cost, &self.config),
                rate.lone_batch_time(),
            )
        };
        let Some(estimate) = estimate.filter(|estimate| *estimate > budget) else {
            return Ok(());
        };
        // Too large if even the smallest batch would meet the deadline, or
        // else the service is slow now. An idle service tries a request that
        // fits one batch either way: always when slow, as a probe when too
        // large.
        let too_large = floor.is_some_and(|floor| floor <= budget);
        let tried = self.fits_one_batch(items, cost)
            && self.queue.is_idle()
            && (!too_large || lock(&self.rate).probe(now));
        match (tried, too_large) {
            (true, _) => Ok(()),
            (false, true) => Err(TooLarge::slower_than(estimate, budget).into()),
            (false, false) => Err(DeadlineExceeded::new().into()),
        }
    }

    /// Whether `items` inputs of own costs summing to `cost` fit one batch.
    fn fits_one_batch(&self, items: usize, cost: usize) -> bool {
        items <= self.config.max_batch_size.get()
            && self
                .config
                .max_batch_cost
                .is_none_or(|budget| cost <= budget.get())
    }

    /// Queues one admitted input on `slot`.
    pub(super) fn enqueue_one(
        &self,
        admitted: Admitted<I>,
        priority: Priority,
        deadline: Option<Instant>,
        slot: OwnedSemaphorePermit,
        now: Instant,
    ) -> Result<ResponseFuture<O>, BoxError> {
        let (entry, future) = self.entry(admitted, priority, deadline, slot, now);
        self.push(std::iter::once(entry))?;
        Ok(future)
    }

    /// Queues admitted inputs as one group, each holding one of `slots`
    /// (one per input): all of them or, if the worker stopped meanwhile,
    /// none.
    pub(super) fn enqueue_all(
        &self,
        admitted: Vec<Admitted<I>>,
        priority: Priority,
        deadline: Option<Instant>,
        slots: OwnedSemaphorePermit,
        now: Instant,
    ) -> Result<Vec<ResponseFuture<O>>, BoxError> {
        let n = admitted.len();
        assert_eq!(slots.num_permits(), n, "one queue slot per input");
        let mut slots = Some(slots);
        let mut entries = Vec::with_capacity(n);
        let mut futures = Vec::with_capacity(n);
        for (index, admitted) in admitted.into_iter().enumerate() {
            // The last input takes what is left of the slots.
            let slot = if index.saturating_add(1) == n {
                slots.take()
            } else {
                slots.as_mut().and_then(|slots| slots.split(1))
            };
            let slot = slot.expect("one queue slot per input");
            let (entry, future) = self.entry(admitted, priority, deadline, slot, now);
            entries.push(entry);
            futures.push(future);
        }
        self.push(entries)?;
        Ok(futures)
    }

    /// The queue entry of one admitted input, and the future answering it.
    fn entry(
        &self,
        Admitted { input, cost }: Admitted<I>,
        priority: Priority,
        deadline: Option<Instant>,
        slot: OwnedSemaphorePermit,
        now: Instant,
    ) -> (Entry<I, O>, ResponseFuture<O>) {
        let (reply, rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::debug_span!("candlewick.request", id, cost, priority = ?priority);
        let entry = Entry {
            id,
            input: input.into_inner(),
            cost,
            arrived: now,
            deadline,
            priority,
            reply,
            _slot: slot,
            span,
        };
        (
            entry,
            ResponseFuture::new(rx, deadline, self.abandoned.clone()),
        )
    }

    /// Queues `entries`; if the worker stopped after admission checked,
    /// none, and says so.
    fn push<E: IntoIterator<Item = Entry<I, O>>>(&self, entries: E) -> Result<(), BoxError> {
        if let Err(entries) = self.queue.push_all(entries) {
            drop_contained(entries, "a refused request's inputs");
            return Err(self.closed().into());
        }
        Ok(())
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
