//! NetworkPolicies, Pods and Namespaces as the API serves them, turned into
//! weft-policy's model (`weft_policy::Cluster`'s parts). Pure: no I/O.
//!
//! API objects are untrusted input. Nothing here panics, and a field the
//! model cannot hold (an unknown protocol or operator or policy type, a
//! port number out of range, a peer mixing ipBlock with selectors) becomes
//! something `Policy::problems` flags, so the policy fails closed (see
//! weft-policy's crate docs), never a rule wider than the object's. Each
//! such field is also named in the conversion's `unreadable` list, for the
//! log, because the problem the model reports for it is a stand-in.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Container, Namespace as KubeNamespace, Pod as KubePod};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as KubeSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weft_policy::{
    ContainerPort, IpBlock, LabelSelector, Namespace, Operator, Peer, Pod, Policy, PolicyType,
    Port, PortSpec, Protocol, Requirement, Rule,
};

/// A converted policy and the fields of it the model could not hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Converted {
    pub policy: Policy,
    /// Where and what, e.g. `ingress[0].ports[1].protocol: "ICMP"`; each
    /// makes the policy fail closed.
    pub unreadable: Vec<String>,
}

/// The policy a NetworkPolicy stands for; `None` without name or
/// namespace (the API server always sets both).
pub fn policy_of(np: &NetworkPolicy) -> Option<Converted> {
    let namespace = np.metadata.namespace.clone().filter(|n| !n.is_empty())?;
    let name = np.metadata.name.clone().filter(|n| !n.is_empty())?;
    let mut cx = Context::default();
    let spec = np.spec.clone().unwrap_or_default();
    let policy = cx.policy(namespace, name, &spec);
    Some(Converted {
        policy,
        unreadable: cx.unreadable,
    })
}

/// The model's view of a Pod; `None` for a Pod without name or namespace
/// and for a terminated one (phase Succeeded or Failed: its address may
/// already be another pod's).
pub fn pod_of(pod: &KubePod) -> Option<Pod> {
    let namespace = pod.metadata.namespace.clone().filter(|n| !n.is_empty())?;
    let name = pod.metadata.name.clone().filter(|n| !n.is_empty())?;
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let spec = pod.spec.as_ref();
    Some(Pod {
        namespace,
        name,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ip: status.and_then(pod_ipv4),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        ports: spec.map(serving_ports).unwrap_or_default(),
    })
}

/// The model's view of a Namespace; `None` without a name.
pub fn namespace_of(ns: &KubeNamespace) -> Option<Namespace> {
    Some(Namespace {
        name: ns.metadata.name.clone().filter(|n| !n.is_empty())?,
        labels: ns.metadata.labels.clone().unwrap_or_default(),
    })
}

/// The pod's IPv4 address: the first of `podIPs` (dual-stack lists one
/// per family), else `podIP`. Text that is no IPv4 address is none.
fn pod_ipv4(status: &k8s_openapi::api::core::v1::PodStatus) -> Option<Ipv4Addr> {
    let listed = status.pod_ips.iter().flatten().map(|ip| ip.ip.as_str());
    listed
        .chain(status.pod_ip.as_deref())
        .find_map(|text| text.parse().ok())
}

/// The ports named ports resolve to, as upstream resolves a Service's
/// named targetPort (k8s.io/kubernetes pkg/api/v1/pod FindPort): the app
/// containers' ports, then those of sidecars (init containers with
/// restartPolicy Always, which keep running). Plain init containers have
/// finished before the pod serves. A port the model cannot hold (number
/// out of range, unknown protocol) is left out: a name that resolves to
/// nothing matches nothing, which is narrower, never wider.
fn serving_ports(spec: &k8s_openapi::api::core::v1::PodSpec) -> Vec<ContainerPort> {
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    spec.containers
        .iter()
        .chain(sidecars)
        .flat_map(container_ports)
        .collect()
}

fn container_ports(c: &Container) -> impl Iterator<Item = ContainerPort> + '_ {
    c.ports.iter().flatten().filter_map(|p| {
        Some(ContainerPort {
            name: p.name.clone().unwrap_or_default(),
            port: u16::try_from(p.container_port).ok().filter(|&n| n != 0)?,
            protocol: protocol(p.protocol.as_deref())?,
        })
    })
}

/// Missing is TCP (the API's default); anything else unknown is `None`.
fn protocol(text: Option<&str>) -> Option<Protocol> {
    match text {
        None | Some("TCP") => Some(Protocol::Tcp),
        Some("UDP") => Some(Protocol::Udp),
        Some("SCTP") => Some(Protocol::Sctp),
        Some(_) => None,
    }
}

/// Collects what could not be converted while walking one policy.
#[derive(Default)]
struct Context {
    unreadable: Vec<String>,
}

/// Stand-ins the model's validation flags, for fields it cannot hold.
mod stand_in {
    use weft_policy::{IpBlock, Peer, Port, PortSpec, Protocol, Rule};

    /// Port 0 is `Problem::PortZero`.
    pub fn bad_port() -> PortSpec {
        PortSpec {
            protocol: Protocol::Tcp,
            port: Some(Port::Number(0)),
            end_port: None,
        }
    }

    /// An empty cidr is `Problem::BadCidr`.
    pub fn bad_peer() -> Peer {
        Peer::IpBlock(IpBlock {
            cidr: String::new(),
            except: Vec::new(),
        })
    }

    /// A rule whose only port is port 0: makes its policy fail closed.
    pub fn bad_rule() -> Rule {
        Rule {
            peers: None,
            ports: Some(vec![bad_port()]),
        }
    }
}

impl Context {
    fn note(&mut self, at: &str, what: impl std::fmt::Display) {
        self.unreadable.push(format!("{at}: {what}"));
    }

    fn policy(&mut self, namespace: String, name: String, spec: &NetworkPolicySpec) -> Policy {
        let pod_selector = spec
            .pod_selector
            .as_ref()
            .map(|s| self.selector("podSelector", s))
            .unwrap_or_default();
        let mut ingress = spec.ingress.as_ref().map(|rules| {
            let rules = rules.iter().enumerate();
            rules
                .map(|(i, r)| self.rule(&format!("ingress[{i}]"), "from", &r.from, &r.ports))
                .collect::<Vec<_>>()
        });
        let egress = spec.egress.as_ref().map(|rules| {
            let rules = rules.iter().enumerate();
            rules
                .map(|(i, r)| self.rule(&format!("egress[{i}]"), "to", &r.to, &r.ports))
                .collect()
        });
        let policy_types = spec.policy_types.as_ref().map(|types| {
            let known: Vec<PolicyType> = types.iter().filter_map(|t| policy_type(t)).collect();
            if known.len() == types.len() {
                return known;
            }
            self.note("policyTypes", format!("{types:?}"));
            // Unknown direction: isolate both, and fail closed in both.
            ingress
                .get_or_insert_with(Vec::new)
                .push(stand_in::bad_rule());
            vec![PolicyType::Ingress, PolicyType::Egress]
        });
        Policy {
            namespace,
            name,
            pod_selector,
            policy_types,
            ingress,
            egress,
        }
    }

    fn rule(
        &mut self,
        at: &str,
        peers_field: &str,
        peers: &Option<Vec<NetworkPolicyPeer>>,
        ports: &Option<Vec<NetworkPolicyPort>>,
    ) -> Rule {
        let peers = peers.as_ref().map(|peers| {
            let peers = peers.iter().enumerate();
            peers
                .map(|(i, p)| self.peer(&format!("{at}.{peers_field}[{i}]"), p))
                .collect()
        });
        let ports = ports.as_ref().map(|ports| {
            let ports = ports.iter().enumerate();
            ports
                .map(|(i, p)| self.port(&format!("{at}.ports[{i}]"), p))
                .collect()
        });
        Rule { peers, ports }
    }

    fn peer(&mut self, at: &str, peer: &NetworkPolicyPeer) -> Peer {
        let selectors = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
        match &peer.ip_block {
            Some(_) if selectors => {
                self.note(at, "ipBlock together with a selector");
                stand_in::bad_peer()
            }
            Some(block) => Peer::IpBlock(IpBlock {
                cidr: block.cidr.clone(),
                except: block.except.clone().unwrap_or_default(),
            }),
            None => Peer::Pods {
                pod_selector: (peer.pod_selector.as_ref())
                    .map(|s| self.selector(&format!("{at}.podSelector"), s)),
                namespace_selector: (peer.namespace_selector.as_ref())
                    .map(|s| self.selector(&format!("{at}.namespaceSelector"), s)),
            },
        }
    }

    fn port(&mut self, at: &str, spec: &NetworkPolicyPort) -> PortSpec {
        let Some(protocol) = protocol(spec.protocol.as_deref()) else {
            self.note(&format!("{at}.protocol"), format!("{:?}", spec.protocol));
            return stand_in::bad_port();
        };
        let port = spec.port.as_ref().map(|p| match p {
            IntOrString::Int(n) => Port::Number(self.number(&format!("{at}.port"), *n)),
            IntOrString::String(name) => Port::Name(name.clone()),
        });
        let end_port = spec
            .end_port
            .map(|n| self.number(&format!("{at}.endPort"), n));
        PortSpec {
            protocol,
            port,
            end_port,
        }
    }

    /// A port number; one outside 0..=65535 becomes 0 (`PortZero`).
    fn number(&mut self, at: &str, n: i32) -> u16 {
        u16::try_from(n).unwrap_or_else(|_| {
            self.note(at, n);
            0
        })
    }

    fn selector(&mut self, at: &str, s: &KubeSelector) -> LabelSelector {
        let expressions = s.match_expressions.iter().flatten().enumerate();
        LabelSelector {
            match_labels: s.match_labels.clone().unwrap_or_default(),
            match_expressions: expressions
                .map(|(i, e)| {
                    let values = e.values.clone().unwrap_or_default();
                    match operator(&e.operator) {
                        Some(operator) => Requirement {
                            key: e.key.clone(),
                            operator,
                            values,
                        },
                        None => {
                            let at = format!("{at}.matchExpressions[{i}].operator");
                            self.note(&at, format!("{:?}", e.operator));
                            // `In` with no values is `SelectorError::NoValues`.
                            Requirement {
                                key: e.key.clone(),
                                operator: Operator::In,
                                values: Vec::new(),
                            }
                        }
                    }
                })
                .collect(),
        }
    }
}

fn operator(text: &str) -> Option<Operator> {
    match text {
        "In" => Some(Operator::In),
        "NotIn" => Some(Operator::NotIn),
        "Exists" => Some(Operator::Exists),
        "DoesNotExist" => Some(Operator::DoesNotExist),
        _ => None,
    }
}

fn policy_type(text: &str) -> Option<PolicyType> {
    match text {
        "Ingress" => Some(PolicyType::Ingress),
        "Egress" => Some(PolicyType::Egress),
        _ => None,
    }
}

pub mod watch;

#[cfg(test)]
mod tests;
