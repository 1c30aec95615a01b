//! Where the node's network sysctls are, and every write to them.
//!
//! A container that is not privileged gets `/proc/sys` read-only, so
//! deploy/weft.yaml mounts the host's `/proc/sys/net` (writable with
//! CAP_NET_ADMIN) at `/host/proc/sys/net`, as Cilium does; elsewhere (a
//! plain process, the netns lab) `/proc/sys/net` is used. Either shows the
//! values of the network namespace of the process that opens the file:
//! with hostNetwork, the node's.

use std::path::{Path, PathBuf};

const MOUNTED: &str = "/host/proc/sys/net";
const OWN: &str = "/proc/sys/net";

fn mounted() -> bool {
    Path::new(MOUNTED).is_dir()
}

/// The file of the net sysctl `rel`, e.g. `ipv4/conf/weft/proxy_arp`.
pub fn net(rel: &str) -> PathBuf {
    Path::new(if mounted() { MOUNTED } else { OWN }).join(rel)
}

/// `net.ipv4.ip_forward`.
pub fn ip_forward() -> &'static str {
    if mounted() {
        "/host/proc/sys/net/ipv4/ip_forward"
    } else {
        "/proc/sys/net/ipv4/ip_forward"
    }
}

/// `net.bridge.bridge-nf-call-iptables`: whether IPv4 traffic the bridge
/// switches between two ports goes through iptables, where kube-proxy's
/// Service DNAT is. The directory exists only with br_netfilter loaded.
pub fn bridge_nf_call_iptables() -> PathBuf {
    net("bridge/bridge-nf-call-iptables")
}

/// Whether br_netfilter is loaded (its sysctls exist).
pub fn bridge_netfilter_loaded() -> bool {
    net("bridge").is_dir()
}

/// What a node without br_netfilter loses.
pub const WITHOUT_BRIDGE_NETFILTER: &str = "/proc/sys/net/bridge is absent (the br_netfilter module is not loaded): \
     kube-proxy does not see traffic the bridge switches between pods on this node, \
     so Services whose backend is on the same node will not answer";

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
pub fn no_rp_filter_on_overlays(d: &crate::Desired) {
    let Some(vxlan) = &d.vxlan else { return };
    let sleeve = d.sleeve.as_ref().map(|s| s.name.as_str());
    for dev in std::iter::once(vxlan.name.as_str()).chain(sleeve) {
        set(&net(&format!("ipv4/conf/{dev}/rp_filter")), "0");
    }
    set(&net("ipv4/conf/all/rp_filter"), "0");
}

/// kube-proxy's Service DNAT (iptables) must see the traffic the bridge
/// switches between two pods of this node: a backend's reply to a client
/// on the same bridge is un-DNATed only then. Without br_netfilter the
/// sysctl is absent and nothing is written (the agent warned at start).
pub fn let_iptables_see_bridged_traffic(d: &crate::Desired) {
    if d.bridge.is_some() {
        set(&bridge_nf_call_iptables(), "1");
    }
}

/// Writes `value` where it differs, saying so; a failure is logged (the
/// overlay still works for peers on the same path both ways).
fn set(path: &std::path::Path, value: &str) {
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

/// Pods hold addresses with the whole range's prefix, so they ARP for
/// pods on other nodes too; with proxy ARP the bridge answers for every
/// address routed elsewhere (over the overlay), and pods on the same
/// bridge still answer for themselves.
pub fn answer_arp_for_remote_pods(bridge: &str) {
    // The kernel delays proxy answers by up to 0.8 s by default.
    for (path, value) in [
        (net(&format!("ipv4/conf/{bridge}/proxy_arp")), "1"),
        (net(&format!("ipv4/neigh/{bridge}/proxy_delay")), "0"),
    ] {
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() != value)
            && let Err(e) = std::fs::write(&path, value)
        {
            tracing::warn!("cannot set {}: {e}", path.display());
        }
    }
}

/// Switches IPv4 forwarding on: relayed pod traffic and traffic between
/// the bridge and the overlay are routed by this node.
pub fn enable_forwarding() -> Result<(), crate::DataplaneError> {
    let path = ip_forward();
    let err = |source| crate::DataplaneError::Forwarding { path, source };
    // Only write when needed: the write needs a writable /proc/sys, which a
    // node that already forwards may not give us.
    if std::fs::read_to_string(path).map_err(err)?.trim() != "1" {
        std::fs::write(path, "1").map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_agree_on_one_root() {
        let forward = net("ipv4/ip_forward");
        assert_eq!(forward, Path::new(ip_forward()));
        assert!(forward.starts_with(MOUNTED) || forward.starts_with(OWN));
    }
}
