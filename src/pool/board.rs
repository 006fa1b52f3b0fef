//! What the pool's handles, its replica threads and the watchdog share: the
//! idle set, the stage, each replica's status and the batch it runs.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use candle_core::DeviceLocation;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};

use super::metrics::ReplicaMetrics;
use super::{ReplicaState, ReplicaStatus};
use crate::contain::{drop_contained, lock};
use crate::device::format_location;
use crate::error::ModelFailed;

/// Each input's own result.
pub(super) type Outcomes<O> = Vec<Result<O, ModelFailed>>;
pub(super) type Reply<O> = oneshot::Sender<Outcomes<O>>;

/// A batch handed to the pool, and where its answer goes.
pub(super) struct Batch<I, O> {
    pub(super) inputs: Vec<I>,
    pub(super) reply: Reply<O>,
    pub(super) span: tracing::Span,
}

/// One batch for a replica, under the lease of that replica.
pub(super) struct Job<I, O> {
    pub(super) batch: Batch<I, O>,
    pub(super) lease: Lease,
}

/// A replica taken off the idle set for one batch: its index and the permit
/// that counted it idle, as one value, so the two cannot diverge.
///
/// Only [`Board::next_or_idle`] puts the index back and releases the permit.
/// A lease dropped any other way (a thread that unwinds, a stuck thread
/// that was replaced) forgets its permit: the replica is not idle, and the
/// semaphore must not say it is.
pub(super) struct Lease {
    pub(super) index: usize,
    permit: Option<OwnedSemaphorePermit>,
}

impl Lease {
    pub(super) fn new(index: usize, permit: OwnedSemaphorePermit) -> Self {
        Self {
            index,
            permit: Some(permit),
        }
    }

    /// The lease of a replica that just (re)loaded: its permit does not
    /// exist yet, and is added when it first goes idle.
    pub(super) fn unheld(index: usize) -> Self {
        Self {
            index,
            permit: None,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            permit.forget();
        }
    }
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

/// A batch handed to the pool while every replica was busy: the next replica
/// to free runs it, under that replica's own lease.
pub(super) struct Staged<I, O> {
    pub(super) batch: Batch<I, O>,
    /// Its place in the stage, given back (or forgotten, if one is owed)
    /// when a replica takes it.
    pub(super) place: OwnedSemaphorePermit,
}

impl<I, O> Staged<I, O> {
    /// The job of the replica that takes this batch, and its place in the
    /// stage, to give back with [`Places::free`].
    pub(super) fn into_job(self, lease: Lease) -> (Job<I, O>, OwnedSemaphorePermit) {
        let Self { batch, place } = self;
        (Job { batch, lease }, place)
    }
}

/// Where batches wait for a replica, under one lock: a replica goes idle
/// only when nothing is staged, a batch is staged only when its caller
/// could claim no idle replica's permit, and a caller that claims one while
/// batches are staged runs the oldest of them first. (A permit held by
/// another handle's pending `poll_ready` is the exception: that handle runs
/// the staged batch when it calls, or when it is dropped.)
pub(super) struct Places<I, O> {
    /// Indices of idle replicas. Its length equals the semaphore's free
    /// permits plus the permits reserved but not yet used: an index goes in
    /// before its permit is released, and a permit leaves only with an index
    /// (as a [`Lease`]).
    pub(super) idle: Vec<usize>,
    /// Batches waiting for the next replica to free, oldest first.
    pub(super) staged: VecDeque<Staged<I, O>>,
    /// Which replicas have been ready at least once: each adds one place to
    /// the stage when it first is, and takes it away when it fails for good.
    served: Vec<bool>,
    /// Places of replicas that failed for good while every place was in
    /// use: forgotten as they come back.
    owed: usize,
}

impl<I, O> Places<I, O> {
    /// Gives a place in the stage back, or forgets it if one is owed.
    pub(super) fn free(&mut self, place: OwnedSemaphorePermit) {
        if self.pay_owed() {
            place.forget();
        }
    }

    /// Settles one owed place, if any is owed.
    fn pay_owed(&mut self) -> bool {
        let owed = self.owed > 0;
        self.owed = self.owed.saturating_sub(1);
        owed
    }
}

/// What the pool's handles, the replica threads and the watchdog share.
pub(super) struct Board<I, O> {
    pub(super) places: Mutex<Places<I, O>>,
    /// One permit per idle replica. Closed once every replica failed for good.
    pub(super) semaphore: Arc<Semaphore>,
    /// One permit per free place in the stage (a place per replica that has
    /// served; see [`Places::free`]). Closed with `semaphore`.
    pub(super) stage: Arc<Semaphore>,
    /// Set by the batcher while its next batch is full: only then does
    /// `poll_ready` offer a place in the stage. See [`Staging`].
    stage_wanted: AtomicBool,
    status: Mutex<Roster>,
    pub(super) metrics: Vec<ReplicaMetrics>,
    /// Bumped on every change of `status`, for watchers.
    pub(super) changes: watch::Sender<u64>,
    /// The slot of each replica's current thread.
    pub(super) running: Vec<Mutex<Slot<O>>>,
    /// Replica threads started and not yet ended (stuck ones included):
    /// the last to end closes the stage, since nothing else will run it.
    threads: AtomicUsize,
}

/// The replicas' statuses, and since when none of them could serve.
#[derive(Debug, Clone)]
pub(super) struct Roster {
    pub(super) replicas: Vec<ReplicaStatus>,
    pub(super) none_serving_since: Option<Instant>,
}

impl Roster {
    fn all_failed_for_good(&self) -> bool {
        self.replicas.iter().all(|r| r.failed_for_good)
    }
}

/// A view of a [`Pool`](super::Pool)'s replicas that does not keep them
/// running: what [`Health`](crate::health::Health) reads. See
/// [`Pool::status`](super::Pool::status).
#[derive(Clone)]
pub struct PoolStatus {
    board: Arc<dyn Observed>,
}

impl PoolStatus {
    pub(super) fn new<I: Send + 'static, O: Send + 'static>(board: Arc<Board<I, O>>) -> Self {
        Self { board }
    }

    /// A snapshot of every replica, in the order of the configured devices.
    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        self.board.roster().replicas
    }

    /// A snapshot of every replica, and since when none could serve (`None`
    /// while one can), read together.
    pub fn snapshot(&self) -> (Vec<ReplicaStatus>, Option<Instant>) {
        let roster = self.board.roster();
        (roster.replicas, roster.none_serving_since)
    }

    /// A receiver that sees a new value whenever a replica's status changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.board.subscribe()
    }
}

impl fmt::Debug for PoolStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolStatus")
            .field("replicas", &self.replicas())
            .finish()
    }
}

/// A batcher's line to the stage of a [`Pool`](super::Pool): see
/// [`Pool::staging`](super::Pool::staging).
#[derive(Clone)]
pub struct Staging {
    board: Arc<dyn Stage>,
}

impl Staging {
    pub(super) fn new<I: Send + 'static, O: Send + 'static>(board: Arc<Board<I, O>>) -> Self {
        Self { board }
    }

    /// Says whether the next batch the caller would hand over is full. While
    /// it is, the pool's `poll_ready` is also `Ready` when every replica is
    /// busy but the stage has room; otherwise only when a replica is idle.
    pub fn offer_full_batch(&self, full: bool) {
        self.board.want(full);
    }

    /// Whether a batch handed over now would wait in the stage: no replica
    /// is idle.
    pub fn would_stage(&self) -> bool {
        self.board.no_idle()
    }
}

impl fmt::Debug for Staging {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Staging")
            .field("would_stage", &self.would_stage())
            .finish()
    }
}

/// What a [`Staging`] does to the board, whatever its types.
trait Stage: Send + Sync {
    fn want(&self, full: bool);
    fn no_idle(&self) -> bool;
}

impl<I: Send, O: Send> Stage for Board<I, O> {
    fn want(&self, full: bool) {
        self.stage_wanted.store(full, Ordering::Release);
    }

    fn no_idle(&self) -> bool {
        lock(&self.places).idle.is_empty()
    }
}

/// What a [`PoolStatus`] reads of the board, whatever the model's output type.
trait Observed: Send + Sync {
    fn roster(&self) -> Roster;
    fn subscribe(&self) -> watch::Receiver<u64>;
}

impl<I: Send, O: Send> Observed for Board<I, O> {
    fn roster(&self) -> Roster {
        Board::roster(self)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

impl<I, O> Board<I, O> {
    /// Whether a batch waits in the stage for a replica.
    pub(super) fn has_staged(&self) -> bool {
        !lock(&self.places).staged.is_empty()
    }

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
            places: Mutex::new(Places {
                idle: Vec::with_capacity(count),
                staged: VecDeque::with_capacity(count),
                served: vec![false; count],
                owed: 0,
            }),
            semaphore: Arc::new(Semaphore::new(0)),
            stage: Arc::new(Semaphore::new(0)),
            stage_wanted: AtomicBool::new(false),
            status: Mutex::new(Roster {
                replicas,
                none_serving_since: Some(Instant::now()),
            }),
            changes: watch::channel(0).0,
            running: (0..count).map(|_| Mutex::default()).collect(),
            threads: AtomicUsize::new(0),
        }
    }

    pub(super) fn roster(&self) -> Roster {
        lock(&self.status).clone()
    }

    pub(super) fn device(&self, index: usize) -> DeviceLocation {
        lock(&self.status).replicas[index].device
    }

    /// Changes the status of replica `index`, tells the watchers, and returns
    /// what `change` returned.
    pub(super) fn update<T>(
        &self,
        index: usize,
        change: impl FnOnce(&mut ReplicaStatus) -> T,
    ) -> T {
        let result = {
            let mut roster = lock(&self.status);
            let before = roster.replicas[index].state;
            let result = change(&mut roster.replicas[index]);
            let after = roster.replicas[index].state;
            let serving = roster.replicas.iter().any(|r| r.state.is_serving());
            match (serving, roster.none_serving_since) {
                (true, _) => roster.none_serving_since = None,
                (false, None) => roster.none_serving_since = Some(Instant::now()),
                (false, Some(_)) => {}
            }
            drop(roster);
            if after != before {
                self.metrics[index].transition(Some(before), after);
            }
            result
        };
        self.changes
            .send_modify(|version| *version = version.wrapping_add(1));
        result
    }

    pub(super) fn set_state(&self, index: usize, state: ReplicaState) {
        self.update(index, |status| status.state = state);
    }

    /// Marks replica `index` failed for good, with the reason. Once every
    /// replica has, the semaphore closes: the pool reports itself unable to
    /// serve instead of letting callers wait on an empty pool.
    pub(super) fn fail_for_good(&self, index: usize, reason: &str) {
        tracing::error!(replica = index, reason, "replica failed for good");
        // Its place in the stage goes with it: a free one now, or else the
        // next to come back.
        {
            let mut places = lock(&self.places);
            if std::mem::take(&mut places.served[index]) && self.stage.forget_permits(1) == 0 {
                places.owed = places.owed.saturating_add(1);
            }
        }
        self.update(index, |status| {
            status.state = ReplicaState::Failed;
            status.failed_for_good = true;
            status.last_error = Some(reason.to_owned());
        });
        if lock(&self.status).all_failed_for_good() {
            self.semaphore.close();
            self.stage.close();
            self.close_stage();
        }
    }

    /// Counts a replica thread about to start; see [`thread_ended`](Self::thread_ended).
    pub(super) fn thread_starting(&self) {
        self.threads.fetch_add(1, Ordering::AcqRel);
    }

    /// Counts a replica thread ended (or never started); the last one
    /// closes the stage.
    pub(super) fn thread_ended(&self) {
        if self.threads.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.close_stage();
        }
    }

    /// Drops every staged batch, contained: nothing will run them, and
    /// their callers hear `Closed`.
    fn close_stage(&self) {
        let staged = std::mem::take(&mut lock(&self.places).staged);
        drop_contained(staged, "the inputs of staged batches");
    }

    /// Why no replica can serve, once every one failed for good; `None`
    /// while any replica may still serve.
    pub(super) fn unavailable(&self) -> Option<String> {
        let roster = lock(&self.status);
        if !roster.all_failed_for_good() {
            return None;
        }
        let reasons: Vec<String> = roster
            .replicas
            .iter()
            .enumerate()
            .map(|(index, r)| {
                let why = r.last_error.as_deref().unwrap_or("unknown reason");
                format!("replica {index} ({}): {why}", format_location(r.device))
            })
            .collect();
        Some(format!("no replica can serve; {}", reasons.join("; ")))
    }

    /// The slot of the current thread of replica `index`.
    pub(super) fn slot(&self, index: usize) -> MutexGuard<'_, Slot<O>> {
        lock(&self.running[index])
    }

    /// Hands replica `lease.index`, free now, the oldest staged batch, or
    /// else makes it idle, releasing the permit of its `lease` (adding one if
    /// it held none). `record` changes its status in the same update (a
    /// first load's times: started and ready together).
    pub(super) fn next_or_idle(
        &self,
        mut lease: Lease,
        record: impl FnOnce(&mut ReplicaStatus),
    ) -> Option<Job<I, O>> {
        let index = lease.index;
        let next = {
            let mut places = lock(&self.places);
            if !std::mem::replace(&mut places.served[index], true) {
                // Its place, unless it pays one owed.
                if !places.pay_owed() {
                    self.stage.add_permits(1);
                }
            }
            if let Some(staged) = places.staged.pop_front() {
                let (job, place) = staged.into_job(lease);
                places.free(place);
                Some(job)
            } else {
                // Never twice: one permit per idle replica. (The lease
                // dropped here forgets its permit; the index already has one.)
                if places.idle.contains(&index) {
                    tracing::error!(replica = index, "replica made idle twice; ignored");
                    return None;
                }
                places.idle.push(index);
                // Released under the lock: a caller staging a batch sees
                // either this permit or, after it, a replica that looks
                // at the stage first.
                match lease.permit.take() {
                    Some(permit) => drop(permit),
                    None => self.semaphore.add_permits(1),
                }
                None
            }
        };
        self.update(index, |status| {
            record(status);
            if next.is_none() {
                status.state = ReplicaState::Idle;
            }
        });
        next
    }

    /// Whether the batcher's next batch is full; see [`Staging`].
    pub(super) fn stage_wanted(&self) -> bool {
        self.stage_wanted.load(Ordering::Acquire)
    }
}
