//! The future returned by [`Batch`](super::Batch).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project::pin_project;
use tokio::sync::oneshot;

use crate::BoxError;
use crate::error::Closed;

/// The answer to one request sent through a [`Batch`](super::Batch): its own
/// output, or a typed error.
///
/// Dropping it cancels the request: if it has not been batched yet, it never
/// reaches the model.
#[pin_project]
#[derive(Debug)]
pub struct ResponseFuture<O> {
    #[pin]
    state: State<O>,
}

#[pin_project(project = StateProj)]
#[derive(Debug)]
enum State<O> {
    Failed(Option<BoxError>),
    Queued(#[pin] oneshot::Receiver<Result<O, BoxError>>),
}

impl<O> ResponseFuture<O> {
    pub(super) fn new(rx: oneshot::Receiver<Result<O, BoxError>>) -> Self {
        Self {
            state: State::Queued(rx),
        }
    }

    pub(super) fn failed(err: BoxError) -> Self {
        Self {
            state: State::Failed(Some(err)),
        }
    }
}

impl<O> Future for ResponseFuture<O> {
    type Output = Result<O, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Failed(err) => {
                Poll::Ready(Err(err.take().expect("polled after completion")))
            }
            StateProj::Queued(rx) => match ready!(rx.poll(cx)) {
                Ok(result) => Poll::Ready(result),
                // The worker dropped the request without answering: it stopped.
                Err(_) => Poll::Ready(Err(Closed::new().into())),
            },
        }
    }
}
