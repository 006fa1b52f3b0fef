//! What every handle of one pool and its watchdog share.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use super::board::{Board, Job};
use crate::contain::{drop_contained, lock};

/// Starts the thread of replica `index`, taking its jobs from the receiver.
pub(super) type Spawn<I, O> =
    dyn Fn(usize, mpsc::Receiver<Job<I, O>>) -> std::io::Result<()> + Send + Sync;

pub(super) struct Shared<I, O> {
    /// One channel per replica; dropping the last handle stops the threads.
    pub(super) jobs: Vec<Mutex<mpsc::Sender<Job<I, O>>>>,
    pub(super) board: Arc<Board<I, O>>,
    /// Starts the thread of a replica; the watchdog uses it to replace one.
    pub(super) spawn: Box<Spawn<I, O>>,
}

impl<I, O> Shared<I, O> {
    /// Hands `job` to replica `index`. A send fails only if the replica
    /// thread is gone: the job is dropped, contained and outside the lock
    /// (its inputs' `Drop` is user code), and its future answers `Closed`.
    pub(super) fn send(&self, index: usize, job: Job<I, O>) {
        let sent = lock(&self.jobs[index]).send(job);
        if let Err(mpsc::SendError(job)) = sent {
            drop_contained(job, "a batch no replica thread took");
        }
    }
}
