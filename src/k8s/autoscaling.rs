//! Autoscaling on the crate's own metrics: the HPA, the prometheus-adapter
//! rules that serve its custom metrics, or a KEDA ScaledObject instead.

use std::collections::BTreeMap;

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingPolicy, HPAScalingRules, HorizontalPodAutoscaler,
    HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec,
    MetricTarget, PodsMetricSource, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::compat;
use super::custom::{
    AdapterConfig, AdapterName, AdapterResource, AdapterResources, AdapterRule, KedaAdvanced,
    KedaHpaConfig, KedaTrigger, ScaleTargetRef, ScaledObject, ScaledObjectSpec,
};
use super::error::ManifestError;
use super::plan::{Plan, RATE_WINDOW, Track};
use super::settings::{Autoscaling, ScaleMetric, p99_latency, requests_per_second};
use crate::metrics::names;

/// A per-pod target as a Kubernetes quantity: whole numbers as they are,
/// fractions in thousandths (`0.25` → `250m`).
pub(crate) fn quantity(value: f64) -> Quantity {
    if value.fract() == 0.0 {
        Quantity(format!("{value:.0}"))
    } else {
        Quantity(format!("{:.0}m", (value * 1000.0).round()))
    }
}

/// Scale up fast (double, or four pods, a minute), scale down slowly (one
/// pod per two minutes after the stabilisation window): a model pod is
/// expensive to start, so flapping costs more than a few idle minutes.
fn behavior(auto: &Autoscaling) -> HorizontalPodAutoscalerBehavior {
    let policy = |type_: &str, value, period| HPAScalingPolicy {
        type_: type_.to_owned(),
        value,
        period_seconds: period,
    };
    HorizontalPodAutoscalerBehavior {
        scale_up: Some(HPAScalingRules {
            stabilization_window_seconds: Some(0),
            select_policy: Some("Max".to_owned()),
            policies: Some(vec![policy("Percent", 100, 60), policy("Pods", 4, 60)]),
            ..HPAScalingRules::default()
        }),
        scale_down: Some(HPAScalingRules {
            stabilization_window_seconds: Some(auto.scale_down_window_secs),
            select_policy: Some("Min".to_owned()),
            policies: Some(vec![policy("Pods", 1, 120)]),
            ..HPAScalingRules::default()
        }),
    }
}

fn replicas(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn target_value(metric: &ScaleMetric) -> f64 {
    match metric {
        ScaleMetric::QueueDepth { per_pod }
        | ScaleMetric::InFlight { per_pod }
        | ScaleMetric::RequestsPerSecond { per_pod }
        | ScaleMetric::Pods { per_pod, .. } => *per_pod,
        ScaleMetric::P99Latency { seconds } => *seconds,
        ScaleMetric::Cpu { utilization } | ScaleMetric::Memory { utilization } => {
            f64::from(*utilization)
        }
    }
}

/// The `autoscaling/v2` HPA of one track.
pub(crate) fn hpa(plan: &Plan, track: &Track, auto: &Autoscaling) -> HorizontalPodAutoscaler {
    let metrics = auto
        .metrics
        .iter()
        .map(|metric| match metric {
            ScaleMetric::Cpu { utilization } | ScaleMetric::Memory { utilization } => MetricSpec {
                type_: "Resource".to_owned(),
                resource: Some(ResourceMetricSource {
                    name: if matches!(metric, ScaleMetric::Cpu { .. }) {
                        "cpu"
                    } else {
                        "memory"
                    }
                    .to_owned(),
                    target: MetricTarget {
                        type_: "Utilization".to_owned(),
                        average_utilization: Some(*utilization),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            },
            _ => MetricSpec {
                type_: "Pods".to_owned(),
                pods: Some(PodsMetricSource {
                    metric: MetricIdentifier {
                        name: metric.exposed_name().unwrap_or_default(),
                        selector: None,
                    },
                    target: MetricTarget {
                        type_: "AverageValue".to_owned(),
                        average_value: Some(quantity(target_value(metric))),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            },
        })
        .collect();
    let (api_version, kind) = track.workload.api_version_and_kind();
    HorizontalPodAutoscaler {
        metadata: plan.metadata(track, &track.name),
        spec: compat::wrap(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some(api_version.to_owned()),
                kind: kind.to_owned(),
                name: track.name.clone(),
            },
            min_replicas: Some(replicas(auto.min_replicas)),
            max_replicas: replicas(auto.max_replicas),
            metrics: Some(metrics),
            behavior: Some(behavior(auto)),
        }),
        ..HorizontalPodAutoscaler::default()
    }
}

/// The prometheus-adapter rule serving one custom metric per pod.
fn adapter_rule(metric: &ScaleMetric) -> Option<AdapterRule> {
    let name = metric.exposed_name()?;
    let (series, query) = if name == names::QUEUE_DEPTH || name == names::IN_FLIGHT {
        // Gauges: the pod's current value.
        (
            name.clone(),
            "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)".to_owned(),
        )
    } else if name == requests_per_second() {
        // A counter: only its rate means anything.
        (
            names::REQUESTS.to_owned(),
            format!(
                "sum(rate(<<.Series>>{{<<.LabelMatchers>>}}[{RATE_WINDOW}])) by (<<.GroupBy>>)"
            ),
        )
    } else if name == p99_latency() {
        // A histogram: the quantile of the rate of its buckets, per pod.
        (
            format!("{}_bucket", names::REQUEST_DURATION),
            format!(
                "histogram_quantile(0.99, sum(rate(<<.Series>>{{<<.LabelMatchers>>}}[{RATE_WINDOW}])) by (le, <<.GroupBy>>))"
            ),
        )
    } else {
        return None;
    };
    Some(AdapterRule {
        series_query: format!("{series}{{namespace!=\"\",pod!=\"\"}}"),
        resources: AdapterResources {
            overrides: ["namespace", "pod"]
                .into_iter()
                .map(|label| {
                    (
                        label.to_owned(),
                        AdapterResource {
                            resource: label.to_owned(),
                        },
                    )
                })
                .collect(),
        },
        name: AdapterName {
            matches: format!("^{series}$"),
            as_: name,
        },
        metrics_query: query,
    })
}

/// The ConfigMap holding prometheus-adapter rules for exactly the custom
/// metrics the HPAs use.
pub(crate) fn adapter_rules(
    plan: &Plan,
    metrics: &[ScaleMetric],
) -> Result<ConfigMap, ManifestError> {
    let config = AdapterConfig {
        rules: metrics.iter().filter_map(adapter_rule).collect(),
    };
    let yaml = serde_saphyr::to_string_with_options(&config, super::output::yaml_options())
        .map_err(|e| ManifestError::Serialize(e.to_string()))?;
    Ok(ConfigMap {
        metadata: plan.shared_metadata(
            format!("{}-adapter-rules", plan.name),
            Some("metrics-adapter-rules"),
            None,
        ),
        data: Some(BTreeMap::from([("config.yaml".to_owned(), yaml)])),
        ..ConfigMap::default()
    })
}

/// The PromQL KEDA runs for `metric`, over the pods of `track`, or `None`
/// for CPU and memory. Returns the query and KEDA's metric type.
fn keda_query(plan: &Plan, track: &Track, metric: &ScaleMetric) -> Option<(String, &'static str)> {
    let name = metric.exposed_name()?;
    let matchers = format!(
        "namespace=\"{}\",model=\"{}\",version=\"{}\"",
        plan.namespace, track.model.name, track.model.version
    );
    Some(if name == names::QUEUE_DEPTH || name == names::IN_FLIGHT {
        // The total, which KEDA divides by the replica count.
        (format!("sum({name}{{{matchers}}})"), "AverageValue")
    } else if name == requests_per_second() {
        (
            format!(
                "sum(rate({}{{{matchers}}}[{RATE_WINDOW}]))",
                names::REQUESTS
            ),
            "AverageValue",
        )
    } else if name == p99_latency() {
        // A latency is not divided by replicas: compare the value itself.
        (
            format!(
                "histogram_quantile(0.99, sum(rate({}_bucket{{{matchers}}}[{RATE_WINDOW}])) by (le))",
                names::REQUEST_DURATION
            ),
            "Value",
        )
    } else {
        return None;
    })
}

/// A KEDA ScaledObject for one track, in place of its HPA.
pub(crate) fn scaled_object(
    plan: &Plan,
    track: &Track,
    auto: &Autoscaling,
    prometheus_url: &str,
) -> Result<ScaledObject, ManifestError> {
    let mut triggers = Vec::new();
    for metric in &auto.metrics {
        let trigger = match metric {
            ScaleMetric::Cpu { utilization } | ScaleMetric::Memory { utilization } => KedaTrigger {
                type_: if matches!(metric, ScaleMetric::Cpu { .. }) {
                    "cpu"
                } else {
                    "memory"
                }
                .to_owned(),
                metric_type: Some("Utilization".to_owned()),
                metadata: BTreeMap::from([("value".to_owned(), utilization.to_string())]),
            },
            _ => {
                let (query, metric_type) = keda_query(plan, track, metric).ok_or_else(|| {
                    ManifestError::UnknownMetric {
                        object: format!("ScaledObject/{}", track.name),
                        metric: metric.exposed_name().unwrap_or_default(),
                    }
                })?;
                KedaTrigger {
                    type_: "prometheus".to_owned(),
                    metric_type: Some(metric_type.to_owned()),
                    metadata: BTreeMap::from([
                        ("serverAddress".to_owned(), prometheus_url.to_owned()),
                        ("query".to_owned(), query),
                        ("threshold".to_owned(), target_value(metric).to_string()),
                    ]),
                }
            }
        };
        triggers.push(trigger);
    }
    let (api_version, kind) = track.workload.api_version_and_kind();
    Ok(ScaledObject {
        api_version: "keda.sh/v1alpha1".to_owned(),
        kind: "ScaledObject".to_owned(),
        metadata: plan.metadata(track, &track.name),
        spec: ScaledObjectSpec {
            scale_target_ref: ScaleTargetRef {
                api_version: api_version.to_owned(),
                kind: kind.to_owned(),
                name: track.name.clone(),
            },
            min_replica_count: replicas(auto.min_replicas),
            max_replica_count: replicas(auto.max_replicas),
            polling_interval: 15,
            cooldown_period: auto.scale_down_window_secs,
            advanced: Some(KedaAdvanced {
                horizontal_pod_autoscaler_config: KedaHpaConfig {
                    behavior: behavior(auto),
                },
            }),
            triggers,
        },
    })
}

/// Every metric name a PromQL query refers to (identifiers starting with
/// `candlewick_`).
pub(crate) fn query_metric_names(query: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = query;
    while let Some(start) = rest.find("candlewick_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        found.push(&tail[..end]);
        rest = &tail[end..];
    }
    found
}
