//! `Serving` and the stack the "Build it yourself" chapter builds by hand
//! from public items behave the same: the same answers, the same metrics
//! (per-input model errors included), the same health, the same deadlines.
//!
//! One test in its own binary: it installs the process-wide recorder, and
//! tells the two stacks' metrics apart by their `model` label.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use candle_core::Device;
use candlewick::batch::{Batch, BatchConfig, BatchLayer, Request};
use candlewick::error::{DeadlineExceeded, Draining, InvalidInput, ModelFailed};
use candlewick::health::{Health, HealthReport, HealthState, Lifecycle};
use candlewick::pool::Pool;
use candlewick::{BoxError, Loader, ModelInfo, Serving, ServingConfig};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::{ServiceBuilder, ServiceExt};

/// Doubles its inputs; rejects 0 at admission; fails any batch holding 13,
/// so that bisection fails 13 alone.
struct Doubler;

#[async_trait]
impl Loader<u32> for Doubler {
    type Model = fn(&[u32]) -> Result<Vec<u32>, BoxError>;

    async fn load(&self, _: &Device) -> Result<Self::Model, BoxError> {
        Ok(|batch| {
            if batch.contains(&13) {
                return Err("unlucky".into());
            }
            Ok(batch.iter().map(|x| x * 2).collect())
        })
    }

    fn validate(&self, input: &u32) -> Result<(), BoxError> {
        if *input == 0 {
            return Err("zero".into());
        }
        Ok(())
    }
}

fn config(name: &str) -> ServingConfig {
    let batch = BatchConfig::default()
        .with_max_batch_size(NonZeroUsize::new(8).unwrap())
        .with_max_wait(Duration::from_millis(5));
    ServingConfig::new(Default::default(), batch).with_model(ModelInfo::new(name, "v1"))
}

/// One stack, whichever way it was built.
struct Stack {
    batch: Batch<u32, u32>,
    health: Health,
    shutdown: Box<dyn Fn() -> futures_util::future::BoxFuture<'static, ()>>,
}

fn serving() -> Stack {
    let serving = Serving::start(Doubler, config("serving")).unwrap();
    let handle = serving.clone();
    Stack {
        batch: serving.batch().clone(),
        health: serving.health(),
        shutdown: Box::new(move || {
            let serving = handle.clone();
            Box::pin(async move {
                serving.shutdown_within().await;
            })
        }),
    }
}

/// The "Build it yourself" chapter of `candlewick::serving`, step by step.
fn hand_built() -> Stack {
    let loader = Arc::new(Doubler);
    let config = config("hand-built");
    let model = &config.model;
    let pool = Pool::from_arc(loader.clone(), config.pool.clone(), model).unwrap();
    let batch = ServiceBuilder::new()
        .layer(
            BatchLayer::new(config.batch.clone())
                .hooks_from(loader)
                .model(model)
                .staging(pool.staging()),
        )
        .timeout(Duration::from_secs(30))
        .service(pool.clone());
    let health = Health::new(config.health.clone(), pool.status());
    health.watch_batch(batch.status());
    health.publish_metrics(model);
    candlewick::metrics::record_model_info(model);
    let (handle, lifecycle) = (batch.clone(), health.clone());
    Stack {
        batch,
        health,
        shutdown: Box::new(move || {
            let (batch, health) = (handle.clone(), lifecycle.clone());
            let timeout = config.drain_timeout;
            Box::pin(async move {
                health.set_lifecycle(Lifecycle::Draining);
                batch.drain_within(timeout).await;
                health.set_lifecycle(Lifecycle::Stopped);
            })
        }),
    }
}

/// What a caller sees of one request: its answer or the kind of its error.
fn seen(result: Result<u32, BoxError>) -> String {
    match result {
        Ok(output) => format!("ok {output}"),
        Err(err) if err.is::<InvalidInput>() => "invalid".to_owned(),
        Err(err) if err.is::<DeadlineExceeded>() => "deadline".to_owned(),
        Err(err) if err.is::<ModelFailed>() => "model failed".to_owned(),
        Err(err) if err.is::<Draining>() => "draining".to_owned(),
        Err(err) => format!("other: {err}"),
    }
}

/// The same requests through `stack`: what each caller saw, and the health
/// reports when ready and when stopped.
async fn exercise(stack: &Stack) -> (Vec<String>, HealthReport, HealthReport) {
    let mut watch = stack.health.watch();
    while !stack.health.ready().ok {
        watch.changed().await;
    }
    let mut answers = Vec::new();
    // One at a time: good, invalid, a model error, an expired deadline.
    for input in [1, 0, 13, 2] {
        answers.push(seen(stack.batch.clone().oneshot(input.into()).await));
    }
    let expired = Request::new(3).with_deadline(tokio::time::Instant::now());
    answers.push(seen(stack.batch.clone().oneshot(expired).await));
    // At once, through `Service::call` with deadlines: the model error fails
    // its own request only, whichever batch it shares.
    let calls: Vec<_> = [4, 13, 5, 6]
        .into_iter()
        .map(|input| {
            let request = Request::new(input).with_timeout(Duration::from_secs(10));
            tokio::spawn(stack.batch.clone().oneshot(request))
        })
        .collect();
    for call in calls {
        answers.push(seen(call.await.unwrap()));
    }
    let ready = stack.health.report();
    (stack.shutdown)().await;
    answers.push(seen(stack.batch.clone().oneshot(7.into()).await));
    (answers, ready, stack.health.report())
}

/// Every sample of one stack's metrics, by name and labels other than
/// `model`.
fn metrics_of(snapshot: &[(String, BTreeMap<String, String>, String)], model: &str) -> Vec<String> {
    let mut samples: Vec<String> = snapshot
        .iter()
        .filter(|(_, labels, _)| labels.get("model").map(String::as_str) == Some(model))
        .map(|(name, labels, value)| {
            let labels: Vec<_> = labels
                .iter()
                .filter(|(key, _)| *key != "model")
                .map(|(key, value)| format!("{key}={value}"))
                .collect();
            format!("{name}{{{}}} {value}", labels.join(","))
        })
        .collect();
    samples.sort();
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_built_stack_behaves_as_serving_does() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    // Both stay alive until the snapshot, so their gauges are final.
    let (serving, hand_built) = (serving(), hand_built());
    let (serving_answers, serving_ready, serving_stopped) = exercise(&serving).await;
    let (hand_answers, hand_ready, hand_stopped) = exercise(&hand_built).await;

    let expected = [
        "ok 2",
        "invalid",
        "model failed",
        "ok 4",
        "deadline",
        "ok 8",
        "model failed",
        "ok 10",
        "ok 12",
        "draining",
    ];
    assert_eq!(serving_answers, expected);
    assert_eq!(hand_answers, serving_answers);

    for report in [&serving_ready, &hand_ready] {
        assert_eq!(report.state, HealthState::Ready, "{report:?}");
    }
    assert_eq!(hand_ready.ready, serving_ready.ready);
    assert_eq!(hand_ready.live, serving_ready.live);
    for report in [&serving_stopped, &hand_stopped] {
        assert_eq!(report.state, HealthState::Stopped, "{report:?}");
    }
    assert_eq!(hand_stopped.live, serving_stopped.live);

    // Let each health gauge task see the final state (it looks again each
    // second at the latest).
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let snapshot: Vec<_> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let (_, key) = key.into_parts();
            let labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            let name = key.name().to_owned();
            let value = match value {
                DebugValue::Counter(n) => n.to_string(),
                // Load and warm-up times differ from run to run.
                DebugValue::Gauge(_) if name.ends_with("_seconds") => "set".to_owned(),
                DebugValue::Gauge(v) => v.to_string(),
                // How requests group into batches depends on timing; each
                // request's own samples do not.
                DebugValue::Histogram(values) if name.starts_with("candlewick_batch_") => {
                    (if values.is_empty() { "none" } else { "some" }).to_owned()
                }
                DebugValue::Histogram(values) => format!("{} samples", values.len()),
            };
            (name, labels, value)
        })
        .collect();
    let serving_metrics = metrics_of(&snapshot, "serving");
    let hand_metrics = metrics_of(&snapshot, "hand-built");
    for sample in [
        "candlewick_requests_total{outcome=ok,version=v1} 5",
        "candlewick_requests_total{outcome=invalid,version=v1} 1",
        "candlewick_requests_total{outcome=model_error,version=v1} 2",
        "candlewick_requests_total{outcome=deadline,version=v1} 1",
        "candlewick_requests_total{outcome=draining,version=v1} 1",
        "candlewick_health_state{state=stopped,version=v1} 1",
    ] {
        assert!(
            serving_metrics.iter().any(|s| s == sample),
            "{sample} missing from {serving_metrics:#?}"
        );
    }
    assert_eq!(hand_metrics, serving_metrics);
}
