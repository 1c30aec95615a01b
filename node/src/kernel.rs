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
    BridgeSpec, Dataplane, DataplaneError, Desired, PodRoute, RemotePeer, SleeveSpec, VxlanSpec,
    vtep_mac,
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

/// What the kernel should hold for this router.
pub fn desired(router: &Router, bridge: &str, mtu: u32, overlay: Overlay) -> Desired {
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
    let sleeve = SleeveSpec {
        name: crate::sleeve::DEVICE.into(),
        mtu,
    };
    match overlay {
        Overlay::Fastdp { sleeve: fallback } => Desired {
            bridge,
            vxlan: Some(VxlanSpec::new(local, mtu, vtep_mac(router.name().0))),
            sleeve: fallback.then_some(sleeve),
            peers,
            routes,
        },
        Overlay::Sleeve => Desired {
            bridge,
            vxlan: None,
            sleeve: Some(sleeve),
            peers: Vec::new(),
            routes,
        },
    }
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
}

impl KernelSync {
    /// Starts the thread. A VXLAN device that cannot be set up makes it
    /// fall back to the bridge alone, with the reason in `state`.
    pub fn start(
        mut dataplane: Box<dyn Dataplane + Send>,
        state: Arc<Mutex<DataplaneState>>,
    ) -> KernelSync {
        let (tx, rx) = mpsc::channel::<Work>();
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
                    if let Some(next) = next
                        && applied.as_ref() != Some(&next)
                    {
                        apply(&mut *dataplane, &next, &state);
                        applied = Some(next);
                    }
                }
            })
            .expect("spawn the kernel dataplane thread");
        KernelSync { tx }
    }

    pub fn update(&self, desired: Desired) {
        let _ = self.tx.send(Work::Apply(desired));
    }

    /// Deletes a pod's host-side veth in the background.
    pub fn delete_device(&self, name: String) -> bool {
        self.tx.send(Work::Delete(name)).is_ok()
    }
}

fn apply(dataplane: &mut dyn Dataplane, desired: &Desired, state: &Mutex<DataplaneState>) {
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    let fell_back = state.fallback.is_some();
    let want = if fell_back {
        Desired {
            vxlan: None,
            peers: Vec::new(),
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
            state.in_use = in_use(&want);
        }
        Err(e @ DataplaneError::Vxlan { .. }) => {
            let without_vxlan = Desired {
                vxlan: None,
                peers: Vec::new(),
                ..desired.clone()
            };
            state.fallback = Some(e.to_string());
            state.in_use = in_use(&without_vxlan);
            tracing::warn!("fastdp unavailable, using {}: {e}", state.in_use);
            if let Err(e) = dataplane.reconcile(&without_vxlan) {
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
            sleeve: None,
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
