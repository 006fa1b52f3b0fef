//! The task that forms batches and hands them to the inner service.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;
use tower::Service;
use tracing::Instrument;

use super::Shared;
use super::queue::{Next, Taken, Ticket};
use crate::BoxError;
use crate::error::{Closed, FailureKind, ModelFailed};
use crate::metrics::Outcome;

/// Runs until every handle is gone and the queue is drained, or the inner
/// service fails.
pub(super) async fn run<S, I, O>(mut inner: S, shared: Arc<Shared<I, O>>)
where
    S: Service<Vec<I>, Response = Vec<O>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
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
        // requests keep accumulating while every replica is busy.
        if let Err(err) = poll_fn(|cx| inner.poll_ready(cx)).await {
            let err: BoxError = err.into();
            tracing::error!(%err, "inner service failed; the batch queue is closing");
            shared.close();
            return;
        }

        let batch = loop {
            match shared
                .queue
                .next(Instant::now(), &shared.config, shared.is_draining())
            {
                Next::Run(batch) => break Some(batch),
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

fn dispatch<S, I, O>(inner: &mut S, shared: &Arc<Shared<I, O>>, batch: Taken<I, O>)
where
    S: Service<Vec<I>, Response = Vec<O>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    I: Send + 'static,
    O: Send + 'static,
{
    let Taken {
        inputs,
        tickets,
        cost,
    } = batch;
    let size = inputs.len();
    // The batch span names the requests it carried, and links to their spans.
    let ids: Vec<u64> = tickets.iter().map(|ticket| ticket.id).collect();
    let span = tracing::debug_span!("candlewick.batch", size, cost, requests = ?ids);
    for ticket in &tickets {
        span.follows_from(&ticket.span);
    }
    let future = span.in_scope(|| inner.call(inputs));
    shared
        .rate
        .lock()
        .expect("rate lock")
        .started(Instant::now());
    let shared = shared.clone();
    tokio::spawn(
        async move {
            let served = tokio::select! {
                result = future => {
                    answer(&shared, tickets, result.map_err(Into::into));
                    shared.completed.fetch_add(size as u64, Ordering::Relaxed);
                    cost
                }
                // A drain ran out of time: the model's answer will not come
                // in time, so say so now.
                () = shared.abort.cancelled() => {
                    let waiting = tickets.iter().filter(|t| !t.reply.is_closed()).count();
                    for ticket in tickets {
                        ticket.answer(Err(Closed::new().into()), Outcome::Closed, &shared.metrics);
                    }
                    shared.aborted.fetch_add(waiting as u64, Ordering::Relaxed);
                    0
                }
            };
            let queued = shared.queue.depth().0 > 0;
            shared
                .rate
                .lock()
                .expect("rate lock")
                .finished(Instant::now(), served, queued);
            shared.queue.finish_batch(size, cost);
        }
        .instrument(span),
    );
}

/// Sends every request of a batch its own answer, recording its outcome and
/// latency.
fn answer<I, O>(shared: &Shared<I, O>, tickets: Vec<Ticket<O>>, result: Result<Vec<O>, BoxError>) {
    let n = tickets.len();
    let answers: Box<dyn Iterator<Item = Result<O, BoxError>>> = match result {
        Ok(outputs) if outputs.len() == n => Box::new(outputs.into_iter().map(Ok)),
        Ok(outputs) => {
            let kind = FailureKind::OutputCount {
                expected: n,
                actual: outputs.len(),
            };
            let err = ModelFailed::new(kind, "wrong number of outputs");
            Box::new(std::iter::repeat_with(move || Err(err.clone().into())))
        }
        Err(err) => Box::new(fan_out(err).map(Err)),
    };
    for (ticket, answer) in tickets.into_iter().zip(answers) {
        let outcome = match &answer {
            Ok(output) if (shared.failed)(output) => Outcome::ModelError,
            Ok(_) => Outcome::Ok,
            Err(err) => Outcome::of_error(&**err),
        };
        ticket.answer(answer, outcome, &shared.metrics);
    }
}

/// One error per request of a failed batch: clones of the crate's own error
/// types, or the foreign error shared inside a [`ModelFailed`].
fn fan_out(err: BoxError) -> impl Iterator<Item = BoxError> {
    let shared: Box<dyn Fn() -> BoxError + Send> =
        if let Some(err) = err.downcast_ref::<ModelFailed>() {
            let err = err.clone();
            Box::new(move || err.clone().into())
        } else if err.is::<Closed>() {
            Box::new(|| Closed::new().into())
        } else {
            let err = ModelFailed::new(FailureKind::Error, err);
            Box::new(move || err.clone().into())
        };
    std::iter::repeat_with(shared)
}
