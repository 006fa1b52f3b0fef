use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use candle_core::DeviceLocation;
use tokio::sync::{OwnedSemaphorePermit, TryAcquireError, oneshot};
use tokio::time::Sleep;
use tokio_util::sync::PollSemaphore;
use tower::Service;

use super::board::{Batch, Board, Job, Lease, PoolStatus, Staged, Staging};
use super::future::ResponseFuture;
use super::replica;
use super::shared::{Shared, Spawn};
use super::{CpuThreads, PoolConfig, PoolError, ReplicaStatus, watchdog};
use crate::BoxError;
use crate::contain::{drop_contained, lock, saturating_deadline};
use crate::error::{Closed, ModelFailed};
use crate::model::{Loader, Model, ModelInfo};

/// A `Service<Vec<I>>` that runs each batch on an idle replica and answers with
/// one `Result<O, ModelFailed>` per input. See the [module docs](super).
///
/// Clones share the replicas. A clone holds no reservation: `poll_ready`
/// reserves an idle replica (or a place in the stage) for the next `call` of
/// that handle only.
pub struct Pool<I, O> {
    shared: Arc<Shared<I, O>>,
    semaphore: PollSemaphore,
    /// Whether `semaphore`'s acquire waits in the queue (the last poll was
    /// pending), so a freed replica's permit may go to this handle.
    queued: bool,
    /// When to look at the stage again; see [`STAGE_RECHECK`].
    recheck: Option<Pin<Box<Sleep>>>,
    reserved: Option<Reserved>,
}

/// How often a caller waiting for room in a full stage looks again. A place
/// frees when a replica takes a staged batch, and having the replica wake
/// the caller then would cost that replica tens of microseconds before its
/// next batch (measured: 40–46 µs per wake from a replica thread on a
/// 2-vCPU VM); a staged batch waits a whole batch anyway, so looking again
/// each millisecond finds the room in time for any batch longer than that.
const STAGE_RECHECK: Duration = Duration::from_millis(1);

/// What `poll_ready` reserved for the next `call`.
enum Reserved {
    /// An idle replica.
    Replica(OwnedSemaphorePermit),
    /// A place in the stage, while every replica was busy.
    Stage(OwnedSemaphorePermit),
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
        if config
            .stall_timeout
            .is_some_and(|timeout| timeout.is_zero())
        {
            return Err(PoolError::Invalid {
                setting: "stall_timeout",
                reason: "longer than zero (`None` turns the watchdog off)",
            });
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
            queued: false,
            recheck: None,
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
        I: Send + 'static,
        O: Send + 'static,
    {
        PoolStatus::new(self.shared.board.clone())
    }

    /// The handle a batching layer uses to hand this pool a full batch while
    /// every replica is busy: the batch waits in the pool's stage (one place
    /// per replica) and starts the moment any replica frees, with no
    /// hand-off from the replica to the batcher and back in between.
    ///
    /// The pool offers a place in the stage only while the holder of this
    /// handle [says](Staging::offer_full_batch) its next batch is full, so
    /// a batcher that does not use it sees `poll_ready` as before: `Ready`
    /// when a replica is idle. [`Serving`](crate::Serving) wires it up; in a
    /// stack of your own, pass it to
    /// [`BatchLayer::staging`](crate::batch::BatchLayer::staging). One
    /// batcher per pool.
    pub fn staging(&self) -> Staging
    where
        I: Send + 'static,
        O: Send + 'static,
    {
        Staging::new(self.shared.board.clone())
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
            queued: false,
            recheck: None,
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
        if self.reserved.is_some() {
            return Poll::Ready(Ok(()));
        }
        // Both semaphores close once every replica failed for good.
        let acquired = self.semaphore.poll_acquire(cx);
        self.queued = acquired.is_pending();
        let reserved = match acquired {
            Poll::Ready(Some(permit)) => Reserved::Replica(permit),
            Poll::Ready(None) => return Poll::Ready(Err(self.closed())),
            Poll::Pending if self.shared.board.stage_wanted() => {
                match self.shared.board.stage.clone().try_acquire_owned() {
                    Ok(place) => Reserved::Stage(place),
                    Err(TryAcquireError::Closed) => return Poll::Ready(Err(self.closed())),
                    Err(TryAcquireError::NoPermits) => {
                        self.recheck_stage(cx);
                        return Poll::Pending;
                    }
                }
            }
            Poll::Pending => return Poll::Pending,
        };
        self.reserved = Some(reserved);
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, inputs: Vec<I>) -> Self::Future {
        let reserved = self
            .reserved
            .take()
            .expect("Pool::call without a successful poll_ready");
        let (reply, rx) = oneshot::channel();
        let board = self.shared.board.clone();
        let batch = Batch {
            inputs,
            reply,
            span: tracing::Span::current(),
        };
        let mut places = lock(&board.places);
        // Every replica failed for good: a batch staged now would never run.
        // Dropped, its future answers `Closed`.
        if board.semaphore.is_closed() {
            drop(places);
            drop_contained(batch, "a batch's inputs");
            return ResponseFuture::new(rx);
        }
        // The batch to run now, and its permit.
        let (batch, permit) = match reserved {
            Reserved::Stage(place) => {
                // A replica that freed since `poll_ready` may have given its
                // permit to this handle's pending acquire: it runs the batch
                // now. Checked under the lock replicas go idle under, so the
                // batch is either run or seen by the next replica to free.
                let Some(permit) = self.claim_idle() else {
                    places.staged.push_back(Staged { batch, place });
                    drop(places);
                    // No acquire of this handle stays queued to take the
                    // permit of a replica that frees later.
                    self.semaphore = PollSemaphore::new(board.semaphore.clone());
                    self.queued = false;
                    return ResponseFuture::new(rx);
                };
                places.free(place);
                (batch, permit)
            }
            Reserved::Replica(permit) => match places.staged.pop_front() {
                // Batches staged while this replica was reserved go first;
                // this one takes the oldest's place in the stage.
                Some(mut oldest) => {
                    let first = std::mem::replace(&mut oldest.batch, batch);
                    places.staged.push_back(oldest);
                    (first, permit)
                }
                None => (batch, permit),
            },
        };
        // A permit stands for an idle replica (see `Places::idle`), so this
        // finds one; if it ever did not, the batch fails and nothing hangs.
        let index = places.idle.pop();
        drop(places);
        let Some(index) = index else {
            permit.forget();
            drop_contained(batch, "a batch's inputs");
            return ResponseFuture::new(rx);
        };
        let job = Job {
            batch,
            lease: Lease::new(index, permit),
        };
        self.shared.send(index, job);
        ResponseFuture::new(rx)
    }
}

impl<I, O> Pool<I, O> {
    /// An idle replica's permit, if this handle's pending acquire was given
    /// one or one is free, without waiting (and without tokio's cooperative
    /// budget, which would report a permit already taken as pending).
    fn claim_idle(&mut self) -> Option<OwnedSemaphorePermit> {
        let own = {
            let semaphore = &mut self.semaphore;
            let claim =
                tokio::task::unconstrained(std::future::poll_fn(|cx| semaphore.poll_acquire(cx)));
            let mut claim = std::pin::pin!(claim);
            match claim.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(permit) => permit,
                Poll::Pending => None,
            }
        };
        if own.is_some() {
            self.queued = false;
        }
        own.or_else(|| self.shared.board.semaphore.clone().try_acquire_owned().ok())
    }

    /// Arranges for `cx` to be woken [`STAGE_RECHECK`] from now.
    fn recheck_stage(&mut self, cx: &mut Context<'_>) {
        let at = saturating_deadline(tokio::time::Instant::now(), STAGE_RECHECK);
        let recheck = self
            .recheck
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if recheck.is_elapsed() {
            recheck.as_mut().reset(at);
        }
        // Pending until `at`: this registers the waker.
        let _ = recheck.as_mut().poll(cx);
    }

    fn closed(&self) -> BoxError {
        let reason = self.shared.board.unavailable().unwrap_or_default();
        Closed::because(reason).into()
    }
}

impl<I, O> Drop for Pool<I, O> {
    /// A replica this handle reserved, or whose permit its pending acquire
    /// was given, would sit idle beside a staged batch; it runs that batch.
    fn drop(&mut self) {
        let reserved = match self.reserved.take() {
            Some(Reserved::Replica(permit)) => Some(permit),
            Some(Reserved::Stage(place)) => {
                lock(&self.shared.board.places).free(place);
                None
            }
            None => None,
        };
        // A handle that holds no permit and waits for none (most clones)
        // has nothing to hand over.
        if reserved.is_none() && !self.queued {
            return;
        }
        let board = self.shared.board.clone();
        // Gives back a permit the pending acquire holds.
        self.semaphore = PollSemaphore::new(board.semaphore.clone());
        let mut places = lock(&board.places);
        if places.staged.is_empty() || places.idle.is_empty() {
            return;
        }
        let Some(permit) = reserved.or_else(|| board.semaphore.clone().try_acquire_owned().ok())
        else {
            return;
        };
        let (Some(index), Some(staged)) = (places.idle.pop(), places.staged.pop_front()) else {
            return;
        };
        let (job, place) = staged.into_job(Lease::new(index, permit));
        places.free(place);
        drop(places);
        self.shared.send(index, job);
    }
}
