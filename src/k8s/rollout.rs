//! Progressive delivery with Argo Rollouts: the `Rollout` that canaries each
//! new pod template, and the `AnalysisTemplate` that decides, from the
//! process's own metrics, whether the canary is promoted or rolled back.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::custom::{
    AnalysisArg, AnalysisMetric, AnalysisTemplate, AnalysisTemplateRef, AnalysisTemplateSpec,
    CanaryStep, CanaryStrategy, GatewayApiRoute, MetricProvider, PrometheusQuery, Rollout,
    RolloutAnalysis, RolloutSpec, RolloutStrategy, TrafficRouting, TrafficRoutingPlugins,
};
use super::deployment::{pod_template, progress_deadline};
use super::error::ManifestError;
use super::plan::{Plan, RATE_WINDOW, Track, canary_name};
use super::settings::{CanaryRollout, Region, Scale};
use crate::metrics::names;

/// The `outcome`s of [`names::REQUESTS`] that count against a version:
/// failures of the server, not of the caller (`invalid`, `cancelled`) nor
/// of a pod shutting down (`draining`).
const FAILED_OUTCOMES: &str = "model_error|deadline|overloaded|closed";

/// The Rollout of the stable track: its pods, and the canary steps every
/// change of them goes through.
pub(crate) fn rollout(plan: &Plan, track: &Track) -> Result<Rollout, ManifestError> {
    let settings = plan.canary_rollout.as_ref().ok_or(ManifestError::Invalid {
        field: "canary_rollout",
        reason: "a Rollout needs its CanaryRollout settings".to_owned(),
    })?;
    let template = pod_template(plan, track)?;
    let mut metadata = plan.metadata(track, &track.name);
    metadata.annotations = template
        .metadata
        .as_ref()
        .and_then(|meta| meta.annotations.clone());
    let analysis = RolloutAnalysis {
        templates: vec![AnalysisTemplateRef {
            template_name: analysis_name(plan),
        }],
        args: ARGS
            .into_iter()
            .zip(arg_values(plan, track))
            .map(|(name, value)| AnalysisArg {
                name: name.to_owned(),
                value: Some(value),
            })
            .collect(),
    };
    let steps = settings
        .steps
        .iter()
        .flat_map(|&weight| {
            [
                CanaryStep {
                    set_weight: Some(i32::from(weight)),
                    ..CanaryStep::default()
                },
                CanaryStep {
                    analysis: Some(analysis.clone()),
                    ..CanaryStep::default()
                },
            ]
        })
        .collect();
    Ok(Rollout {
        api_version: "argoproj.io/v1alpha1".to_owned(),
        kind: "Rollout".to_owned(),
        metadata,
        spec: RolloutSpec {
            replicas: match &track.scale {
                Scale::Fixed(n) => Some(i32::try_from(*n).unwrap_or(i32::MAX)),
                Scale::Auto(_) => None,
            },
            selector: LabelSelector {
                match_labels: Some(plan.selector_labels(track)),
                ..LabelSelector::default()
            },
            template,
            min_ready_seconds: 5,
            revision_history_limit: 5,
            progress_deadline_seconds: progress_deadline(plan.startup_budget()?),
            strategy: RolloutStrategy {
                canary: CanaryStrategy {
                    canary_service: canary_name(&track.name),
                    stable_service: track.name.clone(),
                    traffic_routing: TrafficRouting {
                        plugins: TrafficRoutingPlugins {
                            gateway_api: GatewayApiRoute {
                                http_route: plan.name.clone(),
                                namespace: plan.namespace.clone(),
                            },
                        },
                    },
                    steps,
                },
            },
        },
    })
}

/// The name of the AnalysisTemplate.
fn analysis_name(plan: &Plan) -> String {
    format!("{}-canary-analysis", plan.name)
}

/// The analysis's arguments (`{{args.NAME}}` in its queries).
const ARGS: [&str; 3] = ["namespace", "model", "canary-version"];

/// The values of [`ARGS`] for `track`: the canary is the model version these
/// manifests declare.
fn arg_values(plan: &Plan, track: &Track) -> [String; 3] {
    [
        plan.namespace.clone(),
        track.model.name.clone(),
        track.model.version.clone(),
    ]
}

/// `sum(rate(series{matchers}[window]))` for the canary's version
/// (`version="…"`) or every other one (`version!="…"`), with `extra`
/// matchers.
fn rate(series: &str, canary: bool, extra: &str) -> String {
    let op = if canary { "=" } else { "!=" };
    format!(
        "sum(rate({series}{{namespace=\"{{{{args.namespace}}}}\",model=\"{{{{args.model}}}}\",version{op}\"{{{{args.canary-version}}}}\"{extra}}}[{RATE_WINDOW}]))"
    )
}

/// The canary's error ratio minus the stable version's.
fn error_ratio_increase() -> String {
    let ratio = |canary| {
        format!(
            "({} / {})",
            rate(
                names::REQUESTS,
                canary,
                &format!(",outcome=~\"{FAILED_OUTCOMES}\"")
            ),
            rate(names::REQUESTS, canary, "")
        )
    };
    format!("{} - {}", ratio(true), ratio(false))
}

/// The canary's p99 latency over the stable version's.
fn latency_ratio() -> String {
    let p99 = |canary| {
        let buckets = rate(&format!("{}_bucket", names::REQUEST_DURATION), canary, "");
        // `sum(rate(…))` by bucket: insert the grouping the quantile needs.
        let by_le = buckets.replacen("sum(", "sum by (le) (", 1);
        format!("histogram_quantile(0.99, {by_le})")
    };
    format!("{} / {}", p99(true), p99(false))
}

/// The AnalysisTemplate every canary step runs: the canary's error ratio may
/// exceed the stable version's by at most the configured increase, and its
/// p99 latency may be at most the configured multiple of the stable one's.
/// A query without data (no canary traffic yet) is `NaN` and fails: no
/// promotion without evidence.
pub(crate) fn analysis_template(
    plan: &Plan,
    settings: &CanaryRollout,
    region: Option<&Region>,
) -> AnalysisTemplate {
    let interval = format!("{}s", settings.interval.as_secs());
    let count = i32::try_from(settings.measurements).unwrap_or(i32::MAX);
    let metric = |name: &str, query: String, threshold: f64| AnalysisMetric {
        name: name.to_owned(),
        interval: interval.clone(),
        count,
        failure_limit: 0,
        success_condition: format!("!isNaN(result[0]) && result[0] <= {threshold}"),
        provider: MetricProvider {
            prometheus: PrometheusQuery {
                address: settings.prometheus_url.clone(),
                query,
            },
        },
    };
    AnalysisTemplate {
        api_version: "argoproj.io/v1alpha1".to_owned(),
        kind: "AnalysisTemplate".to_owned(),
        metadata: plan.shared_metadata(analysis_name(plan), Some("canary-analysis"), region),
        spec: AnalysisTemplateSpec {
            args: ARGS
                .into_iter()
                .map(|name| AnalysisArg {
                    name: name.to_owned(),
                    value: None,
                })
                .collect(),
            metrics: vec![
                metric(
                    "error-ratio-increase",
                    error_ratio_increase(),
                    settings.max_error_ratio_increase,
                ),
                metric(
                    "p99-latency-ratio",
                    latency_ratio(),
                    settings.max_latency_ratio,
                ),
            ],
        },
    }
}
