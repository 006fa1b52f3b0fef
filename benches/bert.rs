//! Real compute: the example server's BERT embedding model on the CPU, served
//! through [`candlewick::Serving`] with one forward per request
//! (`max_batch_size` = 1) against candlewick's dynamic batching
//! (`max_batch_size` = 64), at 1, 8 and 64 closed-loop callers.
//!
//! Models: the example's built-in BERT (128 dimensions, 2 layers, seeded
//! weights; always), and sentence-transformers all-MiniLM-L6-v2 when
//! `CANDLEWICK_MINILM_DIR` names its directory (skipped with a message
//! otherwise). Inputs: a 14-word-piece sentence, and a mixed-length set (8 to 128
//! tokens). Both modes run on the same pool: 2 replicas on the CPU, each with
//! a one-thread compute pool (`cpu_threads_per_replica` = 1), the best setting
//! measured for a 2-core machine.
//!
//! Run it with `cargo bench --bench bert`. Positional arguments filter the
//! runs by substring of `model/inputs/mode/callers`. Environment variables:
//!
//! | variable | meaning | default |
//! |----------|---------|---------|
//! | `CANDLEWICK_MINILM_DIR` | all-MiniLM-L6-v2 directory | unset: built-in model only |
//! | `CANDLEWICK_BENCH_SECS` | measured seconds per run | 4 |
//! | `CANDLEWICK_BENCH_WARMUP_SECS` | unmeasured warm-up seconds per run | 1 |
//! | `CANDLEWICK_BENCH_REPLICAS` | replicas | 2 |
//! | `CANDLEWICK_BENCH_THREADS` | CPU threads per replica | 1 |
//! | `CANDLEWICK_BENCH_MAX_WAIT_US` | the batching mode's `max_wait`, µs (0: dispatch whatever is queued as soon as a replica is free) | 0 |

// A bench binary reports its results on stdout.
#![allow(clippy::print_stdout)]

// The example's module, shared with the server; not all of it is used here.
#[allow(dead_code, unused_imports)]
#[path = "../examples/serve/bert.rs"]
mod bert;
// Shared with the other benches; this one needs only part of it.
#[allow(dead_code)]
#[path = "common/mod.rs"]
mod common;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use candle_core::{Device, DeviceLocation};
use candlewick::batch::BatchConfig;
use candlewick::pool::{PoolConfig, ReplicaState};
use candlewick::{BoxError, Loader, Model, Serving, ServingConfig};

use bert::BertLoader;
use common::env_or;

/// Batches and inputs the replicas ran.
#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    inputs: AtomicU64,
}

/// A loader whose models count what they run.
#[derive(Debug, Clone)]
struct Counting {
    inner: BertLoader,
    counters: Arc<Counters>,
}

#[async_trait::async_trait]
impl Loader<Vec<u32>> for Counting {
    type Model = CountingModel;

    async fn load(&self, device: &Device) -> Result<CountingModel, BoxError> {
        Ok(CountingModel {
            inner: self.inner.load(device).await?,
            counters: self.counters.clone(),
        })
    }

    fn cost(&self, input: &Vec<u32>) -> usize {
        self.inner.cost(input)
    }

    fn validate(&self, input: &Vec<u32>) -> Result<(), BoxError> {
        self.inner.validate(input)
    }
}

#[derive(Debug)]
struct CountingModel {
    inner: <BertLoader as Loader<Vec<u32>>>::Model,
    counters: Arc<Counters>,
}

impl Model<Vec<u32>> for CountingModel {
    type Output = Vec<f32>;

    fn forward(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, BoxError> {
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        self.counters
            .inputs
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.inner.forward(batch)
    }

    fn warmup_inputs(&self) -> Vec<Vec<u32>> {
        self.inner.warmup_inputs()
    }
}

/// The base sentence: 14 word pieces with the MiniLM tokenizer, 16 tokens
/// with `[CLS]` and `[SEP]` (the count is printed for each model; the
/// built-in model's small vocabulary splits it into more pieces).
const SENTENCE: &str = "The quick brown fox jumps over the lazy dog near the river bank.";

/// Words to build the mixed-length inputs from.
const WORDS: &[&str] = &[
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "near", "river", "bank",
    "while", "a", "small", "bird", "sings", "in", "tall", "green", "trees", "under", "bright",
    "morning", "sky",
];

/// Token counts of the mixed-length set (before special tokens): spread from
/// 6 to 126, so every input is 8 to 128 tokens with `[CLS]` and `[SEP]`.
const MIXED_WORDS: [usize; 16] = [
    6, 90, 14, 30, 126, 10, 46, 22, 62, 8, 110, 18, 38, 12, 78, 26,
];

struct Inputs {
    name: &'static str,
    sequences: Vec<Vec<u32>>,
}

impl Inputs {
    fn mean_tokens(&self) -> f64 {
        self.sequences.iter().map(Vec::len).sum::<usize>() as f64 / self.sequences.len() as f64
    }
}

fn inputs(loader: &BertLoader) -> Vec<Inputs> {
    let encoder = loader.encoder();
    let sentence = encoder
        .encode(SENTENCE, true)
        .expect("the sentence encodes");
    let mixed = MIXED_WORDS
        .iter()
        .map(|&words| {
            let text: Vec<&str> = (0..words).map(|i| WORDS[i % WORDS.len()]).collect();
            let mut ids = encoder
                .encode(&text.join(" "), true)
                .expect("the text encodes");
            // The tokenizer may split a word; keep the set's lengths exact.
            let last = ids.pop().expect("[SEP]");
            ids.truncate(words + 1);
            ids.push(last);
            ids
        })
        .collect();
    vec![
        Inputs {
            name: "14-token sentence",
            sequences: vec![sentence],
        },
        Inputs {
            name: "mixed 8–128 tokens",
            sequences: mixed,
        },
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `max_batch_size` = 1: one forward per request.
    Single,
    /// `max_batch_size` = 64.
    Batched,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Single => "one forward per request (max_batch_size 1)",
            Self::Batched => "candlewick batching (max_batch_size 64)",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::Single => "single",
            Self::Batched => "batched",
        }
    }
}

struct Setup {
    secs: Duration,
    warmup: Duration,
    replicas: usize,
    threads: usize,
    max_wait: Duration,
}

/// One closed-loop run: returns embeddings/s, tokens/s, p50 ms, p99 ms, mean
/// batch.
async fn run(
    setup: &Setup,
    loader: &BertLoader,
    mode: Mode,
    inputs: &Inputs,
    callers: usize,
) -> [f64; 5] {
    let counters = Arc::new(Counters::default());
    let counting = Counting {
        inner: loader.clone(),
        counters: counters.clone(),
    };
    let max_batch = match mode {
        Mode::Single => 1,
        Mode::Batched => 64,
    };
    let pool = PoolConfig::default()
        .with_devices(vec![DeviceLocation::Cpu])
        .with_replicas_per_device(NonZeroUsize::new(setup.replicas).expect("replicas > 0"))
        .with_cpu_threads_per_replica(NonZeroUsize::new(setup.threads));
    let batch = BatchConfig::default()
        .with_max_batch_size(NonZeroUsize::new(max_batch).expect("positive"))
        .with_max_wait(setup.max_wait)
        .with_queue_capacity(NonZeroUsize::new(4096).expect("positive"));
    let serving: Serving<Vec<u32>, Vec<f32>> =
        Serving::start(counting, ServingConfig::new(pool, batch)).expect("the replicas start");
    let loading = Instant::now();
    while !serving
        .replicas()
        .iter()
        .all(|replica| replica.state == ReplicaState::Idle)
    {
        assert!(
            loading.elapsed() < Duration::from_secs(120),
            "the replicas did not load"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let begin = Instant::now();
    let measure_from = begin + setup.warmup;
    let end = measure_from + setup.secs;
    let sequences = Arc::new(inputs.sequences.clone());
    let tasks: Vec<_> = (0..callers)
        .map(|caller| {
            let (serving, sequences) = (serving.clone(), sequences.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut tokens = 0u64;
                let mut next = caller;
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let input = sequences[next % sequences.len()].clone();
                    next += 7;
                    let len = input.len() as u64;
                    let result = serving.infer(input).await;
                    let done = Instant::now();
                    result.expect("an embedding");
                    if sent >= measure_from && done <= end {
                        latencies.push(done.duration_since(sent).as_nanos() as u64);
                        tokens += len;
                    }
                }
                (latencies, tokens)
            })
        })
        .collect();
    tokio::time::sleep_until(measure_from.into()).await;
    let (batches0, inputs0) = (
        counters.batches.load(Ordering::Relaxed),
        counters.inputs.load(Ordering::Relaxed),
    );
    tokio::time::sleep_until(end.into()).await;
    let (batches1, inputs1) = (
        counters.batches.load(Ordering::Relaxed),
        counters.inputs.load(Ordering::Relaxed),
    );
    let mut latencies = Vec::new();
    let mut tokens = 0;
    for task in tasks {
        let (l, t) = task.await.expect("a caller panicked");
        latencies.extend(l);
        tokens += t;
    }
    latencies.sort_unstable();
    let secs = setup.secs.as_secs_f64();
    let percentile = |p: f64| {
        let rank = ((p / 100.0) * latencies.len() as f64).ceil() as usize;
        latencies[rank.clamp(1, latencies.len()) - 1] as f64 / 1e6
    };
    [
        latencies.len() as f64 / secs,
        tokens as f64 / secs,
        percentile(50.0),
        percentile(99.0),
        (inputs1 - inputs0) as f64 / (batches1 - batches0).max(1) as f64,
    ]
}

fn main() {
    let setup = Setup {
        secs: Duration::from_secs_f64(env_or("CANDLEWICK_BENCH_SECS", 4.0)),
        warmup: Duration::from_secs_f64(env_or("CANDLEWICK_BENCH_WARMUP_SECS", 1.0)),
        replicas: env_or("CANDLEWICK_BENCH_REPLICAS", 2),
        threads: env_or("CANDLEWICK_BENCH_THREADS", 1),
        max_wait: Duration::from_secs_f64(env_or("CANDLEWICK_BENCH_MAX_WAIT_US", 0.0) / 1e6),
    };
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    let selected =
        |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));

    let mut models = vec![("builtin", BertLoader::builtin(42))];
    match std::env::var("CANDLEWICK_MINILM_DIR") {
        Ok(dir) => models.push((
            "all-MiniLM-L6-v2",
            BertLoader::from_dir(&dir).unwrap_or_else(|error| panic!("{dir}: {error}")),
        )),
        Err(_) => eprintln!(
            "CANDLEWICK_MINILM_DIR is not set: skipping all-MiniLM-L6-v2 (built-in model only)"
        ),
    }

    let cores = std::thread::available_parallelism().map_or(0, NonZeroUsize::get);
    println!("# BERT on the CPU: one forward per request against candlewick's batching");
    println!();
    println!(
        "- pool: {} replicas on the CPU, cpu_threads_per_replica = {}; {} cores available",
        setup.replicas, setup.threads, cores
    );
    println!(
        "- batching: max_wait = {} µs (both modes), queue capacity 4096; closed-loop callers, {} s measured after {} s warm-up per row; tokio multi-thread runtime, 2 workers",
        setup.max_wait.as_secs_f64() * 1e6,
        setup.secs.as_secs_f64(),
        setup.warmup.as_secs_f64()
    );
    println!("- tokens/s counts real tokens ([CLS] and [SEP] included), not padding");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");

    for (model, loader) in &models {
        for inputs in inputs(loader) {
            println!();
            println!(
                "## {model}, {} ({} inputs, mean {:.1} tokens)",
                inputs.name,
                inputs.sequences.len(),
                inputs.mean_tokens()
            );
            println!();
            println!("| mode | callers | embeddings/s | tokens/s | p50 ms | p99 ms | mean batch |");
            println!("|---|---:|---:|---:|---:|---:|---:|");
            for mode in [Mode::Single, Mode::Batched] {
                for callers in [1, 8, 64] {
                    let label = format!(
                        "{model}/{}/{}/{callers}",
                        if inputs.sequences.len() == 1 {
                            "sentence"
                        } else {
                            "mixed"
                        },
                        mode.key()
                    );
                    if !selected(&label) {
                        continue;
                    }
                    let row = runtime.block_on(run(&setup, loader, mode, &inputs, callers));
                    eprintln!("{label}: {row:?}");
                    println!(
                        "| {} | {callers} | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} |",
                        mode.name(),
                        row[0],
                        row[1],
                        row[2],
                        row[3],
                        row[4]
                    );
                }
            }
        }
    }
}
