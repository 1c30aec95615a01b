//! The inputs: networking.k8s.io/v1 NetworkPolicy and the parts of Pods and
//! Namespaces it reads, as plain data. Field names follow the API; an
//! `Option` is a field the API lets a client omit, where omitted and empty
//! may mean different things (see `Rule`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::selector::LabelSelector;

pub type Labels = BTreeMap<String, String>;

/// Everything a decision reads. The order of the vectors never changes a
/// decision (see `Cluster::pod_at` for the one tie it has to break).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub policies: Vec<Policy>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    /// None until the pod has an address (and for pods that are gone).
    pub ip: Option<Ipv4Addr>,
    /// Such a pod has its node's address: it is no policy target, and as a
    /// peer only an ipBlock can match it.
    #[serde(default)]
    pub host_network: bool,
    /// Every container's ports, the targets of named ports.
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContainerPort {
    /// Empty when the port has no name: a named port never matches it.
    #[serde(default)]
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: LabelSelector,
    /// None (or an empty list, which the API server defaults the same way):
    /// see `Policy::types`.
    #[serde(default)]
    pub policy_types: Option<Vec<PolicyType>>,
    #[serde(default)]
    pub ingress: Option<Vec<Rule>>,
    #[serde(default)]
    pub egress: Option<Vec<Rule>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PolicyType {
    Ingress,
    Egress,
}

/// One ingress (`from`) or egress (`to`) rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// `from` or `to`. None or empty: every peer (API reference: "If this
    /// field is empty or missing, this rule matches all sources").
    #[serde(default)]
    pub peers: Option<Vec<Peer>>,
    /// None or empty: every port and protocol.
    #[serde(default)]
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Peer {
    /// podSelector and/or namespaceSelector; the API rejects a peer with
    /// neither, and so does `Policy::problems`.
    Pods {
        pod_selector: Option<LabelSelector>,
        namespace_selector: Option<LabelSelector>,
    },
    IpBlock(IpBlock),
}

/// Kept as the API's strings; `Policy::problems` parses them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpBlock {
    pub cidr: String,
    #[serde(default)]
    pub except: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    #[serde(default)]
    pub protocol: Protocol,
    /// None: every port of `protocol`.
    #[serde(default)]
    pub port: Option<Port>,
    /// With a numeric `port`: the last port of the range.
    #[serde(default)]
    pub end_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Port {
    Number(u16),
    Name(String),
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IP protocol number, what a packet carries.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
}

/// A policy's identity, for logs and counters.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyRef {
    pub namespace: String,
    pub name: String,
}

impl Policy {
    pub fn reference(&self) -> PolicyRef {
        PolicyRef {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// The directions the policy isolates. API server defaulting
    /// (networking/v1 SetDefaults_NetworkPolicy), which the field comment
    /// states as "policies that contain an Egress section are assumed to
    /// affect Egress, and all policies ... are assumed to affect Ingress":
    /// with policyTypes omitted or empty, Ingress always, and Egress when
    /// the egress list is non-empty (`egress: []` is no section: the server
    /// tests its length).
    pub fn types(&self) -> Directions {
        match &self.policy_types {
            Some(types) if !types.is_empty() => Directions {
                ingress: types.contains(&PolicyType::Ingress),
                egress: types.contains(&PolicyType::Egress),
            },
            _ => Directions {
                ingress: true,
                egress: self.egress.as_ref().is_some_and(|rules| !rules.is_empty()),
            },
        }
    }

    /// Whether the policy applies to `pod`: same namespace, not
    /// hostNetwork, and its podSelector matches. A podSelector that cannot
    /// be read selects every pod of the namespace (fail closed: the policy
    /// might have been meant for any of them).
    pub fn selects(&self, pod: &Pod) -> bool {
        pod.namespace == self.namespace
            && !pod.host_network
            && (self.pod_selector.check().is_err() || self.pod_selector.matches(&pod.labels))
    }

    /// The rules of one direction; omitted is no rules.
    pub fn rules(&self, direction: PolicyType) -> &[Rule] {
        let rules = match direction {
            PolicyType::Ingress => &self.ingress,
            PolicyType::Egress => &self.egress,
        };
        rules.as_deref().unwrap_or(&[])
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Directions {
    pub ingress: bool,
    pub egress: bool,
}

impl Directions {
    pub fn has(self, direction: PolicyType) -> bool {
        match direction {
            PolicyType::Ingress => self.ingress,
            PolicyType::Egress => self.egress,
        }
    }
}

impl Cluster {
    /// The labels of a namespace; a namespace the cluster does not list has
    /// none (the first of two with one name wins).
    pub fn namespace_labels(&self, name: &str) -> Option<&Labels> {
        self.namespaces
            .iter()
            .find(|ns| ns.name == name)
            .map(|ns| &ns.labels)
    }

    /// The pod that a packet to or from `ip` is, if any: hostNetwork pods
    /// and pods without an address are none. Two pods claiming one address
    /// (a finished pod whose address was given again, a stale watch) are
    /// untrusted input, not a panic: the first by (namespace, name) owns it,
    /// the other counts as having no address, everywhere.
    pub fn pod_at(&self, ip: Ipv4Addr) -> Option<&Pod> {
        self.pods
            .iter()
            .filter(|pod| !pod.host_network && pod.ip == Some(ip))
            .min_by(|a, b| owner_order(a, b))
    }
}

/// Which of two pods with one address owns it: the first by (namespace,
/// name), the earlier in the list on a full tie.
pub(crate) fn owner_order(a: &Pod, b: &Pod) -> std::cmp::Ordering {
    (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name))
}
