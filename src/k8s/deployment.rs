//! The pod template (probes, resources, security, the model volume), the
//! Deployment around it, the Service, and the canary's HTTPRoute.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, HTTPGetAction, Lifecycle,
    LifecycleHandler, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext, Service,
    ServicePort, ServiceSpec, SleepAction, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::compat;
use super::custom::{BackendRef, HttpRoute, HttpRouteRule, HttpRouteSpec, ParentRef};
use super::error::ManifestError;
use super::plan::{PORT_NAME, Plan, RUN_AS, STARTUP_PERIOD_SECS, Track, canary_name};
use super::policy;
use super::settings::{ModelSource, Region, Scale};
use crate::ModelInfo;

/// The model's metadata as annotations (values labels cannot hold).
fn model_annotations(plan: &Plan, track: &Track) -> BTreeMap<String, String> {
    let mut annotations = BTreeMap::from([
        ("candlewick.rs/model".to_owned(), track.model.name.clone()),
        (
            "candlewick.rs/model-version".to_owned(),
            track.model.version.clone(),
        ),
    ]);
    if let Some(revision) = &track.model.revision {
        annotations.insert("candlewick.rs/model-revision".to_owned(), revision.clone());
    }
    if let Some(snapshot) = &track.model.data_snapshot {
        annotations.insert("candlewick.rs/data-snapshot".to_owned(), snapshot.clone());
    }
    annotations.insert("prometheus.io/scrape".to_owned(), "true".to_owned());
    annotations.insert(
        "prometheus.io/port".to_owned(),
        plan.probe_port().1.to_string(),
    );
    annotations.insert("prometheus.io/path".to_owned(), plan.metrics_path.clone());
    annotations
}

/// `progressDeadlineSeconds`: above the startup budget, so a slow but
/// healthy rollout is not reported failed.
pub(crate) fn progress_deadline(startup_budget: std::time::Duration) -> i32 {
    i32::try_from(startup_budget.as_secs())
        .unwrap_or(i32::MAX)
        .saturating_add(120)
        .max(600)
}

fn http_probe(port: &str, path: &str, period: i32, timeout: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(port.to_owned()),
            scheme: Some("HTTP".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(timeout),
        failure_threshold: Some(failures),
        success_threshold: Some(1),
        ..Probe::default()
    }
}

/// The pod template of one track, shared by its Deployment or Rollout.
pub(crate) fn pod_template(plan: &Plan, track: &Track) -> Result<PodTemplateSpec, ManifestError> {
    let budget = plan.startup_budget()?;
    let startup_period = STARTUP_PERIOD_SECS as i32;
    let startup_failures =
        i32::try_from(budget.as_secs().div_ceil(STARTUP_PERIOD_SECS)).unwrap_or(i32::MAX);
    let grace = plan.termination_grace();
    let (probe_port, _) = plan.probe_port();

    let mut node_selector = track.node_labels.clone();
    let mut tolerations = Vec::new();
    if let Some(gpu) = &plan.gpu {
        node_selector.extend(gpu.node_labels.clone());
        tolerations.extend(gpu.taints.iter().map(|taint| {
            Toleration {
                key: Some(taint.key.clone()),
                operator: Some(
                    if taint.value.is_some() {
                        "Equal"
                    } else {
                        "Exists"
                    }
                    .to_owned(),
                ),
                value: taint.value.clone(),
                effect: Some(taint.effect.clone()),
                ..Toleration::default()
            }
        }));
    }

    let (volumes, volume_mounts, init_containers) = volumes(plan);
    let container = Container {
        name: "server".to_owned(),
        image: Some(track.image.clone()),
        image_pull_policy: Some("Always".to_owned()),
        env: Some(env(plan, track)),
        ports: Some(plan.container_ports()),
        startup_probe: Some(http_probe(
            probe_port,
            &plan.probes.started,
            startup_period,
            2,
            startup_failures,
        )),
        readiness_probe: Some(http_probe(probe_port, &plan.probes.ready, 5, 2, 2)),
        liveness_probe: Some(http_probe(probe_port, &plan.probes.live, 10, 5, 3)),
        resources: Some(resources(plan, true)),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: i64::try_from(plan.pre_stop.as_secs()).unwrap_or(i64::MAX),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        security_context: Some(security_context()),
        args: (!plan.args.is_empty()).then(|| plan.args.clone()),
        volume_mounts: Some(volume_mounts),
        ..Container::default()
    };

    let selector = plan.selector_labels(track);
    let pod = PodSpec {
        containers: vec![container],
        automount_service_account_token: Some(false),
        termination_grace_period_seconds: Some(i64::try_from(grace.as_secs()).unwrap_or(i64::MAX)),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            fs_group: Some(RUN_AS),
            seccomp_profile: Some(runtime_default()),
            ..PodSecurityContext::default()
        }),
        node_selector: (!node_selector.is_empty()).then_some(node_selector),
        tolerations: (!tolerations.is_empty()).then_some(tolerations),
        affinity: policy::affinity(plan, &selector),
        topology_spread_constraints: Some(policy::spread(plan, &selector)),
        volumes: Some(volumes),
        init_containers,
        ..PodSpec::default()
    };
    let mut pod_labels = plan.labels(track);
    pod_labels.extend(selector);
    Ok(PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: Some(model_annotations(plan, track)),
            ..ObjectMeta::default()
        }),
        spec: Some(pod),
    })
}

/// The container's hardening: what the image allows (uid/gid 65532, no
/// writes outside the mounted volumes), nothing more.
fn security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Capabilities::default()
        }),
        seccomp_profile: Some(runtime_default()),
        ..SecurityContext::default()
    }
}

/// The pod's volumes, the server's mounts, and the init container that
/// fills the model volume, if one does: a writable `/tmp` (the root
/// filesystem is read-only), and the model, read-only to the server.
fn volumes(plan: &Plan) -> (Vec<Volume>, Vec<VolumeMount>, Option<Vec<Container>>) {
    let empty_dir = |name: &str| Volume {
        name: name.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    };
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    };
    let mut volumes = vec![empty_dir("tmp")];
    let mut mounts = vec![mount("tmp", "/tmp", false)];
    let Some(model) = &plan.model_volume else {
        return (volumes, mounts, None);
    };
    mounts.push(mount("model", &model.mount_path, true));
    let init = match &model.source {
        ModelSource::Claim(claim) => {
            volumes.push(Volume {
                name: "model".to_owned(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    read_only: Some(true),
                }),
                ..Volume::default()
            });
            None
        }
        ModelSource::InitContainer { image, command } => {
            volumes.push(empty_dir("model"));
            Some(vec![Container {
                name: "model".to_owned(),
                image: Some(image.clone()),
                image_pull_policy: Some("Always".to_owned()),
                command: Some(command.clone()),
                resources: Some(resources(plan, false)),
                security_context: Some(security_context()),
                volume_mounts: Some(vec![
                    mount("tmp", "/tmp", false),
                    mount("model", &model.mount_path, false),
                ]),
                ..Container::default()
            }])
        }
    };
    (volumes, mounts, init)
}

/// The CPU and memory requests and limits, and the GPUs for the server.
fn resources(plan: &Plan, with_gpu: bool) -> ResourceRequirements {
    let mut requests = BTreeMap::from([
        (
            "cpu".to_owned(),
            Quantity(plan.resources.cpu_request.clone()),
        ),
        (
            "memory".to_owned(),
            Quantity(plan.resources.memory_request.clone()),
        ),
    ]);
    let mut limits = BTreeMap::from([(
        "memory".to_owned(),
        Quantity(plan.resources.memory_limit.clone()),
    )]);
    if let Some(cpu) = &plan.resources.cpu_limit {
        limits.insert("cpu".to_owned(), Quantity(cpu.clone()));
    }
    if let Some(gpu) = plan.gpu.as_ref().filter(|_| with_gpu) {
        // Extended resources cannot be overcommitted: limit == request.
        let count = Quantity(gpu.count.to_string());
        requests.insert(gpu.resource.clone(), count.clone());
        limits.insert(gpu.resource.clone(), count);
    }
    ResourceRequirements {
        requests: Some(requests),
        limits: Some(limits),
        ..ResourceRequirements::default()
    }
}

/// The Deployment of one track.
pub(crate) fn deployment(plan: &Plan, track: &Track) -> Result<Deployment, ManifestError> {
    let budget = plan.startup_budget()?;

    let no_headroom = plan.gpu.as_ref().is_some_and(|gpu| !gpu.headroom);
    let strategy = if plan.recreate {
        DeploymentStrategy {
            type_: Some("Recreate".to_owned()),
            rolling_update: None,
        }
    } else {
        // Without a spare GPU a surge pod can never schedule: take one old
        // pod down first. With headroom (or on CPU) surge, so capacity never
        // drops during a rollout.
        let (surge, unavailable) = if no_headroom { (0, 1) } else { (1, 0) };
        DeploymentStrategy {
            type_: Some("RollingUpdate".to_owned()),
            rolling_update: Some(RollingUpdateDeployment {
                max_surge: Some(IntOrString::Int(surge)),
                max_unavailable: Some(IntOrString::Int(unavailable)),
            }),
        }
    };

    let selector = plan.selector_labels(track);
    let replicas = match &track.scale {
        Scale::Fixed(n) => Some(i32::try_from(*n).unwrap_or(i32::MAX)),
        Scale::Auto(_) => None,
    };
    let mut meta = plan.metadata(track, &track.name);
    meta.annotations = Some(model_annotations(plan, track));
    Ok(Deployment {
        metadata: meta,
        spec: compat::wrap(DeploymentSpec {
            replicas,
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            strategy: Some(strategy),
            min_ready_seconds: Some(5),
            revision_history_limit: Some(5),
            progress_deadline_seconds: Some(progress_deadline(budget)),
            template: pod_template(plan, track)?,
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    })
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        ..SeccompProfile::default()
    }
}

/// A Service named `name` selecting the pods of one track, on the named
/// port.
pub(crate) fn service(plan: &Plan, track: &Track, name: &str) -> Service {
    Service {
        metadata: plan.metadata(track, name),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(plan.selector_labels(track)),
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.to_owned()),
                port: i32::from(plan.port),
                target_port: Some(IntOrString::String(PORT_NAME.to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The HTTPRoute splitting traffic between the stable and canary Services
/// of a set, attached to `gateway` (name, namespace), `canary_weight`
/// percent to the canary.
pub(crate) fn http_route(
    plan: &Plan,
    gateway: (&str, Option<&str>),
    canary_weight: u16,
    region: Option<&Region>,
) -> HttpRoute {
    let port = i32::from(plan.port);
    let weight = i32::from(canary_weight);
    HttpRoute {
        api_version: "gateway.networking.k8s.io/v1".to_owned(),
        kind: "HTTPRoute".to_owned(),
        metadata: plan.shared_metadata(plan.name.clone(), None, region),
        spec: HttpRouteSpec {
            parent_refs: vec![ParentRef {
                name: gateway.0.to_owned(),
                namespace: gateway.1.map(str::to_owned),
            }],
            rules: vec![HttpRouteRule {
                backend_refs: vec![
                    BackendRef {
                        name: plan.name.clone(),
                        port,
                        weight: 100 - weight,
                    },
                    BackendRef {
                        name: canary_name(&plan.name),
                        port,
                        weight,
                    },
                ],
            }],
        },
    }
}

/// The container's environment: the version this track serves, and candle's
/// thread count where CPU replicas have pools of their own (candle splits its
/// kernels for the count it reads at start).
fn env(plan: &Plan, track: &Track) -> Vec<EnvVar> {
    let var = |name: &str, value: String| EnvVar {
        name: name.to_owned(),
        value: Some(value),
        ..EnvVar::default()
    };
    let mut env = vec![var(ModelInfo::VERSION_ENV, track.model.version.clone())];
    if let Some(threads) = plan.candle_threads {
        env.extend(
            crate::device::CANDLE_THREAD_VARS
                .iter()
                .map(|name| var(name, threads.to_string())),
        );
    }
    env
}
