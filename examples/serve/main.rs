//! The example embedding server: an axum HTTP server embedding candlewick and
//! serving a BERT-family sentence-embedding model.
//!
//! ```sh
//! cargo run --release --example serve                      # the built-in model
//! cargo run --release --example serve -- --model-dir DIR   # any local BERT embedding model
//! ```
//!
//! `POST /embed` is compatible with text-embeddings-inference; the probes,
//! `/metrics` and `/info` come from candlewick. SIGTERM or SIGINT turns
//! readiness off, drains, and exits 0.

mod api;
mod bert;
mod edge;
mod openai;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use candle_core::DeviceLocation;
use candlewick::batch::{Admission, BatchConfig, CostMode};
use candlewick::metrics::PrometheusService;
use candlewick::pool::{ComputePriority, PoolConfig};
use candlewick::prepare::{PrepareConfig, Preparer};
use candlewick::{BoxError, ModelInfo, Serving, ServingConfig};
use clap::Parser;

use crate::api::AppState;
use crate::bert::BertLoader;

/// Serve sentence embeddings over HTTP.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1", env = "CANDLEWICK_BIND")]
    bind: std::net::IpAddr,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8080, env = "CANDLEWICK_PORT")]
    port: u16,
    /// A local Hugging Face BERT-family sentence-embedding model directory
    /// (config.json, model.safetensors, tokenizer.json, 1_Pooling/config.json).
    /// Without it, a small built-in model is generated.
    #[arg(long, env = "CANDLEWICK_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// The seed of the built-in model's weights.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The model version reported in /info and metric labels (generated
    /// Deployments set it per track through the environment).
    #[arg(long, env = candlewick::ModelInfo::VERSION_ENV, default_value = "1")]
    model_version: String,
    /// Devices to place replicas on: `cpu`, `cuda:N`, `metal:N`, comma-separated.
    #[arg(long, default_value = "cpu", value_parser = candlewick::device::parse_locations)]
    devices: std::vec::Vec<DeviceLocation>,
    /// Replicas per device. On a CPU, one single-threaded replica per core
    /// serves the most.
    #[arg(long)]
    replicas: Option<NonZeroUsize>,
    /// Threads each CPU replica's kernels may use (0: share one global pool).
    #[arg(long, default_value_t = 1)]
    cpu_threads: usize,
    /// The most inputs in one batch.
    #[arg(long, default_value_t = 32)]
    max_batch_size: usize,
    /// The most padded tokens in one batch.
    #[arg(long, default_value_t = 8192)]
    max_batch_tokens: usize,
    /// How many queued inputs beyond a batch's worth the batcher looks
    /// through for ones of a length near the oldest's (0: arrival order).
    #[arg(long, default_value_t = 256)]
    group_window: usize,
    /// The most a free replica waits for its batch to fill, in µs, when
    /// waiting pays: while other replicas are busy and requests arrive fast
    /// enough (0: never wait).
    #[arg(long, default_value_t = 2000)]
    max_wait_us: u64,
    /// The most inputs waiting in the queue.
    #[arg(long, default_value_t = 512)]
    queue_capacity: usize,
    /// Reject requests that would wait longer than this in the queue, in ms.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    max_queue_time_ms: u64,
    /// The deadline of each request, in ms.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    request_timeout_ms: u64,
    /// Threads that parse and tokenize requests, off the async runtime (0:
    /// one per core).
    #[arg(long, default_value_t = 0)]
    prepare_threads: usize,
    /// Requests waiting to be parsed and tokenized; more are refused (429).
    #[arg(long, default_value_t = 256, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    prepare_queue_capacity: usize,
    /// The most inputs in one client request (413 above).
    #[arg(long, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_client_batch: usize,
    /// How long to finish accepted work after SIGTERM, in seconds.
    #[arg(long, default_value_t = 30)]
    drain_timeout_s: u64,
    /// The admin port: probes and /metrics on a listener and thread of their
    /// own, answered whatever the data plane does (0 picks a free one).
    #[arg(long, default_value_t = 8081, env = "CANDLEWICK_ADMIN_PORT")]
    admin_port: u16,
    /// Serve probes and /metrics on the admin port only, not on --port too.
    #[arg(long)]
    admin_only: bool,
    /// How long a client may take to send a request's headers, in ms,
    /// counted from when the connection waits for a request (so it also
    /// closes idle keep-alive connections).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    header_timeout_ms: u64,
    /// How long a request body may stall between two pieces, in ms.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    body_timeout_ms: u64,
    /// How long writing a response may make no progress, in ms: a client
    /// that stops reading loses its connection instead of holding it.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    write_timeout_ms: u64,
    /// The most time one HTTP request may take, from its headers to its
    /// response, in ms (keep it above --request-timeout-ms).
    #[arg(long, default_value_t = 35_000, value_parser = clap::value_parser!(u64).range(1..))]
    http_timeout_ms: u64,
    /// The most connections served at once; more wait in the listen backlog.
    #[arg(long, default_value_t = 1024, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_connections: usize,
    /// The scheduling priority of the CPU replicas' compute threads:
    /// `background` keeps a saturated model from starving request parsing,
    /// probes and rejections.
    #[arg(long, value_enum, default_value = "background")]
    compute_priority: Priority,
    /// Log lines as text or as JSON objects (one per line, for log pipelines).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Priority {
    Normal,
    Background,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

impl Args {
    fn serving_config(&self, model: ModelInfo) -> Result<ServingConfig, BoxError> {
        let positive = |n: usize, what: &str| {
            NonZeroUsize::new(n).ok_or_else(|| format!("{what} must be positive"))
        };
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        let on_cpu = self
            .devices
            .iter()
            .all(|d| matches!(d, DeviceLocation::Cpu));
        let replicas = self.replicas.unwrap_or(if on_cpu {
            NonZeroUsize::new((cores / self.cpu_threads.max(1)).max(1)).expect("at least 1")
        } else {
            NonZeroUsize::MIN
        });
        let pool = PoolConfig::default()
            .with_devices(self.devices.clone())
            .with_replicas_per_device(replicas)
            .with_cpu_threads_per_replica(NonZeroUsize::new(self.cpu_threads))
            .with_compute_priority(match self.compute_priority {
                Priority::Normal => ComputePriority::Normal,
                Priority::Background => ComputePriority::Background,
            });
        let batch = BatchConfig::default()
            .with_max_batch_size(positive(self.max_batch_size, "--max-batch-size")?)
            .with_max_wait(Duration::from_micros(self.max_wait_us))
            .with_max_batch_cost(
                Some(positive(self.max_batch_tokens, "--max-batch-tokens")?),
                CostMode::Padded,
            )
            .with_group_window(self.group_window)
            .with_queue_capacity(positive(self.queue_capacity, "--queue-capacity")?)
            .with_admission(Admission::Shed)
            .with_max_queue_time(Some(Duration::from_millis(self.max_queue_time_ms)))
            .with_default_timeout(Some(Duration::from_millis(self.request_timeout_ms)));
        Ok(ServingConfig::new(pool, batch)
            .with_model(model)
            .with_drain_timeout(Duration::from_secs(self.drain_timeout_s))
            .with_admin_port(Some(self.admin_port)))
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // candle must compute at the replicas' parallelism; it reads that from
    // the environment, so set it before any thread starts (a re-execution,
    // skipped when the environment already says so, as in the container).
    let on_cpu = args.devices.contains(&DeviceLocation::Cpu);
    if let (true, Some(threads)) = (on_cpu, NonZeroUsize::new(args.cpu_threads))
        && let Err(err) = candlewick::device::align_candle_threads(threads)
    {
        eprintln!("warning: cannot set candle's thread count to {threads}: {err}");
    }
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
    // Replicas bring their own threads; the HTTP side needs few.
    let served = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(BoxError::from)
        .and_then(|runtime| runtime.block_on(serve(args)));
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // A sentence for a person, with the causes it does not already
            // name: never `Debug`.
            let mut message = err.to_string();
            let mut source = err.source();
            while let Some(cause) = source {
                let cause_text = cause.to_string();
                if !message.contains(&cause_text) {
                    message = format!("{message}: {cause_text}");
                }
                source = cause.source();
            }
            eprintln!("error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> Result<(), BoxError> {
    let loader = match &args.model_dir {
        Some(dir) => BertLoader::from_dir(dir)?,
        None => BertLoader::builtin(args.seed),
    };
    // Every input the model takes must fit a batch, or the longest would
    // be refused as the client's fault.
    if args.max_batch_tokens < loader.max_tokens() {
        return Err(format!(
            "--max-batch-tokens {} is below the model's {} tokens in one input",
            args.max_batch_tokens,
            loader.max_tokens()
        )
        .into());
    }
    let model = ModelInfo::new(loader.name(), args.model_version.clone());
    let config = args.serving_config(model)?;
    // The recorder goes in before the stack registers its metrics.
    let metrics = PrometheusService::install()?;
    let serving = Serving::start(loader.clone(), config.clone())?;
    let mut prepare = PrepareConfig::default().with_queue_capacity(
        NonZeroUsize::new(args.prepare_queue_capacity).expect("checked by clap"),
    );
    if let Some(threads) = NonZeroUsize::new(args.prepare_threads) {
        prepare = prepare.with_threads(threads);
    }
    let preparer = Preparer::new(prepare, &config.model)?;
    let state = AppState::new(
        serving.clone(),
        preparer,
        &loader,
        &config,
        args.max_client_batch,
    );

    // The control plane: its own listener, thread and runtime.
    let admin = serving
        .admin()
        .metrics("/metrics", metrics.clone())
        .bind(SocketAddr::new(args.bind, args.admin_port))?;

    let mut app = Router::new()
        .route("/embed", post(api::embed))
        // TEI clients (huggingface_hub) post to the server's root.
        .route("/", post(api::embed))
        .route("/tokenize", post(api::tokenize))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/models", get(openai::models))
        .route("/info", get(api::info));
    if !args.admin_only {
        let probes = serving.probes();
        app = app
            .route_service(&config.probes.live, probes.clone())
            .route_service(&config.probes.ready, probes.clone())
            .route_service(&config.probes.started, probes)
            .route_service("/metrics", metrics);
    }
    let app = app
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(api::MAX_BODY_BYTES))
        .with_state(state);
    let limits = edge::Limits {
        header_timeout: Duration::from_millis(args.header_timeout_ms),
        write_timeout: Duration::from_millis(args.write_timeout_ms),
        body_timeout: Duration::from_millis(args.body_timeout_ms),
        request_timeout: Duration::from_millis(args.http_timeout_ms),
        max_connections: args.max_connections,
    };
    let app = edge::layers(app, limits);

    // A deep backlog: a burst of connections waits for the acceptor
    // instead of having its SYNs dropped (the default is 128).
    let listener = candlewick::health::listen(SocketAddr::new(args.bind, args.port), 4096)?;
    tracing::info!(
        address = %listener.local_addr()?,
        admin = %admin.local_addr(),
        model = loader.name(),
        dimension = loader.dimension(),
        max_tokens = loader.max_tokens(),
        replicas = config.pool.replicas(),
        "listening"
    );
    let grace = Duration::from_secs(5);
    let server = edge::serve(
        listener,
        app,
        limits,
        drain_on_signal(serving.clone()),
        grace,
    );
    tokio::select! {
        () = server => {}
        // No replica can ever serve (e.g. its weights are malformed): exit
        // with the reason instead of answering 503 forever.
        Err(err) = serving.started() => return Err(err),
    }
    admin.shutdown();
    tracing::info!("stopped");
    Ok(())
}

/// Completes once a SIGTERM or SIGINT has been handled: readiness off at once,
/// accepted work finished (or answered) within the drain timeout. The HTTP
/// server then stops accepting and closes its connections. A second signal
/// while draining exits at once (status 130 for SIGINT, 143 for SIGTERM), as
/// a second Ctrl-C should.
async fn drain_on_signal(serving: Serving<Vec<u32>, Vec<f32>>) {
    let signal = wait_for_signal().await;
    tracing::info!(signal, "shutting down: draining");
    tokio::select! {
        report = serving.shutdown_within() => tracing::info!(
            completed = report.completed,
            rejected = report.rejected,
            aborted = report.aborted,
            "drained"
        ),
        signal = wait_for_signal() => {
            tracing::warn!(signal, "a second signal: exiting without finishing the drain");
            // 128 + the signal's number, as a shell reports a process it ended.
            std::process::exit(if signal == "SIGINT" { 130 } else { 143 });
        }
    }
}

async fn wait_for_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            },
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM; SIGINT only");
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}
