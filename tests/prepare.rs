//! The preparation stage: work runs on its own bounded threads, a full queue
//! is refused at once, a panic fails one request, and work whose caller left
//! is skipped.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use candlewick::error::{FailureKind, ModelFailed, Overloaded, classify};
use candlewick::prepare::{PrepareConfig, Preparer};

fn preparer(threads: usize, queue: usize) -> Preparer {
    let config = PrepareConfig::default()
        .with_threads(NonZeroUsize::new(threads).unwrap())
        .with_queue_capacity(NonZeroUsize::new(queue).unwrap());
    Preparer::new(config, &Default::default()).unwrap()
}

/// Occupies the preparer's one thread until the returned sender is dropped.
async fn occupy(preparer: &Preparer) -> (mpsc::Sender<()>, tokio::task::JoinHandle<()>) {
    let (release, hold) = mpsc::channel::<()>();
    let (started, running) = tokio::sync::oneshot::channel();
    let busy = preparer.clone();
    let task = tokio::spawn(async move {
        busy.run(move || {
            let _ = started.send(());
            let _ = hold.recv();
        })
        .await
        .unwrap();
    });
    running.await.unwrap();
    (release, task)
}

#[tokio::test]
async fn work_runs_on_a_preparation_thread_not_the_runtime() {
    let preparer = preparer(2, 4);
    let name = preparer
        .run(|| std::thread::current().name().map(str::to_owned))
        .await
        .unwrap();
    assert!(
        name.as_deref()
            .unwrap_or_default()
            .starts_with("candlewick-prepare-"),
        "{name:?}"
    );
}

#[tokio::test]
async fn a_full_queue_is_refused_at_once_with_a_retry_after() {
    let preparer = preparer(1, 1);
    let (release, busy) = occupy(&preparer).await;
    // One job waits for the thread; the next finds the queue full.
    let queued = tokio::spawn({
        let preparer = preparer.clone();
        async move { preparer.run(|| 7).await }
    });
    while preparer.queue_depth() < 1 {
        tokio::task::yield_now().await;
    }
    let started = std::time::Instant::now();
    let err = preparer.run(|| 8).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    let overloaded = err.downcast_ref::<Overloaded>().expect("typed error");
    assert!(overloaded.retry_after() > Duration::ZERO);
    assert_eq!(classify(&*err).status, 429);
    drop(release);
    busy.await.unwrap();
    assert_eq!(queued.await.unwrap().unwrap(), 7);
    assert_eq!(preparer.queue_depth(), 0);
}

#[tokio::test]
async fn a_panic_fails_its_own_request_and_the_threads_go_on() {
    let preparer = preparer(1, 4);
    for round in 0..3 {
        let err = preparer
            .run(|| -> u32 { panic!("the tokenizer crashed") })
            .await
            .unwrap_err();
        let failed = err.downcast_ref::<ModelFailed>().expect("typed error");
        assert_eq!(failed.kind(), FailureKind::Panic, "round {round}");
        assert!(err.to_string().contains("the tokenizer crashed"), "{err}");
        assert_eq!(preparer.run(move || round).await.unwrap(), round);
    }
}

#[tokio::test]
async fn work_whose_caller_left_is_skipped() {
    let preparer = preparer(1, 4);
    let (release, busy) = occupy(&preparer).await;
    let ran = Arc::new(AtomicUsize::new(0));
    let counter = ran.clone();
    let left = tokio::spawn({
        let preparer = preparer.clone();
        async move {
            preparer
                .run(move || counter.fetch_add(1, Ordering::SeqCst))
                .await
        }
    });
    while preparer.queue_depth() < 1 {
        tokio::task::yield_now().await;
    }
    left.abort();
    assert!(left.await.unwrap_err().is_cancelled());
    drop(release);
    busy.await.unwrap();
    // The thread took the abandoned job, saw nobody waiting, and skipped it.
    preparer.run(|| ()).await.unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 0);
}
