//! The batching layer, driven deterministically: paused tokio time and a
//! `tower-test` mock standing in for the replicas.

use std::num::NonZeroUsize;
use std::time::Duration;

use candlewick::BoxError;
use candlewick::batch::{Admission, Batch, BatchConfig, BatchLayer, CostMode, Request, WaitPolicy};
use candlewick::error::{FailureKind, InvalidInput, ModelFailed, Overloaded};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_test::mock;

type Mock = mock::Mock<Vec<u32>, Vec<u32>>;
type Handle = mock::Handle<Vec<u32>, Vec<u32>>;

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap()
}

fn config(max_batch: usize, max_wait_ms: u64) -> BatchConfig {
    BatchConfig::default()
        .with_max_batch_size(nz(max_batch))
        .with_max_wait(Duration::from_millis(max_wait_ms))
}

fn batched(config: BatchConfig) -> (Batch<u32, u32>, Handle) {
    let (inner, handle): (Mock, Handle) = mock::pair();
    (Batch::new(inner.map_response(all_ok), config), handle)
}

/// The mock answers whole batches; each input succeeds.
fn all_ok(outputs: Vec<u32>) -> Vec<Result<u32, BoxError>> {
    outputs.into_iter().map(Ok).collect()
}

/// Sends `input` through a clone of `service` on its own task.
fn send(service: &Batch<u32, u32>, input: u32) -> tokio::task::JoinHandle<Result<u32, BoxError>> {
    let service = service.clone();
    tokio::spawn(async move { service.oneshot(input.into()).await })
}

/// Lets spawned tasks run without moving the paused clock.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_dispatches_without_waiting() {
    let (service, mut handle) = batched(config(4, 1_000));
    handle.allow(0);
    let requests: Vec<_> = (0..4).map(|i| send(&service, i)).collect();
    settle().await;
    let start = Instant::now();
    handle.allow(1);
    let (batch, reply) = handle.next_request().await.unwrap();
    assert_eq!(batch, [0, 1, 2, 3]);
    assert_eq!(start.elapsed(), Duration::ZERO, "the batcher waited");
    reply.send_response(batch.iter().map(|x| x + 100).collect());
    for (i, request) in requests.into_iter().enumerate() {
        assert_eq!(request.await.unwrap().unwrap(), i as u32 + 100);
    }
}

#[tokio::test(start_paused = true)]
async fn light_load_dispatches_after_max_wait() {
    let (service, mut handle) = batched(config(8, 5).with_wait_policy(WaitPolicy::Fixed));
    handle.allow(1);
    let start = Instant::now();
    let request = send(&service, 7);
    let (batch, reply) = handle.next_request().await.unwrap();
    assert_eq!(batch, [7]);
    assert_eq!(start.elapsed(), Duration::from_millis(5));
    reply.send_response(vec![8]);
    assert_eq!(request.await.unwrap().unwrap(), 8);
}

#[tokio::test(start_paused = true)]
async fn max_wait_counts_from_the_oldest_request() {
    let (service, mut handle) = batched(config(8, 10).with_wait_policy(WaitPolicy::Fixed));
    handle.allow(1);
    let start = Instant::now();
    let _first = send(&service, 1);
    tokio::time::sleep(Duration::from_millis(6)).await;
    let _second = send(&service, 2);
    let (batch, _reply) = handle.next_request().await.unwrap();
    assert_eq!(batch, [1, 2]);
    assert_eq!(start.elapsed(), Duration::from_millis(10));
}

#[tokio::test(start_paused = true)]
async fn no_batch_is_formed_while_the_inner_service_is_busy() {
    let (service, mut handle) = batched(config(4, 1));
    handle.allow(0);
    let _requests: Vec<_> = (0..10).map(|i| send(&service, i)).collect();
    // Far past max_wait, and still nothing reaches the inner service.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        tokio::time::timeout(Duration::from_secs(1), handle.next_request())
            .await
            .is_err()
    );
    assert_eq!(service.queue_depth().0, 10);
    // Once a replica frees, it takes a full batch at once.
    handle.allow(1);
    let (batch, _reply) = handle.next_request().await.unwrap();
    assert_eq!(batch, [0, 1, 2, 3]);
}

#[tokio::test(start_paused = true)]
async fn two_free_replicas_run_two_batches_at_once() {
    let (service, mut handle) = batched(config(4, 1));
    handle.allow(0);
    let requests: Vec<_> = (0..8).map(|i| send(&service, i)).collect();
    settle().await;
    handle.allow(2);
    let (first, first_reply) = handle.next_request().await.unwrap();
    // The second batch is dispatched while the first is still running.
    let (second, second_reply) = handle.next_request().await.unwrap();
    assert_eq!((first.len(), second.len()), (4, 4));
    assert_eq!(service.batches_in_flight(), 2);
    second_reply.send_response(second.clone());
    first_reply.send_response(first.clone());
    for (i, request) in requests.into_iter().enumerate() {
        assert_eq!(request.await.unwrap().unwrap(), i as u32);
    }
}

#[tokio::test(start_paused = true)]
async fn the_cost_budget_is_respected() {
    let config = config(16, 1).with_max_batch_cost(Some(nz(10)), CostMode::Sum);
    let (inner, mut handle): (Mock, Handle) = mock::pair();
    let service = BatchLayer::new(config)
        .cost(|x: &u32| *x as usize)
        .layer(inner.map_response(all_ok));
    handle.allow(0);
    let _requests: Vec<_> = [4, 4, 4, 4, 9]
        .into_iter()
        .map(|i| send(&service, i))
        .collect();
    settle().await;
    handle.allow(3);
    let mut batches = Vec::new();
    for _ in 0..3 {
        let (batch, reply) = handle.next_request().await.unwrap();
        reply.send_response(batch.clone());
        batches.push(batch);
    }
    assert_eq!(batches, [vec![4, 4], vec![4, 4], vec![9]]);
}

#[tokio::test(start_paused = true)]
async fn a_padded_budget_counts_the_longest_input_for_every_row() {
    // In arrival order, to see the budget alone at work.
    let config = config(16, 1)
        .with_max_batch_cost(Some(nz(12)), CostMode::Padded)
        .with_group_window(0);
    let (inner, mut handle): (Mock, Handle) = mock::pair();
    let service = BatchLayer::new(config)
        .cost(|x: &u32| *x as usize)
        .layer(inner.map_response(all_ok));
    handle.allow(0);
    let _requests: Vec<_> = [2, 6, 1, 3]
        .into_iter()
        .map(|i| send(&service, i))
        .collect();
    settle().await;
    handle.allow(2);
    let (first, reply) = handle.next_request().await.unwrap();
    reply.send_response(first.clone());
    let (second, _reply) = handle.next_request().await.unwrap();
    // [2, 6] pads to 2 × 6 = 12; adding 1 would pad to 18.
    assert_eq!((first, second), (vec![2, 6], vec![1, 3]));
}

/// Sends `costs` into a batcher whose inner service is not ready, then
/// returns the batches it forms, one at a time, as `costs` come out.
async fn padded_batches(config: BatchConfig, costs: &[u32], batches: usize) -> Vec<Vec<u32>> {
    let (inner, mut handle): (Mock, Handle) = mock::pair();
    let service = BatchLayer::new(config)
        .cost(|x: &u32| *x as usize)
        .layer(inner.map_response(all_ok));
    handle.allow(0);
    let _requests: Vec<_> = costs.iter().map(|&i| send(&service, i)).collect();
    settle().await;
    let mut formed = Vec::new();
    for _ in 0..batches {
        handle.allow(1);
        let (batch, reply) = handle.next_request().await.unwrap();
        reply.send_response(batch.clone());
        formed.push(batch);
    }
    formed
}

#[tokio::test(start_paused = true)]
async fn padded_batches_group_inputs_of_similar_cost() {
    let config = config(4, 1).with_max_batch_cost(None, CostMode::Padded);
    let costs = [10, 1, 9, 2, 11, 1, 10, 2];
    let batches = padded_batches(config.clone(), &costs, 2).await;
    // The oldest (10) and the three nearest to it; then the short ones.
    assert_eq!(batches, [vec![10, 9, 11, 10], vec![1, 2, 1, 2]]);
    // Without a window, arrival order.
    let batches = padded_batches(config.with_group_window(0), &costs, 2).await;
    assert_eq!(batches, [vec![10, 1, 9, 2], vec![11, 1, 10, 2]]);
}

#[tokio::test(start_paused = true)]
async fn a_grouped_budget_skips_what_does_not_fit_for_what_does() {
    let config = config(16, 1).with_max_batch_cost(Some(nz(12)), CostMode::Padded);
    // 2, then 1 and 3 (nearest), then 6 would pad 4 rows to 24 > 12.
    let batches = padded_batches(config, &[2, 6, 1, 3], 2).await;
    assert_eq!(batches, [vec![2, 1, 3], vec![6]]);
}

#[tokio::test(start_paused = true)]
async fn grouping_passes_over_a_request_no_longer_than_max_starvation() {
    let config = config(2, 1)
        .with_max_batch_cost(None, CostMode::Padded)
        .with_max_starvation(Duration::from_millis(50));
    let (inner, mut handle): (Mock, Handle) = mock::pair();
    let service = BatchLayer::new(config)
        .cost(|x: &u32| *x as usize)
        .layer(inner.map_response(all_ok));
    handle.allow(0);
    let _old: Vec<_> = [10, 1, 9].iter().map(|&i| send(&service, i)).collect();
    settle().await;
    tokio::time::advance(Duration::from_millis(60)).await;
    let _new: Vec<_> = [10, 10].iter().map(|&i| send(&service, i)).collect();
    settle().await;
    handle.allow(1);
    let (batch, _reply) = handle.next_request().await.unwrap();
    // 1 is furthest from 10 in cost, but has waited past the bound, and
    // longer than 9.
    assert_eq!(batch, [10, 1]);
}

#[tokio::test(start_paused = true)]
async fn an_input_over_the_budget_is_rejected_at_admission() {
    let config = config(16, 1).with_max_batch_cost(Some(nz(10)), CostMode::Sum);
    let (inner, _handle): (Mock, Handle) = mock::pair();
    let service = BatchLayer::new(config)
        .cost(|x: &u32| *x as usize)
        .layer(inner.map_response(all_ok));
    let err = service.oneshot(11.into()).await.unwrap_err();
    assert!(err.is::<InvalidInput>(), "{err}");
}

#[tokio::test(start_paused = true)]
async fn cancelled_requests_never_reach_the_model() {
    let (service, mut handle) = batched(config(8, 1));
    handle.allow(0);
    let kept = send(&service, 1);
    let cancelled = send(&service, 2);
    let also_kept = send(&service, 3);
    settle().await;
    cancelled.abort();
    settle().await;
    handle.allow(1);
    let (batch, reply) = handle.next_request().await.unwrap();
    assert_eq!(batch, [1, 3]);
    reply.send_response(vec![10, 30]);
    assert_eq!(kept.await.unwrap().unwrap(), 10);
    assert_eq!(also_kept.await.unwrap().unwrap(), 30);
}

#[tokio::test(start_paused = true)]
async fn invalid_input_is_rejected_in_the_callers_task() {
    let (inner, mut handle): (Mock, Handle) = mock::pair();
    let service = BatchLayer::new(config(8, 1))
        .validate(|x: &u32| {
            if *x == 0 {
                Err("zero is not allowed".into())
            } else {
                Ok(())
            }
        })
        .layer(inner.map_response(all_ok));
    handle.allow(1);
    let err = service.clone().oneshot(0.into()).await.unwrap_err();
    let invalid = err.downcast_ref::<InvalidInput>().expect("typed error");
    assert_eq!(invalid.reason().to_string(), "zero is not allowed");
    // The valid request behind it is batched alone.
    let ok = send(&service, 5);
    let (batch, reply) = handle.next_request().await.unwrap();
    assert_eq!(batch, [5]);
    reply.send_response(vec![6]);
    assert_eq!(ok.await.unwrap().unwrap(), 6);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_sheds_at_once_without_awaiting_the_model() {
    let config = config(4, 1).with_queue_capacity(nz(2));
    let (service, mut handle) = batched(config);
    handle.allow(0);
    let _queued: Vec<_> = (0..2).map(|i| send(&service, i)).collect();
    settle().await;
    // The model is never ready, yet the rejection comes at once.
    let start = Instant::now();
    let err = service.clone().oneshot(9.into()).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    let overloaded = err.downcast_ref::<Overloaded>().expect("typed error");
    assert!(overloaded.retry_after() > Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_request_frees_its_slot() {
    let config = config(4, 1).with_queue_capacity(nz(1));
    let (service, mut handle) = batched(config);
    handle.allow(0);
    let cancelled = send(&service, 1);
    settle().await;
    cancelled.abort();
    settle().await;
    let admitted = send(&service, 2);
    settle().await;
    handle.allow(1);
    let (batch, reply) = handle.next_request().await.unwrap();
    assert_eq!(batch, [2]);
    reply.send_response(vec![3]);
    assert_eq!(admitted.await.unwrap().unwrap(), 3);
}

#[tokio::test(start_paused = true)]
async fn wait_admission_holds_callers_in_poll_ready() {
    let config = config(4, 1)
        .with_queue_capacity(nz(1))
        .with_admission(Admission::Wait);
    let (mut service, mut handle) = batched(config);
    handle.allow(0);
    service.ready().await.unwrap();
    let first = service.call(1.into());
    let mut second = service.clone();
    let mut ready = tokio_test_ready(&mut second);
    assert!(!ready(), "poll_ready was ready with a full queue");
    handle.allow(1);
    let (batch, reply) = handle.next_request().await.unwrap();
    assert_eq!(batch, [1]);
    // The slot is free once the request left the queue.
    assert!(ready());
    reply.send_response(vec![2]);
    assert_eq!(first.await.unwrap(), 2);
}

/// Polls `poll_ready` once per call, with a no-op waker.
fn tokio_test_ready(service: &mut Batch<u32, u32>) -> impl FnMut() -> bool + '_ {
    move || {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        matches!(service.poll_ready(&mut cx), std::task::Poll::Ready(Ok(())))
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_batch_fails_only_its_own_requests() {
    let (service, mut handle) = batched(config(2, 1));
    handle.allow(0);
    let requests: Vec<_> = (0..4).map(|i| send(&service, i)).collect();
    settle().await;
    handle.allow(2);
    let (first, first_reply) = handle.next_request().await.unwrap();
    let (second, second_reply) = handle.next_request().await.unwrap();
    assert_eq!((first, second.clone()), (vec![0, 1], vec![2, 3]));
    first_reply.send_error("out of memory");
    second_reply.send_response(second);
    let results: Vec<_> = futures_join(requests).await;
    assert!(results[0].is_err() && results[1].is_err());
    assert_eq!(results[2].as_ref().unwrap(), &2);
    assert_eq!(results[3].as_ref().unwrap(), &3);
    assert!(
        results[0]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("out of memory")
    );
}

async fn futures_join(
    handles: Vec<tokio::task::JoinHandle<Result<u32, BoxError>>>,
) -> Vec<Result<u32, BoxError>> {
    let mut results = Vec::new();
    for handle in handles {
        results.push(handle.await.unwrap());
    }
    results
}

#[tokio::test(start_paused = true)]
async fn the_retry_after_grows_with_the_queued_work() {
    let config = config(4, 1).with_queue_capacity(nz(64));
    let (service, mut handle) = batched(config);
    // Measure the service rate: one batch of 4 takes 100 ms.
    handle.allow(1);
    let warm: Vec<_> = (0..4).map(|i| send(&service, i)).collect();
    let (batch, reply) = handle.next_request().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    reply.send_response(batch);
    futures_join(warm).await;
    handle.allow(0);
    let _few: Vec<_> = (0..8).map(|i| send(&service, i)).collect();
    settle().await;
    let after_few = service.estimated_wait();
    let _more: Vec<_> = (0..32).map(|i| send(&service, i)).collect();
    settle().await;
    let after_more = service.estimated_wait();
    // 40 requests/s: 8 queued wait 200 ms, 40 queued wait a second.
    assert_eq!(after_few, Duration::from_millis(200));
    assert_eq!(after_more, Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn dropping_every_handle_drains_the_queue_then_stops() {
    let (service, mut handle) = batched(config(8, 1_000));
    handle.allow(1);
    let request = send(&service, 4);
    settle().await;
    drop(service);
    // The last handle is gone: the queued request goes out without max_wait.
    let start = Instant::now();
    let (batch, reply) = handle.next_request().await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    reply.send_response(batch);
    assert_eq!(request.await.unwrap().unwrap(), 4);
}

#[test]
fn public_types_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Batch<u32, u32>>();
    assert_send_sync::<BatchLayer<u32>>();
    assert_send_sync::<candlewick::batch::future::ResponseFuture<u32>>();
    assert_send_sync::<candlewick::Serving<u32, u32>>();
    assert_send_sync::<candlewick::pool::Pool<u32, u32>>();
}

#[tokio::test(start_paused = true)]
async fn a_drain_does_not_wait_for_requests_whose_callers_left() {
    let (service, mut handle) = batched(config(1, 0));
    handle.allow(1);
    let running = send(&service, 1);
    let (batch, reply) = handle.next_request().await.unwrap();
    let left: Vec<_> = (2..4).map(|i| send(&service, i)).collect();
    settle().await;
    for request in left {
        request.abort();
    }
    settle().await;
    let start = Instant::now();
    let drain = {
        let service = service.clone();
        tokio::spawn(async move {
            service
                .drain(Instant::now() + Duration::from_secs(20))
                .await
        })
    };
    settle().await;
    reply.send_response(batch);
    let report = drain.await.unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "the drain waited {:?}",
        start.elapsed()
    );
    assert_eq!((report.completed, report.aborted), (1, 0));
    assert_eq!(running.await.unwrap().unwrap(), 1);
}

#[test]
fn every_request_is_counted_once_whatever_its_fate() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async {
            let (service, mut handle) = batched(config(1, 0));
            handle.allow(1);
            // Its own deadline fires while its batch runs.
            let request = Request::new(1).with_timeout(Duration::from_millis(10));
            let timed_out = {
                let service = service.clone();
                tokio::spawn(async move { service.infer(request).await })
            };
            let (_, slow_reply) = handle.next_request().await.unwrap();
            // Its caller leaves while it is queued.
            let left = send(&service, 2);
            // It is still queued when the drain runs out of time.
            let aborted = send(&service, 3);
            settle().await;
            left.abort();
            assert!(
                timed_out
                    .await
                    .unwrap()
                    .unwrap_err()
                    .is::<candlewick::error::DeadlineExceeded>()
            );
            let report = service
                .drain(Instant::now() + Duration::from_millis(50))
                .await;
            assert!(
                aborted
                    .await
                    .unwrap()
                    .unwrap_err()
                    .is::<candlewick::error::Closed>()
            );
            assert_eq!(report.aborted, 1);
            drop(slow_reply);
        });
    });
    let mut outcomes = std::collections::BTreeMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let (_, key) = key.into_parts();
        if let (DebugValue::Counter(n), Some(outcome)) =
            (value, key.labels().find(|l| l.key() == "outcome"))
        {
            *outcomes.entry(outcome.value().to_owned()).or_insert(0) += n;
        }
    }
    assert_eq!(outcomes.values().sum::<u64>(), 3, "{outcomes:?}");
    assert_eq!(outcomes["deadline"], 1, "{outcomes:?}");
    assert_eq!(outcomes["cancelled"], 1, "{outcomes:?}");
    assert_eq!(outcomes["closed"], 1, "{outcomes:?}");
}

#[tokio::test(start_paused = true)]
async fn a_panicking_inner_service_fails_its_batch_and_serves_the_next() {
    let inner = tower::service_fn(|batch: Vec<u32>| {
        assert!(!batch.contains(&13), "the inner service panicked");
        std::future::ready(Ok::<_, BoxError>(all_ok(batch)))
    });
    let service = Batch::new(inner, config(1, 0));
    let doomed = send(&service, 13);
    let queued = send(&service, 14);
    let err = doomed.await.unwrap().unwrap_err();
    let failed = err.downcast_ref::<ModelFailed>().expect("a model failure");
    assert_eq!(failed.kind(), FailureKind::Panic);
    assert_eq!(queued.await.unwrap().unwrap(), 14);
    assert!(!service.is_closed());
    assert_eq!(service.infer(1).await.unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn adaptive_waiting_never_holds_a_request_on_an_idle_service() {
    // However long max_wait, nothing else runs: waiting would only idle.
    let (service, mut handle) = batched(config(8, 1_000));
    handle.allow(1);
    let start = Instant::now();
    let request = send(&service, 7);
    let (batch, reply) = handle.next_request().await.unwrap();
    assert_eq!(batch, [7]);
    assert_eq!(start.elapsed(), Duration::ZERO);
    reply.send_response(vec![8]);
    assert_eq!(request.await.unwrap().unwrap(), 8);
}

/// A batcher over two "replicas" whose cost per batch was measured at
/// `fixed` whatever its size (after 8 arrivals 1 ms apart), with one batch
/// running, and 3 more arrivals `gap` apart before the other replica frees.
async fn adaptive_setup(
    gap: Duration,
    fixed: Duration,
) -> (
    Batch<u32, u32>,
    Handle,
    tower_test::mock::SendResponse<Vec<u32>>,
) {
    let (service, mut handle) = batched(config(4, 50));
    handle.allow(0);
    let mut warmup = Vec::new();
    for i in 0..8 {
        warmup.push(send(&service, 10 + i));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Two full batches at once: two replicas.
    handle.allow(2);
    let (first_batch, first_reply) = handle.next_request().await.unwrap();
    let (second_batch, second_reply) = handle.next_request().await.unwrap();
    tokio::time::sleep(fixed).await;
    first_reply.send_response(first_batch);
    second_reply.send_response(second_batch);
    for request in warmup {
        request.await.unwrap().unwrap();
    }
    // One batch runs on one replica...
    handle.allow(1);
    let _running = send(&service, 100);
    let (_, running) = handle.next_request().await.unwrap();
    // ...while requests arrive `gap` apart.
    for i in 0..3 {
        tokio::time::sleep(gap).await;
        std::mem::forget(send(&service, i));
    }
    (service, handle, running)
}

#[tokio::test(start_paused = true)]
async fn adaptive_waiting_fills_a_batch_when_arrivals_beat_the_fixed_cost() {
    // One missing request is 1 ms away, well within a 20 ms fixed cost, and
    // at this rate (about one every 2.8 ms) only full batches keep up: the
    // freed replica waits for it and runs one full batch, not two.
    let (service, mut handle, running) =
        adaptive_setup(Duration::from_millis(1), Duration::from_millis(20)).await;
    handle.allow(1);
    let freed = Instant::now();
    let fourth = tokio::spawn({
        let service = service.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            service.infer(3).await
        }
    });
    let (batch, reply) = handle.next_request().await.unwrap();
    assert_eq!(batch, [0, 1, 2, 3]);
    assert_eq!(freed.elapsed(), Duration::from_millis(1));
    reply.send_response(batch);
    assert_eq!(fourth.await.unwrap().unwrap(), 3);
    drop(running);
}

/// After [`adaptive_setup`], the freed replica takes the three queued
/// requests at once.
async fn takes_what_is_queued_at_once(gap: Duration, fixed: Duration) {
    let (service, mut handle, running) = adaptive_setup(gap, fixed).await;
    handle.allow(1);
    let freed = Instant::now();
    let (batch, _reply) = handle.next_request().await.unwrap();
    assert_eq!(batch, [0, 1, 2]);
    assert_eq!(freed.elapsed(), Duration::ZERO);
    drop((running, service));
}

#[tokio::test(start_paused = true)]
async fn adaptive_waiting_does_not_wait_for_slow_arrivals() {
    // Requests 30 ms apart: a batch of one keeps up with them.
    takes_what_is_queued_at_once(Duration::from_millis(30), Duration::from_millis(10)).await;
}

#[tokio::test(start_paused = true)]
async fn adaptive_waiting_stops_at_the_batch_that_keeps_up() {
    // About one arrival every 2.1 ms against 10 ms batches on two
    // replicas: batches of 3 keep up, so the freed replica does not wait
    // for a fourth (waiting for a full batch, it would).
    takes_what_is_queued_at_once(Duration::from_millis(2), Duration::from_millis(10)).await;
}
