//! Custom resources k8s-openapi has no types for, as small serde structs
//! that refuse unknown fields when read back: KEDA's `ScaledObject`, Gateway
//! API's `HTTPRoute`, Argo Rollouts' `Rollout` and `AnalysisTemplate`, and
//! the prometheus-adapter configuration.

use std::collections::BTreeMap;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscalerBehavior;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

/// A KEDA `keda.sh/v1alpha1` `ScaledObject` (the fields this crate sets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct ScaledObject {
    /// `keda.sh/v1alpha1`.
    pub api_version: String,
    /// `ScaledObject`.
    pub kind: String,
    /// Name, namespace, labels.
    pub metadata: ObjectMeta,
    /// What to scale and on what.
    pub spec: ScaledObjectSpec,
}

/// The spec of a [`ScaledObject`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct ScaledObjectSpec {
    /// The Deployment to scale.
    pub scale_target_ref: ScaleTargetRef,
    /// The fewest replicas.
    pub min_replica_count: i32,
    /// The most replicas.
    pub max_replica_count: i32,
    /// Seconds between checks of the triggers.
    pub polling_interval: i32,
    /// Seconds after the last active trigger before scaling to the minimum.
    pub cooldown_period: i32,
    /// The behaviour of the HPA KEDA creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advanced: Option<KedaAdvanced>,
    /// The signals.
    pub triggers: Vec<KedaTrigger>,
}

/// `spec.scaleTargetRef` of a [`ScaledObject`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct ScaleTargetRef {
    /// `apps/v1`.
    pub api_version: String,
    /// `Deployment`.
    pub kind: String,
    /// The Deployment's name.
    pub name: String,
}

/// `spec.advanced` of a [`ScaledObject`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct KedaAdvanced {
    /// The configuration of the generated HPA.
    pub horizontal_pod_autoscaler_config: KedaHpaConfig,
}

/// `spec.advanced.horizontalPodAutoscalerConfig` of a [`ScaledObject`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct KedaHpaConfig {
    /// Scale-up and scale-down behaviour.
    pub behavior: HorizontalPodAutoscalerBehavior,
}

/// One trigger of a [`ScaledObject`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct KedaTrigger {
    /// `prometheus`, `cpu` or `memory`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `AverageValue`, `Value` or `Utilization`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric_type: Option<String>,
    /// The trigger's parameters.
    pub metadata: BTreeMap<String, String>,
}

/// A Gateway API `gateway.networking.k8s.io/v1` `HTTPRoute` (the fields
/// this crate sets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct HttpRoute {
    /// `gateway.networking.k8s.io/v1`.
    pub api_version: String,
    /// `HTTPRoute`.
    pub kind: String,
    /// Name, namespace, labels.
    pub metadata: ObjectMeta,
    /// Parents and rules.
    pub spec: HttpRouteSpec,
}

/// The spec of an [`HttpRoute`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct HttpRouteSpec {
    /// The Gateways the route attaches to.
    pub parent_refs: Vec<ParentRef>,
    /// The rules; this crate emits one, splitting by weight.
    pub rules: Vec<HttpRouteRule>,
}

/// A Gateway an [`HttpRoute`] attaches to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct ParentRef {
    /// The Gateway's name.
    pub name: String,
    /// The Gateway's namespace, if not the route's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A rule of an [`HttpRoute`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct HttpRouteRule {
    /// The Services requests go to, by weight.
    pub backend_refs: Vec<BackendRef>,
}

/// A weighted Service backend of an [`HttpRouteRule`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct BackendRef {
    /// The Service's name.
    pub name: String,
    /// The Service's port.
    pub port: i32,
    /// The share of requests, relative to the other backends.
    pub weight: i32,
}

/// An Argo Rollouts `argoproj.io/v1alpha1` `Rollout`: a Deployment whose
/// updates are canaried step by step (the fields this crate sets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct Rollout {
    /// `argoproj.io/v1alpha1`.
    pub api_version: String,
    /// `Rollout`.
    pub kind: String,
    /// Name, namespace, labels, annotations.
    pub metadata: ObjectMeta,
    /// The pods and how an update reaches them.
    pub spec: RolloutSpec,
}

/// The spec of a [`Rollout`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct RolloutSpec {
    /// The replica count; absent when an autoscaler owns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Selects the pods (as a Deployment's selector).
    pub selector: LabelSelector,
    /// The pods (as a Deployment's template).
    pub template: PodTemplateSpec,
    /// Seconds a new pod must be ready before it counts as available.
    pub min_ready_seconds: i32,
    /// Old ReplicaSets kept for rollback.
    pub revision_history_limit: i32,
    /// Seconds without progress before the rollout is reported failed.
    pub progress_deadline_seconds: i32,
    /// The canary strategy.
    pub strategy: RolloutStrategy,
}

/// `spec.strategy` of a [`Rollout`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct RolloutStrategy {
    /// Shift traffic to the new version step by step.
    pub canary: CanaryStrategy,
}

/// A [`Rollout`]'s canary strategy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct CanaryStrategy {
    /// The Service Argo points at the canary's pods.
    pub canary_service: String,
    /// The Service Argo points at the stable pods.
    pub stable_service: String,
    /// How traffic is split: an HTTPRoute, through Argo's Gateway API plugin.
    pub traffic_routing: TrafficRouting,
    /// Set a weight, analyse, repeat; promotion follows the last step.
    pub steps: Vec<CanaryStep>,
}

/// `trafficRouting` of a [`CanaryStrategy`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct TrafficRouting {
    /// Traffic router plugins by name.
    pub plugins: TrafficRoutingPlugins,
}

/// The traffic router plugins of a [`TrafficRouting`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TrafficRoutingPlugins {
    /// The Gateway API plugin (`argoproj-labs/gatewayAPI`).
    #[serde(rename = "argoproj-labs/gatewayAPI")]
    pub gateway_api: GatewayApiRoute,
}

/// The HTTPRoute the Gateway API plugin sets the weights of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct GatewayApiRoute {
    /// The HTTPRoute's name.
    pub http_route: String,
    /// The HTTPRoute's namespace.
    pub namespace: String,
}

/// One step of a [`CanaryStrategy`]: exactly one field is set.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct CanaryStep {
    /// Send this percentage of traffic to the canary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_weight: Option<i32>,
    /// Run an analysis; its failure aborts the rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<RolloutAnalysis>,
}

/// An analysis step of a [`CanaryStep`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct RolloutAnalysis {
    /// The templates to run.
    pub templates: Vec<AnalysisTemplateRef>,
    /// Values for the templates' arguments.
    pub args: Vec<AnalysisArg>,
}

/// A reference to an [`AnalysisTemplate`] by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct AnalysisTemplateRef {
    /// The template's name.
    pub template_name: String,
}

/// An argument of an [`AnalysisTemplate`]: declared without a value, passed
/// with one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct AnalysisArg {
    /// The argument's name (`{{args.NAME}}` in queries).
    pub name: String,
    /// Its value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// An Argo Rollouts `argoproj.io/v1alpha1` `AnalysisTemplate`: the metrics
/// a canary step measures, and when they pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct AnalysisTemplate {
    /// `argoproj.io/v1alpha1`.
    pub api_version: String,
    /// `AnalysisTemplate`.
    pub kind: String,
    /// Name, namespace, labels.
    pub metadata: ObjectMeta,
    /// Arguments and metrics.
    pub spec: AnalysisTemplateSpec,
}

/// The spec of an [`AnalysisTemplate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct AnalysisTemplateSpec {
    /// The arguments the queries use.
    pub args: Vec<AnalysisArg>,
    /// The measurements; each must pass.
    pub metrics: Vec<AnalysisMetric>,
}

/// One metric of an [`AnalysisTemplate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct AnalysisMetric {
    /// The metric's name.
    pub name: String,
    /// Time between measurements (`60s`).
    pub interval: String,
    /// Measurements taken.
    pub count: i32,
    /// Failed measurements tolerated before the analysis fails.
    pub failure_limit: i32,
    /// The condition a measurement passes on (`result[0]` is the value).
    pub success_condition: String,
    /// Where the value comes from.
    pub provider: MetricProvider,
}

/// `provider` of an [`AnalysisMetric`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct MetricProvider {
    /// A Prometheus query.
    pub prometheus: PrometheusQuery,
}

/// A Prometheus query of a [`MetricProvider`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct PrometheusQuery {
    /// The Prometheus server.
    pub address: String,
    /// The PromQL; its first sample is `result[0]`.
    pub query: String,
}

/// The prometheus-adapter configuration (`config.yaml` of its ConfigMap).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct AdapterConfig {
    /// One rule per exposed series.
    pub rules: Vec<AdapterRule>,
}

/// One prometheus-adapter custom-metrics rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct AdapterRule {
    /// The series the rule reads, e.g. `candlewick_queue_depth{namespace!="",pod!=""}`.
    pub series_query: String,
    /// How labels map to Kubernetes resources.
    pub resources: AdapterResources,
    /// The name under which the metric is served.
    pub name: AdapterName,
    /// The PromQL that computes the value per pod.
    pub metrics_query: String,
}

/// `resources` of an [`AdapterRule`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct AdapterResources {
    /// Label name → resource, e.g. `pod` → `{resource: pod}`.
    pub overrides: BTreeMap<String, AdapterResource>,
}

/// A Kubernetes resource a label names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct AdapterResource {
    /// `namespace` or `pod`.
    pub resource: String,
}

/// `name` of an [`AdapterRule`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct AdapterName {
    /// A regex on the series name.
    pub matches: String,
    /// The exposed name.
    #[serde(rename = "as")]
    pub as_: String,
}
