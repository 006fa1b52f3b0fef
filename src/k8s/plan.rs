//! The resolved plan every object factory reads: the builder's settings,
//! the values derived from them (startup budget, grace period), the tracks
//! to generate, and the labels and ports every object shares. Factories
//! import this module and nothing above it.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::time::Duration;

use k8s_openapi::api::core::v1::ContainerPort;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::error::ManifestError;
use super::settings::{
    Canary, CanaryRollout, Disruption, GpuPool, ModelVolume, Region, RegionMode, Resources, Scale,
    Spread,
};
use crate::ModelInfo;
use crate::health::ProbePaths;

/// The interval of the startup probe, in seconds.
pub(crate) const STARTUP_PERIOD_SECS: u64 = 5;
/// The smallest margin added to the load time for the startup budget.
const MIN_STARTUP_MARGIN: Duration = Duration::from_secs(30);
/// The name of the container port (and Service port) the application
/// serves requests and probes on.
pub(crate) const PORT_NAME: &str = "http";
/// The container port of the admin listener (probes and metrics), if any.
pub(crate) const ADMIN_PORT_NAME: &str = "admin";
/// The UID and GID the container runs as: the `nonroot` user of the image
/// `scripts/build-image.sh` builds (non-root, above host UIDs).
pub(crate) const RUN_AS: i64 = 65532;
/// The window of `rate()` in the generated PromQL.
pub(crate) const RATE_WINDOW: &str = "2m";

/// Everything the objects are generated from.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) name: String,
    pub(crate) namespace: String,
    pub(crate) image: String,
    /// Arguments appended to the image's entrypoint.
    pub(crate) args: Vec<String>,
    pub(crate) model: ModelInfo,
    pub(crate) model_volume: Option<ModelVolume>,
    pub(crate) probes: ProbePaths,
    pub(crate) port: u16,
    /// The admin listener's port, where probes and metrics are served.
    pub(crate) admin_port: Option<u16>,
    /// The namespaces whose pods may reach the admin port; empty: any.
    pub(crate) metrics_namespaces: Vec<String>,
    pub(crate) metrics_path: String,
    pub(crate) drain_timeout: Duration,
    /// The thread count candle must compute at: the CPU replicas' own pools.
    pub(crate) candle_threads: Option<NonZeroUsize>,
    pub(crate) pre_stop: Duration,
    pub(crate) load_time: Option<Duration>,
    pub(crate) startup_budget: Option<Duration>,
    pub(crate) termination_grace: Option<Duration>,
    pub(crate) scale: Scale,
    pub(crate) resources: Resources,
    pub(crate) gpu: Option<GpuPool>,
    pub(crate) spread: Spread,
    pub(crate) disruption: Disruption,
    pub(crate) regions: Vec<Region>,
    pub(crate) region_mode: RegionMode,
    pub(crate) canary: Option<Canary>,
    pub(crate) canary_rollout: Option<CanaryRollout>,
    pub(crate) recreate: bool,
}

/// What runs a track's pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Workload {
    /// An `apps/v1` Deployment.
    Deployment,
    /// An Argo Rollouts `Rollout`, which canaries each new pod template.
    Rollout,
}

impl Workload {
    /// The `apiVersion` and `kind` autoscalers target.
    pub(crate) fn api_version_and_kind(self) -> (&'static str, &'static str) {
        match self {
            Self::Deployment => ("apps/v1", "Deployment"),
            Self::Rollout => ("argoproj.io/v1alpha1", "Rollout"),
        }
    }
}

/// One workload to generate, with its Service, PDB and autoscaler.
#[derive(Debug, Clone)]
pub(crate) struct Track {
    /// Workload, Service and PDB name.
    pub(crate) name: String,
    pub(crate) workload: Workload,
    pub(crate) model: ModelInfo,
    pub(crate) image: String,
    pub(crate) scale: Scale,
    /// `stable` or `canary`.
    pub(crate) track: &'static str,
    pub(crate) region: Option<String>,
    /// `active` or `passive`, in a multi-region layout.
    pub(crate) region_role: Option<&'static str>,
    pub(crate) node_labels: BTreeMap<String, String>,
}

/// The name of the canary's objects (its track, or a Rollout's canary
/// Service).
pub(crate) fn canary_name(name: &str) -> String {
    format!("{name}-canary")
}

impl Plan {
    pub(crate) fn load_time(&self) -> Result<Duration, ManifestError> {
        self.load_time.ok_or(ManifestError::Invalid {
            field: "load_time",
            reason: "unknown: measure it (Health::startup_time) or declare it".to_owned(),
        })
    }

    /// The startup budget: the override, or the load time plus half of it
    /// (at least 30 s), rounded up to whole startup-probe periods.
    pub(crate) fn startup_budget(&self) -> Result<Duration, ManifestError> {
        if let Some(budget) = self.startup_budget {
            return Ok(budget);
        }
        let load = self.load_time()?;
        let budget = load.saturating_add((load / 2).max(MIN_STARTUP_MARGIN));
        let periods = whole_secs(budget).div_ceil(STARTUP_PERIOD_SECS);
        Ok(Duration::from_secs(
            periods.saturating_mul(STARTUP_PERIOD_SECS),
        ))
    }

    /// The termination grace period: the override, or the preStop sleep plus
    /// the drain timeout plus 5 s, in whole seconds.
    pub(crate) fn termination_grace(&self) -> Duration {
        self.termination_grace.unwrap_or_else(|| {
            let required = self
                .pre_stop
                .saturating_add(self.drain_timeout)
                .saturating_add(Duration::from_secs(5));
            Duration::from_secs(whole_secs(required))
        })
    }

    /// The named container port probes and Prometheus go to, and its number.
    pub(crate) fn probe_port(&self) -> (&'static str, u16) {
        match self.admin_port {
            Some(port) => (ADMIN_PORT_NAME, port),
            None => (PORT_NAME, self.port),
        }
    }

    /// The application's port, and the admin listener's if it has one.
    pub(crate) fn container_ports(&self) -> Vec<ContainerPort> {
        let named = |name: &str, port: u16| ContainerPort {
            name: Some(name.to_owned()),
            container_port: i32::from(port),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        };
        let mut ports = vec![named(PORT_NAME, self.port)];
        ports.extend(self.admin_port.map(|port| named(ADMIN_PORT_NAME, port)));
        ports
    }

    /// The labels that select a track's pods.
    pub(crate) fn selector_labels(&self, track: &Track) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), self.name.clone()),
            ("app.kubernetes.io/instance".to_owned(), track.name.clone()),
        ])
    }

    /// The labels on every object of a track: the selector labels plus the
    /// standard `app.kubernetes.io/*` and model labels.
    pub(crate) fn labels(&self, track: &Track) -> BTreeMap<String, String> {
        let mut labels = self.selector_labels(track);
        labels.extend([
            (
                "app.kubernetes.io/version".to_owned(),
                track.model.version.clone(),
            ),
            (
                "app.kubernetes.io/component".to_owned(),
                "inference".to_owned(),
            ),
            ("app.kubernetes.io/part-of".to_owned(), self.name.clone()),
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
    pub(crate) fn metadata(&self, track: &Track, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels(track)),
            ..ObjectMeta::default()
        }
    }

    /// Metadata of an object shared by the tracks of a set (`component`
    /// says what it is for).
    pub(crate) fn shared_metadata(
        &self,
        name: String,
        component: Option<&str>,
        region: Option<&Region>,
    ) -> ObjectMeta {
        let mut labels = BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), self.name.clone()),
            ("app.kubernetes.io/part-of".to_owned(), self.name.clone()),
            (
                "app.kubernetes.io/managed-by".to_owned(),
                "candlewick".to_owned(),
            ),
        ]);
        if let Some(component) = component {
            labels.insert(
                "app.kubernetes.io/component".to_owned(),
                component.to_owned(),
            );
        }
        if let Some(region) = region {
            labels.insert("candlewick.rs/region".to_owned(), region.name.clone());
        }
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            ..ObjectMeta::default()
        }
    }

    /// The workloads of one region: the stable track, and the canary track
    /// of a [`Canary`] layout.
    pub(crate) fn tracks(&self, region: Option<&Region>) -> Vec<Track> {
        let role = region.map(|region| match &self.region_mode {
            RegionMode::ActivePassive { active, .. } if *active != region.name => "passive",
            _ => "active",
        });
        let floor = match (&self.region_mode, role) {
            (RegionMode::ActivePassive { warm_replicas, .. }, Some("passive")) => {
                Some(*warm_replicas)
            }
            _ => region.and_then(|r| r.min_replicas),
        };
        let scale = match (&self.scale, floor) {
            (Scale::Fixed(_), Some(floor)) => Scale::Fixed(floor),
            (Scale::Auto(auto), Some(floor)) => {
                let mut auto = auto.clone();
                auto.min_replicas = floor;
                auto.max_replicas = auto.max_replicas.max(floor);
                Scale::Auto(auto)
            }
            (scale, None) => scale.clone(),
        };
        let mut node_labels = BTreeMap::new();
        if let Some(region) = region {
            node_labels.insert(
                "topology.kubernetes.io/region".to_owned(),
                region.name.clone(),
            );
            node_labels.extend(region.node_labels.clone());
        }
        let stable = Track {
            name: self.name.clone(),
            workload: if self.canary_rollout.is_some() {
                Workload::Rollout
            } else {
                Workload::Deployment
            },
            model: self.model.clone(),
            image: self.image.clone(),
            scale,
            track: "stable",
            region: region.map(|r| r.name.clone()),
            region_role: role,
            node_labels,
        };
        let mut tracks = vec![stable.clone()];
        if let Some(canary) = &self.canary {
            tracks.push(Track {
                name: canary_name(&self.name),
                model: canary.model.clone(),
                image: canary.image.clone(),
                scale: Scale::Fixed(canary.replicas),
                track: "canary",
                ..stable
            });
        }
        tracks
    }
}

/// `duration` in seconds, rounded up, saturating (a caller may pass
/// `Duration::MAX`).
pub(crate) fn whole_secs(duration: Duration) -> u64 {
    duration
        .as_secs()
        .saturating_add(u64::from(duration.subsec_nanos() > 0))
}
