//! One replica: a dedicated OS thread that loads, owns and runs one model.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use std::time::{Duration, Instant};
use tokio::sync::watch;

use candle_core::{Device, DeviceLocation};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::{FailurePolicy, PoolConfig, ReplicaState, ReplicaStatus};
use crate::BoxError;
use crate::device::format_location;
use crate::error::{FailureKind, ModelFailed};
use crate::metrics::ReplicaMetrics;
use crate::model::{Loader, Model};

/// Each input's own result.
pub(super) type Outcomes<O> = Vec<Result<O, ModelFailed>>;
pub(super) type Reply<O> = oneshot::Sender<Outcomes<O>>;

/// One batch for a replica.
pub(super) struct Job<I, O> {
    pub(super) inputs: Vec<I>,
    pub(super) reply: Reply<O>,
    /// The reservation of this replica: held while it works, released once it
    /// is idle again.
    pub(super) permit: OwnedSemaphorePermit,
    pub(super) span: tracing::Span,
}

/// The batch a replica is running, where the stall watchdog can reach it.
pub(super) struct Running<O> {
    pub(super) started: Instant,
    pub(super) size: usize,
    /// Taken by whoever answers first: the replica, or the watchdog.
    pub(super) reply: Option<Reply<O>>,
}

/// Where one replica thread publishes the batch it runs. The watchdog gives a
/// replacement thread a fresh slot, so a stuck thread that finally returns
/// finds only its own, answered batch.
pub(super) type Slot<O> = Arc<Mutex<Option<Running<O>>>>;

/// What the pool's handles, the replica threads and the watchdog share.
pub(super) struct Board<O> {
    /// Indices of idle replicas. Its length equals the semaphore's free permits
    /// plus the permits reserved but not yet used.
    pub(super) idle: Mutex<Vec<usize>>,
    /// One permit per idle replica.
    pub(super) semaphore: Arc<Semaphore>,
    status: Mutex<Roster>,
    pub(super) metrics: Vec<ReplicaMetrics>,
    /// Bumped on every change of `status`, for watchers.
    pub(super) changes: watch::Sender<u64>,
    /// The slot of each replica's current thread.
    pub(super) running: Vec<Mutex<Slot<O>>>,
}

/// The replicas' statuses, and since when none of them could serve.
#[derive(Debug, Clone)]
pub(crate) struct Roster {
    pub(crate) replicas: Vec<ReplicaStatus>,
    pub(crate) none_serving_since: Option<Instant>,
}

/// Where health reads the replicas from, whatever the model's output type.
pub(crate) trait RosterSource: Send + Sync {
    fn roster(&self) -> Roster;
    fn subscribe(&self) -> watch::Receiver<u64>;
}

impl<O: Send> RosterSource for Board<O> {
    fn roster(&self) -> Roster {
        Board::roster(self)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

impl<O> Board<O> {
    pub(super) fn new(replicas: Vec<ReplicaStatus>, labels: &[metrics::Label]) -> Self {
        let count = replicas.len();
        let metrics: Vec<_> = replicas
            .iter()
            .enumerate()
            .map(|(index, replica)| {
                let metrics = ReplicaMetrics::new(labels, &format_location(replica.device), index);
                metrics.transition(None, replica.state);
                metrics
            })
            .collect();
        Self {
            metrics,
            idle: Mutex::new(Vec::with_capacity(count)),
            semaphore: Arc::new(Semaphore::new(0)),
            status: Mutex::new(Roster {
                replicas,
                none_serving_since: Some(Instant::now()),
            }),
            changes: watch::channel(0).0,
            running: (0..count).map(|_| Mutex::default()).collect(),
        }
    }

    pub(super) fn roster(&self) -> Roster {
        self.status.lock().expect("status lock").clone()
    }

    pub(super) fn device(&self, index: usize) -> DeviceLocation {
        self.status.lock().expect("status lock").replicas[index].device
    }

    /// Changes the status of replica `index` and tells the watchers.
    pub(super) fn update(&self, index: usize, change: impl FnOnce(&mut ReplicaStatus)) {
        {
            let mut roster = self.status.lock().expect("status lock");
            let before = roster.replicas[index].state;
            change(&mut roster.replicas[index]);
            let after = roster.replicas[index].state;
            if after != before {
                self.metrics[index].transition(Some(before), after);
            }
            let serving = roster.replicas.iter().any(|r| r.state.is_serving());
            match (serving, roster.none_serving_since) {
                (true, _) => roster.none_serving_since = None,
                (false, None) => roster.none_serving_since = Some(Instant::now()),
                (false, Some(_)) => {}
            }
        }
        self.changes.send_modify(|version| *version += 1);
    }

    pub(super) fn set_state(&self, index: usize, state: ReplicaState) {
        self.update(index, |status| status.state = state);
    }

    /// The slot of the current thread of replica `index`.
    pub(super) fn slot(&self, index: usize) -> MutexGuard<'_, Slot<O>> {
        self.running[index].lock().expect("slot lock")
    }

    /// Makes `index` available to callers again, releasing `permit` if the
    /// replica held one.
    fn make_idle(&self, index: usize, permit: Option<OwnedSemaphorePermit>) {
        self.set_state(index, ReplicaState::Idle);
        self.idle.lock().expect("idle lock").push(index);
        match permit {
            Some(permit) => drop(permit),
            None => self.semaphore.add_permits(1),
        }
    }
}

/// Starts the thread of replica `index`.
pub(super) fn spawn<I, L>(
    index: usize,
    loader: Arc<L>,
    board: Arc<Board<<L::Model as Model<I>>::Output>>,
    config: PoolConfig,
    jobs: mpsc::Receiver<Job<I, <L::Model as Model<I>>::Output>>,
) -> std::io::Result<()>
where
    I: Send + 'static,
    L: Loader<I>,
    <L::Model as Model<I>>::Output: Send + 'static,
{
    let name = format!("candlewick-replica-{index}");
    let location = board.device(index);
    let slot = board.slot(index).clone();
    std::thread::Builder::new().name(name).spawn(move || {
        let replica = Replica {
            index,
            slot,
            location,
            loader,
            board,
            config,
        };
        // Confining a CPU replica to its own rayon pool keeps candle's kernels
        // from contending with the other replicas' for the same threads. The
        // replica then lives on that pool's first thread.
        match replica.cpu_threads() {
            Ok(None) => replica.run(&jobs),
            Ok(Some(threads)) => threads.install(move || replica.run(&jobs)),
            Err(err) => replica.give_up(&format!("cannot build its CPU thread pool: {err}")),
        }
    })?;
    Ok(())
}

struct Replica<L, O> {
    index: usize,
    slot: Slot<O>,
    location: DeviceLocation,
    loader: Arc<L>,
    board: Arc<Board<O>>,
    config: PoolConfig,
}

impl<L, O> Replica<L, O> {
    fn run<I>(&self, jobs: &mpsc::Receiver<Job<I, O>>)
    where
        L: Loader<I>,
        L::Model: Model<I, Output = O>,
    {
        // Loaders may use async I/O: they run on a runtime of this thread's own.
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(err) => return self.give_up(&format!("cannot build its loader runtime: {err}")),
        };
        let mut permit: Option<OwnedSemaphorePermit> = None;
        let mut failures = 0u32;
        loop {
            let Some(model) = self.load_until_ready(&runtime, &mut failures, jobs) else {
                // The pool is gone; so is the point of the permit.
                if let Some(permit) = permit {
                    permit.forget();
                }
                return;
            };
            self.board.make_idle(self.index, permit.take());
            // Serve until the pool is dropped, the model panics, or the
            // watchdog replaced this replica.
            loop {
                let Ok(job) = jobs.recv() else { return };
                match self.serve(&model, job) {
                    Served::Ok => failures = 0,
                    Served::Panicked(job_permit) => {
                        permit = Some(job_permit);
                        failures += 1;
                        break;
                    }
                    Served::Replaced(job_permit) => {
                        // The replacement brought a permit of its own.
                        job_permit.forget();
                        return;
                    }
                }
            }
            self.board.update(self.index, |status| status.restarts += 1);
            drop(model);
        }
    }

    fn serve<I>(&self, model: &L::Model, job: Job<I, O>) -> Served
    where
        L: Loader<I>,
        L::Model: Model<I, Output = O>,
    {
        let Job {
            inputs,
            reply,
            permit,
            span,
        } = job;
        self.board.set_state(self.index, ReplicaState::Busy);
        *self.slot.lock().expect("slot lock") = Some(Running {
            started: Instant::now(),
            size: inputs.len(),
            reply: Some(reply),
        });
        let mut outcomes = Vec::with_capacity(inputs.len());
        let started = Instant::now();
        let panicked = span
            .in_scope(|| run_isolated(model, &inputs, self.config.failure_policy, &mut outcomes));
        self.board.metrics[self.index]
            .batch_duration
            .record(started.elapsed());
        let reply = self
            .slot
            .lock()
            .expect("slot lock")
            .take()
            .and_then(|r| r.reply);
        let Some(reply) = reply else {
            // The watchdog answered this batch and replaced the replica.
            return Served::Replaced(permit);
        };
        if panicked {
            let _ = reply.send(outcomes);
            return Served::Panicked(permit);
        }
        // Idle first, then answer: the batcher can hand this replica its next
        // batch while the callers of this one wake up. (The caller may have
        // gone away; its result is then dropped.)
        self.board.make_idle(self.index, Some(permit));
        let _ = reply.send(outcomes);
        Served::Ok
    }

    /// The thread pool candle's CPU kernels run on for this replica, if the
    /// replica is confined to one.
    fn cpu_threads(&self) -> Result<Option<rayon::ThreadPool>, rayon::ThreadPoolBuildError> {
        let (DeviceLocation::Cpu, Some(n)) = (self.location, self.config.cpu_threads_per_replica)
        else {
            return Ok(None);
        };
        let index = self.index;
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.get())
            .thread_name(move |i| format!("candlewick-replica-{index}-cpu-{i}"))
            .build()
            .map(Some)
    }

    /// Marks this replica failed for good, with the reason.
    fn give_up(&self, reason: &str) {
        tracing::error!(replica = self.index, device = ?self.location, reason, "replica failed for good");
        self.board.update(self.index, |status| {
            status.state = ReplicaState::Failed;
            status.failed_for_good = true;
            status.last_error = Some(reason.to_owned());
        });
    }

    /// Loads and warms up the model, retrying with back-off until it works.
    /// Returns `None` once the pool is dropped.
    fn load_until_ready<I>(
        &self,
        runtime: &tokio::runtime::Runtime,
        failures: &mut u32,
        jobs: &mpsc::Receiver<Job<I, O>>,
    ) -> Option<L::Model>
    where
        L: Loader<I>,
    {
        loop {
            let delay = self.config.restart_backoff.delay(*failures);
            if !delay.is_zero() {
                self.board.set_state(self.index, ReplicaState::Restarting);
                std::thread::sleep(delay);
            }
            // No job is sent to a replica that is not idle, so the channel
            // can only be empty, or closed because every handle is gone.
            if let Err(mpsc::TryRecvError::Disconnected) = jobs.try_recv() {
                return None;
            }
            match self.load_once(runtime) {
                Ok(model) => return Some(model),
                Err(err) => {
                    *failures += 1;
                    tracing::warn!(replica = self.index, device = ?self.location, %err, "replica failed to load");
                    self.board.update(self.index, |status| {
                        status.state = ReplicaState::Failed;
                        status.load_failures += 1;
                        status.last_error = Some(err.to_string());
                    });
                }
            }
        }
    }

    fn load_once<I>(&self, runtime: &tokio::runtime::Runtime) -> Result<L::Model, BoxError>
    where
        L: Loader<I>,
    {
        self.board.set_state(self.index, ReplicaState::Loading);
        let started = Instant::now();
        let device = device(self.location)?;
        let model = guard(|| runtime.block_on(self.loader.load(&device)))?;
        let loaded = started.elapsed();

        self.board.set_state(self.index, ReplicaState::WarmingUp);
        let started = Instant::now();
        let inputs = model.warmup_inputs();
        if !inputs.is_empty() {
            guard(|| model.forward(&inputs))?;
        }
        let warmed = started.elapsed();

        self.board.update(self.index, |status| {
            status.load_time = Some(loaded);
            status.warmup_time = Some(warmed);
        });
        let metrics = &self.board.metrics[self.index];
        metrics.load_time.set(loaded.as_secs_f64());
        metrics.warmup_time.set(warmed.as_secs_f64());
        Ok(model)
    }
}

enum Served {
    /// Answered, and idle again.
    Ok,
    Panicked(OwnedSemaphorePermit),
    Replaced(OwnedSemaphorePermit),
}

/// Runs `inputs`, appending one outcome per input to `outcomes`. Under
/// [`FailurePolicy::Bisect`] a failed batch is split in halves and each half
/// re-run, so that one poisoned input fails alone. Returns whether the model
/// panicked; after a panic nothing more runs on this model.
fn run_isolated<I, M: Model<I>>(
    model: &M,
    inputs: &[I],
    policy: FailurePolicy,
    outcomes: &mut Outcomes<M::Output>,
) -> bool {
    let depth = match policy {
        FailurePolicy::FailBatch => 0,
        FailurePolicy::Bisect { max_depth } => max_depth,
    };
    bisect(model, inputs, depth, outcomes)
}

fn bisect<I, M: Model<I>>(
    model: &M,
    inputs: &[I],
    depth: u32,
    outcomes: &mut Outcomes<M::Output>,
) -> bool {
    let err = match forward_checked(model, inputs) {
        Ok(outputs) => {
            outcomes.extend(outputs.into_iter().map(Ok));
            return false;
        }
        Err(err) => err,
    };
    let retry = depth > 0 && inputs.len() > 1 && err.kind() == FailureKind::Error;
    if !retry {
        let panicked = err.kind() == FailureKind::Panic;
        outcomes.extend(failures(err, inputs.len()));
        return panicked;
    }
    let (left, right) = inputs.split_at(inputs.len() / 2);
    if bisect(model, left, depth - 1, outcomes) {
        let err = match outcomes.last() {
            Some(Err(err)) => err.clone(),
            _ => unreachable!("a panic leaves a failed outcome"),
        };
        outcomes.extend(failures(err, right.len()));
        return true;
    }
    bisect(model, right, depth - 1, outcomes)
}

/// `n` failed outcomes sharing `err`.
pub(super) fn failures<O>(
    err: ModelFailed,
    n: usize,
) -> impl Iterator<Item = Result<O, ModelFailed>> {
    std::iter::repeat_n(err, n).map(Err)
}

/// One forward pass, with panics and wrong output counts turned into errors.
fn forward_checked<I, M: Model<I>>(model: &M, inputs: &[I]) -> Result<Vec<M::Output>, ModelFailed> {
    match catch_unwind(AssertUnwindSafe(|| model.forward(inputs))) {
        Ok(Ok(outputs)) if outputs.len() == inputs.len() => Ok(outputs),
        Ok(Ok(outputs)) => {
            let kind = FailureKind::OutputCount {
                expected: inputs.len(),
                actual: outputs.len(),
            };
            Err(ModelFailed::new(kind, "wrong number of outputs"))
        }
        Ok(Err(err)) => Err(ModelFailed::new(FailureKind::Error, err)),
        Err(payload) => {
            let message = panic_message(&*payload);
            tracing::error!(%message, "model panicked in forward; reloading the replica");
            Err(ModelFailed::new(FailureKind::Panic, message))
        }
    }
}

/// Runs `f`, turning a panic into an error.
fn guard<T>(f: impl FnOnce() -> Result<T, BoxError>) -> Result<T, BoxError> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|payload| Err(format!("panicked: {}", panic_message(&*payload)).into()))
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Opens the candle device for `location` on the current thread.
fn device(location: DeviceLocation) -> Result<Device, BoxError> {
    Ok(match location {
        DeviceLocation::Cpu => Device::Cpu,
        DeviceLocation::Cuda { gpu_id } => Device::new_cuda(gpu_id)?,
        DeviceLocation::Metal { gpu_id } => Device::new_metal(gpu_id)?,
    })
}

/// Exponential back-off between load attempts: the first load is immediate;
/// after a failed load or a panic, a replica waits `initial`, doubled for each
/// further consecutive failure, up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Backoff {
    /// Delay after one failure.
    pub initial: Duration,
    /// Upper bound on the delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The delay before an attempt that follows `failures` consecutive failures.
    pub fn delay(&self, failures: u32) -> Duration {
        match failures {
            0 => Duration::ZERO,
            n => self
                .initial
                .saturating_mul(1u32.checked_shl(n - 1).unwrap_or(u32::MAX))
                .min(self.max),
        }
    }
}
