//! Chaos: thousands of requests through the real stack (replica threads and
//! the batching layer) with random cancellations, model errors, panics in
//! `forward`, in warm-up, in the model's `Drop` and in the admission hooks,
//! stalls and overload bursts, also with every core busy spinning. Every
//! request gets exactly one answer — its own output or a typed error — no
//! model outlives its replica, and the service keeps serving afterwards.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use candle_core::Device;
use candlewick::batch::{BatchConfig, CostMode};
use candlewick::error::{DeadlineExceeded, FailureKind, ModelFailed, Overloaded};
use candlewick::pool::{Backoff, PoolConfig};
use candlewick::{BoxError, Loader, Model, Serving, ServingConfig};
use proptest::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Fine,
    Fails,
    Panics,
    /// Panics in `forward`, and makes the reload's warm-up panic once.
    PanicsThenWarmupPanics,
    Stalls,
    CostPanics,
    ValidatePanics,
}

#[derive(Debug, Clone)]
struct Request {
    fate: Fate,
    /// Drop the answer this many µs after sending.
    cancel_after_us: Option<u64>,
    /// Pause before sending, in µs; most requests come in bursts, at once.
    gap_us: u64,
}

fn request() -> impl Strategy<Value = Request> {
    let fate = prop_oneof![
        920 => Just(Fate::Fine),
        50 => Just(Fate::Fails),
        8 => Just(Fate::Panics),
        3 => Just(Fate::PanicsThenWarmupPanics),
        2 => Just(Fate::Stalls),
        5 => Just(Fate::CostPanics),
        5 => Just(Fate::ValidatePanics),
    ];
    let gap_us = prop_oneof![95 => Just(0u64), 5 => 500u64..5_000];
    (fate, prop::option::weighted(0.1, 0u64..3_000), gap_us).prop_map(
        |(fate, cancel_after_us, gap_us)| Request {
            fate,
            cancel_after_us,
            gap_us,
        },
    )
}

type Input = (u64, Fate);

/// Stalls end after 150 ms, so a replica rarely has more than two threads
/// stuck at once: a bound this high keeps every replica in service, which
/// the test checks afterwards. (tests/faults.rs checks the bound itself.)
const MAX_STUCK: usize = 8;

/// What the chaos models share with the test.
#[derive(Default)]
struct Ledger {
    alive: AtomicUsize,
    warmup_panic_armed: AtomicBool,
    /// Requests in a forward pass whose two halves (split as bisection
    /// splits) both hold a failing input: bisection may judge such a failure
    /// systemic and stop splitting there or one level down.
    systemic_mates: Mutex<HashSet<u64>>,
}

#[derive(Clone, Default)]
struct ChaosLoader(Arc<Ledger>);

struct ChaosModel(Arc<Ledger>);

#[async_trait]
impl Loader<Input> for ChaosLoader {
    type Model = ChaosModel;

    async fn load(&self, _: &Device) -> Result<ChaosModel, BoxError> {
        self.0.alive.fetch_add(1, Ordering::SeqCst);
        Ok(ChaosModel(self.0.clone()))
    }

    fn cost(&self, (id, fate): &Input) -> usize {
        assert_ne!(*fate, Fate::CostPanics, "chaos cost panic");
        // Mixed costs, so that padded batches group them out of order.
        (id % 13 + 1) as usize
    }

    fn validate(&self, (_, fate): &Input) -> Result<(), BoxError> {
        assert_ne!(*fate, Fate::ValidatePanics, "chaos validate panic");
        Ok(())
    }
}

impl Model<Input> for ChaosModel {
    type Output = u64;

    fn forward(&self, batch: &[Input]) -> Result<Vec<u64>, BoxError> {
        let has = |f: Fate| batch.iter().any(|(_, fate)| *fate == f);
        if has(Fate::PanicsThenWarmupPanics) {
            self.0.warmup_panic_armed.store(true, Ordering::SeqCst);
            panic!("chaos panic");
        }
        if has(Fate::Panics) {
            panic!("chaos panic");
        }
        if has(Fate::Stalls) {
            std::thread::sleep(Duration::from_millis(150));
        }
        let fails = |inputs: &[Input]| inputs.iter().any(|(_, fate)| *fate == Fate::Fails);
        let (left, right) = batch.split_at(batch.len() / 2);
        if fails(left) && fails(right) {
            let mut mates = self.0.systemic_mates.lock().unwrap();
            mates.extend(batch.iter().map(|(id, _)| *id));
        }
        if fails(batch) {
            return Err("chaos error".into());
        }
        std::thread::sleep(Duration::from_micros(500 + 20 * batch.len() as u64));
        Ok(batch.iter().map(|(id, _)| id * 7 + 3).collect())
    }

    fn warmup_inputs(&self) -> Vec<Input> {
        if self.0.warmup_panic_armed.swap(false, Ordering::SeqCst) {
            panic!("chaos warm-up panic");
        }
        vec![(u64::MAX / 8, Fate::Fine)]
    }
}

impl Drop for ChaosModel {
    fn drop(&mut self) {
        self.0.alive.fetch_sub(1, Ordering::SeqCst);
        if !std::thread::panicking() {
            panic!("chaos drop panic");
        }
    }
}

/// Runs `requests` through the stack, with [`Hogs`] spinning until every
/// answer is in if `saturate`, then checks the answers and that the stack
/// recovers.
fn chaos(requests: &[Request], saturate: bool) -> Result<(), TestCaseError> {
    // One case at a time: another's hogs would slow this one's checks.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let hogs = saturate.then(Hogs::start);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let pool = PoolConfig::default()
            .with_replicas_per_device(NonZeroUsize::new(2).unwrap())
            .with_stall_timeout(Some(Duration::from_millis(50)))
            .with_max_stuck_threads(NonZeroUsize::new(MAX_STUCK).unwrap())
            .with_restart_backoff(Backoff {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(5),
            });
        let batch = BatchConfig::default()
            .with_max_batch_size(NonZeroUsize::new(16).unwrap())
            .with_max_wait(Duration::from_millis(1))
            .with_max_batch_cost(None, CostMode::Padded)
            .with_queue_capacity(NonZeroUsize::new(32).unwrap())
            .with_default_timeout(Some(Duration::from_secs(2)));
        let loader = ChaosLoader::default();
        let ledger = loader.0.clone();
        let serving = Serving::start(loader, ServingConfig::new(pool, batch)).unwrap();

        let mut tasks = Vec::with_capacity(requests.len());
        for (id, request) in requests.iter().enumerate() {
            if request.gap_us > 0 {
                tokio::time::sleep(Duration::from_micros(request.gap_us)).await;
            }
            let serving = serving.clone();
            let request = request.clone();
            tasks.push(tokio::spawn(async move {
                let answer = serving.infer((id as u64, request.fate));
                match request.cancel_after_us {
                    Some(us) => tokio::time::timeout(Duration::from_micros(us), answer)
                        .await
                        .ok(),
                    None => Some(answer.await),
                }
            }));
        }
        let everything = async {
            let mut answers = Vec::with_capacity(tasks.len());
            for task in tasks {
                answers.push(task.await.unwrap());
            }
            answers
        };
        let answers = tokio::time::timeout(Duration::from_secs(60), everything)
            .await
            .map_err(|_| TestCaseError::fail("a request was never answered"))?;
        // Recovery is checked with the cores back.
        drop(hogs);

        let mut counts = [0usize; 4];
        for (id, (request, answer)) in requests.iter().zip(answers).enumerate() {
            let Some(answer) = answer else {
                prop_assert!(
                    request.cancel_after_us.is_some(),
                    "request {} unanswered",
                    id
                );
                continue;
            };
            match answer {
                Ok(output) => {
                    prop_assert_eq!(request.fate, Fate::Fine, "request {} succeeded", id);
                    prop_assert_eq!(output, id as u64 * 7 + 3);
                    counts[0] += 1;
                }
                Err(err) => {
                    if let Some(failed) = err.downcast_ref::<ModelFailed>() {
                        // A good input fails only with a batch-mate that
                        // panicked or stalled, or in a split whose halves
                        // both failed (which bisection may judge systemic):
                        // errors are isolated by bisection.
                        if request.fate == Fate::Fine {
                            let systemic_mate =
                                ledger.systemic_mates.lock().unwrap().contains(&(id as u64));
                            prop_assert!(
                                matches!(failed.kind(), FailureKind::Panic | FailureKind::Stalled)
                                    || systemic_mate,
                                "good request {} failed: {}",
                                id,
                                failed
                            );
                        }
                        counts[1] += 1;
                    } else if err.is::<Overloaded>() {
                        counts[2] += 1;
                    } else {
                        prop_assert!(err.is::<DeadlineExceeded>(), "untyped error: {}", err);
                        counts[3] += 1;
                    }
                }
            }
        }
        prop_assert!(counts[0] > 0, "nothing succeeded: {:?}", counts);

        // Afterwards the service still serves every request.
        for id in 0..50u64 {
            let output = serving.infer((id, Fate::Fine)).await;
            prop_assert_eq!(output.map_err(|e| e.to_string()), Ok(id * 7 + 3));
        }
        prop_assert!(serving.health().live().ok, "{:?}", serving.health().live());
        // Stuck threads free their models once their stall ends, and reloads
        // drop the models they replace: one model per replica is left.
        let replicas = 2;
        for _ in 0..200 {
            if ledger.alive.load(Ordering::SeqCst) == replicas {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        prop_assert_eq!(ledger.alive.load(Ordering::SeqCst), replicas);
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_request_is_answered_exactly_once_through_chaos(
        requests in prop::collection::vec(request(), 2_000..3_000),
    ) {
        chaos(&requests, false)?;
    }
}

/// A thread spinning on every core this machine has (two, in CI) until
/// dropped: the stack then runs on whatever CPU the scheduler leaves it.
struct Hogs {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Hogs {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(2, NonZeroUsize::get);
        let threads = (0..cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

proptest! {
    // A failure is reported as it came: shrinking would re-run a thousand
    // requests under the hogs again and again.
    #![proptest_config(ProptestConfig { cases: 1, max_shrink_iters: 0, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_request_is_answered_exactly_once_through_chaos_on_saturated_cores(
        requests in prop::collection::vec(request(), 1_000..1_500),
    ) {
        chaos(&requests, true)?;
    }
}
