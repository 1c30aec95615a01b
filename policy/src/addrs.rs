//! IPv4 address sets as sorted, disjoint, non-adjacent ranges: the shape of
//! an nftables interval set, so one lookup decides however many pods and
//! CIDRs made the set.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// first..=last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AddrRange {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AddrSet(Vec<AddrRange>);

impl AddrRange {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.first <= ip && ip <= self.last
    }
}

impl AddrSet {
    pub fn all() -> AddrSet {
        AddrSet(vec![AddrRange {
            first: Ipv4Addr::UNSPECIFIED,
            last: Ipv4Addr::BROADCAST,
        }])
    }

    pub fn from_ranges(mut ranges: Vec<AddrRange>) -> AddrSet {
        ranges.sort();
        let mut merged: Vec<AddrRange> = Vec::with_capacity(ranges.len());
        for range in ranges {
            match merged.last_mut() {
                Some(last) if u32::from(range.first) <= u32::from(last.last).saturating_add(1) => {
                    last.last = last.last.max(range.last);
                }
                _ => merged.push(range),
            }
        }
        AddrSet(merged)
    }

    pub fn from_addrs(addrs: impl IntoIterator<Item = Ipv4Addr>) -> AddrSet {
        AddrSet::from_ranges(
            addrs
                .into_iter()
                .map(|ip| AddrRange {
                    first: ip,
                    last: ip,
                })
                .collect(),
        )
    }

    pub fn ranges(&self) -> &[AddrRange] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let at = self.0.partition_point(|r| r.last < ip);
        self.0.get(at).is_some_and(|r| r.contains(ip))
    }

    pub fn union(&self, other: &AddrSet) -> AddrSet {
        AddrSet::from_ranges(self.0.iter().chain(&other.0).copied().collect())
    }

    pub fn intersection(&self, other: &AddrSet) -> AddrSet {
        self.minus(&AddrSet::all().minus(other))
    }

    /// The addresses of self not in `holes`.
    pub fn minus(&self, holes: &AddrSet) -> AddrSet {
        let mut out = Vec::new();
        for range in &self.0 {
            let mut from = position(range.first);
            let to = position(range.last);
            for hole in holes
                .0
                .iter()
                .filter(|h| h.last >= range.first && h.first <= range.last)
            {
                let (start, end) = (position(hole.first), position(hole.last));
                if start > from {
                    out.push(span(from, start - 1));
                }
                from = from.max(end + 1);
            }
            if from <= to {
                out.push(span(from, to));
            }
        }
        AddrSet(out)
    }
}

fn span(first: u64, last: u64) -> AddrRange {
    AddrRange {
        first: ip_at(first),
        last: ip_at(last),
    }
}

/// An address as a number wide enough for "one past 255.255.255.255".
pub(crate) fn position(ip: Ipv4Addr) -> u64 {
    u64::from(u32::from(ip))
}

/// The address at a position; callers pass positions of addresses (the
/// bound is for the type, never reached).
pub(crate) fn ip_at(position: u64) -> Ipv4Addr {
    Ipv4Addr::from(u32::try_from(position).unwrap_or(u32::MAX))
}

/// A parsed CIDR. Like the API server (Go's ParseCIDR), host bits are
/// allowed and ignored. An IPv6 block is valid API input that no IPv4 pod
/// address falls in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cidr {
    V4(AddrRange, u8),
    V6(u128, u8),
}

impl Cidr {
    pub fn parse(text: &str) -> Option<Cidr> {
        let (addr, len) = text.split_once('/')?;
        let len: u8 = len.parse().ok()?;
        if let Ok(v4) = addr.parse::<Ipv4Addr>() {
            let host = u32::MAX.checked_shr(u32::from(len)).unwrap_or(0);
            if len > 32 {
                return None;
            }
            let first = u32::from(v4) & !host;
            let range = AddrRange {
                first: Ipv4Addr::from(first),
                last: Ipv4Addr::from(first | host),
            };
            return Some(Cidr::V4(range, len));
        }
        let v6 = addr.parse::<Ipv6Addr>().ok()?;
        if len > 128 {
            return None;
        }
        let host = u128::MAX.checked_shr(u32::from(len)).unwrap_or(0);
        Some(Cidr::V6(u128::from(v6) & !host, len))
    }

    /// Whether `inner` is a strict subset of self (the API's rule for
    /// `except`).
    pub fn strictly_holds(&self, inner: &Cidr) -> bool {
        match (self, inner) {
            (Cidr::V4(outer, len), Cidr::V4(range, inner_len)) => {
                inner_len > len && outer.contains(range.first)
            }
            (Cidr::V6(outer, len), Cidr::V6(addr, inner_len)) => {
                let host = u128::MAX.checked_shr(u32::from(*len)).unwrap_or(0);
                inner_len > len && addr & !host == *outer
            }
            _ => false,
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        matches!(self, Cidr::V4(range, _) if range.contains(ip))
    }

    pub fn v4_range(&self) -> Option<AddrRange> {
        match self {
            Cidr::V4(range, _) => Some(*range),
            Cidr::V6(..) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().unwrap()
    }

    fn range(first: &str, last: &str) -> AddrRange {
        AddrRange {
            first: ip(first),
            last: ip(last),
        }
    }

    #[test]
    fn ranges_merge_when_they_overlap_or_touch() {
        let set = AddrSet::from_ranges(vec![
            range("10.0.0.5", "10.0.0.9"),
            range("10.0.0.0", "10.0.0.4"),
            range("10.0.0.7", "10.0.0.12"),
            range("10.0.0.20", "10.0.0.20"),
        ]);
        assert_eq!(
            set.ranges(),
            &[
                range("10.0.0.0", "10.0.0.12"),
                range("10.0.0.20", "10.0.0.20")
            ]
        );
        assert!(set.contains(ip("10.0.0.12")));
        assert!(!set.contains(ip("10.0.0.13")));
    }

    #[test]
    fn minus_cuts_holes_at_the_edges_of_the_address_space() {
        let holes = AddrSet::from_ranges(vec![
            range("0.0.0.0", "0.0.0.0"),
            range("10.0.0.0", "10.255.255.255"),
            range("255.255.255.255", "255.255.255.255"),
        ]);
        assert_eq!(
            AddrSet::all().minus(&holes).ranges(),
            &[
                range("0.0.0.1", "9.255.255.255"),
                range("11.0.0.0", "255.255.255.254")
            ]
        );
        assert!(AddrSet::all().minus(&AddrSet::all()).is_empty());
    }

    #[test]
    fn intersection_keeps_what_both_hold() {
        let a = AddrSet::from_ranges(vec![
            range("10.0.0.0", "10.0.0.9"),
            range("10.0.0.20", "10.0.0.29"),
        ]);
        let b = AddrSet::from_ranges(vec![range("10.0.0.5", "10.0.0.24")]);
        assert_eq!(
            a.intersection(&b).ranges(),
            &[
                range("10.0.0.5", "10.0.0.9"),
                range("10.0.0.20", "10.0.0.24")
            ]
        );
        assert!(a.intersection(&AddrSet::default()).is_empty());
        assert_eq!(a.intersection(&AddrSet::all()), a);
    }

    #[test]
    fn cidrs_parse_like_the_api_server() {
        assert_eq!(
            Cidr::parse("10.1.2.3/16").and_then(|c| c.v4_range()),
            Some(range("10.1.0.0", "10.1.255.255"))
        );
        assert_eq!(
            Cidr::parse("0.0.0.0/0").and_then(|c| c.v4_range()),
            Some(range("0.0.0.0", "255.255.255.255"))
        );
        assert!(matches!(Cidr::parse("fd00::/8"), Some(Cidr::V6(..))));
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0/8",
            "/8",
            "x/1",
            "10.0.0.0/-1",
            "",
        ] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn except_must_be_a_strict_subset() {
        let outer = Cidr::parse("10.0.0.0/16").unwrap();
        assert!(outer.strictly_holds(&Cidr::parse("10.0.1.0/24").unwrap()));
        assert!(!outer.strictly_holds(&Cidr::parse("10.0.0.0/16").unwrap()));
        assert!(!outer.strictly_holds(&Cidr::parse("10.1.0.0/24").unwrap()));
        assert!(!outer.strictly_holds(&Cidr::parse("10.0.0.0/8").unwrap()));
        assert!(!outer.strictly_holds(&Cidr::parse("fd00::/64").unwrap()));
    }
}
