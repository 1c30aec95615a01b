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
        let neighbours = self
            .routes()
            .iter()
            .filter(|(peer, hop)| peer == hop)
            .filter_map(|(peer, _)| {
                let entry = self.topology().get(peer)?;
                Some(Neighbour {
                    peer,
                    nickname: entry.nickname.clone(),
                    control: entry.address,
                })
            })
            .collect();
        let heard: BTreeMap<PeerName, Time> = self.last_heard().collect();
        let connected = heard
            .keys()
            .filter_map(|peer| Some((*peer, self.connected_address(*peer)?)))
            .collect();
        View {
            me: self.name(),
            epoch: self.epoch(),
            address: self.config().address,
            range: self.ipam().range(),
            gateway: self.gateway(),
            forwarding: self.forwarding().clone(),
            neighbours,
            connected,
            heard,
        }
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
        let mut later = view.clone();
        later.heard.clear();
        assert!(view.same_routing(&later));
        later.gateway = None;
        assert!(!view.same_routing(&later));
    }
}
