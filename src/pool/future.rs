//! The future returned by [`Pool`](super::Pool).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::sync::oneshot;

use super::board::Outcomes;
use crate::BoxError;
use crate::error::{Closed, ModelFailed};

/// The future of one batch run by a [`Pool`](super::Pool).
#[derive(Debug)]
pub struct ResponseFuture<O> {
    rx: oneshot::Receiver<Outcomes<O>>,
}

impl<O> ResponseFuture<O> {
    pub(super) fn new(rx: oneshot::Receiver<Outcomes<O>>) -> Self {
        Self { rx }
    }
}

impl<O> Future for ResponseFuture<O> {
    type Output = Result<Vec<Result<O, ModelFailed>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(ready!(Pin::new(&mut self.rx).poll(cx)).map_err(|_| Closed::new().into()))
    }
}
