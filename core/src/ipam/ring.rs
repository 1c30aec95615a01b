//! The IPAM ring: who owns which addresses of the allocation range.
//!
//! Every address carries a label (version, owner). Merging two rings keeps,
//! per address, the greater label, so merge is a join (idempotent,
//! commutative, associative) and any subset of a ring — one gossip datagram
//! of it — merges safely on its own. Only an owner writes labels over its
//! own addresses, always with a higher version, so a write wins everywhere
//! it arrives.
//!
//! Labels are stored as a partition of the range into CIDR blocks, in a
//! canonical form (sibling blocks with equal labels are joined), so two
//! nodes with the same labels hold the same blocks, and a peer's space is a
//! few prefixes the kernel can route.
//!
//! A removed peer leaves a tombstone naming its heir: addresses labelled
//! with the removed peer belong to the heir. Nothing is relabelled, so a
//! donation the removed peer made just before it went, arriving late, still
//! wins over the reclaim (its label is newer) instead of colliding with it.

use crate::peer::PeerName;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// Who owns an address, and how recent that statement is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Label {
    // Field order matters: the derived Ord compares version first.
    pub version: u64,
    pub owner: PeerName,
}

/// Identity of a ring: which seeding created it. Two rings with different
/// seeds must never merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Seed {
    pub id: u64,
    /// The peer the whole range was first given to.
    pub first_owner: PeerName,
}

/// A labelled block as it travels in gossip.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    pub prefix: Ipv4Net,
    pub label: Label,
}

/// Why a ring from a peer was not merged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
pub enum RingError {
    #[error(
        "peer's allocation range {theirs} differs from ours ({ours}): every node must use the same --ipalloc-range"
    )]
    DifferentRange { ours: Ipv4Net, theirs: Ipv4Net },
    #[error(
        "peer belongs to a different IPAM ring (seed {theirs:016x}, ours {ours:016x}): the two groups were seeded separately; \
         remove the data directory of the nodes in the smaller group and restart them so they join this ring"
    )]
    DifferentSeed { ours: u64, theirs: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "RingFields")]
pub struct Ring {
    universe: Ipv4Net,
    seed: Option<Seed>,
    /// Block start -> (prefix length, label); a partition of the labelled
    /// part of the universe, canonical.
    blocks: BTreeMap<u32, (u8, Label)>,
    /// Removed peer -> heir.
    tombstones: BTreeMap<PeerName, PeerName>,
    /// Sum of the blocks' hashes, kept up to date on every change: every
    /// heartbeat carries the ring's summary, and hashing a ring of
    /// thousands of blocks after each change dominated a 1,000-node run.
    #[serde(skip)]
    block_sum: u64,
    /// (label owner, block start) of every block, kept with the blocks:
    /// each node asks for its own blocks after every ring change, and
    /// scanning thousands of blocks for them dominated a 1,000-node run.
    #[serde(skip)]
    by_owner: BTreeSet<(PeerName, u32)>,
}

/// A ring as saved: its running sum is recomputed on loading.
#[derive(Deserialize)]
struct RingFields {
    universe: Ipv4Net,
    seed: Option<Seed>,
    blocks: BTreeMap<u32, (u8, Label)>,
    tombstones: BTreeMap<PeerName, PeerName>,
}

impl From<RingFields> for Ring {
    fn from(f: RingFields) -> Ring {
        let block_sum = sum_of(&f.blocks);
        let by_owner = owners_of(&f.blocks);
        Ring {
            universe: f.universe,
            seed: f.seed,
            blocks: f.blocks,
            tombstones: f.tombstones,
            block_sum,
            by_owner,
        }
    }
}

fn block_hash(start: u32, (len, label): (u8, Label)) -> u64 {
    let h = mix(u64::from(start) ^ (u64::from(len) << 32));
    mix(mix(h ^ label.version) ^ label.owner.0)
}

fn sum_of(blocks: &BTreeMap<u32, (u8, Label)>) -> u64 {
    blocks
        .iter()
        .fold(0u64, |sum, (s, b)| sum.wrapping_add(block_hash(*s, *b)))
}

fn owners_of(blocks: &BTreeMap<u32, (u8, Label)>) -> BTreeSet<(PeerName, u32)> {
    blocks.iter().map(|(s, (_, l))| (l.owner, *s)).collect()
}

/// Most heirs followed when resolving an owner (removed peers whose heir
/// was removed too); bounds the work on a malicious cycle.
const MAX_HEIR_CHAIN: usize = 16;

impl Ring {
    /// An unseeded ring: nobody owns anything yet.
    pub fn new(universe: Ipv4Net) -> Ring {
        Ring {
            universe: universe.trunc(),
            seed: None,
            blocks: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            block_sum: 0,
            by_owner: BTreeSet::new(),
        }
    }

    /// A ring whose whole range belongs to `seed.first_owner`.
    pub fn seeded(universe: Ipv4Net, seed: Seed) -> Ring {
        let mut ring = Ring::new(universe);
        ring.seed = Some(seed);
        let start = u32::from(ring.universe.network());
        let len = ring.universe.prefix_len();
        let label = Label {
            version: 1,
            owner: seed.first_owner,
        };
        ring.put(start, len, label);
        ring
    }

    pub fn universe(&self) -> Ipv4Net {
        self.universe
    }

    pub fn seed(&self) -> Option<Seed> {
        self.seed
    }

    pub fn is_seeded(&self) -> bool {
        self.seed.is_some()
    }

    pub fn blocks(&self) -> impl Iterator<Item = Block> + '_ {
        self.blocks.iter().map(|(start, (len, label))| Block {
            prefix: net(*start, *len),
            label: *label,
        })
    }

    /// The blocks inside `region` and the block containing it, if any:
    /// what a peer needs to learn what changed there. A range query, not
    /// a scan: rings of thousands of blocks gossip news every round.
    pub fn blocks_touching(&self, region: Ipv4Net) -> impl Iterator<Item = Block> + '_ {
        let start = u32::from(region.network());
        let end = last(start, region.prefix_len());
        let outer = self.covering(start).filter(|(s, _)| *s < start);
        let outer = outer.and_then(|(s, _)| self.blocks.get_key_value(&s));
        outer
            .into_iter()
            .chain(self.blocks.range(start..=end))
            .map(|(start, (len, label))| Block {
                prefix: net(*start, *len),
                label: *label,
            })
    }

    /// Whether every address of the universe is labelled: a ring only
    /// partly received (one gossip datagram of it) is not.
    pub fn is_complete(&self) -> bool {
        let start = u32::from(self.universe.network());
        self.seed.is_some() && self.covers(start, self.universe.prefix_len())
    }

    /// Every block as stored (start, prefix length), unchecked: what a
    /// saved ring's check reads.
    pub(super) fn raw_blocks(&self) -> impl Iterator<Item = (u32, u8)> + '_ {
        self.blocks.iter().map(|(start, (len, _))| (*start, *len))
    }

    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    pub fn tombstones(&self) -> impl Iterator<Item = (PeerName, PeerName)> + '_ {
        self.tombstones.iter().map(|(r, h)| (*r, *h))
    }

    pub fn is_removed(&self, peer: PeerName) -> bool {
        self.tombstones.contains_key(&peer)
    }

    /// The live peer a label's owner stands for: itself, or the heir of a
    /// removed peer.
    pub fn resolve(&self, mut owner: PeerName) -> PeerName {
        for _ in 0..MAX_HEIR_CHAIN {
            match self.tombstones.get(&owner) {
                Some(heir) => owner = *heir,
                None => break,
            }
        }
        owner
    }

    /// The (resolved) owner of `addr`, if the ring labels it.
    pub fn owner_of(&self, addr: Ipv4Addr) -> Option<PeerName> {
        let a = u32::from(addr);
        let (start, (len, label)) = self.blocks.range(..=a).next_back()?;
        (a <= last(*start, *len)).then(|| self.resolve(label.owner))
    }

    /// Blocks `peer` owns (after resolving heirs), ascending.
    pub fn blocks_of(&self, peer: PeerName) -> Vec<Ipv4Net> {
        // The labels that resolve to `peer`: its own, and those of removed
        // peers whose heirs lead to it.
        let mut owners: Vec<PeerName> = std::iter::once(peer)
            .chain(self.tombstones.keys().copied())
            .filter(|o| self.resolve(*o) == peer)
            .collect();
        owners.sort_unstable();
        owners.dedup();
        let mut starts: Vec<u32> = owners
            .iter()
            .flat_map(|o| self.by_owner.range((*o, 0)..=(*o, u32::MAX)))
            .map(|(_, start)| *start)
            .collect();
        starts.sort_unstable();
        starts
            .into_iter()
            .filter_map(|s| self.blocks.get(&s).map(|(len, _)| net(s, *len)))
            .collect()
    }

    /// Order-free fingerprint of the whole ring: equal rings have equal
    /// summaries on every node (canonical form, no random hasher).
    pub fn summary(&self) -> u64 {
        let mut h = self.seed.map_or(0, |s| mix(s.id));
        h = mix(h ^ self.block_sum);
        for (removed, heir) in &self.tombstones {
            h = mix(h ^ removed.0);
            h = mix(h ^ heir.0);
        }
        h
    }

    /// Takes on the seed of a peer's ring (if we have none), or checks it
    /// is ours.
    pub fn check_compatible(
        &mut self,
        universe: Ipv4Net,
        seed: Option<Seed>,
    ) -> Result<bool, RingError> {
        if universe.trunc() != self.universe {
            return Err(RingError::DifferentRange {
                ours: self.universe,
                theirs: universe,
            });
        }
        match (self.seed, seed) {
            (Some(ours), Some(theirs)) if ours.id != theirs.id => Err(RingError::DifferentSeed {
                ours: ours.id,
                theirs: theirs.id,
            }),
            (None, Some(theirs)) => {
                self.seed = Some(theirs);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Merges one block: every address in it keeps the greater label.
    /// Returns whether anything changed. Blocks outside the universe, or
    /// a ring not yet seeded, are ignored.
    pub fn merge_block(&mut self, block: Block) -> bool {
        !self.merge_blocks(&[block]).is_empty()
    }

    /// Merges many blocks, normalizing once; returns the prefixes of the
    /// blocks that changed something.
    pub fn merge_blocks(&mut self, blocks: &[Block]) -> Vec<Ipv4Net> {
        let mut changed = Vec::new();
        let mut touched = Vec::new();
        for block in blocks {
            let mut split = false;
            let did_change = self.paint(*block, &mut split);
            let prefix = block.prefix.trunc();
            if did_change {
                changed.push(prefix);
            }
            // Even a losing block may have split one of ours: rejoin.
            if did_change || split {
                touched.push(prefix);
            }
        }
        // Most gossiped blocks are old news that neither split nor change
        // anything; only where something did can siblings now be joined.
        for prefix in touched {
            self.coalesce_within(prefix);
        }
        changed
    }

    /// Per-address max of `block` into the blocks, without normalizing;
    /// sets `split` when it had to split a coarser block.
    fn paint(&mut self, block: Block, split: &mut bool) -> bool {
        let prefix = block.prefix.trunc();
        if self.seed.is_none() || !self.universe.contains(&prefix) {
            return false;
        }
        let (start, len) = (u32::from(prefix.network()), prefix.prefix_len());
        if self.covering(start).is_some_and(|(_, l)| l < len) {
            // A coarser block covers it: split that block down to `prefix`.
            self.isolate(start, len);
            *split = true;
        }
        let mut changed = false;
        let keys: Vec<u32> = self
            .blocks
            .range(start..=last(start, len))
            .map(|(s, _)| *s)
            .collect();
        for s in keys {
            if let Some(&(l, label)) = self.blocks.get(&s)
                && block.label > label
            {
                self.put(s, l, block.label);
                changed = true;
            }
        }
        // Addresses no block labels yet (only a partly received ring has
        // them) take the label outright.
        if !self.covers(start, len) {
            self.fill_gaps(start, len, block.label);
            changed = true;
        }
        changed
    }

    /// Records that `removed` left the cluster for good and `heir` took its
    /// space. A second, different heir for the same peer loses to the
    /// lower-named one on every node, so all agree.
    pub fn merge_tombstone(&mut self, removed: PeerName, heir: PeerName) -> bool {
        if removed == heir {
            return false;
        }
        match self.tombstones.get(&removed) {
            Some(h) if *h <= heir => false,
            _ => {
                self.tombstones.insert(removed, heir);
                true
            }
        }
    }

    /// Merges a whole ring (or part of one).
    pub fn merge(&mut self, other: &Ring) -> Result<bool, RingError> {
        let mut changed = self.check_compatible(other.universe, other.seed)?;
        for (removed, heir) in other.tombstones() {
            changed |= self.merge_tombstone(removed, heir);
        }
        let blocks: Vec<Block> = other.blocks().collect();
        changed |= !self.merge_blocks(&blocks).is_empty();
        Ok(changed)
    }

    /// The highest label version anywhere inside `prefix`.
    pub fn max_version_in(&self, prefix: Ipv4Net) -> u64 {
        let (start, len) = (u32::from(prefix.network()), prefix.prefix_len());
        let end = last(start, len);
        let inner = self.blocks.range(start..=end).map(|(_, (_, l))| l.version);
        let outer = self
            .covering(start)
            .and_then(|(s, _)| self.blocks.get(&s))
            .map(|(_, l)| l.version);
        inner.chain(outer).max().unwrap_or(0)
    }

    // ---- partition plumbing -------------------------------------------

    /// The block containing address `a`, as (start, len).
    fn covering(&self, a: u32) -> Option<(u32, u8)> {
        let (start, (len, _)) = self.blocks.range(..=a).next_back()?;
        (a <= last(*start, *len)).then_some((*start, *len))
    }

    /// Whether blocks fully cover `start/len`.
    fn covers(&self, start: u32, len: u8) -> bool {
        let end = u64::from(last(start, len));
        let mut next = u64::from(start);
        if let Some((s, l)) = self.covering(start) {
            next = u64::from(last(s, l)) + 1;
        }
        while next <= end {
            match self.blocks.get(&(next as u32)) {
                Some((l, _)) => next = u64::from(last(next as u32, *l)) + 1,
                None => return false,
            }
        }
        true
    }

    /// Splits the block covering `start` until `start/len` is a block of
    /// its own; the other halves keep the old label.
    fn isolate(&mut self, start: u32, len: u8) {
        let Some((mut s, mut l)) = self.covering(start) else {
            return;
        };
        let Some((_, label)) = self.take(s) else {
            return;
        };
        while l < len {
            l += 1;
            let half = size(l);
            let (low, high) = (s, s.wrapping_add(half));
            if start >= high {
                self.put(low, l, label);
                s = high;
            } else {
                self.put(high, l, label);
                s = low;
            }
        }
        self.put(s, l, label);
    }

    /// Labels the unlabelled parts of `start/len`.
    fn fill_gaps(&mut self, start: u32, len: u8, label: Label) {
        if self.covers(start, len) {
            return;
        }
        let inside = self.blocks.range(start..=last(start, len)).next().is_some();
        if !inside && self.covering(start).is_none() {
            self.put(start, len, label);
            return;
        }
        if len >= 32 {
            return;
        }
        let half = size(len + 1);
        self.fill_gaps(start, len + 1, label);
        self.fill_gaps(start.wrapping_add(half), len + 1, label);
    }

    /// Sets a block, keeping the running sum.
    fn put(&mut self, start: u32, len: u8, label: Label) {
        if let Some(old) = self.blocks.insert(start, (len, label)) {
            self.block_sum = self.block_sum.wrapping_sub(block_hash(start, old));
            self.by_owner.remove(&(old.1.owner, start));
        }
        self.block_sum = self.block_sum.wrapping_add(block_hash(start, (len, label)));
        self.by_owner.insert((label.owner, start));
    }

    /// Removes a block, keeping the running sum.
    fn take(&mut self, start: u32) -> Option<(u8, Label)> {
        let old = self.blocks.remove(&start)?;
        self.block_sum = self.block_sum.wrapping_sub(block_hash(start, old));
        self.by_owner.remove(&(old.1.owner, start));
        Some(old)
    }

    /// Joins sibling blocks with equal labels in and above `prefix` until
    /// none are left: what keeps the representation canonical after a
    /// merge touched `prefix`, without rebuilding the whole map.
    fn coalesce_within(&mut self, prefix: Ipv4Net) {
        let (start, len) = (u32::from(prefix.network()), prefix.prefix_len());
        let inside: Vec<u32> = self
            .blocks
            .range(start..=last(start, len))
            .map(|(s, _)| *s)
            .collect();
        for block in inside.into_iter().chain([start]) {
            self.coalesce_at(block);
        }
    }

    /// Joins the block holding address `a` with its sibling while their
    /// labels are equal, walking up.
    fn coalesce_at(&mut self, a: u32) {
        while let Some((s, l)) = self.covering(a) {
            if l <= self.universe.prefix_len() {
                return;
            }
            let parent = s & !(size(l - 1).wrapping_sub(1));
            let sibling = if s == parent {
                s.wrapping_add(size(l))
            } else {
                parent
            };
            let (Some(&(_, mine)), Some(&(sl, theirs))) =
                (self.blocks.get(&s), self.blocks.get(&sibling))
            else {
                return;
            };
            if sl != l || mine != theirs {
                return;
            }
            self.take(s);
            self.take(sibling);
            self.put(parent, l - 1, mine);
        }
    }

    /// Joins sibling blocks with equal labels until none are left, which
    /// makes the representation canonical (the reference for the local
    /// joining above).
    #[cfg(test)]
    fn normalize(&mut self) {
        let mut out: Vec<(u32, u8, Label)> = Vec::with_capacity(self.blocks.len());
        for (start, (len, label)) in std::mem::take(&mut self.blocks) {
            out.push((start, len, label));
            while out.len() >= 2 {
                let (s2, l2, b2) = out[out.len() - 1];
                let (s1, l1, b1) = out[out.len() - 2];
                let siblings = l1 == l2
                    && l1 > self.universe.prefix_len()
                    && s1 % size(l1 - 1) == 0
                    && s2 == s1.wrapping_add(size(l1));
                if !(siblings && b1 == b2) {
                    break;
                }
                out.truncate(out.len() - 2);
                out.push((s1, l1 - 1, b1));
            }
        }
        self.blocks = out.into_iter().map(|(s, l, b)| (s, (l, b))).collect();
        self.block_sum = sum_of(&self.blocks);
        self.by_owner = owners_of(&self.blocks);
    }
}

/// Addresses in a block of prefix length `len` (for len 0 this would be
/// 2^32, which no u32 holds; the universe is never a /0).
fn size(len: u8) -> u32 {
    if len == 0 {
        u32::MAX
    } else {
        1u32 << (32 - u32::from(len.min(32)))
    }
}

/// Last address of `start/len`.
pub(crate) fn last(start: u32, len: u8) -> u32 {
    if len == 0 {
        u32::MAX
    } else {
        start.wrapping_add(size(len) - 1)
    }
}

pub(crate) fn net(start: u32, len: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::from(start), len.min(32)).expect("prefix length clamped to 32")
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEED: Seed = Seed {
        id: 7,
        first_owner: PeerName(1),
    };

    fn universe() -> Ipv4Net {
        "10.32.0.0/12".parse().unwrap()
    }

    fn block(prefix: &str, version: u64, owner: u64) -> Block {
        Block {
            prefix: prefix.parse().unwrap(),
            label: Label {
                version,
                owner: PeerName(owner),
            },
        }
    }

    #[test]
    fn a_seeded_ring_gives_everything_to_the_first_owner() {
        let ring = Ring::seeded(universe(), SEED);
        assert_eq!(
            ring.owner_of("10.32.0.1".parse().unwrap()),
            Some(PeerName(1))
        );
        assert_eq!(
            ring.owner_of("10.47.255.255".parse().unwrap()),
            Some(PeerName(1))
        );
        assert_eq!(ring.owner_of("10.48.0.0".parse().unwrap()), None);
        assert_eq!(ring.blocks_of(PeerName(1)), vec![universe()]);
    }

    #[test]
    fn a_donation_splits_the_block_and_wins() {
        let mut ring = Ring::seeded(universe(), SEED);
        assert!(ring.merge_block(block("10.40.0.0/13", 2, 2)));
        assert_eq!(
            ring.blocks_of(PeerName(1)),
            vec!["10.32.0.0/13".parse().unwrap()]
        );
        assert_eq!(
            ring.blocks_of(PeerName(2)),
            vec!["10.40.0.0/13".parse().unwrap()]
        );
        // An older statement about the same space changes nothing.
        assert!(!ring.merge_block(block("10.32.0.0/12", 1, 1)));
        assert_eq!(
            ring.owner_of("10.40.0.1".parse().unwrap()),
            Some(PeerName(2))
        );
        // Giving it back rejoins the blocks into one.
        assert!(ring.merge_block(block("10.40.0.0/13", 3, 1)));
        assert_eq!(
            ring.block_count(),
            2,
            "different versions stay separate blocks"
        );
        assert!(ring.merge_block(block("10.32.0.0/13", 3, 1)));
        assert_eq!(ring.block_count(), 1);
    }

    #[test]
    fn a_removed_peers_space_goes_to_its_heir_but_its_late_donations_still_win() {
        let mut ring = Ring::seeded(universe(), SEED);
        ring.merge_tombstone(PeerName(1), PeerName(3));
        assert_eq!(
            ring.owner_of("10.40.0.1".parse().unwrap()),
            Some(PeerName(3))
        );
        ring.merge_block(block("10.40.0.0/13", 2, 2));
        assert_eq!(
            ring.owner_of("10.40.0.1".parse().unwrap()),
            Some(PeerName(2))
        );
        assert_eq!(
            ring.owner_of("10.32.0.1".parse().unwrap()),
            Some(PeerName(3))
        );
        // Two heirs: the lower name wins everywhere.
        ring.merge_tombstone(PeerName(1), PeerName(9));
        assert_eq!(
            ring.owner_of("10.32.0.1".parse().unwrap()),
            Some(PeerName(3))
        );
    }

    #[test]
    fn rings_of_different_seeds_or_ranges_refuse_to_merge() {
        let mut ours = Ring::seeded(universe(), SEED);
        let theirs = Ring::seeded(
            universe(),
            Seed {
                id: 8,
                first_owner: PeerName(5),
            },
        );
        let err = ours.merge(&theirs).unwrap_err();
        assert_eq!(
            err.to_string(),
            "peer belongs to a different IPAM ring (seed 0000000000000008, ours 0000000000000007): \
             the two groups were seeded separately; remove the data directory of the nodes in the \
             smaller group and restart them so they join this ring"
        );
        assert_eq!(ours, Ring::seeded(universe(), SEED), "nothing merged");
        let other_range = Ring::seeded("10.0.0.0/16".parse().unwrap(), SEED);
        assert_eq!(
            ours.merge(&other_range).unwrap_err().to_string(),
            "peer's allocation range 10.0.0.0/16 differs from ours (10.32.0.0/12): every node must use the same --ipalloc-range"
        );
    }

    #[test]
    fn an_unseeded_ring_adopts_a_peers_ring() {
        let mut fresh = Ring::new(universe());
        let mut seeded = Ring::seeded(universe(), SEED);
        seeded.merge_block(block("10.40.0.0/13", 2, 2));
        assert!(fresh.merge(&seeded).unwrap());
        assert_eq!(fresh, seeded);
    }

    /// Per-address reference: the greatest label of any merged block.
    fn reference(blocks: &[Block], probe: u32) -> Option<Label> {
        blocks
            .iter()
            .filter(|b| b.prefix.contains(&Ipv4Addr::from(probe)))
            .map(|b| b.label)
            .max()
    }

    fn arb_block() -> impl Strategy<Value = Block> {
        // Prefixes inside 10.32.0.0/12 from /12 to /20, to keep splits small.
        (12u8..=20, any::<u32>(), 1u64..6, 1u64..4).prop_map(|(len, bits, version, owner)| {
            let start = u32::from(Ipv4Addr::new(10, 32, 0, 0)) | (bits & ((1 << 20) - 1));
            Block {
                prefix: Ipv4Net::new(Ipv4Addr::from(start), len).unwrap().trunc(),
                label: Label {
                    version,
                    owner: PeerName(owner),
                },
            }
        })
    }

    fn ring_of(blocks: &[Block]) -> Ring {
        let mut ring = Ring::new(universe());
        ring.seed = Some(SEED);
        for b in blocks {
            ring.merge_block(*b);
        }
        ring
    }

    proptest! {
        #[test]
        fn every_address_keeps_its_greatest_label(blocks in proptest::collection::vec(arb_block(), 1..25),
                                                   probes in proptest::collection::vec(any::<u32>(), 50)) {
            let ring = ring_of(&blocks);
            for p in probes {
                let addr = u32::from(Ipv4Addr::new(10, 32, 0, 0)) | (p & ((1 << 20) - 1));
                let got = ring
                    .blocks()
                    .find(|b| b.prefix.contains(&Ipv4Addr::from(addr)))
                    .map(|b| b.label);
                prop_assert_eq!(got, reference(&blocks, addr));
            }
        }

        #[test]
        fn merge_order_does_not_matter(blocks in proptest::collection::vec(arb_block(), 1..25), seed in any::<u64>()) {
            let mut shuffled = blocks.clone();
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = mix(s);
                shuffled.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let (a, b) = (ring_of(&blocks), ring_of(&shuffled));
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(a.summary(), b.summary());
        }

        #[test]
        fn merging_rings_is_idempotent_and_associative(x in proptest::collection::vec(arb_block(), 0..10),
                                                       y in proptest::collection::vec(arb_block(), 0..10),
                                                       z in proptest::collection::vec(arb_block(), 0..10)) {
            let (rx, ry, rz) = (ring_of(&x), ring_of(&y), ring_of(&z));
            let mut xx = rx.clone();
            xx.merge(&rx).unwrap();
            prop_assert_eq!(&xx, &rx);
            let mut left = rx.clone();
            left.merge(&ry).unwrap();
            left.merge(&rz).unwrap();
            let mut yz = ry.clone();
            yz.merge(&rz).unwrap();
            let mut right = rx.clone();
            right.merge(&yz).unwrap();
            prop_assert_eq!(left, right);
        }

        #[test]
        fn blocks_touching_a_region_are_those_nested_with_it(blocks in proptest::collection::vec(arb_block(), 1..25),
                                                             region in arb_block()) {
            let ring = ring_of(&blocks);
            let region = region.prefix.trunc();
            let scanned: Vec<Block> = ring
                .blocks()
                .filter(|b| region.contains(&b.prefix) || b.prefix.contains(&region))
                .collect();
            prop_assert_eq!(ring.blocks_touching(region).collect::<Vec<_>>(), scanned);
        }

        #[test]
        fn local_joining_leaves_what_a_full_normalize_would(blocks in proptest::collection::vec(arb_block(), 1..25)) {
            let ring = ring_of(&blocks);
            let mut full = ring.clone();
            full.normalize();
            prop_assert_eq!(&full, &ring);
        }

        #[test]
        fn the_running_sum_follows_every_change(blocks in proptest::collection::vec(arb_block(), 1..25),
                                                   removed in 1..4u64) {
            let mut ring = Ring::new(universe());
            ring.check_compatible(universe(), Some(SEED)).unwrap();
            for b in &blocks {
                ring.merge_block(*b);
                prop_assert_eq!(ring.block_sum, sum_of(&ring.blocks));
            }
            let before = ring.summary();
            ring.merge_tombstone(PeerName(removed), PeerName(9));
            prop_assert_ne!(ring.summary(), before);
            let saved: Ring = serde_json::from_str(&serde_json::to_string(&ring).unwrap()).unwrap();
            prop_assert_eq!(saved.summary(), ring.summary());
        }

        #[test]
        fn the_owner_index_follows_every_change(blocks in proptest::collection::vec(arb_block(), 1..25),
                                                removed in 1..4u64, heir in 1..4u64) {
            let mut ring = Ring::new(universe());
            ring.check_compatible(universe(), Some(SEED)).unwrap();
            let scan = |ring: &Ring, peer: PeerName| -> Vec<Ipv4Net> {
                ring.blocks()
                    .filter(|b| ring.resolve(b.label.owner) == peer)
                    .map(|b| b.prefix)
                    .collect()
            };
            for b in &blocks {
                ring.merge_block(*b);
                prop_assert_eq!(&ring.by_owner, &owners_of(&ring.blocks));
            }
            ring.merge_tombstone(PeerName(removed), PeerName(heir));
            for peer in (0..6).map(PeerName) {
                prop_assert_eq!(ring.blocks_of(peer), scan(&ring, peer));
            }
        }

        #[test]
        fn blocks_never_overlap_and_are_canonical(blocks in proptest::collection::vec(arb_block(), 1..25)) {
            let ring = ring_of(&blocks);
            let all: Vec<Block> = ring.blocks().collect();
            for w in all.windows(2) {
                prop_assert!(u32::from(w[0].prefix.broadcast()) < u32::from(w[1].prefix.network()));
            }
            // No two siblings with equal labels remain.
            for w in all.windows(2) {
                let siblings = w[0].prefix.prefix_len() == w[1].prefix.prefix_len()
                    && w[0].prefix.supernet() == w[1].prefix.supernet();
                prop_assert!(!(siblings && w[0].label == w[1].label));
            }
        }
    }
}
