//! Direct connections to other peers, confirmed by heartbeats both ways,
//! and the addresses this node keeps trying to reach.
//!
//! A connection counts only once both ends have heard each other within the
//! dead interval: a peer's heartbeat carries `heard_you`, so each end learns
//! that its own heartbeats arrive. A one-way link (a firewall that drops one
//! direction, a peer whose replies are lost) never becomes a route.

use crate::peer::PeerName;
use crate::random::Random;
use crate::time::Time;
use crate::wire::Heartbeat;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

/// One peer this node has heard from.
#[derive(Clone, Debug)]
pub struct Link {
    pub address: SocketAddr,
    pub last_heard: Time,
    /// The peer's latest heartbeat token, echoed in ours.
    pub token: u64,
    /// Last heartbeat in which the peer echoed one of our current tokens.
    pub confirmed_at: Option<Time>,
    /// The peer's topology and ring summaries from its last heartbeat.
    pub summary: u64,
    pub ring_summary: u64,
    pub last_anti_entropy: Option<Time>,
}

impl Link {
    pub fn is_established(&self, now: Time, dead_after: Duration) -> bool {
        now.saturating_since(self.last_heard) <= dead_after
            && self
                .confirmed_at
                .is_some_and(|t| now.saturating_since(t) <= dead_after)
    }
}

/// How often a node at its connection limit looks for a peer it has no
/// route to (see `due_targets`).
const RESERVE_PACE: Duration = Duration::from_secs(1);

/// Whether a scheduled address was given by the operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Configured {
    Yes,
    No,
}

/// An address to keep connecting to: given by the operator (`configured`)
/// or learnt from gossip.
#[derive(Clone, Debug)]
pub struct Target {
    pub configured: bool,
    pub attempts: u32,
    pub next_try: Time,
}

impl Target {
    /// The next try after one more failed attempt: base·2^attempts capped
    /// at `max`, then a uniform pick in [half, all] of it, so restarted
    /// nodes do not retry in lockstep.
    fn back_off(&mut self, now: Time, base: Duration, max: Duration, rng: &mut Random) {
        let step = base
            .checked_mul(1u32 << self.attempts.min(16))
            .unwrap_or(max)
            .min(max);
        self.attempts = self.attempts.saturating_add(1);
        self.next_try = now + rng.duration_between(step / 2, step);
    }
}

/// What became of a heartbeat from a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heard {
    /// A peer not linked before: answer at once so the handshake completes
    /// in one round trip.
    NewLink,
    /// A known peer that does not know yet that we hear it: answer at once.
    Unconfirmed,
    Known,
    /// At the connection limit: the heartbeat is ignored.
    Refused,
}

#[derive(Clone, Debug, Default)]
pub struct Connections {
    links: BTreeMap<PeerName, Link>,
    /// Address -> linked peer, kept in step with `links`.
    linked: BTreeMap<SocketAddr, PeerName>,
    /// When a node at its limit looks again for a peer it has no route to.
    reserve_check: Option<Time>,
    targets: BTreeMap<SocketAddr, Target>,
    /// Unlinked targets by their next try, so that finding due ones never
    /// scans every target (thousands in a big cluster).
    schedule: BTreeSet<(Time, SocketAddr, Configured)>,
    /// Each address's entry in `schedule`.
    scheduled: BTreeMap<SocketAddr, (Time, Configured)>,
    /// Addresses that turned out to be this node itself.
    own_addresses: BTreeSet<SocketAddr>,
    /// Attempts not answered yet, until when they hold a connection slot:
    /// without this, a node in a big cluster tries every peer it learns of
    /// at once, and most of those attempts are refused at the limit.
    in_flight: BTreeMap<SocketAddr, Time>,
    /// Addresses of peers we have a route to and that announce free
    /// slots: tried before the others, which are likely full or gone.
    open: BTreeSet<SocketAddr>,
}

/// State of one connection as shown in status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    /// Both ends hear each other: the link carries routes.
    Established,
    /// We hear the peer, but it has not confirmed hearing us.
    Pending,
}

impl Connections {
    pub fn link(&self, peer: PeerName) -> Option<&Link> {
        self.links.get(&peer)
    }

    pub fn link_mut(&mut self, peer: PeerName) -> Option<&mut Link> {
        self.links.get_mut(&peer)
    }

    pub fn links(&self) -> impl Iterator<Item = (PeerName, &Link)> + '_ {
        self.links.iter().map(|(p, l)| (*p, l))
    }

    pub fn link_count(&self) -> usize {
        self.links.len()
    }

    pub fn target_count(&self) -> usize {
        self.targets.len()
    }

    pub fn targets(&self) -> impl Iterator<Item = (SocketAddr, &Target)> + '_ {
        self.targets.iter().map(|(a, t)| (*a, t))
    }

    pub fn established(&self, now: Time, dead_after: Duration) -> Vec<PeerName> {
        self.links
            .iter()
            .filter(|(_, l)| l.is_established(now, dead_after))
            .map(|(p, _)| *p)
            .collect()
    }

    /// Records a heartbeat from `peer` at `address`.
    pub fn heard(
        &mut self,
        now: Time,
        peer: PeerName,
        address: SocketAddr,
        heartbeat: &Heartbeat,
        heard_you: bool,
        conn_limit: usize,
    ) -> Heard {
        let (token, summary) = (heartbeat.token, heartbeat.topology_summary);
        // A wiped node comes back at the same address under a new name: the
        // old link is gone for good, not merely silent.
        if let Some(old) = self.linked.get(&address).copied()
            && old != peer
        {
            self.links.remove(&old);
            self.linked.remove(&address);
        }
        let mut moved_from = None;
        let at_limit = self.links.len() >= conn_limit;
        let outcome = match self.links.get_mut(&peer) {
            Some(link) => {
                if link.address != address {
                    self.linked.remove(&link.address);
                    moved_from = Some(link.address);
                    link.address = address;
                }
                if link.confirmed_at.is_some() || heard_you {
                    Heard::Known
                } else {
                    Heard::Unconfirmed
                }
            }
            None if at_limit => {
                self.in_flight.remove(&address);
                return Heard::Refused;
            }
            None => {
                self.links.insert(
                    peer,
                    Link {
                        address,
                        last_heard: now,
                        token,
                        confirmed_at: None,
                        summary,
                        ring_summary: heartbeat.ring_summary,
                        last_anti_entropy: None,
                    },
                );
                Heard::NewLink
            }
        };
        if self.linked.insert(address, peer) != Some(peer) {
            self.reschedule(address);
        }
        if let Some(old) = moved_from {
            self.reschedule(old);
        }
        if let Some(link) = self.links.get_mut(&peer) {
            link.last_heard = now;
            link.token = token;
            link.summary = summary;
            link.ring_summary = heartbeat.ring_summary;
            if heard_you {
                link.confirmed_at = Some(now);
            }
        }
        if let Some(target) = self.targets.get_mut(&address) {
            target.attempts = 0;
        }
        self.in_flight.remove(&address);
        outcome
    }

    /// `peer` at `address` refused a link with us (it is at its limit):
    /// drop our side, and try the address again after the next backoff
    /// step rather than at once.
    pub fn refused_by(
        &mut self,
        now: Time,
        peer: PeerName,
        address: SocketAddr,
        base: Duration,
        max: Duration,
        rng: &mut Random,
    ) {
        if self.links.get(&peer).is_some_and(|l| l.address == address) {
            self.links.remove(&peer);
            self.linked.remove(&address);
        }
        self.in_flight.remove(&address);
        if let Some(target) = self.targets.get_mut(&address)
            && target.next_try <= now
        {
            target.back_off(now, base, max, rng);
        }
        self.reschedule(address);
    }

    /// A link that can go without cutting its peer off from us: an
    /// established one whose peer still reaches another of our established
    /// peers without it, over links that both ends list (`links_of`; `me`
    /// is this node). Of those, one of the peers with the most links (it
    /// loses least), at random among equals.
    pub fn redundant_link<'a>(
        &self,
        me: PeerName,
        now: Time,
        dead_after: Duration,
        links_of: impl Fn(PeerName) -> Option<&'a [PeerName]>,
        rng: &mut Random,
    ) -> Option<PeerName> {
        let ours: BTreeSet<PeerName> = self.established(now, dead_after).into_iter().collect();
        let mut ranked: Vec<(usize, u64, PeerName)> = ours
            .iter()
            .map(|p| (links_of(*p).map_or(0, <[_]>::len), rng.next_u64(), *p))
            .collect();
        ranked.sort_unstable_by(|a, b| b.cmp(a));
        ranked
            .into_iter()
            .map(|(_, _, peer)| peer)
            .find(|peer| has_way_around(me, *peer, &ours, &links_of))
    }

    /// Ends our link with `peer` (its address becomes a target to try
    /// again like any other), returning what it was.
    pub fn drop_link(&mut self, peer: PeerName) -> Option<Link> {
        let link = self.links.remove(&peer)?;
        self.linked.remove(&link.address);
        self.reschedule(link.address);
        Some(link)
    }

    /// Drops links silent for longer than `dead_after`; their addresses are
    /// retried from the first backoff step.
    pub fn expire(&mut self, now: Time, dead_after: Duration) -> Vec<PeerName> {
        let dead: Vec<PeerName> = self
            .links
            .iter()
            .filter(|(_, l)| now.saturating_since(l.last_heard) > dead_after)
            .map(|(p, _)| *p)
            .collect();
        for peer in &dead {
            if let Some(link) = self.links.remove(peer)
                && self.linked.remove(&link.address).is_some()
            {
                if let Some(target) = self.targets.get_mut(&link.address) {
                    target.attempts = 0;
                    target.next_try = now;
                }
                self.reschedule(link.address);
            }
        }
        dead
    }

    /// This node reached itself at `address`: never try it again.
    pub fn is_own_address(&mut self, address: SocketAddr) {
        self.own_addresses.insert(address);
        self.targets.remove(&address);
        self.reschedule(address);
    }

    pub fn add_target(&mut self, now: Time, address: SocketAddr, configured: bool) {
        if self.own_addresses.contains(&address) {
            return;
        }
        let known = self.targets.contains_key(&address);
        let target = self.targets.entry(address).or_insert(Target {
            configured,
            attempts: 0,
            next_try: now,
        });
        target.configured |= configured;
        if !known {
            self.reschedule(address);
        }
    }

    pub fn remove_target(&mut self, address: SocketAddr) {
        self.targets.remove(&address);
        self.in_flight.remove(&address);
        self.reschedule(address);
    }

    /// Keeps the gossip-learnt targets equal to `addresses` (configured
    /// targets stay whatever gossip says).
    pub fn sync_learnt_targets(&mut self, now: Time, addresses: &BTreeSet<SocketAddr>) {
        let dropped: Vec<SocketAddr> = self
            .targets
            .iter()
            .filter(|(a, t)| !t.configured && !addresses.contains(a))
            .map(|(a, _)| *a)
            .collect();
        for address in dropped {
            self.remove_target(address);
        }
        for address in addresses {
            self.add_target(now, *address, false);
        }
    }

    /// Sets the addresses of peers known to be up with free slots.
    pub fn set_open(&mut self, open: BTreeSet<SocketAddr>) {
        self.open = open;
    }

    /// Addresses to try now: due, not linked, at most as many as free
    /// connection slots (unanswered attempts hold theirs): open ones
    /// first (see [`Connections::set_open`]), then configured ones, each
    /// group in random order.
    ///
    /// At the limit, one address of `reserve` (peers with no route) may be
    /// tried while no other attempt is in flight.
    pub fn due_targets(
        &mut self,
        now: Time,
        conn_limit: usize,
        reserve: &BTreeSet<SocketAddr>,
        rng: &mut Random,
    ) -> Vec<SocketAddr> {
        self.in_flight.retain(|_, until| *until > now);
        let slots = conn_limit.saturating_sub(self.links.len() + self.in_flight.len());
        if slots == 0 {
            // Paced, and spread out in a big cluster: when a partition
            // heals, every node has a reserve slot and peers without a
            // route, but a few links across join the halves, and every
            // further one changes two entries that all must learn (a
            // thousand nodes linking across at once took three seconds to
            // settle).
            let pace = RESERVE_PACE.mul_f64((self.targets.len() as f64 / 10.0).max(1.0));
            self.reserve_check = Some(now + rng.duration_between(pace / 2, pace));
            if !self.in_flight.is_empty() || reserve.is_empty() {
                return Vec::new();
            }
            let due: Vec<SocketAddr> = self
                .schedule
                .iter()
                .take_while(|(at, _, _)| *at <= now)
                .map(|(_, a, _)| *a)
                .filter(|a| reserve.contains(a))
                .collect();
            return rng.pick(&due, 1);
        }
        // One pass over what is due, no lookups: a starting node of a
        // 1,000-node cluster has ~1,000 addresses due and looks again after
        // every refusal.
        let (mut open, mut configured, mut learnt) = (Vec::new(), Vec::new(), Vec::new());
        for (_, address, kind) in self.schedule.iter().take_while(|(at, _, _)| *at <= now) {
            match kind {
                _ if self.open.contains(address) => open.push(*address),
                Configured::Yes => configured.push(*address),
                Configured::No => learnt.push(*address),
            }
        }
        let mut chosen = rng.pick(&open, slots);
        for group in [configured, learnt] {
            let rest = slots - chosen.len();
            chosen.extend(rng.pick(&group, rest));
        }
        chosen
    }

    /// Schedules the next attempt at `address` with jittered exponential
    /// backoff: base·2^attempts capped at `max`, then a uniform pick in
    /// [half, all] of it, so restarted nodes do not retry in lockstep.
    pub fn attempted(
        &mut self,
        now: Time,
        address: SocketAddr,
        base: Duration,
        max: Duration,
        rng: &mut Random,
    ) {
        if let Some(target) = self.targets.get_mut(&address) {
            target.back_off(now, base, max, rng);
            self.in_flight.insert(address, now + base);
        }
        self.reschedule(address);
    }

    /// Tries `address` again within a second (jittered), from the first
    /// backoff step, if it is an unlinked target.
    pub fn retry_soon(&mut self, now: Time, address: SocketAddr, rng: &mut Random) {
        if self.linked.contains_key(&address) {
            return;
        }
        if let Some(target) = self.targets.get_mut(&address) {
            target.attempts = 0;
            let soon = now + rng.duration_between(Duration::ZERO, Duration::from_secs(1));
            target.next_try = target.next_try.min(soon);
            self.reschedule(address);
        }
    }

    /// Puts `address` in the attempt schedule at its next try if it is an
    /// unlinked target, and takes it out otherwise.
    fn reschedule(&mut self, address: SocketAddr) {
        if let Some((at, kind)) = self.scheduled.remove(&address) {
            self.schedule.remove(&(at, address, kind));
        }
        if let Some(target) = self.targets.get(&address)
            && !self.linked.contains_key(&address)
        {
            let kind = if target.configured {
                Configured::Yes
            } else {
                Configured::No
            };
            self.schedule.insert((target.next_try, address, kind));
            self.scheduled.insert(address, (target.next_try, kind));
        }
    }

    /// When the next attempt is due: the earliest scheduled target while
    /// slots are free. `reserve_open`: some known peer has no route, and a
    /// reserve link is free for it.
    pub fn next_attempt(&self, conn_limit: usize, reserve_open: bool) -> Option<Time> {
        if self.links.len() >= conn_limit {
            reserve_open.then(|| self.reserve_check.unwrap_or(Time::ZERO))
        } else if self.links.len() + self.in_flight.len() >= conn_limit {
            // Unanswered attempts hold the free slots: look again when the
            // first of them lapses.
            self.in_flight.values().min().copied()
        } else {
            self.schedule.first().map(|(at, _, _)| *at)
        }
    }

    pub fn state_of(&self, peer: PeerName, now: Time, dead_after: Duration) -> Option<LinkState> {
        self.links.get(&peer).map(|l| {
            if l.is_established(now, dead_after) {
                LinkState::Established
            } else {
                LinkState::Pending
            }
        })
    }
}

/// Whether `peer` reaches one of `ours` (our neighbours) other than
/// itself without its link to `me`, over links both ends list. Searched
/// breadth first, so in a dense cluster it stops a hop or two away.
fn has_way_around<'a>(
    me: PeerName,
    peer: PeerName,
    ours: &BTreeSet<PeerName>,
    links_of: &impl Fn(PeerName) -> Option<&'a [PeerName]>,
) -> bool {
    let mut seen = BTreeSet::from([me, peer]);
    let mut queue = std::collections::VecDeque::from([peer]);
    while let Some(at) = queue.pop_front() {
        for &next in links_of(at).unwrap_or_default() {
            let mutual = || links_of(next).is_some_and(|l| l.binary_search(&at).is_ok());
            if seen.contains(&next) || !mutual() {
                continue;
            }
            if ours.contains(&next) {
                return true;
            }
            seen.insert(next);
            queue.push_back(next);
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEAD: Duration = Duration::from_secs(5);
    const HB: Heartbeat = Heartbeat {
        token: 0,
        echo: None,
        topology_summary: 0,
        ring_summary: 0,
        probe: false,
        refused: false,
        alone: false,
    };

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([192, 168, 1, i], 6783))
    }

    #[test]
    fn a_link_is_established_only_when_both_ends_hear() {
        let mut c = Connections::default();
        let t0 = Time::ZERO;
        assert_eq!(
            c.heard(t0, PeerName(2), addr(2), &HB, false, 100),
            Heard::NewLink
        );
        assert!(c.established(t0, DEAD).is_empty(), "one-way so far");
        assert_eq!(
            c.heard(t0, PeerName(2), addr(2), &HB, true, 100),
            Heard::Known
        );
        assert_eq!(c.established(t0, DEAD), vec![PeerName(2)]);
        // Still heard, but the peer stopped confirming us: not established.
        let t6 = Time::from_millis(6000);
        c.heard(t6, PeerName(2), addr(2), &HB, false, 100);
        assert!(c.established(t6, DEAD).is_empty());
    }

    #[test]
    fn silent_links_expire_and_their_address_is_retried() {
        let mut c = Connections::default();
        c.add_target(Time::ZERO, addr(2), true);
        c.heard(Time::ZERO, PeerName(2), addr(2), &HB, true, 100);
        assert!(c.expire(Time::from_millis(5000), DEAD).is_empty());
        assert_eq!(c.expire(Time::from_millis(5001), DEAD), vec![PeerName(2)]);
        let mut rng = Random::from_seed([0; 32]);
        assert_eq!(
            c.due_targets(Time::from_millis(5001), 100, &BTreeSet::new(), &mut rng),
            vec![addr(2)]
        );
    }

    #[test]
    fn peers_known_up_with_free_slots_are_tried_first() {
        let mut c = Connections::default();
        for i in 2..40 {
            c.add_target(Time::ZERO, addr(i), i % 2 == 0);
        }
        // Two open peers among 38 due addresses, configured or not.
        c.set_open(BTreeSet::from([addr(7), addr(20)]));
        for seed in 0..20 {
            let mut rng = Random::from_seed([seed; 32]);
            let mut chosen = c.due_targets(Time::ZERO, 3, &BTreeSet::new(), &mut rng);
            assert_eq!(chosen.len(), 3);
            let third = chosen.pop();
            chosen.sort();
            assert_eq!(chosen, vec![addr(7), addr(20)], "seed {seed}");
            // Then configured addresses (the even ones), as before.
            let configured =
                |a: SocketAddr| matches!(a, SocketAddr::V4(v) if v.ip().octets()[3] % 2 == 0);
            assert!(third.is_some_and(configured), "seed {seed}: {third:?}");
        }
    }

    #[test]
    fn the_connection_limit_refuses_new_peers() {
        let mut c = Connections::default();
        assert_eq!(
            c.heard(Time::ZERO, PeerName(2), addr(2), &HB, false, 1),
            Heard::NewLink
        );
        assert_eq!(
            c.heard(Time::ZERO, PeerName(3), addr(3), &HB, false, 1),
            Heard::Refused
        );
        let mut rng = Random::from_seed([0; 32]);
        c.add_target(Time::ZERO, addr(4), true);
        assert!(
            c.due_targets(Time::ZERO, 1, &BTreeSet::new(), &mut rng)
                .is_empty(),
            "no free slot"
        );
    }

    #[test]
    fn unanswered_attempts_hold_their_slots_until_they_lapse() {
        let mut c = Connections::default();
        let mut rng = Random::from_seed([1; 32]);
        let (base, max) = (Duration::from_secs(1), Duration::from_secs(30));
        for i in 2..12 {
            c.add_target(Time::ZERO, addr(i), false);
        }
        let first = c.due_targets(Time::ZERO, 3, &BTreeSet::new(), &mut rng);
        assert_eq!(first.len(), 3);
        for a in &first {
            c.attempted(Time::ZERO, *a, base, max, &mut rng);
        }
        assert_eq!(c.next_attempt(3, false), Some(Time::from_millis(1000)));
        assert!(
            c.due_targets(Time::from_millis(999), 3, &BTreeSet::new(), &mut rng)
                .is_empty()
        );
        // One answers (a link), one is refused: one slot is free again.
        c.heard(Time::from_millis(10), PeerName(99), first[0], &HB, false, 3);
        assert_eq!(
            c.due_targets(Time::from_millis(20), 3, &BTreeSet::new(), &mut rng)
                .len(),
            0
        );
        c.heard(Time::from_millis(30), PeerName(98), first[1], &HB, false, 1);
        assert_eq!(
            c.due_targets(Time::from_millis(40), 3, &BTreeSet::new(), &mut rng)
                .len(),
            1
        );
        // The last lapses unanswered after a base interval.
        assert_eq!(
            c.due_targets(Time::from_millis(1000), 3, &BTreeSet::new(), &mut rng)
                .len(),
            2
        );
    }

    /// `(peer, its links)` as `links_of` sees them.
    fn lists(lists: &[(u64, &[u64])]) -> impl Fn(PeerName) -> Option<&'static [PeerName]> + use<> {
        let map: BTreeMap<PeerName, &'static [PeerName]> = lists
            .iter()
            .map(|(p, l)| {
                let l: Vec<PeerName> = l.iter().copied().map(PeerName).collect();
                (PeerName(*p), &*Vec::leak(l))
            })
            .collect();
        move |p| map.get(&p).copied()
    }

    #[test]
    fn only_a_link_whose_peer_has_a_way_around_it_is_redundant() {
        // We (0) link with 2, 3 and 4.
        let mut c = Connections::default();
        for i in [2, 3, 4] {
            c.heard(Time::ZERO, PeerName(i), addr(i as u8), &HB, true, 3);
        }
        let pick = |links_of, seed| {
            let mut rng = Random::from_seed([seed; 32]);
            c.redundant_link(PeerName(0), Time::ZERO, DEAD, links_of, &mut rng)
        };
        // 2 and 3 link with each other, 3 also with 7; 4 only with 5,
        // which links with nobody else: 3 has the most links to lose.
        let triangle = [
            (2, &[0, 3][..]),
            (3, &[0, 2, 7]),
            (4, &[0, 5]),
            (5, &[4]),
            (7, &[3]),
        ];
        for seed in 0..10 {
            assert_eq!(pick(lists(&triangle), seed), Some(PeerName(3)));
        }
        // The way around may be long: 2 - 5 - 6 - 3. Never 4.
        let ring = [
            (2, &[0, 5][..]),
            (3, &[0, 6]),
            (4, &[0]),
            (5, &[2, 6]),
            (6, &[3, 5]),
        ];
        let picks: BTreeSet<Option<PeerName>> = (0..20).map(|s| pick(lists(&ring), s)).collect();
        assert_eq!(
            picks,
            BTreeSet::from([Some(PeerName(2)), Some(PeerName(3))])
        );
        // A link one end does not list is no way around: 2 claims 3, but
        // 3 does not claim 2.
        let one_way = [(2, &[0, 3][..]), (3, &[0, 7]), (7, &[3])];
        assert_eq!(pick(lists(&one_way), 0), None);

        let dropped = c.drop_link(PeerName(3)).map(|l| l.address);
        assert_eq!(dropped, Some(addr(3)));
        assert!(c.link(PeerName(3)).is_none());
        assert_eq!(c.link_count(), 2);
    }

    #[test]
    fn a_new_name_at_a_known_address_replaces_the_old_link() {
        let mut c = Connections::default();
        c.heard(Time::ZERO, PeerName(2), addr(2), &HB, true, 100);
        c.heard(Time::ZERO, PeerName(9), addr(2), &HB, false, 100);
        assert!(c.link(PeerName(2)).is_none());
        assert!(c.link(PeerName(9)).is_some());
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let mut c = Connections::default();
        let mut rng = Random::from_seed([3; 32]);
        c.add_target(Time::ZERO, addr(2), true);
        let (base, max) = (Duration::from_secs(1), Duration::from_secs(30));
        let mut delays = Vec::new();
        for _ in 0..10 {
            c.attempted(Time::ZERO, addr(2), base, max, &mut rng);
            delays.push(c.targets[&addr(2)].next_try.since_epoch());
        }
        for (i, d) in delays.iter().enumerate() {
            let step = (base * (1 << i.min(16))).min(max);
            assert!(
                *d >= step / 2 && *d <= step,
                "attempt {i}: {d:?} not in [{:?}, {step:?}]",
                step / 2
            );
        }
        assert!(delays[9] <= max);
    }
}
