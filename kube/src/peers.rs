//! Peer discovery: every Node is a peer at its InternalIP (else ExternalIP).

use std::collections::{BTreeMap, BTreeSet};
use std::future::ready;
use std::net::IpAddr;

use futures_util::{Stream, StreamExt, stream};
use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::error::{Result, api as api_err};

/// One node as the agent sees it. Ordered by node name first, so a
/// `BTreeSet<Peer>` lists nodes alphabetically.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Peer {
    /// `metadata.name` of the Node.
    pub node_name: String,
    /// Underlay address: the first parseable InternalIP, else ExternalIP.
    pub addr: IpAddr,
    /// `spec.podCIDR` as written by the API (node-cidr mode parses it).
    pub pod_cidr: Option<String>,
}

/// The address other agents reach this node on. InternalIP wins because
/// cluster traffic should stay on the private network when there is one.
pub fn node_address(node: &Node) -> Option<IpAddr> {
    let addrs = node.status.as_ref()?.addresses.as_ref()?;
    let first_of = |kind: &str| {
        addrs
            .iter()
            .filter(|a| a.type_ == kind)
            .find_map(|a| a.address.trim().parse().ok())
    };
    first_of("InternalIP").or_else(|| first_of("ExternalIP"))
}

/// The peer a Node stands for; `None` for a Node without name or address
/// (e.g. just registered, kubelet has not reported addresses yet).
pub fn peer_of(node: &Node) -> Option<Peer> {
    let node_name = node.metadata.name.clone().filter(|n| !n.is_empty())?;
    let addr = node_address(node)?;
    let pod_cidr = node.spec.as_ref().and_then(|s| s.pod_cidr.clone());
    Some(Peer {
        node_name,
        addr,
        pod_cidr,
    })
}

/// The peers of a set of Nodes; Nodes without an address are left out.
pub fn peers_of<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> BTreeSet<Peer> {
    nodes.into_iter().filter_map(peer_of).collect()
}

/// A one-shot view of the cluster's Nodes, for start-up decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeList {
    /// Nodes that have an address.
    pub peers: BTreeSet<Peer>,
    /// Every Node name, with or without address. Its length is the
    /// agent's quorum seed (`--ipalloc-init consensus=N`).
    pub node_names: BTreeSet<String>,
}

/// Lists all Nodes once (verb: `list nodes`).
pub async fn list_nodes(client: &Client) -> Result<NodeList> {
    let api: Api<Node> = Api::all(client.clone());
    let nodes = api
        .list(&ListParams::default())
        .await
        .map_err(api_err("list nodes"))?;
    let node_names = nodes
        .items
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    Ok(NodeList {
        peers: peers_of(&nodes.items),
        node_names,
    })
}

/// What the Node watch tells the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeChange {
    /// The complete current peer set (sent after every (re)list and every
    /// change to it), so the agent never has to apply deltas.
    Peers(BTreeSet<Peer>),
    /// This Node object is gone: its peer's space should be reclaimed.
    Deleted(String),
}

/// Turns watcher events into [`NodeChange`]s. Pure: no I/O, unit-tested.
///
/// A relist (after the watch could not resume) replaces the whole map;
/// Nodes that vanished meanwhile are reported as deleted, because their
/// delete events were lost while the API server was out of reach.
#[derive(Debug, Default)]
pub struct NodeTracker {
    nodes: BTreeMap<String, Option<Peer>>,
    relist: Option<BTreeMap<String, Option<Peer>>>,
    synced: bool,
}

impl NodeTracker {
    /// Feeds one watcher event, returns what the agent should learn.
    pub fn apply(&mut self, event: watcher::Event<Node>) -> Vec<NodeChange> {
        match event {
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                Vec::new()
            }
            watcher::Event::InitApply(node) => self.init_apply(&node),
            watcher::Event::InitDone => self.init_done(),
            watcher::Event::Apply(node) => self.applied(&node),
            watcher::Event::Delete(node) => self.deleted(&node),
        }
    }

    /// The current peer set.
    pub fn peers(&self) -> BTreeSet<Peer> {
        self.nodes.values().flatten().cloned().collect()
    }

    fn init_apply(&mut self, node: &Node) -> Vec<NodeChange> {
        let Some(name) = node.metadata.name.clone() else {
            return Vec::new();
        };
        match &mut self.relist {
            Some(relist) => {
                relist.insert(name, peer_of(node));
                Vec::new()
            }
            // InitApply outside Init/InitDone: treat as a plain update.
            None => self.applied(node),
        }
    }

    fn init_done(&mut self) -> Vec<NodeChange> {
        let fresh = self.relist.take().unwrap_or_default();
        let old = std::mem::replace(&mut self.nodes, fresh);
        self.synced = true;
        let mut out: Vec<NodeChange> = old
            .into_keys()
            .filter(|name| !self.nodes.contains_key(name))
            .map(NodeChange::Deleted)
            .collect();
        out.push(NodeChange::Peers(self.peers()));
        out
    }

    fn applied(&mut self, node: &Node) -> Vec<NodeChange> {
        let Some(name) = node.metadata.name.clone() else {
            return Vec::new();
        };
        let peer = peer_of(node);
        let changed = self.nodes.get(&name) != Some(&peer);
        self.nodes.insert(name, peer);
        self.peers_if(changed)
    }

    fn deleted(&mut self, node: &Node) -> Vec<NodeChange> {
        let Some(name) = node.metadata.name.clone() else {
            return Vec::new();
        };
        let Some(old) = self.nodes.remove(&name) else {
            return Vec::new();
        };
        let mut out = vec![NodeChange::Deleted(name)];
        out.extend(self.peers_if(old.is_some()));
        out
    }

    /// Before the first full list the peer set is partial: say nothing.
    fn peers_if(&self, changed: bool) -> Vec<NodeChange> {
        if changed && self.synced {
            vec![NodeChange::Peers(self.peers())]
        } else {
            Vec::new()
        }
    }
}

/// Watches Nodes forever (verbs: `list`, `watch` nodes).
///
/// The stream never ends and never yields an error: when the API server
/// is unreachable or answers with an error, the watcher logs it, backs off
/// (0.8 s doubling to 30 s, with jitter) and resumes from the last seen
/// resourceVersion, or relists when that is too old. The agent keeps its
/// last peer set meanwhile; gossip and dataplane do not depend on this.
pub fn node_changes(client: Client) -> impl Stream<Item = NodeChange> + Send + 'static {
    let api: Api<Node> = Api::all(client);
    let mut tracker = NodeTracker::default();
    watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(|event| {
            ready(match event {
                Ok(event) => Some(event),
                Err(e) => {
                    tracing::warn!(error = %e, "Node watch failed; retrying with backoff");
                    None
                }
            })
        })
        .flat_map(move |event| stream::iter(tracker.apply(event)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
    use kube::api::ObjectMeta;

    fn node(name: &str, addrs: &[(&str, &str)], cidr: Option<&str>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: cidr.map(Into::into),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(
                    addrs
                        .iter()
                        .map(|(t, a)| NodeAddress {
                            type_: (*t).into(),
                            address: (*a).into(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
        }
    }

    fn peer(name: &str, addr: &str) -> Peer {
        Peer {
            node_name: name.into(),
            addr: addr.parse().unwrap(),
            pod_cidr: None,
        }
    }

    #[test]
    fn internal_ip_wins_over_external() {
        let n = node(
            "a",
            &[
                ("Hostname", "a"),
                ("ExternalIP", "1.2.3.4"),
                ("InternalIP", "10.0.0.1"),
            ],
            Some("10.244.1.0/24"),
        );
        let p = peer_of(&n).unwrap();
        assert_eq!(p.addr, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(p.pod_cidr.as_deref(), Some("10.244.1.0/24"));
    }

    #[test]
    fn external_ip_when_no_usable_internal() {
        let n = node(
            "a",
            &[("InternalIP", "not-an-ip"), ("ExternalIP", "1.2.3.4")],
            None,
        );
        assert_eq!(peer_of(&n).unwrap().addr.to_string(), "1.2.3.4");
    }

    #[test]
    fn nodes_without_address_or_name_are_skipped() {
        let bare = Node::default();
        let no_addr = node("b", &[("Hostname", "b")], None);
        let ok = node("c", &[("InternalIP", "fd00::3")], None);
        let set = peers_of([&bare, &no_addr, &ok]);
        assert_eq!(set.len(), 1);
        assert_eq!(set.first().unwrap().addr.to_string(), "fd00::3");
    }

    fn init(t: &mut NodeTracker, nodes: &[Node]) -> Vec<NodeChange> {
        let mut out = t.apply(watcher::Event::Init);
        for n in nodes {
            out.extend(t.apply(watcher::Event::InitApply(n.clone())));
        }
        out.extend(t.apply(watcher::Event::InitDone));
        out
    }

    #[test]
    fn tracker_reports_full_sets_and_deletions() {
        let mut t = NodeTracker::default();
        let a = node("a", &[("InternalIP", "10.0.0.1")], None);
        let b = node("b", &[("InternalIP", "10.0.0.2")], None);
        let out = init(&mut t, std::slice::from_ref(&a));
        assert_eq!(out, vec![NodeChange::Peers([peer("a", "10.0.0.1")].into())]);
        let out = t.apply(watcher::Event::Apply(b.clone()));
        assert_eq!(
            out,
            vec![NodeChange::Peers(
                [peer("a", "10.0.0.1"), peer("b", "10.0.0.2")].into()
            )]
        );
        // An unchanged update (e.g. a heartbeat) is not news.
        assert!(t.apply(watcher::Event::Apply(b.clone())).is_empty());
        let out = t.apply(watcher::Event::Delete(a));
        assert_eq!(
            out,
            vec![
                NodeChange::Deleted("a".into()),
                NodeChange::Peers([peer("b", "10.0.0.2")].into())
            ]
        );
    }

    #[test]
    fn relist_reports_nodes_deleted_while_disconnected() {
        let mut t = NodeTracker::default();
        let a = node("a", &[("InternalIP", "10.0.0.1")], None);
        let b = node("b", &[], None);
        init(&mut t, &[a, b.clone()]);
        let out = init(&mut t, &[b]);
        assert_eq!(
            out,
            vec![
                NodeChange::Deleted("a".into()),
                NodeChange::Peers(BTreeSet::new())
            ]
        );
    }

    #[test]
    fn deleting_an_unknown_or_nameless_node_is_ignored() {
        let mut t = NodeTracker::default();
        init(&mut t, &[]);
        assert!(t.apply(watcher::Event::Delete(Node::default())).is_empty());
        let x = node("x", &[], None);
        assert!(t.apply(watcher::Event::Delete(x)).is_empty());
    }
}
