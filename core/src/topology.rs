//! The cluster as this node knows it: every peer's own entry, merged by
//! version.
//!
//! Each peer is the only author of its entry and bumps the version on every
//! change. Merging keeps, per peer, the greatest entry under the order
//! (version, content), so merge is a join: idempotent, commutative and
//! associative, and nodes converge whatever order gossip arrives in.

use crate::ipam::IpamInfo;
use crate::name_map::{NameMap, name_map};
use crate::peer::PeerName;
use crate::wire::Announcement;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// What one peer says about itself.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerEntry {
    // Field order matters: the derived Ord compares version first.
    pub version: u64,
    pub name: PeerName,
    pub nickname: String,
    pub address: SocketAddr,
    /// Peers this one has a confirmed connection with, ascending, no repeats.
    pub connections: Vec<PeerName>,
    /// Its address-space announcement.
    pub ipam: IpamInfo,
}

impl PeerEntry {
    /// Fingerprint of the whole entry: equal entries give equal values on
    /// every node (no random hasher), so digests can be compared.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint_with(self.links_fingerprint())
    }

    /// [`PeerEntry::fingerprint`], given the list's fingerprint.
    fn fingerprint_with(&self, links: u64) -> u64 {
        // Everything but the list is hashed through its canonical wire
        // encoding (fixed field order, no maps), streamed into FNV; the
        // list, nine tenths of an entry at scale, a word at a time (see
        // `links_fingerprint`): a starting 1,000-node cluster merges
        // millions of entries, and hashing lists byte by byte cost ~5 % of
        // its simulation. Destructured so a new field cannot be left out.
        let PeerEntry {
            version,
            name,
            nickname,
            address,
            connections: _,
            ipam,
        } = self;
        let mut h = Fnv::default();
        let rest = (version, name, nickname, address, ipam);
        let rest = match postcard::serialize_with_flavor(&rest, &mut h) {
            Ok(()) => h.finish(),
            // Cannot happen (the hasher takes every byte).
            Err(_) => Fnv::default().finish(),
        };
        (rest ^ links.rotate_left(32)).wrapping_mul(FNV_PRIME)
    }
}

impl PeerEntry {
    /// Fingerprint of the connection list alone: what a node asking for a
    /// newer entry says it holds, so the answer can leave the list out when
    /// it has not changed (most updates only change the IPAM announcement).
    pub fn links_fingerprint(&self) -> u64 {
        // A word at a time: asked for every entry requested or answered,
        // up to 100 names each, thousands of times a second at scale.
        let mut h: u64 = self.connections.len() as u64;
        for peer in &self.connections {
            h = (h ^ peer.0).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            h ^= h >> 29;
        }
        h
    }
}

/// The result of merging one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// A peer not known before.
    New,
    /// A newer entry for a known peer, and which parts of it changed (so
    /// only the work those parts need is redone).
    Updated {
        connections_changed: bool,
        address_changed: bool,
        ipam_changed: bool,
    },
    /// Nothing new: the same or an older entry.
    Unchanged,
}

/// All known peers' entries, including this node's own.
#[derive(Clone, Debug)]
pub struct Topology {
    entries: BTreeMap<PeerName, Stored>,
    /// Order-free sum of the entries' fingerprints: two nodes with the same
    /// entries have the same summary, so a heartbeat can carry it and
    /// anti-entropy runs only where summaries differ.
    summary: u64,
    /// Each entry's version, beside the ordered map: news and digests ask
    /// for versions of up to 64 names a datagram, millions of times while
    /// a big cluster starts, and a hash lookup in this small table is a
    /// fraction of a walk down the map's big nodes (~10 % of a 1,000-node
    /// start).
    versions: NameMap<u64>,
}

#[derive(Clone, Debug)]
struct Stored {
    entry: PeerEntry,
    mixed: u64,
    /// Its `links_fingerprint`, asked for with every request and answer.
    links: u64,
}

impl Stored {
    fn of(entry: PeerEntry) -> Stored {
        let links = entry.links_fingerprint();
        let mixed = mix(entry.fingerprint_with(links));
        Stored {
            entry,
            mixed,
            links,
        }
    }
}

impl Topology {
    pub fn new(own: PeerEntry) -> Topology {
        let mut t = Topology {
            entries: BTreeMap::new(),
            summary: 0,
            versions: name_map(mix(own.name.0)),
        };
        t.merge(own);
        t
    }

    /// Merges `entry`, keeping whichever of the two is greater.
    pub fn merge(&mut self, entry: PeerEntry) -> Merge {
        match self.entries.get_mut(&entry.name) {
            None => {
                let stored = Stored::of(entry);
                self.summary = self.summary.wrapping_add(stored.mixed);
                self.versions
                    .insert(stored.entry.name, stored.entry.version);
                self.entries.insert(stored.entry.name, stored);
                Merge::New
            }
            // Most gossip repeats what we have: compare before hashing.
            Some(stored) if entry > stored.entry => {
                let connections_changed = stored.entry.connections != entry.connections;
                let address_changed = stored.entry.address != entry.address;
                let ipam_changed = stored.entry.ipam != entry.ipam;
                let new = Stored::of(entry);
                self.summary = self
                    .summary
                    .wrapping_sub(stored.mixed)
                    .wrapping_add(new.mixed);
                self.versions.insert(new.entry.name, new.entry.version);
                *stored = new;
                Merge::Updated {
                    connections_changed,
                    address_changed,
                    ipam_changed,
                }
            }
            Some(_) => Merge::Unchanged,
        }
    }

    /// Merges an announcement of a held peer whose connection list it
    /// keeps (its `links` fingerprint equals the held one's), in place: the
    /// same as merging the entry with the held list, without copying the
    /// list or hashing it again.
    pub fn merge_keeping_links(&mut self, announcement: Announcement) -> Merge {
        let Some(stored) = self.entries.get_mut(&announcement.name) else {
            return Merge::Unchanged;
        };
        let held = &stored.entry;
        // The entries' order with equal lists (see `PeerEntry`'s fields).
        let newer = (
            announcement.version,
            announcement.name,
            &announcement.nickname,
            announcement.address,
            &announcement.ipam,
        ) > (
            held.version,
            held.name,
            &held.nickname,
            held.address,
            &held.ipam,
        );
        if stored.links != announcement.links || !newer {
            return Merge::Unchanged;
        }
        let address_changed = held.address != announcement.address;
        let ipam_changed = held.ipam != announcement.ipam;
        let entry = &mut stored.entry;
        entry.version = announcement.version;
        entry.nickname = announcement.nickname;
        entry.address = announcement.address;
        entry.ipam = announcement.ipam;
        let mixed = mix(entry.fingerprint_with(stored.links));
        self.summary = self.summary.wrapping_sub(stored.mixed).wrapping_add(mixed);
        stored.mixed = mixed;
        self.versions.insert(entry.name, entry.version);
        Merge::Updated {
            connections_changed: false,
            address_changed,
            ipam_changed,
        }
    }

    /// Drops a peer's entry (a forgotten peer).
    pub fn remove(&mut self, name: PeerName) -> Option<PeerEntry> {
        let stored = self.entries.remove(&name)?;
        self.versions.remove(&name);
        self.summary = self.summary.wrapping_sub(stored.mixed);
        Some(stored.entry)
    }

    pub fn get(&self, name: PeerName) -> Option<&PeerEntry> {
        self.entries.get(&name).map(|s| &s.entry)
    }

    /// The fingerprint of `name`'s connection list, kept from the merge.
    pub fn links_fingerprint(&self, name: PeerName) -> Option<u64> {
        self.entries.get(&name).map(|s| s.links)
    }

    pub fn version(&self, name: PeerName) -> Option<u64> {
        self.versions.get(&name).copied()
    }

    pub fn entries(&self) -> impl Iterator<Item = &PeerEntry> + '_ {
        self.entries.values().map(|s| &s.entry)
    }

    pub fn names(&self) -> impl Iterator<Item = PeerName> + '_ {
        self.entries.keys().copied()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn summary(&self) -> u64 {
        self.summary
    }

    /// (name, version) of every entry from `first` to `last` inclusive.
    pub fn versions_in(
        &self,
        first: PeerName,
        last: PeerName,
    ) -> impl Iterator<Item = (PeerName, u64)> + '_ {
        self.entries
            .range(first..=last)
            .map(|(n, s)| (*n, s.entry.version))
    }
}

/// splitmix64's finaliser: spreads fingerprints so that their sum is a good
/// summary of the set.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// FNV-1a: tiny, fixed and the same everywhere, which is all a fingerprint
/// of trusted-after-decoding data needs. It takes a postcard encoding byte
/// by byte, so no encoding is ever built in memory.
struct Fnv {
    hash: u64,
    len: u64,
}

impl Default for Fnv {
    fn default() -> Self {
        Fnv {
            hash: 0xcbf2_9ce4_8422_2325,
            len: 0,
        }
    }
}

impl Fnv {
    fn byte(&mut self, b: u8) {
        self.hash = (self.hash ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        self.len += 1;
    }

    fn finish(&self) -> u64 {
        // Length-delimit so ("ab","c") and ("a","bc") differ.
        (self.hash ^ self.len).wrapping_mul(FNV_PRIME)
    }
}

impl postcard::ser_flavors::Flavor for &mut Fnv {
    type Output = ();

    fn try_push(&mut self, b: u8) -> postcard::Result<()> {
        self.byte(b);
        Ok(())
    }

    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        bytes.iter().for_each(|b| self.byte(*b));
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(name: u64, version: u64, conns: &[u64]) -> PeerEntry {
        PeerEntry {
            version,
            name: PeerName(name),
            nickname: format!("node{name}"),
            address: SocketAddr::from(([192, 168, 1, name as u8], 6783)),
            connections: conns.iter().map(|c| PeerName(*c)).collect(),
            ipam: IpamInfo::default(),
        }
    }

    fn arb_entry() -> impl Strategy<Value = PeerEntry> {
        (
            0u64..6,
            0u64..5,
            proptest::collection::btree_set(0u64..6, 0..4),
        )
            .prop_map(|(name, version, conns)| {
                let conns: Vec<u64> = conns.into_iter().collect();
                entry(name, version, &conns)
            })
    }

    fn merged(entries: &[PeerEntry]) -> Vec<PeerEntry> {
        let mut t = Topology::new(entry(100, 1, &[]));
        for e in entries {
            t.merge(e.clone());
        }
        t.entries().cloned().collect()
    }

    fn summary_of(entries: &[PeerEntry]) -> u64 {
        let mut t = Topology::new(entry(100, 1, &[]));
        for e in entries {
            t.merge(e.clone());
        }
        t.summary()
    }

    proptest! {
        #[test]
        fn merge_is_idempotent(es in proptest::collection::vec(arb_entry(), 0..20)) {
            let twice: Vec<_> = es.iter().chain(es.iter()).cloned().collect();
            prop_assert_eq!(merged(&es), merged(&twice));
        }

        #[test]
        fn merge_is_commutative(es in proptest::collection::vec(arb_entry(), 0..20), seed in any::<u64>()) {
            let mut shuffled = es.clone();
            // A deterministic permutation derived from the seed.
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = mix(s.wrapping_add(i as u64));
                shuffled.swap(i, (s % (i as u64 + 1)) as usize);
            }
            prop_assert_eq!(merged(&es), merged(&shuffled));
            prop_assert_eq!(summary_of(&es), summary_of(&shuffled));
        }

        #[test]
        fn merge_is_associative(a in proptest::collection::vec(arb_entry(), 0..10),
                                b in proptest::collection::vec(arb_entry(), 0..10),
                                c in proptest::collection::vec(arb_entry(), 0..10)) {
            // (a ∪ b) ∪ c == a ∪ (b ∪ c), merging whole states into each other.
            let ab: Vec<_> = merged(&[a.clone(), b.clone()].concat());
            let left = merged(&[ab, c.clone()].concat());
            let bc: Vec<_> = merged(&[b, c].concat());
            let right = merged(&[a, bc].concat());
            prop_assert_eq!(left, right);
        }

        #[test]
        fn merging_an_announcement_in_place_is_merging_its_entry(
            es in proptest::collection::vec(arb_entry(), 0..12),
            updates in proptest::collection::vec((arb_entry(), 0u8..3, 0u16..2), 0..12),
        ) {
            let (mut whole, mut in_place) = (Topology::new(entry(100, 1, &[])), Topology::new(entry(100, 1, &[])));
            for e in &es {
                whole.merge(e.clone());
                in_place.merge(e.clone());
            }
            for (mut update, nickname, port) in updates {
                let Some(held) = whole.get(update.name).cloned() else { continue };
                // Announcements keep the held list; vary what they carry.
                update.connections = held.connections.clone();
                update.nickname = format!("n{nickname}");
                update.address.set_port(6783 + port);
                let announcement = Announcement::of(&update, held.links_fingerprint());
                prop_assert_eq!(in_place.merge_keeping_links(announcement), whole.merge(update));
                prop_assert_eq!(in_place.summary(), whole.summary());
                prop_assert_eq!(in_place.entries().collect::<Vec<_>>(), whole.entries().collect::<Vec<_>>());
                for t in [&whole, &in_place] {
                    for e in t.entries() {
                        prop_assert_eq!(t.version(e.name), Some(e.version));
                    }
                }
            }
        }

        #[test]
        fn summary_tracks_content(es in proptest::collection::vec(arb_entry(), 0..20)) {
            // The incrementally kept summary equals one computed from scratch.
            let mut t = Topology::new(entry(100, 1, &[]));
            for e in &es { t.merge(e.clone()); }
            let fresh = t.entries().fold(0u64, |s, e| s.wrapping_add(mix(e.fingerprint())));
            prop_assert_eq!(t.summary(), fresh);
        }
    }

    #[test]
    fn newer_version_wins_and_older_is_ignored() {
        let mut t = Topology::new(entry(100, 1, &[]));
        assert_eq!(t.merge(entry(1, 2, &[2])), Merge::New);
        assert_eq!(t.merge(entry(1, 1, &[3])), Merge::Unchanged);
        let updated = |connections_changed| Merge::Updated {
            connections_changed,
            address_changed: false,
            ipam_changed: false,
        };
        assert_eq!(t.merge(entry(1, 3, &[2])), updated(false));
        assert_eq!(t.merge(entry(1, 4, &[2, 3])), updated(true));
        assert_eq!(t.version(PeerName(1)), Some(4));
    }

    #[test]
    fn fingerprint_is_pinned_and_sees_every_field() {
        // Summaries travel in heartbeats: nodes of different builds must
        // agree on them, so the definition is pinned here: FNV-1a of the
        // wire encoding of the entry without its list, combined with the
        // word-wise list fingerprint.
        let e = entry(7, 3, &[1, 2, 300]);
        let rest = (&e.version, &e.name, &e.nickname, &e.address, &e.ipam);
        let bytes = postcard::to_allocvec(&rest).unwrap();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in &bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME);
        }
        h = (h ^ bytes.len() as u64).wrapping_mul(FNV_PRIME);
        let mut links: u64 = 3;
        for p in [1u64, 2, 300] {
            links = (links ^ p).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            links ^= links >> 29;
        }
        let expected = (h ^ links.rotate_left(32)).wrapping_mul(FNV_PRIME);
        assert_eq!(e.fingerprint(), expected);

        let changed = [
            PeerEntry {
                version: 4,
                ..e.clone()
            },
            PeerEntry {
                name: PeerName(8),
                ..e.clone()
            },
            PeerEntry {
                nickname: "other".into(),
                ..e.clone()
            },
            PeerEntry {
                address: SocketAddr::from(([10, 0, 0, 1], 6783)),
                ..e.clone()
            },
            PeerEntry {
                connections: vec![PeerName(1), PeerName(2)],
                ..e.clone()
            },
            PeerEntry {
                ipam: IpamInfo {
                    free: 1,
                    ..IpamInfo::default()
                },
                ..e.clone()
            },
        ];
        for other in changed {
            assert_ne!(other.fingerprint(), e.fingerprint(), "{other:?}");
        }
    }

    #[test]
    fn removal_restores_the_summary() {
        let mut t = Topology::new(entry(100, 1, &[]));
        let before = t.summary();
        t.merge(entry(1, 2, &[2]));
        assert_ne!(t.summary(), before);
        assert_eq!(t.version(PeerName(1)), Some(2));
        t.remove(PeerName(1));
        assert_eq!(t.summary(), before);
        assert_eq!(t.version(PeerName(1)), None);
    }
}
