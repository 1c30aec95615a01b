//! Where the node's network sysctls are written.
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
