//! Prints the Kubernetes objects for the example server (`examples/serve`)
//! as multi-document YAML (or JSON).
//!
//! ```text
//! cargo run --example manifests --features k8s -- --layout gpu
//! cargo run --example manifests --features k8s -- --layout multi-region --keda
//! cargo run --example manifests --features k8s -- --layout canary --json
//! cargo run --example manifests --features k8s -- --layout rollout \
//!     --image registry.example.com/candlewick-serve@sha256:… --model-version 2
//! ```
//!
//! The default image is the one `scripts/build-image.sh` builds and tags
//! locally; in a cluster, pass the pushed image by digest.

use std::io::Write as _;
use std::time::Duration;

use candlewick::k8s::{
    Autoscaling, Canary, CanaryRollout, GpuPool, ManifestBuilder, ManifestError, ModelVolume,
    Region, RegionMode, Resources, ScaleMetric, Spread,
};
use candlewick::{Approval, ModelInfo, ServingConfig};
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Layout {
    /// One CPU Deployment with an HPA on the queue depth.
    Single,
    /// One GPU Deployment on a tainted L4 node pool.
    Gpu,
    /// Two regions, active-passive, on GPUs.
    MultiRegion,
    /// A stable and a canary model version behind a weighted HTTPRoute.
    Canary,
    /// An Argo Rollouts canary, promoted step by step while Prometheus
    /// shows its errors and p99 latency no worse than the stable version's.
    Rollout,
}

/// Prints the Kubernetes objects that run the example server.
#[derive(Debug, Parser)]
struct Args {
    /// Which layout to generate.
    #[arg(long, value_enum, default_value = "single")]
    layout: Layout,
    /// Scale with a KEDA ScaledObject instead of an HPA.
    #[arg(long)]
    keda: bool,
    /// Print a JSON `List` instead of YAML.
    #[arg(long)]
    json: bool,
    /// The container image: by default the one `scripts/build-image.sh`
    /// tags locally; in a cluster, the pushed image by digest
    /// (`REGISTRY/candlewick-serve@sha256:…`).
    #[arg(long, default_value = concat!("localhost/candlewick-serve:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// The model the image serves (its metric label): the built-in one, or
    /// the directory name of the weights baked in or mounted.
    #[arg(long, default_value = "builtin-bert-128d-seed42")]
    model: String,
    /// The model version, set in the server's environment
    /// (`CANDLEWICK_MODEL_VERSION`) so its metrics carry the label the canary
    /// analysis compares; the canary track serves `VERSION-canary`.
    #[arg(long, default_value = "1")]
    model_version: String,
    /// Mount the weights from this PersistentVolumeClaim (read-only) and
    /// serve them with `--model-dir`, instead of the image's model.
    #[arg(long)]
    model_claim: Option<String>,
    /// Load plus warm-up time of one replica, in seconds (measure it with
    /// `Health::startup_time`).
    #[arg(long, default_value_t = 40)]
    load_secs: u64,
    /// A namespace whose pods (Prometheus) may reach the admin port; the
    /// NetworkPolicy keeps every other pod off it. Repeat for several.
    #[arg(long = "metrics-namespace", default_value = "monitoring")]
    metrics_namespaces: Vec<String>,
}

/// The builder for a layout: the same `ServingConfig` the server runs with.
fn builder(args: &Args) -> ManifestBuilder {
    let model = ModelInfo::new(&args.model, &args.model_version).with_approval(Approval::Approved);
    // The example server's admin listener (`--admin-port`, default 8081):
    // probes and Prometheus go there.
    let config = ServingConfig::default()
        .with_model(model)
        .with_admin_port(Some(8081));
    let mut autoscaling = Autoscaling::new(2, 10).with_metrics(vec![
        ScaleMetric::QueueDepth { per_pod: 16.0 },
        ScaleMetric::P99Latency { seconds: 0.25 },
        ScaleMetric::Cpu { utilization: 80 },
    ]);
    if args.keda {
        autoscaling = autoscaling.with_keda("http://prometheus.monitoring.svc:9090");
    }
    // The server labels its metrics with the version each track's
    // Deployment sets in its environment (`ModelInfo::VERSION_ENV`).
    let mut server_args = Vec::new();
    let mut builder = ManifestBuilder::new(&config, "embedder", args.image.clone())
        .with_metrics_namespaces(args.metrics_namespaces.clone());
    if let Some(claim) = &args.model_claim {
        // The server names the model after its directory.
        let dir = format!("/models/{}", args.model);
        server_args.extend(["--model-dir".to_owned(), dir.clone()]);
        builder = builder.with_model_volume(ModelVolume::claim(claim).with_mount_path(dir));
    }
    let builder = builder
        .with_args(server_args)
        .with_namespace("ml")
        .with_port(8080)
        .with_load_time(Duration::from_secs(args.load_secs))
        .with_resources(Resources::new("2", "4Gi"))
        .with_spread(Spread::default().with_anti_affinity(true))
        .with_autoscaling(autoscaling);
    let gpu = GpuPool::nvidia(1).with_node_label("cloud.google.com/gke-accelerator", "nvidia-l4");
    match args.layout {
        Layout::Single => builder,
        Layout::Gpu => builder.with_gpu(gpu),
        Layout::MultiRegion => builder.with_gpu(gpu).with_regions(
            vec![
                Region::new("europe-west4").with_min_replicas(3),
                Region::new("us-central1").with_node_label("pool", "l4-us"),
            ],
            RegionMode::ActivePassive {
                active: "europe-west4".to_owned(),
                warm_replicas: 1,
            },
        ),
        Layout::Canary => builder.with_canary(Canary::new(
            ModelInfo::new(&args.model, format!("{}-canary", args.model_version))
                .with_approval(Approval::Experimental),
            args.image.clone(),
            10,
            "public",
        )),
        Layout::Rollout => builder.with_canary_rollout(CanaryRollout::new(
            "public",
            "http://prometheus.monitoring.svc:9090",
        )),
    }
}

fn main() -> Result<(), ManifestError> {
    let args = Args::parse();
    let manifests = builder(&args).build()?;
    let text = if args.json {
        manifests.to_json()? + "\n"
    } else {
        manifests.to_yaml()?
    };
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::stdout().write_all(text.as_bytes());
    Ok(())
}
