//! Health: started, ready and live, each answered with a reason.
//!
//! Orchestrators ask three different questions, and each has its own answer:
//!
//! * **started** — every configured replica has loaded and warmed up once, or
//!   has failed to load [`startup_failures`](HealthConfig::startup_failures)
//!   times. Until then, readiness and liveness are not asked.
//! * **ready** — started, at least
//!   [`min_ready_replicas`](HealthConfig::min_ready_replicas) replicas can take
//!   batches, and the service is not draining.
//! * **live** — false only when a restart would help: no replica has been able
//!   to serve for [`dead_after`](HealthConfig::dead_after), a replica failed
//!   for good (its device cannot be opened, its loader reported an
//!   unrecoverable error, or too many of its threads are stuck holding
//!   models), or the batching worker stopped outside a shutdown. Never false because the queue is full
//!   or batches are long: a busy pod is not a dead pod.
//!
//! A [`Health`] answers from state that the pool and the batcher keep up to
//! date; it never waits behind model work. [`ProbeService`] serves the three
//! answers over HTTP.
//!
//! # Examples
//!
//! ```
//! use candle_core::Device;
//! use candlewick::{BoxError, Serving, ServingConfig};
//! use candlewick::health::HealthState;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let loader = |_: &Device| -> Result<_, BoxError> {
//!     Ok(|batch: &[u8]| -> Result<Vec<u8>, BoxError> { Ok(batch.to_vec()) })
//! };
//! let serving = Serving::start(loader, ServingConfig::default())?;
//! let health = serving.health();
//! let mut watch = health.watch();
//! while !health.ready().ok {
//!     watch.changed().await;
//! }
//! assert_eq!(health.report().state, HealthState::Ready);
//! # Ok(())
//! # }
//! ```

#[cfg(feature = "admin")]
mod admin;
mod probe;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

#[cfg(feature = "admin")]
#[cfg_attr(docsrs, doc(cfg(feature = "admin")))]
pub use admin::{AdminBuilder, AdminServer, listen};
pub use probe::{ProbePaths, ProbeService};

use crate::ModelInfo;
use crate::batch::BatchStatus;
use crate::contain::lock;
use crate::pool::{PoolStatus, ReplicaStatus};

/// Thresholds of the health state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default))]
#[non_exhaustive]
pub struct HealthConfig {
    /// Replicas that must be able to serve for the service to be ready.
    /// Default: 1; 0 counts as 1 (a service with no replica serving is never
    /// ready).
    pub min_ready_replicas: usize,
    /// Failed loads after which a replica that never loaded counts as settled
    /// for `started`, so one bad device cannot hold startup forever.
    /// Default: 3.
    pub startup_failures: u64,
    /// How long no replica may be able to serve, once started, before the
    /// service reports itself not live. Default: 60 s.
    pub dead_after: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            min_ready_replicas: 1,
            startup_failures: 3,
            dead_after: Duration::from_secs(60),
        }
    }
}

impl HealthConfig {
    /// Sets [`min_ready_replicas`](Self::min_ready_replicas).
    pub fn with_min_ready_replicas(mut self, replicas: usize) -> Self {
        self.min_ready_replicas = replicas;
        self
    }

    /// Sets [`startup_failures`](Self::startup_failures).
    pub fn with_startup_failures(mut self, failures: u64) -> Self {
        self.startup_failures = failures;
        self
    }

    /// Sets [`dead_after`](Self::dead_after).
    pub fn with_dead_after(mut self, after: Duration) -> Self {
        self.dead_after = after;
        self
    }
}

/// The overall state of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HealthState {
    /// Replicas are still loading.
    Starting,
    /// Every replica can serve.
    Ready,
    /// Ready, with some replicas down.
    Degraded,
    /// Started, but too few replicas can serve.
    NotReady,
    /// Shutting down: finishing queued work, taking none.
    Draining,
    /// Shut down.
    Stopped,
    /// No replica has been able to serve for too long: restart the process.
    Dead,
}

impl HealthState {
    const ALL: [HealthState; 7] = [
        Self::Starting,
        Self::Ready,
        Self::Degraded,
        Self::NotReady,
        Self::Draining,
        Self::Stopped,
        Self::Dead,
    ];

    /// The lowercase name used in probe bodies and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Degraded => "degraded",
            Self::NotReady => "not_ready",
            Self::Draining => "draining",
            Self::Stopped => "stopped",
            Self::Dead => "dead",
        }
    }
}

impl fmt::Display for HealthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer to one health question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Whether the check passes.
    pub ok: bool,
    /// Why, in a few words.
    pub reason: String,
}

impl Check {
    fn new(ok: bool, reason: impl Into<String>) -> Self {
        Self {
            ok,
            reason: reason.into(),
        }
    }
}

/// Everything health knows at one instant.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HealthReport {
    /// The overall state.
    pub state: HealthState,
    /// Has the service started?
    pub started: Check,
    /// May it take traffic?
    pub ready: Check,
    /// Should it be left running?
    pub live: Check,
    /// Every replica.
    pub replicas: Vec<ReplicaStatus>,
}

/// Where the service's lifecycle stands: what a shutdown sets (see
/// [`Health::set_lifecycle`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lifecycle {
    /// Serving; the default.
    #[default]
    Running,
    /// A shutdown began: not ready, still live, finishing accepted work.
    Draining,
    /// The shutdown finished.
    Stopped,
}

/// The health of one serving stack. Cheap to clone; see the
/// [module docs](self).
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    config: HealthConfig,
    pool: PoolStatus,
    batch: Mutex<Option<BatchStatus>>,
    /// The lifecycle, and its watchers.
    lifecycle: watch::Sender<Lifecycle>,
}

impl fmt::Debug for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Health")
            .field("config", &self.inner.config)
            .field("state", &self.report().state)
            .finish()
    }
}

impl Health {
    /// The health of the replicas `pool` reports (see
    /// [`Pool::status`](crate::pool::Pool::status)). Holds no handle that
    /// keeps the pool running.
    pub fn new(config: HealthConfig, pool: PoolStatus) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                pool,
                batch: Mutex::new(None),
                lifecycle: watch::channel(Lifecycle::Running).0,
            }),
        }
    }

    /// Also watches the batching worker `batch` reports (see
    /// [`Batch::status`](crate::batch::Batch::status)): outside a shutdown,
    /// a stopped worker answers nothing again, so the service is not live.
    /// Every clone of this health watches it, in place of the batcher
    /// watched before.
    pub fn watch_batch(&self, batch: BatchStatus) {
        *lock(&self.inner.batch) = Some(batch);
    }

    /// Moves the lifecycle on: [`Lifecycle::Draining`] when a shutdown begins
    /// (readiness turns off at once), [`Lifecycle::Stopped`] when it ends.
    /// [`Serving::shutdown`](crate::Serving::shutdown) does both.
    pub fn set_lifecycle(&self, lifecycle: Lifecycle) {
        self.inner.lifecycle.send_replace(lifecycle);
    }

    /// Where the lifecycle stands.
    pub fn lifecycle(&self) -> Lifecycle {
        *self.inner.lifecycle.borrow()
    }

    fn batcher_stopped(&self) -> bool {
        lock(&self.inner.batch)
            .as_ref()
            .is_some_and(BatchStatus::is_stopped)
    }

    /// The thresholds this health runs with.
    pub fn config(&self) -> &HealthConfig {
        &self.inner.config
    }

    /// Has every replica loaded and warmed up (or failed for good)?
    pub fn started(&self) -> Check {
        self.report().started
    }

    /// May the service take traffic?
    pub fn ready(&self) -> Check {
        self.report().ready
    }

    /// Should the service be left running (true) or restarted (false)?
    pub fn live(&self) -> Check {
        self.report().live
    }

    /// The longest load plus warm-up time of any replica so far, the measured
    /// startup budget; `None` until a replica has loaded.
    pub fn startup_time(&self) -> Option<Duration> {
        self.inner
            .pool
            .replicas()
            .iter()
            .filter_map(|r| Some(r.load_time? + r.warmup_time.unwrap_or_default()))
            .max()
    }

    /// Everything health knows now.
    pub fn report(&self) -> HealthReport {
        let config = &self.inner.config;
        let (replicas, none_serving_since) = self.inner.pool.snapshot();
        let total = replicas.len();
        let serving = replicas.iter().filter(|r| r.state.is_serving()).count();
        let settled = replicas
            .iter()
            .filter(|r| {
                r.load_time.is_some()
                    || r.failed_for_good
                    || r.load_failures >= config.startup_failures
            })
            .count();

        let started = if settled == total {
            Check::new(true, format!("{settled} of {total} replicas settled"))
        } else {
            Check::new(false, format!("{settled} of {total} replicas loaded"))
        };
        let down_for = none_serving_since.map(|since| since.elapsed());
        let lifecycle = self.lifecycle();
        // A replica that failed for good never comes back, and may hold
        // memory (threads stuck with their models) that only a restart frees.
        let failed_for_good = replicas
            .iter()
            .enumerate()
            .find(|(_, r)| r.failed_for_good)
            .map(|(index, replica)| {
                format!(
                    "replica {index} ({}) failed for good: {}",
                    crate::device::format_location(replica.device),
                    replica.last_error.as_deref().unwrap_or("unknown reason")
                )
            });
        let live = match (down_for, failed_for_good) {
            (_, Some(reason)) => Check::new(false, reason),
            // Outside a shutdown, a stopped batcher answers nothing again.
            _ if lifecycle == Lifecycle::Running && self.batcher_stopped() => {
                Check::new(false, "the batching worker stopped")
            }
            (Some(down), None) if started.ok && down >= config.dead_after => Check::new(
                false,
                format!("no replica has served for {}s", down.as_secs()),
            ),
            _ => Check::new(true, format!("{serving} of {total} replicas serving")),
        };
        let enough = serving >= config.min_ready_replicas.max(1);
        let ready = match lifecycle {
            Lifecycle::Draining => Check::new(false, "draining"),
            Lifecycle::Stopped => Check::new(false, "stopped"),
            Lifecycle::Running if !live.ok => Check::new(false, live.reason.clone()),
            Lifecycle::Running if !started.ok => Check::new(false, "starting"),
            Lifecycle::Running if !enough => Check::new(
                false,
                format!(
                    "{serving} of {total} replicas serving, {} needed",
                    config.min_ready_replicas.max(1)
                ),
            ),
            Lifecycle::Running => {
                Check::new(true, format!("{serving} of {total} replicas serving"))
            }
        };
        let state = match lifecycle {
            Lifecycle::Stopped => HealthState::Stopped,
            Lifecycle::Draining => HealthState::Draining,
            Lifecycle::Running if !live.ok => HealthState::Dead,
            Lifecycle::Running if !started.ok => HealthState::Starting,
            Lifecycle::Running if !ready.ok => HealthState::NotReady,
            Lifecycle::Running if serving < total => HealthState::Degraded,
            Lifecycle::Running => HealthState::Ready,
        };
        HealthReport {
            state,
            started,
            ready,
            live,
            replicas,
        }
    }

    /// Keeps the [`HEALTH_STATE`](crate::metrics::names::HEALTH_STATE) gauges,
    /// labelled with `model`, current on the tokio runtime until every clone
    /// of this is dropped. [`Serving::start`](crate::Serving::start) calls
    /// it; a hand-built stack calls it once.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn publish_metrics(&self, model: &ModelInfo) {
        let gauges: Vec<_> = HealthState::ALL
            .iter()
            .map(|&state| {
                let labels = crate::metrics::labels(model, &[("state", state.as_str().to_owned())]);
                (
                    state,
                    metrics::gauge!(crate::metrics::names::HEALTH_STATE, labels),
                )
            })
            .collect();
        let inner = Arc::downgrade(&self.inner);
        let mut watch = self.watch();
        tokio::spawn(async move {
            let mut published = None;
            loop {
                let Some(inner) = inner.upgrade() else { return };
                let state = Health { inner }.report().state;
                if published != Some(state) {
                    for (candidate, gauge) in &gauges {
                        gauge.set(if *candidate == state { 1.0 } else { 0.0 });
                    }
                    published = Some(state);
                }
                // Liveness also changes with time alone: look again each second.
                tokio::select! {
                    () = watch.changed() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                // Coalesce bursts of replica changes (two per batch).
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }

    /// A subscription to changes of health.
    pub fn watch(&self) -> HealthWatch {
        HealthWatch {
            replicas: self.inner.pool.subscribe(),
            lifecycle: self.inner.lifecycle.subscribe(),
        }
    }
}

/// Wakes when a replica or the lifecycle changes; see [`Health::watch`].
#[derive(Debug)]
pub struct HealthWatch {
    replicas: watch::Receiver<u64>,
    lifecycle: watch::Receiver<Lifecycle>,
}

impl HealthWatch {
    /// Waits for the next change. Read the new state with
    /// [`Health::report`].
    ///
    /// Liveness also changes with time alone (after
    /// [`dead_after`](HealthConfig::dead_after)); poll
    /// [`Health::live`] for it.
    pub async fn changed(&mut self) {
        // A closed channel disables its branch; with both closed, nothing
        // will change again.
        tokio::select! {
            Ok(()) = self.replicas.changed() => {}
            Ok(()) = self.lifecycle.changed() => {}
            else => std::future::pending().await,
        }
    }
}
