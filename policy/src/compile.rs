//! The compiler: from a cluster to, for each local pod and each direction
//! it is isolated in, the addresses and ports it may talk with, as disjoint
//! interval sets. `RuleSet::allows` decides from those sets alone, the way
//! the kernel will.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::addrs::{AddrRange, AddrSet, ip_at, position};
use crate::model::{
    Cluster, ContainerPort, Labels, Peer, Pod, Policy, PolicyRef, PolicyType, Port, Protocol, Rule,
};
use crate::ports::{PortRange, Ports};
use crate::reference::Packet;

/// One node's rules: every local pod that has its address, by address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSet {
    pub pods: BTreeMap<Ipv4Addr, PodRules>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRules {
    pub namespace: String,
    pub name: String,
    /// None: not isolated for ingress, everything may come in.
    pub ingress: Option<Isolation>,
    /// None: not isolated for egress, everything may go out.
    pub egress: Option<Isolation>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isolation {
    /// The policies that isolate the pod in this direction (for the log
    /// line of a blocked flow), sorted.
    pub policies: Vec<PolicyRef>,
    /// What is allowed: peer ranges sorted and disjoint, none with an empty
    /// port set, no two adjacent ranges with equal ports. Empty: deny all.
    pub grants: Vec<Grant>,
}

/// The peers in `peers` may be reached on (egress) or may reach (ingress)
/// the pod on `ports`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub peers: AddrRange,
    pub ports: Ports,
}

impl RuleSet {
    /// This node's verdict: the ingress of its local destinations and the
    /// egress of its local sources. A cluster allows a packet iff every
    /// node's rule set does (in practice: the source's and the
    /// destination's node).
    pub fn allows(&self, packet: &Packet) -> bool {
        self.ingress_allows(packet) && self.egress_allows(packet)
    }

    pub fn ingress_allows(&self, packet: &Packet) -> bool {
        self.side_allows(packet.dst, packet.src, packet, |pod| &pod.ingress)
    }

    pub fn egress_allows(&self, packet: &Packet) -> bool {
        self.side_allows(packet.src, packet.dst, packet, |pod| &pod.egress)
    }

    /// Whether `end`'s side lets it talk with `peer`; an address that is
    /// no local pod, or a pod not isolated that way, lets everything pass.
    fn side_allows(
        &self,
        end: Ipv4Addr,
        peer: Ipv4Addr,
        packet: &Packet,
        side: impl Fn(&PodRules) -> &Option<Isolation>,
    ) -> bool {
        packet.from_node
            || self
                .pods
                .get(&end)
                .and_then(|pod| side(pod).as_ref())
                .is_none_or(|isolation| isolation.allows(peer, packet))
    }
}

impl Isolation {
    fn allows(&self, peer: Ipv4Addr, packet: &Packet) -> bool {
        let at = self.grants.partition_point(|g| g.peers.last < peer);
        self.grants.get(at).is_some_and(|g| {
            g.peers.contains(peer) && g.ports.contains(packet.protocol, packet.dst_port)
        })
    }
}

/// Rules for the pods `local` says are this node's (hostNetwork pods,
/// pods without an address and pods whose address another pod owns get
/// none: see `Cluster::pod_at`).
pub fn compile(cluster: &Cluster, local: impl Fn(&Pod) -> bool) -> RuleSet {
    let index = Index::new(cluster);
    let compiled: Vec<CompiledPolicy> = cluster
        .policies
        .iter()
        .map(|policy| CompiledPolicy::new(&index, policy))
        .collect();
    let mut by_namespace: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, policy) in compiled.iter().enumerate() {
        by_namespace
            .entry(&policy.policy.namespace)
            .or_default()
            .push(i);
    }
    // Replicas share their policies and container ports, and so their
    // rules: each distinct (policies, direction, ports) is worked out once.
    let mut known: BTreeMap<SideKey, Option<Isolation>> = BTreeMap::new();
    let mut pods = BTreeMap::new();
    for (&ip, &pod) in &index.owners {
        if !local(pod) {
            continue;
        }
        let policies = by_namespace
            .get(pod.namespace.as_str())
            .map_or(&[][..], Vec::as_slice);
        let selecting: Vec<usize> = policies
            .iter()
            .copied()
            .filter(|&i| compiled[i].policy.selects(pod))
            .collect();
        let mut side = |direction| {
            // Only ingress reads the pod's own ports (its named ports).
            let ports = match direction {
                PolicyType::Ingress => pod.ports.as_slice(),
                PolicyType::Egress => &[],
            };
            known
                .entry((selecting.clone(), direction, ports))
                .or_insert_with(|| {
                    let selecting: Vec<&CompiledPolicy> =
                        selecting.iter().map(|&i| &compiled[i]).collect();
                    isolation(&selecting, direction, pod)
                })
                .clone()
        };
        let rules = PodRules {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            ingress: side(PolicyType::Ingress),
            egress: side(PolicyType::Egress),
        };
        pods.insert(ip, rules);
    }
    RuleSet { pods }
}

/// What one side of a pod's rules depends on: the policies selecting it
/// (indices), the direction, and (ingress only) its container ports.
type SideKey<'a> = (Vec<usize>, PolicyType, &'a [ContainerPort]);

/// The lookups every policy needs, built once.
struct Index<'a> {
    /// Each address's owning pod.
    owners: BTreeMap<Ipv4Addr, &'a Pod>,
    /// The owners' addresses by their container ports, so an egress named
    /// port is resolved once per distinct set of ports, not per pod.
    by_ports: BTreeMap<&'a [ContainerPort], AddrSet>,
    namespaces: BTreeMap<&'a str, &'a Labels>,
}

impl<'a> Index<'a> {
    fn new(cluster: &'a Cluster) -> Index<'a> {
        let mut owners: BTreeMap<Ipv4Addr, &Pod> = BTreeMap::new();
        for pod in cluster.pods.iter().filter(|p| !p.host_network) {
            let Some(ip) = pod.ip else { continue };
            let owner = owners.entry(ip).or_insert(pod);
            if crate::model::owner_order(pod, owner).is_lt() {
                *owner = pod;
            }
        }
        let mut namespaces = BTreeMap::new();
        for ns in &cluster.namespaces {
            namespaces.entry(ns.name.as_str()).or_insert(&ns.labels);
        }
        let mut by_ports: BTreeMap<&[ContainerPort], Vec<Ipv4Addr>> = BTreeMap::new();
        for (&ip, pod) in &owners {
            by_ports.entry(&pod.ports).or_default().push(ip);
        }
        let by_ports = by_ports
            .into_iter()
            .map(|(ports, ips)| (ports, AddrSet::from_addrs(ips)))
            .collect();
        Index {
            owners,
            by_ports,
            namespaces,
        }
    }

    fn peer_addrs(&self, policy: &Policy, peer: &Peer) -> AddrSet {
        match peer {
            Peer::Pods {
                pod_selector,
                namespace_selector,
            } => {
                let none = Labels::new();
                AddrSet::from_addrs(self.owners.iter().filter_map(|(&ip, pod)| {
                    let namespace_ok = match namespace_selector {
                        None => pod.namespace == policy.namespace,
                        Some(s) => s.matches(
                            self.namespaces
                                .get(pod.namespace.as_str())
                                .copied()
                                .unwrap_or(&none),
                        ),
                    };
                    let pod_ok = pod_selector.as_ref().is_none_or(|s| s.matches(&pod.labels));
                    (namespace_ok && pod_ok).then_some(ip)
                }))
            }
            Peer::IpBlock(block) => match block.parse() {
                Ok((cidr, except)) => {
                    let block = AddrSet::from_ranges(cidr.v4_range().into_iter().collect());
                    let holes =
                        AddrSet::from_ranges(except.iter().filter_map(|c| c.v4_range()).collect());
                    block.minus(&holes)
                }
                Err(_) => AddrSet::default(),
            },
        }
    }
}

/// A policy's rules with everything that does not depend on the target
/// pod worked out once.
struct CompiledPolicy<'a> {
    policy: &'a Policy,
    fails_closed: bool,
    ingress: Vec<CompiledRule<'a>>,
    egress: Vec<CompiledRule<'a>>,
}

struct CompiledRule<'a> {
    peers: AddrSet,
    /// Numbered and unnumbered port entries (Any without `ports`).
    ports: Ports,
    /// Named entries, resolved on the target pod (ingress).
    names: Vec<(Protocol, &'a str)>,
    /// Named entries resolved on each destination pod among `peers`
    /// (egress), grouped by what they resolve to.
    named_grants: Vec<(Ports, AddrSet)>,
}

impl<'a> CompiledPolicy<'a> {
    fn new(index: &Index<'a>, policy: &'a Policy) -> CompiledPolicy<'a> {
        let fails_closed = policy.fails_closed();
        let rules = |direction| {
            if fails_closed {
                return Vec::new();
            }
            policy
                .rules(direction)
                .iter()
                .map(|rule| CompiledRule::new(index, policy, rule, direction))
                .collect()
        };
        CompiledPolicy {
            policy,
            fails_closed,
            ingress: rules(PolicyType::Ingress),
            egress: rules(PolicyType::Egress),
        }
    }

    fn rules(&self, direction: PolicyType) -> &[CompiledRule<'a>] {
        match direction {
            PolicyType::Ingress => &self.ingress,
            PolicyType::Egress => &self.egress,
        }
    }
}

impl<'a> CompiledRule<'a> {
    fn new(
        index: &Index<'a>,
        policy: &Policy,
        rule: &'a Rule,
        direction: PolicyType,
    ) -> CompiledRule<'a> {
        let peers = match rule.peers.as_deref() {
            None | Some([]) => AddrSet::all(),
            Some(peers) => peers.iter().fold(AddrSet::default(), |set, peer| {
                set.union(&index.peer_addrs(policy, peer))
            }),
        };
        let (ports, names) = match rule.ports.as_deref() {
            None | Some([]) => (Ports::Any, Vec::new()),
            Some(specs) => {
                let mut ranges = Vec::new();
                let mut names = Vec::new();
                for spec in specs {
                    let (first, last) = match &spec.port {
                        None => (0, u16::MAX),
                        Some(Port::Number(first)) => (*first, spec.end_port.unwrap_or(*first)),
                        Some(Port::Name(name)) => {
                            names.push((spec.protocol, name.as_str()));
                            continue;
                        }
                    };
                    ranges.push(PortRange {
                        protocol: spec.protocol,
                        first,
                        last,
                    });
                }
                (Ports::from_ranges(ranges), names)
            }
        };
        let named_grants = match direction {
            PolicyType::Egress if !names.is_empty() => destination_grants(index, &peers, &names),
            _ => Vec::new(),
        };
        CompiledRule {
            peers,
            ports,
            names,
            named_grants,
        }
    }
}

/// Egress named ports: each destination pod's own numbers, grouped so
/// pods whose names resolve alike share one grant.
fn destination_grants(
    index: &Index,
    peers: &AddrSet,
    names: &[(Protocol, &str)],
) -> Vec<(Ports, AddrSet)> {
    let mut groups: BTreeMap<Ports, AddrSet> = BTreeMap::new();
    for (ports, addrs) in &index.by_ports {
        let resolved = resolve(ports, names);
        let reached = addrs.intersection(peers);
        if !resolved.is_empty() && !reached.is_empty() {
            let group = groups.entry(resolved).or_default();
            *group = group.union(&reached);
        }
    }
    groups.into_iter().collect()
}

/// A pod's numbers for named ports: container ports with that name and
/// protocol; a name the pod lacks resolves to nothing.
fn resolve(ports: &[ContainerPort], names: &[(Protocol, &str)]) -> Ports {
    Ports::from_ranges(
        names
            .iter()
            .flat_map(|&(protocol, name)| {
                ports
                    .iter()
                    .filter(move |c| !c.name.is_empty() && c.name == name && c.protocol == protocol)
                    .map(move |c| PortRange {
                        protocol,
                        first: c.port,
                        last: c.port,
                    })
            })
            .collect(),
    )
}

fn isolation(selecting: &[&CompiledPolicy], direction: PolicyType, pod: &Pod) -> Option<Isolation> {
    let isolating: Vec<&&CompiledPolicy> = selecting
        .iter()
        .filter(|p| p.policy.types().has(direction))
        .collect();
    if isolating.is_empty() {
        return None;
    }
    let mut policies: Vec<PolicyRef> = isolating.iter().map(|p| p.policy.reference()).collect();
    policies.sort();
    policies.dedup();
    // Grants by port set, so the sweep below meets few distinct sets.
    let mut by_ports: BTreeMap<Ports, AddrSet> = BTreeMap::new();
    let mut add = |ports: Ports, peers: &AddrSet| {
        if !ports.is_empty() && !peers.is_empty() {
            let set = by_ports.entry(ports).or_default();
            *set = set.union(peers);
        }
    };
    for policy in isolating.iter().filter(|p| !p.fails_closed) {
        for rule in policy.rules(direction) {
            match direction {
                PolicyType::Ingress => add(
                    rule.ports.union(&resolve(&pod.ports, &rule.names)),
                    &rule.peers,
                ),
                PolicyType::Egress => {
                    add(rule.ports.clone(), &rule.peers);
                    for (ports, peers) in &rule.named_grants {
                        add(ports.clone(), peers);
                    }
                }
            }
        }
    }
    Some(Isolation {
        policies,
        grants: disjoint(by_ports),
    })
}

/// Overlapping (ports, addresses) pairs as disjoint address ranges, each
/// with the union of the ports of every pair that covers it.
fn disjoint(by_ports: BTreeMap<Ports, AddrSet>) -> Vec<Grant> {
    let groups: Vec<(Ports, AddrSet)> = by_ports.into_iter().collect();
    let mut bounds: Vec<u64> = groups
        .iter()
        .flat_map(|(_, set)| set.ranges())
        .flat_map(|r| [position(r.first), position(r.last) + 1])
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    let mut cursors = vec![0usize; groups.len()];
    let mut grants: Vec<Grant> = Vec::new();
    for pair in bounds.windows(2) {
        let (start, end) = (pair[0], pair[1] - 1);
        let mut ports = Ports::none();
        for ((group_ports, set), cursor) in groups.iter().zip(cursors.iter_mut()) {
            let ranges = set.ranges();
            while ranges
                .get(*cursor)
                .is_some_and(|r| position(r.last) < start)
            {
                *cursor += 1;
            }
            if ranges
                .get(*cursor)
                .is_some_and(|r| position(r.first) <= start)
            {
                ports = ports.union(group_ports);
            }
        }
        if ports.is_empty() {
            continue;
        }
        let (first, last) = (ip_at(start), ip_at(end));
        match grants.last_mut() {
            Some(prev) if prev.ports == ports && position(prev.peers.last) + 1 == start => {
                prev.peers.last = last;
            }
            _ => grants.push(Grant {
                peers: AddrRange { first, last },
                ports,
            }),
        }
    }
    grants
}

#[cfg(test)]
mod tests;
