//! Known peers we have no route to, and since when.
//!
//! A node asks "is anyone cut off for longer than d?" after every input
//! (the link reserve) and once a tick (forgetting): peers are also kept in
//! order of the time they became unreachable, so the answer is one look
//! at the oldest instead of a scan of every unreachable peer (a starting
//! 1,000-node cluster has hundreds of them, and the scan was a fifth of
//! its simulation).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::peer::PeerName;
use crate::time::Time;

#[derive(Clone, Debug, Default)]
pub struct Unreachable {
    since: BTreeMap<PeerName, Time>,
    /// The same pairs, oldest first.
    by_age: BTreeSet<(Time, PeerName)>,
}

impl Unreachable {
    /// `peer` has no route as of `now`; a peer already unreachable keeps
    /// its earlier time.
    pub fn mark(&mut self, peer: PeerName, now: Time) {
        if let std::collections::btree_map::Entry::Vacant(v) = self.since.entry(peer) {
            v.insert(now);
            self.by_age.insert((now, peer));
        }
    }

    /// `peer` is reachable again (or forgotten); whether it was unreachable.
    pub fn clear(&mut self, peer: PeerName) -> bool {
        match self.since.remove(&peer) {
            Some(at) => {
                self.by_age.remove(&(at, peer));
                true
            }
            None => false,
        }
    }

    /// Peers unreachable for at least `d` at `now`, oldest first.
    pub fn longer_than(&self, now: Time, d: Duration) -> impl Iterator<Item = PeerName> + '_ {
        // Unreachable for at least d <=> since <= now - d; before d has
        // passed since the epoch, nobody can be.
        let latest = now.since_epoch().checked_sub(d).map(Time::from_duration);
        self.by_age
            .iter()
            .take_while(move |(at, _)| latest.is_some_and(|l| *at <= l))
            .map(|(_, peer)| *peer)
    }

    /// Whether `peer` has been unreachable for at least `d` at `now`.
    pub fn is_longer_than(&self, peer: PeerName, now: Time, d: Duration) -> bool {
        self.since
            .get(&peer)
            .is_some_and(|at| now.saturating_since(*at) >= d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Time {
        Time::from_millis(ms)
    }

    #[test]
    fn the_oldest_come_first_and_only_past_the_threshold() {
        let mut u = Unreachable::default();
        u.mark(PeerName(3), at(1_000));
        u.mark(PeerName(1), at(5_000));
        u.mark(PeerName(2), at(2_000));
        // Marking again keeps the earlier time.
        u.mark(PeerName(3), at(4_000));
        let d = Duration::from_secs(3);
        let cut_off: Vec<PeerName> = u.longer_than(at(5_000), d).collect();
        assert_eq!(cut_off, vec![PeerName(3), PeerName(2)]);
        assert!(u.is_longer_than(PeerName(2), at(5_000), d));
        assert!(!u.is_longer_than(PeerName(1), at(5_000), d));
        // Too early for anyone.
        assert_eq!(u.longer_than(at(2_000), d).count(), 0);
    }

    #[test]
    fn a_cleared_peer_is_gone_from_both_views() {
        let mut u = Unreachable::default();
        u.mark(PeerName(7), at(0));
        assert!(u.clear(PeerName(7)));
        assert!(!u.clear(PeerName(7)));
        assert_eq!(u.longer_than(at(60_000), Duration::ZERO).count(), 0);
        assert!(!u.is_longer_than(PeerName(7), at(60_000), Duration::ZERO));
        // Marked again after clearing: the new time counts.
        u.mark(PeerName(7), at(50_000));
        assert_eq!(
            u.longer_than(at(60_000), Duration::from_secs(20)).count(),
            0
        );
    }
}
