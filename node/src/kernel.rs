//! Keeps the kernel dataplane in step with the router: what the bridge,
//! the VXLAN device, its FDB and neighbour entries and the pod routes
//! should be ([`desired`]), applied on a thread of its own because netlink
//! calls block.

use crate::agent::DataplaneState;
use ipnet::Ipv4Net;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use weft_core::forward::Forward;
use weft_core::{PeerName, Router};
use weft_dataplane::{
    BridgeSpec, Dataplane, DataplaneError, Desired, PodRoute, RemotePeer, RouteDevice, SleeveSpec,
    VxlanSpec, sysctl, vtep_mac,
};

/// Which overlay carries pod traffic between nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overlay {
    /// Kernel VXLAN, with the sleeve as fallback when `sleeve` is set.
    Fastdp {
        sleeve: bool,
    },
    Sleeve,
}

/// What the kernel should hold for this router. `sleeved`: peers VXLAN
/// does not reach (see `fastdp_probe`); with fastdp and a sleeve, prefixes
/// whose next hop is one of them go into the sleeve's TUN device, whose
/// reader forwards them by the same table. Their FDB and neighbour entries
/// stay: the probes that tell when VXLAN works again need them on the
/// peer's side, and they cost nothing here.
pub fn desired(
    router: &Router,
    bridge: &str,
    mtu: u32,
    overlay: Overlay,
    sleeved: &BTreeSet<PeerName>,
) -> Desired {
    let range = router.ipam().range();
    let bridge = router.gateway().map(|gateway| BridgeSpec {
        name: bridge.to_string(),
        gateway: Ipv4Net::new(gateway, range.prefix_len()).expect("prefix of a valid range"),
        mtu,
    });
    let IpAddr::V4(local) = router.config().address.ip() else {
        return Desired {
            bridge,
            ..Desired::default()
        };
    };
    let mut peers: Vec<RemotePeer> = direct_neighbours(router)
        .into_iter()
        .map(|(peer, control)| RemotePeer {
            underlay: *control.ip(),
            mac: vtep_mac(peer.0),
        })
        .collect();
    peers.sort();
    let device = |next_hop: &PeerName| match overlay {
        Overlay::Fastdp { sleeve: true } if sleeved.contains(next_hop) => RouteDevice::Sleeve,
        Overlay::Fastdp { .. } => RouteDevice::Vxlan,
        Overlay::Sleeve => RouteDevice::Sleeve,
    };
    let routes = router
        .forwarding()
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
    let held = held_prefixes(router);
    let sleeve = SleeveSpec {
        name: crate::sleeve::DEVICE.into(),
        mtu,
    };
    match overlay {
        Overlay::Fastdp { sleeve: fallback } => Desired {
            bridge,
            vxlan: Some(VxlanSpec {
                underlay_dev: crate::underlay::interfaces()
                    .into_values()
                    .find(|i| i.addrs.iter().any(|a| a.addr() == local))
                    .map(|i| i.name),
                ..VxlanSpec::new(local, mtu, vtep_mac(router.name().0))
            }),
            sleeve: fallback.then_some(sleeve),
            peers,
            routes,
            held,
        },
        Overlay::Sleeve => Desired {
            bridge,
            vxlan: None,
            sleeve: Some(sleeve),
            peers: Vec::new(),
            routes,
            held,
        },
    }
}

/// Prefixes whose kernel routes stay as they are: those of remote owners
/// that are unreachable right now. A peer's agent restarting (or ours,
/// which starts from the saved ring with no connections yet) leaves the
/// kernel path to it working, so its last route is better than none. The
/// table holds only current owners' prefixes, disjoint from ours: a range
/// that is donated, reclaimed after its owner's removal, or whose owner is
/// forgotten is routed anew or dropped.
fn held_prefixes(router: &Router) -> Vec<Ipv4Net> {
    router
        .forwarding()
        .prefixes()
        .iter()
        .filter(|(_, forward)| **forward == Forward::Unreachable)
        .map(|(prefix, _)| *prefix)
        .collect()
}

/// Direct neighbours over IPv4, with their control address: every peer
/// some route's next hop goes through.
pub fn direct_neighbours(router: &Router) -> Vec<(PeerName, SocketAddrV4)> {
    router
        .routes()
        .iter()
        .filter(|(peer, hop)| peer == hop)
        .filter_map(|(peer, _)| match router.topology().get(peer)?.address {
            SocketAddr::V4(control) => Some((peer, control)),
            SocketAddr::V6(_) => None,
        })
        .collect()
}

/// Work for the kernel thread.
enum Work {
    Apply(Desired),
    /// A pod's host-side veth, after CNI DEL.
    Delete(String),
}

/// The thread that applies desired states, newest first, and deletes pod
/// devices.
#[derive(Clone)]
pub struct KernelSync {
    tx: mpsc::Sender<Work>,
    /// The pods' gateway as the kernel's bridge holds it: set once a
    /// desired state with that bridge is applied, so pods are wired only to
    /// a bridge that exists.
    bridge_gateway: watch::Receiver<Option<Ipv4Addr>>,
}

impl KernelSync {
    /// Starts the thread. A VXLAN device that cannot be set up makes it
    /// fall back to the bridge alone, with the reason in `state`.
    pub fn start(
        mut dataplane: Box<dyn Dataplane + Send>,
        state: Arc<Mutex<DataplaneState>>,
    ) -> KernelSync {
        let (tx, rx) = mpsc::channel::<Work>();
        let (bridge_tx, bridge_gateway) = watch::channel(None);
        std::thread::Builder::new()
            .name("weft-kernel".into())
            .spawn(move || {
                let mut applied: Option<Desired> = None;
                while let Ok(work) = rx.recv() {
                    // Deletions in order; of desired states only the newest.
                    let mut next = None;
                    for work in std::iter::once(work).chain(rx.try_iter()) {
                        match work {
                            Work::Apply(d) => next = Some(d),
                            Work::Delete(name) => {
                                if let Err(e) = dataplane.delete_device(&name) {
                                    tracing::warn!("{e}");
                                }
                            }
                        }
                    }
                    // A failed state is tried again with the next update
                    // (at the latest the periodic resync).
                    let Some(next) = next else { continue };
                    if applied.as_ref() == Some(&next) {
                        // Nothing to reconcile; a node setting others may
                        // change back is re-asserted at every resync.
                        let_iptables_see_bridged_traffic(&next);
                    } else if apply(&mut *dataplane, &next, &state) {
                        bridge_tx.send_replace(next.bridge.as_ref().map(|b| b.gateway.addr()));
                        applied = Some(next);
                    }
                }
            })
            .expect("spawn the kernel dataplane thread");
        KernelSync { tx, bridge_gateway }
    }

    /// Whether the kernel's bridge holds `gateway`.
    pub fn bridge_holds(&self, gateway: Ipv4Addr) -> bool {
        *self.bridge_gateway.borrow() == Some(gateway)
    }

    /// Returns once the kernel's bridge holds the gateway `gateway()` names
    /// (asked again after every change the kernel thread applies).
    pub async fn bridge_ready(&self, gateway: impl Fn() -> Option<Ipv4Addr>) {
        let mut applied = self.bridge_gateway.clone();
        loop {
            if gateway().is_some_and(|g| *applied.borrow_and_update() == Some(g)) {
                return;
            }
            if applied.changed().await.is_err() {
                // The kernel thread is gone: nothing will change any more.
                std::future::pending::<()>().await;
            }
        }
    }

    pub fn update(&self, desired: Desired) {
        let _ = self.tx.send(Work::Apply(desired));
    }

    /// Deletes a pod's host-side veth in the background.
    pub fn delete_device(&self, name: String) -> bool {
        self.tx.send(Work::Delete(name)).is_ok()
    }
}

/// Applies `desired`; true when the kernel now holds its bridge.
fn apply(dataplane: &mut dyn Dataplane, desired: &Desired, state: &Mutex<DataplaneState>) -> bool {
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    let fell_back = state.fallback.is_some();
    let want = if fell_back {
        without_vxlan(desired)
    } else {
        desired.clone()
    };
    match dataplane.reconcile(&want) {
        Ok(()) => {
            state.kernel_error = None;
            if let Some(bridge) = &want.bridge {
                answer_arp_for_remote_pods(&bridge.name);
            }
            let_iptables_see_bridged_traffic(&want);
            no_rp_filter_on_overlays(&want);
            state.in_use = in_use(&want);
            true
        }
        Err(e @ DataplaneError::Vxlan { .. }) => {
            let without_vxlan = without_vxlan(desired);
            state.fallback = Some(e.to_string());
            state.in_use = in_use(&without_vxlan);
            tracing::warn!("fastdp unavailable, using {}: {e}", state.in_use);
            match dataplane.reconcile(&without_vxlan) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!("kernel dataplane: {e}");
                    state.kernel_error = Some(e.to_string());
                    false
                }
            }
        }
        Err(e) => {
            tracing::error!("kernel dataplane: {e}");
            state.kernel_error = Some(e.to_string());
            false
        }
    }
}

/// `desired` with the sleeve carrying everything (node-wide fallback).
fn without_vxlan(desired: &Desired) -> Desired {
    Desired {
        vxlan: None,
        peers: Vec::new(),
        routes: desired
            .routes
            .iter()
            .map(|r| PodRoute {
                device: RouteDevice::Sleeve,
                ..*r
            })
            .collect(),
        ..desired.clone()
    }
}

/// No reverse-path filtering on weft's overlay devices. A peer's pod
/// packets may arrive over VXLAN while our route back to that peer's
/// prefix goes into the sleeve, or the other way round (each node decides
/// its own direction), and fastdp probes arrive on the VXLAN device from
/// the peer's underlay address, which is routed over the underlay. Loose
/// filtering (2) is not enough: on a device without an address (both of
/// weft's) the kernel refuses every source not routed through that very
/// device, in loose mode as in strict. The kernel applies the larger of
/// `all` and the device's value, so `all` must be 0 too; lowering it
/// leaves every other device's own setting in force (distributions set
/// `default`, which devices copy when they are created), as Cilium does.
/// The sleeve alone needs none of this: its routes and its packets' sources
/// all go through its device.
fn no_rp_filter_on_overlays(d: &Desired) {
    let Some(vxlan) = &d.vxlan else { return };
    let sleeve = d.sleeve.as_ref().map(|s| s.name.as_str());
    for dev in std::iter::once(vxlan.name.as_str()).chain(sleeve) {
        set_sysctl(&sysctl::net(&format!("ipv4/conf/{dev}/rp_filter")), "0");
    }
    set_sysctl(&sysctl::net("ipv4/conf/all/rp_filter"), "0");
}

/// kube-proxy's Service DNAT (iptables) must see the traffic the bridge
/// switches between two pods of this node: a backend's reply to a client
/// on the same bridge is un-DNATed only then. Without br_netfilter the
/// sysctl is absent and nothing is written (the agent warned at start).
fn let_iptables_see_bridged_traffic(d: &Desired) {
    if d.bridge.is_some() {
        set_sysctl(&sysctl::bridge_nf_call_iptables(), "1");
    }
}

/// Writes `value` where it differs, saying so; a failure is logged (the
/// overlay still works for peers on the same path both ways).
fn set_sysctl(path: &std::path::Path, value: &str) {
    let Ok(old) = std::fs::read_to_string(path) else {
        return;
    };
    if old.trim() == value {
        return;
    }
    match std::fs::write(path, value) {
        Ok(()) => tracing::info!("set {} to {value} (was {})", path.display(), old.trim()),
        Err(e) => tracing::warn!("cannot set {} to {value}: {e}", path.display()),
    }
}

fn in_use(d: &Desired) -> &'static str {
    match (&d.vxlan, &d.sleeve) {
        (Some(_), _) => "fastdp",
        (None, Some(_)) => "sleeve",
        (None, None) => "none",
    }
}

/// Pods hold addresses with the whole range's prefix, so they ARP for
/// pods on other nodes too; with proxy ARP the bridge answers for every
/// address routed elsewhere (over the overlay), and pods on the same
/// bridge still answer for themselves.
fn answer_arp_for_remote_pods(bridge: &str) {
    // The kernel delays proxy answers by up to 0.8 s by default.
    for (path, value) in [
        (sysctl::net(&format!("ipv4/conf/{bridge}/proxy_arp")), "1"),
        (
            sysctl::net(&format!("ipv4/neigh/{bridge}/proxy_delay")),
            "0",
        ),
    ] {
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() != value)
            && let Err(e) = std::fs::write(&path, value)
        {
            tracing::warn!("cannot set {}: {e}", path.display());
        }
    }
}

/// The MTU of the interface holding `ip`, if any holds it.
pub fn underlay_mtu(ip: std::net::Ipv4Addr) -> Option<u32> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    let name = addrs
        .filter(|a| {
            a.address
                .and_then(|s| s.as_sockaddr_in().map(|sin| sin.ip() == ip))
                .unwrap_or(false)
        })
        .map(|a| a.interface_name)
        .next()?;
    std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_dataplane::MemoryDataplane;

    fn state() -> Arc<Mutex<DataplaneState>> {
        Arc::new(Mutex::new(DataplaneState {
            requested: "fastdp",
            in_use: "none",
            fallback: None,
            kernel_error: None,
            egress_problem: None,
            peers: Vec::new(),
        }))
    }

    #[test]
    fn a_vxlan_failure_falls_back_to_the_bridge_and_says_why() {
        let mut memory = MemoryDataplane::new();
        memory.fail_vxlan(Some("Operation not supported".into()));
        let state = state();
        let desired = Desired {
            sleeve: None,
            bridge: Some(BridgeSpec {
                name: "weft".into(),
                gateway: "10.32.0.1/12".parse().unwrap(),
                mtu: 1450,
            }),
            vxlan: Some(VxlanSpec::new(
                "192.168.1.11".parse().unwrap(),
                1450,
                [2; 6],
            )),
            peers: vec![],
            routes: vec![],
            held: vec![],
        };
        apply(&mut memory, &desired, &state);
        let s = state.lock().unwrap().clone();
        assert_eq!(s.in_use, "none");
        assert!(
            s.fallback
                .as_deref()
                .unwrap()
                .contains("Operation not supported"),
            "{s:?}"
        );
        assert_eq!(memory.state().bridge, desired.bridge);
        assert_eq!(memory.state().vxlan, None);
    }

    /// Fails its first reconcile, as a kernel busy with another change may.
    struct FailsOnce(MemoryDataplane, bool);

    impl Dataplane for FailsOnce {
        fn reconcile(&mut self, desired: &Desired) -> Result<(), DataplaneError> {
            if std::mem::replace(&mut self.1, false) {
                return Err(DataplaneError::Injected("busy".into()));
            }
            self.0.reconcile(desired)
        }
        fn teardown(&mut self) -> Result<(), DataplaneError> {
            self.0.teardown()
        }
        fn delete_device(&mut self, name: &str) -> Result<(), DataplaneError> {
            self.0.delete_device(name)
        }
    }

    /// The CNI plugin waits for the bridge to hold the gateway: a failed
    /// apply is retried by the next update of the same state (the periodic
    /// resync), and only a bridge the kernel took counts.
    #[test]
    fn a_failed_apply_is_retried_and_the_bridge_counts_once_applied() {
        let gateway = std::net::Ipv4Addr::new(10, 32, 0, 1);
        let desired = Desired {
            bridge: Some(BridgeSpec {
                name: "weft".into(),
                gateway: Ipv4Net::new(gateway, 12).unwrap(),
                mtu: 1450,
            }),
            ..Desired::default()
        };
        let state = state();
        let kernel = KernelSync::start(
            Box::new(FailsOnce(MemoryDataplane::new(), true)),
            state.clone(),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            kernel.update(desired.clone());
            // Once the failure is recorded, the bridge does not count.
            while state.lock().unwrap().kernel_error.is_none() {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            assert!(!kernel.bridge_holds(gateway));
            kernel.update(desired);
            let retried = std::time::Duration::from_secs(60);
            tokio::time::timeout(retried, kernel.bridge_ready(|| Some(gateway)))
                .await
                .expect("the same state, updated again, is applied");
        });
        assert!(kernel.bridge_holds(gateway));
        assert_eq!(state.lock().unwrap().kernel_error, None);
    }

    #[test]
    fn the_loopback_mtu_is_found_by_address() {
        let mtu = underlay_mtu("127.0.0.1".parse().unwrap()).expect("lo holds 127.0.0.1");
        assert!(mtu >= 1500, "{mtu}");
        assert_eq!(underlay_mtu("192.0.2.99".parse().unwrap()), None);
    }

    #[test]
    fn a_working_vxlan_is_reported_as_fastdp() {
        let mut memory = MemoryDataplane::new();
        let state = state();
        let desired = Desired {
            sleeve: None,
            bridge: None,
            vxlan: Some(VxlanSpec::new(
                "192.168.1.11".parse().unwrap(),
                1450,
                [2; 6],
            )),
            peers: vec![],
            routes: vec![],
            held: vec![],
        };
        apply(&mut memory, &desired, &state);
        assert_eq!(state.lock().unwrap().in_use, "fastdp");
        assert_eq!(memory.state().vxlan, desired.vxlan);
    }

    /// Three routers in node-cidr mode (node i owns 10.32.i.0/24), fully
    /// connected, datagrams delivered at once, run for `secs`.
    fn three_routers(secs: u64) -> Vec<Router> {
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
        run(&mut routers, 0, secs, None);
        routers
    }

    /// Runs `routers` from second `from` for `secs`, with node `down`'s
    /// datagrams (both ways) lost.
    fn run(routers: &mut [Router], from: u64, secs: u64, down: Option<usize>) {
        use weft_core::Time;
        for step in from * 100..(from + secs) * 100 {
            let now = Time::from_millis(step * 10);
            for i in 0..routers.len() {
                routers[i].handle_timeout(now);
                while let Some(t) = routers[i].poll_transmit() {
                    let to = (0..routers.len())
                        .find(|j| routers[*j].config().address == t.destination)
                        .filter(|j| down != Some(i) && down != Some(*j));
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
        let fastdp = Overlay::Fastdp { sleeve: false };
        let d = desired(&routers[0], "weft", 1450, fastdp, &BTreeSet::new());
        assert!(d.held.is_empty(), "{d:?}");
        run(&mut routers, 10, 30, Some(1));
        let d = desired(&routers[0], "weft", 1450, fastdp, &BTreeSet::new());
        let node2: Ipv4Net = "10.32.2.0/24".parse().unwrap();
        assert_eq!(d.held, vec![node2], "{d:?}");
        assert!(d.routes.iter().all(|r| r.prefix != node2), "{d:?}");
        assert_eq!(d.routes.len(), 1, "node3's prefix is routed: {d:?}");
        run(&mut routers, 40, 30, None);
        let d = desired(&routers[0], "weft", 1450, fastdp, &BTreeSet::new());
        assert!(d.held.is_empty(), "{d:?}");
        assert!(d.routes.iter().any(|r| r.prefix == node2), "{d:?}");
    }

    #[test]
    fn prefixes_of_a_fallen_back_peer_go_into_the_sleeve() {
        let routers = three_routers(10);
        let (r1, node2) = (&routers[0], routers[1].name());
        let sleeved = BTreeSet::from([node2]);
        let fastdp = Overlay::Fastdp { sleeve: true };
        let d = desired(r1, "weft", 1450, fastdp, &sleeved);
        let device = |d: &Desired, prefix: &str| {
            let prefix: Ipv4Net = prefix.parse().unwrap();
            d.routes
                .iter()
                .find(|r| r.prefix == prefix)
                .map(|r| r.device)
        };
        assert_eq!(
            device(&d, "10.32.2.0/24"),
            Some(RouteDevice::Sleeve),
            "{d:?}"
        );
        assert_eq!(
            device(&d, "10.32.3.0/24"),
            Some(RouteDevice::Vxlan),
            "{d:?}"
        );
        // Node 2 keeps its FDB and neighbour entries, and the sleeve exists.
        assert_eq!(d.peers.len(), 2);
        assert!(d.sleeve.is_some() && d.vxlan.is_some());
        // Nobody fell back: all VXLAN.
        let all = desired(r1, "weft", 1450, fastdp, &BTreeSet::new());
        assert!(all.routes.iter().all(|r| r.device == RouteDevice::Vxlan));
        assert_eq!(all.routes.len(), 2);
        // Without a sleeve there is nothing to fall back to.
        let lone = desired(
            r1,
            "weft",
            1450,
            Overlay::Fastdp { sleeve: false },
            &sleeved,
        );
        assert!(lone.routes.iter().all(|r| r.device == RouteDevice::Vxlan));
        // The sleeve dataplane carries everything.
        let sleeve = desired(r1, "weft", 1450, Overlay::Sleeve, &BTreeSet::new());
        assert!(
            sleeve
                .routes
                .iter()
                .all(|r| r.device == RouteDevice::Sleeve)
        );
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

    #[test]
    fn a_node_wide_fallback_puts_every_route_into_the_sleeve() {
        let routers = three_routers(10);
        let d = desired(
            &routers[0],
            "weft",
            1450,
            Overlay::Fastdp { sleeve: true },
            &BTreeSet::new(),
        );
        let mut memory = MemoryDataplane::new();
        memory.fail_vxlan(Some("Operation not supported".into()));
        let state = state();
        apply(&mut memory, &d, &state);
        assert_eq!(state.lock().unwrap().in_use, "sleeve");
        assert_eq!(memory.state().routes.len(), 2);
        assert!(
            memory
                .state()
                .routes
                .iter()
                .all(|r| r.device == RouteDevice::Sleeve)
        );
    }
}
