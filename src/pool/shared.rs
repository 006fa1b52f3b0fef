//! What every handle of one pool and its watchdog share.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use super::board::{Board, Job};

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
