//! Metrics through the [`metrics`] facade: rate, errors, latency and
//! saturation of every hop. The application picks the exporter (or uses
//! [`PrometheusService`] behind the `prometheus` feature).
//!
//! Every metric carries the labels `model` and `version` from the stack's
//! [`ModelInfo`]; per-device metrics add `device`.
//!
#![doc = include_str!("../../docs/metrics.md")]
//!
//! Handles are registered when the stack is built: install the recorder
//! before calling [`Serving::start`](crate::Serving::start).
//!
//! # Examples
//!
//! ```
//! use candlewick::metrics::names;
//!
//! // Autoscalers and dashboards refer to the same names the process emits.
//! assert_eq!(names::QUEUE_DEPTH, "candlewick_queue_depth");
//! ```

use metrics::{Label, Unit};

use crate::ModelInfo;

#[cfg(feature = "prometheus")]
mod prometheus;
#[cfg(feature = "prometheus")]
#[cfg_attr(docsrs, doc(cfg(feature = "prometheus")))]
pub use prometheus::PrometheusService;

/// The name of every metric this crate emits.
pub mod names {
    /// Counter: requests by `outcome`.
    pub const REQUESTS: &str = "candlewick_requests_total";
    /// Histogram, seconds: admission to answer, for answered requests.
    pub const REQUEST_DURATION: &str = "candlewick_request_duration_seconds";
    /// Histogram, seconds: admission to dispatch in a batch.
    pub const QUEUE_WAIT: &str = "candlewick_queue_wait_seconds";
    /// Histogram: requests per batch.
    pub const BATCH_SIZE: &str = "candlewick_batch_size";
    /// Histogram: cost per batch, as the batcher counts it (padded in
    /// padded mode).
    pub const BATCH_COST: &str = "candlewick_batch_cost";
    /// Histogram: the sum of a batch's inputs' own costs; against
    /// [`BATCH_COST`] it gives the share padding wastes.
    pub const BATCH_INPUT_COST: &str = "candlewick_batch_input_cost";
    /// Histogram, seconds: how long a ready service waited for a batch to
    /// fill before dispatching it.
    pub const FILL_WAIT: &str = "candlewick_batch_fill_wait_seconds";
    /// Counter: batches handed to a pool whose replicas were all busy, to
    /// start the moment one frees (see [`Pool::staging`](crate::pool::Pool::staging)).
    pub const BATCHES_STAGED: &str = "candlewick_batches_staged_total";
    /// Histogram, seconds: one batch on one replica, by `device`.
    pub const BATCH_DURATION: &str = "candlewick_batch_duration_seconds";
    /// Counter: failed batches whose halves both failed again when bisected,
    /// so isolating poisoned inputs stopped (a lost device or a model bug
    /// fails every input alike).
    pub const SYSTEMIC_FAILURES: &str = "candlewick_batch_systemic_failures_total";
    /// Gauge: requests waiting in the queue.
    pub const QUEUE_DEPTH: &str = "candlewick_queue_depth";
    /// Gauge: total cost of the queued requests.
    pub const QUEUE_COST: &str = "candlewick_queue_cost";
    /// Gauge: requests in batches that are running.
    pub const IN_FLIGHT: &str = "candlewick_in_flight_requests";
    /// Gauge: replicas by `device` and `state`.
    pub const REPLICAS: &str = "candlewick_replicas";
    /// Gauge, seconds: the last model load time, by `device` and `replica`.
    pub const LOAD_TIME: &str = "candlewick_replica_load_seconds";
    /// Gauge, seconds: the last warm-up time, by `device` and `replica`.
    pub const WARMUP_TIME: &str = "candlewick_replica_warmup_seconds";
    /// Gauge: 1 for the current health `state`, 0 for the others.
    pub const HEALTH_STATE: &str = "candlewick_health_state";
    /// Gauge: always 1, labelled with the model's metadata.
    pub const MODEL_INFO: &str = "candlewick_model_info";
    /// Histogram, seconds: one request's preparation (parsing, tokenizing).
    pub const PREPARE_DURATION: &str = "candlewick_prepare_duration_seconds";
    /// Histogram, seconds: the wait for a preparation thread.
    pub const PREPARE_WAIT: &str = "candlewick_prepare_wait_seconds";
    /// Gauge: requests waiting for a preparation thread.
    pub const PREPARE_QUEUE_DEPTH: &str = "candlewick_prepare_queue_depth";
    /// Counter: requests refused because the preparation queue was full.
    pub const PREPARE_REJECTED: &str = "candlewick_prepare_rejected_total";
}

/// Histogram buckets, in seconds, that resolve a p99 anywhere from 100 µs to
/// 60 s (about 1.5× apart).
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00015, 0.00025, 0.0004, 0.0006, 0.001, 0.0015, 0.0025, 0.004, 0.006, 0.01, 0.015,
    0.025, 0.04, 0.06, 0.1, 0.15, 0.25, 0.4, 0.6, 1.0, 1.5, 2.5, 4.0, 6.0, 10.0, 15.0, 25.0, 40.0,
    60.0,
];

/// Histogram buckets for batch sizes and costs: powers of two up to 65,536.
pub const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0, 32768.0, 65536.0,
];

/// Registers the unit and help text of every metric with the recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    use names::*;
    describe_counter!(
        REQUESTS,
        Unit::Count,
        "Requests by outcome: ok, overloaded, deadline, cancelled, invalid, model_error, draining, closed."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from admission to answer of answered requests."
    );
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "Time from admission to dispatch in a batch."
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "Requests per batch.");
    describe_histogram!(BATCH_COST, Unit::Count, "Cost (e.g. tokens) per batch.");
    describe_histogram!(
        BATCH_DURATION,
        Unit::Seconds,
        "Time one replica spent on one batch; rate of the sum is busy time."
    );
    describe_counter!(
        SYSTEMIC_FAILURES,
        Unit::Count,
        "Failed batches whose halves both failed again, so bisection stopped."
    );
    describe_gauge!(QUEUE_DEPTH, Unit::Count, "Requests waiting in the queue.");
    describe_gauge!(
        QUEUE_COST,
        Unit::Count,
        "Total cost of the queued requests."
    );
    describe_gauge!(
        IN_FLIGHT,
        Unit::Count,
        "Requests in batches that are running."
    );
    describe_gauge!(REPLICAS, Unit::Count, "Replicas by device and state.");
    describe_gauge!(
        LOAD_TIME,
        Unit::Seconds,
        "The last model load time of a replica."
    );
    describe_gauge!(
        WARMUP_TIME,
        Unit::Seconds,
        "The last warm-up time of a replica."
    );
    describe_gauge!(
        HEALTH_STATE,
        Unit::Count,
        "1 for the current health state, 0 for the others."
    );
    describe_gauge!(
        MODEL_INFO,
        Unit::Count,
        "Always 1; labelled with the model's metadata."
    );
    describe_histogram!(
        BATCH_INPUT_COST,
        Unit::Count,
        "The sum of a batch's inputs' own costs (against the batch cost: padding waste)."
    );
    describe_histogram!(
        FILL_WAIT,
        Unit::Seconds,
        "Time a ready service waited for a batch to fill before dispatching it."
    );
    describe_counter!(
        BATCHES_STAGED,
        Unit::Count,
        "Full batches handed to a busy pool, to start the moment a replica frees."
    );
    describe_histogram!(
        PREPARE_DURATION,
        Unit::Seconds,
        "Time one request took to prepare (parse, tokenize) on a preparation thread."
    );
    describe_histogram!(
        PREPARE_WAIT,
        Unit::Seconds,
        "Time a request waited for a preparation thread."
    );
    describe_gauge!(
        PREPARE_QUEUE_DEPTH,
        Unit::Count,
        "Requests waiting for a preparation thread."
    );
    describe_counter!(
        PREPARE_REJECTED,
        Unit::Count,
        "Requests refused because the preparation queue was full."
    );
}

/// Sets the [`MODEL_INFO`](names::MODEL_INFO) gauge: 1, labelled with
/// `model`'s name, version, revision, data snapshot and approval.
/// [`Serving::start`](crate::Serving::start) calls it; a hand-built stack
/// calls it once.
pub fn record_model_info(model: &ModelInfo) {
    let unknown = || "unknown".to_owned();
    let labels = labels(
        model,
        &[
            ("revision", model.revision.clone().unwrap_or_else(unknown)),
            (
                "data_snapshot",
                model.data_snapshot.clone().unwrap_or_else(unknown),
            ),
            ("approval", model.approval.as_str().to_owned()),
        ],
    );
    metrics::gauge!(names::MODEL_INFO, labels).set(1.0);
}

/// Labels `model` and `version`, then `extra`.
pub(crate) fn labels(model: &ModelInfo, extra: &[(&'static str, String)]) -> Vec<Label> {
    let mut labels = vec![
        Label::new("model", model.name.clone()),
        Label::new("version", model.version.clone()),
    ];
    labels.extend(extra.iter().map(|(k, v)| Label::new(*k, v.clone())));
    labels
}
