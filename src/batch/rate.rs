//! The service-rate estimate behind predictive shedding and Retry-After.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::contain::duration_at_rate;

/// A running estimate of how fast the service works off queued cost: cost
/// completed per second of *busy* time (while a batch runs or requests wait),
/// over the last [`WINDOW`](Self::WINDOW) batches.
///
/// Counting busy time rather than batch latency measures the whole service,
/// however many batches overlap, including the hand-off between batches, and
/// ignores idle gaps between bursts.
#[derive(Debug)]
pub(super) struct ServiceRate {
    running: usize,
    busy_since: Option<Instant>,
    /// Busy time and completed cost so far.
    busy: Duration,
    cost: u64,
    /// `(busy, cost)` as they stood at recent completions, oldest first.
    history: VecDeque<(Duration, u64)>,
}

impl ServiceRate {
    const WINDOW: usize = 32;

    pub(super) fn new() -> Self {
        Self {
            running: 0,
            busy_since: None,
            busy: Duration::ZERO,
            cost: 0,
            history: VecDeque::from([(Duration::ZERO, 0)]),
        }
    }

    /// A batch was dispatched at `now`.
    pub(super) fn started(&mut self, now: Instant) {
        if self.busy_since.is_none() {
            self.busy_since = Some(now);
        }
        self.running = self.running.saturating_add(1);
    }

    /// A batch of `cost` finished at `now`; `queued` tells whether requests
    /// are waiting, in which case the service stays busy.
    pub(super) fn finished(&mut self, now: Instant, cost: usize, queued: bool) {
        self.running = self.running.saturating_sub(1);
        if let Some(since) = self.busy_since {
            self.busy = self
                .busy
                .saturating_add(now.saturating_duration_since(since));
            self.busy_since = (self.running > 0 || queued).then_some(now);
        }
        self.cost = self.cost.saturating_add(cost as u64);
        if self.history.len() > Self::WINDOW {
            self.history.pop_front();
        }
        self.history.push_back((self.busy, self.cost));
    }

    /// Cost units served per second of busy time, once measured.
    pub(super) fn per_second(&self) -> Option<f64> {
        let (busy_then, cost_then) = *self.history.front()?;
        let busy = self.busy.saturating_sub(busy_then).as_secs_f64();
        let cost = self.cost.saturating_sub(cost_then);
        (busy > 0.0 && cost > 0).then(|| cost as f64 / busy)
    }

    /// How long `cost` units of queued work take to serve, once measured.
    pub(super) fn time_for(&self, cost: usize) -> Option<Duration> {
        let rate = self.per_second()?;
        Some(duration_at_rate(cost as f64, rate))
    }
}
