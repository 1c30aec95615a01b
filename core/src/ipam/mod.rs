//! IP address management: the ring of address ownership, seeding it by
//! quorum, allocating addresses to containers, and moving free space
//! between peers by donation.
//!
//! Everything here travels by gossip: each peer announces an [`IpamInfo`]
//! in its topology entry (its ring, free space, whether it needs space, its
//! seeding state), and ring changes spread as ring updates. A peer short of
//! space sets `wants_space`; the peer with the most free space (as each
//! donor sees it) gives it an empty aligned block of up to half its free
//! space. No request/response is needed, and retrying is inherent: the want
//! stays announced until it is met.

pub mod ring;
pub mod saved;
pub mod seeding;
pub mod space;

use crate::peer::PeerName;
use crate::random::Random;
use crate::time::Time;
use ipnet::Ipv4Net;
use ring::{Block, Label, Ring, RingError, Seed};
use seeding::{Paxos, Seeding};
use serde::{Deserialize, Serialize};
use space::{GATEWAY_ID, MAX_CONTAINER_ID, Space};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::time::Duration;

/// How this node gets address space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpamMode {
    /// Share `range` with the other peers through the ring.
    Ring(IpamInit),
    /// Own exactly this podCIDR (Kubernetes `node.spec.podCIDR`); `None`
    /// until it is known.
    NodeCidr(Option<Ipv4Net>),
}

/// How the ring is first created (Weave's `--ipalloc-init`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpamInit {
    /// Seed once a quorum of this many initial peers agree; `None` counts
    /// the configured peer addresses plus this node.
    Consensus(Option<usize>),
    /// Never take part in seeding; wait for a ring from the others.
    Observer,
}

/// What a peer announces about its address space in its topology entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IpamInfo {
    /// Seed id of the ring this peer holds.
    pub ring: Option<u64>,
    /// Free addresses in its space.
    pub free: u64,
    /// Addresses in its space (free or not): a donor whose ring gives the
    /// peer more than it announces knows the announcement predates a
    /// donation, and does not donate again on it.
    pub owned: u64,
    /// It has allocations waiting for space.
    pub wants_space: bool,
    /// Its seeding state, while there is no ring (not for observers).
    pub seeding: Option<Paxos>,
    /// Its podCIDR, in node-cidr mode.
    pub pod_cidr: Option<Ipv4Net>,
}

/// The result of an allocation request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allocation {
    Ready(Ipv4Addr),
    /// Not possible yet; it completes by itself (an
    /// [`Event::Allocated`](crate::Event::Allocated) follows) or fails.
    Pending(PendingReason),
}

/// Why an allocation waits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum PendingReason {
    #[error(
        "waiting for the IPAM ring to be seeded: {reachable} of the {quorum} peers needed for a quorum are reachable"
    )]
    AwaitingQuorum { quorum: usize, reachable: usize },
    #[error("waiting for the IPAM ring from a peer (this node is an observer and never seeds)")]
    AwaitingRing,
    #[error("waiting for this node's podCIDR")]
    AwaitingPodCidr,
    #[error("waiting for a peer with free addresses to donate some")]
    AwaitingDonation,
    #[error(
        "every free address is owned by unreachable peers; if they were deleted from the cluster, remove them to reclaim their space"
    )]
    OwnersUnreachable,
}

/// An IPAM request refused, with the message users see.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum IpamError {
    #[error("invalid container ID {0:?}: must be 1 to 256 printable ASCII characters without ':'")]
    InvalidContainerId(String),
    #[error("address {addr} is outside the allocation range {range}")]
    OutOfRange { addr: Ipv4Addr, range: Ipv4Net },
    #[error("address {addr} is owned by peer {owner}, not by this node")]
    OwnedByOtherPeer { addr: Ipv4Addr, owner: PeerName },
    #[error("address {addr} is already allocated to {holder}")]
    InUse { addr: Ipv4Addr, holder: String },
    #[error("address {addr} is reserved (network, broadcast or gateway address)")]
    Reserved { addr: Ipv4Addr },
    #[error("the allocation range {range} is exhausted: every address is in use")]
    Exhausted { range: Ipv4Net },
    #[error("cannot remove peer {0}: it is this node")]
    RemoveSelf(PeerName),
    #[error(
        "refusing to reclaim the space of peer {0}: it is reachable, so it may still be using its addresses; remove it only after its node is deleted"
    )]
    PeerReachable(PeerName),
    #[error(
        "peer removal applies to ring mode only; in node-cidr mode a node's podCIDR goes with its Node object"
    )]
    NotRingMode,
}

/// A change the dataplane or the agent may act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpamEvent {
    Allocated {
        container: String,
        address: Ipv4Addr,
    },
    AllocationFailed {
        container: String,
        error: IpamError,
    },
    RingSeeded {
        seed: u64,
        first_owner: PeerName,
    },
    /// An allocation of ours is now in space the ring gives another peer.
    Conflict {
        container: String,
        address: Ipv4Addr,
        owner: Option<PeerName>,
    },
}

/// How one peer looks to IPAM: its announcement and whether we reach it.
#[derive(Clone, Copy, Debug)]
pub struct PeerView<'a> {
    pub info: &'a IpamInfo,
    pub reachable: bool,
}

/// What must survive a restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamState {
    pub ring: Ring,
    pub allocations: Space,
    pub seeding: Paxos,
}

/// Least time between two donations to the same peer: long enough for the
/// first to reach it and its updated announcement to come back.
const DONATION_INTERVAL: Duration = Duration::from_secs(2);
/// Least time between two donations by this peer: one round of gossip, so
/// the donors and the needy of the next round know about this one.
const DONATION_PACE: Duration = Duration::from_millis(500);
/// How long a peer that saw the seeding decided, with another peer as
/// first owner, keeps announcing what it announced before: the first owner
/// splits the ring among the peers at once, so the ring with our block in
/// it is on its way, and announcing "a ring, no space" first and the
/// block after made every peer of a 1,000-node cluster fetch a thousand
/// more entries. If no block comes, we announce then and ask for space.
const SPLIT_WAIT: Duration = Duration::from_secs(2);
/// Most ring errors remembered (one per peer), so a flood of misconfigured
/// peers cannot grow memory without bound.
const MAX_RING_ERRORS: usize = 64;

#[derive(Clone, Debug)]
pub struct Ipam {
    me: PeerName,
    mode: IpamMode,
    ring: Ring,
    seeding: Seeding,
    space: Space,
    pending: BTreeSet<String>,
    pending_claims: BTreeMap<String, Ipv4Addr>,
    donated: BTreeMap<PeerName, Time>,
    ring_errors: BTreeMap<PeerName, RingError>,
    conflicts: BTreeMap<String, Ipv4Addr>,
    /// Regions of the ring changed since they were last pushed, with the
    /// push rounds left.
    ring_news: BTreeMap<Ipv4Net, u8>,
    tombstone_news: u8,
    events: VecDeque<IpamEvent>,
    /// `ring.summary()`, kept because every heartbeat carries it.
    ring_summary: u64,
    /// Since when every owner has announced a full space.
    exhausted_since: Option<Time>,
    last_donation: Option<Time>,
    /// A peer needs space we may give once a pace or interval has passed.
    donation_waiting: bool,
    /// Until when we wait for the first owner's split (see [`SPLIT_WAIT`]).
    awaiting_split: Option<Time>,
}

impl Ipam {
    pub fn new(
        me: PeerName,
        range: Ipv4Net,
        mode: IpamMode,
        expected_peers: usize,
        state: Option<IpamState>,
    ) -> Ipam {
        let (ring, space, paxos) = match state {
            Some(s) => (s.ring, s.allocations.restored(), s.seeding),
            None => (Ring::new(range), Space::default(), Paxos::default()),
        };
        let mut ipam = Ipam {
            me,
            mode,
            ring,
            seeding: Seeding::new(me, expected_peers, paxos),
            space,
            pending: BTreeSet::new(),
            pending_claims: BTreeMap::new(),
            donated: BTreeMap::new(),
            ring_errors: BTreeMap::new(),
            conflicts: BTreeMap::new(),
            ring_news: BTreeMap::new(),
            tombstone_news: 0,
            events: VecDeque::new(),
            ring_summary: 0,
            exhausted_since: None,
            last_donation: None,
            donation_waiting: false,
            awaiting_split: None,
        };
        ipam.ring_summary = ipam.ring.summary();
        ipam.pending.insert(GATEWAY_ID.to_string());
        ipam.complete_pending();
        ipam
    }

    pub fn state(&self) -> IpamState {
        IpamState {
            ring: self.ring.clone(),
            allocations: self.space.clone(),
            seeding: self.seeding.state(),
        }
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    pub fn ring_summary(&self) -> u64 {
        self.ring_summary
    }

    pub fn mode(&self) -> &IpamMode {
        &self.mode
    }

    pub fn range(&self) -> Ipv4Net {
        self.ring.universe()
    }

    pub fn allocations(&self) -> &Space {
        &self.space
    }

    pub fn poll_event(&mut self) -> Option<IpamEvent> {
        self.events.pop_front()
    }

    /// The bridge gateway address, once this node has space.
    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.space.get(GATEWAY_ID)
    }

    pub fn set_pod_cidr(&mut self, cidr: Ipv4Net) {
        if let IpamMode::NodeCidr(current) = &mut self.mode {
            *current = Some(cidr.trunc());
            self.complete_pending();
        }
    }

    /// Blocks this node owns.
    /// Whether `address` is in this node's space.
    fn owns(&self, address: Ipv4Addr) -> bool {
        match &self.mode {
            IpamMode::Ring(_) => self.ring.owner_of(address) == Some(self.me),
            IpamMode::NodeCidr(cidr) => cidr.is_some_and(|c| c.contains(&address)),
        }
    }

    pub fn own_blocks(&self) -> Vec<Ipv4Net> {
        match &self.mode {
            IpamMode::Ring(_) => self.ring.blocks_of(self.me),
            IpamMode::NodeCidr(cidr) => cidr.iter().copied().collect(),
        }
    }

    /// Addresses never handed out: the range's (or podCIDR's) network and
    /// broadcast addresses.
    fn reserved(&self) -> Vec<Ipv4Addr> {
        self.outer_range().map(reserved_in).unwrap_or_default()
    }

    pub fn free(&self) -> u64 {
        self.space.free_in(&self.own_blocks(), &self.reserved())
    }

    /// What we announce in our topology entry.
    pub fn info(&self) -> IpamInfo {
        let seeding_now =
            matches!(self.mode, IpamMode::Ring(IpamInit::Consensus(_))) && !self.ring.is_seeded();
        let free = self.free();
        IpamInfo {
            ring: self.ring.seed().map(|s| s.id),
            free,
            owned: self.owned(),
            wants_space: !self.pending.is_empty() && self.ring.is_seeded() && free == 0,
            seeding: seeding_now.then(|| self.seeding.state()),
            pod_cidr: match &self.mode {
                IpamMode::NodeCidr(c) => *c,
                IpamMode::Ring(_) => None,
            },
        }
    }

    /// We just got a ring: unless we seeded it, our block is on its way.
    fn await_split(&mut self, now: Time) {
        if self.split_coming() {
            self.awaiting_split = Some(now + SPLIT_WAIT);
        }
    }

    /// Whether the ring is still being split at its seeding: its first
    /// owner (another peer) holds more than half of it, as it does until
    /// it has shared it out (see [`Ipam::donate`]) and until all of the
    /// split has reached us. A peer that joins later, when the first
    /// owner has shared out its space, asks for space at once.
    fn split_coming(&self) -> bool {
        let universe = size_of(&[self.ring.universe()]);
        self.ring.seed().is_some_and(|s| {
            s.first_owner != self.me && size_of(&self.ring.blocks_of(s.first_owner)) > universe / 2
        })
    }

    /// Whether our announcement should wait: we adopted a ring another
    /// peer seeded and its split, with our block, has not reached us yet.
    pub fn announcement_waits(&self) -> bool {
        self.awaiting_split.is_some() && self.owned() == 0 && self.split_coming()
    }

    fn owned(&self) -> u64 {
        size_of(&self.own_blocks())
    }

    // ---- requests ---------------------------------------------------------

    /// An address for `container`: the same one every time it asks.
    pub fn allocate(
        &mut self,
        now: Time,
        container: &str,
        peers: &BTreeMap<PeerName, PeerView>,
    ) -> Result<Allocation, IpamError> {
        validate_container_id(container)?;
        if let Some(addr) = self.space.get(container) {
            return Ok(Allocation::Ready(addr));
        }
        self.pending.insert(container.to_string());
        self.complete_pending();
        match self.space.get(container) {
            Some(addr) => Ok(Allocation::Ready(addr)),
            None => {
                let reason = self.pending_reason(peers);
                if let Err(error) = self.check_exhausted(now, peers) {
                    self.pending.remove(container);
                    return Err(error);
                }
                Ok(Allocation::Pending(reason))
            }
        }
    }

    /// Frees `container`'s address (or its pending request). Releasing an
    /// unknown container is not an error: release is idempotent.
    pub fn release(&mut self, container: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        validate_container_id(container)?;
        self.pending.remove(container);
        self.pending_claims.remove(container);
        self.conflicts.remove(container);
        Ok(self.space.remove(container))
    }

    /// Re-registers an address `container` already holds (after a
    /// restart that lost the allocation record).
    pub fn claim(
        &mut self,
        container: &str,
        addr: Ipv4Addr,
        peers: &BTreeMap<PeerName, PeerView>,
    ) -> Result<Allocation, IpamError> {
        Ok(match self.try_claim(container, addr)? {
            Some(addr) => Allocation::Ready(addr),
            None => Allocation::Pending(self.pending_reason(peers)),
        })
    }

    /// A claim, or `None` when it must wait for the ring or the podCIDR
    /// (it is then kept and completed by itself).
    fn try_claim(
        &mut self,
        container: &str,
        addr: Ipv4Addr,
    ) -> Result<Option<Ipv4Addr>, IpamError> {
        validate_container_id(container)?;
        let range = self.outer_range();
        if !range.is_some_and(|r| r.contains(&addr))
            && !matches!(self.mode, IpamMode::NodeCidr(None))
        {
            return Err(IpamError::OutOfRange {
                addr,
                range: range.unwrap_or(self.ring.universe()),
            });
        }
        if self.space.get(container) == Some(addr) {
            return Ok(Some(addr));
        }
        if let Some(holder) = self.space.holder(addr) {
            return Err(IpamError::InUse {
                addr,
                holder: holder.to_string(),
            });
        }
        if self.reserved().contains(&addr) {
            return Err(IpamError::Reserved { addr });
        }
        let own = self.own_blocks();
        if own.iter().any(|b| b.contains(&addr)) {
            self.space.insert(container, addr);
            return Ok(Some(addr));
        }
        match (&self.mode, self.ring.owner_of(addr)) {
            (IpamMode::Ring(_), Some(owner)) => Err(IpamError::OwnedByOtherPeer { addr, owner }),
            (IpamMode::Ring(_), None) | (IpamMode::NodeCidr(None), _) => {
                self.pending_claims.insert(container.to_string(), addr);
                Ok(None)
            }
            (IpamMode::NodeCidr(Some(range)), _) => Err(IpamError::OutOfRange {
                addr,
                range: *range,
            }),
        }
    }

    /// `peer` was deleted from the cluster for good: its space becomes ours.
    /// Refused while the peer is reachable. Returns how many addresses we
    /// took over (0 when it was already removed).
    pub fn remove_peer(&mut self, peer: PeerName, reachable: bool) -> Result<u64, IpamError> {
        if !matches!(self.mode, IpamMode::Ring(_)) {
            return Err(IpamError::NotRingMode);
        }
        if peer == self.me {
            return Err(IpamError::RemoveSelf(peer));
        }
        if reachable {
            return Err(IpamError::PeerReachable(peer));
        }
        if self.ring.is_removed(peer) {
            return Ok(0);
        }
        let taken: u64 = self
            .ring
            .blocks_of(peer)
            .iter()
            .map(|b| 1u64 << (32 - b.prefix_len()))
            .sum();
        self.ring.merge_tombstone(peer, self.me);
        self.tombstone_news = u8::MAX;
        self.after_ring_change();
        Ok(taken)
    }

    // ---- gossip -----------------------------------------------------------

    /// Merges part of a peer's ring. An incompatible ring is refused and
    /// remembered as an error for status.
    pub fn merge_ring(
        &mut self,
        now: Time,
        from: PeerName,
        update: &RingUpdate,
    ) -> Result<bool, RingError> {
        if !matches!(self.mode, IpamMode::Ring(_)) {
            return Ok(false);
        }
        let adopted = match self.ring.check_compatible(update.universe, update.seed) {
            Ok(adopted) => adopted,
            Err(e) => {
                if self.ring_errors.len() < MAX_RING_ERRORS || self.ring_errors.contains_key(&from)
                {
                    self.ring_errors.insert(from, e.clone());
                }
                return Err(e);
            }
        };
        self.ring_errors.remove(&from);
        let mut changed = adopted;
        for (removed, heir) in &update.tombstones {
            if self.ring.merge_tombstone(*removed, *heir) {
                changed = true;
                self.tombstone_news = u8::MAX;
            }
        }
        for prefix in self.ring.merge_blocks(&update.blocks) {
            changed = true;
            self.ring_news.insert(prefix, u8::MAX);
        }
        if adopted {
            self.await_split(now);
        }
        if changed {
            self.after_ring_change();
        }
        Ok(changed)
    }

    /// Ring updates to push this round: the regions that changed, plus the
    /// tombstones if they did. `rounds` is how many rounds news is pushed.
    pub fn take_ring_news(&mut self, rounds: u8) -> Option<RingUpdate> {
        if self.ring_news.is_empty() && self.tombstone_news == 0 {
            return None;
        }
        let mut blocks = Vec::new();
        for (region, left) in self.ring_news.iter_mut() {
            *left = (*left).min(rounds).saturating_sub(1);
            blocks.extend(self.ring.blocks_touching(*region));
        }
        self.ring_news.retain(|_, left| *left > 0);
        blocks.sort_by_key(|b| b.prefix);
        blocks.dedup();
        let tombstones = if self.tombstone_news > 0 {
            self.tombstone_news = self.tombstone_news.min(rounds).saturating_sub(1);
            self.ring.tombstones().collect()
        } else {
            Vec::new()
        };
        Some(RingUpdate {
            universe: self.ring.universe(),
            seed: self.ring.seed(),
            blocks,
            tombstones,
        })
    }

    pub fn has_ring_news(&self) -> bool {
        !self.ring_news.is_empty() || self.tombstone_news > 0
    }

    pub fn full_ring(&self) -> RingUpdate {
        RingUpdate {
            universe: self.ring.universe(),
            seed: self.ring.seed(),
            blocks: self.ring.blocks().collect(),
            tombstones: self.ring.tombstones().collect(),
        }
    }

    pub fn ring_errors(&self) -> impl Iterator<Item = (PeerName, &RingError)> + '_ {
        self.ring_errors.iter().map(|(p, e)| (*p, e))
    }

    // ---- the periodic step ------------------------------------------------

    /// Whether [`Ipam::step`] has work that waits on time alone (seeding
    /// rounds, a paced donation, pending allocations); otherwise it only
    /// needs to run when announcements change. A settled 1,000-node
    /// cluster then skips a thousand-peer step per node per second.
    pub fn needs_timer(&self) -> bool {
        let seeding =
            matches!(self.mode, IpamMode::Ring(IpamInit::Consensus(_))) && !self.ring.is_seeded();
        seeding
            || self.donation_waiting
            || self.awaiting_split.is_some()
            || !self.pending.is_empty()
            || !self.pending_claims.is_empty()
    }

    /// Seeds, donates and completes pending allocations as the peers'
    /// announcements allow. Returns whether our announcement may have changed.
    pub fn step(
        &mut self,
        now: Time,
        peers: &BTreeMap<PeerName, PeerView>,
        targets: usize,
        rng: &mut Random,
    ) {
        if let IpamMode::Ring(init) = self.mode
            && !self.ring.is_seeded()
        {
            self.seed(now, init, peers, targets, rng);
        }
        self.donate(now, peers);
        self.complete_pending();
        if self.awaiting_split.is_some_and(|until| now >= until) || !self.announcement_waits() {
            self.awaiting_split = None;
        }
        if let Err(error) = self.check_exhausted(now, peers) {
            for container in std::mem::take(&mut self.pending) {
                self.events.push_back(IpamEvent::AllocationFailed {
                    container,
                    error: error.clone(),
                });
            }
        }
    }

    fn seed(
        &mut self,
        now: Time,
        init: IpamInit,
        peers: &BTreeMap<PeerName, PeerView>,
        targets: usize,
        rng: &mut Random,
    ) {
        let IpamInit::Consensus(expected) = init else {
            return;
        };
        if peers.values().any(|p| p.info.ring.is_some()) {
            return; // a ring exists already: it will reach us by gossip
        }
        let expected = expected.unwrap_or(targets + 1);
        if self.seeding.quorum() != seeding::quorum(expected) {
            self.seeding = Seeding::new(self.me, expected, self.seeding.state());
        }
        let states: BTreeMap<PeerName, Paxos> = peers
            .iter()
            .filter(|(_, p)| p.reachable)
            .filter_map(|(n, p)| Some((*n, p.info.seeding?)))
            .collect();
        self.seeding
            .step(now, &states, !self.pending.is_empty(), rng);
        let mut all = states;
        all.insert(self.me, self.seeding.state());
        if let Some(decision) = self.seeding.decided(&all) {
            let seed = Seed {
                id: seed_id(
                    decision.ballot.round,
                    decision.ballot.proposer,
                    decision.first_owner,
                ),
                first_owner: decision.first_owner,
            };
            self.ring = Ring::seeded(self.ring.universe(), seed);
            self.await_split(now);
            self.ring_news.insert(self.ring.universe(), u8::MAX);
            self.events.push_back(IpamEvent::RingSeeded {
                seed: seed.id,
                first_owner: seed.first_owner,
            });
            self.after_ring_change();
        }
    }

    /// Gives space to the needy peers this donor serves this step. Donors
    /// (richest first, us included) share out the needy (by name) in turn,
    /// and each gives every peer it serves an equal block at once: a ring
    /// just seeded with one owner is split among a thousand starting peers
    /// in one step, as Weave divides the range among the peers it seeds,
    /// instead of in ten rounds of doubling that each re-announce half the
    /// cluster. Each donor computes the same sharing from (nearly) the same
    /// announcements; where views differ, a peer may get two donations,
    /// which is harmless.
    fn donate(&mut self, now: Time, peers: &BTreeMap<PeerName, PeerView>) {
        self.donation_waiting = false;
        let Some(ring_id) = self.ring.seed().map(|s| s.id) else {
            return;
        };
        let free = self.free();
        if free == 0 {
            return;
        }
        let same_ring = |p: &PeerView| p.reachable && p.info.ring == Some(ring_id);
        // Right after seeding, the first owner gives every peer without
        // space its share whether it asked or not, those still without a
        // ring included: they are about to adopt ours and will need a
        // gateway, and one split spares rounds of asking (Weave divides the
        // range among the peers that seed it). Later, peers ask.
        let seeding_split = free > size_of(&[self.ring.universe()]) / 2;
        let spaceless = |p: &PeerView| {
            seeding_split
                && p.reachable
                && p.info.ring.is_none_or(|r| r == ring_id)
                && p.info.pod_cidr.is_none()
                && p.info.owned == 0
        };
        let needy: Vec<PeerName> = peers
            .iter()
            .filter(|(n, p)| {
                **n != self.me && ((same_ring(p) && p.info.wants_space) || spaceless(p))
            })
            // An announcement older than a donation we know of.
            .filter(|(n, p)| size_of(&self.ring.blocks_of(**n)) <= p.info.owned)
            .inspect(|_| self.donation_waiting = true)
            .filter(|(n, _)| {
                self.donated
                    .get(n)
                    .is_none_or(|t| now.saturating_since(*t) >= DONATION_INTERVAL)
            })
            .map(|(n, _)| *n)
            .collect();
        // While ring news is still spreading, our ring may lack a donation
        // another donor just made (a ring split arrives in many datagrams):
        // wait for it rather than give a peer space twice. The owner of the
        // whole range (the first owner, just seeded) has no one to wait
        // for: it splits at once, so the ring that spreads is the split
        // one and peers adopt it and their block in one announcement
        // instead of two (a wave of a million requests at 1,000 nodes).
        let sole_owner = self.owned() == size_of(&[self.ring.universe()]);
        if needy.is_empty()
            || (self.has_ring_news() && !sole_owner)
            || self
                .last_donation
                .is_some_and(|t| now.saturating_since(t) < DONATION_PACE)
        {
            return;
        }
        let mut donors: Vec<(u64, PeerName)> = peers
            .iter()
            .filter(|(n, p)| {
                **n != self.me && same_ring(p) && p.info.free > 0 && !p.info.wants_space
            })
            .map(|(n, p)| (p.info.free, *n))
            .chain([(free, self.me)])
            .collect();
        donors.sort_unstable_by(|a, b| b.cmp(a));
        let Some(rank) = donors.iter().position(|(_, n)| *n == self.me) else {
            return;
        };
        let served: Vec<PeerName> = needy
            .iter()
            .skip(rank)
            .step_by(donors.len())
            .copied()
            .collect();
        if served.is_empty() {
            return;
        }
        // Equal shares, the donor keeping at least one: half the space for
        // one peer, as before, a thousandth each for a thousand.
        let share = (free / (served.len() as u64 + 1)).max(1);
        let reserved = self.reserved();
        let mut own = self.own_blocks();
        for recipient in served {
            let Some(block) = self.space.largest_empty_block(&own, &reserved, share) else {
                break;
            };
            let label = Label {
                version: self.ring.max_version_in(block) + 1,
                owner: recipient,
            };
            self.ring.merge_block(Block {
                prefix: block,
                label,
            });
            self.ring_news.insert(block, u8::MAX);
            self.donated.insert(recipient, now);
            own = self.own_blocks();
        }
        self.last_donation = Some(now);
        self.after_ring_change();
    }

    fn complete_pending(&mut self) {
        for (container, addr) in std::mem::take(&mut self.pending_claims) {
            match self.try_claim(&container, addr) {
                Ok(Some(address)) => self
                    .events
                    .push_back(IpamEvent::Allocated { container, address }),
                Ok(None) => {}
                Err(error) => self
                    .events
                    .push_back(IpamEvent::AllocationFailed { container, error }),
            }
        }
        if self.pending.is_empty() {
            return;
        }
        let own = self.own_blocks();
        let reserved = self.reserved();
        // The gateway first: pods' default route needs it.
        let mut order: Vec<String> = self
            .pending
            .iter()
            .filter(|c| *c != GATEWAY_ID)
            .cloned()
            .collect();
        if self.pending.contains(GATEWAY_ID) {
            order.insert(0, GATEWAY_ID.to_string());
        }
        for container in order {
            if self.space.get(&container).is_some() {
                // An address, once given, never moves: a restored gateway
                // stays where its bridge and every pod's route have it.
                self.pending.remove(&container);
                continue;
            }
            let Some(address) = self.space.first_free(&own, &reserved) else {
                break;
            };
            self.space.insert(&container, address);
            self.pending.remove(&container);
            if container != GATEWAY_ID {
                self.events
                    .push_back(IpamEvent::Allocated { container, address });
            }
        }
    }

    /// After the ring changed: our allocations outside our space are
    /// conflicts, reported (never silently dropped).
    fn after_ring_change(&mut self) {
        self.ring_summary = self.ring.summary();
        // A lookup per allocation, not a scan of the ring: a ring of
        // thousands of blocks changes thousands of times while a cluster
        // starts.
        let outside: Vec<(String, Ipv4Addr)> = self
            .space
            .iter()
            .filter(|(_, a)| !self.owns(*a))
            .map(|(c, a)| (c.to_string(), a))
            .collect();
        for (container, address) in outside {
            if self.conflicts.insert(container.clone(), address).is_none() {
                let owner = self.ring.owner_of(address);
                self.events.push_back(IpamEvent::Conflict {
                    container,
                    address,
                    owner,
                });
            }
        }
        self.complete_pending();
    }

    fn outer_range(&self) -> Option<Ipv4Net> {
        outer_range(&self.mode, self.ring.universe())
    }

    /// Why allocations wait right now.
    pub fn pending_reason(&self, peers: &BTreeMap<PeerName, PeerView>) -> PendingReason {
        match &self.mode {
            IpamMode::NodeCidr(None) => PendingReason::AwaitingPodCidr,
            IpamMode::NodeCidr(Some(_)) => PendingReason::AwaitingDonation,
            IpamMode::Ring(IpamInit::Observer) if !self.ring.is_seeded() => {
                PendingReason::AwaitingRing
            }
            IpamMode::Ring(_) if !self.ring.is_seeded() => PendingReason::AwaitingQuorum {
                quorum: self.seeding.quorum(),
                reachable: 1 + peers
                    .values()
                    .filter(|p| p.reachable && p.info.seeding.is_some())
                    .count(),
            },
            IpamMode::Ring(_) => {
                let reachable_free = peers.values().any(|p| p.reachable && p.info.free > 0);
                if reachable_free || self.unreachable_space(peers) == 0 {
                    PendingReason::AwaitingDonation
                } else {
                    PendingReason::OwnersUnreachable
                }
            }
        }
    }

    fn unreachable_space(&self, peers: &BTreeMap<PeerName, PeerView>) -> u64 {
        peers
            .values()
            .filter(|p| !p.reachable)
            .map(|p| p.info.free)
            .sum()
    }

    /// The range is truly exhausted when we and every peer that owns part
    /// of the ring announce no free address at all, and have for a while: a
    /// donor's "free: 0" can arrive just before the donation it made to us,
    /// so one glimpse is not enough unless we own the whole ring.
    fn check_exhausted(
        &mut self,
        now: Time,
        peers: &BTreeMap<PeerName, PeerView>,
    ) -> Result<(), IpamError> {
        let IpamMode::Ring(_) = self.mode else {
            return Ok(());
        };
        if self.pending.is_empty() || !self.ring.is_complete() || self.free() > 0 {
            self.exhausted_since = None;
            return Ok(());
        }
        let owners: BTreeSet<PeerName> = self
            .ring
            .blocks()
            .map(|b| self.ring.resolve(b.label.owner))
            .collect();
        let ring = self.ring.seed().map(|s| s.id);
        let others: Vec<&PeerName> = owners.iter().filter(|o| **o != self.me).collect();
        let all_full = others.iter().all(|o| {
            peers
                .get(o)
                .is_some_and(|p| p.info.free == 0 && p.info.ring == ring)
        });
        if !all_full {
            self.exhausted_since = None;
            return Ok(());
        }
        let since = *self.exhausted_since.get_or_insert(now);
        if others.is_empty() || now.saturating_since(since) >= DONATION_INTERVAL {
            return Err(IpamError::Exhausted {
                range: self.ring.universe(),
            });
        }
        Ok(())
    }

    // ---- status -----------------------------------------------------------

    pub fn pending(&self) -> impl Iterator<Item = &str> + '_ {
        self.pending
            .iter()
            .map(String::as_str)
            .chain(self.pending_claims.keys().map(String::as_str))
    }

    pub fn conflicts(&self) -> impl Iterator<Item = (&str, Ipv4Addr)> + '_ {
        self.conflicts.iter().map(|(c, a)| (c.as_str(), *a))
    }
}

/// A part of a ring, as gossip carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingUpdate {
    pub universe: Ipv4Net,
    pub seed: Option<Seed>,
    pub blocks: Vec<Block>,
    pub tombstones: Vec<(PeerName, PeerName)>,
}

/// A container ID from a caller. The gateway's own ID has a ':', so no
/// caller can allocate, claim or release the gateway.
fn validate_container_id(id: &str) -> Result<(), IpamError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_CONTAINER_ID
        && id.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    if ok {
        Ok(())
    } else {
        Err(IpamError::InvalidContainerId(id.chars().take(64).collect()))
    }
}

/// The range a node in `mode` allocates from, once known.
fn outer_range(mode: &IpamMode, universe: Ipv4Net) -> Option<Ipv4Net> {
    match mode {
        IpamMode::Ring(_) => Some(universe),
        IpamMode::NodeCidr(cidr) => *cidr,
    }
}

/// The addresses of `range` never handed out: its network and broadcast
/// addresses.
fn reserved_in(range: Ipv4Net) -> Vec<Ipv4Addr> {
    if range.prefix_len() < 31 {
        vec![range.network(), range.broadcast()]
    } else {
        Vec::new()
    }
}

/// The ring id every learner derives from the same decision.
/// How many addresses `blocks` hold.
fn size_of(blocks: &[Ipv4Net]) -> u64 {
    blocks
        .iter()
        .map(|b| 1u64 << (32 - u32::from(b.prefix_len())))
        .sum()
}

fn seed_id(round: u64, proposer: PeerName, first_owner: PeerName) -> u64 {
    let mut h = 0x6a09_e667_f3bc_c908u64;
    for v in [round, proposer.0, first_owner.0] {
        h ^= v;
        h = h.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }
    h
}

#[cfg(test)]
mod tests;
