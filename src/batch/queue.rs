//! The bounded queue between callers and the batch worker.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, oneshot};
use tokio::time::Instant;

use super::metrics::{BatchMetrics, Outcome};
use super::rate::Pace;
use super::{BatchConfig, CostMode, Priority, WaitPolicy};
use crate::BoxError;
use crate::contain::{drop_contained, lock, saturating_deadline};
use crate::error::{Closed, DeadlineExceeded};

pub(super) type Reply<O> = oneshot::Sender<Result<O, BoxError>>;

/// One admitted request.
pub(super) struct Entry<I, O> {
    pub(super) id: u64,
    pub(super) input: I,
    pub(super) cost: usize,
    pub(super) arrived: Instant,
    pub(super) deadline: Option<Instant>,
    pub(super) priority: Priority,
    pub(super) reply: Reply<O>,
    /// The queue slot this request occupies, freed when it leaves the queue.
    pub(super) _slot: OwnedSemaphorePermit,
    pub(super) span: tracing::Span,
}

impl<I, O> Entry<I, O> {
    fn into_parts(self) -> (I, Ticket<O>) {
        let ticket = Ticket {
            id: self.id,
            reply: self.reply,
            span: self.span,
            arrived: self.arrived,
            deadline: self.deadline,
        };
        (self.input, ticket)
    }

    fn is_cancelled(&self) -> bool {
        self.reply.is_closed()
    }

    fn is_expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|deadline| deadline <= now)
    }
}

/// Requests taken from the queue to run as one batch: the inputs for the
/// inner service, and a ticket per input to answer it by.
pub(super) struct Taken<I, O> {
    pub(super) inputs: Vec<I>,
    pub(super) tickets: Vec<Ticket<O>>,
    /// The batch's cost, as [`CostMode`] counts it.
    pub(super) cost: usize,
    /// The sum of its inputs' own costs.
    pub(super) raw: usize,
}

impl<I, O> Taken<I, O> {
    /// Adds `entry`'s input and ticket (the batch's cost is the caller's to
    /// set), recording how long it queued.
    fn push(&mut self, entry: Entry<I, O>, now: Instant, metrics: &BatchMetrics) {
        self.raw = self.raw.saturating_add(entry.cost);
        metrics
            .queue_wait
            .record(now.saturating_duration_since(entry.arrived));
        let (input, ticket) = entry.into_parts();
        self.inputs.push(input);
        self.tickets.push(ticket);
    }
}

/// Where the answer to one batched request goes.
pub(super) struct Ticket<O> {
    pub(super) id: u64,
    pub(super) reply: Reply<O>,
    pub(super) span: tracing::Span,
    pub(super) arrived: Instant,
    pub(super) deadline: Option<Instant>,
}

impl<O> Ticket<O> {
    /// Sends `answer`, recording `outcome` if the caller got it, and why not
    /// otherwise (its own future gave up at the deadline, or it went away).
    pub(super) fn answer(
        self,
        answer: Result<O, BoxError>,
        outcome: Outcome,
        metrics: &BatchMetrics,
    ) {
        let now = Instant::now();
        let Err(unsent) = self.reply.send(answer) else {
            metrics.outcome(outcome);
            metrics
                .request_duration
                .record(now.saturating_duration_since(self.arrived));
            return;
        };
        if self.deadline.is_some_and(|deadline| deadline <= now) {
            metrics.outcome(Outcome::Deadline);
        } else {
            metrics.outcome(Outcome::Cancelled);
        }
        // Nobody waits for it; its `Drop` is user code.
        drop_contained(unsent, "an answer nobody waited for");
    }
}

/// What the worker should do next.
pub(super) enum Next<I, O> {
    /// Run this batch now.
    Run(Taken<I, O>),
    /// Nothing is due before this instant (unless more requests arrive).
    WaitUntil(Instant),
    /// The queue is empty.
    Empty,
}

pub(super) struct Queue<I, O> {
    state: Mutex<State<I, O>>,
    /// Handles only: used outside the lock too, never cloned per call.
    metrics: BatchMetrics,
    /// Wakes the worker: a request arrived, or the last handle went away.
    pub(super) wake: Notify,
    /// Wakes drains: requests left the queue, or a batch finished.
    pub(super) progress: Notify,
    /// Wakes the worker: the queue now holds a full batch.
    pub(super) filled: Notify,
    /// What makes a batch full: `max_batch_size` requests, or
    /// `max_batch_cost`.
    full_len: usize,
    full_cost: Option<u128>,
    /// Live service handles; the worker stops once this is 0 and the queue is
    /// drained.
    handles: AtomicUsize,
    /// Batches taken and not yet answered; counted when taken, under the
    /// lock, so that "queue empty and nothing in flight" is never seen early.
    in_flight: AtomicUsize,
}

struct State<I, O> {
    /// One lane per priority, `High` first.
    lanes: [VecDeque<Entry<I, O>>; 2],
    /// The number of entries in all lanes.
    len: usize,
    /// Sum of the costs of all entries (wide enough never to overflow).
    cost: u128,
    /// Inputs in the batches running, and the sum of their own costs.
    running_items: usize,
    running_raw: u128,
    /// Set by [`Queue::close`]: nothing is admitted any more.
    closed: bool,
    /// When the last request arrived, and a moving average of the time
    /// between arrivals, in seconds: how soon a batch would fill.
    last_arrival: Option<Instant>,
    arrival_gap: Option<f64>,
    /// Gaps averaged so far, up to the window.
    gaps: u32,
}

fn lane(priority: Priority) -> usize {
    match priority {
        Priority::High => 0,
        Priority::Normal => 1,
    }
}

impl<I, O> Queue<I, O> {
    pub(super) fn new(metrics: BatchMetrics, config: &BatchConfig) -> Self {
        Self {
            metrics,
            full_len: config.max_batch_size.get(),
            full_cost: config.max_batch_cost.map(|budget| budget.get() as u128),
            state: Mutex::new(State {
                lanes: [VecDeque::new(), VecDeque::new()],
                len: 0,
                cost: 0,
                running_items: 0,
                running_raw: 0,
                closed: false,
                last_arrival: None,
                arrival_gap: None,
                gaps: 0,
            }),
            wake: Notify::new(),
            progress: Notify::new(),
            filled: Notify::new(),
            handles: AtomicUsize::new(1),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// The state. No user code runs under this lock (requests leave it
    /// before they are answered or dropped), and a poisoned lock is recovered.
    fn lock(&self) -> std::sync::MutexGuard<'_, State<I, O>> {
        lock(&self.state)
    }

    /// Queues `entries`, one group admitted together, or hands them back if
    /// the queue was closed.
    pub(super) fn push_all<E>(&self, entries: E) -> Result<(), E>
    where
        E: IntoIterator<Item = Entry<I, O>>,
    {
        let mut state = self.lock();
        if state.closed {
            return Err(entries);
        }
        for entry in entries {
            state.arrived(entry.arrived);
            state.cost = state.cost.saturating_add(entry.cost as u128);
            state.len = state.len.saturating_add(1);
            state.lanes[lane(entry.priority)].push_back(entry);
        }
        state.publish_depth(&self.metrics);
        let full = self.is_full(&state);
        drop(state);
        self.wake.notify_one();
        if full {
            self.filled.notify_one();
        }
        Ok(())
    }

    fn is_full(&self, state: &State<I, O>) -> bool {
        state.len >= self.full_len || self.full_cost.is_some_and(|budget| state.cost >= budget)
    }

    /// Whether the queue holds a full batch.
    pub(super) fn has_full_batch(&self) -> bool {
        self.is_full(&self.lock())
    }

    /// The number of queued requests and their total cost.
    pub(super) fn depth(&self) -> (usize, usize) {
        let state = self.lock();
        (state.len, saturate(state.cost))
    }

    pub(super) fn add_handle(&self) {
        self.handles.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn remove_handle(&self) {
        if self.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.wake.notify_one();
        }
    }

    fn is_abandoned(&self) -> bool {
        self.handles.load(Ordering::Acquire) == 0
    }

    /// Whether no handle is left and the queue is empty: the worker may stop.
    pub(super) fn is_finished(&self) -> bool {
        self.is_abandoned() && self.lock().len == 0
    }

    /// Admits nothing more and answers every queued request with `closed`;
    /// returns how many were still waiting for an answer.
    pub(super) fn close(&self, closed: &Closed) -> usize {
        let mut state = self.lock();
        state.closed = true;
        state.cost = 0;
        state.len = 0;
        state.publish_depth(&self.metrics);
        let lanes = std::mem::take(&mut state.lanes);
        drop(state);
        let mut answered = 0usize;
        for entry in lanes.into_iter().flatten() {
            let (input, ticket) = entry.into_parts();
            if !ticket.reply.is_closed() {
                answered = answered.saturating_add(1);
            }
            ticket.answer(Err(closed.clone().into()), Outcome::Closed, &self.metrics);
            drop_contained(input, "a request's input");
        }
        self.progress.notify_waiters();
        answered
    }

    /// Drops every request whose caller went away, freeing their slots.
    /// Returns how many were dropped.
    pub(super) fn remove_cancelled(&self) -> usize {
        let mut state = self.lock();
        let now = Instant::now();
        let mut removed = Vec::new();
        for lane in 0..2 {
            let (kept, gone) = std::mem::take(&mut state.lanes[lane])
                .into_iter()
                .partition(|entry| !entry.is_cancelled());
            state.lanes[lane] = kept;
            removed.extend::<VecDeque<_>>(gone);
        }
        let count = removed.len();
        for entry in &removed {
            state.forget(entry);
        }
        state.publish_depth(&self.metrics);
        drop(state);
        retire(removed, now, &self.metrics);
        if count > 0 {
            self.progress.notify_waiters();
        }
        count
    }

    /// Takes a batch if one is due at `now`, following the rules of the
    /// module docs; with `flush`, whatever is queued is due. Under
    /// [`WaitPolicy::Adaptive`], a batch that is not full is due at `hold`
    /// (see [`patience`](Self::patience)).
    pub(super) fn next(
        &self,
        now: Instant,
        config: &BatchConfig,
        flush: bool,
        hold: Instant,
    ) -> Next<I, O> {
        let mut state = self.lock();
        // Requests that leave without a batch; answered and dropped once the
        // lock is released.
        let mut gone = Vec::new();
        // Drop what is cancelled or expired at the heads, so that the oldest
        // live request sets the time to dispatch.
        for lane in 0..2 {
            while let Some(entry) = state.lanes[lane].front()
                && (entry.is_cancelled() || entry.is_expired(now))
            {
                let entry = state.lanes[lane].pop_front().expect("front exists");
                state.forget(&entry);
                gone.push(entry);
            }
        }
        let oldest = state
            .lanes
            .iter()
            .filter_map(|lane| lane.front())
            .map(|e| e.arrived)
            .min();
        let next = match oldest {
            None => Next::Empty,
            Some(oldest) => {
                let due_at = match config.wait_policy {
                    WaitPolicy::Adaptive => hold,
                    WaitPolicy::Fixed => saturating_deadline(oldest, config.max_wait),
                };
                if self.is_full(&state) || flush || now >= due_at || self.is_abandoned() {
                    let taken = state.take(now, config, &mut gone, &self.metrics);
                    state.publish_depth(&self.metrics);
                    if taken.inputs.is_empty() {
                        Next::Empty
                    } else {
                        state.running_items =
                            state.running_items.saturating_add(taken.inputs.len());
                        state.running_raw = state.running_raw.saturating_add(taken.raw as u128);
                        self.in_flight.fetch_add(1, Ordering::AcqRel);
                        let metrics = &self.metrics;
                        metrics.batch_size.record(taken.inputs.len() as f64);
                        metrics.batch_cost.record(taken.cost as f64);
                        metrics.input_cost.record(taken.raw as f64);
                        metrics.in_flight.increment(taken.inputs.len() as f64);
                        Next::Run(taken)
                    }
                } else {
                    Next::WaitUntil(due_at)
                }
            }
        };
        drop(state);
        let purged = !gone.is_empty();
        retire(gone, now, &self.metrics);
        // What was purged may have been all a drain waited for.
        if purged || matches!(next, Next::Empty) {
            self.progress.notify_waiters();
        }
        next
    }

    /// Marks a batch of `size` inputs of own costs summing to `raw`, taken
    /// by [`next`](Self::next), as answered.
    pub(super) fn finish_batch(&self, size: usize, raw: usize) {
        {
            let mut state = self.lock();
            state.running_items = state.running_items.saturating_sub(size);
            state.running_raw = state.running_raw.saturating_sub(raw as u128);
            self.metrics.in_flight.decrement(size as f64);
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        self.progress.notify_waiters();
    }

    /// Everything a request admitted now waits for, the queue and the
    /// batches running: its inputs, and the sum of their own costs.
    pub(super) fn outstanding(&self) -> (usize, usize) {
        let state = self.lock();
        (
            state.len.saturating_add(state.running_items),
            saturate(state.cost.saturating_add(state.running_raw)),
        )
    }

    /// How long a service that just became ready should wait for its batch
    /// to fill, under [`WaitPolicy::Adaptive`]; `pace` is what batches were
    /// measured to cost. Decided once, when it becomes ready: recomputed as
    /// requests arrive, it would dispatch half-full batches.
    pub(super) fn patience(&self, config: &BatchConfig, pace: Option<Pace>) -> Duration {
        let running = self.in_flight.load(Ordering::Acquire);
        self.lock().patience(config, running, pace)
    }

    /// The number of batches taken and not yet answered.
    pub(super) fn batches_in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Whether nothing is queued and no batch is running.
    pub(super) fn is_idle(&self) -> bool {
        let state = self.lock();
        state.len == 0 && self.in_flight.load(Ordering::Acquire) == 0
    }
}

impl<I, O> State<I, O> {
    /// Folds an arrival at `at` into the average gap, over the last few
    /// hundred arrivals (the plain mean until there are 256, then weight
    /// 1/256): bursts must average out, or a batch formed after a burst
    /// looks sure to fill at once.
    fn arrived(&mut self, at: Instant) {
        if let Some(last) = self.last_arrival {
            let gap = at.saturating_duration_since(last).as_secs_f64();
            self.gaps = self.gaps.saturating_add(1).min(256);
            let mean = self.arrival_gap.unwrap_or(gap);
            self.arrival_gap = Some(mean + (gap - mean) / f64::from(self.gaps));
        }
        self.last_arrival = Some(at.max(self.last_arrival.unwrap_or(at)));
    }

    /// How long a ready replica should wait for the batch to fill, under
    /// [`WaitPolicy::Adaptive`]: only while other batches run (a lone idle
    /// service never holds a request); only up to the smallest batch that
    /// keeps up with the arrival rate (larger ones add latency and nothing
    /// else); and only when the missing requests should arrive sooner than a
    /// batch's fixed cost, the time a batch of their own would cost extra.
    /// At most `max_wait`.
    fn patience(&self, config: &BatchConfig, running: usize, pace: Option<Pace>) -> Duration {
        let (Some(gap), Some(pace)) = (self.arrival_gap, pace) else {
            return Duration::ZERO;
        };
        if running == 0 || gap <= 0.0 {
            return Duration::ZERO;
        }
        let max = config.max_batch_size.get();
        let target = pace
            .batch_for(1.0 / gap)
            .map_or(max, |n| (n as usize).clamp(1, max));
        let missing = target.saturating_sub(self.len);
        let fill = Duration::try_from_secs_f64(gap * missing as f64).unwrap_or(Duration::MAX);
        let fixed = Duration::try_from_secs_f64(pace.fixed).unwrap_or(Duration::ZERO);
        if fill <= fixed {
            fill.min(config.max_wait)
        } else {
            Duration::ZERO
        }
    }

    fn publish_depth(&self, metrics: &BatchMetrics) {
        metrics.queue_depth.set(self.len as f64);
        metrics.queue_cost.set(self.cost as f64);
    }

    /// Accounts for an entry leaving the queue without being batched; the
    /// caller [`retire`]s it once the lock is released.
    fn forget(&mut self, entry: &Entry<I, O>) {
        self.len = self.len.saturating_sub(1);
        self.cost = self.cost.saturating_sub(entry.cost as u128);
    }

    /// Takes the next batch; cancelled and expired requests met on the way
    /// go to `gone`.
    fn take(
        &mut self,
        now: Instant,
        config: &BatchConfig,
        gone: &mut Vec<Entry<I, O>>,
        metrics: &BatchMetrics,
    ) -> Taken<I, O> {
        let max = config.max_batch_size.get();
        let capacity = max.min(self.len);
        let mut taken = Taken {
            inputs: Vec::with_capacity(capacity),
            tickets: Vec::with_capacity(capacity),
            cost: 0,
            raw: 0,
        };
        // The high lane goes first, unless the normal lane's oldest request
        // has waited past the starvation bound.
        let starving = self.lanes[1].front().is_some_and(|entry| {
            now.saturating_duration_since(entry.arrived) >= config.max_starvation
        });
        let order = if starving { [1, 0] } else { [0, 1] };
        if config.cost_mode == CostMode::Padded && config.group_window > 0 {
            return self.take_similar(now, config, order, gone, metrics, taken);
        }
        let mut longest = 0;
        'lanes: for lane in order {
            while taken.inputs.len() < max {
                let Some(entry) = self.lanes[lane].front() else {
                    continue 'lanes;
                };
                let live = !entry.is_cancelled() && !entry.is_expired(now);
                if let Some(budget) = config.max_batch_cost
                    && live
                    && !taken.inputs.is_empty()
                    && batch_cost(config.cost_mode, &taken, longest, entry.cost) > budget.get()
                {
                    break 'lanes;
                }
                let entry = self.lanes[lane].pop_front().expect("front exists");
                self.forget(&entry);
                if !live {
                    gone.push(entry);
                    continue;
                }
                longest = longest.max(entry.cost);
                taken.cost = batch_cost(config.cost_mode, &taken, longest, entry.cost);
                taken.push(entry, now, metrics);
            }
        }
        taken
    }

    /// [`take`](Self::take) under [`CostMode::Padded`]: the first live
    /// request of the lanes in `order`, then, among the next
    /// [`group_window`](BatchConfig::group_window), those of the first lane
    /// before the second's: the ones waiting past `max_starvation` oldest
    /// first, then the nearest in cost to the first, oldest first on a tie;
    /// one that would break the cost budget is passed over for the next.
    fn take_similar(
        &mut self,
        now: Instant,
        config: &BatchConfig,
        order: [usize; 2],
        gone: &mut Vec<Entry<I, O>>,
        metrics: &BatchMetrics,
        mut taken: Taken<I, O>,
    ) -> Taken<I, O> {
        struct Candidate {
            rank: usize,
            waited_long: bool,
            distance: usize,
            lane: usize,
            index: usize,
            cost: usize,
        }
        let max = config.max_batch_size.get();
        let scan = max.saturating_add(config.group_window);
        let mut candidates: Vec<Candidate> = Vec::with_capacity(scan.min(self.len));
        // Positions to remove: the chosen, and the dead met on the way.
        let mut dead = Vec::new();
        let mut first = None;
        'lanes: for (rank, &lane) in order.iter().enumerate() {
            for (index, entry) in self.lanes[lane].iter().enumerate() {
                if candidates.len() >= scan {
                    break 'lanes;
                }
                if entry.is_cancelled() || entry.is_expired(now) {
                    dead.push((lane, index));
                    continue;
                }
                let anchor = *first.get_or_insert(entry.cost);
                candidates.push(Candidate {
                    rank,
                    waited_long: now.saturating_duration_since(entry.arrived)
                        >= config.max_starvation,
                    distance: entry.cost.abs_diff(anchor),
                    lane,
                    index,
                    cost: entry.cost,
                });
            }
        }
        if let Some(rest) = candidates.get_mut(1..) {
            // Those waiting past the bound go oldest first, the rest nearest
            // in cost first.
            rest.sort_unstable_by_key(|c| {
                let distance = if c.waited_long { 0 } else { c.distance };
                (c.rank, !c.waited_long, distance, c.index)
            });
        }
        let mut chosen = Vec::with_capacity(max.min(candidates.len()));
        let mut longest = 0;
        for candidate in candidates {
            if chosen.len() >= max {
                break;
            }
            let cost = longest
                .max(candidate.cost)
                .saturating_mul(chosen.len().saturating_add(1));
            // Too long to join: a shorter one further on may still fit.
            if !chosen.is_empty() && config.max_batch_cost.is_some_and(|b| cost > b.get()) {
                continue;
            }
            longest = longest.max(candidate.cost);
            chosen.push((candidate.lane, candidate.index));
        }
        // Remove from the back, so that the positions still hold.
        let mut removals: Vec<(usize, usize, bool)> = chosen
            .iter()
            .map(|&(lane, index)| (lane, index, true))
            .chain(dead.into_iter().map(|(lane, index)| (lane, index, false)))
            .collect();
        removals.sort_unstable_by_key(|&(lane, index, _)| std::cmp::Reverse((lane, index)));
        let mut batch = Vec::with_capacity(chosen.len());
        for (lane, index, live) in removals {
            let entry = self.lanes[lane].remove(index).expect("a scanned position");
            self.forget(&entry);
            if live {
                batch.push(entry);
            } else {
                gone.push(entry);
            }
        }
        // In lane order, oldest first within each lane.
        batch.reverse();
        taken.cost = longest.saturating_mul(batch.len());
        for entry in batch {
            taken.push(entry, now, metrics);
        }
        taken
    }
}

/// Answers requests that left the queue without a batch (those that expired
/// get [`DeadlineExceeded`]), records why they left, and drops them. Runs
/// outside the queue's lock: dropping an input runs user code.
fn retire<I, O>(gone: Vec<Entry<I, O>>, now: Instant, metrics: &BatchMetrics) {
    for entry in gone {
        // A request whose own future gave up at its deadline is cancelled
        // and expired: it counts as a deadline, not a cancellation.
        let (input, ticket) = entry.into_parts();
        if ticket.deadline.is_some_and(|deadline| deadline <= now) {
            metrics.outcome(Outcome::Deadline);
            let _ = ticket.reply.send(Err(DeadlineExceeded::new().into()));
        } else {
            metrics.outcome(Outcome::Cancelled);
        }
        drop_contained(input, "a request's input");
    }
}

/// A wide sum as a `usize`, saturating.
fn saturate(sum: u128) -> usize {
    usize::try_from(sum).unwrap_or(usize::MAX)
}

/// The cost of `taken` once `next` joins it, saturating.
fn batch_cost<I, O>(mode: CostMode, taken: &Taken<I, O>, longest: usize, next: usize) -> usize {
    match mode {
        CostMode::Sum => taken.cost.saturating_add(next),
        CostMode::Padded => longest
            .max(next)
            .saturating_mul(taken.inputs.len().saturating_add(1)),
    }
}
