//! Port sets as sorted, merged (protocol, first, last) ranges: the other
//! half of an nftables concatenated interval set.

use serde::{Deserialize, Serialize};

use crate::model::Protocol;

/// first..=last of one protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub protocol: Protocol,
    pub first: u16,
    pub last: u16,
}

/// What a grant lets through to its addresses.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Ports {
    /// Every protocol (ICMP too) and port: a rule without `ports`.
    Any,
    /// Only these; empty lets nothing through.
    Only(Vec<PortRange>),
}

impl Ports {
    pub fn none() -> Ports {
        Ports::Only(Vec::new())
    }

    pub fn from_ranges(mut ranges: Vec<PortRange>) -> Ports {
        ranges.sort();
        let mut merged: Vec<PortRange> = Vec::with_capacity(ranges.len());
        for range in ranges {
            match merged.last_mut() {
                Some(last)
                    if last.protocol == range.protocol
                        && u32::from(range.first) <= u32::from(last.last) + 1 =>
                {
                    last.last = last.last.max(range.last);
                }
                _ => merged.push(range),
            }
        }
        Ports::Only(merged)
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, Ports::Only(ranges) if ranges.is_empty())
    }

    pub fn union(&self, other: &Ports) -> Ports {
        match (self, other) {
            (Ports::Any, _) | (_, Ports::Any) => Ports::Any,
            (Ports::Only(a), Ports::Only(b)) => {
                Ports::from_ranges(a.iter().chain(b).copied().collect())
            }
        }
    }

    /// `protocol` is the packet's IP protocol number.
    pub fn contains(&self, protocol: u8, port: u16) -> bool {
        match self {
            Ports::Any => true,
            Ports::Only(ranges) => ranges
                .iter()
                .any(|r| r.protocol.number() == protocol && r.first <= port && port <= r.last),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(first: u16, last: u16) -> PortRange {
        PortRange {
            protocol: Protocol::Tcp,
            first,
            last,
        }
    }

    #[test]
    fn ranges_merge_per_protocol() {
        let udp = PortRange {
            protocol: Protocol::Udp,
            first: 81,
            last: 81,
        };
        let ports = Ports::from_ranges(vec![tcp(81, 90), udp, tcp(80, 80), tcp(95, 65535)]);
        assert_eq!(ports, Ports::Only(vec![tcp(80, 90), tcp(95, 65535), udp]));
        assert!(ports.contains(6, 65535));
        assert!(!ports.contains(6, 91));
        assert!(ports.contains(17, 81));
        assert!(!ports.contains(132, 81));
        assert!(!ports.contains(1, 0));
    }

    #[test]
    fn any_takes_every_protocol() {
        assert!(Ports::Any.contains(1, 0));
        assert_eq!(Ports::none().union(&Ports::Any), Ports::Any);
        assert!(Ports::none().is_empty());
    }
}
