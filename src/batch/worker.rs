//! The task that forms batches and hands them to the inner service.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use tokio::time::Instant;
use tower::Service;
use tracing::Instrument;

use super::WaitPolicy;
use super::metrics::Outcome;
use super::queue::{Next, Taken, Ticket};
use super::shared::{Begun, Shared};
use crate::BoxError;
use crate::contain::{CatchUnwind, catch, drop_contained, lock, saturating_deadline};
use crate::error::{Closed, FailureKind, ModelFailed};

/// Runs until every handle is gone and the queue is drained, or the inner
/// service fails. A panic in the inner service's `call` or future fails
/// that batch only; one in its `poll_ready` counts as the service failing.
pub(super) async fn run<S, I, O, E>(mut inner: S, shared: Arc<Shared<I, O>>)
where
    S: Service<Vec<I>, Response = Vec<Result<O, E>>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    E: Into<BoxError>,
    I: Send + 'static,
    O: Send + 'static,
{
    loop {
        // Wait for work before reserving the inner service.
        loop {
            if shared.queue.is_finished() {
                return;
            }
            if shared.queue.depth().0 > 0 {
                break;
            }
            shared.queue.wake.notified().await;
        }

        // Pull: form a batch only once the inner service can take it, so that
        // requests keep accumulating while every replica is busy. A full
        // batch cannot grow by waiting: a pool with a stage takes it while
        // its replicas are busy, and starts it the moment one frees.
        let ready = match &shared.hooks.staging {
            None => ready(&mut inner).await,
            Some(staging) => loop {
                let full = shared.queue.has_full_batch();
                staging.offer_full_batch(full);
                if full {
                    break ready(&mut inner).await;
                }
                tokio::select! {
                    biased;
                    ready = ready(&mut inner) => break ready,
                    () = shared.queue.filled.notified() => {}
                }
            },
        };
        if let Err(err) = ready {
            let err: BoxError = err;
            tracing::error!(%err, "inner service failed; the batch queue is closing");
            let closed = err
                .downcast::<Closed>()
                .map_or_else(Closed::because, |closed| *closed);
            shared.close(closed);
            return;
        }

        let ready = Instant::now();
        let config = &shared.config;
        // Only an adaptive wait that may be non-zero needs the measurements.
        let hold = if config.wait_policy == WaitPolicy::Adaptive && !config.max_wait.is_zero() {
            let pace = lock(&shared.rate).pace();
            saturating_deadline(ready, shared.queue.patience(config, pace))
        } else {
            ready
        };
        let batch = loop {
            let now = Instant::now();
            match shared
                .queue
                .next(now, &shared.config, shared.is_draining(), hold)
            {
                Next::Run(batch) => {
                    // How long the ready service waited for this batch to fill.
                    let waited = now.saturating_duration_since(ready);
                    shared.metrics.fill_wait.record(waited);
                    break Some(batch);
                }
                Next::WaitUntil(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = shared.queue.wake.notified() => {}
                    }
                }
                // Every queued request was cancelled; keep the reservation.
                Next::Empty => break None,
            }
        };
        let Some(batch) = batch else { continue };
        dispatch(&mut inner, &shared, batch);
    }
}

/// The inner service's `poll_ready`, with a panic there counted as the
/// service failing.
async fn ready<S, I, O, E>(inner: &mut S) -> Result<(), BoxError>
where
    S: Service<Vec<I>, Response = Vec<Result<O, E>>>,
    S::Error: Into<BoxError>,
{
    poll_fn(|cx| match catch(|| inner.poll_ready(cx)) {
        Ok(poll) => poll.map_err(Into::into),
        Err(message) => Poll::Ready(Err(format!(
            "the inner service panicked in poll_ready: {message}"
        )
        .into())),
    })
    .await
}

fn dispatch<S, I, O, E>(inner: &mut S, shared: &Arc<Shared<I, O>>, batch: Taken<I, O>)
where
    S: Service<Vec<I>, Response = Vec<Result<O, E>>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    E: Into<BoxError>,
    I: Send + 'static,
    O: Send + 'static,
{
    let Taken {
        inputs,
        tickets,
        cost,
        raw,
    } = batch;
    let size = inputs.len();
    // The batch span names the requests it carried, and links to their spans.
    let ids: Vec<u64> = tickets.iter().map(|ticket| ticket.id).collect();
    let span = tracing::debug_span!("candlewick.batch", size, cost, requests = ?ids);
    for ticket in &tickets {
        span.follows_from(&ticket.span);
    }
    // Counted when the queue handed this batch out, itself included.
    let in_flight = shared.queue.batches_in_flight();
    let (parallel, begun) = match &shared.hooks.staging {
        None => (in_flight, None),
        Some(staging) => {
            let mut staged = lock(&shared.staged);
            // Staged batches do not run yet, so are not parallel to this one.
            let parallel = in_flight.saturating_sub(staged.len());
            // Whether it waits in the pool's stage, as far as can be told: a
            // replica that frees before `call` runs it at once instead.
            let begun = staging.would_stage().then(|| {
                let begun = Arc::new(Begun::new());
                staged.push_back(begun.clone());
                shared.metrics.staged.increment(1);
                begun
            });
            (parallel, begun)
        }
    };
    // From here the batch's bookkeeping is done however it ends.
    let mut finish = Finish {
        shared: shared.clone(),
        size,
        cost,
        raw,
        started: Instant::now(),
        parallel,
        begun,
        answered: false,
    };
    let future = match span.in_scope(|| catch(|| inner.call(inputs))) {
        Ok(future) => future,
        Err(message) => {
            let err = ModelFailed::new(
                FailureKind::Panic,
                format!("the inner service panicked in call: {message}"),
            );
            answer::<I, O, E>(shared, tickets, Err(err.into()));
            return;
        }
    };
    tokio::spawn(
        async move {
            let shared = finish.shared.clone();
            tokio::select! {
                result = CatchUnwind(future) => {
                    let result = match result {
                        Ok(result) => result.map_err(Into::into),
                        Err(message) => {
                            let message = format!("the inner service's future panicked: {message}");
                            Err(ModelFailed::new(FailureKind::Panic, message).into())
                        }
                    };
                    let whole = matches!(&result, Ok(outputs) if outputs.len() == size);
                    let troubled = answer(&shared, tickets, result);
                    // Only a batch the model answered, on a replica that did
                    // not panic or stall, says what batches cost.
                    finish.answered(whole && !troubled);
                    shared.completed.fetch_add(size as u64, Ordering::Relaxed);
                }
                // A drain ran out of time: the model's answer will not come
                // in time, so say so now.
                () = shared.abort.cancelled() => {
                    let waiting = tickets.iter().filter(|t| !t.reply.is_closed()).count();
                    for ticket in tickets {
                        ticket.answer(Err(Closed::new().into()), Outcome::Closed, &shared.metrics);
                    }
                    shared.aborted.fetch_add(waiting as u64, Ordering::Relaxed);
                }
            }
        }
        .instrument(span),
    );
}

/// The bookkeeping of one dispatched batch, done when it is dropped: when the
/// batch was answered, and equally when the inner service panicked or the
/// task was dropped, so the cost model and the in-flight counts never leak.
struct Finish<I, O> {
    shared: Arc<Shared<I, O>>,
    size: usize,
    /// The batch's cost, and its inputs' own.
    cost: usize,
    raw: usize,
    started: Instant,
    /// Batches running when it started, itself included.
    parallel: usize,
    /// Set when it began, if it was staged.
    begun: Option<Arc<Begun>>,
    /// Whether the inner service answered it in full, on a replica that did
    /// not panic or stall: a sample for the cost model, and a replica that
    /// is free again.
    answered: bool,
}

impl<I, O> Finish<I, O> {
    fn answered(&mut self, answered: bool) {
        self.answered = answered;
    }
}

impl<I, O> Drop for Finish<I, O> {
    fn drop(&mut self) {
        let now = Instant::now();
        let (mut started, mut parallel) = (self.started, self.parallel);
        let mut sample = self.answered;
        if self.shared.hooks.staging.is_some() {
            let mut staged = lock(&self.shared.staged);
            if let Some(begun) = &self.begun {
                // Still listed: a replica freed in time to run it at once,
                // or the batch before it ended abnormally.
                staged.retain(|other| !Arc::ptr_eq(other, begun));
                match begun.get() {
                    Some(&(at, running)) => (started, parallel) = (at.max(started), running),
                    // When it began is not known: no sample.
                    None => sample = false,
                }
            }
            // Its replica, free again, took the oldest staged batch, which
            // began now beside the others running (this one still counted).
            if self.answered
                && let Some(next) = staged.pop_front()
            {
                let running = self
                    .shared
                    .queue
                    .batches_in_flight()
                    .saturating_sub(staged.len())
                    .saturating_sub(1);
                let _ = next.set((now, running));
            }
        }
        if sample {
            lock(&self.shared.rate)
                .finished(started, now, self.cost, self.raw, self.size, parallel);
        }
        self.shared.queue.finish_batch(self.size, self.raw);
    }
}

/// Sends every request of a batch its own answer, recording its outcome and
/// latency. Returns whether its replica panicked or stalled.
fn answer<I, O, E: Into<BoxError>>(
    shared: &Shared<I, O>,
    tickets: Vec<Ticket<O>>,
    result: Result<Vec<Result<O, E>>, BoxError>,
) -> bool {
    let n = tickets.len();
    let answers: Box<dyn Iterator<Item = Result<O, BoxError>>> = match result {
        Ok(outputs) if outputs.len() == n => {
            Box::new(outputs.into_iter().map(|output| output.map_err(Into::into)))
        }
        Ok(outputs) => {
            let kind = FailureKind::OutputCount {
                expected: n,
                actual: outputs.len(),
            };
            let err = ModelFailed::new(kind, "wrong number of outputs");
            drop_contained(outputs, "the outputs of a batch of the wrong size");
            Box::new(std::iter::repeat_with(move || Err(err.clone().into())))
        }
        Err(err) => Box::new(fan_out(err).map(Err)),
    };
    let mut troubled = false;
    for (ticket, answer) in tickets.into_iter().zip(answers) {
        let outcome = match &answer {
            Ok(_) => Outcome::Ok,
            Err(err) => {
                troubled |= err.downcast_ref::<ModelFailed>().is_some_and(|err| {
                    matches!(err.kind(), FailureKind::Panic | FailureKind::Stalled)
                });
                Outcome::of_error(&**err)
            }
        };
        ticket.answer(answer, outcome, &shared.metrics);
    }
    troubled
}

/// One error per request of a failed batch: clones of the crate's own error
/// types, or the foreign error shared inside a [`ModelFailed`].
fn fan_out(err: BoxError) -> impl Iterator<Item = BoxError> {
    let shared: Box<dyn Fn() -> BoxError + Send> =
        if let Some(err) = err.downcast_ref::<ModelFailed>() {
            let err = err.clone();
            Box::new(move || err.clone().into())
        } else if let Some(closed) = err.downcast_ref::<Closed>() {
            let closed = closed.clone();
            Box::new(move || closed.clone().into())
        } else {
            let err = ModelFailed::new(FailureKind::Error, err);
            Box::new(move || err.clone().into())
        };
    std::iter::repeat_with(shared)
}
