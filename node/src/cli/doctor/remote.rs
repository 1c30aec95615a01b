//! The other nodes' pod networks, as seen from here: one address on each
//! that answers ICMP through the overlay.

use super::facts::Facts;
use super::pods::Target;
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use weft_api::status::IpamPeerStatus;

/// One address per other reachable node: its bridge gateway.
pub fn targets(facts: &Facts) -> Vec<Target> {
    let (Ok(agent), Ok(node)) = (&facts.agent, &facts.node) else {
        return Vec::new();
    };
    let node_cidr = agent.ipam.mode == "node-cidr";
    agent
        .ipam
        .peers
        .iter()
        .filter(|p| Some(p.name) != agent.me() && p.reachable)
        .filter_map(|p| {
            Some(Target {
                node: p.nickname.clone(),
                address: gateway_of(p, node.range, node_cidr)?,
            })
        })
        .collect()
}

/// A node's gateway is the first address it allocated: the lowest of its
/// space, past the network address the range (ring mode) or its podCIDR
/// (node-cidr mode) reserves. Space that moved later (a reclaim of lower
/// blocks) can make this miss; the probe then names the address it tried.
fn gateway_of(peer: &IpamPeerStatus, range: Ipv4Net, node_cidr: bool) -> Option<Ipv4Addr> {
    let lowest = peer.prefixes.iter().map(|p| p.network()).min()?;
    let reserved = node_cidr || lowest == range.network();
    Some(match reserved {
        true => Ipv4Addr::from(u32::from(lowest).checked_add(1)?),
        false => lowest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(prefixes: &[&str]) -> IpamPeerStatus {
        IpamPeerStatus {
            name: weft_core::PeerName(1),
            nickname: "a".into(),
            reachable: true,
            owned: 0,
            free: 0,
            used: 0,
            prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn a_gateway_is_the_lowest_address_not_reserved() {
        let range: Ipv4Net = "10.32.0.0/12".parse().unwrap();
        let g = |prefixes: &[&str], node_cidr| gateway_of(&peer(prefixes), range, node_cidr);
        assert_eq!(
            g(&["10.40.0.0/13", "10.32.0.0/13"], false),
            Some("10.32.0.1".parse().unwrap())
        );
        assert_eq!(
            g(&["10.37.85.86/31", "10.37.85.88/29"], false),
            Some("10.37.85.86".parse().unwrap())
        );
        assert_eq!(
            g(&["10.32.7.0/24"], true),
            Some("10.32.7.1".parse().unwrap())
        );
        assert_eq!(g(&[], false), None);
    }
}
