//! This peer's allocations: which container holds which address, inside
//! the blocks the peer owns.

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Most bytes in a container ID (CNI IDs are far shorter); bounds memory
/// and persisted state against a misbehaving caller.
pub const MAX_CONTAINER_ID: usize = 256;

/// The ID under which each peer holds its bridge gateway address. CNI
/// container IDs cannot contain ':', so no container can collide with it.
pub const GATEWAY_ID: &str = "weft:gateway";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Space {
    by_container: BTreeMap<String, Ipv4Addr>,
    #[serde(skip)]
    by_address: BTreeMap<u32, String>,
}

impl Space {
    /// Rebuilds the reverse index after deserializing.
    pub fn restored(mut self) -> Space {
        self.by_address = self
            .by_container
            .iter()
            .map(|(c, a)| (u32::from(*a), c.clone()))
            .collect();
        self
    }

    pub fn get(&self, container: &str) -> Option<Ipv4Addr> {
        self.by_container.get(container).copied()
    }

    pub fn holder(&self, addr: Ipv4Addr) -> Option<&str> {
        self.by_address.get(&u32::from(addr)).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, Ipv4Addr)> + '_ {
        self.by_container.iter().map(|(c, a)| (c.as_str(), *a))
    }

    pub fn len(&self) -> usize {
        self.by_container.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_container.is_empty()
    }

    pub fn insert(&mut self, container: &str, addr: Ipv4Addr) {
        if let Some(old) = self.by_container.insert(container.to_string(), addr) {
            self.by_address.remove(&u32::from(old));
        }
        self.by_address
            .insert(u32::from(addr), container.to_string());
    }

    pub fn remove(&mut self, container: &str) -> Option<Ipv4Addr> {
        let addr = self.by_container.remove(container)?;
        self.by_address.remove(&u32::from(addr));
        Some(addr)
    }

    /// Allocations inside `block`.
    pub fn used_in(&self, block: Ipv4Net) -> usize {
        self.by_address
            .range(u32::from(block.network())..=u32::from(block.broadcast()))
            .count()
    }

    /// The lowest address in `blocks` that is neither allocated nor
    /// `reserved`.
    pub fn first_free(&self, blocks: &[Ipv4Net], reserved: &[Ipv4Addr]) -> Option<Ipv4Addr> {
        blocks.iter().find_map(|block| {
            let (mut a, end) = (u32::from(block.network()), u32::from(block.broadcast()));
            // Walk past allocated runs using the index, not address by address.
            for (used, _) in self.by_address.range(a..=end) {
                while a < *used {
                    if !reserved.contains(&Ipv4Addr::from(a)) {
                        return Some(Ipv4Addr::from(a));
                    }
                    a += 1;
                }
                if a == end {
                    return None;
                }
                a = used + 1;
            }
            (a..=end)
                .map(Ipv4Addr::from)
                .find(|addr| !reserved.contains(addr))
        })
    }

    /// Free addresses in `blocks`.
    pub fn free_in(&self, blocks: &[Ipv4Net], reserved: &[Ipv4Addr]) -> u64 {
        blocks
            .iter()
            .map(|b| {
                let total = 1u64 << (32 - b.prefix_len());
                let held = reserved
                    .iter()
                    .filter(|r| b.contains(*r) && self.holder(**r).is_none())
                    .count();
                total - self.used_in(*b) as u64 - held as u64
            })
            .sum()
    }

    /// The largest aligned block inside `blocks` that holds no allocation
    /// and no reserved address, of at most `max_size` addresses: what a
    /// donor can give away whole.
    pub fn largest_empty_block(
        &self,
        blocks: &[Ipv4Net],
        reserved: &[Ipv4Addr],
        max_size: u64,
    ) -> Option<Ipv4Net> {
        let mut best: Option<Ipv4Net> = None;
        for block in blocks {
            self.search_empty(*block, reserved, max_size, &mut best);
        }
        best
    }

    fn search_empty(
        &self,
        block: Ipv4Net,
        reserved: &[Ipv4Addr],
        max_size: u64,
        best: &mut Option<Ipv4Net>,
    ) {
        let size = 1u64 << (32 - block.prefix_len());
        if best.is_some_and(|b| b.prefix_len() <= block.prefix_len()) {
            return; // cannot beat what we have
        }
        let empty = self.used_in(block) == 0 && !reserved.iter().any(|r| block.contains(r));
        if empty && size <= max_size {
            *best = Some(block);
            return;
        }
        if block.prefix_len() >= 32 {
            return;
        }
        if let Ok(halves) = block.subnets(block.prefix_len() + 1) {
            for half in halves {
                self.search_empty(half, reserved, max_size, best);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn first_free_skips_allocated_and_reserved() {
        let mut s = Space::default();
        let blocks = [net("10.0.0.0/30"), net("10.0.1.0/30")];
        let reserved = [ip("10.0.0.0")];
        assert_eq!(s.first_free(&blocks, &reserved), Some(ip("10.0.0.1")));
        s.insert("a", ip("10.0.0.1"));
        s.insert("b", ip("10.0.0.2"));
        assert_eq!(s.first_free(&blocks, &reserved), Some(ip("10.0.0.3")));
        s.insert("c", ip("10.0.0.3"));
        assert_eq!(s.first_free(&blocks, &reserved), Some(ip("10.0.1.0")));
        assert_eq!(s.free_in(&blocks, &reserved), 4);
        s.remove("b");
        assert_eq!(s.first_free(&blocks, &reserved), Some(ip("10.0.0.2")));
    }

    #[test]
    fn the_largest_empty_block_avoids_allocations() {
        let mut s = Space::default();
        let blocks = [net("10.0.0.0/24")];
        s.insert("a", ip("10.0.0.1"));
        assert_eq!(
            s.largest_empty_block(&blocks, &[], 256),
            Some(net("10.0.0.128/25"))
        );
        assert_eq!(
            s.largest_empty_block(&blocks, &[], 64),
            Some(net("10.0.0.64/26"))
        );
        s.insert("b", ip("10.0.0.200"));
        assert_eq!(
            s.largest_empty_block(&blocks, &[], 256),
            Some(net("10.0.0.64/26"))
        );
    }

    #[test]
    fn the_reverse_index_is_rebuilt_after_restore() {
        let mut s = Space::default();
        s.insert("a", ip("10.0.0.1"));
        let json = serde_json::to_string(&s).unwrap();
        let back: Space = serde_json::from_str::<Space>(&json).unwrap().restored();
        assert_eq!(back, s);
        assert_eq!(back.holder(ip("10.0.0.1")), Some("a"));
    }
}
