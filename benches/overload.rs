//! Overload under `Admission::Shed`: Poisson arrivals at 3× the physical limit
//! of a virtual accelerator (a batch of n costs F + c·n on the replica's
//! thread; F = 2 ms, c = 20 µs, B = 64) for 5 s.
//!
//! It reports, against the targets of the admission-control issue:
//!
//! * the p99 latency of accepted requests, which should stay within the
//!   configured maximum queue time plus one batch time;
//! * the p99 time to a rejection, which should be under 1 ms;
//! * the peak resident memory of the process (`VmHWM`), which should stay
//!   bounded however long the overload lasts.
//!
//! Run it with `cargo bench --bench overload`. `CANDLEWICK_BENCH_SECS` sets
//! the length of the overload (default 5), `CANDLEWICK_BENCH_LOAD` the offered
//! load as a multiple of the limit (default 3).

// A bench binary reports its results on stdout.
#![allow(clippy::print_stdout)]

#[path = "common/mod.rs"]
mod common;

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use candlewick::batch::{Admission, BatchConfig};
use candlewick::error::Overloaded;
use candlewick::pool::PoolConfig;
use candlewick::{BoxError, Serving, ServingConfig};
use common::{SplitMix64, env_or};

const FIXED: Duration = Duration::from_millis(2);
const PER_ITEM: Duration = Duration::from_micros(20);
const MAX_BATCH: usize = 64;
const MAX_QUEUE_TIME: Duration = Duration::from_millis(50);

fn batch_time(n: usize) -> Duration {
    FIXED + PER_ITEM * n as u32
}

/// The model: waits out the virtual batch time, sleeping most of it and
/// yielding the last 100 µs (thread sleeps overshoot).
fn virtual_accelerator(
    _: &Device,
) -> Result<impl Fn(&[u64]) -> Result<Vec<u64>, BoxError> + use<>, BoxError> {
    Ok(|batch: &[u64]| -> Result<Vec<u64>, BoxError> {
        let deadline = Instant::now() + batch_time(batch.len());
        let spin = Duration::from_micros(100);
        if let Some(sleep) = deadline.checked_duration_since(Instant::now() + spin) {
            std::thread::sleep(sleep);
        }
        while Instant::now() < deadline {
            std::thread::yield_now();
        }
        Ok(batch.to_vec())
    })
}

/// Peak resident set size of this process, in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Latencies in fixed 1 µs buckets up to 1 s (and one overflow bucket), so
/// that the bench's own memory does not grow with the length of the run and
/// peak RSS measures the service.
struct Histogram {
    counts: Vec<u32>,
    total: u64,
}

impl Histogram {
    const BUCKETS: usize = 1_000_000;

    fn new() -> Self {
        Self {
            counts: vec![0; Self::BUCKETS + 1],
            total: 0,
        }
    }

    fn record(&mut self, latency: Duration) {
        let micros = (latency.as_micros() as usize).min(Self::BUCKETS);
        self.counts[micros] += 1;
        self.total += 1;
    }

    fn percentile(&self, p: f64) -> Duration {
        let rank = ((self.total.saturating_sub(1)) as f64 * p).round() as u64;
        let mut seen = 0u64;
        for (micros, &count) in self.counts.iter().enumerate() {
            seen += u64::from(count);
            if seen > rank {
                return Duration::from_micros(micros as u64);
            }
        }
        Duration::ZERO
    }
}

struct Results {
    /// From the scheduled arrival (open-loop latency, generator lag included).
    accepted: Histogram,
    /// From the call (the service's own part).
    accepted_from_call: Histogram,
    rejected: Histogram,
    other_errors: usize,
}

fn main() {
    let secs = env_or("CANDLEWICK_BENCH_SECS", 5.0);
    let load = env_or("CANDLEWICK_BENCH_LOAD", 3.0);
    let limit = MAX_BATCH as f64 / batch_time(MAX_BATCH).as_secs_f64();
    let rate = load * limit;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let results = runtime.block_on(async {
        let batch = BatchConfig::default()
            .with_max_batch_size(NonZeroUsize::new(MAX_BATCH).unwrap())
            .with_max_wait(Duration::from_micros(500))
            .with_queue_capacity(NonZeroUsize::new(4096).unwrap())
            .with_admission(Admission::Shed)
            .with_max_queue_time(Some(MAX_QUEUE_TIME));
        let serving = Serving::start(
            virtual_accelerator,
            ServingConfig::new(PoolConfig::default(), batch),
        )
        .expect("serving");
        while !serving.health().ready().ok {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Warm up the service-rate estimate at the limit.
        for _ in 0..50 {
            let all: Vec<_> = (0..MAX_BATCH as u64).map(|i| serving.infer(i)).collect();
            for answer in futures_util::future::join_all(all).await {
                answer.expect("warm-up");
            }
        }

        let results = Arc::new(Mutex::new(Results {
            accepted: Histogram::new(),
            accepted_from_call: Histogram::new(),
            rejected: Histogram::new(),
            other_errors: 0,
        }));
        let mut rng = SplitMix64(7);
        let start = tokio::time::Instant::now();
        let end = start + Duration::from_secs_f64(secs);
        let mut next = start;
        let mut tasks = tokio::task::JoinSet::new();
        let mut id = 0u64;
        while next < end {
            tokio::time::sleep_until(next).await;
            // Every request due by now goes out, each on its own task.
            let now = tokio::time::Instant::now();
            while next <= now && next < end {
                let (serving, results, scheduled) = (serving.clone(), results.clone(), next);
                tasks.spawn(async move {
                    let called = tokio::time::Instant::now();
                    let answer = serving.infer(id).await;
                    let mut results = results.lock().unwrap();
                    match answer {
                        // Open loop: from the scheduled arrival.
                        Ok(_) => {
                            results.accepted.record(scheduled.elapsed());
                            results.accepted_from_call.record(called.elapsed());
                        }
                        // The time the caller waits for its rejection.
                        Err(err) if err.is::<Overloaded>() => {
                            results.rejected.record(called.elapsed())
                        }
                        Err(_) => results.other_errors += 1,
                    }
                });
                id += 1;
                next += rng.exponential(rate);
            }
            // Reap finished tasks so the generator's own memory stays flat.
            while let Some(done) = tasks.try_join_next() {
                done.expect("request task");
            }
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("request task");
        }
        Arc::try_unwrap(results).ok().unwrap().into_inner().unwrap()
    });

    let Results {
        accepted,
        accepted_from_call,
        rejected,
        other_errors,
    } = results;
    let offered = accepted.total + rejected.total + other_errors as u64;
    let bound = MAX_QUEUE_TIME + batch_time(MAX_BATCH);
    let accepted_p99 = accepted_from_call.percentile(0.99);
    let rejected_p99 = rejected.percentile(0.99);
    println!("# Overload: {load}× the limit for {secs} s under Admission::Shed");
    println!();
    println!(
        "virtual accelerator F = {FIXED:?}, c = {PER_ITEM:?}, B = {MAX_BATCH}; limit {limit:.0} req/s; offered {rate:.0} req/s; max_queue_time {MAX_QUEUE_TIME:?}; 1 replica; {} cores",
        std::thread::available_parallelism().map_or(0, NonZeroUsize::get)
    );
    println!();
    println!("| measure | value | target | met |");
    println!("|---------|------:|--------|-----|");
    println!(
        "| requests offered / accepted / rejected / other errors | {offered} / {} / {} / {other_errors} | | |",
        accepted.total, rejected.total
    );
    println!(
        "| accepted throughput | {:.0} req/s ({:.3} of the limit) | | |",
        accepted.total as f64 / secs,
        accepted.total as f64 / secs / limit
    );
    println!(
        "| accepted p50 / p99, from the call | {:.2} / {:.2} ms | p99 ≤ {:.2} ms (max queue time + one batch) | {} |",
        accepted_from_call.percentile(0.5).as_secs_f64() * 1e3,
        accepted_p99.as_secs_f64() * 1e3,
        bound.as_secs_f64() * 1e3,
        if accepted_p99 <= bound { "yes" } else { "no" }
    );
    println!(
        "| accepted p50 / p99, from the scheduled arrival | {:.2} / {:.2} ms | (includes the generator's own lag) | |",
        accepted.percentile(0.5).as_secs_f64() * 1e3,
        accepted.percentile(0.99).as_secs_f64() * 1e3,
    );
    println!(
        "| rejection p50 / p99 | {:.3} / {:.3} ms | p99 < 1 ms | {} |",
        rejected.percentile(0.5).as_secs_f64() * 1e3,
        rejected_p99.as_secs_f64() * 1e3,
        if rejected_p99 < Duration::from_millis(1) {
            "yes"
        } else {
            "no"
        }
    );
    match peak_rss_mib() {
        Some(mib) => println!(
            "| peak RSS (VmHWM) | {mib:.1} MiB | bounded | see runs of different lengths |"
        ),
        None => println!("| peak RSS | unavailable on this platform | | |"),
    }
}
