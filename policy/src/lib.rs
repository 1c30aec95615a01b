//! Kubernetes NetworkPolicy (networking.k8s.io/v1) decisions as pure data:
//! no I/O, no clocks, no Kubernetes client types, deterministic output.
//!
//! - `model`: the inputs (namespaces, pods, policies) as the API has them;
//! - `reference::allowed`: the specification, one packet at a time;
//! - `compile`: per local pod and isolated direction, the allowed peer
//!   address ranges and port ranges, decided by `RuleSet::allows` the way
//!   the kernel will (one interval-set lookup per packet);
//! - tests show the two agree on generated clusters, policies and packets.
//!
//! Decisions the API reference leaves to the implementation:
//!
//! - **A policy that fails validation** (`Policy::problems`: a selector the
//!   API server would refuse, a bad CIDR, an `except` outside its cidr, a
//!   bad port range, an empty peer) still isolates the pods it selects in
//!   its directions and allows nothing. Dropping it would open everything
//!   it was written to close, and applying the readable part could widen it
//!   (a port list whose only entry is broken would become "all ports").
//!   The agent logs its problems; blocked flows name it. If the podSelector
//!   itself is unreadable, the policy selects every pod of its namespace,
//!   for the same reason.
//! - **ipBlock** matches any address in `cidr` and in none of `except`,
//!   pod addresses included (as the upstream e2e suite expects). IPv6
//!   blocks are valid and match no IPv4 address.
//! - **Named ports** are resolved on the destination pod, for ingress (the
//!   selected pod) and egress (the peer) alike, from its container ports of
//!   the same protocol; a destination that is no pod, or lacks the name,
//!   matches nothing for that entry. Any name is accepted: no name crashes
//!   anything (weave #3032, #3785).
//! - **Who enforces what**: each node compiles its own pods (`compile`'s
//!   `local`), enforces ingress for its local destinations and egress for
//!   its local sources; a packet passes iff both ends' nodes pass it.
//!   Traffic from a destination's own node (`Packet::from_node`) is always
//!   allowed; replies of allowed connections are the kernel's conntrack,
//!   not modelled here.
//! - **Pods that are not endpoints**: hostNetwork pods have their node's
//!   address, are never selected, and as peers only ipBlock matches them;
//!   pods without an address are selected but have no traffic; of two pods
//!   claiming one address the first by (namespace, name) owns it
//!   (`Cluster::pod_at`); a namespace the cluster does not list has no
//!   labels.

pub mod addrs;
pub mod compile;
pub mod model;
pub mod ports;
pub mod reference;
pub mod selector;
#[cfg(test)]
mod testkit;
pub mod validate;

pub use addrs::{AddrRange, AddrSet};
pub use compile::{Grant, Isolation, PodRules, RuleSet, compile};
pub use model::{
    Cluster, ContainerPort, IpBlock, Labels, Namespace, Peer, Pod, Policy, PolicyRef, PolicyType,
    Port, PortSpec, Protocol, Rule,
};
pub use ports::{PortRange, Ports};
pub use reference::{Packet, Side, Verdict, allowed};
pub use selector::{LabelSelector, Operator, Requirement, SelectorError};
pub use validate::{PolicyError, Problem};
