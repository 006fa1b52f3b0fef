use std::fmt;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use candle_core::DeviceLocation;
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio_util::sync::PollSemaphore;
use tower::Service;

use super::board::{Board, Job, Lease, PoolStatus};
use super::future::ResponseFuture;
use super::replica;
use super::shared::{Shared, Spawn};
use super::{CpuThreads, PoolConfig, PoolError, ReplicaStatus, watchdog};
use crate::BoxError;
use crate::contain::lock;
use crate::error::{Closed, ModelFailed};
use crate::model::{Loader, Model, ModelInfo};

/// A `Service<Vec<I>>` that runs each batch on an idle replica and answers with
/// one `Result<O, ModelFailed>` per input. See the [module docs](super).
///
/// Clones share the replicas. A clone holds no reservation: `poll_ready`
/// reserves an idle replica for the next `call` of that handle only.
pub struct Pool<I, O> {
    shared: Arc<Shared<I, O>>,
    semaphore: PollSemaphore,
    reserved: Option<OwnedSemaphorePermit>,
}

impl<I, O> Pool<I, O>
where
    I: Send + 'static,
    O: Send + 'static,
{
    /// Starts the replicas of `config`, each loading its model with `loader`.
    ///
    /// Returns at once; the replicas load in the background and the pool
    /// becomes ready as they finish.
    pub fn new<L>(loader: L, config: PoolConfig) -> Result<Self, PoolError>
    where
        L: Loader<I>,
        L::Model: Model<I, Output = O>,
    {
        Self::from_arc(Arc::new(loader), config, &ModelInfo::default())
    }

    /// Like [`new`](Self::new), with a loader shared with other parts of the
    /// application (the batching layer consults it at admission), and metrics
    /// labelled with `model`.
    pub fn from_arc<L>(
        loader: Arc<L>,
        config: PoolConfig,
        model: &ModelInfo,
    ) -> Result<Self, PoolError>
    where
        L: Loader<I>,
        L::Model: Model<I, Output = O>,
    {
        if config.devices.is_empty() {
            return Err(PoolError::NoDevices);
        }
        for &device in &config.devices {
            if let Some(reason) = crate::device::unsupported(device) {
                return Err(PoolError::DeviceUnsupported { device, reason });
            }
        }
        let cpu_threads = config.cpu_threads_per_replica.map(|threads| CpuThreads {
            replica: threads.get(),
            candle: crate::device::candle_cpu_threads(),
        });
        let status: Vec<_> = config
            .devices
            .iter()
            .flat_map(|&location| std::iter::repeat_n(location, config.replicas_per_device.get()))
            .map(|location| {
                let mut status = ReplicaStatus::new(location);
                if location == DeviceLocation::Cpu {
                    status.cpu_threads = cpu_threads;
                }
                status
            })
            .collect();
        if config.devices.contains(&DeviceLocation::Cpu)
            && let Some(warning) = cpu_threads.and_then(|threads| threads.warning())
        {
            tracing::warn!("{warning}");
        }
        let replicas = status.len();
        let board = Arc::new(Board::new(status, &crate::metrics::labels(model, &[])));
        let spawn: Box<Spawn<I, O>> = {
            let (board, config) = (board.clone(), config.clone());
            Box::new(move |index, jobs| {
                replica::spawn(index, loader.clone(), board.clone(), config.clone(), jobs)
            })
        };
        let mut jobs = Vec::with_capacity(replicas);
        for index in 0..replicas {
            let (tx, rx) = mpsc::channel();
            spawn(index, rx).map_err(|source| PoolError::Spawn {
                replica: index,
                source,
            })?;
            jobs.push(Mutex::new(tx));
        }
        let shared = Arc::new(Shared { jobs, board, spawn });
        if let Some(timeout) = config.stall_timeout {
            watchdog::start(Arc::downgrade(&shared), timeout, config.max_stuck_threads)?;
        }
        Ok(Self {
            semaphore: PollSemaphore::new(shared.board.semaphore.clone()),
            shared,
            reserved: None,
        })
    }
}

impl<I, O> Pool<I, O> {
    /// A snapshot of every replica, in the order of the configured devices.
    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        self.shared.board.roster().replicas
    }

    /// A view of the replicas' statuses that does not keep them running,
    /// for [`Health`](crate::health::Health).
    pub fn status(&self) -> PoolStatus
    where
        O: Send + 'static,
    {
        PoolStatus::new(self.shared.board.clone())
    }

    /// Why the pool cannot serve at all, once every replica failed for good:
    /// the error `poll_ready` then fails with. `None` while any replica may
    /// still serve.
    pub fn unavailable(&self) -> Option<Closed> {
        self.shared.board.unavailable().map(Closed::because)
    }

    /// The number of replicas idle now, ready for a batch.
    pub fn idle_replicas(&self) -> usize {
        self.shared.board.semaphore.available_permits()
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
    type Response = Vec<Result<O, ModelFailed>>;
    type Error = BoxError;
    type Future = ResponseFuture<O>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.reserved.is_none() {
            // The semaphore closes once every replica failed for good.
            let Some(permit) = ready!(self.semaphore.poll_acquire(cx)) else {
                let reason = self.shared.board.unavailable().unwrap_or_default();
                return Poll::Ready(Err(Closed::because(reason).into()));
            };
            self.reserved = Some(permit);
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, inputs: Vec<I>) -> Self::Future {
        let permit = self
            .reserved
            .take()
            .expect("Pool::call without a successful poll_ready");
        let (reply, rx) = oneshot::channel();
        // A permit stands for an idle replica (see `Board::idle`), so this
        // finds one; if it ever did not, the batch fails and nothing hangs.
        let Some(index) = lock(&self.shared.board.idle).pop() else {
            permit.forget();
            return ResponseFuture::new(rx);
        };
        let job = Job {
            inputs,
            reply,
            lease: Lease::new(index, permit),
            span: tracing::Span::current(),
        };
        // A send fails only if the replica thread is gone; the job and its
        // reply sender are dropped, which the future reports as `Closed`.
        let _ = lock(&self.shared.jobs[index]).send(job);
        ResponseFuture::new(rx)
    }
}
