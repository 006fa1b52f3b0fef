//! Chaos: thousands of requests through the real stack (replica threads and
//! the batching layer) with random cancellations, model errors, panics, stalls
//! and overload bursts. Every request gets exactly one answer — its own output
//! or a typed error — and the service keeps serving afterwards.

use std::num::NonZeroUsize;
use std::time::Duration;

use candle_core::Device;
use candlewick::batch::BatchConfig;
use candlewick::error::{DeadlineExceeded, FailureKind, ModelFailed, Overloaded};
use candlewick::pool::{Backoff, PoolConfig};
use candlewick::{BoxError, Serving, ServingConfig};
use proptest::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Fine,
    Fails,
    Panics,
    Stalls,
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
        930 => Just(Fate::Fine),
        50 => Just(Fate::Fails),
        10 => Just(Fate::Panics),
        2 => Just(Fate::Stalls),
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

fn model(_: &Device) -> Result<impl Fn(&[Input]) -> Result<Vec<u64>, BoxError> + use<>, BoxError> {
    Ok(|batch: &[Input]| -> Result<Vec<u64>, BoxError> {
        if batch.iter().any(|(_, fate)| *fate == Fate::Panics) {
            panic!("chaos panic");
        }
        if batch.iter().any(|(_, fate)| *fate == Fate::Stalls) {
            std::thread::sleep(Duration::from_millis(150));
        }
        if batch.iter().any(|(_, fate)| *fate == Fate::Fails) {
            return Err("chaos error".into());
        }
        std::thread::sleep(Duration::from_micros(500 + 20 * batch.len() as u64));
        Ok(batch.iter().map(|(id, _)| id * 7 + 3).collect())
    })
}

fn chaos(requests: &[Request]) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let pool = PoolConfig::default()
            .with_replicas_per_device(NonZeroUsize::new(2).unwrap())
            .with_stall_timeout(Some(Duration::from_millis(50)))
            .with_restart_backoff(Backoff {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(5),
            });
        let batch = BatchConfig::default()
            .with_max_batch_size(NonZeroUsize::new(16).unwrap())
            .with_max_wait(Duration::from_millis(1))
            .with_queue_capacity(NonZeroUsize::new(32).unwrap())
            .with_default_timeout(Some(Duration::from_secs(2)));
        let serving = Serving::start(model, ServingConfig::new(pool, batch)).unwrap();

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
                        // panicked or stalled: errors are isolated by bisection.
                        if request.fate == Fate::Fine {
                            prop_assert!(
                                matches!(failed.kind(), FailureKind::Panic | FailureKind::Stalled),
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
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_request_is_answered_exactly_once_through_chaos(
        requests in prop::collection::vec(request(), 2_000..3_000),
    ) {
        chaos(&requests)?;
    }
}
