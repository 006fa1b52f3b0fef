//! Why a set of manifests was refused.

use std::fmt;
use std::time::Duration;

/// A semantic check the generated objects failed, or a setting that cannot
/// be turned into objects. The builder and [`Manifests::to_yaml`] refuse to
/// emit a set that fails any check.
///
/// [`Manifests::to_yaml`]: super::Manifests::to_yaml
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ManifestError {
    /// A Deployment's, Service's or PodDisruptionBudget's selector does not
    /// match the pods it should select (or matches a pod it should not).
    SelectorMismatch {
        /// `Kind/name` of the object.
        object: String,
    },
    /// A PodDisruptionBudget sets both or neither of `minAvailable` and
    /// `maxUnavailable`.
    PdbBounds {
        /// `Kind/name` of the object.
        object: String,
    },
    /// An autoscaler scales on a metric the process does not export.
    UnknownMetric {
        /// `Kind/name` of the object.
        object: String,
        /// The metric name.
        metric: String,
    },
    /// A probe targets a path or port the probe service does not serve, or
    /// liveness shares its path with readiness.
    ProbePath {
        /// `Kind/name` of the object.
        object: String,
        /// `startup`, `readiness` or `liveness`.
        probe: &'static str,
        /// The path the probe targets.
        path: String,
    },
    /// The startup probe gives up before the model can have loaded.
    StartupBudgetTooShort {
        /// `Kind/name` of the object.
        object: String,
        /// `periodSeconds × failureThreshold` of the startup probe.
        budget: Duration,
        /// The measured or declared load and warm-up time.
        load_time: Duration,
    },
    /// The pod is killed before it can finish its preStop sleep and drain.
    GracePeriodTooShort {
        /// `Kind/name` of the object.
        object: String,
        /// `terminationGracePeriodSeconds`.
        grace: Duration,
        /// The preStop sleep plus the drain timeout.
        required: Duration,
    },
    /// A rollout that needs a spare GPU the pool does not have.
    GpuRolloutDeadlock {
        /// `Kind/name` of the object.
        object: String,
    },
    /// `replicas` is set on a Deployment an autoscaler owns.
    ReplicasWithAutoscaler {
        /// `Kind/name` of the object.
        object: String,
    },
    /// A setting that cannot be turned into valid objects.
    Invalid {
        /// The setting.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The objects could not be serialized.
    Serialize(String),
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SelectorMismatch { object } => {
                write!(f, "{object}: selector does not match the pod labels")
            }
            Self::PdbBounds { object } => write!(
                f,
                "{object}: set exactly one of minAvailable and maxUnavailable"
            ),
            Self::UnknownMetric { object, metric } => write!(
                f,
                "{object}: metric `{metric}` is not one the process exports"
            ),
            Self::ProbePath {
                object,
                probe,
                path,
            } => write!(
                f,
                "{object}: {probe} probe on `{path}`, which the probe service does not serve for it"
            ),
            Self::StartupBudgetTooShort {
                object,
                budget,
                load_time,
            } => write!(
                f,
                "{object}: startup budget {budget:?} is shorter than the load time {load_time:?}"
            ),
            Self::GracePeriodTooShort {
                object,
                grace,
                required,
            } => write!(
                f,
                "{object}: termination grace period {grace:?} is shorter than preStop plus drain {required:?}"
            ),
            Self::GpuRolloutDeadlock { object } => write!(
                f,
                "{object}: a surge rollout on a GPU pool without headroom can deadlock; use maxSurge 0 or Recreate"
            ),
            Self::ReplicasWithAutoscaler { object } => write!(
                f,
                "{object}: replicas is set although an autoscaler owns the scale"
            ),
            Self::Invalid { field, reason } => write!(f, "invalid `{field}`: {reason}"),
            Self::Serialize(reason) => write!(f, "cannot serialize the manifests: {reason}"),
        }
    }
}

impl std::error::Error for ManifestError {}
