//! The Deployment (pod template, probes, resources, rollout, security), the
//! Service, and the canary's HTTPRoute.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HTTPGetAction, Lifecycle,
    LifecycleHandler, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec, SleepAction, Toleration,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::builder::{ManifestBuilder, STARTUP_PERIOD_SECS, Track, canary_name};
use super::custom::{BackendRef, HttpRoute, HttpRouteRule, HttpRouteSpec, ParentRef};
use super::error::ManifestError;
use super::settings::{Canary, Region, Scale};
use super::{compat, policy};

/// The name of the container port (and Service port) the application
/// serves requests and probes on.
pub(crate) const PORT_NAME: &str = "http";
/// The container port of the admin listener (probes and metrics), if any.
pub(crate) const ADMIN_PORT_NAME: &str = "admin";
/// The UID and GID the container runs as (non-root, above host UIDs).
const RUN_AS: i64 = 65532;

/// The labels that select a track's pods.
pub(crate) fn selector_labels(
    builder: &ManifestBuilder,
    track: &Track,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), builder.name.clone()),
        ("app.kubernetes.io/instance".to_owned(), track.name.clone()),
    ])
}

/// The labels on every object of a track: the selector labels plus the
/// standard `app.kubernetes.io/*` and model labels.
pub(crate) fn labels(builder: &ManifestBuilder, track: &Track) -> BTreeMap<String, String> {
    let mut labels = selector_labels(builder, track);
    labels.extend([
        (
            "app.kubernetes.io/version".to_owned(),
            track.model.version.clone(),
        ),
        (
            "app.kubernetes.io/component".to_owned(),
            "inference".to_owned(),
        ),
        ("app.kubernetes.io/part-of".to_owned(), builder.name.clone()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "candlewick".to_owned(),
        ),
        ("candlewick.rs/model".to_owned(), track.model.name.clone()),
        (
            "candlewick.rs/model-version".to_owned(),
            track.model.version.clone(),
        ),
        (
            "candlewick.rs/approval".to_owned(),
            track.model.approval.as_str().to_owned(),
        ),
        ("candlewick.rs/track".to_owned(), track.track.to_owned()),
    ]);
    if let Some(region) = &track.region {
        labels.insert("candlewick.rs/region".to_owned(), region.clone());
    }
    if let Some(role) = track.region_role {
        labels.insert("candlewick.rs/region-role".to_owned(), role.to_owned());
    }
    labels
}

/// Metadata of a track's object named `name`.
pub(crate) fn metadata(builder: &ManifestBuilder, track: &Track, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(builder.namespace.clone()),
        labels: Some(labels(builder, track)),
        ..ObjectMeta::default()
    }
}

/// The model's metadata as annotations (values labels cannot hold).
fn model_annotations(builder: &ManifestBuilder, track: &Track) -> BTreeMap<String, String> {
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
        builder.probe_port().1.to_string(),
    );
    annotations.insert(
        "prometheus.io/path".to_owned(),
        builder.metrics_path.clone(),
    );
    annotations
}

fn seconds_i32(duration: std::time::Duration) -> i32 {
    i32::try_from(duration.as_secs()).unwrap_or(i32::MAX)
}

/// The application's port, and the admin listener's if it has one.
pub(crate) fn container_ports(builder: &ManifestBuilder) -> Vec<ContainerPort> {
    let named = |name: &str, port: u16| ContainerPort {
        name: Some(name.to_owned()),
        container_port: i32::from(port),
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    };
    let mut ports = vec![named(PORT_NAME, builder.port)];
    ports.extend(builder.admin_port.map(|port| named(ADMIN_PORT_NAME, port)));
    ports
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

/// The Deployment of one track.
pub(crate) fn deployment(
    builder: &ManifestBuilder,
    track: &Track,
) -> Result<Deployment, ManifestError> {
    let budget = builder.startup_budget()?;
    let startup_period = STARTUP_PERIOD_SECS as i32;
    let startup_failures =
        i32::try_from(budget.as_secs().div_ceil(STARTUP_PERIOD_SECS)).unwrap_or(i32::MAX);
    let grace = builder.termination_grace();
    let (probe_port, _) = builder.probe_port();

    let mut requests = BTreeMap::from([
        (
            "cpu".to_owned(),
            Quantity(builder.resources.cpu_request.clone()),
        ),
        (
            "memory".to_owned(),
            Quantity(builder.resources.memory_request.clone()),
        ),
    ]);
    let mut limits = BTreeMap::from([(
        "memory".to_owned(),
        Quantity(builder.resources.memory_limit.clone()),
    )]);
    if let Some(cpu) = &builder.resources.cpu_limit {
        limits.insert("cpu".to_owned(), Quantity(cpu.clone()));
    }
    let mut node_selector = track.node_labels.clone();
    let mut tolerations = Vec::new();
    if let Some(gpu) = &builder.gpu {
        // Extended resources cannot be overcommitted: limit == request.
        let count = Quantity(gpu.count.to_string());
        requests.insert(gpu.resource.clone(), count.clone());
        limits.insert(gpu.resource.clone(), count);
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

    let container = Container {
        name: "server".to_owned(),
        image: Some(track.image.clone()),
        image_pull_policy: Some("Always".to_owned()),
        // candle splits its kernels for the thread count it reads from the
        // environment: the CPU replicas' own pools, set before the process
        // starts.
        env: builder.candle_threads.map(|threads| {
            crate::device::CANDLE_THREAD_VARS
                .iter()
                .map(|name| EnvVar {
                    name: (*name).to_owned(),
                    value: Some(threads.to_string()),
                    ..EnvVar::default()
                })
                .collect()
        }),
        ports: Some(container_ports(builder)),
        startup_probe: Some(http_probe(
            probe_port,
            &builder.probes.started,
            startup_period,
            2,
            startup_failures,
        )),
        readiness_probe: Some(http_probe(probe_port, &builder.probes.ready, 5, 2, 2)),
        liveness_probe: Some(http_probe(probe_port, &builder.probes.live, 10, 5, 3)),
        resources: Some(ResourceRequirements {
            requests: Some(requests),
            limits: Some(limits),
            ..ResourceRequirements::default()
        }),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: i64::try_from(builder.pre_stop.as_secs()).unwrap_or(i64::MAX),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        security_context: Some(SecurityContext {
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
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "tmp".to_owned(),
            mount_path: "/tmp".to_owned(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };

    let selector = selector_labels(builder, track);
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
        affinity: policy::affinity(builder, &selector),
        topology_spread_constraints: Some(policy::spread(builder, &selector)),
        volumes: Some(vec![Volume {
            name: "tmp".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        }]),
        ..PodSpec::default()
    };

    let no_headroom = builder.gpu.as_ref().is_some_and(|gpu| !gpu.headroom);
    let strategy = if builder.recreate {
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

    let mut pod_labels = labels(builder, track);
    pod_labels.extend(selector.clone());
    let replicas = match &track.scale {
        Scale::Fixed(n) => Some(i32::try_from(*n).unwrap_or(i32::MAX)),
        Scale::Auto(_) => None,
    };
    let mut meta = metadata(builder, track, &track.name);
    meta.annotations = Some(model_annotations(builder, track));
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
            progress_deadline_seconds: Some(seconds_i32(budget).saturating_add(120).max(600)),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(model_annotations(builder, track)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
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

/// The Service of one track, on the named port.
pub(crate) fn service(builder: &ManifestBuilder, track: &Track) -> Service {
    Service {
        metadata: metadata(builder, track, &track.name),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(selector_labels(builder, track)),
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.to_owned()),
                port: i32::from(builder.port),
                target_port: Some(IntOrString::String(PORT_NAME.to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The HTTPRoute splitting traffic between the stable and canary Services.
pub(crate) fn http_route(
    builder: &ManifestBuilder,
    canary: &Canary,
    region: Option<&Region>,
) -> HttpRoute {
    let mut labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), builder.name.clone()),
        ("app.kubernetes.io/part-of".to_owned(), builder.name.clone()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "candlewick".to_owned(),
        ),
    ]);
    if let Some(region) = region {
        labels.insert("candlewick.rs/region".to_owned(), region.name.clone());
    }
    let port = i32::from(builder.port);
    let weight = i32::from(canary.weight);
    HttpRoute {
        api_version: "gateway.networking.k8s.io/v1".to_owned(),
        kind: "HTTPRoute".to_owned(),
        metadata: ObjectMeta {
            name: Some(builder.name.clone()),
            namespace: Some(builder.namespace.clone()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: HttpRouteSpec {
            parent_refs: vec![ParentRef {
                name: canary.gateway.clone(),
                namespace: canary.gateway_namespace.clone(),
            }],
            rules: vec![HttpRouteRule {
                backend_refs: vec![
                    BackendRef {
                        name: builder.name.clone(),
                        port,
                        weight: 100 - weight,
                    },
                    BackendRef {
                        name: canary_name(&builder.name),
                        port,
                        weight,
                    },
                ],
            }],
        },
    }
}
