//! The stall watchdog: a thread that answers batches running past the stall
//! timeout and replaces their replicas, or fails a replica for good once too
//! many of its threads are stuck.

use std::num::NonZeroUsize;
use std::sync::Weak;
use std::sync::mpsc;
use std::time::Duration;

use super::board::Slot;
use super::shared::Shared;
use super::{PoolError, ReplicaState, replica};
use crate::contain::lock;
use crate::error::{FailureKind, ModelFailed};

/// Starts the thread that answers stalled batches and replaces their replicas.
pub(super) fn start<I, O>(
    shared: Weak<Shared<I, O>>,
    timeout: Duration,
    max_stuck: NonZeroUsize,
) -> Result<(), PoolError>
where
    I: Send + 'static,
    O: Send + 'static,
{
    // (`checked_div` only to satisfy the crate's arithmetic lint.)
    let tick = (timeout.checked_div(4).unwrap_or_default())
        .clamp(Duration::from_millis(1), Duration::from_secs(1));
    std::thread::Builder::new()
        .name("candlewick-watchdog".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(tick);
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                for index in 0..shared.jobs.len() {
                    replace_if_stalled(&shared, index, timeout, max_stuck);
                }
            }
        })
        .map(drop)
        .map_err(PoolError::Watchdog)
}

fn replace_if_stalled<I, O>(
    shared: &Shared<I, O>,
    index: usize,
    timeout: Duration,
    max_stuck: NonZeroUsize,
) {
    let (size, reply, stuck) = {
        let mut slot = shared.board.slot(index);
        let mut running = lock(&slot);
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
        // Counted under the slot's lock: the stuck thread, if it returns
        // now, finds its reply gone only after this, so its own decrement
        // always comes later. Recorded before answering, so that callers
        // see the stall in health.
        let stuck = shared.board.update(index, |status| {
            status.state = ReplicaState::Stalled;
            status.stalls = status.stalls.saturating_add(1);
            status.stuck_threads = status.stuck_threads.saturating_add(1);
            status.stuck_threads
        });
        drop(running);
        // The replacement publishes its batches in a slot of its own.
        *slot = Slot::default();
        (size, reply, stuck)
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
    // Each stuck thread holds a model; another would only add one more.
    let give_up = stuck >= max_stuck.get();
    if give_up {
        let reason = format!(
            "{stuck} of its threads are stuck in forward past the stall timeout of \
             {timeout:?}, each holding a model; not replaced again"
        );
        shared.board.fail_for_good(index, &reason);
    }
    let _ = reply.send(replica::failures(err, size).collect());
    if give_up {
        return;
    }
    // The stuck thread keeps its model until `forward` returns, then retires.
    // Its replacement's channel goes in before the replacement starts: once
    // it is idle, jobs for this index must reach it.
    let (tx, rx) = mpsc::channel();
    *lock(&shared.jobs[index]) = tx;
    if let Err(err) = (shared.spawn)(index, rx) {
        let reason = format!("cannot start a replacement thread: {err}");
        shared.board.fail_for_good(index, &reason);
    }
}
