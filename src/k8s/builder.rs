//! The builder: settings in, checked objects out. It resolves the settings
//! into a [`Plan`], calls the object factories with it, and runs the lints.

use std::time::Duration;

use crate::ServingConfig;
use crate::health::Health;

use super::error::ManifestError;
use super::output::{Expectations, ManifestSet, Manifests, Object};
use super::plan::{Plan, Workload, canary_name};
use super::settings::{
    Autoscaler, Autoscaling, Canary, CanaryRollout, Disruption, GpuPool, ModelVolume, Region,
    RegionMode, Resources, Scale, ScaleMetric, Spread,
};
use super::{autoscaling, deployment, policy, rollout};

/// Builds the Kubernetes objects that run a serving stack, from the
/// [`ServingConfig`] the process runs with and the deployment settings.
///
/// See the [module documentation](super) for what is generated and why.
#[derive(Debug, Clone)]
pub struct ManifestBuilder {
    plan: Plan,
}

impl ManifestBuilder {
    /// Objects named `name` running `image`, serving as `config` says: probe
    /// paths, model metadata, the drain timeout and, for CPU replicas on
    /// pools of their own, candle's thread count (`RAYON_NUM_THREADS`,
    /// `CANDLE_NUM_THREADS`) come from it.
    ///
    /// Defaults: namespace `name`, port 8080, the config's drain timeout, preStop
    /// sleep 5 s, 2 replicas, [`Resources::default`], no GPU, a PDB with
    /// `maxUnavailable: 1`, zone and node spread, one region, the weights in
    /// the image. The load time
    /// has no default: set it with [`with_load_time`](Self::with_load_time)
    /// or [`with_measured_load_time`](Self::with_measured_load_time).
    pub fn new(config: &ServingConfig, name: impl Into<String>, image: impl Into<String>) -> Self {
        let name = name.into();
        let plan = Plan {
            namespace: name.clone(),
            name,
            image: image.into(),
            args: Vec::new(),
            model: config.model.clone(),
            model_volume: None,
            probes: config.probes.clone(),
            port: 8080,
            admin_port: config.admin_port,
            metrics_namespaces: Vec::new(),
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
            canary_rollout: None,
            recreate: false,
        };
        Self { plan }
    }

    /// Sets the namespace.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.plan.namespace = namespace.into();
        self
    }

    /// Sets the port the application serves on, requests and probes alike
    /// (the container port named `http`).
    pub fn with_port(mut self, port: u16) -> Self {
        self.plan.port = port;
        self
    }

    /// Serves probes and metrics on an admin listener on `port` (named
    /// `admin`), apart from the data plane; `None` serves them on the
    /// application's port. Default: the serving config's
    /// [`admin_port`](ServingConfig::admin_port).
    pub fn with_admin_port(mut self, port: Option<u16>) -> Self {
        self.plan.admin_port = port;
        self
    }

    /// Lets only pods in `namespaces` (where Prometheus runs) reach the
    /// admin port, in the NetworkPolicy; the kubelet's probes come from
    /// the node, which a NetworkPolicy always lets through. Without it,
    /// any pod in the cluster could hold the admin port's connections and
    /// keep the probes waiting. Applies with an admin port only (see
    /// [`with_admin_port`](Self::with_admin_port)). Default: any source.
    pub fn with_metrics_namespaces<S: Into<String>>(
        mut self,
        namespaces: impl IntoIterator<Item = S>,
    ) -> Self {
        self.plan.metrics_namespaces = namespaces.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the path Prometheus scrapes (pod annotations). Default: `/metrics`.
    pub fn with_metrics_path(mut self, path: impl Into<String>) -> Self {
        self.plan.metrics_path = path.into();
        self
    }

    /// Sets how long the process drains in-flight requests after SIGTERM:
    /// the grace period covers it.
    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.plan.drain_timeout = timeout;
        self
    }

    /// Sets the preStop sleep, which lets endpoints and load balancers stop
    /// sending traffic before the process starts draining.
    pub fn with_pre_stop(mut self, sleep: Duration) -> Self {
        self.plan.pre_stop = sleep;
        self
    }

    /// Declares the load plus warm-up time of one replica.
    pub fn with_load_time(mut self, load_time: Duration) -> Self {
        self.plan.load_time = Some(load_time);
        self
    }

    /// Uses the load plus warm-up time `health` measured
    /// ([`Health::startup_time`]), if a replica has loaded; otherwise keeps
    /// the declared one.
    pub fn with_measured_load_time(mut self, health: &Health) -> Self {
        if let Some(measured) = health.startup_time() {
            self.plan.load_time = Some(measured);
        }
        self
    }

    /// Overrides the startup budget derived from the load time. Refused when
    /// shorter than the load time.
    pub fn with_startup_budget(mut self, budget: Duration) -> Self {
        self.plan.startup_budget = Some(budget);
        self
    }

    /// Overrides the termination grace period derived from the preStop sleep
    /// and drain timeout. Refused when shorter than their sum.
    pub fn with_termination_grace(mut self, grace: Duration) -> Self {
        self.plan.termination_grace = Some(grace);
        self
    }

    /// Runs a fixed number of replicas.
    pub fn with_replicas(mut self, replicas: u32) -> Self {
        self.plan.scale = Scale::Fixed(replicas);
        self
    }

    /// Lets an autoscaler own the replica count.
    pub fn with_autoscaling(mut self, autoscaling: Autoscaling) -> Self {
        self.plan.scale = Scale::Auto(autoscaling);
        self
    }

    /// Sets the CPU and memory requests and limits.
    pub fn with_resources(mut self, resources: Resources) -> Self {
        self.plan.resources = resources;
        self
    }

    /// Runs on a GPU node pool.
    pub fn with_gpu(mut self, gpu: GpuPool) -> Self {
        self.plan.gpu = Some(gpu);
        self
    }

    /// Sets the zone and node spread.
    pub fn with_spread(mut self, spread: Spread) -> Self {
        self.plan.spread = spread;
        self
    }

    /// Sets the PodDisruptionBudget's bound.
    pub fn with_disruption(mut self, disruption: Disruption) -> Self {
        self.plan.disruption = disruption;
        self
    }

    /// Emits one set of objects per region.
    pub fn with_regions(mut self, regions: Vec<Region>, mode: RegionMode) -> Self {
        self.plan.regions = regions;
        self.plan.region_mode = mode;
        self
    }

    /// Adds a canary track and an HTTPRoute splitting traffic by weight.
    pub fn with_canary(mut self, canary: Canary) -> Self {
        self.plan.canary = Some(canary);
        self
    }

    /// Replaces pods all at once (`Recreate`) instead of rolling.
    pub fn with_recreate(mut self, recreate: bool) -> Self {
        self.plan.recreate = recreate;
        self
    }

    /// Passes `args` to the image's entrypoint (the container's `args`),
    /// e.g. `["--model-dir", "/models"]` with a [`ModelVolume`].
    pub fn with_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.plan.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Mounts the weights from a volume, read-only, instead of reading
    /// them from the image.
    pub fn with_model_volume(mut self, volume: ModelVolume) -> Self {
        self.plan.model_volume = Some(volume);
        self
    }

    /// Runs the stable track as an Argo Rollouts `Rollout` that canaries
    /// every new version and promotes it only while its metrics hold up
    /// (see [`CanaryRollout`]). Excludes [`with_canary`](Self::with_canary).
    pub fn with_canary_rollout(mut self, rollout: CanaryRollout) -> Self {
        self.plan.canary_rollout = Some(rollout);
        self
    }

    /// The startup budget: the override, or the load time plus half of it
    /// (at least 30 s), rounded up to whole startup-probe periods.
    pub fn startup_budget(&self) -> Result<Duration, ManifestError> {
        self.plan.startup_budget()
    }

    /// The termination grace period: the override, or the preStop sleep plus
    /// the drain timeout plus 5 s, in whole seconds.
    pub fn termination_grace(&self) -> Duration {
        self.plan.termination_grace()
    }

    /// Builds the objects and checks them; refuses a set that fails a check.
    pub fn build(&self) -> Result<Manifests, ManifestError> {
        self.validate()?;
        let plan = &self.plan;
        let load_time = plan.load_time()?;
        let regions: Vec<Option<&Region>> = if plan.regions.is_empty() {
            vec![None]
        } else {
            plan.regions.iter().map(Some).collect()
        };
        let mut sets = Vec::new();
        let mut custom_metrics: Vec<ScaleMetric> = Vec::new();
        for region in regions {
            let mut objects = Vec::new();
            for track in plan.tracks(region) {
                objects.push(match track.workload {
                    Workload::Deployment => {
                        Object::Deployment(Box::new(deployment::deployment(plan, &track)?))
                    }
                    Workload::Rollout => Object::Rollout(Box::new(rollout::rollout(plan, &track)?)),
                });
                objects.push(Object::Service(Box::new(deployment::service(
                    plan,
                    &track,
                    &track.name,
                ))));
                if track.workload == Workload::Rollout {
                    // Argo points it at the canary's pods during a rollout.
                    objects.push(Object::Service(Box::new(deployment::service(
                        plan,
                        &track,
                        &canary_name(&track.name),
                    ))));
                }
                objects.push(Object::PodDisruptionBudget(Box::new(policy::pdb(
                    plan, &track,
                ))));
                objects.push(Object::NetworkPolicy(Box::new(policy::network_policy(
                    plan, &track,
                ))));
                if let Scale::Auto(auto) = &track.scale {
                    match &auto.autoscaler {
                        Autoscaler::Hpa => {
                            objects.push(Object::HorizontalPodAutoscaler(Box::new(
                                autoscaling::hpa(plan, &track, auto),
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
                                autoscaling::scaled_object(plan, &track, auto, prometheus_url)?,
                            )))
                        }
                    }
                }
            }
            if let Some(canary) = &plan.canary {
                objects.push(Object::HttpRoute(Box::new(deployment::http_route(
                    plan,
                    (&canary.gateway, canary.gateway_namespace.as_deref()),
                    canary.weight,
                    region,
                ))));
            }
            if let Some(rollout) = &plan.canary_rollout {
                // Argo's Gateway API plugin moves the weights; it starts
                // with everything on the stable Service.
                objects.push(Object::HttpRoute(Box::new(deployment::http_route(
                    plan,
                    (&rollout.gateway, rollout.gateway_namespace.as_deref()),
                    0,
                    region,
                ))));
                objects.push(Object::AnalysisTemplate(Box::new(
                    rollout::analysis_template(plan, rollout, region),
                )));
            }
            sets.push(ManifestSet {
                region: region.map(|r| r.name.clone()),
                objects,
            });
        }
        if !custom_metrics.is_empty() {
            let rules = autoscaling::adapter_rules(plan, &custom_metrics)?;
            for set in &mut sets {
                set.objects.push(Object::ConfigMap(Box::new(rules.clone())));
            }
        }
        let manifests = Manifests {
            sets,
            expect: Expectations {
                probes: plan.probes.clone(),
                probe_port: plan.probe_port(),
                load_time,
                drain_timeout: plan.drain_timeout,
                gpu_without_headroom: plan
                    .gpu
                    .as_ref()
                    .filter(|gpu| !gpu.headroom)
                    .map(|gpu| gpu.resource.clone()),
            },
        };
        manifests.lint()?;
        Ok(manifests)
    }

    /// Checks the settings before building.
    fn validate(&self) -> Result<(), ManifestError> {
        let plan = &self.plan;
        let invalid = |field, reason: &str| {
            Err(ManifestError::Invalid {
                field,
                reason: reason.to_owned(),
            })
        };
        for (field, value) in [("name", &plan.name), ("namespace", &plan.namespace)] {
            if !is_dns_label(value) || value.len() > 63 - "-canary".len() {
                return invalid(
                    field,
                    "must be a DNS label (lowercase alphanumerics and '-') of at most 56 characters",
                );
            }
        }
        if plan.image.is_empty() {
            return invalid("image", "is empty");
        }
        if plan.port == 0 {
            return invalid("port", "must not be 0");
        }
        let probes = &plan.probes;
        for (probe, path) in [
            ("startup", &probes.started),
            ("readiness", &probes.ready),
            ("liveness", &probes.live),
        ] {
            if !path.starts_with('/') {
                return Err(ManifestError::ProbePath {
                    object: format!("Deployment/{}", plan.name),
                    probe,
                    path: path.clone(),
                });
            }
        }
        if probes.live == probes.ready || probes.live == probes.started {
            return Err(ManifestError::ProbePath {
                object: format!("Deployment/{}", plan.name),
                probe: "liveness",
                path: probes.live.clone(),
            });
        }
        let load_time = plan.load_time()?;
        let budget = plan.startup_budget()?;
        if budget < load_time {
            return Err(ManifestError::StartupBudgetTooShort {
                object: format!("Deployment/{}", plan.name),
                budget,
                load_time,
            });
        }
        let required = plan.pre_stop.saturating_add(plan.drain_timeout);
        if plan.termination_grace() < required {
            return Err(ManifestError::GracePeriodTooShort {
                object: format!("Deployment/{}", plan.name),
                grace: plan.termination_grace(),
                required,
            });
        }
        match &plan.scale {
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
                            object: format!("HorizontalPodAutoscaler/{}", plan.name),
                            metric: name,
                        });
                    }
                }
            }
            Scale::Fixed(_) => {}
        }
        if let Some(gpu) = &plan.gpu
            && gpu.count == 0
        {
            return invalid("gpu", "count must be at least 1");
        }
        for region in &plan.regions {
            if !is_label_value(&region.name) || region.name.is_empty() {
                return invalid("regions", "a region name must be a valid label value");
            }
        }
        if let RegionMode::ActivePassive {
            active,
            warm_replicas,
        } = &plan.region_mode
        {
            if !plan.regions.iter().any(|r| r.name == *active) {
                return invalid("region_mode", "the active region is not one of the regions");
            }
            if *warm_replicas == 0 {
                return invalid(
                    "region_mode",
                    "a passive region keeps at least one warm replica",
                );
            }
        }
        if let Some(canary) = &plan.canary {
            if canary.weight > 100 {
                return invalid("canary", "weight is a percentage, 0 to 100");
            }
            if canary.model.version == plan.model.version {
                return invalid("canary", "the canary must serve a different model version");
            }
            if canary.replicas == 0 {
                return invalid("canary", "needs at least one replica");
            }
        }
        if let Some(rollout) = &plan.canary_rollout {
            if plan.canary.is_some() {
                return invalid(
                    "canary_rollout",
                    "a Rollout canaries each new version itself: drop the Canary track",
                );
            }
            if plan.gpu.as_ref().is_some_and(|gpu| !gpu.headroom) {
                return invalid(
                    "canary_rollout",
                    "canary pods run beside the stable ones: a GPU pool without headroom cannot schedule them",
                );
            }
            if rollout.steps.is_empty()
                || rollout.steps.windows(2).any(|w| w[0] >= w[1])
                || rollout.steps.iter().any(|&w| w == 0 || w >= 100)
            {
                return invalid(
                    "canary_rollout",
                    "steps are increasing percentages between 1 and 99",
                );
            }
            if rollout.measurements == 0 || rollout.interval < Duration::from_secs(1) {
                return invalid(
                    "canary_rollout",
                    "needs at least one measurement per step, at least 1 s apart",
                );
            }
            // An error ratio may not rise at all (0); a latency ratio of 0
            // would fail every canary, however fast.
            if !(rollout.max_error_ratio_increase.is_finite()
                && rollout.max_error_ratio_increase >= 0.0
                && rollout.max_latency_ratio.is_finite()
                && rollout.max_latency_ratio > 0.0)
            {
                return invalid(
                    "canary_rollout",
                    "thresholds are finite, the error ratio increase not negative and the latency ratio above 0",
                );
            }
        }
        if let Some(volume) = &plan.model_volume
            && (!volume.mount_path.starts_with('/') || volume.mount_path == "/tmp")
        {
            return invalid("model_volume", "the mount path is absolute and not /tmp");
        }
        for model in std::iter::once(&plan.model).chain(plan.canary.as_ref().map(|c| &c.model)) {
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
