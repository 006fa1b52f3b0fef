//! Every documented metric exists, with the right kind and labels and
//! plausible values, after traffic with every outcome runs through the stack.
//!
//! One test in its own binary: it installs the process-wide recorder.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use candle_core::Device;
use candlewick::batch::{BatchConfig, Request};
use candlewick::health::HealthState;
use candlewick::pool::{FailurePolicy, PoolConfig, ReplicaState};
use candlewick::{BoxError, Loader, ModelInfo, Serving, ServingConfig};
use metrics_util::MetricKind;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tokio::sync::Semaphore;

/// Doubles its inputs; rejects 0 at admission; fails batches holding 13;
/// runs a batch only when the test hands it a permit.
struct Doubler {
    batches: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
}

#[async_trait]
impl Loader<u32> for Doubler {
    type Model = Box<dyn Fn(&[u32]) -> Result<Vec<u32>, BoxError>>;

    async fn load(&self, _: &Device) -> Result<Self::Model, BoxError> {
        let (batches, gate) = (self.batches.clone(), self.gate.clone());
        Ok(Box::new(move |batch: &[u32]| {
            gate.try_acquire()
                .map(|permit| permit.forget())
                .or_else(|_| {
                    // Blocking here is fine: this is the replica's own thread.
                    futures_block(gate.clone())
                })?;
            batches.fetch_add(1, Ordering::SeqCst);
            if batch.contains(&13) {
                return Err("unlucky".into());
            }
            Ok(batch.iter().map(|x| x * 2).collect())
        }))
    }

    fn validate(&self, input: &u32) -> Result<(), BoxError> {
        if *input == 0 {
            return Err("zero".into());
        }
        Ok(())
    }

    fn cost(&self, input: &u32) -> usize {
        *input as usize
    }
}

fn futures_block(gate: Arc<Semaphore>) -> Result<(), BoxError> {
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    runtime.block_on(gate.acquire_owned())?.forget();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_recorded_with_plausible_values() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();
    candlewick::metrics::describe();

    let batches = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(1_000));
    let loader = Doubler {
        batches: batches.clone(),
        gate: gate.clone(),
    };
    let pool = PoolConfig::default().with_failure_policy(FailurePolicy::FailBatch);
    let batch = BatchConfig::default()
        .with_max_batch_size(NonZeroUsize::new(8).unwrap())
        .with_max_wait(Duration::from_millis(1))
        .with_queue_capacity(NonZeroUsize::new(16).unwrap());
    let config = ServingConfig::new(pool, batch).with_model(ModelInfo::new("doubler", "v7"));
    let serving = Serving::start(loader, config).unwrap();
    let health = serving.health();
    while !health.ready().ok {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    let mut sent = 0u64;
    // 100 good requests, in waves that fit the queue.
    for wave in 0..10u32 {
        let good: Vec<_> = (0..10)
            .map(|i| {
                let serving = serving.clone();
                tokio::spawn(async move { serving.infer(100 + wave * 10 + i).await })
            })
            .collect();
        for request in good {
            request.await.unwrap().unwrap();
            sent += 1;
        }
    }
    // 5 invalid, 3 model errors (each alone), 2 already past their deadline.
    for _ in 0..5 {
        assert!(serving.infer(0).await.is_err());
        sent += 1;
    }
    for _ in 0..3 {
        assert!(serving.infer(13).await.is_err());
        sent += 1;
    }
    for _ in 0..2 {
        let past = Request::new(1).with_deadline(tokio::time::Instant::now());
        assert!(serving.infer(past).await.is_err());
        sent += 1;
    }
    // Room for 2 reserved, then refused before the call (as when preparing
    // the request finds it invalid).
    let reservation = serving.batch().reserve(2).await.unwrap();
    reservation.refuse(&candlewick::error::InvalidInput::new("not JSON"));
    sent += 2;
    // Overload: with the only replica held on a batch of one and a full
    // batch staged, 16 of the next 22 fill the queue and 6 are shed at once.
    gate.forget_permits(gate.available_permits());
    let send = |i: u32| {
        let serving = serving.clone();
        tokio::spawn(async move { serving.infer(i + 100).await })
    };
    let mut held: Vec<_> = vec![send(0)];
    // (The replica turns idle before it answers, so busy means this batch.)
    while serving.replicas()[0].state != ReplicaState::Busy {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // A full batch goes to the busy pool's stage (see `Pool::staging`).
    held.extend((1..9u32).map(send));
    let staged = async {
        while serving.batch().batches_in_flight() < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), staged)
        .await
        .expect("the full batch is staged");
    held.extend((9..31u32).map(send));
    sent += 31;
    // Every one of them admitted or shed before the replica frees: the
    // queued ones cannot finish while it is held, so 6 finished are the 6 shed.
    while serving.batch().queue_depth().0 < 16
        || held.iter().filter(|h| h.is_finished()).count() < 6
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    gate.add_permits(1_000);
    let held: Vec<_> = futures_collect(held).await;
    assert_eq!(held.iter().filter(|r| r.is_err()).count(), 6);
    // Draining: refused after shutdown.
    serving
        .shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    assert!(serving.infer(1).await.is_err());
    sent += 1;
    let prepared = exercise_the_preparer().await;
    // Let the health gauge task see the final state.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(health.report().state, HealthState::Stopped);

    let snapshot = snapshotter.snapshot().into_vec();
    let mut seen: BTreeMap<String, MetricKind> = BTreeMap::new();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut histograms: BTreeMap<String, usize> = BTreeMap::new();
    let mut gauges: BTreeMap<String, f64> = BTreeMap::new();
    let mut counters: BTreeMap<String, u64> = BTreeMap::new();
    for (key, unit, help, value) in snapshot {
        let (kind, key) = key.into_parts();
        let name = key.name().to_owned();
        let labels: BTreeMap<_, _> = key
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        assert_eq!(
            labels.get("model").map(String::as_str),
            Some("doubler"),
            "{name}"
        );
        assert_eq!(
            labels.get("version").map(String::as_str),
            Some("v7"),
            "{name}"
        );
        assert!(unit.is_some() && help.is_some(), "{name} is not described");
        seen.insert(name.clone(), kind);
        match value {
            DebugValue::Counter(n) if name == "candlewick_requests_total" => {
                *outcomes.entry(labels["outcome"].clone()).or_default() += n;
            }
            DebugValue::Counter(n) => {
                *counters.entry(name).or_default() += n;
            }
            DebugValue::Histogram(values) => {
                *histograms.entry(name).or_default() += values.len();
            }
            DebugValue::Gauge(v) => {
                let extra: Vec<_> = labels
                    .iter()
                    .filter(|(k, _)| *k != "model" && *k != "version")
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                gauges.insert(format!("{name}{{{}}}", extra.join(",")), v.into_inner());
            }
        }
    }

    // Every metric of the documented table exists, with the documented kind.
    let table = include_str!("../docs/metrics.md");
    let documented: BTreeSet<(String, String)> = table
        .lines()
        .filter_map(|line| {
            let cells: Vec<_> = line.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((name.to_owned(), cells[2].to_owned()))
        })
        .collect();
    assert_eq!(documented.len(), 22);
    // Failed batches are not bisected under `FailBatch`: none is systemic.
    assert_eq!(counters["candlewick_batch_systemic_failures_total"], 0);
    // The overload's full batch at least (the waves may stage more).
    assert!(counters["candlewick_batches_staged_total"] >= 1);
    for (name, kind) in &documented {
        let actual = seen
            .get(name)
            .unwrap_or_else(|| panic!("{name} was never recorded"));
        let actual = match actual {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        };
        assert_eq!(actual, kind, "{name}");
    }
    assert_eq!(
        seen.len(),
        documented.len(),
        "undocumented metrics: {seen:?}"
    );

    // Outcomes add up to the requests sent.
    assert_eq!(outcomes.values().sum::<u64>(), sent, "{outcomes:?}");
    assert_eq!(outcomes["invalid"], 7);
    assert_eq!(outcomes["model_error"], 3);
    assert_eq!(outcomes["deadline"], 2);
    assert_eq!(outcomes["draining"], 1);
    assert_eq!(outcomes["overloaded"], 6);
    assert_eq!(outcomes["ok"], 125);

    // One batch-size sample per batch the model ran, and one duration sample.
    let ran = batches.load(Ordering::SeqCst);
    assert_eq!(histograms["candlewick_batch_size"], ran);
    assert_eq!(histograms["candlewick_batch_cost"], ran);
    assert_eq!(histograms["candlewick_batch_input_cost"], ran);
    assert_eq!(histograms["candlewick_batch_fill_wait_seconds"], ran);
    assert_eq!(histograms["candlewick_batch_duration_seconds"], ran);
    // Latency and queue wait for every request that was answered by a batch.
    let batched = (outcomes["ok"] + outcomes["model_error"]) as usize;
    assert_eq!(histograms["candlewick_request_duration_seconds"], batched);
    assert_eq!(histograms["candlewick_queue_wait_seconds"], batched);

    // Gauges: nothing queued or running at the end, one idle replica, the
    // stopped state, the model's metadata.
    assert_eq!(gauges["candlewick_queue_depth{}"], 0.0);
    assert_eq!(gauges["candlewick_queue_cost{}"], 0.0);
    assert_eq!(gauges["candlewick_in_flight_requests{}"], 0.0);
    assert_eq!(gauges["candlewick_replicas{device=cpu,state=idle}"], 1.0);
    assert_eq!(gauges["candlewick_replicas{device=cpu,state=busy}"], 0.0);
    assert!(gauges["candlewick_replica_load_seconds{device=cpu,replica=0}"] >= 0.0);
    assert_eq!(gauges["candlewick_health_state{state=stopped}"], 1.0);
    assert_eq!(gauges["candlewick_health_state{state=ready}"], 0.0);
    assert_eq!(
        gauges["candlewick_model_info{approval=unreviewed,data_snapshot=unknown,revision=unknown}"],
        1.0
    );

    // The preparation stage: one sample per job run, one refusal.
    assert_eq!(histograms["candlewick_prepare_duration_seconds"], prepared);
    assert_eq!(histograms["candlewick_prepare_wait_seconds"], prepared);
    assert_eq!(counters["candlewick_prepare_rejected_total"], 1);
    assert_eq!(gauges["candlewick_prepare_queue_depth{}"], 0.0);
}

/// Runs jobs through a one-thread, one-slot preparer until one is refused;
/// returns how many ran.
async fn exercise_the_preparer() -> usize {
    use candlewick::prepare::{PrepareConfig, Preparer};

    let config = PrepareConfig::default()
        .with_threads(NonZeroUsize::MIN)
        .with_queue_capacity(NonZeroUsize::MIN);
    let preparer = Preparer::new(config, &ModelInfo::new("doubler", "v7")).unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    let (release, hold) = std::sync::mpsc::channel::<()>();
    let (started, running) = tokio::sync::oneshot::channel();
    let busy = tokio::spawn({
        let (preparer, ran) = (preparer.clone(), ran.clone());
        async move {
            preparer
                .run(move || {
                    let _ = started.send(());
                    let _ = hold.recv();
                    ran.fetch_add(1, Ordering::SeqCst);
                })
                .await
        }
    });
    running.await.unwrap();
    let queued = tokio::spawn({
        let (preparer, ran) = (preparer.clone(), ran.clone());
        async move {
            preparer
                .run(move || {
                    ran.fetch_add(1, Ordering::SeqCst);
                })
                .await
        }
    });
    let queued_up = async {
        while preparer.queue_depth() < 1 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), queued_up)
        .await
        .expect("the second job queues");
    assert!(preparer.run(|| ()).await.is_err());
    drop(release);
    busy.await.unwrap().unwrap();
    queued.await.unwrap().unwrap();
    ran.load(Ordering::SeqCst)
}

async fn futures_collect(
    tasks: Vec<tokio::task::JoinHandle<Result<u32, BoxError>>>,
) -> Vec<Result<u32, BoxError>> {
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}
