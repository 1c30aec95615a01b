//! An in-memory dataplane for the agent's tests and the simulator.

use crate::plan::{self, NeighEntry, RouteEntry};
use crate::{Dataplane, DataplaneError, Desired, Overlay, PodRoute, VxlanSpec};

/// Records the last applied [`Desired`] (normalized: peers and routes sorted
/// and de-duplicated) and counts the reconciliations that changed it.
/// Held prefixes are kept by the plan the Linux dataplane follows (see
/// [`crate::plan::plan_routes`] and [`crate::plan::held_peers`]): the
/// route the state had for exactly such a prefix stays, unless it goes
/// through a live peer, while its device does, with the peer entry of its
/// VXLAN next hop.
#[derive(Clone, Debug, Default)]
pub struct MemoryDataplane {
    state: Desired,
    changes: u64,
    reconciles: u64,
    teardowns: u64,
    fail_vxlan: Option<String>,
}

impl MemoryDataplane {
    pub fn new() -> Self {
        Self::default()
    }

    /// The state last applied (empty after `new` or `teardown`).
    pub fn state(&self) -> &Desired {
        &self.state
    }

    /// How many `reconcile` calls changed the state.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// How many `reconcile` calls succeeded (changing anything or not).
    pub fn reconciles(&self) -> u64 {
        self.reconciles
    }

    /// How many times `teardown` was called.
    pub fn teardowns(&self) -> u64 {
        self.teardowns
    }

    /// From now on, `reconcile` with a VXLAN device fails with
    /// [`DataplaneError::Vxlan`] and this reason (as on a node without the
    /// vxlan module), so tests can exercise the agent's fallback. `None`
    /// stops failing.
    pub fn fail_vxlan(&mut self, reason: Option<String>) {
        self.fail_vxlan = reason;
    }
}

/// The interface indexes the state's devices stand for in a plan.
const VXLAN_INDEX: u32 = 1;
const SLEEVE_INDEX: u32 = 2;

impl MemoryDataplane {
    /// `desired` with what the plan the Linux dataplane follows keeps of
    /// the state: the routes [`crate::plan::kept`] for its held prefixes,
    /// while their device stays, and the peers their VXLAN next hops need.
    fn keeping_held(&self, desired: &Desired) -> Desired {
        let old = &self.state;
        // Without VXLAN everything goes into the sleeve, as in the kernel.
        let index = |device, vxlan: &Option<VxlanSpec>| match (device, vxlan) {
            (Overlay::Fastdp, Some(_)) => VXLAN_INDEX,
            _ => SLEEVE_INDEX,
        };
        let device_stays = |oif| match oif {
            VXLAN_INDEX => desired.vxlan.is_some(),
            _ => desired.sleeve.is_some(),
        };
        // The state's routes as the kernel lists them; a device that goes
        // takes its routes with it.
        let current: Vec<(PodRoute, RouteEntry)> = old
            .routes
            .iter()
            .map(|r| {
                let entry = RouteEntry {
                    prefix: r.prefix,
                    next_hop: Some(r.next_hop),
                    oif: Some(index(r.device, &old.vxlan)),
                    onlink: true,
                    metric: 0,
                };
                (*r, entry)
            })
            .filter(|(_, entry)| entry.oif.is_some_and(device_stays))
            .collect();
        let entries: Vec<RouteEntry> = current.iter().map(|(_, entry)| *entry).collect();
        let routes = plan::plan_routes(
            &desired.routes,
            &desired.held,
            &desired.live,
            |device| index(device, &desired.vxlan),
            &entries,
        );
        let kept = current
            .iter()
            .filter(|(_, entry)| !routes.remove.contains(entry))
            .filter(|(r, _)| !desired.routes.iter().any(|d| d.prefix == r.prefix))
            .map(|(r, _)| *r);
        let neighbours: Vec<NeighEntry> = old
            .peers
            .iter()
            .map(|p| NeighEntry {
                ip: p.underlay,
                mac: p.mac,
            })
            .collect();
        let peers = plan::held_peers(
            &desired.held,
            &desired.live,
            &desired.peers,
            VXLAN_INDEX,
            &entries,
            &neighbours,
        );
        let mut next = desired.clone();
        next.routes.extend(kept);
        next.peers.extend(peers);
        next
    }
}

impl Dataplane for MemoryDataplane {
    fn reconcile(&mut self, desired: &Desired) -> Result<(), DataplaneError> {
        if let (Some(reason), Some(vxlan)) = (&self.fail_vxlan, &desired.vxlan) {
            return Err(DataplaneError::Vxlan {
                name: vxlan.name.clone(),
                action: "create",
                reason: reason.clone(),
            });
        }
        // As the kernel would: a route into the sleeve next to VXLAN needs
        // the sleeve's device.
        if desired.vxlan.is_some()
            && desired.sleeve.is_none()
            && let Some(r) = desired.routes.iter().find(|r| r.device == Overlay::Sleeve)
        {
            return Err(DataplaneError::Route {
                action: "add",
                prefix: r.prefix,
                next_hop: r.next_hop.to_string(),
                reason: "it should go into the sleeve, and there is no sleeve device".into(),
            });
        }
        let next = self.keeping_held(desired).normalized();
        if next != self.state {
            self.state = next;
            self.changes += 1;
        }
        self.reconciles += 1;
        Ok(())
    }

    fn teardown(&mut self) -> Result<(), DataplaneError> {
        self.state = Desired::default();
        self.teardowns += 1;
        Ok(())
    }

    fn delete_device(&mut self, _name: &str) -> Result<(), DataplaneError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{RemotePeer, vtep_mac};

    #[test]
    fn counts_only_real_changes() {
        let mut dp = MemoryDataplane::new();
        let peer = |n: u8| RemotePeer {
            underlay: Ipv4Addr::new(192, 168, 1, n),
            mac: vtep_mac(n.into()),
        };
        let mut d = Desired {
            vxlan: Some(VxlanSpec::new(
                Ipv4Addr::new(192, 168, 1, 11),
                1450,
                vtep_mac(11),
            )),
            peers: vec![peer(13), peer(12)],
            ..Default::default()
        };
        dp.reconcile(&d).unwrap();
        d.peers.reverse();
        dp.reconcile(&d).unwrap();
        assert_eq!((dp.changes(), dp.reconciles()), (1, 2));
        assert_eq!(dp.state().peers, vec![peer(12), peer(13)]);

        dp.fail_vxlan(Some("Operation not supported".into()));
        let err = dp.reconcile(&d).unwrap_err();
        assert!(matches!(err, DataplaneError::Vxlan { .. }), "{err}");
        assert_eq!(dp.changes(), 1);

        dp.teardown().unwrap();
        assert_eq!(dp.state(), &Desired::default());
    }

    /// While a prefix's owner is unreachable, the route the state had for
    /// it stays, with its next hop's peer entry, as in the kernel; a
    /// prefix held without a route gets none, and the route goes once the
    /// prefix is neither routed nor held.
    #[test]
    fn held_prefixes_keep_the_route_they_had() {
        let mut dp = MemoryDataplane::new();
        let ip = |n: u8| Ipv4Addr::new(192, 168, 1, n);
        let peer = |n: u8| RemotePeer {
            underlay: ip(n),
            mac: vtep_mac(n.into()),
        };
        let route = |p: &str, n: u8| PodRoute {
            prefix: p.parse().unwrap(),
            next_hop: ip(n),
            device: Overlay::Fastdp,
        };
        let vxlan = Some(VxlanSpec::new(ip(11), 1450, vtep_mac(11)));
        let both = Desired {
            vxlan: vxlan.clone(),
            peers: vec![peer(12), peer(13)],
            routes: vec![route("10.32.2.0/24", 12), route("10.32.3.0/24", 13)],
            ..Default::default()
        };
        dp.reconcile(&both).unwrap();
        let node2_away = Desired {
            vxlan: vxlan.clone(),
            peers: vec![peer(13)],
            routes: vec![route("10.32.3.0/24", 13)],
            held: vec![
                "10.32.2.0/24".parse().unwrap(),
                "10.32.9.0/24".parse().unwrap(),
            ],
            ..Default::default()
        };
        dp.reconcile(&node2_away).unwrap();
        assert_eq!(dp.state().routes, both.routes);
        assert_eq!(dp.state().peers, both.peers);
        let forgotten = Desired {
            held: Vec::new(),
            ..node2_away.clone()
        };
        dp.reconcile(&forgotten).unwrap();
        assert_eq!(dp.state(), &forgotten.normalized());
        // Without its device, a held route is gone too.
        dp.reconcile(&both).unwrap();
        let no_vxlan = Desired {
            vxlan: None,
            ..node2_away
        };
        dp.reconcile(&no_vxlan).unwrap();
        assert_eq!(dp.state().routes, vec![route("10.32.3.0/24", 13)]);
    }
}
