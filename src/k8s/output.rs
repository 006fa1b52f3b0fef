//! The generated objects, and their YAML and JSON forms.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use super::custom::{AnalysisTemplate, HttpRoute, Rollout, ScaledObject};
use super::error::ManifestError;
use crate::health::ProbePaths;

/// One generated Kubernetes object.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum Object {
    /// `apps/v1` Deployment.
    Deployment(Box<Deployment>),
    /// `v1` Service.
    Service(Box<Service>),
    /// `policy/v1` PodDisruptionBudget.
    PodDisruptionBudget(Box<PodDisruptionBudget>),
    /// `networking.k8s.io/v1` NetworkPolicy.
    NetworkPolicy(Box<NetworkPolicy>),
    /// `autoscaling/v2` HorizontalPodAutoscaler.
    HorizontalPodAutoscaler(Box<HorizontalPodAutoscaler>),
    /// `v1` ConfigMap (the prometheus-adapter rules).
    ConfigMap(Box<ConfigMap>),
    /// KEDA `keda.sh/v1alpha1` ScaledObject.
    ScaledObject(Box<ScaledObject>),
    /// Gateway API `gateway.networking.k8s.io/v1` HTTPRoute.
    HttpRoute(Box<HttpRoute>),
    /// Argo Rollouts `argoproj.io/v1alpha1` Rollout.
    Rollout(Box<Rollout>),
    /// Argo Rollouts `argoproj.io/v1alpha1` AnalysisTemplate.
    AnalysisTemplate(Box<AnalysisTemplate>),
}

impl Object {
    /// The object's `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Deployment(_) => "Deployment",
            Self::Service(_) => "Service",
            Self::PodDisruptionBudget(_) => "PodDisruptionBudget",
            Self::NetworkPolicy(_) => "NetworkPolicy",
            Self::HorizontalPodAutoscaler(_) => "HorizontalPodAutoscaler",
            Self::ConfigMap(_) => "ConfigMap",
            Self::ScaledObject(_) => "ScaledObject",
            Self::HttpRoute(_) => "HTTPRoute",
            Self::Rollout(_) => "Rollout",
            Self::AnalysisTemplate(_) => "AnalysisTemplate",
        }
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Self::Deployment(o) => &o.metadata,
            Self::Service(o) => &o.metadata,
            Self::PodDisruptionBudget(o) => &o.metadata,
            Self::NetworkPolicy(o) => &o.metadata,
            Self::HorizontalPodAutoscaler(o) => &o.metadata,
            Self::ConfigMap(o) => &o.metadata,
            Self::ScaledObject(o) => &o.metadata,
            Self::HttpRoute(o) => &o.metadata,
            Self::Rollout(o) => &o.metadata,
            Self::AnalysisTemplate(o) => &o.metadata,
        }
    }

    /// `Kind/name`, as errors name objects.
    pub fn id(&self) -> String {
        format!(
            "{}/{}",
            self.kind(),
            self.metadata().name.as_deref().unwrap_or_default()
        )
    }
}

/// The objects for one region (one cluster).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ManifestSet {
    /// The region, or `None` in a single-region layout.
    pub region: Option<String>,
    /// The objects, in the order they are best applied.
    pub objects: Vec<Object>,
}

/// What the process serves, which the objects must agree with.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Expectations {
    pub(crate) probes: ProbePaths,
    /// The named port probes must target, and its number.
    pub(crate) probe_port: (&'static str, u16),
    pub(crate) load_time: Duration,
    pub(crate) drain_timeout: Duration,
    /// The GPU resource, when the pool has no spare GPU for a surge pod.
    pub(crate) gpu_without_headroom: Option<String>,
}

/// Everything a [`ManifestBuilder`](super::ManifestBuilder) generated: one
/// [`ManifestSet`] per region.
///
/// The objects are public and may be edited; [`to_yaml`](Self::to_yaml) and
/// [`to_json`](Self::to_json) check them again ([`lint`](Self::lint)) and
/// refuse to emit a set that no longer agrees with the serving
/// configuration.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Manifests {
    /// One set per region.
    pub sets: Vec<ManifestSet>,
    pub(crate) expect: Expectations,
}

impl Manifests {
    /// Every object of every region.
    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.sets.iter().flat_map(|set| set.objects.iter())
    }

    /// The Deployments of every region.
    pub fn deployments(&self) -> impl Iterator<Item = &Deployment> {
        self.objects().filter_map(|object| match object {
            Object::Deployment(d) => Some(&**d),
            _ => None,
        })
    }

    /// All objects as one multi-document YAML stream, each region's set
    /// preceded by a `# region:` comment. Checks them first.
    pub fn to_yaml(&self) -> Result<String, ManifestError> {
        self.lint()?;
        let mut out = String::new();
        for set in &self.sets {
            if let Some(region) = &set.region {
                if !out.is_empty() {
                    out.push_str("---\n");
                }
                out.push_str(&format!("# region: {region}\n"));
            } else if !out.is_empty() {
                out.push_str("---\n");
            }
            out.push_str(&yaml_documents(&set.objects)?);
        }
        Ok(out)
    }

    /// The objects of one region (or of the single set, for `None`) as a
    /// multi-document YAML stream. Checks all sets first.
    pub fn region_yaml(&self, region: Option<&str>) -> Result<String, ManifestError> {
        self.lint()?;
        let set = self
            .sets
            .iter()
            .find(|set| set.region.as_deref() == region)
            .ok_or_else(|| ManifestError::Invalid {
                field: "region",
                reason: format!("no set for region {region:?}"),
            })?;
        yaml_documents(&set.objects)
    }

    /// All objects as one `v1` `List`, pretty-printed JSON. Checks them first.
    pub fn to_json(&self) -> Result<String, ManifestError> {
        self.lint()?;
        let items: Vec<&Object> = self.objects().collect();
        let list = serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": items });
        serde_json::to_string_pretty(&list).map_err(|e| ManifestError::Serialize(e.to_string()))
    }
}

fn yaml_documents(objects: &[Object]) -> Result<String, ManifestError> {
    serde_saphyr::to_string_multiple_with_options(objects, yaml_options())
        .map_err(|e| ManifestError::Serialize(e.to_string()))
}

/// Long one-line strings (image references, PromQL) stay on one line, so
/// the YAML reads, and greps, like what was built; multi-line strings
/// (the adapter's `config.yaml`) are literal blocks.
pub(crate) fn yaml_options() -> serde_saphyr::SerializerOptions {
    let mut options = serde_saphyr::SerializerOptions::default();
    options.folded_wrap_chars = usize::MAX;
    options
}
