//! Seeding the ring by quorum: single-decree Paxos carried by gossip.
//!
//! Every peer publishes its Paxos state (what it promised, what it
//! accepted, what it proposes) in its own gossiped entry, and reads the
//! others' from theirs, so no extra messages exist and gossip's retries do
//! the retrying. The value decided is the peer that receives the whole
//! range first; everyone who sees a quorum accept the same (ballot, value)
//! builds the very same ring from it.
//!
//! A quorum is more than half of the expected initial peers (Weave's
//! `consensus=N`), so a minority partition can never decide, and two
//! quorums always share a peer, which is what keeps two different rings
//! from being seeded.

use crate::peer::PeerName;
use crate::random::Random;
use crate::time::Time;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Ballot {
    pub round: u64,
    pub proposer: PeerName,
}

/// What a peer proposes: phase 1 (prepare) while `value` is `None`, then
/// phase 2 (accept) with the value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Proposal {
    pub ballot: Ballot,
    pub value: Option<PeerName>,
}

/// One peer's published Paxos state.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Paxos {
    pub promised: Ballot,
    pub accepted: Option<(Ballot, PeerName)>,
    pub proposal: Option<Proposal>,
}

/// A decided seeding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub ballot: Ballot,
    pub first_owner: PeerName,
}

/// This peer's part in seeding.
#[derive(Clone, Debug)]
pub struct Seeding {
    me: PeerName,
    quorum: usize,
    state: Paxos,
    /// When to (re)start a proposal if nothing was decided by then.
    next_attempt: Option<Time>,
}

/// How long a proposal may stand without a decision before a new round.
const ROUND_TIMEOUT: (Duration, Duration) = (Duration::from_secs(2), Duration::from_secs(4));
/// How long peers other than the lowest-named wait before proposing.
const LEADER_GRACE: Duration = Duration::from_secs(20);

impl Seeding {
    /// `expected_peers` is the initial cluster size the operator gave
    /// (`consensus=N`); the quorum is more than half of it.
    pub fn new(me: PeerName, expected_peers: usize, state: Paxos) -> Seeding {
        Seeding {
            me,
            quorum: quorum(expected_peers),
            state,
            next_attempt: None,
        }
    }

    pub fn quorum(&self) -> usize {
        self.quorum
    }

    /// A round's patience: gossip needs longer to reach a bigger quorum
    /// and bring its answers back.
    fn round_timeout(&self, rng: &mut Random) -> Duration {
        let scale = (self.quorum as f64 / 50.0).max(1.0);
        rng.duration_between(ROUND_TIMEOUT.0, ROUND_TIMEOUT.1)
            .mul_f64(scale)
    }

    pub fn state(&self) -> Paxos {
        self.state
    }

    /// A decision any `quorum` peers' published states already show.
    pub fn decided(&self, peers: &BTreeMap<PeerName, Paxos>) -> Option<Decision> {
        let mut votes: BTreeMap<(Ballot, PeerName), usize> = BTreeMap::new();
        for p in peers.values() {
            if let Some(a) = p.accepted {
                *votes.entry(a).or_default() += 1;
            }
        }
        votes
            .into_iter()
            .find(|(_, n)| *n >= self.quorum)
            .map(|((ballot, first_owner), _)| Decision {
                ballot,
                first_owner,
            })
    }

    /// One step given every known seeding peer's state, this peer's own
    /// included under its name (the caller passes our current state).
    /// `want_ring` says whether this peer should drive a proposal. Returns
    /// whether our published state changed.
    pub fn step(
        &mut self,
        now: Time,
        peers: &BTreeMap<PeerName, Paxos>,
        want_ring: bool,
        rng: &mut Random,
    ) -> bool {
        let before = self.state;
        let mut view = peers.clone();
        view.insert(self.me, self.state);
        self.act_as_acceptor(&view);
        view.insert(self.me, self.state);
        self.act_as_proposer(now, &view, want_ring, rng);
        self.state != before
    }

    fn act_as_acceptor(&mut self, view: &BTreeMap<PeerName, Paxos>) {
        let Some(best) = view.values().filter_map(|p| p.proposal).max() else {
            return;
        };
        match best.value {
            Some(value) if best.ballot >= self.state.promised => {
                self.state.promised = best.ballot;
                self.state.accepted = Some((best.ballot, value));
            }
            None if best.ballot > self.state.promised => self.state.promised = best.ballot,
            _ => {}
        }
    }

    fn act_as_proposer(
        &mut self,
        now: Time,
        view: &BTreeMap<PeerName, Paxos>,
        want_ring: bool,
        rng: &mut Random,
    ) {
        let highest_seen = view
            .values()
            .flat_map(|p| [Some(p.promised), p.proposal.map(|q| q.ballot)])
            .flatten()
            .max()
            .unwrap_or_default();
        if let Some(proposal) = self.state.proposal {
            if highest_seen > proposal.ballot {
                // Someone is ahead of us: stand back, retry later if needed.
                self.state.proposal = None;
                self.next_attempt = Some(now + self.round_timeout(rng));
                return;
            }
            if proposal.value.is_none() {
                self.finish_prepare(proposal.ballot, view);
            }
            if self.next_attempt.is_some_and(|t| now >= t) {
                self.state.proposal = None; // stuck: start a higher round below
            }
        }
        if self.state.proposal.is_some() {
            return;
        }
        // Only the lowest-named reachable peer proposes, for everyone who
        // wants a ring (it shows as a raised promise or a proposal): with
        // several proposers, rounds outrun gossip in a big cluster and
        // proposers duel forever, each round re-gossiping every entry.
        // Others step in only when the lowest-named peer stays idle for a
        // long while (it wants no ring itself, say), later the higher they
        // rank.
        let rank = view.keys().position(|n| *n == self.me).unwrap_or(0) as u32;
        let someone_wants = view
            .iter()
            .any(|(n, p)| *n != self.me && (p.proposal.is_some() || p.promised.round > 0));
        if !(want_ring || (rank == 0 && someone_wants)) || view.len() < self.quorum {
            return;
        }
        match self.next_attempt {
            None if rank > 0 => {
                let wait = LEADER_GRACE + ROUND_TIMEOUT.1 * rank.min(16);
                self.next_attempt =
                    Some(now + wait + rng.duration_between(Duration::ZERO, ROUND_TIMEOUT.0));
                return;
            }
            Some(t) if now < t => return,
            _ => {}
        }
        let ballot = Ballot {
            round: highest_seen.round + 1,
            proposer: self.me,
        };
        self.state.proposal = Some(Proposal {
            ballot,
            value: None,
        });
        self.next_attempt = Some(now + self.round_timeout(rng));
        // Our own promise counts at once.
        self.act_as_acceptor(&BTreeMap::from([(self.me, self.state)]));
    }

    /// Phase 1 done once a quorum promised our ballot: propose the value
    /// accepted under the highest ballot among them, or ourselves.
    fn finish_prepare(&mut self, ballot: Ballot, view: &BTreeMap<PeerName, Paxos>) {
        let promisers: Vec<&Paxos> = view.values().filter(|p| p.promised == ballot).collect();
        if promisers.len() < self.quorum {
            return;
        }
        let value = promisers
            .iter()
            .filter_map(|p| p.accepted)
            .max()
            .map_or(self.me, |(_, v)| v);
        self.state.proposal = Some(Proposal {
            ballot,
            value: Some(value),
        });
        self.act_as_acceptor(&BTreeMap::from([(self.me, self.state)]));
    }
}

/// More than half of `expected` (at least 1).
pub fn quorum(expected: usize) -> usize {
    expected / 2 + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// Runs peers that see each other's states only within their group,
    /// with random delivery: each step one peer reads a random subset of
    /// what its group published.
    fn run(groups: &[Vec<u64>], expected: usize, steps: usize, seed: u8) -> Vec<Option<Decision>> {
        let names: Vec<PeerName> = groups.iter().flatten().map(|n| PeerName(*n)).collect();
        let mut nodes: BTreeMap<PeerName, Seeding> = names
            .iter()
            .map(|n| (*n, Seeding::new(*n, expected, Paxos::default())))
            .collect();
        let group_of = |n: PeerName| groups.iter().position(|g| g.contains(&n.0));
        let mut rng = Random::from_seed([seed; 32]);
        let mut decisions = vec![None; names.len()];
        for step in 0..steps {
            let now = Time::from_millis(step as u64 * 100);
            let i = rng.below(names.len() as u64) as usize;
            let me = names[i];
            let visible: BTreeMap<PeerName, Paxos> = nodes
                .iter()
                .filter(|(n, _)| group_of(**n) == group_of(me) && rng.below(3) > 0)
                .map(|(n, s)| (*n, s.state()))
                .collect();
            let node = nodes.get_mut(&me).unwrap();
            node.step(now, &visible, true, &mut rng);
            if let Some(d) = node.decided(&visible) {
                decisions[i] = Some(d);
            }
        }
        decisions
    }

    #[test]
    fn in_a_big_cluster_only_the_lowest_named_peer_proposes() {
        let names: Vec<PeerName> = (1..=200).map(PeerName).collect();
        let mut nodes: BTreeMap<PeerName, Seeding> = names
            .iter()
            .map(|n| (*n, Seeding::new(*n, 200, Paxos::default())))
            .collect();
        let mut rng = Random::from_seed([3; 32]);
        let mut proposers = std::collections::BTreeSet::new();
        // 15 simulated seconds, every peer wanting a ring and seeing all.
        for step in 0..3000u64 {
            let me = names[(step % 200) as usize];
            let visible: BTreeMap<PeerName, Paxos> =
                nodes.iter().map(|(n, s)| (*n, s.state())).collect();
            let node = nodes.get_mut(&me).unwrap();
            node.step(Time::from_millis(step * 5), &visible, true, &mut rng);
            if let Some(p) = node.state().proposal {
                proposers.insert(p.ballot.proposer);
            }
        }
        assert_eq!(proposers.into_iter().collect::<Vec<_>>(), vec![PeerName(1)]);
        let all: BTreeMap<PeerName, Paxos> = nodes.iter().map(|(n, s)| (*n, s.state())).collect();
        assert!(nodes[&PeerName(7)].decided(&all).is_some(), "no decision");
    }

    #[test]
    fn three_peers_decide_one_first_owner() {
        let decisions = run(&[vec![1, 2, 3]], 3, 400, 1);
        let decided: BTreeSet<_> = decisions.iter().flatten().map(|d| d.first_owner).collect();
        assert_eq!(decided.len(), 1, "{decisions:?}");
        assert!(
            decisions.iter().all(Option::is_some),
            "everyone learns it: {decisions:?}"
        );
    }

    #[test]
    fn a_minority_never_decides() {
        let decisions = run(&[vec![1, 2], vec![3, 4, 5]], 5, 600, 2);
        assert!(
            decisions[0].is_none() && decisions[1].is_none(),
            "{decisions:?}"
        );
        assert!(
            decisions[2].is_some(),
            "the majority does decide: {decisions:?}"
        );
    }

    #[test]
    fn a_quorum_is_more_than_half() {
        assert_eq!(quorum(1), 1);
        assert_eq!(quorum(2), 2);
        assert_eq!(quorum(3), 2);
        assert_eq!(quorum(4), 3);
        assert_eq!(quorum(5), 3);
    }

    proptest! {
        /// Whatever the interleaving and partition, at most one value is
        /// ever decided, and a group smaller than the quorum decides nothing.
        #[test]
        fn at_most_one_value_is_decided(split in 0usize..=5, seed in any::<u8>(), steps in 50usize..500) {
            let all: Vec<u64> = (1..=5).collect();
            let groups = vec![all[..split].to_vec(), all[split..].to_vec()];
            let decisions = run(&groups, 5, steps, seed);
            let values: BTreeSet<_> = decisions.iter().flatten().map(|d| d.first_owner).collect();
            prop_assert!(values.len() <= 1, "{:?}", decisions);
            for (g, group) in groups.iter().enumerate() {
                if group.len() < quorum(5) {
                    let offset = if g == 0 { 0 } else { split };
                    for k in 0..group.len() {
                        prop_assert!(decisions[offset + k].is_none());
                    }
                }
            }
        }
    }
}
