//! The contenders: candlewick and the batching layers a user would pick
//! instead, each put in front of the same virtual accelerator, plus the
//! physical limit.

use std::cell::Cell;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use candle_core::{Device, DeviceLocation};
use candlewick::batch::BatchConfig;
use candlewick::pool::{PoolConfig, ReplicaState};
use candlewick::{BoxError, Serving, ServingConfig};
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tower::util::BoxCloneService;
use tower::{Service, ServiceExt};

use crate::{Counters, Model, Params};

/// Every contender, as the callers see it.
pub(crate) type Svc = BoxCloneService<u64, u64, BoxError>;

/// Who serves the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Contender {
    /// `candlewick::Serving`.
    Candlewick,
    /// `tower::buffer::Buffer` in front of executors that run one request at a
    /// time: no batching.
    Buffer,
    /// Zebra's `tower-batch-control`.
    TowerBatchControl,
    /// The `tower-batch` crate.
    TowerBatch,
    /// The `batched-fn` crate.
    BatchedFn,
    /// Back-to-back full batches, no serving layer.
    Limit,
}

impl Contender {
    pub(crate) const ALL: [Self; 6] = [
        Self::Candlewick,
        Self::TowerBatchControl,
        Self::TowerBatch,
        Self::BatchedFn,
        Self::Buffer,
        Self::Limit,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Candlewick => "candlewick",
            Self::Buffer => "tower Buffer (no batching)",
            Self::TowerBatchControl => "tower-batch-control 1.1.1",
            Self::TowerBatch => "tower-batch 0.4.0",
            Self::BatchedFn => "batched-fn 0.2.5",
            Self::Limit => "physical limit (measured)",
        }
    }

    /// A short name for filters and plot legends.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Self::Candlewick => "candlewick",
            Self::Buffer => "buffer",
            Self::TowerBatchControl => "tower-batch-control",
            Self::TowerBatch => "tower-batch",
            Self::BatchedFn => "batched-fn",
            Self::Limit => "limit",
        }
    }

    /// The settings it runs with, in words.
    pub(crate) fn settings(self, params: &Params) -> String {
        let wait = params.max_wait.as_secs_f64() * 1e6;
        let spin = params.handoff_spin.as_secs_f64() * 1e6;
        let latency = params.peer_latency.as_secs_f64() * 1e6;
        let b = params.max_batch;
        match self {
            Self::Candlewick => format!(
                "`Serving`: one CPU device with R replicas (one OS thread each), max_batch_size = {b}, \
                 max_wait = {wait} µs (adaptive), handoff_spin = {spin} µs, queue capacity = {}, \
                 admission = Shed; callers use the tower \
                 `Service` interface",
                params.queue
            ),
            Self::Buffer => {
                "`tower::buffer::Buffer::new(svc, 1024)` (tower 0.5.3) around a service \
                 that sends each request as a batch of one to R executor threads sharing one queue"
                    .to_owned()
            }
            Self::TowerBatchControl => format!(
                "`Batch::new(svc, max_items_weight_in_batch = {b}, max_batches = 2·R, max_latency = \
                 {latency} µs)`; the inner service collects `Item`s and on `Flush` hands the batch \
                 to R executor threads sharing one queue, its flush future ending when the batch \
                 has run (so up to 2 batches per executor: one running, one queued)"
            ),
            Self::TowerBatch => format!(
                "`Batch::new(svc, size = {b}, time = {latency} µs)`; the inner service collects \
                 `Item`s and on `Flush` hands the batch to R executor threads sharing a queue of R \
                 batches, its flush future ending as soon as the batch is queued (so the next batch \
                 forms while one runs; the crate itself runs one flush at a time)"
            ),
            Self::BatchedFn => format!(
                "R independent `batched_fn!` handlers (the crate has one handler thread per call \
                 site), max_batch_size = {b}, max_delay = 1 ms (its unit is whole milliseconds; 0 \
                 would mean batches of one), unbounded channel; requests spread round-robin"
            ),
            Self::Limit => {
                "R threads each sleeping F + c·B back to back, counting B requests per batch"
                    .to_owned()
            }
        }
    }

    pub(crate) fn can_serve(self) -> bool {
        self != Self::Limit
    }
}

/// A running contender: its service and what to do when the scenario ends.
pub(crate) struct Running {
    pub(crate) svc: Svc,
    pub(crate) counters: Arc<Counters>,
    stopped: Arc<AtomicBool>,
    serving: Option<Serving<u64, u64>>,
}

impl Running {
    /// Stops the executors from running anything still queued.
    pub(crate) fn stop(self) {
        self.stopped.store(true, Ordering::Relaxed);
        drop(self.serving);
    }
}

/// Starts `contender` with `replicas` executors and waits until it can serve.
pub(crate) async fn start(
    contender: Contender,
    params: &Params,
    replicas: usize,
    model: Arc<Model>,
) -> Running {
    let counters = model.counters.clone();
    let stopped = Arc::new(AtomicBool::new(false));
    let mut serving = None;
    let svc = match contender {
        Contender::Candlewick => {
            let started = start_candlewick(params, replicas, model).await;
            serving = Some(started.clone());
            Svc::new(started.map_request(candlewick::batch::Request::new))
        }
        Contender::Buffer => {
            let tx = executors(model, replicas, 16384, stopped.clone());
            Svc::new(tower::buffer::Buffer::new(Single { tx }, 1024))
        }
        Contender::TowerBatchControl => {
            let tx = executors(model, replicas, replicas, stopped.clone());
            let inner = TbcInner(Collector::new(tx, true, params.max_batch));
            let batch = tower_batch_control::Batch::new(
                inner,
                params.max_batch,
                2 * replicas,
                params.peer_latency,
            );
            Svc::new(batch.map_request(TbcItem))
        }
        Contender::TowerBatch => {
            let tx = executors(model, replicas, replicas, stopped.clone());
            let inner = TbInner(Collector::new(tx, false, params.max_batch));
            Svc::new(tower_batch::Batch::new(
                inner,
                params.max_batch,
                params.peer_latency,
            ))
        }
        Contender::BatchedFn => {
            assert!(
                replicas <= BATCHED_FN_REPLICAS.len(),
                "at most 4 batched-fn handlers"
            );
            BATCHED_FN_MAX_BATCH.store(params.max_batch, Ordering::Relaxed);
            *BATCHED_FN_MODEL.write().expect("model lock") = Some(model);
            Svc::new(BatchedFnService {
                replicas,
                next: Arc::new(AtomicUsize::new(0)),
                this: 0,
            })
        }
        Contender::Limit => unreachable!("the limit is measured, not served"),
    };
    Running {
        svc,
        counters,
        stopped,
        serving,
    }
}

async fn start_candlewick(
    params: &Params,
    replicas: usize,
    model: Arc<Model>,
) -> Serving<u64, u64> {
    let loader = move |_: &Device| -> Result<_, BoxError> {
        let model = model.clone();
        // One model per replica, so this is the replica's own clock.
        let last_end = Cell::new(None::<Instant>);
        Ok(move |batch: &[u64]| -> Result<Vec<u64>, BoxError> {
            Ok(model.forward(&last_end, batch))
        })
    };
    let pool = PoolConfig::default()
        .with_devices(vec![DeviceLocation::Cpu])
        .with_replicas_per_device(NonZeroUsize::new(replicas).expect("replicas > 0"))
        .with_handoff_spin(params.handoff_spin)
        .with_compute_priority(params.compute_priority);
    let batch = BatchConfig::default()
        .with_max_batch_size(NonZeroUsize::new(params.max_batch).expect("checked"))
        .with_max_wait(params.max_wait)
        .with_queue_capacity(NonZeroUsize::new(params.queue).expect("checked"));
    let serving =
        Serving::start(loader, ServingConfig::new(pool, batch)).expect("the replicas start");
    while !serving
        .replicas()
        .iter()
        .all(|replica| replica.state == ReplicaState::Idle)
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    serving
}

// ---- executors: the virtual accelerator behind the peers ----

/// A batch for an executor thread.
struct Job {
    inputs: Vec<u64>,
    replies: Vec<oneshot::Sender<u64>>,
    /// Told when the batch has run, before the replies are sent.
    done: Option<oneshot::Sender<()>>,
}

/// Starts `n` OS threads that run jobs from one shared queue of `capacity`
/// jobs, each with a model of its own clock. They stop when the queue closes;
/// once `stopped` is set they drop what is left without running it.
fn executors(
    model: Arc<Model>,
    n: usize,
    capacity: usize,
    stopped: Arc<AtomicBool>,
) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel::<Job>(capacity.max(1));
    let rx = Arc::new(Mutex::new(rx));
    for index in 0..n {
        let (model, rx, stopped) = (model.clone(), rx.clone(), stopped.clone());
        std::thread::Builder::new()
            .name(format!("executor-{index}"))
            .spawn(move || {
                let last_end = Cell::new(None::<Instant>);
                loop {
                    let job = rx.lock().expect("queue lock").blocking_recv();
                    let Some(job) = job else { break };
                    if stopped.load(Ordering::Relaxed) {
                        continue;
                    }
                    let outputs = model.forward(&last_end, &job.inputs);
                    if let Some(done) = job.done {
                        let _ = done.send(());
                    }
                    for (output, reply) in outputs.into_iter().zip(job.replies) {
                        let _ = reply.send(output);
                    }
                }
            })
            .expect("an executor thread");
    }
    tx
}

fn lost() -> BoxError {
    "the executor dropped the request".into()
}

/// Sends each request as a batch of one (behind `tower::buffer::Buffer`).
#[derive(Clone)]
struct Single {
    tx: mpsc::Sender<Job>,
}

impl Service<u64> for Single {
    type Response = u64;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<u64, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, input: u64) -> Self::Future {
        let tx = self.tx.clone();
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            let job = Job {
                inputs: vec![input],
                replies: vec![reply],
                done: None,
            };
            tx.send(job).await.map_err(|_| lost())?;
            answer.await.map_err(|_| lost())
        })
    }
}

/// The inner service of the two `tower-batch*` crates: collects items and
/// hands them to the executors on flush.
struct Collector {
    inputs: Vec<u64>,
    replies: Vec<oneshot::Sender<u64>>,
    tx: mpsc::Sender<Job>,
    /// Whether the flush future waits for the batch to run (else only for it
    /// to be queued).
    wait_done: bool,
    max: usize,
}

impl Collector {
    fn new(tx: mpsc::Sender<Job>, wait_done: bool, max: usize) -> Self {
        Self {
            inputs: Vec::with_capacity(max),
            replies: Vec::with_capacity(max),
            tx,
            wait_done,
            max,
        }
    }

    fn item(&mut self, input: u64) -> BoxFuture<'static, Result<u64, BoxError>> {
        let (reply, answer) = oneshot::channel();
        self.inputs.push(input);
        self.replies.push(reply);
        Box::pin(async move { answer.await.map_err(|_| lost()) })
    }

    fn flush(&mut self) -> BoxFuture<'static, Result<u64, BoxError>> {
        let inputs = std::mem::replace(&mut self.inputs, Vec::with_capacity(self.max));
        let replies = std::mem::replace(&mut self.replies, Vec::with_capacity(self.max));
        let tx = self.tx.clone();
        let wait_done = self.wait_done;
        Box::pin(async move {
            if inputs.is_empty() {
                return Ok(0);
            }
            let (done, finished) = if wait_done {
                let (done, finished) = oneshot::channel();
                (Some(done), Some(finished))
            } else {
                (None, None)
            };
            let job = Job {
                inputs,
                replies,
                done,
            };
            tx.send(job).await.map_err(|_| lost())?;
            if let Some(finished) = finished {
                finished.await.map_err(|_| lost())?;
            }
            Ok(0)
        })
    }
}

/// tower-batch-control needs a request type with a weight.
struct TbcItem(u64);

impl tower_batch_control::RequestWeight for TbcItem {}

struct TbcInner(Collector);

impl Service<tower_batch_control::BatchControl<TbcItem>> for TbcInner {
    type Response = u64;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<u64, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: tower_batch_control::BatchControl<TbcItem>) -> Self::Future {
        match request {
            tower_batch_control::BatchControl::Item(TbcItem(input)) => self.0.item(input),
            tower_batch_control::BatchControl::Flush => self.0.flush(),
        }
    }
}

struct TbInner(Collector);

impl Service<tower_batch::BatchControl<u64>> for TbInner {
    type Response = u64;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<u64, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: tower_batch::BatchControl<u64>) -> Self::Future {
        match request {
            tower_batch::BatchControl::Item(input) => self.0.item(input),
            tower_batch::BatchControl::Flush => self.0.flush(),
        }
    }
}

// ---- batched-fn: one static handler thread per macro call site ----

static BATCHED_FN_MODEL: RwLock<Option<Arc<Model>>> = RwLock::new(None);
static BATCHED_FN_MAX_BATCH: AtomicUsize = AtomicUsize::new(64);

thread_local! {
    static BATCHED_FN_LAST_END: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The handler body: runs the current scenario's model on this handler
/// thread's clock.
fn batched_fn_forward(batch: Vec<u64>) -> Vec<u64> {
    let model = BATCHED_FN_MODEL
        .read()
        .expect("model lock")
        .clone()
        .expect("a model is set before a batched-fn scenario");
    BATCHED_FN_LAST_END.with(|last_end| model.forward(last_end, &batch))
}

macro_rules! batched_fn_replica {
    ($name:ident) => {
        fn $name(input: u64) -> BoxFuture<'static, Result<u64, BoxError>> {
            let call = batched_fn::batched_fn! {
                handler = |batch: Vec<u64>| -> Vec<u64> { batched_fn_forward(batch) };
                config = {
                    max_batch_size: BATCHED_FN_MAX_BATCH.load(Ordering::Relaxed),
                    max_delay: 1,
                };
                context = {};
            };
            Box::pin(async move {
                call(input)
                    .await
                    .map_err(|error| BoxError::from(format!("batched-fn: {error:?}")))
            })
        }
    };
}

batched_fn_replica!(batched_fn_0);
batched_fn_replica!(batched_fn_1);
batched_fn_replica!(batched_fn_2);
batched_fn_replica!(batched_fn_3);

type BatchedFnCall = fn(u64) -> BoxFuture<'static, Result<u64, BoxError>>;

const BATCHED_FN_REPLICAS: [BatchedFnCall; 4] =
    [batched_fn_0, batched_fn_1, batched_fn_2, batched_fn_3];

/// Round-robin over `replicas` batched-fn handlers: each clone (one per
/// closed-loop caller, one per open-loop request) takes the next.
struct BatchedFnService {
    replicas: usize,
    next: Arc<AtomicUsize>,
    this: usize,
}

impl Clone for BatchedFnService {
    fn clone(&self) -> Self {
        Self {
            replicas: self.replicas,
            next: self.next.clone(),
            this: self.next.fetch_add(1, Ordering::Relaxed) % self.replicas,
        }
    }
}

impl Service<u64> for BatchedFnService {
    type Response = u64;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<u64, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, input: u64) -> Self::Future {
        BATCHED_FN_REPLICAS[self.this](input)
    }
}

// ---- the physical limit ----

/// Runs full batches back to back on `replicas` threads for `secs`: returns
/// requests per second.
pub(crate) fn measure_limit(params: &Params, replicas: usize, model: &Arc<Model>) -> f64 {
    let batch: Vec<u64> = (0..params.max_batch as u64).collect();
    let begin = Instant::now();
    let end = begin + params.secs;
    let threads: Vec<_> = (0..replicas)
        .map(|_| {
            let (model, batch) = (model.clone(), batch.clone());
            std::thread::spawn(move || {
                let last_end = Cell::new(None::<Instant>);
                let mut served = 0u64;
                while Instant::now() < end {
                    served += model.forward(&last_end, &batch).len() as u64;
                }
                served
            })
        })
        .collect();
    let served: u64 = threads
        .into_iter()
        .map(|thread| thread.join().expect("a limit thread panicked"))
        .sum();
    served as f64 / begin.elapsed().as_secs_f64()
}
