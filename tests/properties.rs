//! Property: under random arrivals, batch limits, cancellations and failing
//! batches, every request that was not cancelled gets exactly one answer, and
//! a successful answer is the output computed from its own input.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candlewick::BoxError;
use candlewick::batch::{Batch, BatchConfig};
use candlewick::error::ModelFailed;
use proptest::prelude::*;
use tower::{ServiceBuilder, ServiceExt};

#[derive(Debug, Clone)]
struct Request {
    /// Arrival time after the previous request, in µs.
    gap_us: u64,
    /// Inputs that make their whole batch fail.
    poison: bool,
    /// Drop the response future this long after sending, if set.
    cancel_after_us: Option<u64>,
}

fn request() -> impl Strategy<Value = Request> {
    (
        0u64..3_000,
        prop::bool::weighted(0.05),
        prop::option::weighted(0.1, 0u64..5_000),
    )
        .prop_map(|(gap_us, poison, cancel_after_us)| Request {
            gap_us,
            poison,
            cancel_after_us,
        })
}

#[derive(Debug)]
struct Outcome {
    answered: Option<Result<u64, BoxError>>,
}

fn run(
    requests: Vec<Request>,
    max_batch: usize,
    max_wait_us: u64,
    replicas: usize,
    batch_us: u64,
) -> (Vec<Outcome>, HashMap<u64, usize>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async move {
        // How often the model saw each input: never more than once.
        let seen = Arc::new(Mutex::new(HashMap::<u64, usize>::new()));
        let log = seen.clone();
        let model = ServiceBuilder::new()
            .concurrency_limit(replicas)
            .service_fn(move |batch: Vec<(u64, bool)>| {
                let log = log.clone();
                async move {
                    for (id, _) in &batch {
                        *log.lock().unwrap().entry(*id).or_default() += 1;
                    }
                    tokio::time::sleep(Duration::from_micros(batch_us)).await;
                    if batch.iter().any(|(_, poison)| *poison) {
                        return Err::<Vec<Result<u64, BoxError>>, BoxError>(
                            "poisoned batch".into(),
                        );
                    }
                    Ok(batch.iter().map(|(id, _)| Ok(id * 3 + 1)).collect())
                }
            });
        let config = BatchConfig::default()
            .with_max_batch_size(NonZeroUsize::new(max_batch).unwrap())
            .with_max_wait(Duration::from_micros(max_wait_us))
            .with_queue_capacity(NonZeroUsize::new(10_000).unwrap());
        let service = Batch::new(model, config);

        let mut tasks = Vec::new();
        for (id, request) in requests.iter().enumerate() {
            tokio::time::sleep(Duration::from_micros(request.gap_us)).await;
            let call = service.clone().oneshot((id as u64, request.poison).into());
            let cancel_after = request.cancel_after_us;
            tasks.push(tokio::spawn(async move {
                match cancel_after {
                    Some(us) => tokio::time::timeout(Duration::from_micros(us), call)
                        .await
                        .ok(),
                    None => Some(call.await),
                }
            }));
        }
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(Outcome {
                answered: task.await.unwrap(),
            });
        }
        let seen = seen.lock().unwrap().clone();
        (outcomes, seen)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_request_gets_exactly_its_own_answer(
        requests in prop::collection::vec(request(), 1..300),
        max_batch in 1usize..40,
        max_wait_us in 0u64..4_000,
        replicas in 1usize..4,
        batch_us in 100u64..5_000,
    ) {
        let (outcomes, seen) = run(requests.clone(), max_batch, max_wait_us, replicas, batch_us);
        prop_assert_eq!(outcomes.len(), requests.len());
        for (id, (request, outcome)) in requests.iter().zip(&outcomes).enumerate() {
            let id = id as u64;
            prop_assert!(seen.get(&id).copied().unwrap_or(0) <= 1, "input {} ran twice", id);
            match &outcome.answered {
                // Only a cancelled request may go unanswered.
                None => prop_assert!(request.cancel_after_us.is_some()),
                Some(Ok(output)) => {
                    prop_assert!(!request.poison);
                    prop_assert_eq!(*output, id * 3 + 1);
                }
                Some(Err(err)) => {
                    prop_assert!(err.is::<ModelFailed>(), "unexpected error {}", err);
                    prop_assert!(seen.contains_key(&id), "failed without running");
                }
            }
            if request.poison && outcome.answered.is_some() {
                prop_assert!(outcome.answered.as_ref().unwrap().is_err());
            }
            if outcome.answered.is_some() {
                prop_assert_eq!(seen.get(&id).copied(), Some(1), "answered without running");
            }
        }
    }
}
