//! What a saved IPAM state must satisfy before a node serves from it.
//!
//! The state file is the node's memory, but it is also a file anyone with
//! root can edit or restore: a block outside the range, an allocation of
//! someone else's address or two containers on one address would be
//! handed to pods and gossiped to peers as truth. A state that breaks the
//! ring's rules is refused whole, naming the first bad entry.

use super::ring::{Ring, last};
use super::space::{GATEWAY_ID, Space};
use super::{IpamMode, IpamState, outer_range, reserved_in, validate_container_id};
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;

/// The first thing wrong with a saved IPAM state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("the ring's range {0} is not a network address with its prefix")]
    UnalignedRange(Ipv4Net),
    #[error("ring block {start}/{len} is not a CIDR block of the range {range}")]
    BlockOutsideRange {
        start: Ipv4Addr,
        len: u8,
        range: Ipv4Net,
    },
    #[error("ring blocks {first} and {second} overlap")]
    BlocksOverlap { first: Ipv4Net, second: Ipv4Net },
    #[error("the ring has blocks but no seed")]
    BlocksWithoutSeed,
    #[error("allocation {container:?} -> {addr} is outside {range}")]
    AllocationOutside {
        container: String,
        addr: Ipv4Addr,
        range: Ipv4Net,
    },
    #[error("allocation {container:?} -> {addr} is the network or broadcast address of {range}")]
    AllocationReserved {
        container: String,
        addr: Ipv4Addr,
        range: Ipv4Net,
    },
    #[error("address {addr} is allocated to both {first:?} and {second:?}")]
    AddressTwice {
        addr: Ipv4Addr,
        first: String,
        second: String,
    },
    #[error("allocation {0:?} has an invalid container ID")]
    InvalidContainer(String),
}

impl IpamState {
    /// Whether this state obeys the ring's rules for a node in `mode`.
    pub fn check(&self, mode: &IpamMode) -> Result<(), StateError> {
        check_ring(&self.ring)?;
        check_allocations(&self.allocations, outer_range(mode, self.ring.universe()))
    }
}

fn check_ring(ring: &Ring) -> Result<(), StateError> {
    let range = ring.universe();
    if range != range.trunc() {
        return Err(StateError::UnalignedRange(range));
    }
    let (low, high) = (u32::from(range.network()), u32::from(range.broadcast()));
    let mut previous: Option<Ipv4Net> = None;
    for (start, len) in ring.raw_blocks() {
        let aligned = len <= 32 && (len == 32 || start.trailing_zeros() >= u32::from(32 - len));
        if !aligned || len < range.prefix_len() || start < low || last(start, len) > high {
            return Err(StateError::BlockOutsideRange {
                start: Ipv4Addr::from(start),
                len,
                range,
            });
        }
        let block = super::ring::net(start, len);
        // Blocks come in address order: only neighbours can overlap.
        if let Some(before) = previous
            && u32::from(before.broadcast()) >= start
        {
            return Err(StateError::BlocksOverlap {
                first: before,
                second: block,
            });
        }
        previous = Some(block);
    }
    if previous.is_some() && !ring.is_seeded() {
        return Err(StateError::BlocksWithoutSeed);
    }
    Ok(())
}

fn check_allocations(space: &Space, outer: Option<Ipv4Net>) -> Result<(), StateError> {
    let mut holders: std::collections::BTreeMap<Ipv4Addr, &str> = Default::default();
    for (container, addr) in space.iter() {
        if container != GATEWAY_ID && validate_container_id(container).is_err() {
            return Err(StateError::InvalidContainer(
                container.chars().take(64).collect(),
            ));
        }
        if let Some(range) = outer {
            let (container, reserved) = (container.to_string(), reserved_in(range));
            if !range.contains(&addr) {
                return Err(StateError::AllocationOutside {
                    container,
                    addr,
                    range,
                });
            }
            if reserved.contains(&addr) {
                return Err(StateError::AllocationReserved {
                    container,
                    addr,
                    range,
                });
            }
        }
        if let Some(first) = holders.insert(addr, container) {
            return Err(StateError::AddressTwice {
                addr,
                first: first.to_string(),
                second: container.to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PeerName;
    use crate::ipam::IpamInit;
    use crate::ipam::ring::Seed;
    use serde_json::{Value, json};

    const RING: IpamMode = IpamMode::Ring(IpamInit::Consensus(None));

    /// A valid state (one owner of 10.32.0.0/12 holding the gateway and
    /// a pod), as JSON, edited by `edit`.
    fn edited(edit: impl FnOnce(&mut Value)) -> IpamState {
        let range: Ipv4Net = "10.32.0.0/12".parse().unwrap();
        let owner = PeerName(7);
        let mut allocations = Space::default();
        allocations.insert(GATEWAY_ID, "10.32.0.1".parse().unwrap());
        allocations.insert("pod", "10.32.0.2".parse().unwrap());
        let state = IpamState {
            ring: Ring::seeded(
                range,
                Seed {
                    id: 1,
                    first_owner: owner,
                },
            ),
            allocations,
            seeding: Default::default(),
        };
        let mut value = serde_json::to_value(&state).unwrap();
        edit(&mut value);
        serde_json::from_value(value).unwrap()
    }

    /// Replaces the ring's blocks with `list` (start, length), labelled
    /// as the valid state's one block is.
    fn blocks(value: &mut Value, list: &[(&str, u8)]) {
        let ring = &mut value["ring"]["blocks"];
        let label = ring.as_object().unwrap().values().next().unwrap()[1].clone();
        *ring = list
            .iter()
            .map(|(start, len)| {
                let start = u32::from(start.parse::<Ipv4Addr>().unwrap()).to_string();
                (start, json!([len, label]))
            })
            .collect::<serde_json::Map<_, _>>()
            .into();
    }

    fn refusal(edit: impl FnOnce(&mut Value)) -> String {
        edited(edit).check(&RING).unwrap_err().to_string()
    }

    #[test]
    fn a_state_a_node_wrote_is_accepted() {
        assert_eq!(edited(|_| {}).check(&RING), Ok(()));
        assert_eq!(edited(|_| {}).check(&IpamMode::NodeCidr(None)), Ok(()));
    }

    #[test]
    fn blocks_outside_the_range_or_of_impossible_length_are_refused() {
        let cases = [
            (
                "0.0.0.0",
                0,
                "ring block 0.0.0.0/0 is not a CIDR block of the range 10.32.0.0/12",
            ),
            (
                "10.32.0.0",
                40,
                "ring block 10.32.0.0/40 is not a CIDR block of the range 10.32.0.0/12",
            ),
            (
                "10.64.0.0",
                16,
                "ring block 10.64.0.0/16 is not a CIDR block of the range 10.32.0.0/12",
            ),
            (
                "10.32.0.1",
                24,
                "ring block 10.32.0.1/24 is not a CIDR block of the range 10.32.0.0/12",
            ),
        ];
        for (start, len, want) in cases {
            assert_eq!(refusal(|v| blocks(v, &[(start, len)])), want);
        }
    }

    #[test]
    fn overlapping_blocks_and_blocks_without_a_seed_are_refused() {
        let overlap = refusal(|v| blocks(v, &[("10.32.0.0", 16), ("10.32.1.0", 24)]));
        assert_eq!(overlap, "ring blocks 10.32.0.0/16 and 10.32.1.0/24 overlap");
        assert_eq!(
            refusal(|v| v["ring"]["seed"] = Value::Null),
            "the ring has blocks but no seed"
        );
    }

    #[test]
    fn allocations_outside_the_range_reserved_or_doubled_are_refused() {
        // (container, address) added or replaced, and the refusal.
        let cases = [
            (
                "pod",
                "8.8.8.8",
                "allocation \"pod\" -> 8.8.8.8 is outside 10.32.0.0/12",
            ),
            (
                "pod",
                "10.47.255.255",
                "allocation \"pod\" -> 10.47.255.255 is the network or broadcast address of 10.32.0.0/12",
            ),
            (
                "other",
                "10.32.0.2",
                "address 10.32.0.2 is allocated to both \"other\" and \"pod\"",
            ),
            (
                "bad id",
                "10.32.0.9",
                "allocation \"bad id\" has an invalid container ID",
            ),
        ];
        for (container, addr, want) in cases {
            let edit = |v: &mut Value| v["allocations"]["by_container"][container] = addr.into();
            assert_eq!(refusal(edit), want);
        }
    }

    #[test]
    fn in_node_cidr_mode_allocations_stay_in_the_pod_cidr() {
        let mode = IpamMode::NodeCidr(Some("10.244.1.0/24".parse().unwrap()));
        let state = edited(|v| {
            v["ring"] = serde_json::to_value(Ring::new("10.32.0.0/12".parse().unwrap())).unwrap();
            v["allocations"]["by_container"] =
                json!({"weft:gateway": "10.244.1.1", "pod": "10.244.2.5"});
        });
        assert_eq!(
            state.check(&mode).unwrap_err().to_string(),
            "allocation \"pod\" -> 10.244.2.5 is outside 10.244.1.0/24"
        );
    }
}
