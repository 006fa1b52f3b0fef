//! Kubernetes objects derived from the serving configuration the process
//! runs with: probe paths, port, drain timeout, load time, model metadata
//! and metric names come from the same values, so the two cannot drift.
//!
//! [`ManifestBuilder`] turns a [`ServingConfig`](crate::ServingConfig) plus
//! deployment settings into typed [`k8s_openapi`] objects ([`Manifests`]),
//! checks them ([`Manifests::lint`]) and writes them as multi-document YAML
//! or JSON. It never picks a Kubernetes version: the application enables
//! one `k8s-openapi` version feature (e.g. `k8s-openapi/latest`).
//!
#![doc = include_str!("../../docs/kubernetes.md")]
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use candlewick::{ModelInfo, ServingConfig};
//! use candlewick::k8s::{Autoscaling, GpuPool, ManifestBuilder, ScaleMetric};
//!
//! # fn main() -> Result<(), candlewick::k8s::ManifestError> {
//! let config = ServingConfig::default().with_model(ModelInfo::new("minilm", "v1"));
//! let manifests = ManifestBuilder::new(&config, "embedder", "ghcr.io/acme/embedder:1.0")
//!     .with_namespace("ml")
//!     .with_load_time(Duration::from_secs(90))
//!     .with_gpu(GpuPool::nvidia(1).with_node_label("pool", "l4"))
//!     .with_autoscaling(
//!         Autoscaling::new(2, 8).with_metrics(vec![ScaleMetric::QueueDepth { per_pod: 16.0 }]),
//!     )
//!     .build()?;
//! let yaml = manifests.to_yaml()?;
//! assert!(yaml.contains("path: /readyz"));
//! assert!(yaml.contains("maxSurge: 0"));
//! assert!(yaml.contains("name: candlewick_queue_depth"));
//! # Ok(())
//! # }
//! ```
//!
//! A canary release promoted on the process's own metrics (Argo Rollouts),
//! with the weights mounted from a volume rather than baked into the image:
//!
//! ```
//! use std::time::Duration;
//! use candlewick::{ModelInfo, ServingConfig};
//! use candlewick::k8s::{CanaryRollout, ManifestBuilder, ModelVolume};
//!
//! # fn main() -> Result<(), candlewick::k8s::ManifestError> {
//! let config = ServingConfig::default().with_model(ModelInfo::new("minilm", "2"));
//! let manifests = ManifestBuilder::new(&config, "embedder", "registry.example/serve@sha256:…")
//!     .with_load_time(Duration::from_secs(10))
//!     .with_model_volume(ModelVolume::claim("minilm-weights"))
//!     .with_args(["--model-dir", "/models", "--model-version", "2"])
//!     .with_canary_rollout(
//!         CanaryRollout::new("public", "http://prometheus.monitoring:9090")
//!             .with_steps([10, 50])
//!             .with_max_latency_ratio(1.1),
//!     )
//!     .build()?;
//! let yaml = manifests.to_yaml()?;
//! assert!(yaml.contains("kind: Rollout"));
//! assert!(yaml.contains(r#"version="{{args.canary-version}}""#));
//! assert!(yaml.contains("result[0] <= 1.1"));
//! # Ok(())
//! # }
//! ```

// Arrows point down: `builder` resolves the settings into a `plan` and
// calls the factories (`deployment`, `rollout`, `policy`, `autoscaling`),
// which import `plan` and nothing above it; `lint` checks their output.
mod autoscaling;
mod builder;
mod compat;
mod custom;
mod deployment;
mod error;
mod lint;
mod output;
mod plan;
mod policy;
mod rollout;
mod settings;

pub use builder::ManifestBuilder;
pub use custom::{
    AdapterConfig, AdapterName, AdapterResource, AdapterResources, AdapterRule, AnalysisArg,
    AnalysisMetric, AnalysisTemplate, AnalysisTemplateRef, AnalysisTemplateSpec, BackendRef,
    CanaryStep, CanaryStrategy, GatewayApiRoute, HttpRoute, HttpRouteRule, HttpRouteSpec,
    KedaAdvanced, KedaHpaConfig, KedaTrigger, MetricProvider, ParentRef, PrometheusQuery, Rollout,
    RolloutAnalysis, RolloutSpec, RolloutStrategy, ScaleTargetRef, ScaledObject, ScaledObjectSpec,
    TrafficRouting, TrafficRoutingPlugins,
};
pub use error::ManifestError;
pub use output::{ManifestSet, Manifests, Object};
pub use settings::{
    Autoscaler, Autoscaling, Canary, CanaryRollout, Disruption, GpuPool, ModelSource, ModelVolume,
    Region, RegionMode, Resources, Scale, ScaleMetric, Spread, Taint,
};
