//! One replica: a dedicated OS thread that loads, owns and runs one model.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, DeviceLocation};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::{PoolConfig, ReplicaState, ReplicaStatus};
use crate::BoxError;
use crate::error::{FailureKind, ModelFailed};
use crate::model::{Loader, Model};

/// One batch for a replica, with the reservation that made it idle-checked.
pub(super) struct Job<I, O> {
    pub(super) inputs: Vec<I>,
    pub(super) reply: oneshot::Sender<Result<Vec<O>, BoxError>>,
    /// Held while the replica works; released once it is idle again.
    pub(super) permit: OwnedSemaphorePermit,
    pub(super) span: tracing::Span,
}

/// What the pool's handles and the replica threads share.
#[derive(Debug)]
pub(super) struct Board {
    /// Indices of idle replicas. Its length equals the semaphore's free permits
    /// plus the permits reserved but not yet used.
    pub(super) idle: Mutex<Vec<usize>>,
    /// One permit per idle replica.
    pub(super) semaphore: Arc<Semaphore>,
    pub(super) status: Mutex<Vec<ReplicaStatus>>,
}

impl Board {
    fn set_state(&self, index: usize, state: ReplicaState) {
        self.status.lock().expect("status lock")[index].state = state;
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

pub(super) fn spawn<I, L>(
    index: usize,
    location: DeviceLocation,
    loader: Arc<L>,
    board: Arc<Board>,
    config: PoolConfig,
    jobs: mpsc::Receiver<Job<I, <L::Model as Model<I>>::Output>>,
) -> std::io::Result<()>
where
    I: Send + 'static,
    L: Loader<I>,
    <L::Model as Model<I>>::Output: Send + 'static,
{
    let name = format!("candlewick-replica-{index}");
    std::thread::Builder::new().name(name).spawn(move || {
        let replica = Replica {
            index,
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
            Err(err) => {
                tracing::error!(replica = index, %err, "cannot build the replica's CPU thread pool");
                replica.board.set_state(index, ReplicaState::Failed);
            }
        }
    })?;
    Ok(())
}

struct Replica<L> {
    index: usize,
    location: DeviceLocation,
    loader: Arc<L>,
    board: Arc<Board>,
    config: PoolConfig,
}

impl<L> Replica<L> {
    fn run<I>(&self, jobs: &mpsc::Receiver<Job<I, <L::Model as Model<I>>::Output>>)
    where
        L: Loader<I>,
    {
        let mut permit = None;
        let mut failures = 0u32;
        loop {
            let Some(model) = self.load_until_ready(&mut failures) else {
                return;
            };
            self.board.make_idle(self.index, permit.take());
            // Serve until the pool is dropped or the model panics.
            loop {
                let Ok(job) = jobs.recv() else { return };
                self.board.set_state(self.index, ReplicaState::Busy);
                let _entered = job.span.enter();
                let panicked = run_job(&model, job.inputs, job.reply);
                drop(_entered);
                if panicked {
                    permit = Some(job.permit);
                    failures += 1;
                    break;
                }
                failures = 0;
                self.board.make_idle(self.index, Some(job.permit));
            }
            self.board.status.lock().expect("status lock")[self.index].restarts += 1;
            drop(model);
        }
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

    /// Loads and warms up the model, retrying with back-off until it works.
    /// Returns `None` only if no tokio runtime can be built for loading.
    fn load_until_ready<I>(&self, failures: &mut u32) -> Option<L::Model>
    where
        L: Loader<I>,
    {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(err) => {
                tracing::error!(replica = self.index, %err, "cannot build the replica's loader runtime");
                self.board.set_state(self.index, ReplicaState::Failed);
                return None;
            }
        };
        loop {
            let delay = self.config.restart_backoff.delay(*failures);
            if !delay.is_zero() {
                self.board.set_state(self.index, ReplicaState::Restarting);
                std::thread::sleep(delay);
            }
            match self.load_once(&runtime) {
                Ok(model) => return Some(model),
                Err(err) => {
                    *failures += 1;
                    tracing::warn!(replica = self.index, device = ?self.location, %err, "replica failed to load");
                    self.board.set_state(self.index, ReplicaState::Failed);
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

        let mut status = self.board.status.lock().expect("status lock");
        status[self.index].load_time = Some(loaded);
        status[self.index].warmup_time = Some(warmed);
        Ok(model)
    }
}

/// Runs one batch and sends its result. Returns whether the model panicked.
fn run_job<I, M: Model<I>>(
    model: &M,
    inputs: Vec<I>,
    reply: oneshot::Sender<Result<Vec<M::Output>, BoxError>>,
) -> bool {
    let expected = inputs.len();
    let result = catch_unwind(AssertUnwindSafe(|| model.forward(&inputs)));
    let (panicked, result) = match result {
        Ok(Ok(outputs)) if outputs.len() == expected => (false, Ok(outputs)),
        Ok(Ok(outputs)) => {
            let kind = FailureKind::OutputCount {
                expected,
                actual: outputs.len(),
            };
            (
                false,
                Err(ModelFailed::new(kind, "wrong number of outputs").into()),
            )
        }
        Ok(Err(err)) => (false, Err(ModelFailed::new(FailureKind::Error, err).into())),
        Err(payload) => {
            let message = panic_message(&*payload);
            tracing::error!(%message, "model panicked in forward; reloading the replica");
            (
                true,
                Err(ModelFailed::new(FailureKind::Panic, message).into()),
            )
        }
    };
    // The caller may have gone away; its result is then simply dropped.
    let _ = reply.send(result);
    panicked
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

/// Exponential back-off between reload attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Backoff {
    /// Delay before the second consecutive attempt; the first is immediate.
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
