//! What to add, replace and remove: pure functions over plain data, so the
//! reconciliation logic is tested without a kernel.
//!
//! Every plan is applied in the same order: first the `set` part (add, or
//! replace in place: the kernel swaps an entry atomically, so traffic never
//! sees a gap), then the removals. Applying a plan computed against the
//! current state leaves exactly the desired entries.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::{Overlay, PodRoute, RemotePeer};

/// A VXLAN FDB entry: one remote of one MAC (the kernel allows several
/// remotes per MAC; weft uses exactly one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FdbEntry {
    pub mac: [u8; 6],
    pub dst: Ipv4Addr,
}

/// Changes to the VXLAN device's FDB.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FdbPlan {
    /// Add, or replace the MAC's (first) remote with this one
    /// (`bridge fdb replace`).
    pub set: Vec<FdbEntry>,
    /// Remove one extra remote of a MAC that stays (`bridge fdb del MAC dst
    /// IP`). May already be gone after `set` replaced it: not an error.
    pub remove_remotes: Vec<FdbEntry>,
    /// Remove MACs no peer has any more, with all their remotes.
    pub remove_macs: Vec<[u8; 6]>,
}

impl FdbPlan {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove_remotes.is_empty() && self.remove_macs.is_empty()
    }
}

/// Plans the FDB: every desired peer's MAC has exactly one remote, its
/// underlay IP; no other MAC has an entry. In `current`, a `dst` of 0.0.0.0
/// stands for a remote that is not an IPv4 address. If two peers share a MAC (only
/// possible with a hash collision or a misconfigured caller) the last wins.
pub fn plan_fdb(desired: &[RemotePeer], current: &[FdbEntry]) -> FdbPlan {
    let want: BTreeMap<[u8; 6], Ipv4Addr> = desired.iter().map(|p| (p.mac, p.underlay)).collect();
    let have: BTreeSet<FdbEntry> = current.iter().copied().collect();
    let mut plan = FdbPlan::default();
    for (&mac, &dst) in &want {
        let entry = FdbEntry { mac, dst };
        if !have.contains(&entry) {
            plan.set.push(entry);
        }
    }
    let mut removed_macs = BTreeSet::new();
    for e in &have {
        match want.get(&e.mac) {
            Some(&dst) if dst == e.dst => {}
            // 0.0.0.0 stands for a remote weft can't name (not IPv4):
            // deleting "MAC dst 0.0.0.0" would delete the whole entry,
            // including the remote `set` just put there.
            Some(_) if e.dst.is_unspecified() => {}
            Some(_) => plan.remove_remotes.push(*e),
            None => {
                if removed_macs.insert(e.mac) {
                    plan.remove_macs.push(e.mac);
                }
            }
        }
    }
    plan
}

/// A neighbour entry on the VXLAN device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NeighEntry {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
}

/// Changes to the VXLAN device's neighbour table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NeighPlan {
    /// Add or replace as PERMANENT (`ip neigh replace`).
    pub set: Vec<NeighEntry>,
    /// Delete (`ip neigh del IP dev weft-vxlan`).
    pub remove: Vec<Ipv4Addr>,
}

impl NeighPlan {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

/// Plans the neighbour table. `current` holds only the device's PERMANENT
/// entries: other states are the kernel's own (a failed ARP attempt, say);
/// `set` overwrites them where weft wants an entry and the kernel ages out
/// the rest. Keyed by IP, because the kernel is: one entry per IP and device.
pub fn plan_neighbours(desired: &[RemotePeer], current: &[NeighEntry]) -> NeighPlan {
    let want: BTreeMap<Ipv4Addr, [u8; 6]> = desired.iter().map(|p| (p.underlay, p.mac)).collect();
    let have: BTreeMap<Ipv4Addr, [u8; 6]> = current.iter().map(|n| (n.ip, n.mac)).collect();
    NeighPlan {
        set: want
            .iter()
            .filter(|(ip, mac)| have.get(ip) != Some(mac))
            .map(|(&ip, &mac)| NeighEntry { ip, mac })
            .collect(),
        remove: have
            .keys()
            .filter(|ip| !want.contains_key(ip))
            .copied()
            .collect(),
    }
}

/// A route of weft's (protocol [`crate::ROUTE_PROTOCOL`]) in the main table,
/// as read from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteEntry {
    pub prefix: Ipv4Net,
    pub next_hop: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub onlink: bool,
    /// The route's metric (`priority`); weft's own are 0.
    pub metric: u32,
}

/// Changes to weft's routes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutePlan {
    /// Add or replace (`ip route replace PREFIX via NH dev weft-vxlan onlink
    /// proto 177`): replacing switches the next hop atomically.
    pub set: Vec<PodRoute>,
    /// Delete these (exactly as read).
    pub remove: Vec<RouteEntry>,
}

impl RoutePlan {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

/// Plans weft's routes: one metric-0 route per desired prefix, via its next
/// hop, onlink, on the device the route names (`index` gives a device's
/// interface index). A weft route for a prefix nobody owns any more, or
/// with another metric, is stale. A route with the desired prefix and
/// metric but the wrong next hop or device is not removed: `set` replaces
/// it in place (deleting it afterwards would delete the replacement), which
/// is also how a prefix moves between VXLAN and the sleeve without a gap.
/// Several desired routes for one prefix: the last wins.
///
/// A route [`kept`] for a `held` prefix (its owner is unreachable for now)
/// stays as the kernel has it; a held prefix without such a route gets
/// none.
pub fn plan_routes(
    desired: &[PodRoute],
    held: &[Ipv4Net],
    live: &[Ipv4Addr],
    index: impl Fn(Overlay) -> u32,
    current: &[RouteEntry],
) -> RoutePlan {
    let want: BTreeMap<Ipv4Net, (Ipv4Addr, Overlay)> = desired
        .iter()
        .map(|r| (r.prefix.trunc(), (r.next_hop, r.device)))
        .collect();
    let mut plan = RoutePlan::default();
    for (&prefix, &(next_hop, device)) in &want {
        let ok = current.iter().any(|c| {
            c.prefix == prefix
                && c.metric == 0
                && c.next_hop == Some(next_hop)
                && c.oif == Some(index(device))
                && c.onlink
        });
        if !ok {
            plan.set.push(PodRoute {
                prefix,
                next_hop,
                device,
            });
        }
    }
    let mut seen = BTreeSet::new();
    for c in current {
        let wanted = c.metric == 0 && want.contains_key(&c.prefix);
        let stale = !(wanted || kept(held, live, c));
        if stale && seen.insert(*c) {
            plan.remove.push(*c);
        }
    }
    plan
}

/// Whether the kernel's `route` stays though nothing desires it: a
/// metric-0 route for exactly a `held` prefix whose next hop is not one of
/// the `live` peers. Only the exact prefix: a wider route from before a
/// split could cover a range that is now this node's own, and a narrower
/// one a range that moved to someone else. Not through a live peer: it has
/// no route to the owner either, or holds one back through this node, and
/// two nodes holding routes through each other loop every packet.
pub fn kept(held: &[Ipv4Net], live: &[Ipv4Addr], route: &RouteEntry) -> bool {
    route.metric == 0
        && held.contains(&route.prefix)
        && !route.next_hop.is_some_and(|hop| live.contains(&hop))
}

/// The VXLAN next hops the [`kept`] routes of `held` prefixes go through
/// (on the device with index `vxlan`), as peers whose neighbour entry
/// (`neighbours`, the kernel's) and FDB entry must stay too. A peer
/// `desired` names by address or MAC is left to `desired`: it is current.
pub fn held_peers(
    held: &[Ipv4Net],
    live: &[Ipv4Addr],
    desired: &[RemotePeer],
    vxlan: u32,
    routes: &[RouteEntry],
    neighbours: &[NeighEntry],
) -> Vec<RemotePeer> {
    let next_hops: BTreeSet<Ipv4Addr> = routes
        .iter()
        .filter(|r| r.oif == Some(vxlan) && kept(held, live, r))
        .filter_map(|r| r.next_hop)
        .collect();
    neighbours
        .iter()
        .filter(|n| next_hops.contains(&n.ip))
        .filter(|n| !desired.iter().any(|p| p.underlay == n.ip || p.mac == n.mac))
        .map(|n| RemotePeer {
            underlay: n.ip,
            mac: n.mac,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vtep_mac;

    fn ip(d: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 1, d)
    }
    fn peer(d: u8) -> RemotePeer {
        RemotePeer {
            underlay: ip(d),
            mac: vtep_mac(d as u64),
        }
    }
    fn fdb(d: u8, dst: u8) -> FdbEntry {
        FdbEntry {
            mac: vtep_mac(d as u64),
            dst: ip(dst),
        }
    }
    fn neigh(d: u8, mac_of: u8) -> NeighEntry {
        NeighEntry {
            ip: ip(d),
            mac: vtep_mac(mac_of as u64),
        }
    }
    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn route(p: &str, nh: u8) -> PodRoute {
        PodRoute {
            prefix: net(p),
            next_hop: ip(nh),
            device: Overlay::Fastdp,
        }
    }
    /// Interface indexes: VXLAN 7, sleeve 9.
    fn idx(device: Overlay) -> u32 {
        match device {
            Overlay::Fastdp => 7,
            Overlay::Sleeve => 9,
        }
    }
    fn cur(p: &str, nh: u8, oif: u32) -> RouteEntry {
        RouteEntry {
            prefix: net(p),
            next_hop: Some(ip(nh)),
            oif: Some(oif),
            onlink: true,
            metric: 0,
        }
    }

    #[test]
    fn fdb_from_empty_adds_everything() {
        let plan = plan_fdb(&[peer(12), peer(13)], &[]);
        assert_eq!(plan.set.len(), 2);
        assert!(plan.set.contains(&fdb(12, 12)) && plan.set.contains(&fdb(13, 13)));
        assert!(plan.remove_remotes.is_empty() && plan.remove_macs.is_empty());
    }

    #[test]
    fn fdb_in_sync_is_empty() {
        assert!(plan_fdb(&[peer(12), peer(13)], &[fdb(13, 13), fdb(12, 12)]).is_empty());
        assert!(plan_fdb(&[], &[]).is_empty());
    }

    #[test]
    fn fdb_removes_gone_peers_and_repoints_moved_ones() {
        // Peer 13 left; peer 12 moved to a new underlay IP (.22), and its MAC
        // also has a stray second remote (.99).
        let moved = RemotePeer {
            underlay: ip(22),
            mac: vtep_mac(12),
        };
        let plan = plan_fdb(&[moved], &[fdb(12, 12), fdb(12, 99), fdb(13, 13)]);
        assert_eq!(plan.set, vec![fdb(12, 22)]);
        assert_eq!(plan.remove_remotes, vec![fdb(12, 12), fdb(12, 99)]);
        assert_eq!(plan.remove_macs, vec![vtep_mac(13)]);
    }

    #[test]
    fn fdb_keeps_the_right_remote_and_drops_extras() {
        let plan = plan_fdb(&[peer(12)], &[fdb(12, 99), fdb(12, 12)]);
        assert!(plan.set.is_empty());
        assert_eq!(plan.remove_remotes, vec![fdb(12, 99)]);
    }

    #[test]
    fn fdb_never_removes_an_unnamed_remote_of_a_kept_mac() {
        let unnamed = FdbEntry {
            mac: vtep_mac(12),
            dst: Ipv4Addr::UNSPECIFIED,
        };
        let plan = plan_fdb(&[peer(12)], &[unnamed]);
        assert_eq!(plan.set, vec![fdb(12, 12)]);
        assert!(plan.remove_remotes.is_empty() && plan.remove_macs.is_empty());
        // A MAC nobody wants goes whole, whatever its remotes.
        let plan = plan_fdb(&[], &[unnamed]);
        assert_eq!(plan.remove_macs, vec![vtep_mac(12)]);
    }

    #[test]
    fn neighbours_diff_by_ip() {
        assert!(plan_neighbours(&[peer(12)], &[neigh(12, 12)]).is_empty());
        // .12 has a wrong MAC -> replace (not delete: deleting is by IP and
        // would remove the replacement); .14 is stale; .13 is missing.
        let plan = plan_neighbours(&[peer(12), peer(13)], &[neigh(12, 99), neigh(14, 14)]);
        assert_eq!(plan.set, vec![neigh(12, 12), neigh(13, 13)]);
        assert_eq!(plan.remove, vec![ip(14)]);
    }

    #[test]
    fn routes_from_empty_and_in_sync() {
        let want = [route("10.32.1.0/24", 12), route("10.32.2.0/24", 13)];
        assert_eq!(plan_routes(&want, &[], &[], idx, &[]).set, want.to_vec());
        let have = [cur("10.32.2.0/24", 13, 7), cur("10.32.1.0/24", 12, 7)];
        assert!(plan_routes(&want, &[], &[], idx, &have).is_empty());
    }

    #[test]
    fn routes_replace_changed_next_hop_and_remove_stale() {
        let want = [route("10.32.1.0/24", 12), route("10.32.2.0/24", 12)];
        let stale = cur("10.32.3.0/24", 14, 7);
        let have = [
            cur("10.32.1.0/24", 12, 7),
            cur("10.32.2.0/24", 13, 7),
            stale,
        ];
        let plan = plan_routes(&want, &[], &[], idx, &have);
        // 10.32.2.0/24 now goes through the relay .12: replaced, not removed.
        assert_eq!(plan.set, vec![route("10.32.2.0/24", 12)]);
        assert_eq!(plan.remove, vec![stale]);
    }

    #[test]
    fn routes_on_a_recreated_device_or_without_onlink_are_reset() {
        let want = [route("10.32.1.0/24", 12)];
        // Old device index 5 (the VXLAN device was recreated as 7).
        assert_eq!(
            plan_routes(&want, &[], &[], idx, &[cur("10.32.1.0/24", 12, 5)]).set,
            want.to_vec()
        );
        let mut not_onlink = cur("10.32.1.0/24", 12, 7);
        not_onlink.onlink = false;
        assert_eq!(
            plan_routes(&want, &[], &[], idx, &[not_onlink]).set,
            want.to_vec()
        );
    }

    #[test]
    fn routes_with_other_metrics_are_stale_and_prefixes_are_truncated() {
        let mut other_metric = cur("10.32.1.0/24", 12, 7);
        other_metric.metric = 100;
        let want = [route("10.32.1.77/24", 12)];
        let plan = plan_routes(
            &want,
            &[],
            &[],
            idx,
            &[other_metric, cur("10.32.1.0/24", 12, 7)],
        );
        assert!(plan.set.is_empty());
        assert_eq!(plan.remove, vec![other_metric]);
    }

    #[test]
    fn routes_move_between_vxlan_and_the_sleeve_in_place() {
        let mut sleeved = route("10.32.2.0/24", 13);
        sleeved.device = Overlay::Sleeve;
        let want = [route("10.32.1.0/24", 12), sleeved];
        // Both on VXLAN now: only the sleeved prefix is replaced, nothing
        // is removed (removal would take the replacement with it).
        let have = [cur("10.32.1.0/24", 12, 7), cur("10.32.2.0/24", 13, 7)];
        let plan = plan_routes(&want, &[], &[], idx, &have);
        assert_eq!(plan.set, vec![sleeved]);
        assert!(plan.remove.is_empty());
        // Mixed and in sync: idempotent.
        let have = [cur("10.32.1.0/24", 12, 7), cur("10.32.2.0/24", 13, 9)];
        assert!(plan_routes(&want, &[], &[], idx, &have).is_empty());
        // And back to VXLAN.
        let back = [route("10.32.1.0/24", 12), route("10.32.2.0/24", 13)];
        assert_eq!(
            plan_routes(&back, &[], &[], idx, &have).set,
            vec![route("10.32.2.0/24", 13)]
        );
    }

    #[test]
    fn a_held_prefix_keeps_its_route_and_its_next_hops_entries() {
        // 10.32.2.0/24's owner (.12) is unreachable: nothing desired for it.
        let kept = cur("10.32.2.0/24", 12, 7);
        let plan = plan_routes(&[], &[net("10.32.2.0/24")], &[], idx, &[kept]);
        assert!(plan.is_empty(), "{plan:?}");
        // Its next hop's neighbour entry stays, and with it the FDB entry.
        let held = held_peers(
            &[net("10.32.2.0/24")],
            &[],
            &[],
            7,
            &[kept],
            &[neigh(12, 12)],
        );
        assert_eq!(held, vec![peer(12)]);
        assert!(plan_neighbours(&held, &[neigh(12, 12)]).is_empty());
        assert!(plan_fdb(&held, &[fdb(12, 12)]).is_empty());
        // Held is never added: a prefix without a route stays without.
        assert!(plan_routes(&[], &[net("10.32.3.0/24")], &[], idx, &[]).is_empty());
    }

    #[test]
    fn a_held_route_through_a_live_peer_goes() {
        // 10.32.3.0/24's owner (.13) is unreachable; the kernel last routed
        // it through the relay .12, which is live: .12 has no route to .13
        // either, or holds one back through this node (a loop). It goes.
        let held = [net("10.32.3.0/24")];
        let live = [ip(12)];
        let want = [route("10.32.2.0/24", 12)];
        let routed = cur("10.32.2.0/24", 12, 7);
        let relayed = cur("10.32.3.0/24", 12, 7);
        let plan = plan_routes(&want, &held, &live, idx, &[routed, relayed]);
        assert!(plan.set.is_empty(), "{plan:?}");
        assert_eq!(plan.remove, vec![relayed]);
        let neighbours = [neigh(12, 12)];
        assert!(held_peers(&held, &live, &[], 7, &[relayed], &neighbours).is_empty());
        // Straight to the owner (its agent away), the route stays, with its
        // next hop's entries.
        let direct = cur("10.32.3.0/24", 13, 7);
        assert!(plan_routes(&want, &held, &live, idx, &[routed, direct]).is_empty());
        let neighbours = [neigh(12, 12), neigh(13, 13)];
        let peers = held_peers(&held, &live, &[peer(12)], 7, &[direct], &neighbours);
        assert_eq!(peers, vec![peer(13)]);
    }

    #[test]
    fn a_held_prefix_given_to_another_owner_is_routed_anew() {
        // The range went to .13 (donated, or reclaimed after .12's node was
        // removed): desired, no longer held, replaced in place.
        let kept = cur("10.32.2.0/24", 12, 7);
        let plan = plan_routes(&[route("10.32.2.0/24", 13)], &[], &[], idx, &[kept]);
        assert_eq!(plan.set, vec![route("10.32.2.0/24", 13)]);
        assert!(plan.remove.is_empty());
        // Once no held route needs .12, its entries go.
        assert!(held_peers(&[], &[], &[peer(13)], 7, &[kept], &[neigh(12, 12)]).is_empty());
        assert_eq!(
            plan_neighbours(&[peer(13)], &[neigh(12, 12)]).remove,
            vec![ip(12)]
        );
    }

    #[test]
    fn a_kept_route_never_covers_this_nodes_own_range() {
        // .12 gave 10.32.2.128/25 to this node (bridge-routed, so neither
        // desired nor held) and still owns 10.32.2.0/25, unreachable. The
        // old /24 would take the new local range over the VXLAN device: it
        // goes, and the held /25 has no route to keep.
        let wide = cur("10.32.2.0/24", 12, 7);
        let plan = plan_routes(&[], &[net("10.32.2.0/25")], &[], idx, &[wide]);
        assert!(plan.set.is_empty());
        assert_eq!(plan.remove, vec![wide]);
        // The same range wholly ours now: the route goes.
        assert_eq!(plan_routes(&[], &[], &[], idx, &[wide]).remove, vec![wide]);
        // A narrower leftover of a merged range goes too.
        let narrow = cur("10.32.2.0/25", 12, 7);
        let plan = plan_routes(&[], &[net("10.32.2.0/24")], &[], idx, &[narrow]);
        assert_eq!(plan.remove, vec![narrow]);
    }

    #[test]
    fn a_forgotten_peers_route_and_entries_go() {
        let kept = cur("10.32.2.0/24", 12, 7);
        let plan = plan_routes(&[], &[], &[], idx, &[kept]);
        assert_eq!(plan.remove, vec![kept]);
        assert!(held_peers(&[], &[], &[], 7, &[kept], &[neigh(12, 12)]).is_empty());
        assert_eq!(plan_neighbours(&[], &[neigh(12, 12)]).remove, vec![ip(12)]);
        assert_eq!(
            plan_fdb(&[], &[fdb(12, 12)]).remove_macs,
            vec![vtep_mac(12)]
        );
    }

    #[test]
    fn held_peers_defer_to_current_ones_and_skip_the_sleeve() {
        let held = [net("10.32.2.0/24")];
        let kept = cur("10.32.2.0/24", 12, 7);
        // .12 is a current peer with another MAC (a new name): desired wins.
        assert!(held_peers(&held, &[], &[peer(12)], 7, &[kept], &[neigh(12, 99)]).is_empty());
        // Another current peer took .12's MAC: desired wins too.
        let took = RemotePeer {
            underlay: ip(22),
            mac: vtep_mac(12),
        };
        assert!(held_peers(&held, &[], &[took], 7, &[kept], &[neigh(12, 12)]).is_empty());
        // A route into the sleeve (index 9) needs no VXLAN entries.
        let sleeved = cur("10.32.2.0/24", 12, 9);
        assert!(held_peers(&held, &[], &[], 7, &[sleeved], &[neigh(12, 12)]).is_empty());
        // Without a neighbour entry there is nothing to keep.
        assert!(held_peers(&held, &[], &[], 7, &[kept], &[]).is_empty());
    }
}
