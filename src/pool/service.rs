use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::sync::PollSemaphore;
use tower::Service;

use super::replica::{self, Board, Job};
use super::{PoolConfig, PoolError, ReplicaState, ReplicaStatus};
use crate::BoxError;
use crate::error::Closed;
use crate::model::{Loader, Model};

/// A `Service<Vec<I>, Response = Vec<O>>` that runs each batch on an idle
/// replica. See the [module docs](super).
///
/// Clones share the replicas. A clone holds no reservation: `poll_ready`
/// reserves an idle replica for the next `call` of that handle only.
pub struct Pool<I, O> {
    shared: Arc<Shared<I, O>>,
    semaphore: PollSemaphore,
    reserved: Option<OwnedSemaphorePermit>,
}

struct Shared<I, O> {
    /// One channel per replica; dropping the last handle stops the threads.
    jobs: Vec<mpsc::Sender<Job<I, O>>>,
    board: Arc<Board>,
}

impl<I, O> Pool<I, O>
where
    I: Send + 'static,
    O: Send + 'static,
{
    /// Starts the replicas of `config`, each loading its model with `loader`.
    ///
    /// Returns at once; the replicas load in the background and the pool
    /// becomes ready as they finish. Must not be called from a thread that
    /// cannot spawn OS threads.
    pub fn new<L>(loader: L, config: PoolConfig) -> Result<Self, PoolError>
    where
        L: Loader<I>,
        L::Model: Model<I, Output = O>,
    {
        Self::from_arc(Arc::new(loader), config)
    }

    /// Like [`new`](Self::new), with a loader shared with other parts of the
    /// application (the batching layer consults it at admission).
    pub fn from_arc<L>(loader: Arc<L>, config: PoolConfig) -> Result<Self, PoolError>
    where
        L: Loader<I>,
        L::Model: Model<I, Output = O>,
    {
        if config.devices.is_empty() {
            return Err(PoolError::NoDevices);
        }
        let locations: Vec<_> = config
            .devices
            .iter()
            .flat_map(|&location| std::iter::repeat_n(location, config.replicas_per_device.get()))
            .collect();
        let board = Arc::new(Board {
            idle: Mutex::new(Vec::with_capacity(locations.len())),
            semaphore: Arc::new(Semaphore::new(0)),
            status: Mutex::new(
                locations
                    .iter()
                    .map(|&device| ReplicaStatus {
                        device,
                        state: ReplicaState::Loading,
                        restarts: 0,
                        load_time: None,
                        warmup_time: None,
                    })
                    .collect(),
            ),
        });
        let mut jobs = Vec::with_capacity(locations.len());
        for (index, location) in locations.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            replica::spawn(
                index,
                location,
                loader.clone(),
                board.clone(),
                config.clone(),
                rx,
            )
            .map_err(|source| PoolError::Spawn {
                replica: index,
                source,
            })?;
            jobs.push(tx);
        }
        let semaphore = PollSemaphore::new(board.semaphore.clone());
        Ok(Self {
            shared: Arc::new(Shared { jobs, board }),
            semaphore,
            reserved: None,
        })
    }
}

impl<I, O> Pool<I, O> {
    /// A snapshot of every replica, in the order of the configured devices.
    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        self.shared
            .board
            .status
            .lock()
            .expect("status lock")
            .clone()
    }

    /// The number of replicas, whatever their state.
    pub fn len(&self) -> usize {
        self.shared.jobs.len()
    }

    /// Whether the pool has no replicas (never true for a built pool).
    pub fn is_empty(&self) -> bool {
        self.shared.jobs.is_empty()
    }
}

impl<I, O> Clone for Pool<I, O> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            semaphore: self.semaphore.clone(),
            reserved: None,
        }
    }
}

impl<I, O> fmt::Debug for Pool<I, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("replicas", &self.shared.jobs.len())
            .field("idle", &self.shared.board.semaphore.available_permits())
            .field("reserved", &self.reserved.is_some())
            .finish()
    }
}

impl<I, O> Service<Vec<I>> for Pool<I, O>
where
    I: Send + 'static,
    O: Send + 'static,
{
    type Response = Vec<O>;
    type Error = BoxError;
    type Future = ResponseFuture<O>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.reserved.is_none() {
            // The semaphore is never closed, so `None` cannot happen.
            let permit = ready!(self.semaphore.poll_acquire(cx)).ok_or_else(Closed::new)?;
            self.reserved = Some(permit);
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, inputs: Vec<I>) -> Self::Future {
        let permit = self
            .reserved
            .take()
            .expect("Pool::call without a successful poll_ready");
        let index = self
            .shared
            .board
            .idle
            .lock()
            .expect("idle lock")
            .pop()
            .expect("a permit always stands for an idle replica");
        let (reply, rx) = oneshot::channel();
        let job = Job {
            inputs,
            reply,
            permit,
            span: tracing::Span::current(),
        };
        // A send fails only if the replica thread is gone; the job and its
        // reply sender are dropped, which the future reports as `Closed`.
        let _ = self.shared.jobs[index].send(job);
        ResponseFuture { rx }
    }
}

/// The future of one batch run by a [`Pool`].
#[derive(Debug)]
pub struct ResponseFuture<O> {
    rx: oneshot::Receiver<Result<Vec<O>, BoxError>>,
}

impl<O> Future for ResponseFuture<O> {
    type Output = Result<Vec<O>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match ready!(Pin::new(&mut self.rx).poll(cx)) {
            Ok(result) => Poll::Ready(result),
            Err(_) => Poll::Ready(Err(Closed::new().into())),
        }
    }
}
