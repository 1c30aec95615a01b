//! A hash table keyed by peer name, for lookups on hot paths.
//!
//! The core keeps its state in ordered maps so that everything it iterates
//! comes out in the same order on every run and every node. A few lookups
//! run millions of times while a big cluster starts, and there a walk down
//! an ordered map's big nodes costs several times a hash lookup. This is
//! the one place the core holds a hash table, and it stays deterministic:
//! the hasher is fixed (no per-process random keys), keyed by the holder's
//! own name so that names chosen to collide in one node's table do not
//! collide in another's. Iterate the ordered map, never a `NameMap`.

use crate::peer::PeerName;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

/// Values by peer name. Look up, insert and remove; do not iterate.
pub(crate) type NameMap<V> = HashMap<PeerName, V, NameHashing>;

/// An empty table whose hashing is keyed by `key` (e.g. a mix of the
/// holder's own name).
pub(crate) fn name_map<V>(key: u64) -> NameMap<V> {
    HashMap::with_hasher(NameHashing { key })
}

/// One multiply and fold per name: names are random 64-bit values already.
#[derive(Clone, Debug)]
pub(crate) struct NameHashing {
    key: u64,
}

impl BuildHasher for NameHashing {
    type Hasher = NameHasher;
    fn build_hasher(&self) -> NameHasher {
        NameHasher(self.key)
    }
}

pub(crate) struct NameHasher(u64);

impl Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        // The table takes its bucket from the low bits: fold the high
        // bits, where the multiply put the mixing, down onto them.
        self.0 ^ (self.0 >> 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_key_hashes_a_name_the_same_everywhere() {
        let (a, b) = (name_map::<()>(7), name_map::<()>(7));
        let name = PeerName(0x1234_5678_9abc_def0);
        assert_eq!(a.hasher().hash_one(name), b.hasher().hash_one(name));
    }

    #[test]
    fn different_keys_hash_a_name_differently() {
        let (a, b) = (name_map::<()>(7), name_map::<()>(8));
        let name = PeerName(0x1234_5678_9abc_def0);
        assert_ne!(a.hasher().hash_one(name), b.hasher().hash_one(name));
    }

    #[test]
    fn names_differing_only_in_high_bits_land_in_different_buckets() {
        let h = name_map::<()>(0).hasher().clone();
        let low = |n: u64| h.hash_one(PeerName(n)) & 0xffff;
        assert_ne!(low(1 << 40), low(2 << 40));
    }
}
