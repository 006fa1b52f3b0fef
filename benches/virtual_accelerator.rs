//! End-to-end throughput and latency of [`candlewick::Serving`] and of the
//! batching layers a user would pick instead, against a "virtual
//! accelerator": a model whose batch of `n` inputs costs `F + c·n` of wall
//! time on its executor's thread while the CPU is otherwise idle, like a GPU
//! kernel launch would.
//!
//! The physical limit of one executor is `B / (F + c·B)` requests per second
//! (full batches back to back); it is computed, and also measured by threads
//! that run full batches back to back with no serving layer at all.
//!
//! Contenders, in the same run, on the same model and load (settings are
//! printed with the results): candlewick; `tower::buffer::Buffer` without
//! batching; `tower-batch-control` (zebra's); `tower-batch`; `batched-fn`;
//! the physical limit. Each peer drives executor threads that run the same
//! model with the same clock as candlewick's replicas.
//!
//! Scenarios:
//!
//! * `closed-1r`, `closed-4r`: closed loop, 256 callers that each await their
//!   answer before sending the next request, with 1 and 4 replicas;
//! * `open-50pct-1r` … `open-90pct-4r`: open loop, Poisson arrivals at 50% and
//!   90% of the limit, with 1 and 4 replicas; every request runs on its own
//!   task and its latency is measured from its *scheduled* arrival, so a
//!   lagging generator cannot hide queueing;
//! * `overhead`: per-request overhead, a zero-cost model, 256 closed-loop
//!   callers, 1 replica;
//! * `sweep`: open loop at 10–95% of the one-replica limit, for the plots
//!   (throughput and p99 against offered load, written as SVG);
//! * `metrics`: candlewick's closed loop with one replica, first with no
//!   metrics recorder, then with `PrometheusService::install()`; it installs a
//!   global recorder, so it runs last.
//!
//! `std::thread::sleep` overshoots by tens of microseconds (timer slack), which
//! would make the model itself slower than `F + c·n`; so by default the model
//! sleeps until 100 µs before its deadline and yields in a loop for the rest.
//!
//! Run it with `cargo bench --bench virtual_accelerator`. Positional arguments
//! (other than the `--bench` flag cargo passes) filter the runs by substring
//! of `scenario/contender`, e.g. `closed`, `candlewick`, `open-90pct-1r/tower`.
//! Environment variables:
//!
//! | variable | meaning | default |
//! |----------|---------|---------|
//! | `CANDLEWICK_BENCH_SECS` | measured seconds per scenario | 5 |
//! | `CANDLEWICK_BENCH_WARMUP_SECS` | unmeasured warm-up seconds per scenario | 0.5 |
//! | `CANDLEWICK_BENCH_SWEEP_SECS` | measured seconds per point of the sweep | 2 |
//! | `CANDLEWICK_BENCH_REPS` | repetitions of each scenario, every contender in turn within each (medians are printed) | 1 |
//! | `CANDLEWICK_BENCH_FIXED_US` | `F`, fixed cost of a batch, µs | 2000 |
//! | `CANDLEWICK_BENCH_PER_ITEM_US` | `c`, cost per input, µs | 20 |
//! | `CANDLEWICK_BENCH_MAX_BATCH` | `B`, the batch size limit | 64 |
//! | `CANDLEWICK_BENCH_SPIN_US` | the model sleeps until this long before its deadline, then yields in a loop (0: plain sleep) | 100 |
//! | `CANDLEWICK_BENCH_MAX_WAIT_US` | candlewick's `max_wait`, µs | 2000 (the default) |
//! | `CANDLEWICK_BENCH_HANDOFF_SPIN_US` | candlewick's `PoolConfig::handoff_spin`, µs | 100 (the default) |
//! | `CANDLEWICK_BENCH_COMPUTE_PRIORITY` | candlewick's `PoolConfig::compute_priority`: `background` or `normal` | background (the default) |
//! | `CANDLEWICK_BENCH_PEER_LATENCY_US` | the `tower-batch*` crates' batch timer, µs | 500 |
//! | `CANDLEWICK_BENCH_QUEUE` | candlewick's queue capacity | 16384 |
//! | `CANDLEWICK_BENCH_CALLERS` | closed-loop callers | 256 |
//! | `CANDLEWICK_BENCH_PLOT_DIR` | where the SVG plots go | `target/bench-plots` |

// A bench binary reports its results on stdout.
#![allow(clippy::print_stdout)]

#[path = "common/mod.rs"]
mod common;
#[path = "virtual_accelerator/contenders.rs"]
mod contenders;
#[path = "virtual_accelerator/svg.rs"]
mod svg;

use std::cell::Cell;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candlewick::error::Overloaded;
use candlewick::pool::ComputePriority;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};

use common::{SplitMix64, env_or};
use contenders::{Contender, Running, Svc};

/// Everything a run is parameterised by.
#[derive(Debug, Clone)]
struct Params {
    fixed: Duration,
    per_item: Duration,
    spin: Duration,
    max_batch: usize,
    max_wait: Duration,
    handoff_spin: Duration,
    compute_priority: ComputePriority,
    peer_latency: Duration,
    queue: usize,
    callers: usize,
    secs: Duration,
    warmup: Duration,
    sweep_secs: Duration,
    reps: usize,
    plot_dir: String,
}

impl Params {
    fn from_env() -> Self {
        let micros = |name, default| Duration::from_secs_f64(env_or::<f64>(name, default) / 1e6);
        let params = Self {
            fixed: micros("CANDLEWICK_BENCH_FIXED_US", 2000.0),
            per_item: micros("CANDLEWICK_BENCH_PER_ITEM_US", 20.0),
            spin: micros("CANDLEWICK_BENCH_SPIN_US", 100.0),
            max_batch: env_or("CANDLEWICK_BENCH_MAX_BATCH", 64),
            max_wait: micros("CANDLEWICK_BENCH_MAX_WAIT_US", 2000.0),
            handoff_spin: micros("CANDLEWICK_BENCH_HANDOFF_SPIN_US", 100.0),
            compute_priority: match env_or(
                "CANDLEWICK_BENCH_COMPUTE_PRIORITY",
                "background".to_owned(),
            )
            .as_str()
            {
                "normal" => ComputePriority::Normal,
                "background" => ComputePriority::Background,
                other => {
                    panic!("CANDLEWICK_BENCH_COMPUTE_PRIORITY is normal or background, not {other}")
                }
            },
            peer_latency: micros("CANDLEWICK_BENCH_PEER_LATENCY_US", 500.0),
            queue: env_or("CANDLEWICK_BENCH_QUEUE", 16384),
            callers: env_or("CANDLEWICK_BENCH_CALLERS", 256),
            secs: Duration::from_secs_f64(env_or("CANDLEWICK_BENCH_SECS", 5.0)),
            warmup: Duration::from_secs_f64(env_or("CANDLEWICK_BENCH_WARMUP_SECS", 0.5)),
            sweep_secs: Duration::from_secs_f64(env_or("CANDLEWICK_BENCH_SWEEP_SECS", 2.0)),
            reps: env_or("CANDLEWICK_BENCH_REPS", 1usize).max(1),
            plot_dir: env_or("CANDLEWICK_BENCH_PLOT_DIR", "target/bench-plots".to_owned()),
        };
        assert!(
            params.max_batch > 0,
            "the batch size limit must be positive"
        );
        assert!(params.queue > 0, "the queue capacity must be positive");
        assert!(params.callers > 0, "there must be callers");
        params
    }

    /// The wall time the virtual accelerator takes for a batch of `n`.
    fn batch_time(&self, n: usize) -> Duration {
        self.fixed + self.per_item.mul_f64(n as f64)
    }

    /// Requests per second one replica serves at best: full batches back to
    /// back.
    fn limit_per_replica(&self) -> f64 {
        self.max_batch as f64 / self.batch_time(self.max_batch).as_secs_f64()
    }
}
/// What the model closures count, shared by all replicas of one serving.
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    batches: AtomicU64,
    /// Nanoseconds spent inside `forward`, summed over replicas.
    busy_ns: AtomicU64,
    /// Idle nanoseconds between the end of one batch and the start of the
    /// next on the same replica, summed, and how many such gaps there were.
    gap_ns: AtomicU64,
    gaps: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Snapshot {
    at: Instant,
    requests: u64,
    batches: u64,
    busy_ns: u64,
    gap_ns: u64,
    gaps: u64,
    cpu: Option<Duration>,
}

impl Counters {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            requests: self.requests.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            busy_ns: self.busy_ns.load(Ordering::Relaxed),
            gap_ns: self.gap_ns.load(Ordering::Relaxed),
            gaps: self.gaps.load(Ordering::Relaxed),
            cpu: process_cpu_time(),
        }
    }
}

/// What happened between two snapshots.
#[derive(Debug, Clone, Copy)]
struct Window {
    mean_batch: f64,
    /// Fraction of the window the replicas spent inside `forward`.
    busy: f64,
    /// Mean idle time of a replica between two batches, µs.
    gap_us: f64,
    /// Process CPU time (all threads) in the window, if known.
    cpu: Option<Duration>,
}

impl Window {
    fn between(a: Snapshot, b: Snapshot, replicas: usize) -> Self {
        let batches = (b.batches - a.batches).max(1) as f64;
        let wall = b.at.duration_since(a.at).as_secs_f64() * replicas as f64;
        Self {
            mean_batch: (b.requests - a.requests) as f64 / batches,
            busy: (b.busy_ns - a.busy_ns) as f64 / 1e9 / wall,
            gap_us: (b.gap_ns - a.gap_ns) as f64 / 1e3 / (b.gaps - a.gaps).max(1) as f64,
            cpu: a.cpu.zip(b.cpu).map(|(a, b)| b.saturating_sub(a)),
        }
    }

    /// Process CPU microseconds per request, given `requests` in the window.
    fn cpu_us_per(&self, requests: f64) -> f64 {
        if requests < 1.0 {
            return f64::NAN;
        }
        self.cpu
            .map_or(f64::NAN, |cpu| cpu.as_secs_f64() * 1e6 / requests)
    }
}

/// User + system CPU time of this process, from `/proc/self/stat` (Linux,
/// assuming the usual `USER_HZ` of 100, so 10 ms resolution).
fn process_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses: state is field
    // 3, utime field 14, stime field 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Which model the replicas run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cost {
    /// `F + c·n` of sleep per batch.
    Virtual,
    /// Returns at once.
    Zero,
}

/// The virtual accelerator: what every contender's executors run.
#[derive(Debug)]
struct Model {
    fixed: Duration,
    per_item: Duration,
    spin: Duration,
    cost: Cost,
    counters: Arc<Counters>,
}

impl Model {
    fn new(params: &Params, cost: Cost) -> Arc<Self> {
        Arc::new(Self {
            fixed: params.fixed,
            per_item: params.per_item,
            spin: params.spin,
            cost,
            counters: Arc::new(Counters::default()),
        })
    }

    /// Runs one batch on the calling executor, whose previous batch ended at
    /// `last_end`.
    fn forward(&self, last_end: &Cell<Option<Instant>>, batch: &[u64]) -> Vec<u64> {
        let counters = &self.counters;
        let started = Instant::now();
        if let Some(last_end) = last_end.get() {
            counters.gap_ns.fetch_add(
                started.duration_since(last_end).as_nanos() as u64,
                Ordering::Relaxed,
            );
            counters.gaps.fetch_add(1, Ordering::Relaxed);
        }
        if self.cost == Cost::Virtual {
            let deadline = started + self.fixed + self.per_item.mul_f64(batch.len() as f64);
            virtual_work(deadline, self.spin);
        }
        counters
            .requests
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        counters.batches.fetch_add(1, Ordering::Relaxed);
        let ended = Instant::now();
        counters.busy_ns.fetch_add(
            ended.duration_since(started).as_nanos() as u64,
            Ordering::Relaxed,
        );
        last_end.set(Some(ended));
        batch.to_vec()
    }
}

/// Occupies the calling thread until `deadline` without using the CPU,
/// except for the last `spin`, spent yielding, because sleeps overshoot.
fn virtual_work(deadline: Instant, spin: Duration) {
    let now = Instant::now();
    if deadline > now + spin {
        std::thread::sleep(deadline - now - spin);
    }
    while Instant::now() < deadline {
        std::thread::yield_now();
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

/// The medians over the repetitions of one scenario, column by column.
fn medians(reps: &[Vec<f64>]) -> Vec<f64> {
    let columns = reps.first().map_or(0, Vec::len);
    (0..columns)
        .map(|column| median(reps.iter().map(|rep| rep[column]).collect()))
        .collect()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Sends one request through `svc`.
async fn call(svc: &mut Svc, input: u64) -> Result<u64, candlewick::BoxError> {
    svc.ready().await?.call(input).await
}

/// Closed loop: `callers` tasks, each with its own clone of the service,
/// sending its next request once it has its answer. Returns throughput, p50
/// ms, p99 ms, mean batch, busy, CPU µs/request, errors, gap µs.
async fn closed_loop(params: &Params, running: Running, replicas: usize) -> Vec<f64> {
    let counters = running.counters.clone();
    let begin = Instant::now();
    let measure_from = begin + params.warmup;
    let end = measure_from + params.secs;
    let errors = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..params.callers)
        .map(|caller| {
            let mut svc = running.svc.clone();
            let errors = errors.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(1 << 14);
                let mut id = caller as u64;
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let result = call(&mut svc, id).await;
                    let done = Instant::now();
                    id += 1 << 20;
                    if done < measure_from || done > end {
                        continue;
                    }
                    match result {
                        Ok(_) => latencies.push(done.duration_since(sent).as_nanos() as u64),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep_until(measure_from.into()).await;
    let first = counters.snapshot();
    tokio::time::sleep_until(end.into()).await;
    let last = counters.snapshot();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("a caller panicked"));
    }
    running.stop();
    latencies.sort_unstable();
    let window = Window::between(first, last, replicas);
    let served = latencies.len() as f64;
    let throughput = served / last.at.duration_since(first.at).as_secs_f64();
    vec![
        throughput,
        percentile(&latencies, 50.0) / 1e6,
        percentile(&latencies, 99.0) / 1e6,
        window.mean_batch,
        window.busy,
        window.cpu_us_per(served),
        errors.load(Ordering::Relaxed) as f64,
        window.gap_us,
    ]
}

#[derive(Debug, Default)]
struct OpenResults {
    latencies: Vec<u64>,
    rejected: u64,
    errors: u64,
    /// Requests still unanswered when the drain time ran out; their latency
    /// (counted in `latencies` as the time they had waited) is a lower bound.
    unfinished: u64,
}

/// How long an open-loop run waits, after its window, for the requests that
/// arrived in it; an overloaded contender's leftovers are then cancelled.
const DRAIN: Duration = Duration::from_secs(3);

/// Open loop: Poisson arrivals at `rate` per second, each on its own task
/// with its own clone of the service, generated by an OS thread so arrivals
/// never wait for answers or for the runtime's timer (1 ms granularity).
/// Returns offered req/s, served req/s, p50 ms, p99 ms, mean batch, busy, CPU
/// µs/request, rejected, errors, gap µs, unfinished.
async fn open_loop(
    params: &Params,
    running: Running,
    replicas: usize,
    rate: f64,
    secs: Duration,
    seed: u64,
) -> Vec<f64> {
    let counters = running.counters.clone();
    let results = Arc::new(Mutex::new(OpenResults::default()));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let cancel = CancellationToken::new();
    let begin = Instant::now();
    let measure_from = begin + params.warmup;
    let end = measure_from + secs;

    let runtime = tokio::runtime::Handle::current();
    let generator = {
        let (svc, results, in_flight, cancel) = (
            running.svc.clone(),
            results.clone(),
            in_flight.clone(),
            cancel.clone(),
        );
        std::thread::spawn(move || {
            let mut rng = SplitMix64(seed);
            let mut next = begin + rng.exponential(rate);
            let mut offered = 0u64;
            while next < end {
                let now = Instant::now();
                while next <= now && next < end {
                    let scheduled = next;
                    next += rng.exponential(rate);
                    if scheduled >= measure_from {
                        offered += 1;
                    }
                    let (mut svc, results, in_flight, cancel) = (
                        svc.clone(),
                        results.clone(),
                        in_flight.clone(),
                        cancel.clone(),
                    );
                    in_flight.fetch_add(1, Ordering::Relaxed);
                    runtime.spawn(async move {
                        let result = tokio::select! {
                            result = call(&mut svc, offered) => Some(result),
                            () = cancel.cancelled() => None,
                        };
                        let done = Instant::now();
                        if scheduled >= measure_from {
                            let mut results = results.lock().expect("results lock");
                            let latency = done.duration_since(scheduled).as_nanos() as u64;
                            match result {
                                Some(Ok(_)) => results.latencies.push(latency),
                                Some(Err(err)) if err.is::<Overloaded>() => results.rejected += 1,
                                Some(Err(_)) => results.errors += 1,
                                None => {
                                    results.unfinished += 1;
                                    results.latencies.push(latency);
                                }
                            }
                        }
                        in_flight.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                if next > now {
                    std::thread::sleep(next - now);
                }
            }
            offered
        })
    };
    tokio::time::sleep_until(measure_from.into()).await;
    let first = counters.snapshot();
    tokio::time::sleep_until(end.into()).await;
    let last = counters.snapshot();
    let offered = tokio::task::spawn_blocking(move || generator.join())
        .await
        .expect("join")
        .expect("the generator panicked");
    // Let every request that arrived in the window finish, if it can.
    let drain_deadline = Instant::now() + DRAIN;
    while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cancel.cancel();
    while in_flight.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    running.stop();
    let mut results = std::mem::take(&mut *results.lock().expect("results lock"));
    results.latencies.sort_unstable();
    let secs = secs.as_secs_f64();
    let window = Window::between(first, last, replicas);
    let served = (results.latencies.len() as u64 - results.unfinished) as f64;
    vec![
        offered as f64 / secs,
        served / secs,
        percentile(&results.latencies, 50.0) / 1e6,
        percentile(&results.latencies, 99.0) / 1e6,
        window.mean_batch,
        window.busy,
        window.cpu_us_per(served),
        results.rejected as f64,
        results.errors as f64,
        window.gap_us,
        results.unfinished as f64,
    ]
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Scenario {
    Closed { replicas: usize },
    Open { replicas: usize, load: f64 },
    Overhead,
    Sweep { load: f64 },
}

impl Scenario {
    fn name(&self) -> String {
        match self {
            Self::Closed { replicas } => format!("closed-{replicas}r"),
            Self::Open { replicas, load } => format!("open-{}pct-{replicas}r", load * 100.0),
            Self::Overhead => "overhead-1r".to_owned(),
            Self::Sweep { load } => format!("sweep-{}pct-1r", load * 100.0),
        }
    }

    fn replicas(&self) -> usize {
        match *self {
            Self::Closed { replicas } | Self::Open { replicas, .. } => replicas,
            Self::Overhead | Self::Sweep { .. } => 1,
        }
    }

    /// Who takes part: every contender, but the limit only in the closed
    /// loop (it has no callers) and `Buffer` not in the sweep (it serves 2.5%
    /// of the limit, so every sweep point overloads it).
    fn takes(&self, contender: Contender) -> bool {
        match self {
            Self::Closed { .. } => true,
            Self::Open { .. } | Self::Overhead => contender.can_serve(),
            Self::Sweep { .. } => contender.can_serve() && contender != Contender::Buffer,
        }
    }
}

/// Mean overshoot of `std::thread::sleep(F)` on this machine.
fn sleep_overshoot(fixed: Duration) -> Duration {
    let rounds = 20;
    let started = Instant::now();
    for _ in 0..rounds {
        std::thread::sleep(fixed);
    }
    (started.elapsed() / rounds).saturating_sub(fixed)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Runs one scenario for one contender once.
async fn run_once(
    params: &Params,
    scenario: Scenario,
    contender: Contender,
    seed: u64,
) -> Vec<f64> {
    let limit1 = params.limit_per_replica();
    let replicas = scenario.replicas();
    let cost = if scenario == Scenario::Overhead {
        Cost::Zero
    } else {
        Cost::Virtual
    };
    let model = Model::new(params, cost);
    if contender == Contender::Limit {
        let model2 = model.clone();
        let params2 = params.clone();
        let first = model.counters.snapshot();
        let throughput = tokio::task::spawn_blocking(move || {
            contenders::measure_limit(&params2, replicas, &model2)
        })
        .await
        .expect("the limit measurement panicked");
        let last = model.counters.snapshot();
        let window = Window::between(first, last, replicas);
        // Little's law: with `callers` always waiting, each waits callers / X.
        let little_ms = params.callers as f64 / throughput * 1e3;
        return vec![
            throughput,
            little_ms,
            little_ms,
            window.mean_batch,
            window.busy,
            f64::NAN,
            0.0,
            window.gap_us,
        ];
    }
    let running = contenders::start(contender, params, replicas, model).await;
    match scenario {
        Scenario::Closed { .. } | Scenario::Overhead => {
            closed_loop(params, running, replicas).await
        }
        Scenario::Open { load, .. } => {
            let rate = load * limit1 * replicas as f64;
            open_loop(params, running, replicas, rate, params.secs, seed).await
        }
        Scenario::Sweep { load } => {
            open_loop(params, running, 1, load * limit1, params.sweep_secs, seed).await
        }
    }
}

const SWEEP_LOADS: [f64; 7] = [0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95];

fn main() {
    let params = Params::from_env();
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    let selected =
        |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let limit1 = params.limit_per_replica();
    let cores = std::thread::available_parallelism().map_or(0, NonZeroUsize::get);

    println!("# Virtual accelerator: candlewick against its peers and the physical limit");
    println!();
    println!(
        "- model: a batch of n sleeps F + c·n on its executor's thread; F = {} µs, c = {} µs, B = {}",
        params.fixed.as_secs_f64() * 1e6,
        params.per_item.as_secs_f64() * 1e6,
        params.max_batch,
    );
    println!(
        "- limit: B / (F + c·B) = {limit1:.0} req/s per executor (full batch = {:.3} ms)",
        params.batch_time(params.max_batch).as_secs_f64() * 1e3,
    );
    println!(
        "- model sleeps until {} µs before each deadline, then yields in a loop (CANDLEWICK_BENCH_SPIN_US)",
        params.spin.as_secs_f64() * 1e6,
    );
    println!(
        "- run: {} s measured after {} s warm-up per scenario and contender ({} s per sweep point), {} repetition(s){}; tokio multi-thread runtime, 2 workers; every contender is called through `tower::util::BoxCloneService`",
        params.secs.as_secs_f64(),
        params.warmup.as_secs_f64(),
        params.sweep_secs.as_secs_f64(),
        params.reps,
        if params.reps > 1 {
            " (every cell is the median over them)"
        } else {
            ""
        },
    );
    println!("- machine: {cores} cores available, {}", cpu_model());
    let overshoot = sleep_overshoot(params.fixed);
    println!(
        "- for reference, a plain thread::sleep({} µs) overshoots by {:.0} µs on average here",
        params.fixed.as_secs_f64() * 1e6,
        overshoot.as_secs_f64() * 1e6,
    );
    println!(
        "- columns: ratio to measured limit = the median, over the repetitions, of the throughput over the limit's in the same repetition (contenders run in turn within each repetition); busy = share of wall time the executors spent inside the model; gap = mean idle time of an executor between two batches; cpu = process CPU time (all threads, 10 ms resolution) per served request"
    );
    println!();
    println!("Contender settings (R = replicas, i.e. executor threads):");
    println!();
    for contender in Contender::ALL {
        println!(
            "- **{}**: {}",
            contender.name(),
            contender.settings(&params)
        );
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");

    let mut scenarios = vec![
        Scenario::Closed { replicas: 1 },
        Scenario::Closed { replicas: 4 },
        Scenario::Open {
            replicas: 1,
            load: 0.5,
        },
        Scenario::Open {
            replicas: 1,
            load: 0.9,
        },
        Scenario::Open {
            replicas: 4,
            load: 0.5,
        },
        Scenario::Open {
            replicas: 4,
            load: 0.9,
        },
        Scenario::Overhead,
    ];
    scenarios.extend(SWEEP_LOADS.iter().map(|&load| Scenario::Sweep { load }));

    let mut sweep: Vec<(Contender, f64, Vec<f64>)> = Vec::new();
    let mut header = None;
    for (index, scenario) in scenarios.iter().enumerate() {
        let label = |contender: Contender| format!("{}/{}", scenario.name(), contender.key());
        let contenders: Vec<Contender> = Contender::ALL
            .into_iter()
            .filter(|&contender| scenario.takes(contender) && selected(&label(contender)))
            .collect();
        if contenders.is_empty() {
            continue;
        }
        // Repetition by repetition, every contender in turn: each is measured
        // beside the others, so a drift of the machine touches them alike.
        let mut reps: Vec<Vec<Vec<f64>>> = vec![Vec::new(); contenders.len()];
        for rep in 0..params.reps {
            // The same arrivals for every contender.
            let seed = 0x5EED_0000 + (index * 1000 + rep) as u64;
            for (&contender, reps) in contenders.iter().zip(&mut reps) {
                let row = runtime.block_on(run_once(&params, *scenario, contender, seed));
                eprintln!(
                    "{} rep {}/{}: {:?}",
                    label(contender),
                    rep + 1,
                    params.reps,
                    row.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>()
                );
                reps.push(row);
            }
        }
        let limit = contenders
            .iter()
            .position(|&contender| contender == Contender::Limit)
            .map(|at| reps[at].clone());
        for (&contender, reps) in contenders.iter().zip(&reps) {
            let row = medians(reps);
            // The median of each repetition's throughput over the limit
            // measured just before or after it.
            let of_measured = limit.as_ref().map(|limit| {
                median(
                    reps.iter()
                        .zip(limit)
                        .map(|(rep, limit)| rep[0] / limit[0])
                        .collect(),
                )
            });
            let kind = std::mem::discriminant(scenario);
            if header != Some(kind) {
                header = Some(kind);
                println!();
                print_header(scenario, &params);
            }
            print_row(scenario, contender, &row, limit1, of_measured);
            if let Scenario::Sweep { load } = scenario {
                sweep.push((contender, *load, row));
            }
        }
    }
    if !sweep.is_empty() {
        write_plots(&params, &sweep);
    }
    if selected("metrics/candlewick") {
        runtime.block_on(metrics_on_off(&params));
    }
}

/// Candlewick's one-replica closed loop with no recorder, then with the
/// Prometheus recorder installed (which is global and stays, so this runs
/// last).
async fn metrics_on_off(params: &Params) {
    let scenario = Scenario::Closed { replicas: 1 };
    let mut rows = Vec::new();
    for on in [false, true] {
        if on {
            let exporter =
                candlewick::metrics::PrometheusService::install().expect("install the recorder");
            // Keep the handle: the recorder stays installed for the process.
            std::mem::forget(exporter);
        }
        let reps: Vec<Vec<f64>> = {
            let mut reps = Vec::new();
            for rep in 0..params.reps {
                let row = run_once(params, scenario, Contender::Candlewick, 0).await;
                eprintln!(
                    "metrics-{} rep {}/{}: {:?}",
                    if on { "on" } else { "off" },
                    rep + 1,
                    params.reps,
                    row.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>()
                );
                reps.push(row);
            }
            reps
        };
        rows.push(medians(&reps));
    }
    println!();
    println!(
        "## Metrics recording on and off: candlewick, closed loop, {} callers, 1 replica",
        params.callers
    );
    println!();
    println!("| recorder | req/s | p50 ms | p99 ms | mean batch | busy | cpu µs/req |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (row, name) in rows.iter().zip([
        "none (metrics calls are no-ops)",
        "`PrometheusService::install()`",
    ]) {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1}% | {:.1} |",
            row[0],
            row[1],
            row[2],
            row[3],
            row[4] * 100.0,
            row[5]
        );
    }
    println!();
    println!("throughput ratio on / off = {:.3}", rows[1][0] / rows[0][0]);
}

fn write_plots(params: &Params, sweep: &[(Contender, f64, Vec<f64>)]) {
    let limit1 = params.limit_per_replica();
    let mut served = Vec::new();
    let mut p99 = Vec::new();
    for contender in Contender::ALL {
        let points: Vec<&(Contender, f64, Vec<f64>)> =
            sweep.iter().filter(|(c, _, _)| *c == contender).collect();
        if points.is_empty() {
            continue;
        }
        served.push(svg::Series {
            name: contender.key().to_owned(),
            points: points.iter().map(|(_, _, row)| (row[0], row[1])).collect(),
            dashed: false,
        });
        p99.push(svg::Series {
            name: contender.key().to_owned(),
            points: points.iter().map(|(_, _, row)| (row[0], row[3])).collect(),
            dashed: false,
        });
    }
    let max_offered = sweep.iter().map(|(_, _, row)| row[0]).fold(0.0, f64::max);
    served.push(svg::Series {
        name: "limit".to_owned(),
        points: vec![(0.0, limit1), (max_offered, limit1)],
        dashed: true,
    });
    served.push(svg::Series {
        name: "served = offered".to_owned(),
        points: vec![(0.0, 0.0), (max_offered, max_offered)],
        dashed: true,
    });
    p99.push(svg::Series {
        name: "full batch (F + c·B)".to_owned(),
        points: vec![
            (0.0, params.batch_time(params.max_batch).as_secs_f64() * 1e3),
            (
                max_offered,
                params.batch_time(params.max_batch).as_secs_f64() * 1e3,
            ),
        ],
        dashed: true,
    });
    let dir = std::path::Path::new(&params.plot_dir);
    std::fs::create_dir_all(dir).expect("create the plot directory");
    let throughput = svg::line_chart(
        "Served vs offered load (1 executor, Poisson arrivals)",
        "offered req/s",
        "served req/s",
        &served,
        false,
    );
    let latency = svg::line_chart(
        "p99 latency vs offered load (1 executor, Poisson arrivals)",
        "offered req/s",
        "p99 latency, ms (log scale)",
        &p99,
        true,
    );
    for (name, text) in [("va-throughput.svg", throughput), ("va-p99.svg", latency)] {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write a plot");
        eprintln!("wrote {}", path.display());
    }
    println!();
    println!(
        "plots: {}/va-throughput.svg, {}/va-p99.svg",
        params.plot_dir, params.plot_dir
    );
}

fn fmt_ms(value: f64, lower_bound: bool) -> String {
    if value.is_nan() {
        "—".to_owned()
    } else if lower_bound {
        format!("≥ {value:.0}")
    } else {
        format!("{value:.2}")
    }
}

fn fmt_num(value: f64, digits: usize) -> String {
    if value.is_nan() {
        "—".to_owned()
    } else {
        format!("{value:.digits$}")
    }
}

fn print_header(scenario: &Scenario, params: &Params) {
    match scenario {
        Scenario::Closed { .. } => {
            println!("## Closed loop, {} callers", params.callers);
            println!();
            println!(
                "| contender | replicas | req/s | ratio to limit | ratio to measured limit | p50 ms | p99 ms | mean batch | busy | gap µs | cpu µs/req | errors |"
            );
            println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        }
        Scenario::Open { .. } => {
            println!("## Open loop, Poisson arrivals");
            println!();
            println!(
                "| contender | load | replicas | offered req/s | served req/s | p50 ms | p99 ms | mean batch | busy | gap µs | cpu µs/req | rejected | errors | unfinished |"
            );
            println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        }
        Scenario::Overhead => {
            println!(
                "## Per-request overhead: zero-cost model, {} closed-loop callers, 1 replica",
                params.callers
            );
            println!();
            println!(
                "| contender | req/s | wall ns/req | cpu µs/req | p50 ms | p99 ms | mean batch | errors |"
            );
            println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        }
        Scenario::Sweep { .. } => {
            println!("## Load sweep, 1 replica, Poisson arrivals (the plots)");
            println!();
            println!(
                "| contender | load | offered req/s | served req/s | p50 ms | p99 ms | mean batch | unfinished |"
            );
            println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        }
    }
}

/// One row of the table; `of_measured` is the median ratio to the limit
/// measured in the same repetitions, where the limit ran.
fn print_row(
    scenario: &Scenario,
    contender: Contender,
    row: &[f64],
    limit1: f64,
    of_measured: Option<f64>,
) {
    let name = contender.name();
    match *scenario {
        Scenario::Closed { replicas } => {
            let limit = limit1 * replicas as f64;
            let (p50, p99) = if contender == Contender::Limit {
                (format!("{:.2}*", row[1]), format!("{:.2}*", row[2]))
            } else {
                (fmt_ms(row[1], false), fmt_ms(row[2], false))
            };
            println!(
                "| {name} | {replicas} | {:.0} | {:.3} | {} | {p50} | {p99} | {:.1} | {:.1}% | {:.0} | {} | {:.0} |",
                row[0],
                row[0] / limit,
                fmt_num(of_measured.unwrap_or(f64::NAN), 3),
                row[3],
                row[4] * 100.0,
                row[7],
                fmt_num(row[5], 1),
                row[6],
            );
        }
        Scenario::Open { replicas, load } => {
            let overloaded = row[10] > 0.0;
            println!(
                "| {name} | {:.0}% | {replicas} | {:.0} | {:.0} | {} | {} | {:.1} | {:.1}% | {:.0} | {} | {:.0} | {:.0} | {:.0} |",
                load * 100.0,
                row[0],
                row[1],
                fmt_ms(row[2], overloaded && row[2] > 1000.0),
                fmt_ms(row[3], overloaded),
                row[4],
                row[5] * 100.0,
                row[9],
                fmt_num(row[6], 1),
                row[7],
                row[8],
                row[10],
            );
        }
        Scenario::Overhead => {
            println!(
                "| {name} | {:.0} | {:.0} | {:.2} | {:.3} | {:.3} | {:.1} | {:.0} |",
                row[0],
                1e9 / row[0],
                row[5],
                row[1],
                row[2],
                row[3],
                row[6],
            );
        }
        Scenario::Sweep { load } => {
            let overloaded = row[10] > 0.0;
            println!(
                "| {name} | {:.0}% | {:.0} | {:.0} | {} | {} | {:.1} | {:.0} |",
                load * 100.0,
                row[0],
                row[1],
                fmt_ms(row[2], overloaded && row[2] > 1000.0),
                fmt_ms(row[3], overloaded),
                row[4],
                row[10],
            );
        }
    }
}
