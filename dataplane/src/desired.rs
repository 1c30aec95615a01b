//! What the kernel should hold for this node, from the router's view: the
//! bridge, the VXLAN device, its FDB and neighbour entries, and the pod
//! routes. Pure: the caller passes in everything it needs to know.

use crate::{
    BridgeSpec, Desired, Overlay, PodRoute, RemotePeer, SleeveSpec, VxlanSpec, names, vtep_mac,
};
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use weft_core::forward::Forward;
use weft_core::{PeerName, View};

/// How this node's data path is set up: fixed for the agent's life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setup {
    /// The bridge pods attach to.
    pub bridge: String,
    /// The pods' MTU.
    pub mtu: u32,
    /// What carries pod traffic between nodes.
    pub overlay: Overlay,
    /// With fastdp: whether a sleeve exists that peers VXLAN does not
    /// reach fall back to.
    pub sleeve_fallback: bool,
}

/// What the kernel should hold for `view`. `underlay_dev`: the interface
/// holding this node's address, which VXLAN sends through. `sleeved`:
/// peers VXLAN does not reach (see [`crate::probe`]); with fastdp and a
/// sleeve, prefixes whose next hop is one of them go into the sleeve's TUN
/// device, whose reader forwards them by the same table. Their FDB and
/// neighbour entries stay: the probes that tell when VXLAN works again
/// need them on the peer's side, and they cost nothing here. `owners`:
/// where the owners of unreachable prefixes were last seen.
pub fn desired(
    view: &View,
    setup: &Setup,
    underlay_dev: Option<String>,
    sleeved: &BTreeSet<PeerName>,
    owners: &Owners,
) -> Desired {
    let bridge = view.gateway.map(|gateway| BridgeSpec {
        name: setup.bridge.clone(),
        gateway: Ipv4Net::new(gateway, view.range.prefix_len()).expect("prefix of a valid range"),
        mtu: setup.mtu,
    });
    let IpAddr::V4(local) = view.address.ip() else {
        return Desired {
            bridge,
            ..Desired::default()
        };
    };
    let mut peers: Vec<RemotePeer> = direct_neighbours(view)
        .into_iter()
        .map(|(peer, control)| RemotePeer {
            underlay: *control.ip(),
            mac: vtep_mac(peer.0),
        })
        .collect();
    peers.sort();
    let device = |next_hop: &PeerName| match setup.overlay {
        Overlay::Fastdp if setup.sleeve_fallback && sleeved.contains(next_hop) => Overlay::Sleeve,
        overlay => overlay,
    };
    let mut routes: Vec<PodRoute> = view
        .forwarding
        .prefixes()
        .iter()
        .filter_map(|(prefix, forward)| match forward {
            Forward::Peer {
                underlay, next_hop, ..
            } => match underlay.ip() {
                IpAddr::V4(next_hop_ip) => Some(PodRoute {
                    prefix: *prefix,
                    next_hop: next_hop_ip,
                    device: device(next_hop),
                }),
                IpAddr::V6(_) => None,
            },
            _ => None,
        })
        .collect();
    let live = live_peers(view);
    // An unreachable owner this agent has seen directly gets its prefix
    // straight, with its entries: the kernel's last route may go through a
    // relay that lost the owner too, which is not kept (see plan::kept).
    // Not at an address a live peer has now: that one is someone else.
    let mut held = Vec::new();
    for prefix in held_prefixes(view) {
        match owners
            .last_seen(prefix)
            .filter(|(_, at)| !live.contains(at))
        {
            Some((owner, underlay)) => {
                routes.push(PodRoute {
                    prefix,
                    next_hop: underlay,
                    device: device(&owner),
                });
                peers.push(RemotePeer {
                    underlay,
                    mac: vtep_mac(owner.0),
                });
            }
            None => held.push(prefix),
        }
    }
    peers.sort();
    peers.dedup();
    let sleeve = SleeveSpec {
        name: names::SLEEVE_DEVICE.into(),
        mtu: setup.mtu,
    };
    match setup.overlay {
        Overlay::Fastdp => Desired {
            bridge,
            vxlan: Some(VxlanSpec {
                underlay_dev,
                ..VxlanSpec::new(local, setup.mtu, vtep_mac(view.me.0))
            }),
            sleeve: setup.sleeve_fallback.then_some(sleeve),
            peers,
            routes,
            held,
            live,
        },
        Overlay::Sleeve => Desired {
            bridge,
            vxlan: None,
            sleeve: Some(sleeve),
            peers: Vec::new(),
            routes,
            held,
            live,
        },
    }
}

/// Prefixes of remote owners that are unreachable right now. A peer's
/// agent restarting (or ours, which starts from the saved ring with no
/// connections yet) leaves the kernel path to it working, so a route to it
/// is better than none. The table holds only current owners' prefixes,
/// disjoint from ours: a range that is donated, reclaimed after its
/// owner's removal, or whose owner is forgotten is routed anew or dropped.
fn held_prefixes(view: &View) -> Vec<Ipv4Net> {
    view.forwarding
        .prefixes()
        .iter()
        .filter(|(_, forward)| **forward == Forward::Unreachable)
        .map(|(prefix, _)| *prefix)
        .collect()
}

/// Where each remote prefix's owner was last seen directly: its name and
/// underlay address. Learnt from the views one agent follows, so a
/// restarted agent starts without (and keeps the kernel's routes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owners(BTreeMap<Ipv4Net, (PeerName, Ipv4Addr)>);

impl Owners {
    /// Learns from `view`: an owner that is its own next hop is seen at
    /// that address; one relayed or unreachable stays where it was seen,
    /// unless its prefix changed hands; a prefix that left the table, or
    /// is ours, is forgotten.
    pub fn learn(&mut self, view: &View) {
        let table = view.forwarding.prefixes();
        self.0.retain(|prefix, (seen, _)| match table.get(prefix) {
            Some(Forward::Peer { owner, .. }) => owner == seen,
            Some(Forward::Unreachable) => true,
            Some(Forward::Local) | None => false,
        });
        for (prefix, forward) in table {
            if let Forward::Peer {
                owner,
                next_hop,
                underlay: SocketAddr::V4(underlay),
            } = forward
                && owner == next_hop
            {
                self.0.insert(*prefix, (*owner, *underlay.ip()));
            }
        }
    }

    /// The owner of exactly `prefix` and where it was last seen.
    pub fn last_seen(&self, prefix: Ipv4Net) -> Option<(PeerName, Ipv4Addr)> {
        self.0.get(&prefix).copied()
    }
}

/// The underlay addresses of the peers reachable right now: the direct
/// neighbours, and every routed prefix's next hop. A held route through
/// one of them is not kept (see [`crate::plan::kept`]).
fn live_peers(view: &View) -> Vec<Ipv4Addr> {
    let neighbours = direct_neighbours(view)
        .into_iter()
        .map(|(_, control)| *control.ip());
    let next_hops = view
        .forwarding
        .prefixes()
        .values()
        .filter_map(|forward| match forward {
            Forward::Peer {
                underlay: SocketAddr::V4(underlay),
                ..
            } => Some(*underlay.ip()),
            _ => None,
        });
    let live: BTreeSet<Ipv4Addr> = neighbours.chain(next_hops).collect();
    live.into_iter().collect()
}

/// Direct neighbours over IPv4, with their control address.
fn direct_neighbours(view: &View) -> Vec<(PeerName, SocketAddrV4)> {
    view.neighbours
        .iter()
        .filter_map(|n| match n.control {
            SocketAddr::V4(control) => Some((n.peer, control)),
            SocketAddr::V6(_) => None,
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{Dataplane, MemoryDataplane};
    use weft_core::Router;

    /// fastdp without a sleeve to fall back to.
    pub const LONE_FASTDP: (Overlay, bool) = (Overlay::Fastdp, false);
    /// fastdp with the sleeve as fallback.
    pub const FASTDP: (Overlay, bool) = (Overlay::Fastdp, true);
    pub const SLEEVE: (Overlay, bool) = (Overlay::Sleeve, false);

    pub fn desired_of(
        router: &Router,
        (overlay, sleeve_fallback): (Overlay, bool),
        sleeved: &BTreeSet<PeerName>,
    ) -> Desired {
        let setup = Setup {
            bridge: "weft".into(),
            mtu: 1450,
            overlay,
            sleeve_fallback,
        };
        desired(&router.view(), &setup, None, sleeved, &Owners::default())
    }

    /// Three routers in node-cidr mode (node i owns 10.32.i.0/24), fully
    /// connected, datagrams delivered at once, run for `secs`.
    pub fn three_routers(secs: u64) -> Vec<Router> {
        use weft_core::ipam::IpamMode;
        use weft_core::{Config, Time};
        let address = |i: u8| std::net::SocketAddr::from(([192, 168, 1, 10 + i], 6783));
        let mut routers: Vec<Router> = (1..=3u8)
            .map(|i| {
                let mut config = Config::new(format!("node{i}"), address(i));
                config.ipam = IpamMode::NodeCidr(Some(format!("10.32.{i}.0/24").parse().unwrap()));
                let mut seed = [0u8; 32];
                seed[0] = i;
                let mut r = Router::new(config, None, seed, Time::ZERO).unwrap();
                for j in (1..=3u8).filter(|j| *j != i) {
                    r.add_peer_address(Time::ZERO, address(j));
                }
                r
            })
            .collect();
        run(&mut routers, 0, secs, |_, _| false);
        routers
    }

    /// Runs `routers` from second `from` for `secs`, with the datagrams
    /// between nodes `lost` names (by index) lost.
    fn run(routers: &mut [Router], from: u64, secs: u64, lost: impl Fn(usize, usize) -> bool) {
        use weft_core::Time;
        for step in from * 100..(from + secs) * 100 {
            let now = Time::from_millis(step * 10);
            for i in 0..routers.len() {
                routers[i].handle_timeout(now);
                while let Some(t) = routers[i].poll_transmit() {
                    let to = (0..routers.len())
                        .find(|j| routers[*j].config().address == t.destination)
                        .filter(|j| !lost(i, *j));
                    if let Some(j) = to {
                        let from = routers[i].config().address;
                        routers[j].handle_datagram(now, from, &t.payload);
                    }
                }
                while routers[i].poll_event().is_some() {}
            }
        }
    }

    /// While node2's agent is away, node1 holds node2's prefix (whatever
    /// route the kernel has for it stays) instead of routing it; once node2
    /// is back, the route is desired again and nothing is held.
    #[test]
    fn an_unreachable_owners_prefix_is_held_until_it_is_back() {
        let mut routers = three_routers(10);
        let fastdp = LONE_FASTDP;
        let d = desired_of(&routers[0], fastdp, &BTreeSet::new());
        assert!(d.held.is_empty(), "{d:?}");
        run(&mut routers, 10, 30, node2_away);
        let d = desired_of(&routers[0], fastdp, &BTreeSet::new());
        let node2: Ipv4Net = "10.32.2.0/24".parse().unwrap();
        assert_eq!(d.held, vec![node2], "{d:?}");
        assert!(d.routes.iter().all(|r| r.prefix != node2), "{d:?}");
        assert_eq!(d.routes.len(), 1, "node3's prefix is routed: {d:?}");
        run(&mut routers, 40, 30, |_, _| false);
        let d = desired_of(&routers[0], fastdp, &BTreeSet::new());
        assert!(d.held.is_empty(), "{d:?}");
        assert!(d.routes.iter().any(|r| r.prefix == node2), "{d:?}");
    }

    /// Node 2's datagrams, both ways, are lost: its agent is away.
    fn node2_away(from: usize, to: usize) -> bool {
        from == 1 || to == 1
    }

    /// Node1 reaches node2 only through node3 (their link is cut), then
    /// node2's agent goes away; node1's agent has not seen where node2 is
    /// (it restarted, say). Node1's kernel routed node2's prefix through
    /// node3, which is live: node3 has no route to node2 either, or holds
    /// one back through node1, a forwarding loop. So that route is not
    /// held, while node3's, straight to node2, is.
    #[test]
    fn a_held_prefix_keeps_no_route_through_a_live_peer() {
        let mut routers = three_routers(10);
        run(&mut routers, 10, 30, |a, b| a + b == 1);
        let (node2, node3) = (
            Ipv4Addr::new(192, 168, 1, 12),
            Ipv4Addr::new(192, 168, 1, 13),
        );
        let prefix: Ipv4Net = "10.32.2.0/24".parse().unwrap();
        let mut kernels = [MemoryDataplane::new(), MemoryDataplane::new()];
        let follow = |kernels: &mut [MemoryDataplane; 2], routers: &[Router]| {
            for (kernel, router) in kernels.iter_mut().zip([&routers[0], &routers[2]]) {
                let d = desired_of(router, LONE_FASTDP, &BTreeSet::new());
                kernel.reconcile(&d).unwrap();
            }
        };
        let next_hop = |kernel: &MemoryDataplane| {
            let routes = &kernel.state().routes;
            routes
                .iter()
                .find(|r| r.prefix == prefix)
                .map(|r| r.next_hop)
        };
        follow(&mut kernels, &routers);
        assert_eq!(next_hop(&kernels[0]), Some(node3), "node1 relays");
        assert_eq!(next_hop(&kernels[1]), Some(node2), "node3 is direct");
        run(&mut routers, 40, 30, node2_away);
        let d = desired_of(&routers[0], LONE_FASTDP, &BTreeSet::new());
        assert_eq!(
            (d.held.clone(), d.live.clone()),
            (vec![prefix], vec![node3])
        );
        follow(&mut kernels, &routers);
        assert_eq!(next_hop(&kernels[0]), None, "{:?}", kernels[0].state());
        assert_eq!(next_hop(&kernels[1]), Some(node2), "held");
    }

    /// Node1 last routed node2's prefix through node3 when node2's agent
    /// went away (here their link is cut; a node that loses the agent
    /// first relays too, until the relay says it lost it as well). Having
    /// seen node2 directly before, node1 routes the prefix straight there,
    /// with node2's entries: the kernel path to a restarting agent's node
    /// still works.
    #[test]
    fn a_held_prefix_goes_straight_to_where_its_owner_was_seen() {
        let mut routers = three_routers(10);
        let mut owners = Owners::default();
        owners.learn(&routers[0].view());
        run(&mut routers, 10, 30, |a, b| a + b == 1);
        owners.learn(&routers[0].view());
        run(&mut routers, 40, 30, node2_away);
        owners.learn(&routers[0].view());
        let setup = Setup {
            bridge: "weft".into(),
            mtu: 1450,
            overlay: Overlay::Fastdp,
            sleeve_fallback: false,
        };
        let d = desired(&routers[0].view(), &setup, None, &BTreeSet::new(), &owners);
        let node2 = Ipv4Addr::new(192, 168, 1, 12);
        let straight = PodRoute {
            prefix: "10.32.2.0/24".parse().unwrap(),
            next_hop: node2,
            device: Overlay::Fastdp,
        };
        assert!(d.held.is_empty(), "{d:?}");
        assert!(d.routes.contains(&straight), "{d:?}");
        assert!(d.peers.iter().any(|p| p.underlay == node2), "{d:?}");
    }

    /// What is learnt of a prefix's owner is forgotten once the prefix
    /// changes hands, becomes ours, or leaves the table.
    #[test]
    fn where_an_owner_was_seen_is_forgotten_with_its_prefix() {
        let routers = three_routers(10);
        let mut owners = Owners::default();
        let view = routers[0].view();
        owners.learn(&view);
        let (node2, node3) = (
            "10.32.2.0/24".parse().unwrap(),
            "10.32.3.0/24".parse().unwrap(),
        );
        let at = |d| Ipv4Addr::new(192, 168, 1, d);
        assert_eq!(owners.last_seen(node2), Some((routers[1].name(), at(12))));
        assert_eq!(owners.last_seen(node3), Some((routers[2].name(), at(13))));
        assert_eq!(owners.last_seen("10.32.1.0/24".parse().unwrap()), None);
        // Node3's prefix now owned by node2 (relayed through node3); node2's
        // prefix ours.
        let owned = [(node2, view.me), (node3, routers[1].name())];
        let (forwarding, _) =
            weft_core::forward::ForwardingTable::build(owned, |owner| match owner == view.me {
                true => Forward::Local,
                false => Forward::Peer {
                    owner,
                    next_hop: routers[2].name(),
                    underlay: routers[2].config().address,
                },
            });
        owners.learn(&View {
            forwarding,
            ..view.clone()
        });
        assert_eq!(
            (owners.last_seen(node2), owners.last_seen(node3)),
            (None, None)
        );
    }

    #[test]
    fn prefixes_of_a_fallen_back_peer_go_into_the_sleeve() {
        let routers = three_routers(10);
        let (r1, node2) = (&routers[0], routers[1].name());
        let sleeved = BTreeSet::from([node2]);
        let fastdp = FASTDP;
        let d = desired_of(r1, fastdp, &sleeved);
        let device = |d: &Desired, prefix: &str| {
            let prefix: Ipv4Net = prefix.parse().unwrap();
            d.routes
                .iter()
                .find(|r| r.prefix == prefix)
                .map(|r| r.device)
        };
        assert_eq!(device(&d, "10.32.2.0/24"), Some(Overlay::Sleeve), "{d:?}");
        assert_eq!(device(&d, "10.32.3.0/24"), Some(Overlay::Fastdp), "{d:?}");
        // Node 2 keeps its FDB and neighbour entries, and the sleeve exists.
        assert_eq!(d.peers.len(), 2);
        assert!(d.sleeve.is_some() && d.vxlan.is_some());
        // Nobody fell back: all VXLAN.
        let all = desired_of(r1, fastdp, &BTreeSet::new());
        assert!(all.routes.iter().all(|r| r.device == Overlay::Fastdp));
        assert_eq!(all.routes.len(), 2);
        // Without a sleeve there is nothing to fall back to.
        let lone = desired_of(r1, LONE_FASTDP, &sleeved);
        assert!(lone.routes.iter().all(|r| r.device == Overlay::Fastdp));
        // The sleeve dataplane carries everything.
        let sleeve = desired_of(r1, SLEEVE, &BTreeSet::new());
        assert!(sleeve.routes.iter().all(|r| r.device == Overlay::Sleeve));
        // The in-memory dataplane takes the mix, and refuses it without a
        // sleeve device.
        let mut memory = MemoryDataplane::new();
        memory.reconcile(&d).unwrap();
        assert_eq!(memory.state().routes, d.normalized().routes);
        let no_device = Desired {
            sleeve: None,
            ..d.clone()
        };
        assert!(memory.reconcile(&no_device).is_err());
    }
}
