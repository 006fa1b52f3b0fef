//! The semantic checks schemas cannot make.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscalerSpec;
use k8s_openapi::api::core::v1::{PodTemplateSpec, Probe};
use k8s_openapi::api::networking::v1::NetworkPolicySpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::autoscaling::query_metric_names;
use super::compat;
use super::error::ManifestError;
use super::output::{ManifestSet, Manifests, Object};
use super::settings::ScaleMetric;
use crate::metrics::names;

type Labels = BTreeMap<String, String>;

/// Does `selector` select pods labelled `labels`? Only `matchLabels` is
/// generated; a selector with expressions, or an empty one, never counts
/// as matching.
fn selects(selector: &LabelSelector, labels: &Labels) -> bool {
    let Some(match_labels) = &selector.match_labels else {
        return false;
    };
    selector
        .match_expressions
        .as_ref()
        .is_none_or(Vec::is_empty)
        && !match_labels.is_empty()
        && match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// What runs pods, a Deployment or a Rollout, as the checks see it.
struct Workload<'a> {
    id: String,
    name: &'a str,
    selector: &'a LabelSelector,
    template: &'a PodTemplateSpec,
    replicas: Option<i32>,
    /// Whether an update runs new pods beside the old ones.
    surges: bool,
}

impl<'a> Workload<'a> {
    fn of(object: &'a Object) -> Option<Self> {
        match object {
            Object::Deployment(deployment) => {
                let spec = compat::get::<_, DeploymentSpec>(&deployment.spec)?;
                Some(Self {
                    id: object.id(),
                    name: deployment.metadata.name.as_deref().unwrap_or_default(),
                    selector: &spec.selector,
                    template: &spec.template,
                    replicas: spec.replicas,
                    surges: surges(spec.strategy.clone().unwrap_or_default()),
                })
            }
            // A canary runs beside the stable pods.
            Object::Rollout(rollout) => Some(Self {
                id: object.id(),
                name: rollout.metadata.name.as_deref().unwrap_or_default(),
                selector: &rollout.spec.selector,
                template: &rollout.spec.template,
                replicas: rollout.spec.replicas,
                surges: true,
            }),
            _ => None,
        }
    }

    fn pod_labels(&self) -> Labels {
        self.template
            .metadata
            .as_ref()
            .and_then(|meta| meta.labels.clone())
            .unwrap_or_default()
    }
}

/// Does a Deployment strategy start new pods before old ones stop?
fn surges(strategy: DeploymentStrategy) -> bool {
    match strategy.type_.as_deref() {
        Some("Recreate") => false,
        // The default rolling update surges by 25%.
        _ => strategy
            .rolling_update
            .and_then(|r| r.max_surge)
            .is_none_or(|surge| {
                !matches!(surge, IntOrString::Int(0))
                    && !matches!(&surge, IntOrString::String(s) if s == "0%" || s == "0")
            }),
    }
}

impl Manifests {
    /// Runs every check on every set:
    ///
    /// * each Deployment's selector matches its pod labels, and each Service
    ///   and PodDisruptionBudget selects the pods of exactly one Deployment;
    /// * each PodDisruptionBudget sets exactly one of `minAvailable` and
    ///   `maxUnavailable`;
    /// * autoscalers scale on metrics the process exports, target a
    ///   Deployment of the set, and that Deployment leaves `replicas` unset;
    /// * probes target the paths the probe service serves, on the named port
    ///   that serves them (`admin` with an admin listener, else `http`);
    /// * the startup probe's budget covers the load time;
    /// * the grace period covers the preStop sleep and the drain timeout;
    /// * a GPU pool without headroom is never rolled out with a surge.
    pub fn lint(&self) -> Result<(), ManifestError> {
        for set in &self.sets {
            self.lint_set(set)?;
        }
        Ok(())
    }

    fn lint_set(&self, set: &ManifestSet) -> Result<(), ManifestError> {
        let workloads: Vec<Workload<'_>> = set.objects.iter().filter_map(Workload::of).collect();
        let matching = |selector: &LabelSelector| {
            workloads
                .iter()
                .filter(|w| selects(selector, &w.pod_labels()))
                .count()
        };
        let mut scaled = Vec::new();
        for object in &set.objects {
            let id = object.id();
            match object {
                Object::Deployment(_) | Object::Rollout(_) => {}
                Object::Service(service) => {
                    let selector = LabelSelector {
                        match_labels: service.spec.as_ref().and_then(|s| s.selector.clone()),
                        ..LabelSelector::default()
                    };
                    if matching(&selector) != 1 {
                        return Err(ManifestError::SelectorMismatch { object: id });
                    }
                }
                Object::PodDisruptionBudget(pdb) => {
                    let spec = pdb.spec.clone().unwrap_or_default();
                    if spec.min_available.is_some() == spec.max_unavailable.is_some() {
                        return Err(ManifestError::PdbBounds { object: id });
                    }
                    if matching(&spec.selector.unwrap_or_default()) != 1 {
                        return Err(ManifestError::SelectorMismatch { object: id });
                    }
                }
                Object::NetworkPolicy(policy) => {
                    let selector = compat::get::<_, NetworkPolicySpec>(&policy.spec)
                        .and_then(|spec| compat::get::<_, LabelSelector>(&spec.pod_selector))
                        .cloned()
                        .unwrap_or_default();
                    if matching(&selector) != 1 {
                        return Err(ManifestError::SelectorMismatch { object: id });
                    }
                }
                Object::HorizontalPodAutoscaler(hpa) => {
                    let spec = compat::get::<_, HorizontalPodAutoscalerSpec>(&hpa.spec)
                        .cloned()
                        .unwrap_or_default();
                    let exported = ScaleMetric::exported_names();
                    for metric in spec.metrics.unwrap_or_default() {
                        let name = match metric.type_.as_str() {
                            "Resource" => continue,
                            "Pods" => metric.pods.map(|p| p.metric.name),
                            "Object" => metric.object.map(|o| o.metric.name),
                            "External" => metric.external.map(|e| e.metric.name),
                            "ContainerResource" => continue,
                            other => Some(other.to_owned()),
                        }
                        .unwrap_or_default();
                        if !exported.contains(&name) {
                            return Err(ManifestError::UnknownMetric {
                                object: id,
                                metric: name,
                            });
                        }
                    }
                    scaled.push((id, spec.scale_target_ref.name));
                }
                Object::ScaledObject(so) => {
                    for trigger in &so.spec.triggers {
                        let query = trigger.metadata.get("query").map_or("", String::as_str);
                        for name in query_metric_names(query) {
                            if !is_emitted_series(name) {
                                return Err(ManifestError::UnknownMetric {
                                    object: id,
                                    metric: name.to_owned(),
                                });
                            }
                        }
                    }
                    scaled.push((id, so.spec.scale_target_ref.name.clone()));
                }
                Object::AnalysisTemplate(template) => {
                    for metric in &template.spec.metrics {
                        for name in query_metric_names(&metric.provider.prometheus.query) {
                            if !is_emitted_series(name) {
                                return Err(ManifestError::UnknownMetric {
                                    object: id,
                                    metric: name.to_owned(),
                                });
                            }
                        }
                    }
                }
                Object::ConfigMap(_) | Object::HttpRoute(_) => {}
            }
        }
        for workload in &workloads {
            self.lint_workload(workload)?;
        }
        for (id, target) in scaled {
            let workload = workloads.iter().find(|w| w.name == target).ok_or_else(|| {
                ManifestError::Invalid {
                    field: "autoscaling",
                    reason: format!("{id} targets {target}, which is not a workload of the set"),
                }
            })?;
            if workload.replicas.is_some() {
                return Err(ManifestError::ReplicasWithAutoscaler {
                    object: workload.id.clone(),
                });
            }
        }
        Ok(())
    }

    fn lint_workload(&self, workload: &Workload<'_>) -> Result<(), ManifestError> {
        let expect = &self.expect;
        let object = || workload.id.clone();
        if !selects(workload.selector, &workload.pod_labels()) {
            return Err(ManifestError::SelectorMismatch { object: object() });
        }
        let pod = workload.template.spec.clone().unwrap_or_default();
        for container in &pod.containers {
            let (port_name, port_number) = expect.probe_port;
            let named_port = container.ports.iter().flatten().any(|p| {
                p.name.as_deref() == Some(port_name) && p.container_port == i32::from(port_number)
            });
            for (probe, path, found) in [
                ("startup", &expect.probes.started, &container.startup_probe),
                (
                    "readiness",
                    &expect.probes.ready,
                    &container.readiness_probe,
                ),
                ("liveness", &expect.probes.live, &container.liveness_probe),
            ] {
                let get = found.as_ref().and_then(|p| p.http_get.as_ref());
                let target = get.and_then(|g| g.path.clone()).unwrap_or_default();
                let port_ok = match get.map(|g| &g.port) {
                    Some(IntOrString::String(name)) => name == port_name && named_port,
                    Some(IntOrString::Int(port)) => *port == i32::from(port_number),
                    None => false,
                };
                if target != *path || !port_ok {
                    return Err(ManifestError::ProbePath {
                        object: object(),
                        probe,
                        path: target,
                    });
                }
            }
            let budget = container
                .startup_probe
                .as_ref()
                .map_or(Duration::ZERO, probe_budget);
            if budget < expect.load_time {
                return Err(ManifestError::StartupBudgetTooShort {
                    object: object(),
                    budget,
                    load_time: expect.load_time,
                });
            }
            let pre_stop = container
                .lifecycle
                .as_ref()
                .and_then(|l| l.pre_stop.as_ref())
                .and_then(|h| h.sleep.as_ref())
                .map_or(0, |s| s.seconds);
            let required = Duration::from_secs(u64::try_from(pre_stop).unwrap_or(0))
                .saturating_add(expect.drain_timeout);
            // Kubernetes' default grace period is 30 s.
            let grace = Duration::from_secs(
                u64::try_from(pod.termination_grace_period_seconds.unwrap_or(30)).unwrap_or(0),
            );
            if grace < required {
                return Err(ManifestError::GracePeriodTooShort {
                    object: object(),
                    grace,
                    required,
                });
            }
            if let Some(gpu) = &expect.gpu_without_headroom {
                let wants_gpu = container
                    .resources
                    .as_ref()
                    .and_then(|r| r.limits.as_ref())
                    .is_some_and(|limits| limits.contains_key(gpu));
                if wants_gpu && workload.surges {
                    return Err(ManifestError::GpuRolloutDeadlock { object: object() });
                }
            }
        }
        Ok(())
    }
}

/// How long a startup probe lets a container start.
fn probe_budget(probe: &Probe) -> Duration {
    let secs = |v: Option<i32>, default: i32| u64::try_from(v.unwrap_or(default)).unwrap_or(0);
    Duration::from_secs(secs(probe.initial_delay_seconds, 0).saturating_add(
        secs(probe.period_seconds, 10).saturating_mul(secs(probe.failure_threshold, 3)),
    ))
}

/// Is `name` a Prometheus series of a metric the process emits (including
/// a histogram's `_bucket`, `_sum` and `_count`)?
fn is_emitted_series(name: &str) -> bool {
    let emitted = [
        names::REQUESTS,
        names::REQUEST_DURATION,
        names::QUEUE_WAIT,
        names::BATCH_SIZE,
        names::BATCH_COST,
        names::BATCH_DURATION,
        names::QUEUE_DEPTH,
        names::QUEUE_COST,
        names::IN_FLIGHT,
        names::REPLICAS,
        names::LOAD_TIME,
        names::WARMUP_TIME,
        names::HEALTH_STATE,
        names::MODEL_INFO,
    ];
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name);
    emitted.contains(&name) || emitted.contains(&base)
}
