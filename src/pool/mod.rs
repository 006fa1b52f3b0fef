// Counts, costs and times here come from callers and run for months:
// every operation that could overflow says how it saturates.
#![warn(clippy::arithmetic_side_effects)]
//! A pool of model replicas over a list of candle devices.
//!
//! [`Pool`] starts `replicas_per_device` replicas on every device of a
//! [`PoolConfig`]. Each replica is a dedicated OS thread that loads its own
//! model through the [`Loader`] (all replicas load in parallel), warms it up,
//! and then runs one batch at a time. Model compute never runs on a tokio
//! worker thread.
//!
//! The pool is a `tower::Service<Vec<I>>` that answers with one
//! `Result<O, ModelFailed>` per input. Its `poll_ready`
//! is `Ready` when some replica is idle, and reserves that replica for
//! the following `call`, so a batching layer above it forms a batch only when
//! there is a replica to run it.
//!
//! One exception makes a saturated pool run batches back to back: while the
//! batcher says its next batch is full ([`Pool::staging`]), `poll_ready` is
//! also `Ready` when every replica is busy but the pool's *stage* has room
//! (one place per replica). A staged batch is run by the first replica to
//! free, straight from its own thread, so no wake-up of the batcher and no
//! new batch formation sits between two batches. A full batch cannot grow
//! by waiting, so staging it early costs it nothing; a batch that is not full
//! when the batcher asks is not staged (only requests cancelled in between
//! can shrink one), and keeps gathering requests in the batcher's queue.
//!
//! # Failures
//!
//! * A model error fails that batch's requests with [`ModelFailed`], and the
//!   replica goes on serving. Under the default [`FailurePolicy::Bisect`], the
//!   batch is split and re-run so that only the poisoned inputs fail.
//! * A model that returns the wrong number of outputs fails that batch with
//!   [`FailureKind::OutputCount`]; outputs are never silently matched up.
//! * A panic in `forward` fails that batch with [`FailureKind::Panic`]; the
//!   replica drops its model and reloads it while the others keep serving.
//! * A failed or panicking `load` or warm-up is retried with exponential
//!   [`Backoff`]; a load error marked [`Unrecoverable`] fails the replica for
//!   good at once. A device this build cannot run fails [`Pool::new`].
//! * A batch that outruns the [stall timeout](PoolConfig::stall_timeout) is
//!   answered with [`FailureKind::Stalled`] and its replica replaced, until
//!   [`max_stuck_threads`](PoolConfig::max_stuck_threads) of its threads are
//!   stuck; then it fails for good.
//! * Once every replica failed for good, `poll_ready` fails with
//!   [`Closed`] naming why: nothing waits on a pool that cannot serve, and
//!   staged batches are answered with [`Closed`].
//! * A staged batch does not depend on any one replica: it waits through a
//!   reload or a stall replacement and runs on whichever replica frees first.
//!
//! # Examples
//!
//! ```
//! use candle_core::{Device, DeviceLocation};
//! use candlewick::BoxError;
//! use candlewick::pool::{Pool, PoolConfig};
//! use tower::{Service, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let loader = |_: &Device| -> Result<_, BoxError> {
//!     Ok(|batch: &[u32]| -> Result<Vec<u32>, BoxError> { Ok(batch.iter().map(|x| x * 2).collect()) })
//! };
//! let config = PoolConfig::default().with_devices(vec![DeviceLocation::Cpu]);
//! let mut pool = Pool::new(loader, config)?;
//! let outputs = pool.ready().await?.call(vec![1, 2, 3]).await?;
//! assert_eq!(outputs, vec![Ok(2), Ok(4), Ok(6)]);
//! # Ok(())
//! # }
//! ```
//!
//! [`ModelFailed`]: crate::error::ModelFailed
//! [`FailureKind::OutputCount`]: crate::error::FailureKind::OutputCount
//! [`FailureKind::Panic`]: crate::error::FailureKind::Panic
//! [`FailureKind::Stalled`]: crate::error::FailureKind::Stalled
//! [`Loader`]: crate::Loader
//! [`Unrecoverable`]: crate::error::Unrecoverable
//! [`Closed`]: crate::error::Closed

mod board;
pub mod future;
mod metrics;
mod replica;
mod service;
mod shared;
mod watchdog;

use std::num::NonZeroUsize;
use std::time::Duration;

use candle_core::DeviceLocation;

pub use board::{PoolStatus, Staging};
pub use replica::Backoff;
pub use service::Pool;

/// Where and how many replicas a [`Pool`] runs.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default))]
#[non_exhaustive]
pub struct PoolConfig {
    /// The devices to place replicas on. Default: the CPU.
    #[cfg_attr(feature = "serde", serde(with = "crate::device::serde_locations"))]
    pub devices: Vec<DeviceLocation>,
    /// Replicas on each device. Default: 1.
    pub replicas_per_device: NonZeroUsize,
    /// For replicas on the CPU: the number of threads candle's kernels may use
    /// in each replica, on a rayon pool of the replica's own. `None` shares
    /// rayon's global pool between all replicas. Default: `None`. GPU
    /// replicas ignore it.
    ///
    /// On a machine with N cores, N replicas of one thread each usually serve
    /// more than one replica of N threads, because small kernels scale poorly
    /// across threads and replicas no longer contend for one pool.
    ///
    /// candle must be told too: it splits each kernel for the thread count it
    /// reads from the environment, not for the pool it runs on. Start the
    /// process with `RAYON_NUM_THREADS` and `CANDLE_NUM_THREADS` set to this
    /// value, or call [`align_candle_threads`](crate::device::align_candle_threads)
    /// first thing in `main`; the generated Kubernetes Deployment sets them.
    /// A pool that finds them disagreeing logs a warning and reports it in
    /// [`ReplicaStatus::cpu_threads`].
    pub cpu_threads_per_replica: Option<NonZeroUsize>,
    /// The scheduling priority of CPU replicas' compute threads. Default:
    /// [`ComputePriority::Background`], so that a saturated model never
    /// starves the threads that parse requests, answer probes and reject
    /// overload.
    pub compute_priority: ComputePriority,
    /// Delay between reload attempts of a failed replica.
    pub restart_backoff: Backoff,
    /// What a model error does to the rest of its batch. Default: bisect up to
    /// 6 levels deep, which isolates one poisoned input in a batch of 64.
    pub failure_policy: FailurePolicy,
    /// A batch running longer than this is answered with
    /// [`FailureKind::Stalled`](crate::error::FailureKind::Stalled) and its replica replaced by a fresh one. `None`
    /// disables the watchdog; zero is refused ([`PoolError::Invalid`]).
    /// Default: 60 s.
    ///
    /// The stuck thread cannot be interrupted: it keeps its model, and its
    /// device memory, until `forward` returns, and then exits. See
    /// [`max_stuck_threads`](Self::max_stuck_threads).
    pub stall_timeout: Option<Duration>,
    /// How many of a replica's threads may be stuck in `forward` at once
    /// before it is no longer replaced. Default: 2.
    ///
    /// Each stuck thread keeps its model, and on a GPU its device memory, so
    /// replacing a replica that hangs again and again would end in an
    /// out-of-memory crash. Once this many of its threads are stuck, the
    /// replica fails for good instead: health reports the service not live,
    /// naming the replica, so the orchestrator restarts the process and the
    /// memory comes back. At most `replicas × max_stuck_threads` stuck models
    /// exist at any time. 1 means a replica is never replaced after a stall.
    pub max_stuck_threads: NonZeroUsize,
    /// How long a replica that just answered a batch polls for its next one
    /// before it blocks. Default: 100 µs.
    ///
    /// Under load the batcher hands a freed replica its next batch within
    /// microseconds, but waking a blocked thread costs tens of them, idle
    /// device time paid on every batch. Polling yields the core between
    /// polls, and a replica polls only while its previous hand-off came
    /// within this time, so at light load it blocks at once and burns no
    /// CPU. `Duration::ZERO` always blocks; a value longer than the gaps
    /// between batches keeps an idle replica polling, a core's worth of
    /// yields.
    pub handoff_spin: Duration,
}

/// How CPU replicas' compute threads are scheduled against the rest of the
/// process (and of the container).
///
/// The scheduler is work-conserving either way: with nothing else to run,
/// background threads get every core, so throughput does not change; what
/// changes is who waits when I/O threads want a core at the same instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum ComputePriority {
    /// The same priority as every other thread.
    Normal,
    /// Below the I/O threads: on Unix, the lowest niceness (19), which needs
    /// no privileges. Where it cannot be set, the replica logs why and runs
    /// at normal priority. (`SCHED_BATCH` was measured too: it cost
    /// multi-threaded replicas 12 % of their throughput, by delaying the
    /// wake-ups their kernels synchronise on; niceness alone costs nothing.)
    #[default]
    Background,
}

/// What a model error does to the rest of its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Every request of the batch fails with the model's error.
    FailBatch,
    /// The failed batch is split in halves and each half re-run, recursively,
    /// so that a poisoned input fails alone and the others get their outputs.
    /// A batch of n with one poisoned input costs 2·⌈log2 n⌉ extra forward
    /// passes; `max_depth` bounds them. A failure that looks systemic (both
    /// halves fail, and both halves of a half fail again, or splitting on
    /// would cost more than isolating one poisoned input) stops the
    /// splitting: a batch whose every input fails, as on a lost device,
    /// costs no more forward passes than isolating one poisoned input, and
    /// counts in `candlewick_batch_systemic_failures_total`. Panics are not
    /// retried (the model is reloaded instead), nor are wrong output counts
    /// (a model bug).
    Bisect {
        /// How many times a batch may be halved.
        max_depth: u32,
    },
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self::Bisect { max_depth: 6 }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            devices: vec![DeviceLocation::Cpu],
            replicas_per_device: NonZeroUsize::MIN,
            cpu_threads_per_replica: None,
            compute_priority: ComputePriority::default(),
            restart_backoff: Backoff::default(),
            failure_policy: FailurePolicy::default(),
            stall_timeout: Some(Duration::from_secs(60)),
            max_stuck_threads: NonZeroUsize::new(2).expect("nonzero"),
            handoff_spin: Duration::from_micros(100),
        }
    }
}

impl PoolConfig {
    /// Sets [`devices`](Self::devices).
    pub fn with_devices(mut self, devices: Vec<DeviceLocation>) -> Self {
        self.devices = devices;
        self
    }

    /// Sets [`replicas_per_device`](Self::replicas_per_device).
    pub fn with_replicas_per_device(mut self, replicas: NonZeroUsize) -> Self {
        self.replicas_per_device = replicas;
        self
    }

    /// Sets [`cpu_threads_per_replica`](Self::cpu_threads_per_replica).
    pub fn with_cpu_threads_per_replica(mut self, threads: Option<NonZeroUsize>) -> Self {
        self.cpu_threads_per_replica = threads;
        self
    }

    /// Sets [`compute_priority`](Self::compute_priority).
    pub fn with_compute_priority(mut self, priority: ComputePriority) -> Self {
        self.compute_priority = priority;
        self
    }

    /// Sets [`restart_backoff`](Self::restart_backoff).
    pub fn with_restart_backoff(mut self, backoff: Backoff) -> Self {
        self.restart_backoff = backoff;
        self
    }

    /// Sets [`failure_policy`](Self::failure_policy).
    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.failure_policy = policy;
        self
    }

    /// Sets [`stall_timeout`](Self::stall_timeout).
    pub fn with_stall_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.stall_timeout = timeout;
        self
    }

    /// Sets [`max_stuck_threads`](Self::max_stuck_threads).
    pub fn with_max_stuck_threads(mut self, threads: NonZeroUsize) -> Self {
        self.max_stuck_threads = threads;
        self
    }

    /// Sets [`handoff_spin`](Self::handoff_spin).
    pub fn with_handoff_spin(mut self, spin: Duration) -> Self {
        self.handoff_spin = spin;
        self
    }

    /// The total number of replicas: devices × replicas per device.
    pub fn replicas(&self) -> usize {
        self.devices
            .len()
            .saturating_mul(self.replicas_per_device.get())
    }
}

/// What a replica is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplicaState {
    /// Loading its model.
    Loading,
    /// Running the model's warm-up inputs.
    WarmingUp,
    /// Waiting for a batch.
    Idle,
    /// Running a batch.
    Busy,
    /// The last load failed; it will be retried.
    Failed,
    /// Dropping its model after a failure, or waiting out the back-off
    /// before reloading.
    Restarting,
    /// Its batch outran the stall timeout; a replacement is starting (or,
    /// past [`max_stuck_threads`](PoolConfig::max_stuck_threads), it failed
    /// for good).
    Stalled,
}

impl ReplicaState {
    const ALL: [ReplicaState; 7] = [
        Self::Loading,
        Self::WarmingUp,
        Self::Idle,
        Self::Busy,
        Self::Failed,
        Self::Restarting,
        Self::Stalled,
    ];

    /// Whether a replica in this state takes batches: idle or busy.
    pub fn is_serving(self) -> bool {
        matches!(self, Self::Idle | Self::Busy)
    }

    /// The lowercase name used in probe bodies and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loading => "loading",
            Self::WarmingUp => "warming_up",
            Self::Idle => "idle",
            Self::Busy => "busy",
            Self::Failed => "failed",
            Self::Restarting => "restarting",
            Self::Stalled => "stalled",
        }
    }
}

/// A snapshot of one replica.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ReplicaStatus {
    /// The device the replica runs on.
    pub device: DeviceLocation,
    /// What it is doing now.
    pub state: ReplicaState,
    /// How often its model was reloaded after a panic.
    pub restarts: u64,
    /// How long its last successful load took.
    pub load_time: Option<Duration>,
    /// How long its last warm-up took.
    pub warmup_time: Option<Duration>,
    /// How often one of its batches stalled.
    pub stalls: u64,
    /// Its threads still stuck in a stalled `forward`, each holding a model.
    pub stuck_threads: usize,
    /// How often loading its model failed.
    pub load_failures: u64,
    /// Whether it stopped trying for good: its thread could not set up, its
    /// loader reported an [`Unrecoverable`](crate::error::Unrecoverable)
    /// error, or too many of its threads are stuck. See
    /// [`last_error`](Self::last_error).
    pub failed_for_good: bool,
    /// Why its last load failed, or why it failed for good.
    pub last_error: Option<String>,
    /// For a CPU replica confined to a thread pool of its own: that pool's
    /// size against the threads candle splits its kernels for.
    pub cpu_threads: Option<CpuThreads>,
}

/// The parallelism a CPU replica was given (a rayon pool of its own, see
/// [`PoolConfig::cpu_threads_per_replica`]) against the parallelism candle
/// computes at ([`candle_cpu_threads`](crate::device::candle_cpu_threads)).
/// They must agree for the replica to compute at the parallelism it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CpuThreads {
    /// The threads of the replica's own pool.
    pub replica: usize,
    /// The threads candle splits each matrix multiply for.
    pub candle: usize,
}

impl CpuThreads {
    /// Whether candle computes at the replica's parallelism.
    pub fn is_aligned(&self) -> bool {
        self.replica == self.candle
    }

    /// What a mismatch costs and how to fix it; `None` when aligned.
    pub fn warning(&self) -> Option<String> {
        let Self { replica, candle } = *self;
        (!self.is_aligned()).then(|| {
            format!(
                "candle splits each matrix multiply for {candle} threads but this replica's \
                 pool has {replica}, so its kernels oversubscribe the pool and contend with \
                 other replicas (measured: 0.55-0.66x the throughput on 2 vCPUs); start the \
                 process with RAYON_NUM_THREADS={replica} CANDLE_NUM_THREADS={replica}, or call \
                 candlewick::device::align_candle_threads first thing in main"
            )
        })
    }
}

impl ReplicaStatus {
    fn new(device: DeviceLocation) -> Self {
        Self {
            device,
            state: ReplicaState::Loading,
            restarts: 0,
            load_time: None,
            warmup_time: None,
            stalls: 0,
            stuck_threads: 0,
            load_failures: 0,
            failed_for_good: false,
            last_error: None,
            cpu_threads: None,
        }
    }
}

/// Errors building a [`Pool`].
#[derive(Debug)]
#[non_exhaustive]
pub enum PoolError {
    /// The configuration names no device.
    NoDevices,
    /// A configured device cannot exist in this build, such as `cuda:0`
    /// without the `cuda` feature.
    DeviceUnsupported {
        /// The device.
        device: DeviceLocation,
        /// Why it cannot be used.
        reason: &'static str,
    },
    /// The stall watchdog's thread could not be started.
    Watchdog(std::io::Error),
    /// A setting cannot work, such as a zero stall timeout (every batch
    /// would count as stalled the moment it starts).
    Invalid {
        /// The setting.
        setting: &'static str,
        /// What it must be.
        reason: &'static str,
    },
    /// A replica thread could not be started.
    Spawn {
        /// The index of the replica.
        replica: usize,
        /// The error from the operating system.
        source: std::io::Error,
    },
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoDevices => f.write_str("the pool configuration names no device"),
            Self::DeviceUnsupported { device, reason } => write!(
                f,
                "cannot run replicas on {}: {reason}",
                crate::device::format_location(*device)
            ),
            Self::Invalid { setting, reason } => write!(f, "invalid `{setting}`: {reason}"),
            Self::Watchdog(_) => f.write_str("cannot start the stall watchdog's thread"),
            Self::Spawn { replica, .. } => {
                write!(f, "cannot start the thread of replica {replica}")
            }
        }
    }
}

impl std::error::Error for PoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::NoDevices | Self::DeviceUnsupported { .. } | Self::Invalid { .. } => None,
            Self::Watchdog(source) => Some(source),
            Self::Spawn { source, .. } => Some(source),
        }
    }
}
