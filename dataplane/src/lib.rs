//! weft's kernel dataplane ("fastdp"): Linux VXLAN, programmed over rtnetlink.
//!
//! The agent computes a [`Desired`] state from weft-core's router (which peers
//! are reachable directly, which pod prefixes they own, which peer relays for
//! which) and hands it to a [`Dataplane`]. [`LinuxDataplane`] brings the
//! kernel to that state; [`MemoryDataplane`] only records it: the agent's
//! and this crate's tests use it, and weft-sim's turmoil engine gives each
//! node one, which a [`sync::Follower`] keeps in step with the node's
//! published views and whose routes the simulator's `reachable` and
//! `unreachable` checks follow (its events engine follows the routers'
//! `forward()`).
//!
//! # Design
//!
//! Pods attach to one bridge (`weft`) whose address is the pods' gateway.
//! Traffic for pods on other nodes leaves through one VXLAN device
//! (`weft-vxlan`, UDP port 6784) that works as a *routed* (layer 3) device,
//! the way flannel's `vxlan` backend does, rather than as a bridge port:
//!
//! - **Routes** `10.32.4.0/24 via 192.168.1.12 dev weft-vxlan onlink`: every
//!   pod prefix owned by another peer points at a *next hop's underlay IP* on
//!   the VXLAN device. `onlink` tells the kernel not to look for a subnet
//!   containing the next hop on that device (the device has no address at
//!   all). The next hop is the owner itself, or the peer that relays for it
//!   when the two nodes cannot talk directly; the relay's kernel receives the
//!   packet on its own `weft-vxlan` and routes it on (that is why IPv4
//!   forwarding is switched on).
//! - **Neighbour entries** (per device) `192.168.1.12 lladdr <VTEP MAC>
//!   PERMANENT dev weft-vxlan`: resolving the next hop on the VXLAN device
//!   never sends ARP; the neighbour table is per device, so these entries
//!   don't disturb the underlay's own ARP entries for the same IPs.
//! - **FDB entries** `<VTEP MAC> dst 192.168.1.12 self permanent dev
//!   weft-vxlan`: the VXLAN device maps the inner destination MAC to the
//!   outer (underlay) destination IP.
//! - **Deterministic VTEP MACs**: every node's VXLAN device gets the MAC
//!   [`vtep_mac`]`(peer name)`, so a node can compute a peer's MAC from the
//!   name it already learned through gossip; no MAC needs to be gossiped and
//!   a restarted agent finds the same MACs in the kernel.
//! - **Learning is off**: weft knows every entry from the control plane, so
//!   the kernel must not learn (or age out) FDB entries from received
//!   packets; with learning on, a spoofed or relayed packet could repoint a
//!   MAC at the wrong node.
//! - **Route protocol marker**: weft's routes carry the route protocol number
//!   [`ROUTE_PROTOCOL`] (`ip route show proto 177`). That is how a restarted
//!   agent finds routes it created earlier and removes stale ones, without
//!   touching routes made by anyone else.
//!
//! Reconciliation is a diff, never flush-and-re-add (which would drop
//! packets): read the current FDB, neighbour and route entries, add or
//! replace what is missing or wrong, then delete what is stale. The pure
//! "what to change" computation lives in [`plan`] and is unit-tested without
//! a kernel.
//!
//! The kernel dataplane outlives the agent: stopping the agent leaves it in
//! place so pods keep talking while the agent restarts; only
//! [`Dataplane::teardown`] (for `weft reset`) removes weft's devices.
//! Pod egress masquerade is one nftables table, programmed over nfnetlink
//! by [`nftables`] (no `nft` program needed).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

pub mod desired;
#[cfg(target_os = "linux")]
mod linux;
mod memory;
pub mod names;
#[cfg(target_os = "linux")]
pub mod nftables;
pub mod plan;
pub mod port;
pub mod probe;
pub mod sleeve;
pub mod status;
pub mod sync;
pub mod sysctl;
pub mod underlay;

#[cfg(target_os = "linux")]
pub use linux::LinuxDataplane;
pub use memory::MemoryDataplane;
pub use names::{BRIDGE_NAME, DEFAULT_VNI, ROUTE_PROTOCOL, VXLAN_NAME, VXLAN_PORT};

/// Bytes VXLAN over IPv4 adds to every packet: outer IPv4 (20) + UDP (8) +
/// VXLAN header (8) + inner Ethernet header (14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// What the node's kernel should hold: computed by the agent from weft-core's
/// router.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// The bridge pods attach to.
    pub bridge: Option<BridgeSpec>,
    /// The VXLAN device. `None` means no fast dataplane: FDB, neighbour and
    /// route entries are not programmed either.
    pub vxlan: Option<VxlanSpec>,
    /// The sleeve's TUN device, used when `vxlan` is `None`: pod routes
    /// then go into it (the agent carries the packets), and there are no
    /// FDB or neighbour entries. The agent creates the device (it holds
    /// its file descriptor); reconcile sets its MTU and brings it up.
    pub sleeve: Option<SleeveSpec>,
    /// Remote peers reachable directly: each gets an FDB entry (its VTEP MAC
    /// -> its underlay IP) and a permanent neighbour entry (its underlay IP ->
    /// its VTEP MAC) on the VXLAN device.
    pub peers: Vec<RemotePeer>,
    /// Pod prefixes owned by other peers: `prefix via <next hop> dev
    /// weft-vxlan onlink`, or into the sleeve's TUN device for next hops
    /// that VXLAN does not reach (see [`Overlay`]). Without `vxlan`
    /// every route goes into the sleeve, whatever its `device`.
    pub routes: Vec<PodRoute>,
    /// Pod prefixes owned by peers that are unreachable right now (an agent
    /// restarting, ours or theirs) that this agent has not seen directly
    /// (it routes the others straight to their owners, see
    /// [`desired::Owners`]): the kernel's route for exactly such a prefix
    /// stays as it is, with the neighbour and FDB entries its VXLAN next
    /// hop needs, because the kernel path usually still works. Never
    /// added, only kept; disjoint from `routes` and from this node's own
    /// prefixes (see [`plan::plan_routes`]).
    pub held: Vec<Ipv4Net>,
    /// The underlay addresses of the peers reachable right now. A held
    /// prefix's route through one of them is not kept: that peer has no
    /// route to the owner either, or holds one back through this node (a
    /// forwarding loop); only a route to a peer that is away (the owner,
    /// its agent restarting) is worth holding.
    pub live: Vec<Ipv4Addr>,
}

impl Desired {
    /// The same state with `peers` and `routes` sorted and de-duplicated, so
    /// two descriptions of one state compare equal.
    pub fn normalized(&self) -> Desired {
        let mut d = self.clone();
        d.peers.sort();
        d.peers.dedup();
        d.routes.sort();
        d.routes.dedup();
        d.held.sort();
        d.held.dedup();
        d.live.sort();
        d.live.dedup();
        d
    }
}

/// The bridge pods attach to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeSpec {
    /// Device name ([`BRIDGE_NAME`] by default).
    pub name: String,
    /// The pods' gateway address, with the prefix length of the whole
    /// allocation range (e.g. 10.32.0.1/12).
    pub gateway: Ipv4Net,
    pub mtu: u32,
}

/// The sleeve's TUN device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SleeveSpec {
    pub name: String,
    pub mtu: u32,
}

/// The VXLAN device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanSpec {
    /// Device name ([`VXLAN_NAME`] by default).
    pub name: String,
    /// VXLAN network identifier ([`DEFAULT_VNI`] by default).
    pub vni: u32,
    /// UDP destination (and listening) port ([`VXLAN_PORT`] by default).
    pub port: u16,
    /// This node's underlay IPv4 address: the outer source address.
    pub local: Ipv4Addr,
    /// The underlay device to bind the tunnel to, if any.
    pub underlay_dev: Option<String>,
    /// Usually [`overlay_mtu`] of the underlay MTU.
    pub mtu: u32,
    /// This node's VTEP MAC: [`vtep_mac`] of its peer name.
    pub mac: [u8; 6],
}

impl VxlanSpec {
    /// A spec with weft's default name, VNI and port.
    pub fn new(local: Ipv4Addr, mtu: u32, mac: [u8; 6]) -> Self {
        VxlanSpec {
            name: VXLAN_NAME.to_string(),
            vni: DEFAULT_VNI,
            port: VXLAN_PORT,
            local,
            underlay_dev: None,
            mtu,
            mac,
        }
    }
}

/// A remote peer reachable directly over the underlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RemotePeer {
    pub underlay: Ipv4Addr,
    /// [`vtep_mac`] of the peer's name.
    pub mac: [u8; 6],
}

/// A pod prefix owned by another peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodRoute {
    pub prefix: Ipv4Net,
    /// Underlay IP of the owner, or of the peer relaying to it.
    pub next_hop: Ipv4Addr,
    /// The device carrying it.
    pub device: Overlay,
}

/// How pod packets cross from node to node: the one name for the overlay
/// kind, whether it is what a node runs, the path towards one peer, or the
/// device a pod route leaves through. Per route and per peer, because
/// fastdp can fail towards one peer only (a firewall dropping UDP 6784 on
/// that node): its prefixes then go into the sleeve while the others stay
/// on VXLAN.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Overlay {
    /// Kernel VXLAN (`via <next hop> dev weft-vxlan onlink`).
    #[default]
    Fastdp,
    /// The sleeve's TUN device: the agent carries the packets.
    Sleeve,
}

impl Overlay {
    /// As status, metrics and the `--datapath` flag spell it.
    pub fn name(self) -> &'static str {
        match self {
            Overlay::Fastdp => "fastdp",
            Overlay::Sleeve => "sleeve",
        }
    }
}

/// The VTEP MAC of the peer named `peer_name`: `02:` followed by 40 bits of a
/// hash of the name.
///
/// Deterministic, so every node computes the same MAC for a peer from its
/// name alone. The first byte 0x02 makes it locally administered (bit 1 set)
/// and unicast (bit 0 clear), so it never clashes with a vendor MAC, and makes
/// weft's entries easy to spot in `bridge fdb` output. Hashing (rather than
/// truncating) the name spreads names that differ only in their high bits;
/// with 40 bits two peers of a 1000-node cluster collide with probability
/// about 5e-7.
pub fn vtep_mac(peer_name: u64) -> [u8; 6] {
    // splitmix64's finaliser: a fixed, well-mixed 64-bit permutation, so the
    // MAC is stable across Rust versions and platforms (unlike std's hashers).
    let mut z = peer_name.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let b = z.to_be_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

/// The MTU of the overlay (VXLAN device, bridge, pod interfaces) over an
/// underlay with MTU `underlay_mtu`: underlay minus [`VXLAN_OVERHEAD`], so
/// encapsulated packets are never fragmented. Saturates at 0.
pub fn overlay_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(VXLAN_OVERHEAD)
}

/// Formats a MAC as `02:ab:cd:ef:01:23`.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Programs the node's kernel (or a stand-in for it).
pub trait Dataplane {
    /// Brings the kernel to `desired`: creates or updates what is missing,
    /// and removes stale entries weft created (FDB, neighbours and routes on
    /// weft's own devices, or routes marked with [`ROUTE_PROTOCOL`]), never
    /// anything outside weft's own devices and table entries. Idempotent.
    ///
    /// A VXLAN device that cannot be created is reported as
    /// [`DataplaneError::Vxlan`], so the agent can fall back to the sleeve.
    fn reconcile(&mut self, desired: &Desired) -> Result<(), DataplaneError>;

    /// Removes weft's devices (for `weft reset` and lab teardown). Not called
    /// on a normal agent stop: the kernel dataplane stays up so pods keep
    /// talking while the agent restarts.
    fn teardown(&mut self) -> Result<(), DataplaneError>;

    /// Deletes the device `name` (a pod's veth after CNI DEL); fine if it
    /// is gone. Deleting a device takes the kernel ~20 ms, which the agent
    /// spends off the CNI plugin's critical path.
    fn delete_device(&mut self, name: &str) -> Result<(), DataplaneError>;

    /// Sets the node's sysctls that `applied`, the state just reconciled,
    /// needs (see [`sysctl`]); asked again at every resync, as a node
    /// setting others may change them back. A stand-in for the kernel has
    /// none: the default does nothing.
    fn tune(&mut self, _applied: &Desired) {}
}

impl<D: Dataplane + ?Sized> Dataplane for Box<D> {
    fn reconcile(&mut self, desired: &Desired) -> Result<(), DataplaneError> {
        (**self).reconcile(desired)
    }
    fn teardown(&mut self) -> Result<(), DataplaneError> {
        (**self).teardown()
    }
    fn delete_device(&mut self, name: &str) -> Result<(), DataplaneError> {
        (**self).delete_device(name)
    }
    fn tune(&mut self, applied: &Desired) {
        (**self).tune(applied)
    }
}

/// Why the dataplane could not be brought to the desired state. Every
/// message names what failed and the kernel's reason, with a hint where the
/// cause is usually the node's setup.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The netlink socket or the dataplane's runtime could not be set up.
    #[error("cannot open the netlink connection: {0}")]
    Setup(#[source] std::io::Error),
    /// The VXLAN device could not be created or updated: the agent should
    /// fall back to another datapath.
    #[error("cannot {action} VXLAN device {name}: {reason}")]
    Vxlan {
        name: String,
        action: &'static str,
        reason: String,
    },
    /// The sleeve's TUN device could not be used.
    #[error("cannot {action} sleeve device {name}: {reason}")]
    Sleeve {
        name: String,
        action: &'static str,
        reason: String,
    },
    #[error("cannot {action} bridge {name}: {reason}")]
    Bridge {
        name: String,
        action: &'static str,
        reason: String,
    },
    #[error("underlay device {0} not found")]
    UnderlayNotFound(String),
    #[error("cannot {action} FDB entry {mac} dst {dst} on {dev}: {reason}")]
    Fdb {
        dev: String,
        action: &'static str,
        mac: String,
        dst: String,
        reason: String,
    },
    #[error("cannot {action} neighbour {ip} lladdr {mac} on {dev}: {reason}")]
    Neighbour {
        dev: String,
        action: &'static str,
        ip: Ipv4Addr,
        mac: String,
        reason: String,
    },
    #[error("cannot {action} route {prefix} via {next_hop}: {reason}")]
    Route {
        action: &'static str,
        prefix: Ipv4Net,
        next_hop: String,
        reason: String,
    },
    #[error("cannot list {what}: {reason}")]
    Dump { what: &'static str, reason: String },
    /// A weft nftables table (masquerade or NetworkPolicy) could not be
    /// programmed.
    #[error("cannot {step} (nftables table ip {table}): {reason}")]
    Nftables {
        table: &'static str,
        step: &'static str,
        reason: String,
    },
    #[error("cannot enable IPv4 forwarding ({path}): {source}")]
    Forwarding {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A [`MemoryDataplane`] told to fail.
    #[error("injected failure: {0}")]
    Injected(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_mac_is_deterministic_local_unicast() {
        for name in [0u64, 1, 2, 0xdead_beef, u64::MAX, 0x0242_ac11_0002] {
            let mac = vtep_mac(name);
            assert_eq!(mac, vtep_mac(name), "deterministic");
            assert_eq!(mac[0], 0x02);
            assert_eq!(mac[0] & 0x02, 0x02, "locally administered");
            assert_eq!(mac[0] & 0x01, 0, "unicast");
            assert_ne!(&mac[1..], &[0; 5], "not all zero");
        }
        // A fixed value: changing the hash would change every node's MAC in a
        // running cluster (mixed versions during an upgrade).
        assert_eq!(vtep_mac(0), [0x02, 0xe2, 0x20, 0xa8, 0x39, 0x7b]);
    }

    #[test]
    fn vtep_macs_of_different_names_differ() {
        let mut seen = std::collections::HashSet::new();
        // Sequential names and names differing only in high bits.
        for i in 0..5000u64 {
            assert!(seen.insert(vtep_mac(i)), "collision at {i}");
            assert!(
                seen.insert(vtep_mac(i << 48 | 0xffff_ffff)),
                "collision at {i}<<48"
            );
        }
    }

    #[test]
    fn overlay_mtu_subtracts_vxlan_overhead() {
        assert_eq!(overlay_mtu(1500), 1450);
        assert_eq!(overlay_mtu(9001), 8951);
        assert_eq!(overlay_mtu(20), 0);
    }

    #[test]
    fn normalized_sorts_and_dedups() {
        let p = |n: u8| RemotePeer {
            underlay: Ipv4Addr::new(192, 168, 1, n),
            mac: vtep_mac(n as u64),
        };
        let a = Desired {
            peers: vec![p(2), p(1), p(2)],
            ..Default::default()
        };
        let b = Desired {
            peers: vec![p(1), p(2)],
            ..Default::default()
        };
        assert_eq!(a.normalized(), b.normalized());
    }

    #[test]
    fn error_messages_say_what_and_why() {
        let e = DataplaneError::Vxlan {
            name: "weft-vxlan".into(),
            action: "create",
            reason: "Operation not supported (is the vxlan kernel module loaded?)".into(),
        };
        assert_eq!(
            e.to_string(),
            "cannot create VXLAN device weft-vxlan: Operation not supported (is the vxlan kernel module loaded?)"
        );
    }
}
