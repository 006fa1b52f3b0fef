//! End-to-end throughput and latency of [`candlewick::Serving`] against a
//! "virtual accelerator": a model whose batch of `n` inputs costs
//! `F + c·n` of wall time on the replica's thread (`std::thread::sleep`) while
//! the CPU is otherwise idle, like a GPU kernel launch would.
//!
//! The physical limit of one replica is `B / (F + c·B)` requests per second
//! (full batches back to back); the closed-loop scenarios report throughput as
//! a ratio to `replicas × B / (F + c·B)`.
//!
//! Scenarios:
//!
//! * closed loop, 256 callers that each await their answer before sending the
//!   next request, with 1 and 4 replicas;
//! * open loop, Poisson arrivals at 50% and 90% of the limit, with 1 and 4
//!   replicas; every request runs on its own task and its latency is measured
//!   from its *scheduled* arrival, so a lagging generator cannot hide queueing;
//! * per-request overhead: a zero-cost model, 256 closed-loop callers, 1 replica.
//!
//! `std::thread::sleep` overshoots by tens of microseconds (timer slack), which
//! would make the model itself slower than `F + c·n`; so by default the model
//! sleeps until 100 µs before its deadline and yields in a loop for the rest.
//!
//! Run it with `cargo bench --bench virtual_accelerator`. Positional arguments
//! (other than the `--bench` flag cargo passes) filter the scenarios by
//! substring of their names. Environment variables:
//!
//! | variable | meaning | default |
//! |----------|---------|---------|
//! | `CANDLEWICK_BENCH_SECS` | measured seconds per scenario | 5 |
//! | `CANDLEWICK_BENCH_WARMUP_SECS` | unmeasured warm-up seconds per scenario | 0.5 |
//! | `CANDLEWICK_BENCH_REPS` | repetitions of each scenario (medians are printed) | 1 |
//! | `CANDLEWICK_BENCH_FIXED_US` | `F`, fixed cost of a batch, µs | 2000 |
//! | `CANDLEWICK_BENCH_PER_ITEM_US` | `c`, cost per input, µs | 20 |
//! | `CANDLEWICK_BENCH_MAX_BATCH` | `B`, the batch size limit | 64 |
//! | `CANDLEWICK_BENCH_SPIN_US` | the model sleeps until this long before its deadline, then yields in a loop (0: plain sleep) | 100 |
//! | `CANDLEWICK_BENCH_MAX_WAIT_US` | the batcher's `max_wait`, µs | 500 |
//! | `CANDLEWICK_BENCH_QUEUE` | the batcher's queue capacity | 16384 |
//! | `CANDLEWICK_BENCH_CALLERS` | closed-loop callers | 256 |

// A bench binary reports its results on stdout.
#![allow(clippy::print_stdout)]

use std::cell::Cell;
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, DeviceLocation};
use candlewick::batch::BatchConfig;
use candlewick::error::Overloaded;
use candlewick::pool::{PoolConfig, ReplicaState};
use candlewick::{BoxError, Serving, ServingConfig};

/// Everything a run is parameterised by.
#[derive(Debug, Clone)]
struct Params {
    fixed: Duration,
    per_item: Duration,
    spin: Duration,
    max_batch: usize,
    max_wait: Duration,
    queue: usize,
    callers: usize,
    secs: Duration,
    warmup: Duration,
    reps: usize,
}

fn env_or<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} does not parse")),
        Err(_) => default,
    }
}

impl Params {
    fn from_env() -> Self {
        let micros = |name, default| Duration::from_secs_f64(env_or::<f64>(name, default) / 1e6);
        let params = Self {
            fixed: micros("CANDLEWICK_BENCH_FIXED_US", 2000.0),
            per_item: micros("CANDLEWICK_BENCH_PER_ITEM_US", 20.0),
            spin: micros("CANDLEWICK_BENCH_SPIN_US", 100.0),
            max_batch: env_or("CANDLEWICK_BENCH_MAX_BATCH", 64),
            max_wait: micros("CANDLEWICK_BENCH_MAX_WAIT_US", 500.0),
            queue: env_or("CANDLEWICK_BENCH_QUEUE", 16384),
            callers: env_or("CANDLEWICK_BENCH_CALLERS", 256),
            secs: Duration::from_secs_f64(env_or("CANDLEWICK_BENCH_SECS", 5.0)),
            warmup: Duration::from_secs_f64(env_or("CANDLEWICK_BENCH_WARMUP_SECS", 0.5)),
            reps: env_or("CANDLEWICK_BENCH_REPS", 1usize).max(1),
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
        self.cpu
            .map_or(f64::NAN, |cpu| cpu.as_secs_f64() * 1e6 / requests.max(1.0))
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

type Handle = Serving<u64, u64>;

/// Starts a serving of `replicas` CPU replicas and waits until all are idle.
async fn start(params: &Params, replicas: usize, cost: Cost) -> (Handle, Arc<Counters>) {
    let counters = Arc::new(Counters::default());
    let shared = counters.clone();
    let (fixed, per_item, spin) = (params.fixed, params.per_item, params.spin);
    let loader = move |_: &Device| -> Result<_, BoxError> {
        let counters = shared.clone();
        // One model per replica, so this is the replica's own clock.
        let last_end = Cell::new(None::<Instant>);
        Ok(move |batch: &[u64]| -> Result<Vec<u64>, BoxError> {
            let started = Instant::now();
            if let Some(last_end) = last_end.get() {
                counters.gap_ns.fetch_add(
                    started.duration_since(last_end).as_nanos() as u64,
                    Ordering::Relaxed,
                );
                counters.gaps.fetch_add(1, Ordering::Relaxed);
            }
            if cost == Cost::Virtual {
                let deadline = started + fixed + per_item.mul_f64(batch.len() as f64);
                virtual_work(deadline, spin);
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
            Ok(batch.to_vec())
        })
    };
    let pool = PoolConfig::default()
        .with_devices(vec![DeviceLocation::Cpu])
        .with_replicas_per_device(NonZeroUsize::new(replicas).expect("replicas > 0"));
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
    (serving, counters)
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
        .map(|column| {
            let mut values: Vec<f64> = reps.iter().map(|rep| rep[column]).collect();
            values.sort_by(f64::total_cmp);
            let mid = values.len() / 2;
            if values.len() % 2 == 1 {
                values[mid]
            } else {
                (values[mid - 1] + values[mid]) / 2.0
            }
        })
        .collect()
}

/// Closed loop: `callers` tasks, each sending its next request once it has
/// its answer. Returns throughput, p50 ms, p99 ms, mean batch, busy, CPU
/// µs/request, errors.
async fn closed_loop(params: &Params, replicas: usize, cost: Cost) -> Vec<f64> {
    let (serving, counters) = start(params, replicas, cost).await;
    let begin = Instant::now();
    let measure_from = begin + params.warmup;
    let end = measure_from + params.secs;
    let errors = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..params.callers)
        .map(|caller| {
            let serving = serving.clone();
            let errors = errors.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(1 << 14);
                let mut id = caller as u64;
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let result = serving.infer(id).await;
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

/// SplitMix64: a small, seeded PRNG, plenty for inter-arrival times.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform sample from [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// An exponentially distributed sample with mean `1 / rate`.
    fn exponential(&mut self, rate: f64) -> Duration {
        Duration::from_secs_f64(-(1.0 - self.next_f64()).ln() / rate)
    }
}

#[derive(Debug, Default)]
struct OpenResults {
    latencies: Vec<u64>,
    rejected: u64,
    errors: u64,
}

/// Open loop: Poisson arrivals at `rate` per second, each on its own task,
/// generated by an OS thread so arrivals never wait for answers or for the
/// runtime's timer (1 ms granularity). Returns offered req/s, served req/s,
/// p50 ms, p99 ms, mean batch, busy, CPU µs/request, rejected, errors.
async fn open_loop(params: &Params, replicas: usize, rate: f64, seed: u64) -> Vec<f64> {
    let (serving, counters) = start(params, replicas, Cost::Virtual).await;
    let serving = Arc::new(serving);
    let results = Arc::new(Mutex::new(OpenResults::default()));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let begin = Instant::now();
    let measure_from = begin + params.warmup;
    let end = measure_from + params.secs;

    let runtime = tokio::runtime::Handle::current();
    let generator = {
        let (serving, results, in_flight) = (serving.clone(), results.clone(), in_flight.clone());
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
                    let (serving, results, in_flight) =
                        (serving.clone(), results.clone(), in_flight.clone());
                    in_flight.fetch_add(1, Ordering::Relaxed);
                    runtime.spawn(async move {
                        let result = serving.infer(offered).await;
                        let done = Instant::now();
                        if scheduled >= measure_from {
                            let mut results = results.lock().expect("results lock");
                            match result {
                                Ok(_) => results
                                    .latencies
                                    .push(done.duration_since(scheduled).as_nanos() as u64),
                                Err(err) if err.is::<Overloaded>() => results.rejected += 1,
                                Err(_) => results.errors += 1,
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
    // Let every request that arrived in the window finish, however late.
    let drain_deadline = Instant::now() + Duration::from_secs(60);
    while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut results = std::mem::take(&mut *results.lock().expect("results lock"));
    results.latencies.sort_unstable();
    let secs = params.secs.as_secs_f64();
    let window = Window::between(first, last, replicas);
    let served = results.latencies.len() as f64;
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
    ]
}

#[derive(Debug, Clone, Copy)]
enum Scenario {
    Closed { replicas: usize },
    Open { replicas: usize, load: f64 },
    Overhead,
}

impl Scenario {
    fn name(&self) -> String {
        match self {
            Self::Closed { replicas } => format!("closed-{replicas}r"),
            Self::Open { replicas, load } => format!("open-{}pct-{replicas}r", load * 100.0),
            Self::Overhead => "overhead-1r".to_owned(),
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

fn main() {
    let params = Params::from_env();
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    let limit1 = params.limit_per_replica();
    let cores = std::thread::available_parallelism().map_or(0, NonZeroUsize::get);

    println!("# candlewick virtual accelerator bench");
    println!();
    println!(
        "model: a batch of n sleeps F + c·n on the replica thread; F = {} µs, c = {} µs, B = {}",
        params.fixed.as_secs_f64() * 1e6,
        params.per_item.as_secs_f64() * 1e6,
        params.max_batch,
    );
    println!(
        "limit: B / (F + c·B) = {limit1:.0} req/s per replica (full batch = {:.3} ms)",
        params.batch_time(params.max_batch).as_secs_f64() * 1e3,
    );
    println!(
        "model sleeps until {} µs before each deadline, then yields in a loop (CANDLEWICK_BENCH_SPIN_US)",
        params.spin.as_secs_f64() * 1e6,
    );
    println!(
        "batching: max_batch_size = B, max_wait = {} µs, queue capacity = {}, admission = shed",
        params.max_wait.as_secs_f64() * 1e6,
        params.queue,
    );
    println!(
        "run: {} s measured after {} s warm-up per scenario, {} repetition(s){}; tokio multi-thread runtime, 2 workers",
        params.secs.as_secs_f64(),
        params.warmup.as_secs_f64(),
        params.reps,
        if params.reps > 1 {
            " (every cell is the median over them)"
        } else {
            ""
        },
    );
    println!("machine: {cores} cores available, {}", cpu_model());
    let overshoot = sleep_overshoot(params.fixed);
    println!(
        "for reference, a plain thread::sleep({} µs) overshoots by {:.0} µs on average here",
        params.fixed.as_secs_f64() * 1e6,
        overshoot.as_secs_f64() * 1e6,
    );
    println!(
        "columns: busy = share of wall time the replicas spent inside forward; gap = mean idle time of a replica between two batches; cpu = process CPU time (all threads, 10 ms resolution) per served request"
    );

    let scenarios = [
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
    let selected: Vec<Scenario> = scenarios
        .into_iter()
        .filter(|s| filters.is_empty() || filters.iter().any(|f| s.name().contains(f.as_str())))
        .collect();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");

    let mut header = None;
    for (index, scenario) in selected.iter().enumerate() {
        let reps: Vec<Vec<f64>> = (0..params.reps)
            .map(|rep| {
                let seed = 0x5EED_0000 + (index * 1000 + rep) as u64;
                let row = runtime.block_on(async {
                    match *scenario {
                        Scenario::Closed { replicas } => {
                            closed_loop(&params, replicas, Cost::Virtual).await
                        }
                        Scenario::Open { replicas, load } => {
                            open_loop(&params, replicas, load * limit1 * replicas as f64, seed)
                                .await
                        }
                        Scenario::Overhead => closed_loop(&params, 1, Cost::Zero).await,
                    }
                });
                eprintln!(
                    "{} rep {}/{}: {:?}",
                    scenario.name(),
                    rep + 1,
                    params.reps,
                    row.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>()
                );
                row
            })
            .collect();
        let row = medians(&reps);
        let kind = std::mem::discriminant(scenario);
        if header != Some(kind) {
            header = Some(kind);
            println!();
            print_header(scenario, &params);
        }
        print_row(scenario, &row, limit1);
    }
}

fn print_header(scenario: &Scenario, params: &Params) {
    match scenario {
        Scenario::Closed { .. } => {
            println!("## Closed loop, {} callers", params.callers);
            println!();
            println!(
                "| replicas | req/s | ratio to limit | p50 ms | p99 ms | mean batch | busy | gap µs | cpu µs/req | errors |"
            );
            println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        }
        Scenario::Open { .. } => {
            println!("## Open loop, Poisson arrivals");
            println!();
            println!(
                "| load | replicas | offered req/s | served req/s | p50 ms | p99 ms | mean batch | busy | gap µs | cpu µs/req | rejected | errors |"
            );
            println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        }
        Scenario::Overhead => {
            println!(
                "## Per-request overhead: zero-cost model, {} closed-loop callers",
                params.callers
            );
            println!();
            println!(
                "| replicas | req/s | wall ns/req | cpu µs/req | p50 ms | p99 ms | mean batch | errors |"
            );
            println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
        }
    }
}

fn print_row(scenario: &Scenario, row: &[f64], limit1: f64) {
    match *scenario {
        Scenario::Closed { replicas } => {
            let limit = limit1 * replicas as f64;
            println!(
                "| {replicas} | {:.0} | {:.3} | {:.2} | {:.2} | {:.1} | {:.1}% | {:.0} | {:.1} | {:.0} |",
                row[0],
                row[0] / limit,
                row[1],
                row[2],
                row[3],
                row[4] * 100.0,
                row[7],
                row[5],
                row[6],
            );
        }
        Scenario::Open { replicas, load } => {
            println!(
                "| {:.0}% | {replicas} | {:.0} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1}% | {:.0} | {:.1} | {:.0} | {:.0} |",
                load * 100.0,
                row[0],
                row[1],
                row[2],
                row[3],
                row[4],
                row[5] * 100.0,
                row[9],
                row[6],
                row[7],
                row[8],
            );
        }
        Scenario::Overhead => {
            println!(
                "| 1 | {:.0} | {:.0} | {:.2} | {:.3} | {:.3} | {:.1} | {:.0} |",
                row[0],
                1e9 / row[0],
                row[5],
                row[1],
                row[2],
                row[3],
                row[6],
            );
        }
    }
}
