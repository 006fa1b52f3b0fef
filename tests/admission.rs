//! Admission control: deadlines, predictive shedding and priorities, with
//! paused tokio time and a `tower-test` mock standing in for the replicas.

use std::num::NonZeroUsize;
use std::time::Duration;

use candlewick::BoxError;
use candlewick::batch::{Batch, BatchConfig, Priority, Request};
use candlewick::error::{DeadlineExceeded, Overloaded, status_code};
use tokio::time::Instant;
use tower::ServiceExt as _;
use tower_test::mock;

type Handle = mock::Handle<Vec<u32>, Vec<u32>>;

fn batched(config: BatchConfig) -> (Batch<u32, u32>, Handle) {
    let (inner, handle) = mock::pair::<Vec<u32>, Vec<u32>>();
    let each_ok =
        |outputs: Vec<u32>| -> Vec<Result<u32, BoxError>> { outputs.into_iter().map(Ok).collect() };
    (Batch::new(inner.map_response(each_ok), config), handle)
}

fn config(max_batch: usize) -> BatchConfig {
    BatchConfig::default()
        .with_max_batch_size(NonZeroUsize::new(max_batch).unwrap())
        .with_max_wait(Duration::ZERO)
}

fn send(
    service: &Batch<u32, u32>,
    request: Request<u32>,
) -> tokio::task::JoinHandle<Result<u32, BoxError>> {
    let service = service.clone();
    tokio::spawn(async move { service.infer(request).await })
}

async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn an_expired_request_is_answered_at_its_deadline_and_never_reaches_the_model() {
    let (service, mut handle) = batched(config(8));
    handle.allow(0);
    let start = Instant::now();
    let expiring = send(
        &service,
        Request::new(1).with_timeout(Duration::from_millis(50)),
    );
    let patient = send(&service, Request::new(2));
    // Answered at its deadline, while every replica is still busy.
    let err = expiring.await.unwrap().unwrap_err();
    assert!(err.is::<DeadlineExceeded>(), "{err}");
    assert_eq!(status_code(&*err), 504);
    assert_eq!(start.elapsed(), Duration::from_millis(50));
    handle.allow(1);
    let (batch, reply) = handle.next_request().await.unwrap();
    assert_eq!(batch, [2]);
    reply.send_response(vec![20]);
    assert_eq!(patient.await.unwrap().unwrap(), 20);
}

#[tokio::test(start_paused = true)]
async fn the_default_timeout_applies_to_requests_without_a_deadline() {
    let config = config(8).with_default_timeout(Some(Duration::from_millis(30)));
    let (service, mut handle) = batched(config);
    handle.allow(0);
    let expiring = send(&service, Request::new(1));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let later = send(&service, Request::new(2));
    tokio::time::sleep(Duration::from_millis(15)).await;
    assert!(
        expiring
            .await
            .unwrap()
            .unwrap_err()
            .is::<DeadlineExceeded>()
    );
    handle.allow(1);
    let (batch, reply) = handle.next_request().await.unwrap();
    assert_eq!(batch, [2]);
    reply.send_response(vec![3]);
    assert_eq!(later.await.unwrap().unwrap(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_already_past_is_rejected_at_admission() {
    let (service, _handle) = batched(config(8));
    let past = Instant::now();
    tokio::time::advance(Duration::from_millis(1)).await;
    let err = service
        .infer(Request::new(1).with_deadline(past))
        .await
        .unwrap_err();
    assert!(err.is::<DeadlineExceeded>());
    assert_eq!(service.queue_depth().0, 0);
}

/// Serves one batch of `n` requests taking `batch_time`, so that the service
/// rate is measured.
async fn measure(service: &Batch<u32, u32>, handle: &mut Handle, n: u32, batch_time: Duration) {
    handle.allow(1);
    let warm: Vec<_> = (0..n).map(|i| send(service, Request::new(i))).collect();
    let (batch, reply) = handle.next_request().await.unwrap();
    tokio::time::sleep(batch_time).await;
    reply.send_response(batch);
    for request in warm {
        request.await.unwrap().unwrap();
    }
}

/// Sends `request` (of input `x`) and waits, at most 1 s, for it to reach
/// the model as a batch of its own: its answer's task, and the model's
/// reply.
async fn reaches_the_model(
    service: &Batch<u32, u32>,
    handle: &mut Handle,
    x: u32,
    request: Request<u32>,
) -> (
    tokio::task::JoinHandle<Result<u32, BoxError>>,
    mock::SendResponse<Vec<u32>>,
) {
    handle.allow(1);
    let answer = send(service, request);
    let (batch, reply) = tokio::time::timeout(Duration::from_secs(1), handle.next_request())
        .await
        .expect("admitted and dispatched")
        .unwrap();
    assert_eq!(batch, [x]);
    (answer, reply)
}

#[tokio::test(start_paused = true)]
async fn predictive_shedding_rejects_what_would_wait_too_long() {
    // A batch of up to 4 takes 100 ms.
    let config = config(4).with_max_queue_time(Some(Duration::from_millis(250)));
    let (service, mut handle) = batched(config);
    measure(&service, &mut handle, 4, Duration::from_millis(100)).await;
    handle.allow(0);
    // Eight queued requests take two batches, 200 ms: the ninth is admitted.
    let admitted: Vec<_> = (0..9).map(|i| send(&service, Request::new(i))).collect();
    settle().await;
    assert_eq!(service.queue_depth().0, 9);
    // Nine take three batches, 300 ms: the tenth would wait too long, and
    // hears so at once.
    let start = Instant::now();
    let err = service.infer(9).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    let overloaded = err.downcast_ref::<Overloaded>().expect("typed error");
    assert_eq!(overloaded.retry_after(), Duration::from_millis(300));
    assert_eq!(status_code(&*err), 429);
    drop(admitted);
}

#[tokio::test(start_paused = true)]
async fn high_priority_requests_are_batched_first() {
    let (service, mut handle) = batched(config(2));
    handle.allow(0);
    let high = |i| Request::new(i).with_priority(Priority::High);
    let _normal: Vec<_> = (0..2).map(|i| send(&service, Request::new(i))).collect();
    settle().await;
    let _urgent: Vec<_> = (10..12).map(|i| send(&service, high(i))).collect();
    settle().await;
    handle.allow(1);
    let (batch, _reply) = handle.next_request().await.unwrap();
    assert_eq!(batch, [10, 11]);
}

#[tokio::test(start_paused = true)]
async fn a_normal_request_is_not_starved_past_the_bound() {
    let config = config(2).with_max_starvation(Duration::from_millis(100));
    let (service, mut handle) = batched(config);
    handle.allow(0);
    let high = |i| Request::new(i).with_priority(Priority::High);
    let _normal = send(&service, Request::new(1));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _urgent: Vec<_> = (10..14).map(|i| send(&service, high(i))).collect();
    settle().await;
    handle.allow(1);
    let (batch, _reply) = handle.next_request().await.unwrap();
    // The normal request waited out the bound: it goes first.
    assert_eq!(batch, [1, 10]);
}

#[tokio::test]
async fn one_table_classifies_this_crates_errors_and_towers_own() {
    use candlewick::error::{Closed, Draining, FailureKind, InvalidInput, ModelFailed, classify};
    use tower::ServiceExt;

    // tower's Buffer answers `Closed` once its worker is gone.
    let (buffer, worker) = tower::buffer::Buffer::pair(
        tower::service_fn(|x: u8| async move { Ok::<_, BoxError>(x) }),
        1,
    );
    drop(worker);
    let buffer_closed = buffer.oneshot(1).await.unwrap_err();

    let cases: Vec<(BoxError, u16, &str, bool)> = vec![
        (
            Overloaded::new(Duration::from_secs(1)).into(),
            429,
            "overloaded",
            true,
        ),
        (
            tower::load_shed::error::Overloaded::new().into(),
            429,
            "overloaded",
            true,
        ),
        (InvalidInput::new("bad").into(), 422, "invalid", false),
        (DeadlineExceeded::new().into(), 504, "deadline", true),
        (
            tower::timeout::error::Elapsed::new().into(),
            504,
            "deadline",
            true,
        ),
        (Draining::new().into(), 503, "draining", true),
        (Closed::new().into(), 503, "closed", true),
        (buffer_closed, 503, "closed", true),
        (
            ModelFailed::new(FailureKind::Panic, "boom").into(),
            500,
            "model_error",
            true,
        ),
        (
            ModelFailed::new(FailureKind::Stalled, "slow").into(),
            500,
            "model_error",
            true,
        ),
        (
            ModelFailed::new(FailureKind::Error, "nan").into(),
            500,
            "model_error",
            false,
        ),
        ("anything else".into(), 500, "model_error", false),
        // The first known error in the source chain decides.
        (
            InvalidInput::new(Overloaded::new(Duration::ZERO)).into(),
            422,
            "invalid",
            false,
        ),
    ];
    for (err, status, outcome, retryable) in cases {
        let class = classify(&*err);
        assert_eq!(
            (class.status.as_u16(), class.outcome, class.retryable),
            (status, outcome, retryable),
            "{err}"
        );
        assert_eq!(status_code(&*err), status);
    }
}

/// `requests` as one all-or-nothing group, on a task of its own.
fn send_all(
    service: &Batch<u32, u32>,
    requests: Vec<Request<u32>>,
) -> tokio::task::JoinHandle<Result<Vec<u32>, BoxError>> {
    let service = service.clone();
    tokio::spawn(async move { service.infer_all(requests).await })
}

fn inputs(range: std::ops::Range<u32>) -> Vec<Request<u32>> {
    range.map(Request::new).collect()
}

#[tokio::test(start_paused = true)]
async fn a_group_is_admitted_or_refused_as_one() {
    let config = config(8).with_queue_capacity(NonZeroUsize::new(4).unwrap());
    let (service, mut handle) = batched(config);
    handle.allow(0);
    let first = send_all(&service, inputs(0..3));
    settle().await;
    assert_eq!(service.queue_depth().0, 3);
    // Two more do not fit in the one slot left: neither is queued.
    let err = service.infer_all(inputs(10..12)).await.unwrap_err();
    assert!(err.is::<Overloaded>(), "{err}");
    assert_eq!(service.queue_depth().0, 3);
    // The first group runs, in several batches if need be, answers in order.
    handle.allow(1);
    let (batch, reply) = handle.next_request().await.unwrap();
    assert_eq!(batch, [0, 1, 2]);
    reply.send_response(batch.iter().map(|x| x + 100).collect());
    assert_eq!(first.await.unwrap().unwrap(), [100, 101, 102]);
}

#[tokio::test(start_paused = true)]
async fn an_idle_service_never_refuses_a_group_for_its_own_inputs() {
    // A batch of up to 4 takes 100 ms: ten inputs take 300 ms, more than
    // any request may wait behind others.
    let patient = config(4).with_max_queue_time(Some(Duration::from_millis(250)));
    let (service, mut handle) = batched(patient);
    measure(&service, &mut handle, 1, Duration::from_millis(100)).await;
    handle.allow(0);
    let group = send_all(&service, inputs(0..10));
    settle().await;
    assert_eq!(service.queue_depth().0, 10, "refused on an idle service");
    // A single input is never refused with nothing ahead either, however
    // slow the measured rate.
    let (lone, mut lone_handle) = batched(config(4).with_max_queue_time(Some(Duration::ZERO)));
    measure(&lone, &mut lone_handle, 1, Duration::from_secs(10)).await;
    lone_handle.allow(0);
    let single = send(&lone, Request::new(1));
    settle().await;
    assert_eq!(lone.queue_depth().0, 1, "refused with nothing ahead");
    // With the group queued, the next request is ahead of nothing it can
    // skip: it waits too long, and hears so.
    let err = service.infer(99).await.unwrap_err();
    assert!(err.is::<Overloaded>(), "{err}");
    drop((group, single));
}

#[tokio::test(start_paused = true)]
async fn a_group_slower_than_its_deadline_even_alone_is_too_large_not_overloaded() {
    use candlewick::error::{TooLarge, classify};

    let (service, mut handle) = batched(config(4));
    measure(&service, &mut handle, 1, Duration::from_millis(100)).await;
    // Ten inputs take three batches of 100 ms alone; the group has 250 ms.
    let requests: Vec<_> = (0..10)
        .map(|i| Request::new(i).with_timeout(Duration::from_millis(250)))
        .collect();
    let err = service.infer_all(requests).await.unwrap_err();
    assert!(err.is::<TooLarge>(), "{err}");
    assert!(err.to_string().contains("0.300 s"), "{err}");
    assert!(err.to_string().contains("0.250 s"), "{err}");
    let class = classify(&*err);
    assert_eq!(class.status, 413);
    assert!(!class.retryable);
    assert_eq!(service.queue_depth().0, 0);
    // More inputs than the queue holds can never be admitted either.
    let small = config(4).with_queue_capacity(NonZeroUsize::new(3).unwrap());
    let (small, _handle) = batched(small);
    let err = small.infer_all(inputs(0..4)).await.unwrap_err();
    assert!(err.is::<TooLarge>(), "{err}");
    assert!(err.to_string().contains("at most 3"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_deadline_no_batch_can_meet_is_retryable_and_an_idle_service_still_tries_it() {
    use candlewick::error::classify;

    let (service, mut handle) = batched(config(4));
    // Batches measured at 300 ms: the service is slow now; a lone input
    // with 100 ms left is not too large for it.
    measure(&service, &mut handle, 1, Duration::from_millis(300)).await;
    let hurried = |x| Request::new(x).with_timeout(Duration::from_millis(100));
    // Idle, it admits the request anyway: only a batch that runs can show
    // the slowness has passed.
    let (tried, reply) = reaches_the_model(&service, &mut handle, 5, hurried(5)).await;
    // Busy, it refuses the next such request at once, as retryable.
    let start = Instant::now();
    let err = service.infer(hurried(6)).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert!(err.is::<DeadlineExceeded>(), "{err}");
    let class = classify(&*err);
    assert_eq!(class.status, 504);
    assert!(class.retryable);
    // The slowness passed: that batch comes back at once, and is served.
    reply.send_response(vec![50]);
    assert_eq!(tried.await.unwrap().unwrap(), 50);
    // Idle again, the next one is tried too, and served.
    let (again, reply) = reaches_the_model(&service, &mut handle, 7, hurried(7)).await;
    reply.send_response(vec![70]);
    assert_eq!(again.await.unwrap().unwrap(), 70);
}

#[tokio::test(start_paused = true)]
async fn an_idle_service_lets_one_request_judged_too_large_through_every_5_s() {
    use candlewick::error::TooLarge;

    let (service, mut handle) = batched(config(4));
    // Batches of 1 and 4 taking 100 and 400 ms: each input costs 100 ms,
    // the batch nothing. (Say a passing slowness: it will not last.)
    for n in [1, 4, 1, 4] {
        measure(&service, &mut handle, n, Duration::from_millis(100) * n).await;
    }
    let hurried = |x| Request::new(x).with_timeout(Duration::from_millis(50));
    let err = service.infer(hurried(1)).await.unwrap_err();
    assert!(err.is::<TooLarge>(), "{err}");
    // Refused so, no batch runs to show the slowness has passed. After 5 s
    // without one, an idle service lets one such request through.
    tokio::time::advance(Duration::from_secs(5)).await;
    let (probe, reply) = reaches_the_model(&service, &mut handle, 2, hurried(2)).await;
    // One: the next is refused while the probe runs.
    let err = service.infer(hurried(3)).await.unwrap_err();
    assert!(err.is::<TooLarge>(), "{err}");
    // The slowness had not passed: the probe's batch takes 100 ms too,
    // past the probe's deadline.
    tokio::time::sleep(Duration::from_millis(100)).await;
    reply.send_response(vec![20]);
    let err = probe.await.unwrap().unwrap_err();
    assert!(err.is::<DeadlineExceeded>(), "{err}");
    // (The batcher measures that batch before the clock moves on.)
    settle().await;
    // The next probe comes 5 s after that batch, not before.
    tokio::time::advance(Duration::from_millis(4900)).await;
    let err = service.infer(hurried(4)).await.unwrap_err();
    assert!(err.is::<TooLarge>(), "{err}");
    tokio::time::advance(Duration::from_millis(100)).await;
    let (probe, reply) = reaches_the_model(&service, &mut handle, 5, hurried(5)).await;
    reply.send_response(vec![50]);
    assert_eq!(probe.await.unwrap().unwrap(), 50);
}

#[tokio::test(start_paused = true)]
async fn the_smallest_batch_is_judged_on_one_replica_however_many_run() {
    let (service, mut handle) = batched(config(1));
    // Four batches of one, side by side, each 300 ms.
    handle.allow(4);
    let warm: Vec<_> = (0..4).map(|i| send(&service, Request::new(i))).collect();
    let mut replies = Vec::new();
    for _ in 0..4 {
        replies.push(handle.next_request().await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (batch, reply) in replies {
        reply.send_response(batch);
    }
    for request in warm {
        request.await.unwrap().unwrap();
    }
    // Two inputs take two batches, 150 ms over four replicas; but even one
    // batch takes 300 ms on its one replica, so with 100 ms left the
    // service is too slow now, not the group too large: retryable.
    let group = (0..2).map(|i| Request::new(i).with_timeout(Duration::from_millis(100)));
    let err = service.infer_all(group.collect()).await.unwrap_err();
    assert!(err.is::<DeadlineExceeded>(), "{err}");
}

#[tokio::test(start_paused = true)]
async fn dropping_a_group_cancels_every_input_still_queued() {
    let (service, mut handle) = batched(config(8));
    handle.allow(0);
    let group = send_all(&service, inputs(0..5));
    settle().await;
    assert_eq!(service.queue_depth().0, 5);
    group.abort();
    settle().await;
    let next = send(&service, Request::new(9));
    settle().await;
    handle.allow(1);
    let (batch, reply) = handle.next_request().await.unwrap();
    assert_eq!(batch, [9], "a cancelled input reached the model");
    reply.send_response(vec![18]);
    assert_eq!(next.await.unwrap().unwrap(), 18);
}

#[tokio::test(start_paused = true)]
async fn a_reservation_holds_room_while_the_inputs_are_prepared() {
    let config = config(8).with_queue_capacity(NonZeroUsize::new(3).unwrap());
    let (service, mut handle) = batched(config);
    handle.allow(0);
    // Room for two, before anything is parsed or tokenized.
    let reservation = service.reserve(2).await.unwrap();
    assert_eq!(reservation.len(), 2);
    let _other = send(&service, Request::new(7));
    settle().await;
    // The queue is full: nobody else gets in while the inputs are prepared.
    assert!(service.infer(8).await.unwrap_err().is::<Overloaded>());
    // The prepared request turned out to hold three inputs: the third finds
    // no room, and the whole request is refused.
    let err = reservation.infer_all(inputs(0..3)).await.unwrap_err();
    assert!(err.is::<Overloaded>(), "{err}");
    assert_eq!(service.queue_depth().0, 1);
    // Its room was freed: a reservation of two that holds one gives one back.
    let reservation = service.reserve(2).await.unwrap();
    let one = tokio::spawn(reservation.infer_all(inputs(0..1)));
    settle().await;
    assert_eq!(service.queue_depth().0, 2);
    assert!(service.reserve(1).await.is_ok());
    handle.allow(1);
    let (batch, reply) = handle.next_request().await.unwrap();
    assert_eq!(batch, [7, 0]);
    reply.send_response(vec![14, 0]);
    assert_eq!(one.await.unwrap().unwrap(), [0]);
}

#[tokio::test(start_paused = true)]
async fn a_drain_waits_for_room_reserved_before_it_began() {
    let (service, mut handle) = batched(config(8));
    handle.allow(1);
    // A request reserved its room and is still being prepared...
    let reservation = service.reserve(1).await.unwrap();
    let drain = tokio::spawn({
        let service = service.clone();
        async move { service.drain(Instant::now() + Duration::from_secs(5)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...so the drain has not finished, and the request, once prepared, is
    // served, not refused.
    assert!(!drain.is_finished());
    assert!(
        service
            .infer(5)
            .await
            .unwrap_err()
            .is::<candlewick::error::Draining>()
    );
    let answer = tokio::spawn(reservation.infer_all(inputs(0..1)));
    let (batch, reply) = handle.next_request().await.unwrap();
    assert_eq!(batch, [0]);
    reply.send_response(vec![10]);
    assert_eq!(answer.await.unwrap().unwrap(), [10]);
    let report = drain.await.unwrap();
    assert_eq!(
        (report.completed, report.rejected, report.aborted),
        (1, 1, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_group_hears_its_first_failure_at_once() {
    let (service, mut handle) = batched(config(1));
    handle.allow(2);
    let group = send_all(&service, inputs(0..2));
    let (_, first) = handle.next_request().await.unwrap();
    let (_, second) = handle.next_request().await.unwrap();
    // The second input's batch fails while the first is still running.
    second.send_error("the device is gone");
    let err = tokio::time::timeout(Duration::from_secs(1), group)
        .await
        .expect("answered at once")
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("the device is gone"), "{err}");
    drop(first);
}

#[tokio::test(start_paused = true)]
async fn a_reservation_is_a_one_shot_tower_service() {
    use tower::{Service, ServiceExt};

    let (service, mut handle) = batched(config(8));
    handle.allow(1);
    let mut reservation = service.reserve(2).await.unwrap();
    // Per-request deadlines travel through `Service::call` with the group.
    let requests = vec![
        Request::new(1).with_timeout(Duration::from_secs(1)),
        Request::new(2).with_timeout(Duration::from_secs(1)),
    ];
    let group = reservation.ready().await.unwrap().call(requests);
    // One call only: the room went with it.
    assert!(reservation.ready().await.is_err());
    assert!(reservation.call(vec![Request::new(3)]).await.is_err());
    assert_eq!(reservation.len(), 0);
    let (batch, reply) = handle.next_request().await.unwrap();
    assert_eq!(batch, [1, 2]);
    reply.send_response(vec![10, 20]);
    assert_eq!(group.await.unwrap(), [10, 20]);
}
