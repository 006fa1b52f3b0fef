//! The cost model behind predictive shedding, `TooLarge` and Retry-After:
//! what a batch costs in time, measured online.
//!
//! A batch of cost `c` takes `fixed + per_cost · c` (a kernel launch, a
//! forward pass's overhead, then the work itself), fit by least squares over
//! the last [`WINDOW`](CostModel::WINDOW) batches. Work of `n` inputs and
//! cost `C` then takes as many batches as `n` and `C` need under the batch
//! limits, spread over as many replicas as were seen working at once. So a
//! queue of long inputs is not priced at the rate short ones were served at,
//! nor short ones at the rate of long ones, and padding is counted at the
//! share the recent batches wasted.
//!
//! Where the measurements cannot tell (every batch cost about the same), the
//! model leans optimistic and prices every batch at the recent average,
//! whatever its size: a wrong guess then admits a request that waits
//! somewhat longer, rather than refusing one that would have been served.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::BatchConfig;
use crate::contain::duration_at_rate;

/// One finished batch.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// The batch's cost as the batcher counts it (padded in padded mode).
    cost: f64,
    /// The sum of its inputs' own costs.
    raw: f64,
    /// Its number of inputs.
    items: f64,
    /// Dispatch to answer, in seconds.
    seconds: f64,
    /// When it was dispatched and answered.
    started: Instant,
    ended: Instant,
    /// Batches running when it started, itself included.
    parallel: usize,
}

/// A batch of `n` inputs takes `fixed + per_item · n` seconds, on each of
/// `replicas`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Pace {
    pub(super) fixed: f64,
    pub(super) per_item: f64,
    pub(super) replicas: usize,
}

impl Pace {
    /// The smallest batch that keeps up with `rate` arrivals per second
    /// with a quarter to spare (the rate is a noisy estimate, and a queue
    /// run near its capacity waits long), if any does: `replicas · n /
    /// (fixed + per_item · n) ≥ 1.25 · rate`.
    pub(super) fn batch_for(&self, rate: f64) -> Option<f64> {
        let demand = 1.25 * rate;
        let room = self.replicas as f64 - demand * self.per_item;
        (room > 0.0).then(|| (demand * self.fixed / room).ceil())
    }
}

/// `seconds = fixed + per_cost · cost`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Fit {
    fixed: f64,
    per_cost: f64,
}

/// An online model of batch time; see the [module docs](self).
#[derive(Debug)]
pub(super) struct CostModel {
    samples: VecDeque<Sample>,
    /// Recomputed when a batch finishes, read at every admission: the fit,
    /// the padding share and the parallelism of the window.
    fit: Option<Fit>,
    padding: f64,
    parallelism: usize,
    /// When a request judged too slow for its deadline was last let
    /// through, to measure again; see [`probe`](Self::probe).
    probed: Option<Instant>,
}

impl CostModel {
    pub(super) const WINDOW: usize = 64;
    /// How long an idle service goes without a measured batch before it
    /// lets one request it judges too slow through, to measure again.
    pub(super) const PROBE_AFTER: Duration = Duration::from_secs(5);

    pub(super) fn new() -> Self {
        Self {
            samples: VecDeque::with_capacity(Self::WINDOW),
            fit: None,
            padding: 1.0,
            parallelism: 1,
            probed: None,
        }
    }

    /// Whether to let one request this model judges too slow for its
    /// deadline through anyway, and if so, marks it let through: when
    /// neither a batch nor such a request went through for
    /// [`PROBE_AFTER`](Self::PROBE_AFTER). The model learns only from
    /// batches that run, so refusing every such request would keep a
    /// passing slowness on the books for good.
    pub(super) fn probe(&mut self, now: Instant) -> bool {
        let stale = |at: Option<Instant>| {
            at.is_none_or(|at| now.saturating_duration_since(at) >= Self::PROBE_AFTER)
        };
        let probe = stale(self.samples.back().map(|sample| sample.ended)) && stale(self.probed);
        if probe {
            self.probed = Some(now);
        }
        probe
    }

    /// A batch of `items` inputs and `cost` (their own costs summing to
    /// `raw`), started at `started` alongside `parallel - 1` others, was
    /// answered at `now`.
    pub(super) fn finished(
        &mut self,
        started: Instant,
        now: Instant,
        cost: usize,
        raw: usize,
        items: usize,
        parallel: usize,
    ) {
        if self.samples.len() >= Self::WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample {
            cost: cost as f64,
            raw: raw as f64,
            items: items as f64,
            seconds: now.saturating_duration_since(started).as_secs_f64(),
            started,
            ended: now,
            parallel: parallel.max(1),
        });
        self.fit = fit(&self.samples);
        self.padding = padding(&self.samples);
        self.parallelism = self
            .samples
            .iter()
            .map(|s| s.parallel)
            .max()
            .unwrap_or(1)
            .max(1);
    }

    /// The fitted batch time, once a batch was measured.
    #[cfg(test)]
    fn fit(&self) -> Option<Fit> {
        self.fit
    }

    /// How many batches ran at once on average over the recent ones, to
    /// the nearest whole: the replicas kept busy. (A batch's answer is
    /// counted a moment after its replica frees, so the most seen at once
    /// overstates it.)
    pub(super) fn busy_replicas(&self) -> usize {
        let (Some(first), Some(last)) = (
            self.samples.iter().map(|s| s.started).min(),
            self.samples.iter().map(|s| s.ended).max(),
        ) else {
            return 0;
        };
        let span = last.saturating_duration_since(first).as_secs_f64();
        let busy: f64 = self.samples.iter().map(|s| s.seconds).sum();
        if span > 0.0 {
            (busy / span).round() as usize
        } else {
            0
        }
    }

    /// What a batch costs in time, for deciding whether waiting for a
    /// fuller one pays; `None` unless several replicas are kept busy (with
    /// one working, waiting would idle the service).
    pub(super) fn pace(&self) -> Option<Pace> {
        let fit = self.fit?;
        let items: f64 = self.samples.iter().map(|s| s.items).sum();
        let cost: f64 = self.samples.iter().map(|s| s.cost).sum();
        (self.busy_replicas() > 1 && items > 0.0).then(|| Pace {
            fixed: fit.fixed,
            per_item: fit.per_cost * cost / items,
            replicas: self.parallelism,
        })
    }

    /// How long `items` inputs of own costs summing to `raw` take to serve
    /// under `config`'s batch limits, once a batch was measured.
    pub(super) fn time_for(
        &self,
        items: usize,
        raw: usize,
        config: &BatchConfig,
    ) -> Option<Duration> {
        self.time(items, raw as f64 * self.padding, config)
    }

    /// The least time `items` inputs of own costs summing to `raw` take
    /// served alone: unpadded, as inputs batched with their like would be.
    /// What [`TooLarge`](crate::error::TooLarge) is judged on, since it
    /// tells the caller not to retry.
    pub(super) fn least_time_for(
        &self,
        items: usize,
        raw: usize,
        config: &BatchConfig,
    ) -> Option<Duration> {
        self.time(items, raw as f64, config)
    }

    /// How long the smallest batch takes on its one replica: the fitted
    /// fixed cost. No deadline shorter than this can be met, whatever the
    /// request's size.
    pub(super) fn lone_batch_time(&self) -> Option<Duration> {
        let fit = self.fit?;
        Some(Duration::try_from_secs_f64(fit.fixed.max(0.0)).unwrap_or(Duration::ZERO))
    }

    fn time(&self, items: usize, cost: f64, config: &BatchConfig) -> Option<Duration> {
        let fit = self.fit?;
        if items == 0 {
            return Some(Duration::ZERO);
        }
        let by_size = (items as f64 / config.max_batch_size.get() as f64).ceil();
        let by_cost = config
            .max_batch_cost
            .map_or(1.0, |budget| (cost / budget.get() as f64).ceil());
        let batches = by_size.max(by_cost).max(1.0);
        let seconds = batches * fit.fixed + cost * fit.per_cost;
        Some(duration_at_rate(seconds, self.parallelism as f64))
    }

    /// Cost served per second with batches the size of the recent ones,
    /// across the replicas seen working at once.
    pub(super) fn per_second(&self) -> Option<f64> {
        let seconds: f64 = self.samples.iter().map(|s| s.seconds).sum();
        let cost: f64 = self.samples.iter().map(|s| s.cost).sum();
        (seconds > 0.0 && cost > 0.0).then(|| cost / seconds * self.parallelism as f64)
    }
}

/// How much the batches' cost exceeds their inputs' own (padding).
fn padding(samples: &VecDeque<Sample>) -> f64 {
    let cost: f64 = samples.iter().map(|s| s.cost).sum();
    let raw: f64 = samples.iter().map(|s| s.raw).sum();
    if raw > 0.0 {
        (cost / raw).max(1.0)
    } else {
        1.0
    }
}

/// Least squares of seconds on cost, where the costs spread enough to tell
/// the two parts apart; the per-cost part is held to what the most
/// efficient batch allows (no batch can beat it). Otherwise every batch is
/// taken to cost what the recent ones took on average, whatever its size.
fn fit(samples: &VecDeque<Sample>) -> Option<Fit> {
    if samples.is_empty() {
        return None;
    }
    let n = samples.len() as f64;
    let mean_cost = samples.iter().map(|s| s.cost).sum::<f64>() / n;
    let mean_seconds = samples.iter().map(|s| s.seconds).sum::<f64>() / n;
    let (mut covariance, mut variance) = (0.0, 0.0);
    for s in samples {
        covariance += (s.cost - mean_cost) * (s.seconds - mean_seconds);
        variance += (s.cost - mean_cost).powi(2);
    }
    // A spread of at least a tenth of the mean cost, over a few batches.
    let spread = (variance / n).sqrt() >= 0.1 * mean_cost;
    if samples.len() >= 4 && spread && mean_cost > 0.0 {
        let bound = samples
            .iter()
            .filter(|s| s.cost > 0.0)
            .map(|s| s.seconds / s.cost)
            .fold(f64::INFINITY, f64::min);
        let per_cost = (covariance / variance).min(bound);
        // The mean of each batch's `seconds - per_cost · cost`, none of
        // which the bound lets fall below 0: only rounding can.
        let fixed = (mean_seconds - per_cost * mean_cost).max(0.0);
        if per_cost >= 0.0 {
            return Some(Fit { fixed, per_cost });
        }
    }
    Some(Fit {
        fixed: mean_seconds,
        per_cost: 0.0,
    })
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use std::num::NonZeroUsize;

    use super::*;
    use crate::batch::CostMode;

    /// A virtual accelerator: 2 ms + 20 µs per cost unit.
    fn seconds(cost: usize) -> f64 {
        0.002 + 0.000_02 * cost as f64
    }

    fn model_after(costs: &[usize], parallel: usize) -> CostModel {
        let mut model = CostModel::new();
        let start = Instant::now();
        for &cost in costs {
            let end = start + Duration::from_secs_f64(seconds(cost));
            model.finished(start, end, cost, cost, 1, parallel);
        }
        model
    }

    fn config(max_batch: usize, budget: Option<usize>) -> BatchConfig {
        BatchConfig::default()
            .with_max_batch_size(NonZeroUsize::new(max_batch).unwrap())
            .with_max_batch_cost(budget.and_then(NonZeroUsize::new), CostMode::Sum)
    }

    #[test]
    fn mixed_costs_recover_the_fixed_and_per_cost_parts() {
        let costs: Vec<usize> = (0..64).map(|i| 8 + (i * 37) % 250).collect();
        let fit = model_after(&costs, 1).fit().unwrap();
        assert!((fit.fixed - 0.002).abs() < 1e-6, "{fit:?}");
        assert!((fit.per_cost - 0.000_02).abs() < 1e-9, "{fit:?}");
    }

    #[test]
    fn a_batch_time_proportional_to_cost_keeps_its_per_cost_part() {
        // No fixed part: 30 ms a cost unit. Rounding puts the fitted fixed
        // part a hair below 0 here (-1.4e-17): that is 0, not a reason to
        // drop the per-cost part for a flat mean.
        let mut model = CostModel::new();
        let start = Instant::now();
        for cost in [1, 4, 1, 4, 1] {
            let end = start + Duration::from_millis(30) * cost;
            model.finished(start, end, cost as usize, cost as usize, 1, 1);
        }
        let fit = model.fit().unwrap();
        assert_eq!(fit.fixed, 0.0, "{fit:?}");
        assert!((fit.per_cost - 0.03).abs() < 1e-12, "{fit:?}");
    }

    #[test]
    fn long_work_is_not_priced_at_the_rate_of_short_batches() {
        // Only short batches were seen: 4 cost units each, 2.08 ms.
        let model = model_after(&[4; 16], 1);
        // 64 inputs of 512 in batches of at most 8192: 4 batches. The model
        // cannot see the per-cost part yet, so it errs low, never high: at
        // most the truth (4 · 2 ms + 32768 · 20 µs = 0.663 s).
        let estimate = model
            .time_for(64, 64 * 512, &config(64, Some(8192)))
            .unwrap();
        assert!(estimate <= Duration::from_secs_f64(0.663), "{estimate:?}");
        // Per-cost throughput extrapolated from those batches would say 5.3 s.
        let naive = 64.0 * 512.0 / (4.0 / seconds(4));
        assert!(naive > 5.0);
    }

    #[test]
    fn estimates_of_mixed_queues_are_within_a_few_percent() {
        let costs: Vec<usize> = (0..64).map(|i| 8 + (i * 53) % 250).collect();
        let model = model_after(&costs, 1);
        for (items, raw, batches) in [(32, 32 * 100, 1), (200, 200 * 40, 4), (5, 5 * 250, 1)] {
            let truth = batches as f64 * 0.002 + raw as f64 * 0.000_02;
            let estimate = model
                .time_for(items, raw, &config(64, None))
                .unwrap()
                .as_secs_f64();
            assert!(
                (estimate - truth).abs() / truth < 0.02,
                "{items} items: {estimate} vs {truth}"
            );
        }
    }

    #[test]
    fn replicas_working_at_once_divide_the_time() {
        let costs: Vec<usize> = (0..64).map(|i| 8 + (i * 37) % 250).collect();
        let one = model_after(&costs, 1).time_for(256, 256 * 64, &config(64, None));
        let four = model_after(&costs, 4).time_for(256, 256 * 64, &config(64, None));
        let ratio = one.unwrap().as_secs_f64() / four.unwrap().as_secs_f64();
        assert!((ratio - 4.0).abs() < 1e-9, "{ratio}");
    }

    #[test]
    fn padding_counts_at_the_share_recent_batches_wasted() {
        let mut model = CostModel::new();
        let start = Instant::now();
        for i in 0..16 {
            // Padded to twice the inputs' own cost.
            let (cost, raw) = (200 + i * 10, 100 + i * 5);
            let end = start + Duration::from_secs_f64(seconds(cost));
            model.finished(start, end, cost, raw, 1, 1);
        }
        let estimate = model.time_for(10, 1000, &config(64, None)).unwrap();
        let truth = 0.002 + 2000.0 * 0.000_02;
        assert!(
            (estimate.as_secs_f64() - truth).abs() / truth < 0.02,
            "{estimate:?}"
        );
    }

    #[test]
    fn nothing_is_estimated_before_a_batch_was_measured() {
        assert_eq!(CostModel::new().time_for(1, 1, &config(8, None)), None);
        assert_eq!(
            model_after(&[10], 1).time_for(0, 0, &config(8, None)),
            Some(Duration::ZERO)
        );
    }
}
