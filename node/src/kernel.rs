//! Keeps the kernel dataplane in step with the router: what the bridge,
//! the VXLAN device, its FDB and neighbour entries and the pod routes
//! should be ([`desired`]), applied on a thread of its own because netlink
//! calls block.

use crate::agent::DataplaneState;
use ipnet::Ipv4Net;
use std::net::IpAddr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use weft_core::Router;
use weft_core::forward::Forward;
use weft_dataplane::{
    BridgeSpec, Dataplane, DataplaneError, Desired, PodRoute, RemotePeer, VxlanSpec, vtep_mac,
};

/// What the kernel should hold for this router. With `fastdp` false only
/// the bridge (pods on this node reach each other; nothing crosses nodes).
pub fn desired(router: &Router, bridge: &str, mtu: u32, fastdp: bool) -> Desired {
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
    if !fastdp {
        return Desired {
            bridge,
            ..Desired::default()
        };
    }
    let underlay = |peer| {
        let entry = router.topology().get(peer)?;
        match entry.address.ip() {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        }
    };
    // Direct neighbours: every peer some route's next hop goes through.
    let mut peers: Vec<RemotePeer> = router
        .routes()
        .iter()
        .filter(|(peer, hop)| peer == hop)
        .filter_map(|(peer, _)| {
            Some(RemotePeer {
                underlay: underlay(peer)?,
                mac: vtep_mac(peer.0),
            })
        })
        .collect();
    peers.sort();
    let routes = router
        .forwarding()
        .prefixes()
        .iter()
        .filter_map(|(prefix, forward)| match forward {
            Forward::Peer { underlay, .. } => match underlay.ip() {
                IpAddr::V4(next_hop) => Some(PodRoute {
                    prefix: *prefix,
                    next_hop,
                }),
                IpAddr::V6(_) => None,
            },
            _ => None,
        })
        .collect();
    Desired {
        bridge,
        vxlan: Some(VxlanSpec::new(local, mtu, vtep_mac(router.name().0))),
        peers,
        routes,
    }
}

/// The thread that applies desired states, newest first.
pub struct KernelSync {
    tx: mpsc::Sender<Desired>,
}

impl KernelSync {
    /// Starts the thread. A VXLAN device that cannot be set up makes it
    /// fall back to the bridge alone, with the reason in `state`.
    pub fn start(
        mut dataplane: Box<dyn Dataplane + Send>,
        state: Arc<Mutex<DataplaneState>>,
    ) -> KernelSync {
        let (tx, rx) = mpsc::channel::<Desired>();
        std::thread::Builder::new()
            .name("weft-kernel".into())
            .spawn(move || {
                let mut applied: Option<Desired> = None;
                while let Ok(mut next) = rx.recv() {
                    // Only the newest state matters.
                    while let Ok(newer) = rx.try_recv() {
                        next = newer;
                    }
                    if applied.as_ref() == Some(&next) {
                        continue;
                    }
                    apply(&mut *dataplane, &next, &state);
                    applied = Some(next);
                }
            })
            .expect("spawn the kernel dataplane thread");
        KernelSync { tx }
    }

    pub fn update(&self, desired: Desired) {
        let _ = self.tx.send(desired);
    }
}

fn apply(dataplane: &mut dyn Dataplane, desired: &Desired, state: &Mutex<DataplaneState>) {
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    let fell_back = state.fallback.is_some();
    let want = if fell_back {
        Desired {
            vxlan: None,
            peers: Vec::new(),
            routes: Vec::new(),
            ..desired.clone()
        }
    } else {
        desired.clone()
    };
    match dataplane.reconcile(&want) {
        Ok(()) => {
            state.kernel_error = None;
            if let Some(bridge) = &want.bridge {
                answer_arp_for_remote_pods(&bridge.name);
            }
            if want.vxlan.is_some() {
                state.in_use = "fastdp";
            }
        }
        Err(e @ DataplaneError::Vxlan { .. }) => {
            tracing::warn!("fastdp unavailable, pods on other nodes are unreachable: {e}");
            state.fallback = Some(e.to_string());
            state.in_use = "none";
            let bridge_only = Desired {
                bridge: desired.bridge.clone(),
                ..Desired::default()
            };
            if let Err(e) = dataplane.reconcile(&bridge_only) {
                tracing::error!("kernel dataplane: {e}");
                state.kernel_error = Some(e.to_string());
            }
        }
        Err(e) => {
            tracing::error!("kernel dataplane: {e}");
            state.kernel_error = Some(e.to_string());
        }
    }
}

/// Pods hold addresses with the whole range's prefix, so they ARP for
/// pods on other nodes too; with proxy ARP the bridge answers for every
/// address routed elsewhere (over the overlay), and pods on the same
/// bridge still answer for themselves.
fn answer_arp_for_remote_pods(bridge: &str) {
    // The kernel delays proxy answers by up to 0.8 s by default.
    for (path, value) in [
        (format!("/proc/sys/net/ipv4/conf/{bridge}/proxy_arp"), "1"),
        (
            format!("/proc/sys/net/ipv4/neigh/{bridge}/proxy_delay"),
            "0",
        ),
    ] {
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() != value)
            && let Err(e) = std::fs::write(&path, value)
        {
            tracing::warn!("cannot set {path}: {e}");
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
        }))
    }

    #[test]
    fn a_vxlan_failure_falls_back_to_the_bridge_and_says_why() {
        let mut memory = MemoryDataplane::new();
        memory.fail_vxlan(Some("Operation not supported".into()));
        let state = state();
        let desired = Desired {
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
            bridge: None,
            vxlan: Some(VxlanSpec::new(
                "192.168.1.11".parse().unwrap(),
                1450,
                [2; 6],
            )),
            peers: vec![],
            routes: vec![],
        };
        apply(&mut memory, &desired, &state);
        assert_eq!(state.lock().unwrap().in_use, "fastdp");
        assert_eq!(memory.state().vxlan, desired.vxlan);
    }
}
