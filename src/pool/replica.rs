//! One replica: a dedicated OS thread that loads, owns and runs one model.
//!
//! Every call into user code (the loader, `warmup_inputs`, `forward`, the
//! model's `Drop`, dropping inputs and outputs) is contained: a panic there
//! fails a batch or a load, never the thread, and the replica's bookkeeping
//! (its [`Lease`] on the idle set, the slot the watchdog watches) lives in
//! values whose `Drop` keeps it whole.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use candle_core::DeviceLocation;

use super::board::{Batch, Board, Job, Lease, Outcomes, Reply, Running, Slot};
use super::metrics::ReplicaMetrics;
use super::{ComputePriority, FailurePolicy, PoolConfig, ReplicaState};
use crate::BoxError;
use crate::contain::{catch, drop_contained, lock};
use crate::error::{FailureKind, ModelFailed, Unrecoverable};
use crate::model::{Loader, Model};

/// Starts the thread of replica `index`.
pub(super) fn spawn<I, L>(
    index: usize,
    loader: Arc<L>,
    board: Arc<Board<I, <L::Model as Model<I>>::Output>>,
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
    board.thread_starting();
    let ended = ThreadEnded(board.clone());
    std::thread::Builder::new().name(name).spawn(move || {
        let _ended = ended;
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
        if location == DeviceLocation::Cpu {
            set_compute_priority(replica.config.compute_priority);
        }
        match replica.cpu_threads() {
            Ok(None) => replica.run_contained(&jobs),
            Ok(Some(threads)) => threads.install(move || replica.run_contained(&jobs)),
            Err(err) => replica
                .board
                .fail_for_good(index, &format!("cannot build its CPU thread pool: {err}")),
        }
    })?;
    Ok(())
}

/// Counts its replica thread ended when dropped: when the thread ends, or
/// if it could not start.
struct ThreadEnded<I, O>(Arc<Board<I, O>>);

impl<I, O> Drop for ThreadEnded<I, O> {
    fn drop(&mut self) {
        self.0.thread_ended();
    }
}

struct Replica<L, I, O> {
    index: usize,
    slot: Slot<O>,
    location: DeviceLocation,
    loader: Arc<L>,
    board: Arc<Board<I, O>>,
    config: PoolConfig,
}

impl<L, I, O> Replica<L, I, O> {
    /// [`run`](Self::run), with a last line of defence: user code is
    /// contained where it is called, so a panic reaching here is a bug of
    /// this crate, and the replica says so instead of vanishing.
    fn run_contained(&self, jobs: &mpsc::Receiver<Job<I, O>>)
    where
        L: Loader<I>,
        L::Model: Model<I, Output = O>,
    {
        if let Err(message) = catch(|| self.run(jobs)) {
            let reason = format!("its thread panicked outside the model: {message}");
            self.board.fail_for_good(self.index, &reason);
        }
    }

    fn run(&self, jobs: &mpsc::Receiver<Job<I, O>>)
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
            Err(err) => {
                let reason = format!("cannot build its loader runtime: {err}");
                return self.board.fail_for_good(self.index, &reason);
            }
        };
        // The lease of the batch whose panic made this replica reload.
        let mut lease: Option<Lease> = None;
        let mut failures = 0u32;
        loop {
            // `None`: the pool is gone, or the load can never succeed.
            let Some((model, loaded)) = self.load_until_ready(&runtime, &mut failures, jobs) else {
                return;
            };
            let held = lease.take().unwrap_or_else(|| Lease::unheld(self.index));
            // A batch staged while this replica (re)loaded runs at once.
            let mut staged = self.board.next_or_idle(held, |status| {
                status.load_time = Some(loaded.load);
                status.warmup_time = Some(loaded.warmup);
            });
            // Serve until the pool is dropped, the model panics, or the
            // watchdog replaced this replica.
            // When the last batch was answered, and whether the batch before
            // came within the spin: under load it does and polling pays; at
            // light load polling would only burn CPU.
            let mut freed: Option<Instant> = None;
            let mut quick = true;
            loop {
                let job = match staged.take() {
                    Some(job) => job,
                    None => {
                        let spin = match freed {
                            Some(_) if quick => self.config.handoff_spin,
                            _ => Duration::ZERO,
                        };
                        let Ok(job) = next_job(jobs, spin) else {
                            return drop_contained(model, "the model");
                        };
                        if let Some(freed) = freed.take() {
                            quick = freed.elapsed() <= self.config.handoff_spin;
                        }
                        job
                    }
                };
                match catch(|| self.serve(&model, job)) {
                    Ok(Served::Ok(next)) => {
                        failures = 0;
                        freed = next.is_none().then(Instant::now);
                        staged = next;
                    }
                    Ok(Served::Panicked(job_lease)) => {
                        lease = Some(job_lease);
                        failures = failures.saturating_add(1);
                        break;
                    }
                    Ok(Served::Replaced) => {
                        // The replacement brought a permit of its own. This
                        // thread's model stops counting as stuck once dropped.
                        drop_contained(model, "the model");
                        self.board.update(self.index, |status| {
                            status.stuck_threads = status.stuck_threads.saturating_sub(1);
                        });
                        return;
                    }
                    Err(message) => {
                        // Outside `forward` (dropping inputs or outputs, a
                        // metrics recorder): the batch was answered by its
                        // slot guard; reload to be safe.
                        tracing::error!(replica = self.index, %message, "replica panicked around a batch; reloading");
                        failures = failures.saturating_add(1);
                        break;
                    }
                }
            }
            // Restarting before the model's `Drop` (user code) runs: a hang
            // there must not look like a replica serving.
            self.board.update(self.index, |status| {
                status.state = ReplicaState::Restarting;
                status.restarts = status.restarts.saturating_add(1);
            });
            drop_contained(model, "the model");
        }
    }

    fn serve(&self, model: &L::Model, job: Job<I, O>) -> Served<I, O>
    where
        L: Loader<I>,
        L::Model: Model<I, Output = O>,
    {
        let Job {
            batch:
                Batch {
                    inputs,
                    reply,
                    span,
                },
            lease,
        } = job;
        self.board.set_state(self.index, ReplicaState::Busy);
        let started = Instant::now();
        *lock(&self.slot) = Some(Running {
            started,
            size: inputs.len(),
            reply: Some(reply),
        });
        // Whatever happens from here, the batch is answered exactly once.
        let guard = SlotGuard(&self.slot);
        let mut outcomes = Vec::with_capacity(inputs.len());
        let panicked = span.in_scope(|| {
            run_isolated(
                model,
                &inputs,
                self.config.failure_policy,
                &mut outcomes,
                &self.board.metrics[self.index],
            )
        });
        self.board.metrics[self.index]
            .batch_duration
            .record(started.elapsed());
        // The inputs' `Drop` is user code: run it before this replica can be
        // idle again, so that a panic there cannot make it idle twice.
        drop_contained(inputs, "a batch's inputs");
        let Some(reply) = guard.take() else {
            // The watchdog answered this batch and replaced the replica.
            drop_contained(outcomes, "the outputs of a stalled batch");
            return Served::Replaced;
        };
        if panicked {
            answer(reply, outcomes);
            return Served::Panicked(lease);
        }
        // Outputs nobody waits for any more are dropped (user code) while
        // this replica still counts as busy, like its inputs.
        let outcomes = if reply.is_closed() {
            drop_contained(outcomes, "outputs nobody waited for");
            None
        } else {
            Some(outcomes)
        };
        // The next batch first, then answer: a staged batch, or the one the
        // batcher hands this replica while the callers of this one wake up.
        let next = self.board.next_or_idle(lease, |_| {});
        if let Some(outcomes) = outcomes {
            answer(reply, outcomes);
        }
        Served::Ok(next)
    }

    /// The thread pool candle's CPU kernels run on for this replica, if the
    /// replica is confined to one.
    fn cpu_threads(&self) -> Result<Option<rayon::ThreadPool>, rayon::ThreadPoolBuildError> {
        let (DeviceLocation::Cpu, Some(n)) = (self.location, self.config.cpu_threads_per_replica)
        else {
            return Ok(None);
        };
        let (index, priority) = (self.index, self.config.compute_priority);
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.get())
            .thread_name(move |i| format!("candlewick-replica-{index}-cpu-{i}"))
            .start_handler(move |_| set_compute_priority(priority))
            .build()
            .map(Some)
    }

    /// Loads and warms up the model, retrying with back-off until it works.
    /// Returns `None` once the pool is dropped (after one more try if a
    /// batch is staged, to run it), or when the loader said no retry can
    /// help ([`Unrecoverable`]): the replica then failed for good.
    fn load_until_ready(
        &self,
        runtime: &tokio::runtime::Runtime,
        failures: &mut u32,
        jobs: &mpsc::Receiver<Job<I, O>>,
    ) -> Option<(L::Model, Loaded)>
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
            // can only be empty, or closed because every handle is gone (or
            // the watchdog replaced this thread); a job that came anyway is
            // answered, never dropped. Batches staged before the handles
            // went get one load to run them.
            let gone = match jobs.try_recv() {
                Err(mpsc::TryRecvError::Disconnected)
                    if !self.board.has_staged() || self.replaced() =>
                {
                    return None;
                }
                Err(mpsc::TryRecvError::Disconnected) => true,
                Err(mpsc::TryRecvError::Empty) => false,
                Ok(job) => {
                    let err = ModelFailed::new(FailureKind::Error, "the replica was reloading");
                    let Batch { inputs, reply, .. } = job.batch;
                    answer(reply, self::failures(err, inputs.len()).collect());
                    drop_contained(inputs, "a batch's inputs");
                    false
                }
            };
            match self.load_once(runtime) {
                Ok(model) => return Some(model),
                Err(err) if Unrecoverable::is_in(&*err) => {
                    self.board.update(self.index, |status| {
                        status.load_failures = status.load_failures.saturating_add(1);
                    });
                    self.board
                        .fail_for_good(self.index, &format!("cannot load its model: {err}"));
                    return None;
                }
                Err(err) => {
                    *failures = failures.saturating_add(1);
                    tracing::warn!(replica = self.index, device = ?self.location, %err, "replica failed to load");
                    self.board.update(self.index, |status| {
                        status.state = ReplicaState::Failed;
                        status.load_failures = status.load_failures.saturating_add(1);
                        status.last_error = Some(err.to_string());
                    });
                    if gone {
                        // The last replica thread to end closes the stage.
                        return None;
                    }
                }
            }
        }
    }

    /// Whether the watchdog gave this replica a new thread (and slot).
    fn replaced(&self) -> bool {
        !Arc::ptr_eq(&self.slot, &self.board.slot(self.index))
    }

    fn load_once(&self, runtime: &tokio::runtime::Runtime) -> Result<(L::Model, Loaded), BoxError>
    where
        L: Loader<I>,
    {
        self.board.set_state(self.index, ReplicaState::Loading);
        let started = Instant::now();
        let device = crate::device::open(self.location)?;
        let model = guard(|| runtime.block_on(self.loader.load(&device)))?;
        let loaded = started.elapsed();

        self.board.set_state(self.index, ReplicaState::WarmingUp);
        let started = Instant::now();
        let warmed_up = guard(|| {
            let inputs = model.warmup_inputs();
            if !inputs.is_empty() {
                model.forward(&inputs)?;
            }
            Ok(())
        });
        if let Err(err) = warmed_up {
            drop_contained(model, "a model that failed its warm-up");
            return Err(format!("warm-up failed: {err}").into());
        }
        let warmed = started.elapsed();

        let metrics = &self.board.metrics[self.index];
        metrics.load_time.set(loaded.as_secs_f64());
        metrics.warmup_time.set(warmed.as_secs_f64());
        Ok((
            model,
            Loaded {
                load: loaded,
                warmup: warmed,
            },
        ))
    }
}

/// How long a model took to load and to warm up.
struct Loaded {
    load: Duration,
    warmup: Duration,
}

enum Served<I, O> {
    /// Answered; the replica is idle again, or took the staged batch here.
    Ok(Option<Job<I, O>>),
    /// Answered; the model panicked and must be reloaded.
    Panicked(Lease),
    /// The watchdog answered it and replaced this thread.
    Replaced,
}

/// Schedules the current thread as `priority` says (see
/// [`ComputePriority`]); a failure leaves it at normal priority, logged.
fn set_compute_priority(priority: ComputePriority) {
    if priority == ComputePriority::Normal {
        return;
    }
    #[cfg(unix)]
    {
        use thread_priority::ThreadPriority;
        use thread_priority::unix::{
            NormalThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy,
            thread_native_id,
        };
        // Niceness under the usual policy; SCHED_BATCH would also delay
        // the wake-ups of a multi-threaded replica's kernels.
        let policy = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other);
        if let Err(err) =
            set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, policy)
        {
            tracing::warn!(
                ?err,
                "cannot lower a compute thread's priority; it runs at normal priority"
            );
        }
    }
    #[cfg(not(unix))]
    tracing::warn!("lowering a compute thread's priority is not supported here");
}

/// The next job, polled for up to `spin` (forever if that overflows the
/// clock) before blocking: a batcher hands a freed replica its next batch
/// sooner than a blocked thread wakes up.
fn next_job<J>(jobs: &mpsc::Receiver<J>, spin: Duration) -> Result<J, mpsc::RecvError> {
    let until = Instant::now().checked_add(spin);
    loop {
        match jobs.try_recv() {
            Ok(job) => return Ok(job),
            Err(mpsc::TryRecvError::Disconnected) => return Err(mpsc::RecvError),
            Err(mpsc::TryRecvError::Empty) if until.is_none_or(|until| Instant::now() < until) => {
                std::thread::yield_now();
            }
            Err(mpsc::TryRecvError::Empty) => return jobs.recv(),
        }
    }
}

/// Sends a batch its outcomes. If its caller went away, the outputs are
/// dropped here, and their `Drop` is user code.
fn answer<O>(reply: Reply<O>, outcomes: Outcomes<O>) {
    if let Err(outcomes) = reply.send(outcomes) {
        drop_contained(outcomes, "outputs nobody waited for");
    }
}

/// Answers the batch in a replica's slot if `serve` unwinds before it could:
/// the callers hear of the panic, and the watchdog never mistakes the
/// unanswered batch for a stall.
struct SlotGuard<'a, O>(&'a Slot<O>);

impl<O> SlotGuard<'_, O> {
    /// Takes the reply, if the watchdog did not.
    fn take(self) -> Option<Reply<O>> {
        lock(self.0).take().and_then(|running| running.reply)
    }
}

impl<O> Drop for SlotGuard<'_, O> {
    fn drop(&mut self) {
        let Some(running) = lock(self.0).take() else {
            return;
        };
        if let Some(reply) = running.reply {
            let err = ModelFailed::new(FailureKind::Panic, "the replica panicked around the batch");
            let _ = reply.send(failures(err, running.size).collect());
        }
    }
}

/// Runs `inputs`, appending one outcome per input to `outcomes`. Under
/// [`FailurePolicy::Bisect`] a failed batch is split in halves and each half
/// re-run, so that a poisoned input fails alone. Returns whether the model
/// panicked; after a panic nothing more runs on this model.
fn run_isolated<I, M: Model<I>>(
    model: &M,
    inputs: &[I],
    policy: FailurePolicy,
    outcomes: &mut Outcomes<M::Output>,
    metrics: &ReplicaMetrics,
) -> bool {
    let err = match forward_checked(model, inputs) {
        Ok(outputs) => {
            outcomes.extend(outputs.into_iter().map(Ok));
            return false;
        }
        Err(err) => err,
    };
    let depth = match policy {
        FailurePolicy::FailBatch => 0,
        FailurePolicy::Bisect { max_depth } => max_depth,
    };
    // Isolating one poisoned input costs the batch, then both halves at
    // every level: 1 + 2·⌈log2 n⌉. Splits whose halves both failed may
    // spend what that leaves beyond their own two forward passes.
    let levels = inputs.len().next_power_of_two().ilog2() as usize;
    let mut bisection = Bisection {
        both_failed_budget: levels.saturating_mul(2).saturating_sub(2),
        systemic: false,
    };
    let panicked = bisection.isolate(model, inputs, err, depth, false, outcomes);
    if bisection.systemic {
        metrics.systemic_failures.increment(1);
    }
    panicked
}

/// The state of one batch's bisection.
struct Bisection {
    /// Forward passes still allowed below splits whose halves both failed.
    both_failed_budget: usize,
    /// Whether it left inputs unsplit because the failure looked systemic.
    systemic: bool,
}

impl Bisection {
    /// Isolates the poisoned inputs of `inputs`, which failed together with
    /// `err`: runs each half once, and descends into each half that failed.
    ///
    /// When both halves fail, the failure may be systemic (a lost device, a
    /// model bug), and splitting on would multiply it. Such a split is
    /// descended into only if its own halves did not both fail one level up,
    /// and only within a budget for the whole batch: a batch whose every
    /// input fails costs at most 1 + 2·⌈log2 n⌉ forward passes, as many as
    /// isolating one poisoned input, while a few poisoned inputs are still
    /// isolated one by one.
    fn isolate<I, M: Model<I>>(
        &mut self,
        model: &M,
        inputs: &[I],
        err: ModelFailed,
        depth: u32,
        both_failed_above: bool,
        outcomes: &mut Outcomes<M::Output>,
    ) -> bool {
        let splittable = depth > 0 && inputs.len() > 1 && err.kind() == FailureKind::Error;
        if !splittable {
            let panicked = err.kind() == FailureKind::Panic;
            outcomes.extend(failures(err, inputs.len()));
            return panicked;
        }
        let (left, right) = inputs.split_at(inputs.len() / 2);
        let left_result = forward_checked(model, left);
        if let Err(err) = &left_result
            && err.kind() == FailureKind::Panic
        {
            outcomes.extend(failures(err.clone(), inputs.len()));
            return true;
        }
        let right_result = forward_checked(model, right);
        let mut panicked = matches!(&right_result, Err(err) if err.kind() == FailureKind::Panic);
        let both_failed = left_result.is_err() && right_result.is_err();
        let descend = if both_failed {
            // What descending costs: each half that can still split runs
            // its own two halves.
            let cost = [left, right]
                .iter()
                .filter(|half| half.len() > 1)
                .count()
                .saturating_mul(2);
            let affordable = cost <= self.both_failed_budget;
            let descend = !both_failed_above && affordable;
            if descend {
                self.both_failed_budget = self.both_failed_budget.saturating_sub(cost);
            } else if cost > 0 {
                self.systemic = true;
            }
            descend
        } else {
            true
        };
        for (half, result) in [(left, left_result), (right, right_result)] {
            match result {
                Ok(outputs) => outcomes.extend(outputs.into_iter().map(Ok)),
                Err(err) if panicked || !descend => {
                    panicked |= err.kind() == FailureKind::Panic;
                    outcomes.extend(failures(err, half.len()));
                }
                Err(err) => {
                    let depth = depth.saturating_sub(1);
                    panicked = self.isolate(model, half, err, depth, both_failed, outcomes);
                }
            }
        }
        panicked
    }
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
    match catch(|| model.forward(inputs)) {
        Ok(Ok(outputs)) if outputs.len() == inputs.len() => Ok(outputs),
        Ok(Ok(outputs)) => {
            let kind = FailureKind::OutputCount {
                expected: inputs.len(),
                actual: outputs.len(),
            };
            drop_contained(outputs, "the outputs of a failed batch");
            Err(ModelFailed::new(kind, "wrong number of outputs"))
        }
        Ok(Err(err)) => Err(ModelFailed::new(FailureKind::Error, err)),
        Err(message) => {
            tracing::error!(%message, "model panicked in forward; reloading the replica");
            Err(ModelFailed::new(FailureKind::Panic, message))
        }
    }
}

/// Runs `f`, turning a panic into an error.
fn guard<T>(f: impl FnOnce() -> Result<T, BoxError>) -> Result<T, BoxError> {
    catch(f).unwrap_or_else(|message| Err(format!("panicked: {message}").into()))
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
                .saturating_mul(1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX))
                .min(self.max),
        }
    }
}
