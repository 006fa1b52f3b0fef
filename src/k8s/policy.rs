//! Disruption and placement: the PodDisruptionBudget, topology spread,
//! zone affinity and pod anti-affinity.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, ContainerPort, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    PodAffinityTerm, PodAntiAffinity, TopologySpreadConstraint, WeightedPodAffinityTerm,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::compat;
use super::plan::{ADMIN_PORT_NAME, Plan, Track};
use super::settings::Disruption;

const ZONE: &str = "topology.kubernetes.io/zone";
const HOSTNAME: &str = "kubernetes.io/hostname";

fn selector(labels: &BTreeMap<String, String>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels.clone()),
        ..LabelSelector::default()
    }
}

/// The PodDisruptionBudget of one track: exactly one bound, a selector equal
/// to the Deployment's, and `AlwaysAllow` so pods that are not ready (stuck
/// loading, or broken) never block a node drain.
pub(crate) fn pdb(plan: &Plan, track: &Track) -> PodDisruptionBudget {
    let (min_available, max_unavailable) = match plan.disruption {
        Disruption::MaxUnavailable(n) => (None, Some(n)),
        Disruption::MinAvailable(n) => (Some(n), None),
    };
    let int = |n: u32| IntOrString::Int(i32::try_from(n).unwrap_or(i32::MAX));
    PodDisruptionBudget {
        metadata: plan.metadata(track, &track.name),
        spec: Some(PodDisruptionBudgetSpec {
            selector: Some(selector(&plan.selector_labels(track))),
            min_available: min_available.map(int),
            max_unavailable: max_unavailable.map(int),
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".to_owned()),
        }),
        ..PodDisruptionBudget::default()
    }
}

/// The NetworkPolicy of one track: ingress only on the named ports (requests,
/// and probes and metrics, on the admin port if there is one), the admin
/// port only from the metrics namespaces if any are named; egress is left
/// open.
pub(crate) fn network_policy(plan: &Plan, track: &Track) -> NetworkPolicy {
    let (admin, open): (Vec<_>, Vec<_>) = plan
        .container_ports()
        .into_iter()
        .partition(|p| p.name.as_deref() == Some(ADMIN_PORT_NAME));
    let rule = |ports: Vec<ContainerPort>, from: Option<Vec<NetworkPolicyPeer>>| {
        let ports = ports.into_iter().map(|p| NetworkPolicyPort {
            port: p.name.map(IntOrString::String),
            protocol: Some("TCP".to_owned()),
            ..NetworkPolicyPort::default()
        });
        NetworkPolicyIngressRule {
            ports: Some(ports.collect()),
            from,
        }
    };
    let ingress = if plan.metrics_namespaces.is_empty() || admin.is_empty() {
        vec![rule([open, admin].concat(), None)]
    } else {
        let scrapers = NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "kubernetes.io/metadata.name".to_owned(),
                    operator: "In".to_owned(),
                    values: Some(plan.metrics_namespaces.clone()),
                }]),
                ..LabelSelector::default()
            }),
            ..NetworkPolicyPeer::default()
        };
        vec![rule(open, None), rule(admin, Some(vec![scrapers]))]
    };
    NetworkPolicy {
        metadata: plan.metadata(track, &track.name),
        spec: compat::wrap(NetworkPolicySpec {
            pod_selector: compat::wrap(selector(&plan.selector_labels(track))),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(ingress),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// Spread over zones and nodes. `matchLabelKeys: [pod-template-hash]`
/// counts only pods of the same ReplicaSet, so a rollout's old pods do not
/// skew where the new ones go.
pub(crate) fn spread(
    plan: &Plan,
    labels: &BTreeMap<String, String>,
) -> Vec<TopologySpreadConstraint> {
    let constraint = |key: &str, strict: bool| TopologySpreadConstraint {
        max_skew: 1,
        topology_key: key.to_owned(),
        when_unsatisfiable: if strict {
            "DoNotSchedule"
        } else {
            "ScheduleAnyway"
        }
        .to_owned(),
        label_selector: Some(selector(labels)),
        match_label_keys: Some(vec!["pod-template-hash".to_owned()]),
        ..TopologySpreadConstraint::default()
    };
    vec![
        constraint(ZONE, plan.spread.strict_zones),
        constraint(HOSTNAME, false),
    ]
}

/// Node affinity for the allowed zones, and optional preferred pod
/// anti-affinity across nodes.
pub(crate) fn affinity(plan: &Plan, labels: &BTreeMap<String, String>) -> Option<Affinity> {
    let node_affinity = (!plan.spread.zones.is_empty()).then(|| NodeAffinity {
        required_during_scheduling_ignored_during_execution: Some(NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: Some(vec![NodeSelectorRequirement {
                    key: ZONE.to_owned(),
                    operator: "In".to_owned(),
                    values: Some(plan.spread.zones.clone()),
                }]),
                ..NodeSelectorTerm::default()
            }],
        }),
        ..NodeAffinity::default()
    });
    let pod_anti_affinity = plan.spread.anti_affinity.then(|| PodAntiAffinity {
        preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
            weight: 100,
            pod_affinity_term: PodAffinityTerm {
                label_selector: Some(selector(labels)),
                topology_key: HOSTNAME.to_owned(),
                ..PodAffinityTerm::default()
            },
        }]),
        ..PodAntiAffinity::default()
    });
    (node_affinity.is_some() || pod_anti_affinity.is_some()).then(|| Affinity {
        node_affinity,
        pod_anti_affinity,
        ..Affinity::default()
    })
}
