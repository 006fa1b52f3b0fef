//! The future returned by [`Batch`](super::Batch).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use pin_project::{pin_project, pinned_drop};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use crate::BoxError;
use crate::error::{Closed, DeadlineExceeded};

/// The answers to a group sent through a [`Reservation`](super::Reservation)
/// as a tower service, in order.
pub type GroupFuture<O> = Pin<Box<dyn Future<Output = Result<Vec<O>, BoxError>> + Send>>;

/// The answer to one request sent through a [`Batch`](super::Batch): its own
/// output, or a typed error.
///
/// Dropping it cancels the request: if it has not been batched yet, it never
/// reaches the model. The same happens at the request's deadline, which
/// answers [`DeadlineExceeded`].
#[pin_project(PinnedDrop)]
pub struct ResponseFuture<O> {
    #[pin]
    state: State<O>,
    /// Counts this request if the future goes away before its answer, so
    /// that a full queue knows to look for cancelled requests.
    abandoned: Option<Arc<AtomicUsize>>,
}

#[pin_project(project = StateProj)]
enum State<O> {
    Failed(Option<BoxError>),
    Queued {
        #[pin]
        rx: oneshot::Receiver<Result<O, BoxError>>,
        #[pin]
        deadline: Option<Sleep>,
    },
}

impl<O> ResponseFuture<O> {
    pub(super) fn new(
        rx: oneshot::Receiver<Result<O, BoxError>>,
        deadline: Option<Instant>,
        abandoned: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            state: State::Queued {
                rx,
                deadline: deadline.map(tokio::time::sleep_until),
            },
            abandoned: Some(abandoned),
        }
    }

    pub(super) fn failed(err: BoxError) -> Self {
        Self {
            state: State::Failed(Some(err)),
            abandoned: None,
        }
    }
}

impl<O> fmt::Debug for ResponseFuture<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Failed(_) => "failed",
            State::Queued { .. } => "queued",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<O> Future for ResponseFuture<O> {
    type Output = Result<O, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.state.project() {
            StateProj::Failed(err) => {
                Poll::Ready(Err(err.take().expect("polled after completion")))
            }
            StateProj::Queued { mut rx, deadline } => {
                if let Poll::Ready(result) = rx.as_mut().poll(cx) {
                    this.abandoned.take();
                    // The worker dropped the request without answering: it stopped.
                    return Poll::Ready(result.unwrap_or_else(|_| Err(Closed::new().into())));
                }
                if let Some(deadline) = deadline.as_pin_mut() {
                    ready!(deadline.poll(cx));
                    // Closing the channel takes the request out of the queue;
                    // an answer that raced the deadline still wins.
                    rx.close();
                    return Poll::Ready(match rx.try_recv() {
                        Ok(result) => {
                            this.abandoned.take();
                            result
                        }
                        Err(_) => Err(DeadlineExceeded::new().into()),
                    });
                }
                Poll::Pending
            }
        }
    }
}

#[pinned_drop]
impl<O> PinnedDrop for ResponseFuture<O> {
    fn drop(self: Pin<&mut Self>) {
        let this = self.project();
        if let Some(abandoned) = this.abandoned.take() {
            // Closed before counted: a scan the count sets off must find
            // this request cancelled.
            if let StateProj::Queued { mut rx, .. } = this.state.project() {
                rx.close();
            }
            abandoned.fetch_add(1, Ordering::Release);
        }
    }
}
