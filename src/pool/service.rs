use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio_util::sync::PollSemaphore;
use tower::Service;

use super::replica::{self, Board, Job, Outcomes, Slot};
use super::{PoolConfig, PoolError, ReplicaState, ReplicaStatus};
use crate::BoxError;
use crate::error::{Closed, FailureKind, ModelFailed};
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

type Spawn<I, O> = dyn Fn(usize, mpsc::Receiver<Job<I, O>>) -> std::io::Result<()> + Send + Sync;

struct Shared<I, O> {
    /// One channel per replica; dropping the last handle stops the threads.
    jobs: Vec<Mutex<mpsc::Sender<Job<I, O>>>>,
    board: Arc<Board<O>>,
    /// Starts the thread of a replica; the watchdog uses it to replace one.
    spawn: Box<Spawn<I, O>>,
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
        let status: Vec<_> = config
            .devices
            .iter()
            .flat_map(|&location| std::iter::repeat_n(location, config.replicas_per_device.get()))
            .map(ReplicaStatus::new)
            .collect();
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
            watch_for_stalls(Arc::downgrade(&shared), timeout)?;
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

    /// The replicas' statuses, for health.
    pub(crate) fn roster_source(&self) -> Arc<dyn replica::RosterSource>
    where
        O: Send + 'static,
    {
        self.shared.board.clone()
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

/// Starts the thread that answers stalled batches and replaces their replicas.
fn watch_for_stalls<I, O>(shared: Weak<Shared<I, O>>, timeout: Duration) -> Result<(), PoolError>
where
    I: Send + 'static,
    O: Send + 'static,
{
    let tick = (timeout / 4).clamp(Duration::from_millis(1), Duration::from_secs(1));
    std::thread::Builder::new()
        .name("candlewick-watchdog".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(tick);
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                for index in 0..shared.jobs.len() {
                    replace_if_stalled(&shared, index, timeout);
                }
            }
        })
        .map(drop)
        .map_err(PoolError::Watchdog)
}

fn replace_if_stalled<I, O>(shared: &Shared<I, O>, index: usize, timeout: Duration) {
    let (size, reply) = {
        let mut slot = shared.board.slot(index);
        let mut running = slot.lock().expect("slot lock");
        let Some(batch) = running
            .as_mut()
            .filter(|batch| batch.started.elapsed() >= timeout)
        else {
            return;
        };
        let Some(reply) = batch.reply.take() else {
            return;
        };
        let size = batch.size;
        drop(running);
        // The replacement publishes its batches in a slot of its own.
        *slot = Slot::default();
        (size, reply)
    };
    tracing::error!(
        replica = index,
        ?timeout,
        "batch stalled; replacing the replica"
    );
    let err = ModelFailed::new(
        FailureKind::Stalled,
        format!("the batch ran longer than the stall timeout of {timeout:?}"),
    );
    // Record the stall before answering, so that callers see it in health.
    shared.board.update(index, |status| {
        status.state = ReplicaState::Stalled;
        status.stalls += 1;
    });
    let _ = reply.send(replica::failures(err, size).collect());
    // The stuck thread keeps its model until `forward` returns, then retires.
    // Its replacement's channel goes in before the replacement starts: once
    // it is idle, jobs for this index must reach it.
    let (tx, rx) = mpsc::channel();
    *shared.jobs[index].lock().expect("jobs lock") = tx;
    if let Err(err) = (shared.spawn)(index, rx) {
        tracing::error!(replica = index, %err, "cannot start a replacement replica");
        shared.board.update(index, |status| {
            status.state = ReplicaState::Failed;
            status.failed_for_good = true;
            status.last_error = Some(format!("cannot start a replacement thread: {err}"));
        });
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
        let _ = self.shared.jobs[index].lock().expect("jobs lock").send(job);
        ResponseFuture { rx }
    }
}

/// The future of one batch run by a [`Pool`].
#[derive(Debug)]
pub struct ResponseFuture<O> {
    rx: oneshot::Receiver<Outcomes<O>>,
}

impl<O> Future for ResponseFuture<O> {
    type Output = Result<Vec<Result<O, ModelFailed>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(ready!(Pin::new(&mut self.rx).poll(cx)).map_err(|_| Closed::new().into()))
    }
}
