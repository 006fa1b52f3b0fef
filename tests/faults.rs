//! Faults in user code, one test each: a panic in every hook that runs user
//! code (load, warm-up, forward, the model's `Drop`, cost, validate, an
//! inner service, an input's `Drop`), `Duration::MAX` wherever a duration
//! goes, a device that fails every input, a replica that hangs again and
//! again, and errors no retry can fix. Each asserts that every request is
//! answered exactly once, that the service serves again afterwards (or, where
//! recovery gave up, says so at once and is not live), and that no count of
//! models grows past its bound.

use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use candle_core::{Device, DeviceLocation};
use candlewick::batch::{Batch, BatchConfig, BatchLayer, Request, WaitPolicy};
use candlewick::error::{
    Closed, FailureKind, InvalidInput, ModelFailed, Overloaded, Unrecoverable,
};
use candlewick::pool::{Backoff, FailurePolicy, Pool, PoolConfig, PoolError};
use candlewick::{BoxError, Loader, Model, Serving, ServingConfig};
use tower::{Layer, Service, ServiceExt, service_fn};

/// Inputs with a meaning to [`Faulty`]; any other input is doubled.
const FAILS: u32 = 1000;
const PANICS: u32 = 3000;
const HANGS: u32 = 4000;

/// What the test makes a [`Faulty`] model do, shared with its loader.
#[derive(Default)]
struct Control {
    /// Models alive now, and the most ever alive at once.
    alive: AtomicUsize,
    most_alive: AtomicUsize,
    loads: AtomicUsize,
    forwards: AtomicUsize,
    /// Warm-ups that will panic before one succeeds.
    warmup_panics: AtomicUsize,
    /// Whether dropping a model panics (after it counted itself gone).
    drop_panics: AtomicBool,
    /// Whether every forward fails, as on a lost device.
    fail_everything: AtomicBool,
    /// Loads fail with an unrecoverable error.
    unrecoverable: AtomicBool,
    /// Forwards of `HANGS` block until this opens.
    gate: Gate,
}

#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

#[derive(Clone, Default)]
struct Faulty(Arc<Control>);

struct FaultyModel(Arc<Control>);

#[async_trait]
impl Loader<u32> for Faulty {
    type Model = FaultyModel;

    async fn load(&self, _: &Device) -> Result<FaultyModel, BoxError> {
        let control = &self.0;
        control.loads.fetch_add(1, Ordering::SeqCst);
        if control.unrecoverable.load(Ordering::SeqCst) {
            return Err(Unrecoverable::new("malformed weights").into());
        }
        let alive = control.alive.fetch_add(1, Ordering::SeqCst) + 1;
        control.most_alive.fetch_max(alive, Ordering::SeqCst);
        Ok(FaultyModel(control.clone()))
    }
}

impl Model<u32> for FaultyModel {
    type Output = u32;

    fn forward(&self, batch: &[u32]) -> Result<Vec<u32>, BoxError> {
        let control = &self.0;
        control.forwards.fetch_add(1, Ordering::SeqCst);
        if control.fail_everything.load(Ordering::SeqCst) || batch.contains(&FAILS) {
            return Err("device lost".into());
        }
        if batch.contains(&PANICS) {
            panic!("kernel crashed");
        }
        if batch.contains(&HANGS) {
            control.gate.wait();
        }
        Ok(batch.iter().map(|x| x * 2).collect())
    }

    fn warmup_inputs(&self) -> Vec<u32> {
        let panics = &self.0.warmup_panics;
        if panics
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("warm-up crashed");
        }
        vec![1, 2]
    }
}

impl Drop for FaultyModel {
    fn drop(&mut self) {
        self.0.alive.fetch_sub(1, Ordering::SeqCst);
        if self.0.drop_panics.load(Ordering::SeqCst) {
            panic!("model drop crashed");
        }
    }
}

fn quick_restarts() -> PoolConfig {
    PoolConfig::default().with_restart_backoff(Backoff {
        initial: Duration::from_millis(1),
        max: Duration::from_millis(5),
    })
}

fn model_failure(err: &BoxError) -> FailureKind {
    err.downcast_ref::<ModelFailed>()
        .unwrap_or_else(|| panic!("not a model failure: {err}"))
        .kind()
}

/// Waits (bounded) until `condition` holds.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..1000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never true: {what}");
}

/// A [`Faulty`] model served with `pool`, and its control.
fn faulty_serving(pool: PoolConfig) -> (Serving<u32, u32>, Arc<Control>) {
    let loader = Faulty::default();
    let control = loader.0.clone();
    let serving = Serving::start(loader, ServingConfig::new(pool, BatchConfig::default())).unwrap();
    (serving, control)
}

/// The service answers a run of good requests, each with its own output.
async fn serves(serving: &Serving<u32, u32>) {
    for x in 1..=20 {
        assert_eq!(serving.infer(x).await.unwrap(), x * 2);
    }
}

#[tokio::test]
async fn a_panic_in_warm_up_during_a_reload_does_not_break_the_pool() {
    let (serving, control) = faulty_serving(quick_restarts());
    serves(&serving).await;

    control.warmup_panics.store(1, Ordering::SeqCst);
    let err = serving.infer(PANICS).await.unwrap_err();
    assert_eq!(model_failure(&err), FailureKind::Panic);
    // The reload's warm-up panics once, the next one succeeds.
    serves(&serving).await;
    let replica = &serving.replicas()[0];
    assert_eq!(replica.restarts, 1);
    assert_eq!(replica.load_failures, 1);
    assert!(
        replica
            .last_error
            .as_deref()
            .unwrap()
            .contains("warm-up crashed")
    );
    assert_eq!(
        control.alive.load(Ordering::SeqCst),
        1,
        "the model that failed warm-up was dropped"
    );
    assert!(serving.health().live().ok);
}

#[tokio::test]
async fn a_panic_in_the_models_drop_does_not_break_the_pool() {
    let (serving, control) = faulty_serving(quick_restarts());
    serves(&serving).await;

    control.drop_panics.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let err = serving.infer(PANICS).await.unwrap_err();
        assert_eq!(model_failure(&err), FailureKind::Panic);
        // The reload drops the old model, whose `Drop` panics.
        serves(&serving).await;
    }
    assert_eq!(serving.replicas()[0].restarts, 3);
    assert_eq!(control.alive.load(Ordering::SeqCst), 1);
    assert_eq!(control.most_alive.load(Ordering::SeqCst), 1);
    // Shutting down drops the last model, which panics too: no abort.
    drop(serving);
    eventually("the last model is dropped", || {
        control.alive.load(Ordering::SeqCst) == 0
    })
    .await;
}

#[tokio::test]
async fn duration_max_anywhere_is_never_an_overflow() {
    let pool = quick_restarts().with_stall_timeout(Some(Duration::MAX));
    let batch = BatchConfig::default()
        .with_max_batch_size(NonZeroUsize::MIN)
        .with_max_wait(Duration::MAX)
        .with_max_queue_time(Some(Duration::MAX))
        .with_default_timeout(Some(Duration::MAX))
        .with_max_starvation(Duration::MAX);
    let config = ServingConfig::new(pool, batch).with_drain_timeout(Duration::MAX);
    let serving = Serving::start(Faulty::default(), config).unwrap();
    serves(&serving).await;
    let request = Request::new(21).with_timeout(Duration::MAX);
    assert_eq!(serving.infer(request).await.unwrap(), 42);
    assert_eq!(Overloaded::new(Duration::MAX).retry_after_secs(), u64::MAX);
    let report = serving.shutdown_within().await;
    assert_eq!(report.aborted, 0);
}

/// A single-replica pool of a [`Faulty`] model that bisects as deep as it
/// likes: only the policy's own rule limits the forward passes.
fn bisecting_pool(control: &Arc<Control>) -> Pool<u32, u32> {
    let config = quick_restarts().with_failure_policy(FailurePolicy::Bisect { max_depth: 64 });
    Pool::new(Faulty(control.clone()), config).unwrap()
}

/// Runs one batch of `inputs` on `pool`; returns the outcomes and how many
/// forward passes the batch took.
async fn one_batch(
    pool: &mut Pool<u32, u32>,
    control: &Control,
    inputs: Vec<u32>,
) -> (Vec<Result<u32, ModelFailed>>, usize) {
    pool.ready().await.unwrap();
    let before = control.forwards.load(Ordering::SeqCst);
    let outcomes = pool.call(inputs).await.unwrap();
    (outcomes, control.forwards.load(Ordering::SeqCst) - before)
}

#[tokio::test]
async fn a_device_that_fails_every_input_costs_no_more_forwards_than_one_poisoned_input() {
    let bound = 2 * 6 + 1; // 2·log2(64) + 1

    let control = Arc::new(Control::default());
    let mut pool = bisecting_pool(&control);
    let poisoned: Vec<u32> = (0..64).map(|x| if x == 37 { FAILS } else { x }).collect();
    let (outcomes, forwards) = one_batch(&mut pool, &control, poisoned).await;
    assert!(
        forwards <= bound,
        "{forwards} forwards to isolate one input"
    );
    for (x, outcome) in outcomes.into_iter().enumerate() {
        match outcome {
            Ok(y) => assert_eq!(y, 2 * x as u32),
            Err(err) => assert_eq!((x, err.kind()), (37, FailureKind::Error)),
        }
    }

    // A few poisoned inputs, far apart or close together, are still
    // isolated one by one.
    for poison in [[5, 50], [0, 2], [0, 4], [62, 63]] {
        let batch: Vec<u32> = (0..64)
            .map(|x| if poison.contains(&x) { FAILS } else { x })
            .collect();
        let (outcomes, _) = one_batch(&mut pool, &control, batch).await;
        for (x, outcome) in outcomes.into_iter().enumerate() {
            match outcome {
                Ok(y) => assert_eq!(y, 2 * x as u32),
                Err(err) => assert!(poison.contains(&(x as u32)), "input {x} failed: {err}"),
            }
        }
    }

    // A fresh pool on a device that fails everything.
    let control = Arc::new(Control::default());
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let mut pool = metrics::with_local_recorder(&recorder, || bisecting_pool(&control));
    pool.ready().await.unwrap();
    control.fail_everything.store(true, Ordering::SeqCst);
    let (outcomes, forwards) = one_batch(&mut pool, &control, (0..64).collect()).await;
    assert!(
        forwards <= bound,
        "{forwards} forwards for a batch that fails everywhere"
    );
    assert_eq!(forwards, 7, "the batch, its halves, and their halves once");
    assert!(
        outcomes
            .iter()
            .all(|o| o.as_ref().unwrap_err().kind() == FailureKind::Error)
    );
    let systemic: u64 = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == "candlewick_batch_systemic_failures_total")
        .map(|(.., value)| match value {
            metrics_util::debugging::DebugValue::Counter(n) => n,
            other => panic!("not a counter: {other:?}"),
        })
        .sum();
    assert_eq!(systemic, 1);
}

#[tokio::test]
async fn a_replica_that_hangs_again_and_again_fails_for_good_instead_of_leaking_models() {
    let loader = Faulty::default();
    let control = loader.0.clone();
    let pool = quick_restarts().with_stall_timeout(Some(Duration::from_millis(50)));
    let serving = Serving::start(loader, ServingConfig::new(pool, BatchConfig::default())).unwrap();
    serves(&serving).await;

    // The first hang: answered as stalled, the replica replaced.
    let err = serving.infer(HANGS).await.unwrap_err();
    assert_eq!(model_failure(&err), FailureKind::Stalled);
    serves(&serving).await;
    assert_eq!(serving.replicas()[0].stuck_threads, 1);
    assert!(serving.health().live().ok);

    // The second hang reaches the bound of two stuck threads: not replaced.
    let err = serving.infer(HANGS).await.unwrap_err();
    assert_eq!(model_failure(&err), FailureKind::Stalled);
    let replica = serving.replicas()[0].clone();
    assert!(replica.failed_for_good);
    assert_eq!(replica.stuck_threads, 2);
    let live = serving.health().live();
    assert!(!live.ok);
    assert!(
        live.reason.starts_with("replica 0 (cpu) failed for good"),
        "{}",
        live.reason
    );

    // Requests are answered at once, with the reason, instead of waiting.
    for x in 0..10 {
        let err = tokio::time::timeout(Duration::from_secs(5), serving.infer(x))
            .await
            .expect("answered without waiting for a replica")
            .unwrap_err();
        let closed = err
            .downcast_ref::<Closed>()
            .unwrap_or_else(|| panic!("{err}"));
        assert!(
            closed.to_string().contains("no replica can serve"),
            "{closed}"
        );
    }
    assert_eq!(
        control.most_alive.load(Ordering::SeqCst),
        2,
        "one model per stuck thread, no more"
    );

    // Once the stuck forwards return, their models are freed.
    control.gate.open();
    eventually("stuck models freed", || {
        control.alive.load(Ordering::SeqCst) == 0
    })
    .await;
    eventually("no thread stuck", || {
        serving.replicas()[0].stuck_threads == 0
    })
    .await;
}

#[cfg(not(feature = "cuda"))]
#[tokio::test]
async fn a_device_this_build_cannot_open_fails_start() {
    let pool = PoolConfig::default().with_devices(vec![DeviceLocation::Cuda { gpu_id: 0 }]);
    let err = Serving::start(
        Faulty::default(),
        ServingConfig::new(pool, BatchConfig::default()),
    )
    .unwrap_err();
    assert!(matches!(err, PoolError::DeviceUnsupported { .. }));
    assert_eq!(
        err.to_string(),
        "cannot run replicas on cuda:0: this build has no CUDA support (enable candlewick's `cuda` feature)"
    );
}

#[tokio::test]
async fn an_unrecoverable_load_error_fails_fast_and_says_why() {
    let loader = Faulty::default();
    let control = loader.0.clone();
    control.unrecoverable.store(true, Ordering::SeqCst);
    let config = PoolConfig::default().with_replicas_per_device(NonZeroUsize::new(2).unwrap());
    let serving =
        Serving::start(loader, ServingConfig::new(config, BatchConfig::default())).unwrap();

    let err = serving.started().await.unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("replica 0 (cpu): cannot load its model: malformed weights")
            && message.contains("replica 1 (cpu)"),
        "{message}"
    );
    assert_eq!(control.loads.load(Ordering::SeqCst), 2, "no retries");
    assert!(!serving.health().live().ok);
    let err = serving.infer(1).await.unwrap_err();
    assert!(err.is::<Closed>());
    assert!(err.to_string().contains("malformed weights"), "{err}");
}

#[tokio::test]
async fn a_panicking_inner_service_fails_only_its_batch() {
    // Panics in `call` for a batch holding 13, in its future for one holding 14.
    let inner = service_fn(|batch: Vec<u32>| {
        assert!(!batch.contains(&13), "call crashed");
        async move {
            assert!(!batch.contains(&14), "future crashed");
            Ok::<_, BoxError>(doubled(batch))
        }
    });
    let batch: Batch<u32, u32> = BatchLayer::new(BatchConfig::default()).layer(inner);
    for round in 0..3 {
        for bad in [13, 14] {
            let err = batch.infer(bad).await.unwrap_err();
            assert_eq!(model_failure(&err), FailureKind::Panic, "round {round}");
            assert!(err.to_string().contains("crashed"), "{err}");
        }
        assert_eq!(batch.infer(21).await.unwrap(), 42);
    }
    // Nothing leaked: no batch counts as running, and a drain ends at once.
    assert_eq!(batch.batches_in_flight(), 0);
    let report = batch
        .drain(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    assert_eq!(report.aborted, 0);
}

#[tokio::test]
async fn an_inner_service_that_panics_when_polled_closes_the_queue_with_the_reason() {
    struct PanicsWhenPolled;

    impl Service<Vec<u32>> for PanicsWhenPolled {
        type Response = Vec<Result<u32, BoxError>>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<Self::Response, BoxError>>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), BoxError>> {
            panic!("poll_ready crashed");
        }

        fn call(&mut self, batch: Vec<u32>) -> Self::Future {
            std::future::ready(Ok(doubled(batch)))
        }
    }

    let batch = Batch::new(PanicsWhenPolled, BatchConfig::default());
    let err = batch.infer(1).await.unwrap_err();
    assert!(err.is::<Closed>(), "{err}");
    assert!(err.to_string().contains("poll_ready crashed"), "{err}");
    assert!(batch.is_closed());
    // Later requests hear the same reason at once, and a tower caller
    // hears it from `poll_ready`, as from tower's own `Buffer`.
    let err = batch.infer(2).await.unwrap_err();
    assert!(err.to_string().contains("poll_ready crashed"), "{err}");
    let err = batch.clone().ready().await.unwrap_err();
    assert!(err.is::<Closed>(), "{err}");
    assert!(err.to_string().contains("poll_ready crashed"), "{err}");
}

#[tokio::test]
async fn a_panicking_cost_or_validate_hook_fails_only_that_request() {
    let double = service_fn(|batch: Vec<u32>| async move { Ok::<_, BoxError>(doubled(batch)) });
    let layer = BatchLayer::new(BatchConfig::default())
        .cost(|x: &u32| {
            assert_ne!(*x, 7, "cost crashed");
            1
        })
        .validate(|x: &u32| {
            assert_ne!(*x, 8, "validate crashed");
            Ok(())
        });
    let batch = layer.layer(double);
    for _ in 0..3 {
        for (bad, hook) in [(7, "cost"), (8, "validate")] {
            let err = batch.infer(bad).await.unwrap_err();
            assert_eq!(model_failure(&err), FailureKind::Panic);
            assert!(
                err.to_string().contains(&format!("{hook} hook panicked")),
                "{err}"
            );
        }
        assert_eq!(batch.infer(21).await.unwrap(), 42);
    }
}

/// An input whose `Drop` panics: dropped where the queue used to hold its lock.
struct Bomb(u32);

impl Drop for Bomb {
    fn drop(&mut self) {
        if self.0 == 0 && !std::thread::panicking() {
            panic!("input drop crashed");
        }
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_refused_input_whose_drop_panics_still_gets_its_error() {
    let config = BatchConfig::default()
        .with_queue_capacity(NonZeroUsize::new(2).unwrap())
        .with_max_wait(Duration::from_secs(1))
        .with_wait_policy(WaitPolicy::Fixed);
    let batch = BatchLayer::new(config)
        .validate(|bomb: &Bomb| {
            if bomb.0 == 0 {
                return Err("zero".into());
            }
            Ok(())
        })
        .layer(service_fn(|batch: Vec<Bomb>| async move {
            Ok::<_, BoxError>(doubled(batch.iter().map(|b| b.0).collect()))
        }));
    // Invalid, alone and in a group: refused, and the panicking `Drop` of
    // the refused inputs is contained.
    let err = batch.infer(Bomb(0)).await.unwrap_err();
    assert!(err.is::<InvalidInput>(), "{err}");
    let group = vec![Request::new(Bomb(1)), Request::new(Bomb(0))];
    let err = batch.infer_all(group).await.unwrap_err();
    assert!(err.is::<InvalidInput>(), "{err}");
    // Overloaded: the queue is full, so the group is refused before it is
    // even looked at.
    let held: Vec<_> = (1..=2)
        .map(|i| batch.clone().call(Bomb(i).into()))
        .collect();
    let err = batch
        .infer_all(vec![Request::new(Bomb(0))])
        .await
        .unwrap_err();
    assert!(err.is::<Overloaded>(), "{err}");
    tokio::time::advance(Duration::from_secs(2)).await;
    for (i, request) in held.into_iter().enumerate() {
        assert_eq!(request.await.unwrap(), (i as u32 + 1) * 2);
    }
    assert!(!batch.is_closed());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_input_whose_drop_panics_cannot_poison_the_queue() {
    fn inner() -> impl Service<
        Vec<Bomb>,
        Response = Answers,
        Error = BoxError,
        Future = impl Future<Output = Result<Answers, BoxError>> + Send,
    > + Send
    + 'static {
        service_fn(|batch: Vec<Bomb>| async move {
            Ok::<_, BoxError>(doubled(batch.iter().map(|b| b.0).collect()))
        })
    }

    // Requests wait in the queue for a batch to fill, so cancelled ones are
    // purged there, by the worker.
    let config = BatchConfig::default()
        .with_max_batch_size(NonZeroUsize::new(4).unwrap())
        .with_max_wait(Duration::from_secs(1))
        .with_wait_policy(WaitPolicy::Fixed);
    let mut batch = Batch::new(inner(), config);
    for round in 1..=3u32 {
        drop(batch.call(Bomb(0).into()));
        let good = batch.call(Bomb(round).into());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(good.await.unwrap(), round * 2);
        assert!(!batch.is_closed());
    }

    // A full queue reclaims the slots of cancelled requests by purging them,
    // in the caller's task.
    let config = BatchConfig::default()
        .with_queue_capacity(NonZeroUsize::MIN)
        .with_max_wait(Duration::from_secs(1))
        .with_wait_policy(WaitPolicy::Fixed);
    let mut batch = Batch::new(inner(), config);
    for round in 1..=3u32 {
        drop(batch.call(Bomb(0).into()));
        let good = batch.call(Bomb(round).into());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(good.await.unwrap(), round * 2);
        assert!(!batch.is_closed());
    }
}

#[tokio::test]
async fn a_panicking_drop_of_inputs_or_unwanted_outputs_leaves_the_replica_idle_once() {
    /// Panics when dropped holding 0.
    struct Boom(u32);

    impl Drop for Boom {
        fn drop(&mut self) {
            if self.0 == 0 && !std::thread::panicking() {
                panic!("drop crashed");
            }
        }
    }

    let loader = |_: &Device| -> Result<_, BoxError> {
        Ok(|batch: &[Boom]| -> Result<Vec<Boom>, BoxError> {
            // Slow enough for a caller to give up first.
            std::thread::sleep(Duration::from_millis(20));
            // 7 becomes an output whose `Drop` panics.
            Ok(batch
                .iter()
                .map(|b| Boom(if b.0 == 7 { 0 } else { b.0 + 1 }))
                .collect())
        })
    };
    let mut pool = Pool::new(loader, quick_restarts()).unwrap();
    for _ in 0..3 {
        // Inputs whose `Drop` panics, dropped on the replica thread.
        let outputs = pool
            .ready()
            .await
            .unwrap()
            .call(vec![Boom(0), Boom(1)])
            .await
            .unwrap();
        let values: Vec<u32> = outputs.iter().map(|o| o.as_ref().unwrap().0).collect();
        assert_eq!(values, [1, 2]);
        // An output whose `Drop` panics, dropped on the replica thread
        // because its caller went away.
        let abandoned = pool.ready().await.unwrap().call(vec![Boom(7)]);
        drop(abandoned);
        eventually("the replica is idle again", || pool.idle_replicas() == 1).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(pool.idle_replicas(), 1, "one permit per idle replica");
    }
    assert_eq!(pool.replicas()[0].restarts, 0);
}

#[tokio::test]
async fn a_load_once_whose_load_panics_loads_again_for_the_next_caller() {
    let weights: candlewick::LoadOnce<u32> = candlewick::LoadOnce::new();
    let first = weights.clone();
    let panicked = tokio::spawn(async move {
        first
            .get_or_try_load(|| async { panic!("reading the weights crashed") })
            .await
            .map(|w| *w)
            .map_err(|e: BoxError| e.to_string())
    })
    .await;
    assert!(panicked.unwrap_err().is_panic());
    assert_eq!(weights.get(), None);
    let loaded = weights
        .get_or_try_load(|| async { Ok::<_, BoxError>(7) })
        .await
        .unwrap();
    assert_eq!(*loaded, 7);
}

/// A batch service's answer: one result per input.
type Answers = Vec<Result<u32, BoxError>>;

/// A batch service's answer that doubles every input.
fn doubled(batch: Vec<u32>) -> Answers {
    batch.into_iter().map(|x| Ok(x * 2)).collect()
}
