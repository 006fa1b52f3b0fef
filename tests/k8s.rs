//! The Kubernetes objects: derived values, structure, lints, and the real
//! schemas (kubernetes-validate, checkov) when those tools are installed.
//!
//! Objects are inspected through their JSON form, so these tests build
//! against every `k8s-openapi` version feature (some fields change
//! optionality between Kubernetes versions).
#![cfg(feature = "k8s")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use candle_core::DeviceLocation;
use candlewick::health::ProbePaths;
use candlewick::k8s::{
    AnalysisTemplate, Autoscaling, Canary, CanaryRollout, Disruption, GpuPool, HttpRoute,
    ManifestBuilder, ManifestError, Manifests, ModelVolume, Object, Region, RegionMode, Rollout,
    ScaleMetric, ScaledObject, Spread,
};
use candlewick::metrics::names;
use candlewick::pool::PoolConfig;
use candlewick::{ModelInfo, ServingConfig};
use serde_json::{Value, json};
use std::num::NonZeroUsize;

const IMAGE: &str =
    "ghcr.io/acme/embedder@sha256:4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945";

fn config() -> ServingConfig {
    ServingConfig::default()
        .with_model(ModelInfo::new("minilm", "v1"))
        .with_probes(ProbePaths::new(
            "/health/live",
            "/health/ready",
            "/health/started",
        ))
}

fn builder() -> ManifestBuilder {
    ManifestBuilder::new(&config(), "embedder", IMAGE)
        .with_namespace("ml")
        .with_port(9000)
        .with_drain_timeout(Duration::from_secs(45))
        .with_load_time(Duration::from_secs(90))
}

fn autoscaled() -> ManifestBuilder {
    builder().with_autoscaling(Autoscaling::new(2, 10).with_metrics(vec![
        ScaleMetric::QueueDepth { per_pod: 16.0 },
        ScaleMetric::InFlight { per_pod: 32.0 },
        ScaleMetric::RequestsPerSecond { per_pod: 100.0 },
        ScaleMetric::P99Latency { seconds: 0.25 },
        ScaleMetric::Cpu { utilization: 80 },
    ]))
}

fn gpu() -> GpuPool {
    GpuPool::nvidia(2).with_node_label("cloud.google.com/gke-accelerator", "nvidia-l4")
}

fn canary() -> Canary {
    Canary::new(ModelInfo::new("minilm", "v2"), IMAGE, 10, "public")
}

fn canary_rollout() -> CanaryRollout {
    CanaryRollout::new("public", "http://prometheus.monitoring.svc:9090")
        .with_gateway_namespace("gateways")
        .with_steps([5, 20, 60])
        .with_measurements(Duration::from_secs(30), 4)
        .with_max_error_ratio_increase(0.02)
        .with_max_latency_ratio(1.5)
}

/// Kinds the Kubernetes API server knows without CRDs.
fn is_builtin(kind: &str) -> bool {
    !matches!(
        kind,
        "ScaledObject" | "HTTPRoute" | "Rollout" | "AnalysisTemplate"
    )
}

/// Every layout the example generates, by name.
fn layouts() -> Vec<(&'static str, Manifests)> {
    let keda = |b: ManifestBuilder| {
        b.with_autoscaling(
            Autoscaling::new(2, 10)
                .with_metrics(vec![
                    ScaleMetric::QueueDepth { per_pod: 16.0 },
                    ScaleMetric::RequestsPerSecond { per_pod: 100.0 },
                    ScaleMetric::P99Latency { seconds: 0.25 },
                    ScaleMetric::Memory { utilization: 90 },
                ])
                .with_keda("http://prometheus.monitoring.svc:9090"),
        )
    };
    let regions = vec![
        Region::new("europe-west4").with_min_replicas(3),
        Region::new("us-central1").with_node_label("pool", "l4-us"),
    ];
    let passive = RegionMode::ActivePassive {
        active: "europe-west4".to_owned(),
        warm_replicas: 1,
    };
    vec![
        ("cpu", builder().build().unwrap()),
        ("cpu-hpa", autoscaled().build().unwrap()),
        (
            "cpu-admin-port",
            autoscaled()
                .with_admin_port(Some(8081))
                .with_metrics_namespaces(["monitoring"])
                .build()
                .unwrap(),
        ),
        ("gpu", autoscaled().with_gpu(gpu()).build().unwrap()),
        (
            "gpu-spread",
            autoscaled()
                .with_gpu(gpu())
                .with_spread(
                    Spread::default()
                        .with_zones(["europe-west4-a", "europe-west4-b"])
                        .with_strict_zones(true)
                        .with_anti_affinity(true),
                )
                .build()
                .unwrap(),
        ),
        (
            "multi-region",
            autoscaled()
                .with_gpu(gpu())
                .with_regions(regions.clone(), passive)
                .build()
                .unwrap(),
        ),
        (
            "canary",
            autoscaled().with_canary(canary()).build().unwrap(),
        ),
        ("keda", keda(builder()).build().unwrap()),
        (
            "keda-multi-region-canary",
            keda(builder())
                .with_regions(regions.clone(), RegionMode::ActiveActive)
                .with_canary(canary())
                .build()
                .unwrap(),
        ),
        (
            "rollout",
            autoscaled()
                .with_canary_rollout(canary_rollout())
                .build()
                .unwrap(),
        ),
        (
            "rollout-keda-multi-region",
            keda(builder())
                .with_regions(regions, RegionMode::ActiveActive)
                .with_canary_rollout(canary_rollout())
                .build()
                .unwrap(),
        ),
        (
            "model-claim",
            builder()
                .with_model_volume(ModelVolume::claim("minilm-weights"))
                .with_args(["--model-dir", "/models"])
                .build()
                .unwrap(),
        ),
        (
            "model-init-container",
            autoscaled()
                .with_gpu(gpu())
                .with_model_volume(ModelVolume::init_container(
                    IMAGE,
                    ["/bin/fetch-model", "/models"],
                ))
                .with_args(["--model-dir", "/models"])
                .build()
                .unwrap(),
        ),
    ]
}

fn json_of(object: &Object) -> Value {
    serde_json::to_value(object).unwrap()
}

fn of_kind(manifests: &Manifests, kind: &str) -> Vec<Value> {
    manifests
        .objects()
        .filter(|o| o.kind() == kind)
        .map(json_of)
        .collect()
}

fn container(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

/// Replaces the first object of `kind` by `edit` of its JSON form.
fn edit_object(manifests: &mut Manifests, kind: &str, edit: &dyn Fn(&mut Value)) {
    let object = manifests.sets[0]
        .objects
        .iter_mut()
        .find(|o| o.kind() == kind)
        .unwrap();
    let mut value = json_of(object);
    edit(&mut value);
    *object = match object {
        Object::Deployment(_) => {
            Object::Deployment(Box::new(serde_json::from_value(value).unwrap()))
        }
        Object::Service(_) => Object::Service(Box::new(serde_json::from_value(value).unwrap())),
        Object::PodDisruptionBudget(_) => {
            Object::PodDisruptionBudget(Box::new(serde_json::from_value(value).unwrap()))
        }
        Object::HorizontalPodAutoscaler(_) => {
            Object::HorizontalPodAutoscaler(Box::new(serde_json::from_value(value).unwrap()))
        }
        _ => unreachable!("not edited by these tests"),
    };
}

// ---- derived values ----------------------------------------------------

#[test]
fn startup_budget_is_load_time_plus_margin_in_whole_probe_periods() {
    let b = builder().with_load_time(Duration::from_secs(90));
    assert_eq!(b.startup_budget().unwrap(), Duration::from_secs(135));
    let b = builder().with_load_time(Duration::from_millis(10_500));
    // 10.5 s + at least 30 s, rounded up to 5 s periods.
    assert_eq!(b.startup_budget().unwrap(), Duration::from_secs(45));

    let manifests = builder().build().unwrap();
    let deployment = &of_kind(&manifests, "Deployment")[0];
    let probe = &container(deployment)["startupProbe"];
    let budget =
        probe["periodSeconds"].as_i64().unwrap() * probe["failureThreshold"].as_i64().unwrap();
    assert!(
        budget >= 135,
        "startup budget {budget} s below load time + margin"
    );
    assert!(
        deployment["spec"]["progressDeadlineSeconds"]
            .as_i64()
            .unwrap()
            > budget
    );
}

#[test]
fn grace_period_covers_pre_stop_and_drain() {
    let b = builder().with_pre_stop(Duration::from_secs(7));
    assert_eq!(b.termination_grace(), Duration::from_secs(7 + 45 + 5));
    let manifests = b.build().unwrap();
    let deployment = &of_kind(&manifests, "Deployment")[0];
    let pre_stop = container(deployment)["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_i64()
        .unwrap();
    let grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_i64()
        .unwrap();
    assert_eq!(pre_stop, 7);
    assert!(grace >= pre_stop + 45);
}

#[test]
fn durations_too_large_for_kubernetes_saturate_instead_of_overflowing() {
    let b = builder()
        .with_pre_stop(Duration::MAX)
        .with_drain_timeout(Duration::MAX)
        .with_load_time(Duration::MAX);
    assert_eq!(b.termination_grace(), Duration::from_secs(u64::MAX));
    assert!(b.startup_budget().unwrap() >= Duration::from_secs(u64::MAX / 2));
    // A load time past what a probe can express is refused, with the reason.
    let err = b.build().unwrap_err();
    assert!(
        matches!(err, ManifestError::StartupBudgetTooShort { .. }),
        "{err}"
    );
    // So is a drain no grace period can cover.
    let err = builder()
        .with_drain_timeout(Duration::MAX)
        .build()
        .unwrap_err();
    assert!(
        matches!(err, ManifestError::GracePeriodTooShort { .. }),
        "{err}"
    );
}

#[test]
fn candle_computes_at_the_cpu_replicas_parallelism_set_before_the_process_starts() {
    let env_of = |config: &ServingConfig| {
        let manifests = ManifestBuilder::new(config, "embedder", IMAGE)
            .with_load_time(Duration::from_secs(90))
            .build()
            .unwrap();
        container(&of_kind(&manifests, "Deployment")[0])["env"].clone()
    };
    let mut cpu = config();
    cpu.pool = PoolConfig::default().with_cpu_threads_per_replica(NonZeroUsize::new(2));
    let version = json!({"name": "CANDLEWICK_MODEL_VERSION", "value": config().model.version});
    assert_eq!(
        env_of(&cpu),
        json!([
            version,
            {"name": "RAYON_NUM_THREADS", "value": "2"},
            {"name": "CANDLE_NUM_THREADS", "value": "2"},
        ])
    );
    // Replicas sharing rayon's global pool, or on GPUs only: nothing to set.
    assert_eq!(env_of(&config()), json!([version]));
    let mut gpu = config();
    gpu.pool = PoolConfig::default()
        .with_devices(vec![DeviceLocation::Cuda { gpu_id: 0 }])
        .with_cpu_threads_per_replica(NonZeroUsize::new(2));
    assert_eq!(env_of(&gpu), json!([version]));
}

#[test]
fn each_track_tells_its_server_the_model_version_it_serves() {
    let manifests = builder().with_canary(canary()).build().unwrap();
    let versions: Vec<(String, Value)> = of_kind(&manifests, "Deployment")
        .iter()
        .map(|deployment| {
            let name = deployment["metadata"]["name"].as_str().unwrap().to_owned();
            let env = container(deployment)["env"].as_array().unwrap().clone();
            let version = env
                .iter()
                .find(|var| var["name"] == candlewick::ModelInfo::VERSION_ENV)
                .map(|var| var["value"].clone())
                .unwrap_or(Value::Null);
            (name, version)
        })
        .collect();
    assert_eq!(
        versions,
        [
            ("embedder".to_owned(), json!(config().model.version)),
            ("embedder-canary".to_owned(), json!("v2")),
        ]
    );
    assert_ne!(config().model.version, "v2");
}

#[test]
fn with_an_admin_listener_probes_and_scrapes_go_to_the_admin_port() {
    let manifests = ManifestBuilder::new(&config().with_admin_port(Some(8081)), "embedder", IMAGE)
        .with_port(9000)
        .with_load_time(Duration::from_secs(90))
        .build()
        .unwrap();
    let deployment = &of_kind(&manifests, "Deployment")[0];
    let c = container(deployment);
    assert_eq!(
        c["ports"],
        json!([
            {"name": "http", "containerPort": 9000, "protocol": "TCP"},
            {"name": "admin", "containerPort": 8081, "protocol": "TCP"},
        ])
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["port"], "admin", "{probe}");
    }
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], "8081");
    // The Service carries requests only.
    let service = &of_kind(&manifests, "Service")[0];
    assert_eq!(service["spec"]["ports"].as_array().unwrap().len(), 1);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    // Prometheus may reach the admin port.
    let policy = &of_kind(&manifests, "NetworkPolicy")[0];
    let ports: Vec<&Value> = policy["spec"]["ingress"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["port"])
        .collect();
    assert_eq!(ports, [&json!("http"), &json!("admin")]);
}

#[test]
fn named_metrics_namespaces_alone_may_reach_the_admin_port() {
    let ingress = |admin_port| {
        let manifests =
            ManifestBuilder::new(&config().with_admin_port(admin_port), "embedder", IMAGE)
                .with_metrics_namespaces(["monitoring"])
                .with_load_time(Duration::from_secs(90))
                .build()
                .unwrap();
        of_kind(&manifests, "NetworkPolicy")[0]["spec"]["ingress"].clone()
    };
    assert_eq!(
        ingress(Some(8081)),
        json!([
            {"ports": [{"port": "http", "protocol": "TCP"}]},
            {
                "ports": [{"port": "admin", "protocol": "TCP"}],
                "from": [{"namespaceSelector": {"matchExpressions": [{
                    "key": "kubernetes.io/metadata.name",
                    "operator": "In",
                    "values": ["monitoring"],
                }]}}],
            },
        ])
    );
    // Without an admin port, probes and metrics share the request port:
    // nothing to keep apart.
    assert_eq!(
        ingress(None),
        json!([{"ports": [{"port": "http", "protocol": "TCP"}]}])
    );
}

#[test]
fn probes_use_the_serving_config_paths_on_the_named_port() {
    for (layout, manifests) in layouts() {
        for deployment in of_kind(&manifests, "Deployment") {
            let c = container(&deployment);
            assert_eq!(
                c["ports"][0],
                json!({"name": "http", "containerPort": 9000, "protocol": "TCP"})
            );
            for (probe, path) in [
                ("startupProbe", "/health/started"),
                ("readinessProbe", "/health/ready"),
                ("livenessProbe", "/health/live"),
            ] {
                assert_eq!(c[probe]["httpGet"]["path"], path, "{layout} {probe}");
                let port = if layout.contains("admin") {
                    "admin"
                } else {
                    "http"
                };
                assert_eq!(c[probe]["httpGet"]["port"], port, "{layout} {probe}");
            }
        }
        for service in of_kind(&manifests, "Service") {
            assert_eq!(service["spec"]["ports"][0]["name"], "http");
            assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
            assert_eq!(service["spec"]["ports"][0]["port"], 9000);
        }
    }
}

#[test]
fn hpa_metric_names_are_the_names_the_process_emits() {
    let manifests = autoscaled().build().unwrap();
    let hpa = &of_kind(&manifests, "HorizontalPodAutoscaler")[0];
    let pods: Vec<&str> = hpa["spec"]["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["type"] == "Pods")
        .map(|m| m["pods"]["metric"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        pods,
        [
            names::QUEUE_DEPTH,
            names::IN_FLIGHT,
            "candlewick_requests_per_second",
            "candlewick_request_duration_seconds_p99",
        ]
    );
    assert_eq!(ScaleMetric::exported_names(), pods);
    assert_eq!(
        hpa["spec"]["metrics"][3]["pods"]["target"]["averageValue"],
        "250m"
    );
    assert!(hpa["spec"]["behavior"]["scaleUp"].is_object());
    assert!(hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"].is_number());

    // The adapter rules expose exactly those series, with the right PromQL.
    let rules = of_kind(&manifests, "ConfigMap");
    let config = rules[0]["data"]["config.yaml"].as_str().unwrap();
    for name in &pods {
        assert!(config.contains(&format!("as: {name}")), "{config}");
    }
    assert_eq!(config.matches("seriesQuery").count(), pods.len());
    assert!(config.contains("sum(rate(<<.Series>>{<<.LabelMatchers>>}[2m])) by (<<.GroupBy>>)"));
    assert!(config.contains("candlewick_request_duration_seconds_bucket"));
    assert!(config.contains(
        "histogram_quantile(0.99, sum(rate(<<.Series>>{<<.LabelMatchers>>}[2m])) by (le, <<.GroupBy>>))"
    ));
}

// ---- structure ---------------------------------------------------------

#[test]
fn every_selector_matches_exactly_its_own_pods() {
    for (layout, manifests) in layouts() {
        for set in &manifests.sets {
            let pods: Vec<(String, Value, Value)> = set
                .objects
                .iter()
                .filter(|o| matches!(o.kind(), "Deployment" | "Rollout"))
                .map(json_of)
                .map(|d| {
                    (
                        d["metadata"]["name"].as_str().unwrap().to_owned(),
                        d["spec"]["selector"]["matchLabels"].clone(),
                        d["spec"]["template"]["metadata"]["labels"].clone(),
                    )
                })
                .collect();
            let selects = |selector: &Value, labels: &Value| {
                selector
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| labels.get(k) == Some(v))
            };
            for (name, selector, labels) in &pods {
                assert!(
                    selects(selector, labels),
                    "{layout}: {name} selects its pods"
                );
            }
            for object in set.objects.iter().map(json_of) {
                let selector = match object["kind"].as_str().unwrap() {
                    "Service" => object["spec"]["selector"].clone(),
                    "PodDisruptionBudget" => object["spec"]["selector"]["matchLabels"].clone(),
                    "NetworkPolicy" => object["spec"]["podSelector"]["matchLabels"].clone(),
                    _ => continue,
                };
                let matched: Vec<&String> = pods
                    .iter()
                    .filter(|(_, _, labels)| selects(&selector, labels))
                    .map(|(name, _, _)| name)
                    .collect();
                // A Rollout's canary Service selects the Rollout's pods (Argo
                // narrows it to the canary's during a rollout).
                let name = object["metadata"]["name"].as_str().unwrap();
                let owner = name
                    .strip_suffix("-canary")
                    .filter(|stable| {
                        set.objects
                            .iter()
                            .any(|o| o.id() == format!("Rollout/{stable}"))
                    })
                    .unwrap_or(name);
                assert_eq!(matched, [owner], "{layout}");
            }
        }
    }
}

#[test]
fn replicas_are_absent_when_an_autoscaler_owns_scale() {
    let fixed = builder().with_replicas(3).build().unwrap();
    assert_eq!(of_kind(&fixed, "Deployment")[0]["spec"]["replicas"], 3);
    assert!(of_kind(&fixed, "HorizontalPodAutoscaler").is_empty());
    for (layout, manifests) in layouts().into_iter().filter(|(l, _)| *l != "cpu") {
        let scaled: Vec<String> = manifests
            .objects()
            .filter(|o| matches!(o.kind(), "HorizontalPodAutoscaler" | "ScaledObject"))
            .map(|o| o.metadata().name.clone().unwrap())
            .collect();
        for deployment in of_kind(&manifests, "Deployment") {
            let name = deployment["metadata"]["name"].as_str().unwrap().to_owned();
            assert_eq!(
                deployment["spec"].get("replicas").is_none(),
                scaled.contains(&name),
                "{layout}: {name}"
            );
        }
    }
}

#[test]
fn keda_replaces_the_hpa_and_round_trips() {
    let (_, manifests) = layouts().into_iter().find(|(l, _)| *l == "keda").unwrap();
    assert!(of_kind(&manifests, "HorizontalPodAutoscaler").is_empty());
    assert!(of_kind(&manifests, "ConfigMap").is_empty());
    let objects: Vec<&Object> = manifests
        .objects()
        .filter(|o| o.kind() == "ScaledObject")
        .collect();
    assert_eq!(objects.len(), 1);
    let value = json_of(objects[0]);
    let back: ScaledObject = serde_json::from_value(value.clone()).unwrap();
    assert_eq!(serde_json::to_value(&back).unwrap(), value);
    assert_eq!(value["apiVersion"], "keda.sh/v1alpha1");
    let triggers = value["spec"]["triggers"].as_array().unwrap();
    assert_eq!(
        triggers[0]["metadata"]["query"],
        "sum(candlewick_queue_depth{namespace=\"ml\",model=\"minilm\",version=\"v1\"})"
    );
    assert_eq!(
        triggers[1]["metadata"]["query"],
        "sum(rate(candlewick_requests_total{namespace=\"ml\",model=\"minilm\",version=\"v1\"}[2m]))"
    );
    assert_eq!(triggers[2]["metricType"], "Value");
    assert!(
        triggers[2]["metadata"]["query"]
            .as_str()
            .unwrap()
            .starts_with(
                "histogram_quantile(0.99, sum(rate(candlewick_request_duration_seconds_bucket{"
            )
    );
    assert_eq!(triggers[3]["type"], "memory");
}

#[test]
fn gpu_pods_request_what_they_limit_and_roll_out_without_a_spare_gpu() {
    let manifests = autoscaled().with_gpu(gpu()).build().unwrap();
    let deployment = &of_kind(&manifests, "Deployment")[0];
    let resources = &container(deployment)["resources"];
    assert_eq!(resources["limits"]["nvidia.com/gpu"], "2");
    assert_eq!(resources["requests"]["nvidia.com/gpu"], "2");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        pod["nodeSelector"]["cloud.google.com/gke-accelerator"],
        "nvidia-l4"
    );
    assert_eq!(pod["tolerations"][0]["key"], "nvidia.com/gpu");
    assert_eq!(
        deployment["spec"]["strategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}})
    );

    let headroom = builder()
        .with_gpu(gpu().with_headroom(true))
        .build()
        .unwrap();
    let strategy = &of_kind(&headroom, "Deployment")[0]["spec"]["strategy"];
    assert_eq!(strategy["rollingUpdate"]["maxSurge"], 1);
    let recreate = builder()
        .with_gpu(gpu())
        .with_recreate(true)
        .build()
        .unwrap();
    assert_eq!(
        of_kind(&recreate, "Deployment")[0]["spec"]["strategy"]["type"],
        "Recreate"
    );
}

#[test]
fn pods_are_hardened_and_spread() {
    for (layout, manifests) in layouts() {
        for deployment in of_kind(&manifests, "Deployment") {
            let c = container(&deployment);
            let sc = &c["securityContext"];
            assert_eq!(sc["runAsNonRoot"], true, "{layout}");
            assert_eq!(sc["readOnlyRootFilesystem"], true);
            assert_eq!(sc["allowPrivilegeEscalation"], false);
            assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
            assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
            let spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
                .as_array()
                .unwrap();
            let keys: Vec<&str> = spread
                .iter()
                .map(|s| s["topologyKey"].as_str().unwrap())
                .collect();
            assert_eq!(
                keys,
                ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
            );
            assert!(
                spread
                    .iter()
                    .all(|s| s["matchLabelKeys"] == json!(["pod-template-hash"]))
            );
        }
        for pdb in of_kind(&manifests, "PodDisruptionBudget") {
            assert_eq!(pdb["spec"]["maxUnavailable"], 1, "{layout}");
            assert!(pdb["spec"].get("minAvailable").is_none());
            assert_eq!(pdb["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow");
        }
    }
    let min = builder()
        .with_disruption(Disruption::MinAvailable(1))
        .build()
        .unwrap();
    let pdb = &of_kind(&min, "PodDisruptionBudget")[0];
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert!(pdb["spec"].get("maxUnavailable").is_none());
}

#[test]
fn a_passive_region_keeps_a_warm_minimum_and_regions_pin_their_nodes() {
    let (_, manifests) = layouts()
        .into_iter()
        .find(|(l, _)| *l == "multi-region")
        .unwrap();
    assert_eq!(manifests.sets.len(), 2);
    let min_replicas = |set: usize| {
        manifests.sets[set]
            .objects
            .iter()
            .find(|o| o.kind() == "HorizontalPodAutoscaler")
            .map(json_of)
            .unwrap()["spec"]["minReplicas"]
            .clone()
    };
    assert_eq!(manifests.sets[0].region.as_deref(), Some("europe-west4"));
    assert_eq!(min_replicas(0), 3, "the active region's floor");
    assert_eq!(min_replicas(1), 1, "the passive region's warm minimum");
    let deployment = json_of(&manifests.sets[1].objects[0]);
    let node_selector = &deployment["spec"]["template"]["spec"]["nodeSelector"];
    assert_eq!(
        node_selector["topology.kubernetes.io/region"],
        "us-central1"
    );
    assert_eq!(node_selector["pool"], "l4-us");
    assert_eq!(
        deployment["metadata"]["labels"]["candlewick.rs/region-role"],
        "passive"
    );
}

#[test]
fn a_canary_gets_its_own_track_and_a_weighted_route() {
    let manifests = autoscaled().with_canary(canary()).build().unwrap();
    let deployments = of_kind(&manifests, "Deployment");
    let names: Vec<&str> = deployments
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["embedder", "embedder-canary"]);
    assert_eq!(
        deployments[1]["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/version"],
        "v2"
    );
    assert_eq!(deployments[1]["spec"]["replicas"], 1);
    let route = manifests
        .objects()
        .find(|o| o.kind() == "HTTPRoute")
        .unwrap();
    let value = json_of(route);
    let back: HttpRoute = serde_json::from_value(value.clone()).unwrap();
    assert_eq!(serde_json::to_value(&back).unwrap(), value);
    assert_eq!(
        value["spec"]["rules"][0]["backendRefs"],
        json!([
            {"name": "embedder", "port": 9000, "weight": 90},
            {"name": "embedder-canary", "port": 9000, "weight": 10},
        ])
    );
    assert_eq!(value["spec"]["parentRefs"], json!([{"name": "public"}]));
}

#[test]
fn a_canary_rollout_replaces_the_deployment_and_promotes_step_by_step_on_metrics() {
    let manifests = autoscaled()
        .with_canary_rollout(canary_rollout())
        .build()
        .unwrap();
    let kinds: Vec<String> = manifests.objects().map(Object::id).collect();
    assert_eq!(
        kinds,
        [
            "Rollout/embedder",
            "Service/embedder",
            "Service/embedder-canary",
            "PodDisruptionBudget/embedder",
            "NetworkPolicy/embedder",
            "HorizontalPodAutoscaler/embedder",
            "HTTPRoute/embedder",
            "AnalysisTemplate/embedder-canary-analysis",
            "ConfigMap/embedder-adapter-rules",
        ]
    );
    let rollout = &of_kind(&manifests, "Rollout")[0];
    let back: Rollout = serde_json::from_value(rollout.clone()).unwrap();
    assert_eq!(&serde_json::to_value(&back).unwrap(), rollout);
    // The pods are the Deployment's would-be pods: same probes, hardening.
    let deployment = &of_kind(&builder().build().unwrap(), "Deployment")[0];
    assert_eq!(
        container(rollout)["securityContext"],
        container(deployment)["securityContext"]
    );
    assert_eq!(rollout["spec"].get("replicas"), None, "the HPA owns scale");
    let hpa = &of_kind(&manifests, "HorizontalPodAutoscaler")[0];
    assert_eq!(
        hpa["spec"]["scaleTargetRef"],
        json!({"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout", "name": "embedder"})
    );
    let canary = &rollout["spec"]["strategy"]["canary"];
    assert_eq!(canary["stableService"], "embedder");
    assert_eq!(canary["canaryService"], "embedder-canary");
    assert_eq!(
        canary["trafficRouting"]["plugins"]["argoproj-labs/gatewayAPI"],
        json!({"httpRoute": "embedder", "namespace": "ml"})
    );
    // Each weight is followed by an analysis of the version these
    // manifests declare; promotion comes after the last.
    let steps = canary["steps"].as_array().unwrap();
    let weights: Vec<&Value> = steps.iter().step_by(2).map(|s| &s["setWeight"]).collect();
    assert_eq!(weights, [&json!(5), &json!(20), &json!(60)]);
    for analysis in steps.iter().skip(1).step_by(2) {
        assert_eq!(
            analysis["analysis"],
            json!({
                "templates": [{"templateName": "embedder-canary-analysis"}],
                "args": [
                    {"name": "namespace", "value": "ml"},
                    {"name": "model", "value": "minilm"},
                    {"name": "canary-version", "value": "v1"},
                ],
            })
        );
    }
    // The route starts with everything on the stable Service.
    let route = &of_kind(&manifests, "HTTPRoute")[0];
    assert_eq!(
        route["spec"]["rules"][0]["backendRefs"],
        json!([
            {"name": "embedder", "port": 9000, "weight": 100},
            {"name": "embedder-canary", "port": 9000, "weight": 0},
        ])
    );
    assert_eq!(
        route["spec"]["parentRefs"],
        json!([{"name": "public", "namespace": "gateways"}])
    );
}

#[test]
fn the_analysis_compares_canary_and_stable_by_version_on_the_metrics_the_process_emits() {
    let manifests = autoscaled()
        .with_canary_rollout(canary_rollout())
        .build()
        .unwrap();
    let template = &of_kind(&manifests, "AnalysisTemplate")[0];
    let back: AnalysisTemplate = serde_json::from_value(template.clone()).unwrap();
    assert_eq!(&serde_json::to_value(&back).unwrap(), template);
    let metrics = template["spec"]["metrics"].as_array().unwrap();
    let by_name = |name: &str| metrics.iter().find(|m| m["name"] == name).unwrap();

    let errors = by_name("error-ratio-increase");
    let query = errors["provider"]["prometheus"]["query"].as_str().unwrap();
    assert_eq!(
        errors["provider"]["prometheus"]["address"],
        "http://prometheus.monitoring.svc:9090"
    );
    assert_eq!(query.matches(names::REQUESTS).count(), 4, "{query}");
    assert_eq!(
        query
            .matches(r#"version="{{args.canary-version}}""#)
            .count(),
        2
    );
    assert_eq!(
        query
            .matches(r#"version!="{{args.canary-version}}""#)
            .count(),
        2
    );
    assert_eq!(query.matches("outcome=~").count(), 2);
    assert!(query.contains(r#"namespace="{{args.namespace}}",model="{{args.model}}""#));
    assert_eq!(
        errors["successCondition"],
        "!isNaN(result[0]) && result[0] <= 0.02"
    );

    let latency = by_name("p99-latency-ratio");
    let query = latency["provider"]["prometheus"]["query"].as_str().unwrap();
    let bucket = format!("{}_bucket", names::REQUEST_DURATION);
    assert_eq!(query.matches(&bucket).count(), 2, "{query}");
    assert_eq!(
        query
            .matches("histogram_quantile(0.99, sum by (le) (rate(")
            .count(),
        2
    );
    assert_eq!(
        latency["successCondition"],
        "!isNaN(result[0]) && result[0] <= 1.5"
    );
    for metric in metrics {
        assert_eq!(metric["interval"], "30s");
        assert_eq!(metric["count"], 4);
        assert_eq!(metric["failureLimit"], 0);
    }
    let args: Vec<&Value> = template["spec"]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["name"])
        .collect();
    assert_eq!(
        args,
        [
            &json!("namespace"),
            &json!("model"),
            &json!("canary-version")
        ]
    );
}

#[test]
fn mounted_weights_are_read_only_and_readable_by_the_image_user() {
    let manifests = builder()
        .with_model_volume(ModelVolume::claim("minilm-weights"))
        .with_args(["--model-dir", "/models"])
        .build()
        .unwrap();
    let deployment = &of_kind(&manifests, "Deployment")[0];
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        container(deployment)["args"],
        json!(["--model-dir", "/models"])
    );
    assert_eq!(
        container(deployment)["volumeMounts"],
        json!([
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "model", "mountPath": "/models", "readOnly": true},
        ])
    );
    assert_eq!(
        pod["volumes"][1],
        json!({"name": "model", "persistentVolumeClaim": {"claimName": "minilm-weights", "readOnly": true}})
    );
    assert_eq!(pod["securityContext"]["fsGroup"], 65532);

    // An init container fills an emptyDir, as hardened as the server.
    let manifests = builder()
        .with_model_volume(
            ModelVolume::init_container(IMAGE, ["/bin/fetch-model", "/weights"])
                .with_mount_path("/weights"),
        )
        .build()
        .unwrap();
    let deployment = &of_kind(&manifests, "Deployment")[0];
    let pod = &deployment["spec"]["template"]["spec"];
    let init = &pod["initContainers"][0];
    assert_eq!(init["command"], json!(["/bin/fetch-model", "/weights"]));
    assert_eq!(
        init["securityContext"],
        container(deployment)["securityContext"]
    );
    assert_eq!(
        init["volumeMounts"][1],
        json!({"name": "model", "mountPath": "/weights"})
    );
    assert_eq!(pod["volumes"][1], json!({"name": "model", "emptyDir": {}}));
    assert_eq!(
        container(deployment)["volumeMounts"][1],
        json!({"name": "model", "mountPath": "/weights", "readOnly": true})
    );
}

#[test]
fn the_pods_run_as_the_image_user_on_a_read_only_root() {
    // The image's user is 65532:65532, and it writes nothing outside /tmp
    // (.ci/check_image.py runs it so, with these manifests' arguments).
    for (layout, manifests) in layouts() {
        for object in manifests.objects() {
            let value = json_of(object);
            let template = match object.kind() {
                "Deployment" | "Rollout" => &value["spec"]["template"]["spec"],
                _ => continue,
            };
            let security = &container(&value)["securityContext"];
            assert_eq!(security["runAsUser"], 65532, "{layout}");
            assert_eq!(security["runAsGroup"], 65532, "{layout}");
            assert_eq!(security["readOnlyRootFilesystem"], true, "{layout}");
            assert_eq!(template["securityContext"]["fsGroup"], 65532, "{layout}");
            assert_eq!(
                container(&value)["volumeMounts"][0],
                json!({"name": "tmp", "mountPath": "/tmp"}),
                "{layout}"
            );
        }
    }
}

#[test]
fn output_is_yaml_documents_and_a_json_list() {
    let manifests = autoscaled().build().unwrap();
    let yaml = manifests.to_yaml().unwrap();
    let count = manifests.objects().count();
    assert_eq!(yaml.matches("\n---\n").count() + 1, count, "{yaml}");
    assert!(yaml.starts_with("apiVersion: apps/v1\nkind: Deployment\n"));
    let list: Value = serde_json::from_str(&manifests.to_json().unwrap()).unwrap();
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"].as_array().unwrap().len(), count);
}

// ---- lints -------------------------------------------------------------

#[test]
fn lints_refuse_settings_that_cannot_work() {
    let err = |b: ManifestBuilder| b.build().unwrap_err();
    assert!(matches!(
        err(ManifestBuilder::new(&config(), "embedder", IMAGE)),
        ManifestError::Invalid {
            field: "load_time",
            ..
        }
    ));
    assert!(matches!(
        err(builder().with_startup_budget(Duration::from_secs(60))),
        ManifestError::StartupBudgetTooShort { .. }
    ));
    assert!(matches!(
        err(builder().with_termination_grace(Duration::from_secs(30))),
        ManifestError::GracePeriodTooShort { .. }
    ));
    let unknown = err(
        builder().with_autoscaling(Autoscaling::new(1, 3).with_metrics(vec![ScaleMetric::Pods {
            name: "http_requests".to_owned(),
            per_pod: 1.0,
        }])),
    );
    assert_eq!(
        unknown,
        ManifestError::UnknownMetric {
            object: "HorizontalPodAutoscaler/embedder".to_owned(),
            metric: "http_requests".to_owned(),
        }
    );
    let same =
        ServingConfig::default().with_probes(ProbePaths::new("/healthz", "/healthz", "/startupz"));
    let shared =
        ManifestBuilder::new(&same, "embedder", IMAGE).with_load_time(Duration::from_secs(5));
    assert!(matches!(
        err(shared),
        ManifestError::ProbePath {
            probe: "liveness",
            ..
        }
    ));
    let relative =
        ServingConfig::default().with_probes(ProbePaths::new("/livez", "readyz", "/startupz"));
    let relative =
        ManifestBuilder::new(&relative, "embedder", IMAGE).with_load_time(Duration::from_secs(5));
    assert!(matches!(
        err(relative),
        ManifestError::ProbePath {
            probe: "readiness",
            ..
        }
    ));
    assert!(matches!(
        err(builder().with_canary(Canary::new(ModelInfo::new("minilm", "v1"), IMAGE, 10, "gw"))),
        ManifestError::Invalid {
            field: "canary",
            ..
        }
    ));
}

#[test]
fn canary_rollouts_that_cannot_work_are_refused() {
    let refused = |b: ManifestBuilder, reason: &str| {
        let err = b.build().unwrap_err();
        assert!(
            matches!(
                &err,
                ManifestError::Invalid {
                    field: "canary_rollout",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(reason), "{err}");
    };
    refused(
        builder()
            .with_canary(canary())
            .with_canary_rollout(canary_rollout()),
        "drop the Canary track",
    );
    refused(
        builder()
            .with_gpu(gpu())
            .with_canary_rollout(canary_rollout()),
        "without headroom",
    );
    for steps in [
        vec![],
        vec![10, 10],
        vec![50, 20],
        vec![0, 10],
        vec![10, 100],
    ] {
        refused(
            builder().with_canary_rollout(canary_rollout().with_steps(steps)),
            "increasing percentages",
        );
    }
    refused(
        builder()
            .with_canary_rollout(canary_rollout().with_measurements(Duration::from_secs(60), 0)),
        "at least one measurement",
    );
    for ratio in [f64::NAN, 0.0, -1.0, f64::INFINITY] {
        refused(
            builder().with_canary_rollout(canary_rollout().with_max_latency_ratio(ratio)),
            "finite",
        );
    }
    refused(
        builder().with_canary_rollout(canary_rollout().with_max_error_ratio_increase(-0.01)),
        "not negative",
    );
    // No rise in the error ratio at all is a policy, not a mistake.
    builder()
        .with_canary_rollout(canary_rollout().with_max_error_ratio_increase(0.0))
        .build()
        .unwrap();
    // With a spare GPU the canary pods can schedule.
    builder()
        .with_gpu(gpu().with_headroom(true))
        .with_canary_rollout(canary_rollout())
        .build()
        .unwrap();
}

#[test]
fn lints_refuse_edited_objects_that_no_longer_agree() {
    let check = |base: ManifestBuilder, kind: &str, edit: &dyn Fn(&mut Value)| {
        let mut manifests = base.build().unwrap();
        edit_object(&mut manifests, kind, edit);
        let err = manifests.lint().unwrap_err();
        assert_eq!(
            manifests.to_yaml().unwrap_err(),
            err,
            "output is refused too"
        );
        err
    };
    let e = check(builder(), "Deployment", &|d| {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] = json!("other");
    });
    assert!(matches!(e, ManifestError::SelectorMismatch { .. }), "{e}");
    let e = check(builder(), "Service", &|s| {
        s["spec"]["selector"] = json!({"app": "x"})
    });
    assert_eq!(
        e,
        ManifestError::SelectorMismatch {
            object: "Service/embedder".to_owned()
        }
    );
    let e = check(builder(), "PodDisruptionBudget", &|p| {
        p["spec"]["minAvailable"] = json!(1)
    });
    assert_eq!(
        e,
        ManifestError::PdbBounds {
            object: "PodDisruptionBudget/embedder".to_owned()
        }
    );
    let e = check(builder(), "PodDisruptionBudget", &|p| {
        p["spec"].as_object_mut().unwrap().remove("maxUnavailable");
    });
    assert!(matches!(e, ManifestError::PdbBounds { .. }));
    let e = check(builder(), "Deployment", &|d| {
        d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["path"] =
            json!("/healthz");
    });
    assert!(
        matches!(
            e,
            ManifestError::ProbePath {
                probe: "liveness",
                ..
            }
        ),
        "{e}"
    );
    let e = check(builder(), "Deployment", &|d| {
        d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] =
            json!(8080);
    });
    assert!(
        matches!(
            e,
            ManifestError::ProbePath {
                probe: "readiness",
                ..
            }
        ),
        "{e}"
    );
    let e = check(builder(), "Deployment", &|d| {
        d["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["failureThreshold"] =
            json!(3);
    });
    assert!(
        matches!(e, ManifestError::StartupBudgetTooShort { .. }),
        "{e}"
    );
    let e = check(builder(), "Deployment", &|d| {
        d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = json!(30);
    });
    assert!(
        matches!(e, ManifestError::GracePeriodTooShort { .. }),
        "{e}"
    );
    let e = check(builder().with_gpu(gpu()), "Deployment", &|d| {
        d["spec"]["strategy"]["rollingUpdate"]["maxSurge"] = json!("25%");
    });
    assert!(matches!(e, ManifestError::GpuRolloutDeadlock { .. }), "{e}");
    let e = check(autoscaled(), "Deployment", &|d| {
        d["spec"]["replicas"] = json!(3)
    });
    assert!(
        matches!(e, ManifestError::ReplicasWithAutoscaler { .. }),
        "{e}"
    );
    let e = check(autoscaled(), "HorizontalPodAutoscaler", &|h| {
        h["spec"]["metrics"][0]["pods"]["metric"]["name"] = json!("candlewick_queue_length");
    });
    assert!(matches!(e, ManifestError::UnknownMetric { .. }), "{e}");
}

#[test]
fn errors_read_as_lowercase_sentences() {
    let e = ManifestError::PdbBounds {
        object: "PodDisruptionBudget/x".to_owned(),
    };
    assert_eq!(
        e.to_string(),
        "PodDisruptionBudget/x: set exactly one of minAvailable and maxUnavailable"
    );
}

// ---- the real schemas --------------------------------------------------

/// `tool` on PATH, or in the virtualenv `.ci/run` creates.
fn find_tool(tool: &str) -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/k8s-venv/bin")
        .join(tool);
    if venv.is_file() {
        return Some(venv);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// Writes every layout to `dir`, built-in kinds only when `builtin_only`.
fn write_layouts(dir: &Path, builtin_only: bool) -> usize {
    std::fs::create_dir_all(dir).unwrap();
    let mut files = 0;
    for (layout, manifests) in layouts() {
        for (i, set) in manifests.sets.iter().enumerate() {
            let yaml = if builtin_only {
                // Without its Rollout a set no longer passes the lints
                // (`to_yaml`): one JSON document (valid YAML) per object.
                let documents: Vec<String> = set
                    .objects
                    .iter()
                    .filter(|o| is_builtin(o.kind()))
                    .map(|o| serde_json::to_string(o).unwrap())
                    .collect();
                documents.join("\n---\n") + "\n"
            } else {
                let mut copy = manifests.clone();
                copy.sets = vec![set.clone()];
                copy.to_yaml().unwrap()
            };
            std::fs::write(dir.join(format!("{layout}-{i}.yaml")), yaml).unwrap();
            files += 1;
        }
    }
    files
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("candlewick-k8s-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Skips a test whose external part is missing, unless CI requires it
/// (`CANDLEWICK_REQUIRE_ALL`, set by `.ci/run`).
fn skip(why: &str) {
    assert!(
        std::env::var_os("CANDLEWICK_REQUIRE_ALL").is_none(),
        "required but {why}"
    );
    eprintln!("skipped: {why}");
}

#[test]
fn every_layout_passes_kubernetes_validate_strict_from_1_30_to_the_newest() {
    let Some(tool) = find_tool("kubernetes-validate") else {
        skip("kubernetes-validate is not installed (pip install kubernetes-validate)");
        return;
    };
    let dir = scratch("schemas");
    let files = write_layouts(&dir, true);
    let newest = Command::new(&tool).arg("--version").output().unwrap();
    let newest = String::from_utf8_lossy(&newest.stdout).trim().to_owned();
    let minor: u32 = newest
        .split('.')
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or(37);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    assert_eq!(paths.len(), files);
    for minor in 30..=minor {
        let output = Command::new(&tool)
            .args(["--strict", "-k", &format!("1.{minor}.0")])
            .args(&paths)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "1.{minor}: {text}");
        assert!(
            !text.contains("Couldn't find schema"),
            "1.{minor}: a missing schema: {text}"
        );
        assert!(!text.contains("ERROR"), "1.{minor}: {text}");
        assert!(
            text.contains("passed for resource deployment/embedder"),
            "{text}"
        );
        eprintln!(
            "kubernetes-validate 1.{minor}: {} resources passed",
            text.matches(" passed ").count()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_layout_passes_checkov_with_no_failed_checks() {
    let Some(tool) = find_tool("checkov") else {
        skip("checkov is not installed (pip install checkov)");
        return;
    };
    let dir = scratch("checkov");
    write_layouts(&dir, false);
    let output = Command::new(&tool)
        .args([
            "--framework",
            "kubernetes",
            "--skip-download",
            "--compact",
            "--quiet",
            "-d",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("Failed checks: 0"), "{text}");
    eprintln!(
        "checkov: {}",
        text.lines()
            .find(|l| l.contains("Passed checks"))
            .unwrap_or("")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Node.js (`CANDLEWICK_NODE`, or `node` on PATH) and the CRD models that
/// `.ci/run` installs from `tests/crd/package-lock.json` into `target/crd`.
fn crd_validator() -> Option<(PathBuf, PathBuf)> {
    let node = std::env::var_os("CANDLEWICK_NODE")
        .map(PathBuf::from)
        .or_else(|| find_tool("node"))?;
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/crd");
    modules
        .join("node_modules/@kubernetes-models/argo-rollouts")
        .is_dir()
        .then_some((node, modules))
}

/// Runs tests/crd/validate.mjs on `items` (a `v1` List); returns whether
/// all passed, and its report.
fn validate_crds(node: &Path, modules: &Path, items: Vec<Value>, name: &str) -> (bool, String) {
    let dir = scratch(name);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("custom-resources.json");
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    std::fs::write(&file, serde_json::to_string(&list).unwrap()).unwrap();
    let output = Command::new(node)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/crd/validate.mjs"))
        .arg(modules)
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn every_custom_resource_is_valid_per_its_crd_model() {
    let Some((node, modules)) = crd_validator() else {
        skip("node or the @kubernetes-models packages are missing (see .ci/run)");
        return;
    };
    let mut items = Vec::new();
    for (_, manifests) in layouts() {
        items.extend(
            manifests
                .objects()
                .filter(|o| !is_builtin(o.kind()))
                .map(json_of),
        );
    }
    for kind in ["Rollout", "AnalysisTemplate", "HTTPRoute", "ScaledObject"] {
        assert!(
            items.iter().any(|item| item["kind"] == kind),
            "no layout generates a {kind}"
        );
    }
    let count = items.len();
    let (passed, report) = validate_crds(&node, &modules, items, "crds");
    assert!(passed, "{report}");
    assert_eq!(report.matches("valid: ").count(), count, "{report}");
    eprintln!("CRD models: {count} custom resources valid");

    // The models do check: a weight that is not a number is refused.
    let manifests = builder()
        .with_canary_rollout(canary_rollout())
        .build()
        .unwrap();
    let mut rollout = of_kind(&manifests, "Rollout").remove(0);
    rollout["spec"]["strategy"]["canary"]["steps"][0]["setWeight"] = json!("ten");
    let (passed, report) = validate_crds(&node, &modules, vec![rollout], "crds-broken");
    assert!(!passed, "{report}");
    assert!(report.contains("setWeight must be integer"), "{report}");
}
