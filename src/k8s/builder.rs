//! The builder, and the layouts it expands into: one set of objects per
//! region, each with a stable and optionally a canary track.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::ModelInfo;
use crate::ServingConfig;
use crate::health::{Health, ProbePaths};

use super::error::ManifestError;
use super::output::{Expectations, ManifestSet, Manifests, Object};
use super::settings::{
    Autoscaler, Autoscaling, Canary, Disruption, GpuPool, Region, RegionMode, Resources, Scale,
    ScaleMetric, Spread,
};
use super::{autoscaling, deployment, policy};

/// The interval of the startup probe, in seconds.
pub(crate) const STARTUP_PERIOD_SECS: u64 = 5;
/// The smallest margin added to the load time for the startup budget.
const MIN_STARTUP_MARGIN: Duration = Duration::from_secs(30);

/// Builds the Kubernetes objects that run a serving stack, from the
/// [`ServingConfig`] the process runs with and the deployment settings.
///
/// See the [module documentation](super) for what is generated and why.
#[derive(Debug, Clone)]
pub struct ManifestBuilder {
    pub(crate) name: String,
    pub(crate) namespace: String,
    pub(crate) image: String,
    pub(crate) model: ModelInfo,
    pub(crate) probes: ProbePaths,
    pub(crate) port: u16,
    /// The admin listener's port, where probes and metrics are served.
    pub(crate) admin_port: Option<u16>,
    pub(crate) metrics_path: String,
    pub(crate) drain_timeout: Duration,
    /// The thread count candle must compute at: the CPU replicas' own pools.
    pub(crate) candle_threads: Option<std::num::NonZeroUsize>,
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
    pub(crate) recreate: bool,
}

/// One Deployment to generate, with its Service, PDB and autoscaler.
#[derive(Debug, Clone)]
pub(crate) struct Track {
    /// Deployment, Service and PDB name.
    pub(crate) name: String,
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

impl ManifestBuilder {
    /// Objects named `name` running `image`, serving as `config` says: probe
    /// paths, model metadata, the drain timeout and, for CPU replicas on
    /// pools of their own, candle's thread count (`RAYON_NUM_THREADS`,
    /// `CANDLE_NUM_THREADS`) come from it.
    ///
    /// Defaults: namespace `name`, port 8080, the config's drain timeout, preStop
    /// sleep 5 s, 2 replicas, [`Resources::default`], no GPU, a PDB with
    /// `maxUnavailable: 1`, zone and node spread, one region. The load time
    /// has no default: set it with [`with_load_time`](Self::with_load_time)
    /// or [`with_measured_load_time`](Self::with_measured_load_time).
    pub fn new(config: &ServingConfig, name: impl Into<String>, image: impl Into<String>) -> Self {
        let name = name.into();
        Self {
            namespace: name.clone(),
            name,
            image: image.into(),
            model: config.model.clone(),
            probes: config.probes.clone(),
            port: 8080,
            admin_port: config.admin_port,
            metrics_path: "/metrics".to_owned(),
            drain_timeout: config.drain_timeout,
            candle_threads: config
                .pool
                .devices
                .contains(&candle_core::DeviceLocation::Cpu)
                .then_some(config.pool.cpu_threads_per_replica)
                .flatten(),
            pre_stop: Duration::from_secs(5),
            load_time: None,
            startup_budget: None,
            termination_grace: None,
            scale: Scale::Fixed(2),
            resources: Resources::default(),
            gpu: None,
            spread: Spread::default(),
            disruption: Disruption::default(),
            regions: Vec::new(),
            region_mode: RegionMode::ActiveActive,
            canary: None,
            recreate: false,
        }
    }

    /// Sets the namespace.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Sets the port the application serves on, requests and probes alike
    /// (the container port named `http`).
    pub fn with_port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Serves probes and metrics on an admin listener on `port` (named
    /// `admin`), apart from the data plane; `None` serves them on the
    /// application's port. Default: the serving config's
    /// [`admin_port`](ServingConfig::admin_port).
    pub fn with_admin_port(mut self, port: Option<u16>) -> Self {
        self.admin_port = port;
        self
    }

    /// The named container port probes and Prometheus go to, and its number.
    pub(crate) fn probe_port(&self) -> (&'static str, u16) {
        match self.admin_port {
            Some(port) => (super::deployment::ADMIN_PORT_NAME, port),
            None => (super::deployment::PORT_NAME, self.port),
        }
    }

    /// Sets the path Prometheus scrapes (pod annotations). Default: `/metrics`.
    pub fn with_metrics_path(mut self, path: impl Into<String>) -> Self {
        self.metrics_path = path.into();
        self
    }

    /// Sets how long the process drains in-flight requests after SIGTERM:
    /// the grace period covers it.
    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Sets the preStop sleep, which lets endpoints and load balancers stop
    /// sending traffic before the process starts draining.
    pub fn with_pre_stop(mut self, sleep: Duration) -> Self {
        self.pre_stop = sleep;
        self
    }

    /// Declares the load plus warm-up time of one replica.
    pub fn with_load_time(mut self, load_time: Duration) -> Self {
        self.load_time = Some(load_time);
        self
    }

    /// Uses the load plus warm-up time `health` measured
    /// ([`Health::startup_time`]), if a replica has loaded; otherwise keeps
    /// the declared one.
    pub fn with_measured_load_time(mut self, health: &Health) -> Self {
        if let Some(measured) = health.startup_time() {
            self.load_time = Some(measured);
        }
        self
    }

    /// Overrides the startup budget derived from the load time. Refused when
    /// shorter than the load time.
    pub fn with_startup_budget(mut self, budget: Duration) -> Self {
        self.startup_budget = Some(budget);
        self
    }

    /// Overrides the termination grace period derived from the preStop sleep
    /// and drain timeout. Refused when shorter than their sum.
    pub fn with_termination_grace(mut self, grace: Duration) -> Self {
        self.termination_grace = Some(grace);
        self
    }

    /// Runs a fixed number of replicas.
    pub fn with_replicas(mut self, replicas: u32) -> Self {
        self.scale = Scale::Fixed(replicas);
        self
    }

    /// Lets an autoscaler own the replica count.
    pub fn with_autoscaling(mut self, autoscaling: Autoscaling) -> Self {
        self.scale = Scale::Auto(autoscaling);
        self
    }

    /// Sets the CPU and memory requests and limits.
    pub fn with_resources(mut self, resources: Resources) -> Self {
        self.resources = resources;
        self
    }

    /// Runs on a GPU node pool.
    pub fn with_gpu(mut self, gpu: GpuPool) -> Self {
        self.gpu = Some(gpu);
        self
    }

    /// Sets the zone and node spread.
    pub fn with_spread(mut self, spread: Spread) -> Self {
        self.spread = spread;
        self
    }

    /// Sets the PodDisruptionBudget's bound.
    pub fn with_disruption(mut self, disruption: Disruption) -> Self {
        self.disruption = disruption;
        self
    }

    /// Emits one set of objects per region.
    pub fn with_regions(mut self, regions: Vec<Region>, mode: RegionMode) -> Self {
        self.regions = regions;
        self.region_mode = mode;
        self
    }

    /// Adds a canary track and an HTTPRoute splitting traffic by weight.
    pub fn with_canary(mut self, canary: Canary) -> Self {
        self.canary = Some(canary);
        self
    }

    /// Replaces pods all at once (`Recreate`) instead of rolling.
    pub fn with_recreate(mut self, recreate: bool) -> Self {
        self.recreate = recreate;
        self
    }

    /// The startup budget: the override, or the load time plus half of it
    /// (at least 30 s), rounded up to whole startup-probe periods.
    pub fn startup_budget(&self) -> Result<Duration, ManifestError> {
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
    pub fn termination_grace(&self) -> Duration {
        self.termination_grace.unwrap_or_else(|| {
            let required = self
                .pre_stop
                .saturating_add(self.drain_timeout)
                .saturating_add(Duration::from_secs(5));
            Duration::from_secs(whole_secs(required))
        })
    }

    pub(crate) fn load_time(&self) -> Result<Duration, ManifestError> {
        self.load_time.ok_or(ManifestError::Invalid {
            field: "load_time",
            reason: "unknown: measure it (Health::startup_time) or declare it".to_owned(),
        })
    }

    /// Builds the objects and checks them; refuses a set that fails a check.
    pub fn build(&self) -> Result<Manifests, ManifestError> {
        self.validate()?;
        let load_time = self.load_time()?;
        let regions: Vec<Option<&Region>> = if self.regions.is_empty() {
            vec![None]
        } else {
            self.regions.iter().map(Some).collect()
        };
        let mut sets = Vec::new();
        let mut custom_metrics: Vec<ScaleMetric> = Vec::new();
        for region in regions {
            let mut objects = Vec::new();
            for track in self.tracks(region) {
                objects.push(Object::Deployment(Box::new(deployment::deployment(
                    self, &track,
                )?)));
                objects.push(Object::Service(Box::new(deployment::service(self, &track))));
                objects.push(Object::PodDisruptionBudget(Box::new(policy::pdb(
                    self, &track,
                ))));
                objects.push(Object::NetworkPolicy(Box::new(policy::network_policy(
                    self, &track,
                ))));
                if let Scale::Auto(auto) = &track.scale {
                    match &auto.autoscaler {
                        Autoscaler::Hpa => {
                            objects.push(Object::HorizontalPodAutoscaler(Box::new(
                                autoscaling::hpa(self, &track, auto),
                            )));
                            for metric in &auto.metrics {
                                if metric.exposed_name().is_some()
                                    && !custom_metrics
                                        .iter()
                                        .any(|m| m.exposed_name() == metric.exposed_name())
                                {
                                    custom_metrics.push(metric.clone());
                                }
                            }
                        }
                        Autoscaler::Keda { prometheus_url } => {
                            objects.push(Object::ScaledObject(Box::new(
                                autoscaling::scaled_object(self, &track, auto, prometheus_url)?,
                            )))
                        }
                    }
                }
            }
            if let Some(canary) = &self.canary {
                objects.push(Object::HttpRoute(Box::new(deployment::http_route(
                    self, canary, region,
                ))));
            }
            sets.push(ManifestSet {
                region: region.map(|r| r.name.clone()),
                objects,
            });
        }
        if !custom_metrics.is_empty() {
            let rules = autoscaling::adapter_rules(self, &custom_metrics)?;
            for set in &mut sets {
                set.objects.push(Object::ConfigMap(Box::new(rules.clone())));
            }
        }
        let manifests = Manifests {
            sets,
            expect: Expectations {
                probes: self.probes.clone(),
                probe_port: self.probe_port(),
                load_time,
                drain_timeout: self.drain_timeout,
                gpu_without_headroom: self
                    .gpu
                    .as_ref()
                    .filter(|gpu| !gpu.headroom)
                    .map(|gpu| gpu.resource.clone()),
            },
        };
        manifests.lint()?;
        Ok(manifests)
    }

    /// The Deployments of one region.
    fn tracks(&self, region: Option<&Region>) -> Vec<Track> {
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

    /// Checks the settings before building.
    fn validate(&self) -> Result<(), ManifestError> {
        let invalid = |field, reason: &str| {
            Err(ManifestError::Invalid {
                field,
                reason: reason.to_owned(),
            })
        };
        for (field, value) in [("name", &self.name), ("namespace", &self.namespace)] {
            if !is_dns_label(value) || value.len() > 63 - "-canary".len() {
                return invalid(
                    field,
                    "must be a DNS label (lowercase alphanumerics and '-') of at most 56 characters",
                );
            }
        }
        if self.image.is_empty() {
            return invalid("image", "is empty");
        }
        if self.port == 0 {
            return invalid("port", "must not be 0");
        }
        let probes = &self.probes;
        for (probe, path) in [
            ("startup", &probes.started),
            ("readiness", &probes.ready),
            ("liveness", &probes.live),
        ] {
            if !path.starts_with('/') {
                return Err(ManifestError::ProbePath {
                    object: format!("Deployment/{}", self.name),
                    probe,
                    path: path.clone(),
                });
            }
        }
        if probes.live == probes.ready || probes.live == probes.started {
            return Err(ManifestError::ProbePath {
                object: format!("Deployment/{}", self.name),
                probe: "liveness",
                path: probes.live.clone(),
            });
        }
        let load_time = self.load_time()?;
        let budget = self.startup_budget()?;
        if budget < load_time {
            return Err(ManifestError::StartupBudgetTooShort {
                object: format!("Deployment/{}", self.name),
                budget,
                load_time,
            });
        }
        let required = self.pre_stop.saturating_add(self.drain_timeout);
        if self.termination_grace() < required {
            return Err(ManifestError::GracePeriodTooShort {
                object: format!("Deployment/{}", self.name),
                grace: self.termination_grace(),
                required,
            });
        }
        match &self.scale {
            Scale::Fixed(0) => return invalid("replicas", "must be at least 1"),
            Scale::Auto(auto) => {
                if auto.min_replicas == 0 || auto.min_replicas > auto.max_replicas {
                    return invalid("autoscaling", "needs 1 <= min_replicas <= max_replicas");
                }
                if auto.metrics.is_empty() {
                    return invalid("autoscaling", "needs at least one metric");
                }
                let exported = ScaleMetric::exported_names();
                for metric in &auto.metrics {
                    if let Some(name) = metric.exposed_name()
                        && !exported.contains(&name)
                    {
                        return Err(ManifestError::UnknownMetric {
                            object: format!("HorizontalPodAutoscaler/{}", self.name),
                            metric: name,
                        });
                    }
                }
            }
            Scale::Fixed(_) => {}
        }
        if let Some(gpu) = &self.gpu
            && gpu.count == 0
        {
            return invalid("gpu", "count must be at least 1");
        }
        for region in &self.regions {
            if !is_label_value(&region.name) || region.name.is_empty() {
                return invalid("regions", "a region name must be a valid label value");
            }
        }
        if let RegionMode::ActivePassive {
            active,
            warm_replicas,
        } = &self.region_mode
        {
            if !self.regions.iter().any(|r| r.name == *active) {
                return invalid("region_mode", "the active region is not one of the regions");
            }
            if *warm_replicas == 0 {
                return invalid(
                    "region_mode",
                    "a passive region keeps at least one warm replica",
                );
            }
        }
        if let Some(canary) = &self.canary {
            if canary.weight > 100 {
                return invalid("canary", "weight is a percentage, 0 to 100");
            }
            if canary.model.version == self.model.version {
                return invalid("canary", "the canary must serve a different model version");
            }
            if canary.replicas == 0 {
                return invalid("canary", "needs at least one replica");
            }
        }
        for model in std::iter::once(&self.model).chain(self.canary.as_ref().map(|c| &c.model)) {
            if !is_label_value(&model.name) || !is_label_value(&model.version) {
                return invalid(
                    "model",
                    "name and version must be valid label values (63 characters of [A-Za-z0-9._-])",
                );
            }
        }
        Ok(())
    }
}

/// The name of the canary track's objects.
pub(crate) fn canary_name(name: &str) -> String {
    format!("{name}-canary")
}

fn is_dns_label(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-')
}

fn is_label_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && value
            .bytes()
            .next()
            .is_none_or(|b| b.is_ascii_alphanumeric())
        && value
            .bytes()
            .last()
            .is_none_or(|b| b.is_ascii_alphanumeric())
}

/// `duration` in seconds, rounded up, saturating (a caller may pass
/// `Duration::MAX`).
fn whole_secs(duration: Duration) -> u64 {
    duration
        .as_secs()
        .saturating_add(u64::from(duration.subsec_nanos() > 0))
}
