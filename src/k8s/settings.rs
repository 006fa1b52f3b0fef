//! Deployment settings: plain data with `with_*` setters.

use std::collections::BTreeMap;

use crate::ModelInfo;
use crate::metrics::names;

/// CPU and memory requests and limits, as Kubernetes quantities
/// (`"500m"`, `"2Gi"`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Resources {
    /// CPU request. Default: `"1"`.
    pub cpu_request: String,
    /// Memory request. Default: `"2Gi"`.
    pub memory_request: String,
    /// CPU limit; `None` leaves CPU unthrottled. Default: `Some("1")`.
    pub cpu_limit: Option<String>,
    /// Memory limit. Default: `"2Gi"` (equal to the request, so the pod is
    /// never killed for memory it was promised).
    pub memory_limit: String,
}

impl Default for Resources {
    fn default() -> Self {
        Self::new("1", "2Gi")
    }
}

impl Resources {
    /// Requests `cpu` and `memory`, with limits equal to the requests
    /// (the `Guaranteed` QoS class).
    pub fn new(cpu: impl Into<String>, memory: impl Into<String>) -> Self {
        let cpu = cpu.into();
        let memory = memory.into();
        Self {
            cpu_limit: Some(cpu.clone()),
            memory_limit: memory.clone(),
            cpu_request: cpu,
            memory_request: memory,
        }
    }

    /// Sets [`cpu_limit`](Self::cpu_limit).
    pub fn with_cpu_limit(mut self, limit: Option<String>) -> Self {
        self.cpu_limit = limit;
        self
    }

    /// Sets [`memory_limit`](Self::memory_limit).
    pub fn with_memory_limit(mut self, limit: impl Into<String>) -> Self {
        self.memory_limit = limit.into();
        self
    }
}

/// A taint on the nodes of a GPU pool, which the pods tolerate.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Taint {
    /// The taint's key, e.g. `nvidia.com/gpu`.
    pub key: String,
    /// Its value; `None` tolerates any value (`operator: Exists`).
    pub value: Option<String>,
    /// Its effect, e.g. `NoSchedule`.
    pub effect: String,
}

impl Taint {
    /// A `NoSchedule` taint `key`, tolerated whatever its value.
    pub fn no_schedule(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: None,
            effect: "NoSchedule".to_owned(),
        }
    }

    /// Sets [`value`](Self::value).
    pub fn with_value(mut self, value: impl Into<String>) -> Self {
        self.value = Some(value.into());
        self
    }
}

/// The GPUs each pod needs and the node pool that has them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GpuPool {
    /// GPUs per pod (the limit, and the request, of [`resource`](Self::resource)).
    pub count: u32,
    /// The extended resource name. Default: `nvidia.com/gpu`.
    pub resource: String,
    /// Labels that select the pool's nodes (node affinity).
    pub node_labels: BTreeMap<String, String>,
    /// Taints on the pool's nodes, tolerated by the pods.
    pub taints: Vec<Taint>,
    /// Whether the pool has a spare GPU for a surge pod during a rollout.
    /// Default: `false`, which rolls out with `maxSurge: 0` so a full pool
    /// cannot deadlock.
    pub headroom: bool,
}

impl GpuPool {
    /// `count` NVIDIA GPUs per pod, tolerating the `nvidia.com/gpu` taint.
    pub fn nvidia(count: u32) -> Self {
        Self {
            count,
            resource: "nvidia.com/gpu".to_owned(),
            node_labels: BTreeMap::new(),
            taints: vec![Taint::no_schedule("nvidia.com/gpu")],
            headroom: false,
        }
    }

    /// Adds a node label the pool's nodes carry.
    pub fn with_node_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.node_labels.insert(key.into(), value.into());
        self
    }

    /// Adds a taint the pods tolerate.
    pub fn with_taint(mut self, taint: Taint) -> Self {
        self.taints.push(taint);
        self
    }

    /// Sets [`headroom`](Self::headroom).
    pub fn with_headroom(mut self, headroom: bool) -> Self {
        self.headroom = headroom;
        self
    }
}

/// A signal an autoscaler scales on.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ScaleMetric {
    /// Average CPU use, percent of the request.
    Cpu {
        /// Target utilisation, percent.
        utilization: i32,
    },
    /// Average memory use, percent of the request.
    Memory {
        /// Target utilisation, percent.
        utilization: i32,
    },
    /// [`names::QUEUE_DEPTH`] per pod.
    QueueDepth {
        /// Target queued requests per pod.
        per_pod: f64,
    },
    /// [`names::IN_FLIGHT`] per pod.
    InFlight {
        /// Target requests in running batches per pod.
        per_pod: f64,
    },
    /// The rate of [`names::REQUESTS`] per pod.
    RequestsPerSecond {
        /// Target requests per second per pod.
        per_pod: f64,
    },
    /// The p99 of [`names::REQUEST_DURATION`] per pod.
    P99Latency {
        /// Target p99, seconds.
        seconds: f64,
    },
    /// A Pods metric by name: refused unless it is one of the series the
    /// generated adapter rules expose (see [`ScaleMetric::exposed_name`]).
    Pods {
        /// The metric name as the custom metrics API serves it.
        name: String,
        /// Target average value per pod.
        per_pod: f64,
    },
}

impl ScaleMetric {
    /// The name under which the custom metrics API serves this metric, or
    /// `None` for CPU and memory.
    pub fn exposed_name(&self) -> Option<String> {
        Some(match self {
            Self::Cpu { .. } | Self::Memory { .. } => return None,
            Self::QueueDepth { .. } => names::QUEUE_DEPTH.to_owned(),
            Self::InFlight { .. } => names::IN_FLIGHT.to_owned(),
            Self::RequestsPerSecond { .. } => requests_per_second(),
            Self::P99Latency { .. } => p99_latency(),
            Self::Pods { name, .. } => name.clone(),
        })
    }

    /// Every name [`exposed_name`](Self::exposed_name) can return for a
    /// metric this crate emits: the lint that HPA metrics exist checks
    /// against this list.
    pub fn exported_names() -> Vec<String> {
        vec![
            names::QUEUE_DEPTH.to_owned(),
            names::IN_FLIGHT.to_owned(),
            requests_per_second(),
            p99_latency(),
        ]
    }
}

/// `candlewick_requests_per_second`, the rate of [`names::REQUESTS`].
pub(crate) fn requests_per_second() -> String {
    format!("{}_per_second", names::REQUESTS.trim_end_matches("_total"))
}

/// `candlewick_request_duration_seconds_p99`.
pub(crate) fn p99_latency() -> String {
    format!("{}_p99", names::REQUEST_DURATION)
}

/// Which component turns the metrics into a replica count.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Autoscaler {
    /// An `autoscaling/v2` HorizontalPodAutoscaler, reading custom metrics
    /// through prometheus-adapter (whose rules are generated too).
    Hpa,
    /// A KEDA `ScaledObject` querying Prometheus directly (no HPA is emitted:
    /// KEDA creates its own).
    Keda {
        /// The Prometheus server KEDA queries.
        prometheus_url: String,
    },
}

/// An autoscaling range and what it scales on.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Autoscaling {
    /// The fewest replicas.
    pub min_replicas: u32,
    /// The most replicas.
    pub max_replicas: u32,
    /// The signals; the autoscaler follows whichever asks for most replicas.
    pub metrics: Vec<ScaleMetric>,
    /// HPA or KEDA. Default: HPA.
    pub autoscaler: Autoscaler,
    /// Seconds a lower recommendation must persist before scaling down.
    /// Default: 300.
    pub scale_down_window_secs: i32,
}

impl Autoscaling {
    /// Between `min` and `max` replicas on queue depth (8 per pod).
    pub fn new(min: u32, max: u32) -> Self {
        Self {
            min_replicas: min,
            max_replicas: max,
            metrics: vec![ScaleMetric::QueueDepth { per_pod: 8.0 }],
            autoscaler: Autoscaler::Hpa,
            scale_down_window_secs: 300,
        }
    }

    /// Replaces [`metrics`](Self::metrics).
    pub fn with_metrics(mut self, metrics: Vec<ScaleMetric>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Sets [`autoscaler`](Self::autoscaler).
    pub fn with_autoscaler(mut self, autoscaler: Autoscaler) -> Self {
        self.autoscaler = autoscaler;
        self
    }

    /// Uses KEDA with the Prometheus server at `url`.
    pub fn with_keda(self, url: impl Into<String>) -> Self {
        self.with_autoscaler(Autoscaler::Keda {
            prometheus_url: url.into(),
        })
    }
}

/// How many replicas run.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Scale {
    /// A fixed count, written into the Deployment.
    Fixed(u32),
    /// An autoscaler owns the count; the Deployment has no `replicas`.
    Auto(Autoscaling),
}

/// The PodDisruptionBudget's single bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Disruption {
    /// At most this many pods voluntarily evicted at once. Default: 1.
    MaxUnavailable(u32),
    /// At least this many pods kept available.
    MinAvailable(u32),
}

impl Default for Disruption {
    fn default() -> Self {
        Self::MaxUnavailable(1)
    }
}

/// How pods are spread over failure domains.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Spread {
    /// Zones the pods may run in (node affinity); empty allows any.
    pub zones: Vec<String>,
    /// Refuse to schedule rather than skew zones by more than one
    /// (`DoNotSchedule`). Default: `false` (`ScheduleAnyway`), so a zone
    /// without capacity cannot block scale-up.
    pub strict_zones: bool,
    /// Also prefer one pod per node (preferred pod anti-affinity).
    /// Default: `false`.
    pub anti_affinity: bool,
}

impl Spread {
    /// Sets [`zones`](Self::zones).
    pub fn with_zones<Z: Into<String>>(mut self, zones: impl IntoIterator<Item = Z>) -> Self {
        self.zones = zones.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`strict_zones`](Self::strict_zones).
    pub fn with_strict_zones(mut self, strict: bool) -> Self {
        self.strict_zones = strict;
        self
    }

    /// Sets [`anti_affinity`](Self::anti_affinity).
    pub fn with_anti_affinity(mut self, anti_affinity: bool) -> Self {
        self.anti_affinity = anti_affinity;
        self
    }
}

/// One region (one cluster) of a multi-region layout.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Region {
    /// The region name, e.g. `europe-west4`; pods are pinned to it by the
    /// `topology.kubernetes.io/region` node label.
    pub name: String,
    /// A replica floor for this region, overriding the minimum.
    pub min_replicas: Option<u32>,
    /// Extra node labels for this region (e.g. its GPU pool's name).
    pub node_labels: BTreeMap<String, String>,
}

impl Region {
    /// A region with no overrides.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            min_replicas: None,
            node_labels: BTreeMap::new(),
        }
    }

    /// Sets [`min_replicas`](Self::min_replicas).
    pub fn with_min_replicas(mut self, min: u32) -> Self {
        self.min_replicas = Some(min);
        self
    }

    /// Adds a node label.
    pub fn with_node_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.node_labels.insert(key.into(), value.into());
        self
    }
}

/// How the regions share traffic.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RegionMode {
    /// Every region serves.
    #[default]
    ActiveActive,
    /// Only `active` serves; the others keep `warm_replicas` loaded, ready to
    /// take over.
    ActivePassive {
        /// The serving region.
        active: String,
        /// Replicas each passive region keeps running.
        warm_replicas: u32,
    },
}

/// A canary: a second model version taking a share of the traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Canary {
    /// The canary's model (its version must differ from the stable one).
    pub model: ModelInfo,
    /// The canary's image.
    pub image: String,
    /// Percent of requests sent to the canary, 0 to 100.
    pub weight: u16,
    /// Canary replicas (fixed). Default: 1.
    pub replicas: u32,
    /// The Gateway the HTTPRoute attaches to.
    pub gateway: String,
    /// The Gateway's namespace, if not the route's.
    pub gateway_namespace: Option<String>,
}

impl Canary {
    /// `model` in `image`, taking `weight` percent of the traffic through the
    /// Gateway named `gateway`.
    pub fn new(
        model: ModelInfo,
        image: impl Into<String>,
        weight: u16,
        gateway: impl Into<String>,
    ) -> Self {
        Self {
            model,
            image: image.into(),
            weight,
            replicas: 1,
            gateway: gateway.into(),
            gateway_namespace: None,
        }
    }

    /// Sets [`replicas`](Self::replicas).
    pub fn with_replicas(mut self, replicas: u32) -> Self {
        self.replicas = replicas;
        self
    }

    /// Sets [`gateway_namespace`](Self::gateway_namespace).
    pub fn with_gateway_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.gateway_namespace = Some(namespace.into());
        self
    }
}

/// Where the weights come from when they are not in the image: a volume
/// mounted read-only into the server container (point the server at it,
/// e.g. `--model-dir /models`, with [`ManifestBuilder::with_args`]).
///
/// [`ManifestBuilder::with_args`]: super::ManifestBuilder::with_args
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ModelVolume {
    /// What fills the volume.
    pub source: ModelSource,
    /// Where the server container sees it, read-only. Default: `/models`.
    pub mount_path: String,
}

/// What fills a [`ModelVolume`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModelSource {
    /// An existing PersistentVolumeClaim holding the model (mounted
    /// read-only; `ReadOnlyMany` lets every replica share it).
    Claim(String),
    /// An init container that writes the model into an `emptyDir` at the
    /// mount path before the server starts (e.g. an image carrying the
    /// weights that copies them, or a downloader). It runs with the
    /// server's hardening: uid/gid 65532, read-only root filesystem.
    InitContainer {
        /// The init container's image.
        image: String,
        /// Its command; it must leave the model at the mount path.
        command: Vec<String>,
    },
}

impl ModelVolume {
    /// The model from the PersistentVolumeClaim `claim`, at `/models`.
    pub fn claim(claim: impl Into<String>) -> Self {
        Self {
            source: ModelSource::Claim(claim.into()),
            mount_path: "/models".to_owned(),
        }
    }

    /// The model written to `/models` by an init container running
    /// `command` in `image`.
    pub fn init_container<S: Into<String>>(
        image: impl Into<String>,
        command: impl IntoIterator<Item = S>,
    ) -> Self {
        Self {
            source: ModelSource::InitContainer {
                image: image.into(),
                command: command.into_iter().map(Into::into).collect(),
            },
            mount_path: "/models".to_owned(),
        }
    }

    /// Sets [`mount_path`](Self::mount_path).
    pub fn with_mount_path(mut self, path: impl Into<String>) -> Self {
        self.mount_path = path.into();
        self
    }
}

/// A progressive canary with Argo Rollouts: the stable Deployment becomes a
/// `Rollout` that shifts traffic to each new pod template step by step
/// (through the Gateway API plugin and an `HTTPRoute`), and after each step
/// runs an `AnalysisTemplate` comparing the canary's and the stable pods'
/// metrics in Prometheus; a failed analysis aborts the rollout and traffic
/// returns to the stable version.
///
/// The analysis reads [`names::REQUESTS`] and [`names::REQUEST_DURATION`]
/// by their `version` label (the model version): the canary is the version
/// these manifests declare, the baseline every other version of the model
/// in the namespace.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CanaryRollout {
    /// The Gateway the HTTPRoute attaches to.
    pub gateway: String,
    /// The Gateway's namespace, if not the route's.
    pub gateway_namespace: Option<String>,
    /// The Prometheus server the analysis queries.
    pub prometheus_url: String,
    /// The canary's share of traffic at each step, percent, increasing,
    /// each below 100; after the last, the canary is promoted.
    /// Default: 10, 25, 50.
    pub steps: Vec<u8>,
    /// Time between two measurements of the analysis. Default: 1 minute.
    pub interval: std::time::Duration,
    /// Measurements per step; each must pass. Default: 5.
    pub measurements: u32,
    /// How much the canary's error ratio (server-side failures over
    /// requests) may exceed the stable version's. Default: 0.01.
    pub max_error_ratio_increase: f64,
    /// The largest ratio of the canary's p99 latency to the stable
    /// version's. Default: 1.2.
    pub max_latency_ratio: f64,
}

impl CanaryRollout {
    /// A rollout through the Gateway `gateway`, analysed with the
    /// Prometheus server at `prometheus_url`, with the defaults above.
    pub fn new(gateway: impl Into<String>, prometheus_url: impl Into<String>) -> Self {
        Self {
            gateway: gateway.into(),
            gateway_namespace: None,
            prometheus_url: prometheus_url.into(),
            steps: vec![10, 25, 50],
            interval: std::time::Duration::from_secs(60),
            measurements: 5,
            max_error_ratio_increase: 0.01,
            max_latency_ratio: 1.2,
        }
    }

    /// Sets [`gateway_namespace`](Self::gateway_namespace).
    pub fn with_gateway_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.gateway_namespace = Some(namespace.into());
        self
    }

    /// Sets [`steps`](Self::steps).
    pub fn with_steps(mut self, steps: impl IntoIterator<Item = u8>) -> Self {
        self.steps = steps.into_iter().collect();
        self
    }

    /// Sets [`interval`](Self::interval) and
    /// [`measurements`](Self::measurements).
    pub fn with_measurements(mut self, interval: std::time::Duration, measurements: u32) -> Self {
        self.interval = interval;
        self.measurements = measurements;
        self
    }

    /// Sets [`max_error_ratio_increase`](Self::max_error_ratio_increase).
    pub fn with_max_error_ratio_increase(mut self, increase: f64) -> Self {
        self.max_error_ratio_increase = increase;
        self
    }

    /// Sets [`max_latency_ratio`](Self::max_latency_ratio).
    pub fn with_max_latency_ratio(mut self, ratio: f64) -> Self {
        self.max_latency_ratio = ratio;
        self
    }
}
