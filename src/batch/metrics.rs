//! The handles the batching layer records through.

use metrics::{Counter, Gauge, Histogram, Label};

use crate::metrics::names;

/// Why a request left the service: the `outcome` label of
/// [`names::REQUESTS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Ok,
    Overloaded,
    Deadline,
    Cancelled,
    Invalid,
    ModelError,
    Draining,
    Closed,
}

impl Outcome {
    const ALL: [Outcome; 8] = [
        Self::Ok,
        Self::Overloaded,
        Self::Deadline,
        Self::Cancelled,
        Self::Invalid,
        Self::ModelError,
        Self::Draining,
        Self::Closed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Overloaded => "overloaded",
            Self::Deadline => "deadline",
            Self::Cancelled => "cancelled",
            Self::Invalid => "invalid",
            Self::ModelError => "model_error",
            Self::Draining => "draining",
            Self::Closed => "closed",
        }
    }

    /// The outcome of a request answered with `err`, as
    /// [`classify`](crate::error::classify) labels it.
    pub(super) fn of_error(err: &(dyn std::error::Error + 'static)) -> Self {
        let label = crate::error::classify(err).outcome;
        Self::ALL
            .into_iter()
            .find(|outcome| outcome.as_str() == label)
            .unwrap_or(Self::ModelError)
    }
}

/// The handles the batching layer records through.
#[derive(Debug, Clone)]
pub(super) struct BatchMetrics {
    outcomes: [Counter; 8],
    pub(super) request_duration: Histogram,
    pub(super) queue_wait: Histogram,
    pub(super) batch_size: Histogram,
    pub(super) batch_cost: Histogram,
    pub(super) input_cost: Histogram,
    pub(super) fill_wait: Histogram,
    pub(super) staged: Counter,
    pub(super) queue_depth: Gauge,
    pub(super) queue_cost: Gauge,
    pub(super) in_flight: Gauge,
}

impl BatchMetrics {
    pub(super) fn new(labels: &[Label]) -> Self {
        let outcomes = Outcome::ALL.map(|outcome| {
            let mut labels = labels.to_vec();
            labels.push(Label::new("outcome", outcome.as_str()));
            metrics::counter!(names::REQUESTS, labels)
        });
        let labels = labels.to_vec();
        Self {
            outcomes,
            request_duration: metrics::histogram!(names::REQUEST_DURATION, labels.clone()),
            queue_wait: metrics::histogram!(names::QUEUE_WAIT, labels.clone()),
            batch_size: metrics::histogram!(names::BATCH_SIZE, labels.clone()),
            batch_cost: metrics::histogram!(names::BATCH_COST, labels.clone()),
            input_cost: metrics::histogram!(names::BATCH_INPUT_COST, labels.clone()),
            fill_wait: metrics::histogram!(names::FILL_WAIT, labels.clone()),
            staged: metrics::counter!(names::BATCHES_STAGED, labels.clone()),
            queue_depth: metrics::gauge!(names::QUEUE_DEPTH, labels.clone()),
            queue_cost: metrics::gauge!(names::QUEUE_COST, labels.clone()),
            in_flight: metrics::gauge!(names::IN_FLIGHT, labels),
        }
    }

    pub(super) fn outcome(&self, outcome: Outcome) {
        self.outcome_n(outcome, 1);
    }

    pub(super) fn outcome_n(&self, outcome: Outcome, n: usize) {
        self.outcomes[outcome as usize].increment(n as u64);
    }
}
