//! Forwarding decisions: where a packet for a pod address goes, from ring
//! ownership and routes. The userspace dataplane asks per packet; the kernel
//! dataplane gets the same answers as prefix routes.

use crate::peer::PeerName;
use ipnet::Ipv4Net;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

/// Where a packet for an address goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "via", rename_all = "snake_case")]
pub enum Forward {
    /// To a pod on this node.
    Local,
    /// Towards `owner`, handed to `next_hop` (the owner itself when
    /// directly connected, else a relay) at its underlay address.
    Peer {
        owner: PeerName,
        next_hop: PeerName,
        underlay: SocketAddr,
    },
    /// No route: outside the pod range, unowned, or the owner is
    /// unreachable.
    Unreachable,
}

/// Disjoint address intervals with their decision, sorted, so a lookup is
/// one binary search (longest-prefix match over non-overlapping prefixes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForwardingTable {
    starts: Vec<u32>,
    ends: Vec<u32>,
    decisions: Vec<Forward>,
    prefixes: BTreeMap<Ipv4Net, Forward>,
}

impl ForwardingTable {
    /// Builds the table from owned prefixes; `decide` maps an owner to a
    /// decision. Prefixes must be disjoint; an overlapping one is skipped
    /// and returned, so the caller can report it.
    pub fn build(
        owned: impl IntoIterator<Item = (Ipv4Net, PeerName)>,
        mut decide: impl FnMut(PeerName) -> Forward,
    ) -> (ForwardingTable, Vec<(Ipv4Net, PeerName)>) {
        let mut owned: Vec<(Ipv4Net, PeerName)> =
            owned.into_iter().map(|(p, o)| (p.trunc(), o)).collect();
        owned.sort();
        let mut table = ForwardingTable::default();
        let mut overlaps = Vec::new();
        for (prefix, owner) in owned {
            let start = u32::from(prefix.network());
            if table.ends.last().is_some_and(|end| start <= *end) {
                overlaps.push((prefix, owner));
                continue;
            }
            let decision = decide(owner);
            table.starts.push(start);
            table.ends.push(u32::from(prefix.broadcast()));
            table.decisions.push(decision);
            table.prefixes.insert(prefix, decision);
        }
        (table, overlaps)
    }

    pub fn lookup(&self, dst: Ipv4Addr) -> Forward {
        let a = u32::from(dst);
        let i = self.starts.partition_point(|s| *s <= a);
        match i.checked_sub(1) {
            Some(i) if a <= self.ends[i] => self.decisions[i],
            _ => Forward::Unreachable,
        }
    }

    pub fn prefixes(&self) -> &BTreeMap<Ipv4Net, Forward> {
        &self.prefixes
    }

    /// Prefix changes from `self` to `next`: `Some` = (now) routed so,
    /// `None` = withdrawn.
    pub fn diff(&self, next: &ForwardingTable) -> Vec<(Ipv4Net, Option<Forward>)> {
        let mut changes: Vec<(Ipv4Net, Option<Forward>)> = self
            .prefixes
            .keys()
            .filter(|p| !next.prefixes.contains_key(p))
            .map(|p| (*p, None))
            .collect();
        changes.extend(
            next.prefixes
                .iter()
                .filter(|(p, f)| self.prefixes.get(p) != Some(f))
                .map(|(p, f)| (*p, Some(*f))),
        );
        changes.sort_by_key(|(p, _)| *p);
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn peer(owner: PeerName) -> Forward {
        if owner == PeerName(0) {
            Forward::Local
        } else {
            Forward::Peer {
                owner,
                next_hop: owner,
                underlay: SocketAddr::from(([192, 168, 1, owner.0 as u8], 6783)),
            }
        }
    }

    #[test]
    fn lookups_find_the_owning_prefix() {
        let (t, overlaps) = ForwardingTable::build(
            [
                ("10.32.0.0/13".parse().unwrap(), PeerName(0)),
                ("10.40.0.0/14".parse().unwrap(), PeerName(1)),
                ("10.40.0.0/16".parse().unwrap(), PeerName(2)),
            ],
            peer,
        );
        assert_eq!(
            overlaps,
            vec![("10.40.0.0/16".parse().unwrap(), PeerName(2))]
        );
        assert_eq!(t.lookup("10.32.0.5".parse().unwrap()), Forward::Local);
        assert_eq!(t.lookup("10.41.2.3".parse().unwrap()), peer(PeerName(1)));
        assert_eq!(t.lookup("10.44.0.1".parse().unwrap()), Forward::Unreachable);
        assert_eq!(t.lookup("8.8.8.8".parse().unwrap()), Forward::Unreachable);
    }

    #[test]
    fn diffs_name_new_changed_and_withdrawn_prefixes() {
        let a: Ipv4Net = "10.32.0.0/13".parse().unwrap();
        let b: Ipv4Net = "10.40.0.0/13".parse().unwrap();
        let (old, _) = ForwardingTable::build([(a, PeerName(1)), (b, PeerName(2))], peer);
        let (new, _) = ForwardingTable::build([(a, PeerName(3))], peer);
        assert_eq!(new.diff(&new), vec![]);
        assert_eq!(
            old.diff(&new),
            vec![(a, Some(peer(PeerName(3)))), (b, None)]
        );
    }

    proptest! {
        #[test]
        fn lookup_matches_a_scan(lens in proptest::collection::vec(20u8..=28, 1..40), probes in proptest::collection::vec(any::<u32>(), 100)) {
            // Consecutive disjoint prefixes of random sizes from 10.0.0.0.
            let mut start = u32::from(Ipv4Addr::new(10, 0, 0, 0));
            let mut owned = Vec::new();
            for (i, len) in lens.iter().enumerate() {
                let size = 1u32 << (32 - len);
                start = start.div_ceil(size) * size;
                owned.push((Ipv4Net::new(Ipv4Addr::from(start), *len).unwrap(), PeerName(i as u64 % 5)));
                start += size * (1 + (i as u32 % 2)); // leave gaps sometimes
            }
            let (table, _) = ForwardingTable::build(owned.clone(), peer);
            for p in probes {
                let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + (p % (1 << 24)));
                let scan = owned.iter().find(|(n, _)| n.contains(&addr)).map_or(Forward::Unreachable, |(_, o)| peer(*o));
                prop_assert_eq!(table.lookup(addr), scan);
            }
        }
    }
}
