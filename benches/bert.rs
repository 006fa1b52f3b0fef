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
//! A last table puts the serving layer against its physical limit, in the
//! same run: the **raw ceiling** (the same model with no serving layer: each
//! replica's thread runs full batches of 16 back to back on its own rayon
//! pool, as a hand-written loop would) against the **example server over
//! HTTP** (`target/release/examples/serve`, driven by `wrk` with 64
//! connections and one thread; both must be present: `cargo build --release
//! --example serve`, `apt-get install wrk`). The bench aligns candle's thread
//! count with the replicas' pools first
//! ([`align_candle_threads`](candlewick::device::align_candle_threads)), as
//! the server does.
//!
//! A second last table measures what length grouping can win at best, with
//! no serving layer at all: one thread runs `scripts/mixed.lua`'s traffic
//! (sentences of log-uniform 8–256 words) and uniform 72-word sentences
//! (about the same mean) through the model's `forward` in batches of 16
//! (what a server with 32 clients and two replicas forms), in arrival order
//! and after sorting every sentence by length (perfect grouping), in whole
//! passes over the same 128 sentences each. Mixed over uniform sentences/s is the ratio the example
//! server's mixed-traffic figure is judged against.
//!
//! Run it with `cargo bench --bench bert`. Positional arguments filter the
//! runs by substring of `model/inputs/mode/callers` (the last table:
//! `model/ceiling`). Environment variables:
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
        .encode(SENTENCE, Some(bert::Direction::Right))
        .expect("the sentence encodes");
    let mixed = MIXED_WORDS
        .iter()
        .map(|&words| {
            let text: Vec<&str> = (0..words).map(|i| WORDS[i % WORDS.len()]).collect();
            let mut ids = encoder
                .encode(&text.join(" "), Some(bert::Direction::Right))
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
    let threads: usize = env_or("CANDLEWICK_BENCH_THREADS", 1);
    if let Some(threads) = NonZeroUsize::new(threads)
        && let Err(err) = candlewick::device::align_candle_threads(threads)
    {
        eprintln!("cannot align candle's thread count: {err}");
    }
    let setup = Setup {
        secs: Duration::from_secs_f64(env_or("CANDLEWICK_BENCH_SECS", 4.0)),
        warmup: Duration::from_secs_f64(env_or("CANDLEWICK_BENCH_WARMUP_SECS", 1.0)),
        replicas: env_or("CANDLEWICK_BENCH_REPLICAS", 2),
        threads,
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

    println!(
        "- candle computes at {} thread(s) per kernel (RAYON_NUM_THREADS)",
        candlewick::device::candle_cpu_threads()
    );

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

    println!();
    println!("## The physical limit and the example server over HTTP (14-token sentence)");
    println!();
    println!(
        "| model | raw ceiling, sentences/s | server `/embed`, req/s | ratio | p99 ms | server `/v1/embeddings` base64, req/s | vs `/embed` | p99 ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (model, loader) in &models {
        if !selected(&format!("{model}/ceiling")) {
            continue;
        }
        let sentence = &inputs(loader)[0].sequences[0];
        let raw = raw_ceiling(&setup, loader, sentence, 16);
        let http = match server_over_http(&setup, model, &loader_dir(model)) {
            Ok(measured) => measured,
            Err(why) => {
                println!("| {model} | {raw:.1} | skipped: {why} | | | | | |");
                continue;
            }
        };
        let (embed, openai) = (http.embed, http.openai);
        println!(
            "| {model} | {raw:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {:.3} | {:.1} |",
            embed.0,
            embed.0 / raw,
            embed.1,
            openai.0,
            openai.0 / embed.0,
            openai.1
        );
    }

    println!();
    println!(
        "## What length grouping can win: `scripts/mixed.lua`'s traffic through `forward`, batches of 16, one thread, no serving layer"
    );
    println!();
    println!(
        "| model | uniform 72 words, sentences/s | mixed, arrival order | ratio | mixed, sorted by length | ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (model, loader) in &models {
        if !selected(&format!("{model}/grouping")) {
            continue;
        }
        let uniform = lua_sentences(loader, Some(72), 128);
        let mixed = lua_sentences(loader, None, 128);
        let mut sorted = mixed.clone();
        sorted.sort_by_key(Vec::len);
        let base = forward_rate(&setup, loader, &uniform, 16);
        let arrival = forward_rate(&setup, loader, &mixed, 16);
        let grouped = forward_rate(&setup, loader, &sorted, 16);
        println!(
            "| {model} | {base:.1} | {arrival:.1} | {:.2} | {grouped:.1} | {:.2} |",
            arrival / base,
            grouped / base
        );
    }
}

/// Words of `scripts/mixed.lua`.
const MIXED_LUA_WORDS: &[&str] = &[
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "near", "river", "bank",
    "under", "a", "pale", "sky", "while", "birds", "sing",
];

/// The model, loaded on the CPU from the calling thread.
fn load_cpu(loader: &BertLoader) -> <BertLoader as Loader<Vec<u32>>>::Model {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
        .block_on(loader.load(&Device::Cpu))
        .expect("the model loads")
}

/// Sentences per second of one thread running all of `sentences` through
/// the model in batches of `batch`, in the given order: whole passes, for
/// at least `setup.secs`, after one unmeasured batch.
fn forward_rate(setup: &Setup, loader: &BertLoader, sentences: &[Vec<u32>], batch: usize) -> f64 {
    let model = load_cpu(loader);
    model.forward(&sentences[..batch]).expect("a forward pass");
    let started = Instant::now();
    let mut done = 0usize;
    while done == 0 || started.elapsed() < setup.secs {
        for chunk in sentences.chunks(batch) {
            model.forward(chunk).expect("a forward pass");
        }
        done += sentences.len();
    }
    done as f64 / started.elapsed().as_secs_f64()
}

/// `scripts/mixed.lua`'s sentences (or `uniform` words each), encoded as
/// the server encodes them (truncated to the model's limit).
fn lua_sentences(loader: &BertLoader, uniform: Option<usize>, n: usize) -> Vec<Vec<u32>> {
    let encoder = loader.encoder();
    let mut rng = common::SplitMix64(2026);
    (0..n)
        .map(|_| {
            let words = uniform.unwrap_or_else(|| {
                let (lo, hi) = (8f64.ln(), 256f64.ln());
                (lo + rng.next_f64() * (hi - lo)).exp().floor() as usize
            });
            let text: Vec<&str> = (0..words)
                .map(|_| {
                    let pick = (rng.next_f64() * MIXED_LUA_WORDS.len() as f64) as usize;
                    MIXED_LUA_WORDS[pick.min(MIXED_LUA_WORDS.len() - 1)]
                })
                .collect();
            encoder
                .encode(&text.join(" "), Some(bert::Direction::Right))
                .expect("the text encodes")
        })
        .collect()
}

/// The model directory to serve `model` from; `None` for the built-in one.
fn loader_dir(model: &str) -> Option<String> {
    (model != "builtin")
        .then(|| std::env::var("CANDLEWICK_MINILM_DIR").ok())
        .flatten()
}

/// Sentences per second of `setup.replicas` threads that each load the
/// model and run batches of `batch` copies of `input` back to back on a
/// rayon pool of their own: no queue, no batching layer, no HTTP.
fn raw_ceiling(setup: &Setup, loader: &BertLoader, input: &[u32], batch: usize) -> f64 {
    let measure_from = std::sync::Mutex::new(None::<Instant>);
    let barrier = std::sync::Barrier::new(setup.replicas);
    let counts: Vec<u64> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..setup.replicas)
            .map(|_| {
                let (barrier, measure_from) = (&barrier, &measure_from);
                scope.spawn(move || {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(setup.threads)
                        .build()
                        .expect("a rayon pool");
                    pool.install(|| {
                        let model = load_cpu(loader);
                        let inputs = vec![input.to_vec(); batch];
                        // Every replica starts measuring at the same instant.
                        if barrier.wait().is_leader() {
                            *measure_from.lock().unwrap() = Some(Instant::now() + setup.warmup);
                        }
                        barrier.wait();
                        let from = measure_from.lock().unwrap().expect("set by the leader");
                        let end = from + setup.secs;
                        let mut done = 0u64;
                        loop {
                            model.forward(&inputs).expect("a forward pass");
                            let now = Instant::now();
                            if now > end {
                                break done;
                            }
                            if now >= from {
                                done += batch as u64;
                            }
                        }
                    })
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a worker"))
            .collect()
    });
    counts.iter().sum::<u64>() as f64 / setup.secs.as_secs_f64()
}

/// Requests per second and p99 (ms) of one endpoint.
type Measured = (f64, f64);

/// The example server's `/embed` and `/v1/embeddings` (base64).
struct Http {
    embed: Measured,
    openai: Measured,
}

/// The example server, serving `model` with `setup`'s replicas, under `wrk`
/// with 64 connections.
fn server_over_http(setup: &Setup, model: &str, dir: &Option<String>) -> Result<Http, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let server = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("examples/serve"))
        .filter(|path| path.exists())
        .ok_or("build it first: cargo build --release --example serve")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let mut command = std::process::Command::new(server);
    command
        .args(["--port", &port.to_string(), "--admin-port", "0"])
        .args(["--replicas", &setup.replicas.to_string()])
        .args(["--cpu-threads", &setup.threads.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null());
    if let Some(dir) = dir {
        command.args(["--model-dir", dir]);
    }
    let mut child = command.spawn().map_err(|e| e.to_string())?;
    let result = (|| {
        let ready = Instant::now();
        while !http_ok(port, "/readyz") {
            if ready.elapsed() > Duration::from_secs(120) {
                return Err(format!("{model}: the server never became ready"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // `/embed` and `/v1/embeddings` (base64, the OpenAI SDKs' default),
        // alternated twice on the same server; each figure is the mean of
        // its two runs.
        let wrk = |script: &str, path: &str, secs: f64| -> Result<(f64, f64), String> {
            let script = format!("{}/scripts/{script}", env!("CARGO_MANIFEST_DIR"));
            let url = format!("http://127.0.0.1:{port}{path}");
            let out = std::process::Command::new("wrk")
                .args(["-t1", "-c64", &format!("-d{}s", secs.ceil().max(1.0))])
                .args(["--latency", "-s", &script, &url])
                .output()
                .map_err(|e| format!("wrk: {e} (apt-get install wrk)"))?;
            let text = String::from_utf8_lossy(&out.stdout);
            let field = |prefix: &str| {
                text.lines()
                    .find_map(|line| line.trim().strip_prefix(prefix).map(str::trim))
                    .map(str::to_owned)
            };
            if let Some(errors) = field("Non-2xx or 3xx responses:") {
                return Err(format!("{errors} error responses on {path}"));
            }
            let rate: f64 = field("Requests/sec:")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("no rate in wrk's output: {text}"))?;
            Ok((rate, field("99%").map_or(f64::NAN, |v| wrk_ms(&v))))
        };
        let secs = setup.secs.as_secs_f64();
        wrk("embed.lua", "/embed", setup.warmup.as_secs_f64())?;
        let mut runs = [(0.0, 0.0); 4];
        for (i, run) in runs.iter_mut().enumerate() {
            *run = if i % 2 == 0 {
                wrk("embed.lua", "/embed", secs)?
            } else {
                wrk("embed_openai.lua", "/v1/embeddings", secs)?
            };
        }
        let mean = |a: (f64, f64), b: (f64, f64)| ((a.0 + b.0) / 2.0, (a.1 + b.1) / 2.0);
        Ok(Http {
            embed: mean(runs[0], runs[2]),
            openai: mean(runs[1], runs[3]),
        })
    })();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    result
}

/// Whether `GET path` on the loopback port answers 200.
fn http_ok(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut response = String::new();
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_to_string(&mut response).is_ok()
        && response.starts_with("HTTP/1.1 200")
}

/// A wrk latency (`812.50us`, `12.3ms`, `1.02s`) in milliseconds.
fn wrk_ms(value: &str) -> f64 {
    let split = value
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => number / 1e3,
        "ms" => number,
        "s" => number * 1e3,
        "m" => number * 60e3,
        _ => f64::NAN,
    }
}
