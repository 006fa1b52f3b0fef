//! Health: every transition of the state machine, the probe endpoints, and
//! graceful drain, on real replica threads with closure models.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::Device;
use candlewick::batch::BatchConfig;
use candlewick::error::{Closed, Draining, status_code};
use candlewick::health::{Health, HealthConfig, HealthState};
use candlewick::pool::{Backoff, PoolConfig, ReplicaState};
use candlewick::{BoxError, Serving, ServingConfig};
use tokio::time::Instant;
use tower::ServiceExt;

fn config(replicas: usize) -> ServingConfig {
    let pool = PoolConfig::default()
        .with_replicas_per_device(NonZeroUsize::new(replicas).unwrap())
        .with_restart_backoff(Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(5),
        });
    ServingConfig::new(pool, BatchConfig::default().with_max_wait(Duration::ZERO))
}

/// Waits (bounded) until `health` reaches `state`.
async fn reach(health: &Health, state: HealthState) {
    let mut watch = health.watch();
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while health.report().state != state {
            tokio::select! {
                () = watch.changed() => {}
                // Liveness also changes with time alone.
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "never reached {state:?}: {:?}",
        health.report()
    );
}

/// A gate the model blocks on, so a test controls when a batch finishes.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, std::sync::Condvar)>);

impl Gate {
    fn wait(&self) {
        let (open, changed) = &*self.0;
        let mut open = open.lock().unwrap();
        while !*open {
            open = changed.wait(open).unwrap();
        }
    }

    fn open(&self) {
        let (open, changed) = &*self.0;
        *open.lock().unwrap() = true;
        changed.notify_all();
    }
}

#[tokio::test]
async fn starting_until_every_replica_has_loaded_then_ready() {
    let gate = Gate::default();
    let loading = gate.clone();
    let loader = move |_: &Device| -> Result<_, BoxError> {
        loading.wait();
        Ok(|batch: &[u32]| -> Result<Vec<u32>, BoxError> { Ok(batch.to_vec()) })
    };
    let serving = Serving::start(loader, config(2)).unwrap();
    let health = serving.health();
    let report = health.report();
    assert_eq!(report.state, HealthState::Starting);
    assert!(!report.started.ok && !report.ready.ok);
    assert!(report.live.ok, "a loading service is not dead");
    assert_eq!(report.started.reason, "0 of 2 replicas loaded");
    gate.open();
    reach(&health, HealthState::Ready).await;
    assert!(health.started().ok && health.ready().ok && health.live().ok);
    assert!(health.startup_time().is_some());
}

#[tokio::test]
async fn one_replica_down_is_degraded_but_still_ready() {
    let broken = Arc::new(AtomicBool::new(false));
    let breaker = broken.clone();
    let loader = move |_: &Device| -> Result<_, BoxError> {
        if breaker.load(Ordering::SeqCst) {
            return Err("device lost".into());
        }
        Ok(|batch: &[u32]| -> Result<Vec<u32>, BoxError> {
            if batch.contains(&666) {
                panic!("device fault");
            }
            Ok(batch.to_vec())
        })
    };
    let serving = Serving::start(loader, config(2)).unwrap();
    let health = serving.health();
    reach(&health, HealthState::Ready).await;
    // One replica panics and can no longer load.
    broken.store(true, Ordering::SeqCst);
    assert!(serving.infer(666).await.is_err());
    reach(&health, HealthState::Degraded).await;
    assert!(health.ready().ok, "{:?}", health.ready());
    assert!(health.live().ok);
    assert_eq!(serving.infer(1).await.unwrap(), 1);
}

#[tokio::test]
async fn every_replica_failing_is_not_ready_then_dead() {
    type Forward = fn(&[u32]) -> Result<Vec<u32>, BoxError>;
    let loader = |_: &Device| -> Result<Forward, BoxError> { Err("no weights".into()) };
    let health_config = HealthConfig::default()
        .with_startup_failures(2)
        .with_dead_after(Duration::from_millis(200));
    let serving = Serving::start(loader, config(2).with_health(health_config)).unwrap();
    let health = serving.health();
    // Settled after two failed loads each: started, but nothing can serve.
    reach(&health, HealthState::NotReady).await;
    assert!(health.started().ok);
    assert!(health.live().ok, "not dead before dead_after");
    assert!(health.report().replicas[0].last_error.as_deref() == Some("no weights"));
    reach(&health, HealthState::Dead).await;
    let live = health.live();
    assert!(!live.ok);
    assert!(
        live.reason.starts_with("no replica has served"),
        "{}",
        live.reason
    );
}

#[tokio::test]
async fn a_stall_replaces_the_replica_and_the_service_stays_live() {
    let gate = Gate::default();
    let stuck = gate.clone();
    let loader = move |_: &Device| -> Result<_, BoxError> {
        let stuck = stuck.clone();
        Ok(move |batch: &[u32]| -> Result<Vec<u32>, BoxError> {
            if batch.contains(&7) {
                stuck.wait();
            }
            Ok(batch.to_vec())
        })
    };
    let mut config = config(1);
    config.pool.stall_timeout = Some(Duration::from_millis(50));
    let serving = Serving::start(loader, config).unwrap();
    let health = serving.health();
    reach(&health, HealthState::Ready).await;
    let err = serving.infer(7).await.unwrap_err();
    assert!(err.to_string().contains("stalled"), "{err}");
    assert!(health.live().ok);
    reach(&health, HealthState::Ready).await;
    assert_eq!(health.report().replicas[0].stalls, 1);
    assert_eq!(serving.infer(8).await.unwrap(), 8);
    gate.open();
}

#[tokio::test]
async fn probes_answer_with_status_codes_and_reasons() {
    let gate = Gate::default();
    let loading = gate.clone();
    let loader = move |_: &Device| -> Result<_, BoxError> {
        loading.wait();
        Ok(|batch: &[u32]| -> Result<Vec<u32>, BoxError> { Ok(batch.to_vec()) })
    };
    let serving = Serving::start(loader, config(1)).unwrap();
    let probes = serving.probes();
    let get = |path: &str| {
        let probes = probes.clone();
        let request = http::Request::get(path).body(()).unwrap();
        async move { probes.oneshot(request).await.unwrap() }
    };

    let startup = get("/startupz").await;
    assert_eq!(startup.status(), 503);
    assert_eq!(startup.headers()["content-type"], "application/json");
    assert_eq!(
        startup.body(),
        r#"{"check":"started","ok":false,"reason":"0 of 1 replicas loaded","state":"starting","replicas":[{"device":"cpu","state":"loading","restarts":0,"stalls":0}]}"#
    );
    assert_eq!(get("/readyz").await.status(), 503);
    assert_eq!(get("/livez").await.status(), 200);
    assert_eq!(get("/nope").await.status(), 404);

    gate.open();
    reach(&serving.health(), HealthState::Ready).await;
    assert_eq!(get("/startupz").await.status(), 200);
    let ready = get("/readyz").await;
    assert_eq!(ready.status(), 200);
    assert!(
        ready
            .body()
            .contains(r#""ok":true,"reason":"1 of 1 replicas serving","state":"ready""#)
    );
}

#[tokio::test]
async fn probes_answer_while_every_replica_is_busy() {
    let gate = Gate::default();
    let busy = gate.clone();
    let loader = move |_: &Device| -> Result<_, BoxError> {
        let busy = busy.clone();
        Ok(move |batch: &[u32]| -> Result<Vec<u32>, BoxError> {
            busy.wait();
            Ok(batch.to_vec())
        })
    };
    let serving = Serving::start(loader, config(1)).unwrap();
    reach(&serving.health(), HealthState::Ready).await;
    let blocked: Vec<_> = (0..100)
        .map(|i| {
            let serving = serving.clone();
            tokio::spawn(async move { serving.infer(i).await })
        })
        .collect();
    // The only replica is stuck in a batch and the queue is full of work;
    // every probe still answers, from state.
    while serving.replicas()[0].state != ReplicaState::Busy {
        tokio::task::yield_now().await;
    }
    for path in ["/livez", "/readyz", "/startupz"] {
        let request = http::Request::get(path).body(()).unwrap();
        let response =
            tokio::time::timeout(Duration::from_secs(5), serving.probes().oneshot(request))
                .await
                .expect("a probe waited behind the model")
                .unwrap();
        assert_eq!(response.status(), 200, "{path}: {}", response.body());
    }
    gate.open();
    for request in blocked {
        request.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn drain_finishes_accepted_work_and_refuses_new_work() {
    let loader = |_: &Device| -> Result<_, BoxError> {
        Ok(|batch: &[u32]| -> Result<Vec<u32>, BoxError> {
            std::thread::sleep(Duration::from_millis(2));
            Ok(batch.iter().map(|x| x + 1).collect())
        })
    };
    let serving = Serving::start(loader, config(1)).unwrap();
    let health = serving.health();
    reach(&health, HealthState::Ready).await;
    let accepted: Vec<_> = (0..200u32)
        .map(|i| {
            let serving = serving.clone();
            tokio::spawn(async move { (i, serving.infer(i).await) })
        })
        .collect();
    tokio::task::yield_now().await;
    let drain = {
        let serving = serving.clone();
        tokio::spawn(async move {
            serving
                .shutdown(Instant::now() + Duration::from_secs(30))
                .await
        })
    };
    // Readiness is off at once, and new work is refused with a typed error.
    reach(&health, HealthState::Draining).await;
    assert_eq!(health.ready().reason, "draining");
    let refused = serving.infer(1).await.unwrap_err();
    assert!(refused.is::<Draining>());
    assert_eq!(status_code(&*refused), 503);

    let report = drain.await.unwrap();
    for request in accepted {
        let (i, result) = request.await.unwrap();
        assert_eq!(
            result.unwrap(),
            i + 1,
            "accepted request {i} lost its answer"
        );
    }
    assert_eq!(report.aborted, 0);
    assert_eq!(report.rejected, 1);
    assert!(report.completed > 0 && report.completed <= 200);
    assert_eq!(health.report().state, HealthState::Stopped);
}

#[tokio::test]
async fn drain_answers_what_is_left_at_the_deadline() {
    let gate = Gate::default();
    let stuck = gate.clone();
    let loader = move |_: &Device| -> Result<_, BoxError> {
        let stuck = stuck.clone();
        Ok(move |batch: &[u32]| -> Result<Vec<u32>, BoxError> {
            stuck.wait();
            Ok(batch.to_vec())
        })
    };
    let mut config = config(1);
    config.batch.max_batch_size = NonZeroUsize::new(4).unwrap();
    let serving = Serving::start(loader, config).unwrap();
    reach(&serving.health(), HealthState::Ready).await;
    let pending: Vec<_> = (0..10u32)
        .map(|i| {
            let serving = serving.clone();
            tokio::spawn(async move { serving.infer(i).await })
        })
        .collect();
    while serving.replicas()[0].state != ReplicaState::Busy {
        tokio::task::yield_now().await;
    }
    let report = serving
        .shutdown(Instant::now() + Duration::from_millis(50))
        .await;
    for request in pending {
        assert!(request.await.unwrap().unwrap_err().is::<Closed>());
    }
    // One running batch of 4 and 6 queued requests, all answered.
    assert_eq!((report.completed, report.aborted), (0, 10));
    gate.open();
}

/// `GET path` over a fresh loopback connection: the status code and body.
#[cfg(feature = "admin")]
fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

#[cfg(all(feature = "admin", feature = "prometheus"))]
#[test]
fn the_admin_server_answers_while_the_data_plane_runtime_is_blocked() {
    let data_plane = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (serving, admin) = data_plane.block_on(async {
        let serving = Serving::start(echo, config(1)).unwrap();
        reach(&serving.health(), HealthState::Ready).await;
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let metrics = candlewick::metrics::PrometheusService::from_handle(recorder.handle());
        let admin = serving
            .admin()
            .metrics("/metrics", metrics)
            .bind("127.0.0.1:0".parse().unwrap())
            .unwrap();
        (serving, admin)
    });
    let blocked = AtomicBool::new(false);
    std::thread::scope(|scope| {
        // The data plane's only thread is stuck in a blocking call.
        scope.spawn(|| {
            data_plane.block_on(async {
                blocked.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_secs(2));
            })
        });
        while !blocked.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        for (path, status, needle) in [
            ("/livez", 200, r#""check":"live","ok":true"#),
            ("/readyz", 200, r#""check":"ready","ok":true"#),
            ("/startupz", 200, r#""check":"started","ok":true"#),
            ("/nope", 404, "no such probe"),
        ] {
            let (actual, body) = http_get(admin.local_addr(), path);
            assert_eq!(actual, status, "{path}: {body}");
            assert!(body.contains(needle), "{path}: {body}");
        }
        assert_eq!(http_get(admin.local_addr(), "/metrics").0, 200);
        assert!(blocked.load(Ordering::SeqCst));
    });
    admin.shutdown();
    drop(serving);
}

#[cfg(feature = "admin")]
#[tokio::test]
async fn the_admin_server_closes_connections_that_never_finish_their_headers() {
    use std::io::{Read, Write};
    let serving = Serving::start(echo, config(1)).unwrap();
    let admin = serving
        .admin()
        .header_timeout(Duration::from_millis(200))
        .max_connections(4)
        .bind("127.0.0.1:0".parse().unwrap())
        .unwrap();
    let addr = admin.local_addr();
    let outcome = tokio::task::spawn_blocking(move || {
        // More half-open connections than the limit, each holding a slot.
        let mut held: Vec<_> = (0..8)
            .map(|_| {
                let mut stream = std::net::TcpStream::connect(addr).unwrap();
                stream.write_all(b"GET /livez HTTP/1.1\r\nHo").unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                stream
            })
            .collect();
        // Each is closed by the server (EOF, or a reset), not left hanging.
        let closed = held
            .iter_mut()
            .map(|stream| stream.read(&mut [0; 64]))
            .filter(|read| match read {
                Ok(0) => true,
                Ok(_) => false,
                Err(err) => {
                    err.kind() != std::io::ErrorKind::WouldBlock
                        && err.kind() != std::io::ErrorKind::TimedOut
                }
            })
            .count();
        // And a well-behaved probe is answered afterwards.
        (closed, http_get(addr, "/livez").0)
    })
    .await
    .unwrap();
    assert_eq!(outcome, (8, 200));
}

#[cfg(feature = "admin")]
#[tokio::test]
async fn an_admin_server_without_limits_still_answers_probes() {
    let serving = Serving::start(echo, config(1)).unwrap();
    let admin = serving
        .admin()
        .header_timeout(Duration::MAX)
        .max_connections(usize::MAX)
        .bind("127.0.0.1:0".parse().unwrap())
        .unwrap();
    let addr = admin.local_addr();
    let status = tokio::task::spawn_blocking(move || http_get(addr, "/livez").0)
        .await
        .unwrap();
    assert_eq!(status, 200);
}

#[cfg(feature = "admin")]
#[tokio::test]
async fn an_admin_port_in_use_is_an_error_not_a_panic() {
    let serving = Serving::start(echo, config(1)).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let err = serving
        .admin()
        .bind(taken.local_addr().unwrap())
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
}

/// A model that answers each input with itself.
#[cfg(feature = "admin")]
fn echo(_: &Device) -> Result<impl Fn(&[u8]) -> Result<Vec<u8>, BoxError> + use<>, BoxError> {
    Ok(|batch: &[u8]| -> Result<Vec<u8>, BoxError> { Ok(batch.to_vec()) })
}

#[tokio::test]
async fn health_attached_to_a_hand_built_stack_sees_its_batcher_stop() {
    use candlewick::batch::Batch;
    use candlewick::health::Lifecycle;
    use candlewick::pool::Pool;

    // The batcher's inner service fails once the test says so: that fails
    // a batch, not the batcher; one whose `poll_ready` fails is gone.
    let broken = Arc::new(AtomicBool::new(false));
    let flag = broken.clone();
    let inner = tower::service_fn(move |batch: Vec<u8>| {
        let broken = flag.load(Ordering::Acquire);
        async move {
            if broken {
                return Err::<Vec<Result<u8, BoxError>>, BoxError>(
                    "the inner service broke".into(),
                );
            }
            Ok(batch.into_iter().map(Ok).collect())
        }
    });
    let pool = Pool::new(echo, PoolConfig::default()).unwrap();
    let batch = Batch::new(inner, BatchConfig::default());
    let health = Health::new(HealthConfig::default(), pool.status());
    health.watch_batch(batch.status());
    reach(&health, HealthState::Ready).await;
    assert_eq!(batch.infer(7).await.unwrap(), 7);

    broken.store(true, Ordering::Release);
    let err = batch.infer(8).await.unwrap_err();
    assert!(err.to_string().contains("broke"), "{err}");
    assert_eq!(
        health.report().state,
        HealthState::Ready,
        "one failed batch is not death"
    );

    // A batcher whose inner service fails in `poll_ready` is gone for good.
    let stopped = Batch::new(PollFails, BatchConfig::default());
    health.watch_batch(stopped.status());
    assert!(stopped.infer(1).await.unwrap_err().is::<Closed>());
    let report = health.report();
    assert_eq!(report.state, HealthState::Dead);
    assert_eq!(report.live.reason, "the batching worker stopped");
    assert!(!report.ready.ok);
    // A shutdown stops the batcher on purpose: that is not death.
    health.set_lifecycle(Lifecycle::Stopped);
    assert!(health.live().ok);
    assert_eq!(health.report().state, HealthState::Stopped);
}

/// A batch service that can never take a batch.
struct PollFails;

impl tower::Service<Vec<u8>> for PollFails {
    type Response = Vec<Result<u8, BoxError>>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Self::Response, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Err("the device is gone".into()))
    }

    fn call(&mut self, _: Vec<u8>) -> Self::Future {
        unreachable!("never ready")
    }
}
