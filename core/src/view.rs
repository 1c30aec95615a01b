//! What the data path needs of the router, as a plain value. The agent's
//! driver loop builds one after the router changes and hands it out, so
//! the sleeve, the fastdp probe and the kernel sync decide from a snapshot
//! and never hold the router itself.

use crate::forward::{Forward, ForwardingTable};
use crate::peer::PeerName;
use crate::router::Router;
use crate::time::Time;
use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

/// The router's routing facts at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub me: PeerName,
    /// Seal epoch of this start (see [`crate::seal::boot_epoch`]).
    pub epoch: u64,
    /// This node's underlay control address.
    pub address: SocketAddr,
    pub range: Ipv4Net,
    /// This node's bridge gateway, once it has address space.
    pub gateway: Option<Ipv4Addr>,
    pub forwarding: ForwardingTable,
    /// Peers that are their own next hop, by name.
    pub neighbours: Vec<Neighbour>,
    /// Where each peer with a confirmed connection sends from: the only
    /// source a sleeve frame from it is taken from.
    pub connected: BTreeMap<PeerName, SocketAddr>,
    /// When each peer with a link was last heard from. Kept apart from
    /// the routing facts: it moves with every heartbeat.
    pub heard: BTreeMap<PeerName, Time>,
}

/// A direct neighbour and its control address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub peer: PeerName,
    pub nickname: String,
    pub control: SocketAddr,
}

impl View {
    /// Where a packet for `dst` goes.
    pub fn forward(&self, dst: Ipv4Addr) -> Forward {
        self.forwarding.lookup(dst)
    }

    /// Where `peer` sends from, if its connection is confirmed.
    pub fn connected_address(&self, peer: PeerName) -> Option<SocketAddr> {
        self.connected.get(&peer).copied()
    }

    /// Whether the routing facts (everything but `heard`) are the same.
    pub fn same_routing(&self, other: &View) -> bool {
        self.me == other.me
            && self.epoch == other.epoch
            && self.address == other.address
            && self.range == other.range
            && self.gateway == other.gateway
            && self.forwarding == other.forwarding
            && self.neighbours == other.neighbours
            && self.connected == other.connected
    }
}

impl Router {
    /// This router's routing facts, as a value.
    pub fn view(&self) -> View {
        View {
            me: self.name(),
            epoch: self.epoch(),
            address: self.config().address,
            range: self.ipam().range(),
            gateway: self.gateway(),
            forwarding: self.forwarding().clone(),
            neighbours: self
                .neighbour_entries()
                .map(|(peer, nickname, control)| Neighbour {
                    peer,
                    nickname: nickname.to_owned(),
                    control,
                })
                .collect(),
            connected: self.connected_entries().collect(),
            heard: self.last_heard().collect(),
        }
    }

    /// Whether `view` holds this router's routing facts (all but `heard`).
    /// Compared in place: an input that changed none of them (most
    /// heartbeats) costs no copy of the forwarding table.
    pub fn routing_is(&self, view: &View) -> bool {
        self.name() == view.me
            && self.epoch() == view.epoch
            && self.config().address == view.address
            && self.ipam().range() == view.range
            && self.gateway() == view.gateway
            && *self.forwarding() == view.forwarding
            && self.neighbour_entries().eq(view
                .neighbours
                .iter()
                .map(|n| (n.peer, n.nickname.as_str(), n.control)))
            && self
                .connected_entries()
                .eq(view.connected.iter().map(|(p, a)| (*p, *a)))
    }

    /// Whether `view`'s `heard` times are this router's.
    pub fn heard_is(&self, view: &View) -> bool {
        self.last_heard()
            .eq(view.heard.iter().map(|(p, t)| (*p, *t)))
    }

    /// Peers that are their own next hop, with nickname and address.
    fn neighbour_entries(&self) -> impl Iterator<Item = (PeerName, &str, SocketAddr)> + '_ {
        self.routes()
            .iter()
            .filter(|(peer, hop)| peer == hop)
            .filter_map(|(peer, _)| {
                let entry = self.topology().get(peer)?;
                Some((peer, entry.nickname.as_str(), entry.address))
            })
    }

    /// Peers with a link and a confirmed connection, by name.
    fn connected_entries(&self) -> impl Iterator<Item = (PeerName, SocketAddr)> + '_ {
        self.last_heard()
            .filter_map(|(peer, _)| Some((peer, self.connected_address(peer)?)))
    }
}

#[cfg(test)]
mod tests {
    use crate::harness::Net;
    use std::time::Duration;

    #[test]
    fn a_view_answers_as_the_router_does() {
        let mut net = Net::new(3, 7, |_, _| {});
        net.run_for(Duration::from_secs(5));
        for i in 0..3 {
            net.call(i, |r, now| r.allocate(now, "pod"));
        }
        net.run_for(Duration::from_secs(5));
        let router = net.router(0);
        let view = router.view();
        assert_eq!(view.me, router.name());
        assert!(view.gateway.is_some() && view.gateway == router.gateway());
        assert_eq!(view.neighbours.len(), 2, "{view:?}");
        for n in &view.neighbours {
            let connected = view.connected_address(n.peer);
            assert!(connected.is_some() && connected == router.connected_address(n.peer));
            assert!(view.heard.contains_key(&n.peer));
        }
        assert!(view.forwarding.prefixes().len() >= 3, "{view:?}");
        for prefix in router.forwarding().prefixes().keys() {
            let a = prefix.network();
            assert_eq!(view.forward(a), router.forward(a));
        }
        assert!(router.routing_is(&view) && router.heard_is(&view));
        let mut later = view.clone();
        later.heard.clear();
        assert!(view.same_routing(&later));
        assert!(router.routing_is(&later) && !router.heard_is(&later));
        later.gateway = None;
        assert!(!view.same_routing(&later) && !router.routing_is(&later));
        let mut later = view.clone();
        later.neighbours.pop();
        assert!(!view.same_routing(&later) && !router.routing_is(&later));
        let mut later = view.clone();
        later.connected.pop_first();
        assert!(!router.routing_is(&later));
        let mut later = view.clone();
        later.forwarding = Default::default();
        assert!(!router.routing_is(&later));
    }
}
