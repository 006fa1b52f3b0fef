//! Custom resources k8s-openapi has no types for, as small serde structs
//! that refuse unknown fields when read back: KEDA's `ScaledObject`, Gateway
//! API's `HTTPRoute`, and the prometheus-adapter configuration.

use std::collections::BTreeMap;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscalerBehavior;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
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
