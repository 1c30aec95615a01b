//! The reference evaluator: "is this packet from A to B:port/proto
//! allowed?", written as directly from the API reference as possible (loops
//! over the policies for every packet, nothing precomputed). It is the
//! specification `compile` is tested against, not the data path.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::model::{Cluster, Peer, Pod, Policy, PolicyRef, PolicyType, Port, Rule};

/// The first packet of a connection; replies of an allowed connection are
/// allowed by the kernel's connection tracking, not decided here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP, 1 ICMP...).
    pub protocol: u8,
    /// Ignored by a rule without ports, and by every other rule for a
    /// protocol that has no ports.
    pub dst_port: u16,
    /// Sent by the network stack of the destination's own node (kubelet
    /// probes): always allowed, and no pod's egress. The kernel knows this
    /// from the hook a packet passes (output, not forward), not from the
    /// source address, which may be a pod-range address of the bridge.
    #[serde(default)]
    pub from_node: bool,
}

/// A connection is allowed iff its source's egress allows it and its
/// destination's ingress allows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub egress: Side,
    pub ingress: Side,
}

/// One direction's decision, and the policies that isolate that end in
/// that direction (empty: not isolated), for the log line of a denial.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Side {
    pub allowed: bool,
    pub isolated_by: Vec<PolicyRef>,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.egress.allowed && self.ingress.allowed
    }
}

impl Side {
    fn open() -> Side {
        Side {
            allowed: true,
            isolated_by: Vec::new(),
        }
    }
}

pub fn allowed(cluster: &Cluster, packet: &Packet) -> Verdict {
    if packet.from_node {
        return Verdict {
            egress: Side::open(),
            ingress: Side::open(),
        };
    }
    // Addresses that are no pod (external, nodes, hostNetwork pods) are
    // never isolated.
    let side = |end: Ipv4Addr, direction, peer| match cluster.pod_at(end) {
        Some(pod) => decide(cluster, pod, direction, peer, packet),
        None => Side::open(),
    };
    Verdict {
        egress: side(packet.src, PolicyType::Egress, packet.dst),
        ingress: side(packet.dst, PolicyType::Ingress, packet.src),
    }
}

/// `target`'s decision in `direction` about traffic with `peer`.
fn decide(
    cluster: &Cluster,
    target: &Pod,
    direction: PolicyType,
    peer: Ipv4Addr,
    packet: &Packet,
) -> Side {
    let mut isolated_by = Vec::new();
    let mut allowed = false;
    for policy in &cluster.policies {
        if !policy.selects(target) || !policy.types().has(direction) {
            continue;
        }
        isolated_by.push(policy.reference());
        if policy.fails_closed() {
            continue;
        }
        for rule in policy.rules(direction) {
            if rule_peer_matches(cluster, policy, rule, peer)
                && rule_port_matches(cluster, rule, packet)
            {
                allowed = true;
            }
        }
    }
    isolated_by.sort();
    isolated_by.dedup();
    Side {
        allowed: allowed || isolated_by.is_empty(),
        isolated_by,
    }
}

/// "If this field is empty or missing, this rule matches all sources
/// (traffic not restricted by source). If this field is present and
/// contains at least one item, this rule allows traffic only if the
/// traffic matches at least one item in the from list."
fn rule_peer_matches(cluster: &Cluster, policy: &Policy, rule: &Rule, peer: Ipv4Addr) -> bool {
    let peers = rule.peers.as_deref().unwrap_or(&[]);
    peers.is_empty() || peers.iter().any(|p| peer_matches(cluster, policy, p, peer))
}

fn peer_matches(cluster: &Cluster, policy: &Policy, peer: &Peer, ip: Ipv4Addr) -> bool {
    match peer {
        Peer::Pods {
            pod_selector,
            namespace_selector,
        } => {
            let Some(pod) = cluster.pod_at(ip) else {
                return false;
            };
            let namespace_ok = match namespace_selector {
                // podSelector alone: pods of the policy's own namespace.
                None => pod.namespace == policy.namespace,
                Some(selector) => {
                    let none = Default::default();
                    let labels = cluster.namespace_labels(&pod.namespace).unwrap_or(&none);
                    selector.matches(labels)
                }
            };
            namespace_ok && pod_selector.as_ref().is_none_or(|s| s.matches(&pod.labels))
        }
        // Any address, pod or not: the upstream suite applies ipBlock to
        // pod addresses too.
        Peer::IpBlock(block) => block.parse().is_ok_and(|(cidr, except)| {
            cidr.contains(ip) && !except.iter().any(|hole| hole.contains(ip))
        }),
    }
}

/// "If this field is empty or missing, this rule matches all ports... If
/// this field is present and contains at least one item, then this rule
/// allows traffic only if the traffic matches at least one port in the
/// list."
fn rule_port_matches(cluster: &Cluster, rule: &Rule, packet: &Packet) -> bool {
    let ports = rule.ports.as_deref().unwrap_or(&[]);
    ports.is_empty()
        || ports.iter().any(|spec| {
            spec.protocol.number() == packet.protocol
                && match &spec.port {
                    None => true,
                    Some(Port::Number(first)) => {
                        let last = spec.end_port.unwrap_or(*first);
                        (*first..=last).contains(&packet.dst_port)
                    }
                    // A named port is the destination pod's: ingress and
                    // egress alike. No such pod, or no such name: no match.
                    Some(Port::Name(name)) => cluster.pod_at(packet.dst).is_some_and(|pod| {
                        pod.ports.iter().any(|c| {
                            !c.name.is_empty()
                                && c.name == *name
                                && c.protocol == spec.protocol
                                && c.port == packet.dst_port
                        })
                    }),
                }
        })
}

#[cfg(test)]
mod tests;
