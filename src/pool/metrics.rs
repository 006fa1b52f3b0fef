//! The handles each replica records through.

use metrics::{Counter, Gauge, Histogram, Label};

use super::ReplicaState;
use crate::metrics::names;

/// The handles one replica records through.
#[derive(Debug, Clone)]
pub(super) struct ReplicaMetrics {
    /// Replicas of this device in each state, indexed by `ReplicaState as usize`.
    states: Vec<Gauge>,
    pub(super) batch_duration: Histogram,
    pub(super) systemic_failures: Counter,
    pub(super) load_time: Gauge,
    pub(super) warmup_time: Gauge,
}

impl ReplicaMetrics {
    pub(super) fn new(model: &[Label], device: &str, replica: usize) -> Self {
        let with = |extra: &[(&'static str, String)]| {
            let mut labels = model.to_vec();
            labels.extend(extra.iter().map(|(k, v)| Label::new(*k, v.clone())));
            labels
        };
        let device = device.to_owned();
        let states = ReplicaState::ALL
            .iter()
            .map(|state| {
                let labels = with(&[
                    ("device", device.clone()),
                    ("state", state.as_str().to_owned()),
                ]);
                metrics::gauge!(names::REPLICAS, labels)
            })
            .collect();
        let per_replica = with(&[("device", device.clone()), ("replica", replica.to_string())]);
        Self {
            states,
            batch_duration: metrics::histogram!(
                names::BATCH_DURATION,
                with(&[("device", device.clone())])
            ),
            systemic_failures: metrics::counter!(
                names::SYSTEMIC_FAILURES,
                with(&[("device", device)])
            ),
            load_time: metrics::gauge!(names::LOAD_TIME, per_replica.clone()),
            warmup_time: metrics::gauge!(names::WARMUP_TIME, per_replica),
        }
    }

    /// Moves this replica from `from` to `to` in the per-state gauges.
    pub(super) fn transition(&self, from: Option<ReplicaState>, to: ReplicaState) {
        if let Some(from) = from {
            self.states[from as usize].decrement(1.0);
        }
        self.states[to as usize].increment(1.0);
    }
}
