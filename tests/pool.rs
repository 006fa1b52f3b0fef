//! The device pool on real replica threads with closure models on the CPU.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use candle_core::{Device, DeviceLocation};
use candlewick::error::{FailureKind, ModelFailed};
use candlewick::pool::{
    Backoff, FailurePolicy, Pool, PoolConfig, PoolError, ReplicaState, Staging,
};
use candlewick::{BoxError, Serving, ServingConfig};
use tower::{Service, ServiceExt};

fn quick_restarts(replicas: usize) -> PoolConfig {
    PoolConfig::default()
        .with_replicas_per_device(NonZeroUsize::new(replicas).unwrap())
        .with_restart_backoff(Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(10),
        })
}

/// Runs one batch on `pool`; every input must fail alike, and this is how.
async fn failed_batch(pool: &mut Pool<u32, u32>, batch: Vec<u32>) -> ModelFailed {
    let outcomes = pool.ready().await.unwrap().call(batch).await.unwrap();
    let first = outcomes[0].clone().unwrap_err();
    for outcome in outcomes {
        assert_eq!(outcome.unwrap_err().kind(), first.kind());
    }
    first
}

/// Runs one batch on `pool`, which must succeed for every input.
async fn good_batch(pool: &mut Pool<u32, u32>, batch: Vec<u32>) -> Vec<u32> {
    let outcomes = pool.ready().await.unwrap().call(batch).await.unwrap();
    outcomes.into_iter().map(Result::unwrap).collect()
}

/// A model that doubles its inputs, fails batches holding 1000, returns one
/// output too few for batches holding 2000 and panics on batches holding 3000.
fn troubled(_: &Device) -> Result<impl Fn(&[u32]) -> Result<Vec<u32>, BoxError> + use<>, BoxError> {
    Ok(|batch: &[u32]| -> Result<Vec<u32>, BoxError> {
        if batch.contains(&1000) {
            return Err("bad batch".into());
        }
        if batch.contains(&3000) {
            panic!("kernel crashed");
        }
        let mut out: Vec<u32> = batch.iter().map(|x| x * 2).collect();
        if batch.contains(&2000) {
            out.pop();
        }
        Ok(out)
    })
}

#[tokio::test]
async fn a_model_error_fails_only_that_batch() {
    let config = quick_restarts(1).with_failure_policy(FailurePolicy::FailBatch);
    let mut pool = Pool::new(troubled, config).unwrap();
    let err = failed_batch(&mut pool, vec![1, 1000]).await;
    assert_eq!(err.kind(), FailureKind::Error);
    assert!(err.to_string().contains("bad batch"));
    assert_eq!(good_batch(&mut pool, vec![1, 2]).await, [2, 4]);
    assert_eq!(pool.replicas()[0].restarts, 0);
}

#[tokio::test]
async fn a_wrong_output_count_fails_only_that_batch() {
    let mut pool = Pool::new(troubled, quick_restarts(1)).unwrap();
    let err = failed_batch(&mut pool, vec![1, 2000, 3]).await;
    assert_eq!(
        err.kind(),
        FailureKind::OutputCount {
            expected: 3,
            actual: 2
        }
    );
    assert_eq!(good_batch(&mut pool, vec![5]).await, [10]);
}

#[tokio::test]
async fn a_panic_in_forward_reloads_the_replica_and_later_requests_succeed() {
    let loads = Arc::new(AtomicUsize::new(0));
    let counted = loads.clone();
    let loader = move |device: &Device| {
        counted.fetch_add(1, Ordering::SeqCst);
        troubled(device)
    };
    let mut pool = Pool::new(loader, quick_restarts(1)).unwrap();
    let err = failed_batch(&mut pool, vec![3000, 1]).await;
    assert_eq!(err.kind(), FailureKind::Panic);
    assert!(err.to_string().contains("kernel crashed"));
    assert_eq!(good_batch(&mut pool, vec![21]).await, [42]);
    assert_eq!(loads.load(Ordering::SeqCst), 2);
    assert_eq!(pool.replicas()[0].restarts, 1);
}

#[tokio::test]
async fn a_model_whose_drop_hangs_after_a_panic_shows_restarting_not_busy() {
    /// Held by the model: its `Drop` waits until the gate opens.
    struct HangingDrop(Arc<Mutex<std::sync::mpsc::Receiver<()>>>);
    impl Drop for HangingDrop {
        fn drop(&mut self) {
            let _ = self.0.lock().unwrap().recv();
        }
    }
    let (open, gate) = std::sync::mpsc::channel::<()>();
    let gate = Arc::new(Mutex::new(gate));
    let loader = move |device: &Device| {
        let held = HangingDrop(gate.clone());
        let model = troubled(device)?;
        Ok::<_, BoxError>(move |batch: &[u32]| {
            let _held = &held;
            model(batch)
        })
    };
    let mut pool = Pool::new(loader, quick_restarts(1)).unwrap();
    let err = failed_batch(&mut pool, vec![3000]).await;
    assert_eq!(err.kind(), FailureKind::Panic);
    // The panicked model's `Drop` hangs: the replica says it is
    // restarting, so health does not count it as serving.
    until("the replica shows Restarting", || {
        pool.replicas()[0].state == ReplicaState::Restarting
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(pool.replicas()[0].state, ReplicaState::Restarting);
    // Open for good (every later `recv` fails at once): it reloads and serves.
    drop(open);
    assert_eq!(good_batch(&mut pool, vec![21]).await, [42]);
}

#[tokio::test]
async fn a_failing_load_is_retried_with_backoff() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    let loader = move |device: &Device| {
        if counted.fetch_add(1, Ordering::SeqCst) < 2 {
            return Err("weights not there yet".into());
        }
        troubled(device)
    };
    let mut pool = Pool::new(loader, quick_restarts(1)).unwrap();
    assert_eq!(good_batch(&mut pool, vec![1]).await, [2]);
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_panicking_load_is_caught_and_retried() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    let loader = move |device: &Device| {
        if counted.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("corrupt checkpoint");
        }
        troubled(device)
    };
    let mut pool = Pool::new(loader, quick_restarts(1)).unwrap();
    assert_eq!(good_batch(&mut pool, vec![4]).await, [8]);
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
}

/// Blocks until `parties` threads have arrived, or fails after a timeout.
struct Rendezvous {
    arrived: Mutex<usize>,
    all_here: Condvar,
    parties: usize,
}

impl Rendezvous {
    fn wait(&self) -> Result<(), BoxError> {
        let mut arrived = self.arrived.lock().unwrap();
        *arrived += 1;
        self.all_here.notify_all();
        let (arrived, timeout) = self
            .all_here
            .wait_timeout_while(arrived, Duration::from_secs(10), |n| *n < self.parties)
            .unwrap();
        drop(arrived);
        if timeout.timed_out() {
            return Err("the other batch never ran at the same time".into());
        }
        Ok(())
    }
}

#[tokio::test]
async fn two_replicas_run_two_batches_at_the_same_time() {
    let meeting = Arc::new(Rendezvous {
        arrived: Mutex::new(0),
        all_here: Condvar::new(),
        parties: 2,
    });
    let loader = move |_: &Device| {
        let meeting = meeting.clone();
        Ok(move |batch: &[u32]| -> Result<Vec<u32>, BoxError> {
            meeting.wait()?;
            Ok(batch.to_vec())
        })
    };
    let pool = Pool::new(loader, quick_restarts(2)).unwrap();
    let (mut a, mut b) = (pool.clone(), pool.clone());
    let first = tokio::spawn(async move { a.ready().await?.call(vec![1]).await });
    let second = tokio::spawn(async move { b.ready().await?.call(vec![2]).await });
    assert_eq!(first.await.unwrap().unwrap(), [Ok(1)]);
    assert_eq!(second.await.unwrap().unwrap(), [Ok(2)]);
}

#[tokio::test]
async fn poll_ready_waits_until_a_replica_has_loaded() {
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let gate = Mutex::new(gate);
    let loader = move |device: &Device| {
        gate.lock().unwrap().recv().map_err(|_| "gate dropped")?;
        troubled(device)
    };
    let mut pool = Pool::new(loader, quick_restarts(1)).unwrap();
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    assert!(pool.poll_ready(&mut cx).is_pending());
    assert_eq!(pool.replicas()[0].state, ReplicaState::Loading);
    release.send(()).unwrap();
    assert_eq!(good_batch(&mut pool, vec![3]).await, [6]);
    assert!(pool.replicas()[0].load_time.is_some());
}

#[tokio::test]
async fn warmup_runs_before_the_replica_takes_traffic() {
    struct Warm(Arc<Mutex<Vec<Vec<u32>>>>);
    impl candlewick::Model<u32> for Warm {
        type Output = u32;
        fn forward(&self, batch: &[u32]) -> Result<Vec<u32>, BoxError> {
            self.0.lock().unwrap().push(batch.to_vec());
            Ok(batch.to_vec())
        }
        fn warmup_inputs(&self) -> Vec<u32> {
            vec![0, 0]
        }
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let loader = move |_: &Device| Ok(Warm(log.clone()));
    let mut pool = Pool::new(loader, quick_restarts(1)).unwrap();
    pool.ready().await.unwrap().call(vec![7]).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), [vec![0, 0], vec![7]]);
    assert!(pool.replicas()[0].warmup_time.is_some());
}

#[test]
fn a_pool_without_devices_is_refused() {
    let err = Pool::new(troubled, PoolConfig::default().with_devices(vec![])).unwrap_err();
    assert!(matches!(err, PoolError::NoDevices));
}

#[tokio::test]
async fn replicas_confined_to_their_own_cpu_threads_serve_candle_models() {
    let config = quick_restarts(2)
        .with_devices(vec![DeviceLocation::Cpu])
        .with_cpu_threads_per_replica(NonZeroUsize::new(1));
    let loader = |device: &Device| {
        let device = device.clone();
        Ok(move |batch: &[Vec<f32>]| -> Result<Vec<f32>, BoxError> {
            let rows = candlewick::collate::split_rows(&candle_core::Tensor::new(
                batch.to_vec(),
                &device,
            )?)?;
            rows.iter()
                .map(|row| {
                    Ok(row.sum_all()?.to_scalar::<f32>()? * rayon::current_num_threads() as f32)
                })
                .collect()
        })
    };
    let serving = Serving::start(loader, ServingConfig::new(config, Default::default())).unwrap();
    // Each replica sees a rayon pool of exactly one thread.
    assert_eq!(serving.infer(vec![1.0, 2.0, 3.0]).await.unwrap(), 6.0);
    assert_eq!(serving.replicas().len(), 2);
}

#[tokio::test]
async fn the_serving_stack_answers_each_request_with_its_own_output() {
    let config = ServingConfig::new(quick_restarts(2), Default::default());
    let serving = Serving::start(troubled, config).unwrap();
    let tasks: Vec<_> = (0..200u32)
        .map(|i| {
            let serving = serving.clone();
            tokio::spawn(async move { (i, serving.infer(i).await) })
        })
        .collect();
    for task in tasks {
        let (i, result) = task.await.unwrap();
        assert_eq!(result.unwrap(), i * 2);
    }
}

#[tokio::test]
async fn one_poisoned_input_among_63_good_ones_fails_alone_under_bisect() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let loader = move |device: &Device| {
        let model = troubled(device)?;
        let counted = counted.clone();
        Ok(move |batch: &[u32]| {
            counted.fetch_add(1, Ordering::SeqCst);
            model(batch)
        })
    };
    let mut pool = Pool::new(loader, quick_restarts(1)).unwrap();
    let mut batch: Vec<u32> = (0..64).collect();
    batch[37] = 1000;
    let outcomes = pool
        .ready()
        .await
        .unwrap()
        .call(batch.clone())
        .await
        .unwrap();
    for (input, outcome) in batch.iter().zip(&outcomes) {
        match outcome {
            Ok(output) => assert_eq!(*output, input * 2),
            Err(err) => {
                assert_eq!(*input, 1000, "a good input failed: {err}");
                assert_eq!(err.kind(), FailureKind::Error);
            }
        }
    }
    assert_eq!(outcomes.iter().filter(|o| o.is_err()).count(), 1);
    // The failed batch, then both halves at each of 6 levels.
    assert_eq!(runs.load(Ordering::SeqCst), 1 + 2 * 6);
}

#[tokio::test]
async fn bisect_stops_at_its_depth_bound() {
    let config = quick_restarts(1).with_failure_policy(FailurePolicy::Bisect { max_depth: 1 });
    let mut pool = Pool::new(troubled, config).unwrap();
    let outcomes = pool
        .ready()
        .await
        .unwrap()
        .call(vec![1, 1000, 3, 4])
        .await
        .unwrap();
    // One split: the half holding the poisoned input fails whole.
    assert!(outcomes[0].is_err() && outcomes[1].is_err());
    assert_eq!(outcomes[2..], [Ok(6), Ok(8)]);
}

#[tokio::test]
async fn a_stalled_batch_is_answered_and_its_replica_replaced() {
    let (unstick, stuck) = std::sync::mpsc::channel::<()>();
    let stuck = Arc::new(Mutex::new(stuck));
    let loader = move |device: &Device| {
        let model = troubled(device)?;
        let stuck = stuck.clone();
        Ok(move |batch: &[u32]| {
            if batch.contains(&7777) {
                let _ = stuck.lock().unwrap().recv();
            }
            model(batch)
        })
    };
    let config = quick_restarts(1).with_stall_timeout(Some(Duration::from_millis(50)));
    let mut pool = Pool::new(loader, config).unwrap();
    let err = failed_batch(&mut pool, vec![1, 7777]).await;
    assert_eq!(err.kind(), FailureKind::Stalled);
    // The replacement serves while the stuck thread is still stuck.
    assert_eq!(good_batch(&mut pool, vec![5]).await, [10]);
    let status = &pool.replicas()[0];
    assert_eq!(status.stalls, 1);
    assert_ne!(status.state, ReplicaState::Stalled);
    unstick.send(()).unwrap();
    // The stuck thread retires without adding capacity: one replica, idle.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(pool.idle_replicas(), 1);
    assert_eq!(good_batch(&mut pool, vec![6]).await, [12]);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(pool.idle_replicas(), 1);
}

#[test]
fn a_zero_stall_timeout_is_refused() {
    let config = quick_restarts(1).with_stall_timeout(Some(Duration::ZERO));
    let err = Pool::new(troubled, config).unwrap_err();
    assert!(
        matches!(
            err,
            PoolError::Invalid {
                setting: "stall_timeout",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("longer than zero"), "{err}");
}

#[tokio::test]
async fn a_cpu_replica_reports_whether_candle_computes_at_its_parallelism() {
    let loader = |_: &Device| -> Result<_, BoxError> {
        Ok(|batch: &[u32]| -> Result<Vec<u32>, BoxError> { Ok(batch.to_vec()) })
    };
    let candle = candlewick::device::candle_cpu_threads();
    for threads in [candle, candle + 1] {
        let config = PoolConfig::default().with_cpu_threads_per_replica(NonZeroUsize::new(threads));
        let pool: Pool<u32, u32> = Pool::new(loader, config).unwrap();
        let status = pool.replicas()[0]
            .cpu_threads
            .expect("a CPU replica on its own pool");
        assert_eq!((status.replica, status.candle), (threads, candle));
        match status.warning() {
            None => assert_eq!(threads, candle),
            Some(warning) => {
                assert_ne!(threads, candle);
                assert!(
                    warning.contains(&format!("RAYON_NUM_THREADS={threads}")),
                    "{warning}"
                );
            }
        }
    }
    // Sharing rayon's global pool, candle's count is the pool's: nothing to agree on.
    let pool: Pool<u32, u32> = Pool::new(loader, PoolConfig::default()).unwrap();
    assert_eq!(pool.replicas()[0].cpu_threads, None);
}

#[tokio::test]
async fn a_replica_serves_and_stops_whether_it_never_polls_or_polls_without_end() {
    for spin in [Duration::ZERO, Duration::MAX] {
        serves_and_stops_with_handoff_spin(spin).await;
    }
}

async fn serves_and_stops_with_handoff_spin(spin: Duration) {
    /// Counts live models.
    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let alive = Arc::new(AtomicUsize::new(0));
    let loader = {
        let alive = alive.clone();
        move |_: &Device| -> Result<_, BoxError> {
            alive.fetch_add(1, Ordering::SeqCst);
            let counted = Counted(alive.clone());
            Ok(move |batch: &[u32]| -> Result<Vec<u32>, BoxError> {
                let _ = &counted;
                Ok(batch.iter().map(|x| x * 2).collect())
            })
        }
    };
    // Blocking at once, or polling "forever" after each batch: it must
    // still take the next batch, and stop once the pool is gone.
    let config = quick_restarts(1).with_handoff_spin(spin);
    let mut pool = Pool::new(loader, config).unwrap();
    for i in 0..3 {
        assert_eq!(good_batch(&mut pool, vec![i]).await, [i * 2], "{spin:?}");
    }
    assert_eq!(alive.load(Ordering::SeqCst), 1);
    drop(pool);
    let stopped = async {
        while alive.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("the replica stops once its pool is dropped");
}

/// A model that doubles its inputs, and blocks on a batch holding 7777 until
/// released, or panics on one holding 3000 once released; it logs the
/// batches it runs.
struct Gated {
    release: std::sync::mpsc::Sender<()>,
    seen: Arc<Mutex<Vec<Vec<u32>>>>,
}

fn gated(config: PoolConfig) -> (Pool<u32, u32>, Gated) {
    let (loader, gated) = gated_loader();
    (Pool::new(loader, config).unwrap(), gated)
}

fn gated_loader() -> (
    impl candlewick::Loader<u32, Model: candlewick::Model<u32, Output = u32>>,
    Gated,
) {
    gated_loader_loading(usize::MAX)
}

/// [`gated_loader`], whose loads after the first `loads` fail.
fn gated_loader_loading(
    loads: usize,
) -> (
    impl candlewick::Loader<u32, Model: candlewick::Model<u32, Output = u32>>,
    Gated,
) {
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let gate = Arc::new(Mutex::new(gate));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let loaded = AtomicUsize::new(0);
    let loader = move |_: &Device| -> Result<_, BoxError> {
        if loaded.fetch_add(1, Ordering::SeqCst) >= loads {
            return Err("the device is gone".into());
        }
        let (gate, log) = (gate.clone(), log.clone());
        Ok(move |batch: &[u32]| -> Result<Vec<u32>, BoxError> {
            log.lock().unwrap().push(batch.to_vec());
            if batch.contains(&7777) || batch.contains(&3000) {
                let _ = gate.lock().unwrap().recv();
            }
            assert!(!batch.contains(&3000), "kernel crashed");
            Ok(batch.iter().map(|x| x * 2).collect())
        })
    };
    (loader, Gated { release, seen })
}

/// Whether `pool.poll_ready` is ready now.
fn is_ready(pool: &mut Pool<u32, u32>) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match pool.poll_ready(&mut cx) {
        std::task::Poll::Ready(result) => result.is_ok(),
        std::task::Poll::Pending => false,
    }
}

/// Starts `batch` on `pool`, which must be ready, and returns its answer's
/// task.
fn start(pool: &mut Pool<u32, u32>, batch: Vec<u32>) -> Started {
    assert!(is_ready(pool), "the pool takes {batch:?}");
    tokio::spawn(pool.call(batch))
}

/// The answer of a batch started with [`start`].
type Started = tokio::task::JoinHandle<Result<Vec<Result<u32, ModelFailed>>, BoxError>>;

/// A gated pool of `config` that has served `[1]` (so its one replica has
/// added a place to the stage) and now runs `blocker`, held at the gate.
async fn busy(config: PoolConfig, blocker: u32) -> (Pool<u32, u32>, Gated, Staging, Started) {
    let (mut pool, gated) = gated(config);
    let staging = pool.staging();
    good_batch(&mut pool, vec![1]).await;
    let running = start(&mut pool, vec![blocker]);
    until_seen(&gated, 2).await;
    (pool, gated, staging, running)
}

/// Waits until `done`, for at most 10 s; fails saying `what` it waited for.
async fn until(what: &str, done: impl Fn() -> bool) {
    let reached = async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), reached)
        .await
        .unwrap_or_else(|_| panic!("waited 10 s for: {what}"));
}

/// Waits until the model has seen `n` batches.
async fn until_seen(gated: &Gated, n: usize) {
    until("the batch reached the model", || {
        gated.seen.lock().unwrap().len() >= n
    })
    .await;
}

/// A gated pool that has served `[1]`, with its one replica reserved by
/// the returned handle and `[4]` staged meanwhile.
async fn staged_beside_a_reserved_replica() -> (Pool<u32, u32>, Gated, Pool<u32, u32>, Started) {
    let (mut pool, gated) = gated(quick_restarts(1));
    let staging = pool.staging();
    good_batch(&mut pool, vec![1]).await;
    let mut holder = pool.clone();
    assert!(is_ready(&mut holder));
    staging.offer_full_batch(true);
    let staged = start(&mut pool, vec![4]);
    (pool, gated, holder, staged)
}

#[tokio::test]
async fn a_busy_pool_stages_a_batch_only_when_offered_one_and_runs_it_when_the_replica_frees() {
    let (mut pool, gated, staging, running) = busy(quick_restarts(1), 7777).await;
    // Busy, and no full batch offered: not ready, as without a stage.
    assert!(!is_ready(&mut pool));
    assert!(staging.would_stage());
    staging.offer_full_batch(true);
    let staged = start(&mut pool, vec![2, 3]);
    // One replica: one place in the stage, now taken.
    let mut other = pool.clone();
    assert!(!is_ready(&mut other));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(gated.seen.lock().unwrap().len(), 2, "staged, not run");
    gated.release.send(()).unwrap();
    assert_eq!(running.await.unwrap().unwrap(), [Ok(15554)]);
    assert_eq!(staged.await.unwrap().unwrap(), [Ok(4), Ok(6)]);
    assert_eq!(
        *gated.seen.lock().unwrap(),
        [vec![1], vec![7777], vec![2, 3]]
    );
    // The place is free again, and the replica idle: with no full batch
    // offered, `other` is ready through the replica alone.
    staging.offer_full_batch(false);
    assert!(is_ready(&mut other));
    assert_eq!(pool.idle_replicas(), 0, "reserved by `other`");
}

#[tokio::test]
async fn a_staged_batch_runs_after_its_replica_panics_and_reloads() {
    let (mut pool, gated, staging, crashing) = busy(quick_restarts(1), 3000).await;
    staging.offer_full_batch(true);
    let staged = start(&mut pool, vec![5]);
    gated.release.send(()).unwrap();
    let outcomes = crashing.await.unwrap().unwrap();
    assert_eq!(outcomes[0].clone().unwrap_err().kind(), FailureKind::Panic);
    assert_eq!(staged.await.unwrap().unwrap(), [Ok(10)]);
    assert_eq!(pool.replicas()[0].restarts, 1);
}

/// The answer of `[5]`, staged on a one-replica pool that was dropped (a
/// service dropped without a drain) while its replica ran a batch that
/// panics; the replica's loads after the first `loads` fail.
async fn staged_after_the_pool_is_dropped(
    loads: usize,
) -> Result<Vec<Result<u32, ModelFailed>>, BoxError> {
    let (loader, gated) = gated_loader_loading(loads);
    let mut pool = Pool::new(loader, quick_restarts(1)).unwrap();
    let staging = pool.staging();
    good_batch(&mut pool, vec![1]).await;
    let crashing = start(&mut pool, vec![3000]);
    until_seen(&gated, 2).await;
    staging.offer_full_batch(true);
    let staged = start(&mut pool, vec![5]);
    // A status view (as `Health` holds) keeps the pool's board alive: the
    // staged batch must be answered by the replica, not by the board's drop.
    let status = pool.status();
    drop((pool, staging));
    gated.release.send(()).unwrap();
    let outcomes = crashing.await.unwrap().unwrap();
    assert_eq!(outcomes[0].clone().unwrap_err().kind(), FailureKind::Panic);
    let answer = tokio::time::timeout(Duration::from_secs(10), staged)
        .await
        .expect("the staged batch is answered")
        .unwrap();
    drop(status);
    answer
}

#[tokio::test]
async fn a_staged_batch_runs_after_its_replica_reloads_even_once_the_pool_is_dropped() {
    assert_eq!(
        staged_after_the_pool_is_dropped(usize::MAX).await.unwrap(),
        [Ok(10)]
    );
}

#[tokio::test]
async fn a_staged_batch_is_closed_when_its_replica_cannot_reload_once_the_pool_is_dropped() {
    // One load is tried for it, and fails: the batch is closed, not kept
    // waiting by a thread that retries for good.
    let err = staged_after_the_pool_is_dropped(1).await.unwrap_err();
    assert!(err.is::<candlewick::error::Closed>(), "{err}");
}

#[tokio::test]
async fn a_staged_batch_runs_on_the_replacement_of_a_stalled_replica() {
    let config = quick_restarts(1).with_stall_timeout(Some(Duration::from_millis(500)));
    let (mut pool, gated, staging, stuck) = busy(config, 7777).await;
    staging.offer_full_batch(true);
    let staged = start(&mut pool, vec![6]);
    let outcomes = stuck.await.unwrap().unwrap();
    assert_eq!(
        outcomes[0].clone().unwrap_err().kind(),
        FailureKind::Stalled
    );
    // The stuck thread still holds the gate; the replacement runs the batch.
    assert_eq!(staged.await.unwrap().unwrap(), [Ok(12)]);
    gated.release.send(()).unwrap();
}

#[tokio::test]
async fn a_staged_batch_is_closed_once_no_replica_can_serve() {
    let config = quick_restarts(1)
        .with_stall_timeout(Some(Duration::from_millis(500)))
        .with_max_stuck_threads(NonZeroUsize::MIN);
    let (mut pool, gated, staging, stuck) = busy(config, 7777).await;
    staging.offer_full_batch(true);
    let staged = start(&mut pool, vec![6]);
    let outcomes = stuck.await.unwrap().unwrap();
    assert_eq!(
        outcomes[0].clone().unwrap_err().kind(),
        FailureKind::Stalled
    );
    let err = tokio::time::timeout(Duration::from_secs(10), staged)
        .await
        .expect("the staged batch is answered")
        .unwrap()
        .unwrap_err();
    assert!(err.is::<candlewick::error::Closed>(), "{err}");
    assert!(pool.unavailable().is_some());
    gated.release.send(()).unwrap();
}

#[tokio::test]
async fn a_replica_reserved_and_never_called_runs_the_staged_batch() {
    // `holder` reserves the idle replica; the batcher can only stage.
    let (_pool, gated, holder, staged) = staged_beside_a_reserved_replica().await;
    drop(holder);
    let answer = tokio::time::timeout(Duration::from_secs(10), staged)
        .await
        .expect("the staged batch runs on the replica the dropped handle reserved");
    assert_eq!(answer.unwrap().unwrap(), [Ok(8)]);
    assert_eq!(gated.seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn the_batcher_hands_a_busy_pool_full_batches_only() {
    let (loader, gated) = gated_loader();
    let batch = candlewick::batch::BatchConfig::default()
        .with_max_batch_size(NonZeroUsize::new(4).unwrap());
    let serving = Serving::start(loader, ServingConfig::new(quick_restarts(1), batch)).unwrap();
    serving.started().await.unwrap();
    let infer = |x: u32| {
        let serving = serving.clone();
        tokio::spawn(async move { serving.infer(x).await.unwrap() })
    };
    let in_flight = |n: usize| {
        let serving = serving.clone();
        async move {
            until(&format!("{n} batches in flight"), || {
                serving.batch().batches_in_flight() == n
            })
            .await;
        }
    };
    let blocker = infer(7777);
    until_seen(&gated, 1).await;
    // Not a full batch: it waits in the batcher's queue, where it can still
    // be batched with later requests.
    let lone = infer(1);
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(serving.batch().batches_in_flight(), 1);
    // Three more make a full batch: the busy pool takes it into its stage.
    let filled: Vec<_> = (2..5).map(infer).collect();
    in_flight(2).await;
    // One replica, one place: the next full batch waits in the queue.
    let next: Vec<_> = (5..9).map(infer).collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(serving.batch().batches_in_flight(), 2);
    assert_eq!(gated.seen.lock().unwrap().len(), 1, "staged, not run");
    gated.release.send(()).unwrap();
    assert_eq!(blocker.await.unwrap(), 15554);
    assert_eq!(lone.await.unwrap(), 2);
    for (x, task) in (2..9).zip(filled.into_iter().chain(next)) {
        assert_eq!(task.await.unwrap(), x * 2);
    }
    let seen = gated.seen.lock().unwrap().clone();
    assert_eq!(seen[..2], [vec![7777], vec![1, 2, 3, 4]]);
    assert_eq!(seen[2], [5, 6, 7, 8]);
}

#[tokio::test]
async fn a_reserved_replica_runs_the_staged_batch_before_its_own() {
    let (_pool, gated, mut holder, staged) = staged_beside_a_reserved_replica().await;
    // `holder` calls after all: the staged batch was first, so it runs
    // first, and `holder`'s batch takes its place in the stage.
    let own = tokio::spawn(holder.call(vec![5]));
    assert_eq!(staged.await.unwrap().unwrap(), [Ok(8)]);
    assert_eq!(own.await.unwrap().unwrap(), [Ok(10)]);
    assert_eq!(*gated.seen.lock().unwrap(), [vec![1], vec![4], vec![5]]);
}

#[tokio::test]
async fn a_stage_place_reserved_before_the_pool_closes_is_answered_closed() {
    let config = quick_restarts(1)
        .with_stall_timeout(Some(Duration::from_millis(100)))
        .with_max_stuck_threads(NonZeroUsize::MIN);
    let (mut pool, gated, staging, stuck) = busy(config, 7777).await;
    staging.offer_full_batch(true);
    // Reserved while the replica may still serve; called once none can.
    assert!(is_ready(&mut pool));
    let outcomes = stuck.await.unwrap().unwrap();
    assert_eq!(
        outcomes[0].clone().unwrap_err().kind(),
        FailureKind::Stalled
    );
    assert!(pool.unavailable().is_some());
    let err = tokio::time::timeout(Duration::from_secs(10), pool.call(vec![6]))
        .await
        .expect("answered, not left in a stage nobody takes from")
        .unwrap_err();
    assert!(err.is::<candlewick::error::Closed>(), "{err}");
    gated.release.send(()).unwrap();
}

#[tokio::test]
async fn a_replica_that_fails_for_good_takes_its_place_in_the_stage_away_even_in_use() {
    // Two replicas of a model that blocks on 3000 until `crash` is released,
    // then panics, and blocks on 7777 until `finish` is; every load after
    // the first two fails for good.
    let (crash, crash_gate) = std::sync::mpsc::channel::<()>();
    let (finish, finish_gate) = std::sync::mpsc::channel::<()>();
    let gates = Arc::new((Mutex::new(crash_gate), Mutex::new(finish_gate)));
    let loads = Arc::new(AtomicUsize::new(0));
    let loader = {
        let loads = loads.clone();
        move |_: &Device| -> Result<_, BoxError> {
            if loads.fetch_add(1, Ordering::SeqCst) >= 2 {
                return Err(candlewick::error::Unrecoverable::new("the device is gone").into());
            }
            let gates = gates.clone();
            Ok(move |batch: &[u32]| -> Result<Vec<u32>, BoxError> {
                if batch.contains(&3000) {
                    let _ = gates.0.lock().unwrap().recv();
                    panic!("kernel crashed");
                }
                if batch.contains(&7777) {
                    let _ = gates.1.lock().unwrap().recv();
                }
                Ok(batch.iter().map(|x| x * 2).collect())
            })
        }
    };
    let mut pool = Pool::new(loader, quick_restarts(2)).unwrap();
    let staging = pool.staging();
    good_batch(&mut pool, vec![1]).await;
    until("both replicas ready", || pool.idle_replicas() == 2).await;
    // Both busy, and both places in the stage taken.
    let crashing = start(&mut pool, vec![3000]);
    let running = start(&mut pool, vec![7777]);
    staging.offer_full_batch(true);
    let staged = [start(&mut pool, vec![5]), start(&mut pool, vec![6])];
    assert!(!is_ready(&mut pool.clone()), "two places, both taken");
    // One replica crashes and cannot reload: its place is owed, in use.
    crash.send(()).unwrap();
    let outcomes = crashing.await.unwrap().unwrap();
    assert_eq!(outcomes[0].clone().unwrap_err().kind(), FailureKind::Panic);
    until("a replica failed for good", || {
        pool.replicas().iter().any(|r| r.failed_for_good)
    })
    .await;
    // The other runs both staged batches.
    finish.send(()).unwrap();
    assert_eq!(running.await.unwrap().unwrap(), [Ok(15554)]);
    let [five, six] = staged;
    assert_eq!(five.await.unwrap().unwrap(), [Ok(10)]);
    assert_eq!(six.await.unwrap().unwrap(), [Ok(12)]);
    // One replica left, one place: a second batch cannot be staged.
    let running = start(&mut pool, vec![7777]);
    let staged = start(&mut pool, vec![8]);
    assert!(!is_ready(&mut pool.clone()), "one place, taken");
    finish.send(()).unwrap();
    assert_eq!(running.await.unwrap().unwrap(), [Ok(15554)]);
    assert_eq!(staged.await.unwrap().unwrap(), [Ok(16)]);
    assert_eq!(loads.load(Ordering::SeqCst), 3);
}
