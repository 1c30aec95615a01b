//! A small in-crate test network: several routers, one virtual clock, a
//! lossy network with cuts, crash/restart/wipe. The simulator crate has the
//! full engine; this is just enough to test the core's multi-peer behaviour.

use crate::random::Random;
use crate::router::{Event, PersistedState, Router};
use crate::time::Time;
use crate::wire::MAX_DATAGRAM;
use crate::{Config, PeerName};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

pub struct Net {
    pub now: Time,
    pub nodes: Vec<Option<Router>>,
    configs: Vec<Config>,
    saved: Vec<Option<PersistedState>>,
    peers: Vec<Vec<usize>>,
    boots: u64,
    seed: u64,
    in_flight: BTreeMap<(Time, u64), (usize, SocketAddr, Vec<u8>)>,
    seq: u64,
    rng: Random,
    pub latency: (Duration, Duration),
    pub loss: f64,
    /// Directed cuts: (from, to) datagrams are dropped.
    cuts: BTreeSet<(usize, usize)>,
    /// Every datagram handed to the network: (time, from, to, bytes).
    pub sent: Vec<(Time, usize, SocketAddr, Vec<u8>)>,
    pub events: Vec<(Time, usize, Event)>,
}

pub fn address(i: usize) -> SocketAddr {
    SocketAddr::from(([192, 168, 1, 11 + i as u8], 6783))
}

impl Net {
    /// `n` nodes, each told the addresses of all others, all started.
    pub fn new(n: usize, seed: u64, configure: impl Fn(usize, &mut Config)) -> Net {
        let peers = (0..n)
            .map(|i| (0..n).filter(|j| *j != i).collect())
            .collect();
        Net::with_peers(n, seed, peers, configure)
    }

    /// `n` nodes, node i told the addresses of `peers[i]`, all started.
    pub fn with_peers(
        n: usize,
        seed: u64,
        peers: Vec<Vec<usize>>,
        configure: impl Fn(usize, &mut Config),
    ) -> Net {
        let configs = (0..n)
            .map(|i| {
                let mut c = Config::new(format!("node{}", i + 1), address(i));
                configure(i, &mut c);
                c
            })
            .collect();
        let mut seed_bytes = [0u8; 32];
        seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let mut net = Net {
            now: Time::ZERO,
            nodes: (0..n).map(|_| None).collect(),
            configs,
            saved: vec![None; n],
            peers,
            boots: 0,
            seed,
            in_flight: BTreeMap::new(),
            seq: 0,
            rng: Random::from_seed(seed_bytes),
            latency: (Duration::from_millis(1), Duration::from_millis(5)),
            loss: 0.0,
            cuts: BTreeSet::new(),
            sent: Vec::new(),
            events: Vec::new(),
        };
        for i in 0..n {
            net.start(i);
        }
        net
    }

    pub fn start(&mut self, i: usize) {
        self.boots += 1;
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&self.seed.to_le_bytes());
        seed[8..16].copy_from_slice(&self.boots.to_le_bytes());
        // A node's configured `start_clock` is its wall clock at time zero.
        let mut config = self.configs[i].clone();
        config.start_clock += self.now.since_epoch();
        let router =
            Router::new(config, self.saved[i].take(), seed, self.now).expect("valid test config");
        self.nodes[i] = Some(router);
        for j in self.peers[i].clone() {
            self.with(i, |r, now| r.add_peer_address(now, address(j)));
        }
    }

    /// The process dies; what it persisted survives. (The agent persists
    /// after every change, before acknowledging it, so the last state is
    /// what a crash leaves.)
    pub fn crash(&mut self, i: usize) {
        if let Some(router) = self.nodes[i].take() {
            self.saved[i] = Some(router.state());
        }
    }

    pub fn restart(&mut self, i: usize) {
        self.crash(i);
        self.start(i);
    }

    pub fn wipe(&mut self, i: usize) {
        self.crash(i);
        self.saved[i] = None;
        self.start(i);
    }

    /// Crash, put back `state` (an older copy of the node's state file, as
    /// restored from a backup), start.
    pub fn restore(&mut self, i: usize, state: PersistedState) {
        self.crash(i);
        self.saved[i] = Some(state);
        self.start(i);
    }

    pub fn router(&self, i: usize) -> &Router {
        self.nodes[i].as_ref().expect("node is running")
    }

    pub fn name(&self, i: usize) -> PeerName {
        self.router(i).name()
    }

    pub fn cut(&mut self, a: usize, b: usize) {
        self.cuts.insert((a, b));
        self.cuts.insert((b, a));
    }

    pub fn cut_one_way(&mut self, from: usize, to: usize) {
        self.cuts.insert((from, to));
    }

    pub fn heal(&mut self) {
        self.cuts.clear();
    }

    /// Runs `f` on a running node, then drains its outputs.
    pub fn with(&mut self, i: usize, f: impl FnOnce(&mut Router, Time)) {
        self.call(i, f);
    }

    /// Runs `f` on node `i` if it is running, drains its outputs, and
    /// returns what `f` returned.
    pub fn call<R>(&mut self, i: usize, f: impl FnOnce(&mut Router, Time) -> R) -> Option<R> {
        let now = self.now;
        let router = self.nodes[i].as_mut()?;
        let result = f(router, now);
        let mut out = Vec::new();
        while let Some(t) = router.poll_transmit() {
            assert!(
                t.payload.len() <= MAX_DATAGRAM,
                "datagram of {} bytes",
                t.payload.len()
            );
            out.push(t);
        }
        while let Some(e) = router.poll_event() {
            self.events.push((now, i, e));
        }
        for t in out {
            self.send(i, t.destination, t.payload);
        }
        Some(result)
    }

    /// Node `i`'s configuration, to change before its next start.
    pub fn config_mut(&mut self, i: usize) -> &mut Config {
        &mut self.configs[i]
    }

    /// Cuts every link between the groups (a node in no group is isolated).
    pub fn partition(&mut self, groups: &[&[usize]]) {
        let group_of = |n: usize| groups.iter().position(|g| g.contains(&n));
        for a in 0..self.nodes.len() {
            for b in 0..self.nodes.len() {
                if a != b && (group_of(a).is_none() || group_of(a) != group_of(b)) {
                    self.cuts.insert((a, b));
                }
            }
        }
    }

    fn send(&mut self, from: usize, to: SocketAddr, payload: Vec<u8>) {
        self.sent.push((self.now, from, to, payload.clone()));
        let Some(dst) = self.configs.iter().position(|c| c.address == to) else {
            return;
        };
        if self.cuts.contains(&(from, dst)) {
            return;
        }
        if self.loss > 0.0 && (self.rng.below(1_000_000) as f64) < self.loss * 1e6 {
            return;
        }
        let delay = self.rng.duration_between(self.latency.0, self.latency.1);
        self.seq += 1;
        self.in_flight
            .insert((self.now + delay, self.seq), (from, to, payload));
    }

    /// Delivers a datagram to node `to` as if `from` had sent it.
    pub fn inject(&mut self, from: usize, to: usize, bytes: &[u8]) {
        let src = address(from);
        self.with(to, |r, now| r.handle_datagram(now, src, bytes));
    }

    /// Runs until `until`, handling deliveries and timers in time order.
    pub fn run_until(&mut self, until: Time) {
        loop {
            let next_delivery = self.in_flight.keys().next().map(|(t, _)| *t);
            let next_timer = self
                .nodes
                .iter()
                .enumerate()
                .filter_map(|(i, n)| Some((n.as_ref()?.poll_timeout()?, i)))
                .min();
            let next = match (next_delivery, next_timer) {
                (Some(d), Some((t, _))) => d.min(t),
                (Some(d), None) => d,
                (None, Some((t, _))) => t,
                (None, None) => break,
            };
            if next > until {
                break;
            }
            self.now = self.now.max(next);
            if next_delivery == Some(next) {
                let (_, (from, to, payload)) = self.in_flight.pop_first().expect("peeked");
                if let Some(dst) = self.configs.iter().position(|c| c.address == to) {
                    let src = address(from);
                    self.with(dst, |r, now| r.handle_datagram(now, src, &payload));
                }
            } else if let Some((_, i)) = next_timer {
                self.with(i, |r, now| r.handle_timeout(now));
            }
        }
        self.now = until;
    }

    pub fn run_for(&mut self, d: Duration) {
        self.run_until(self.now + d);
    }

    pub fn running(&self) -> impl Iterator<Item = (usize, &Router)> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| Some((i, n.as_ref()?)))
    }

    /// Every running node holds the same peers, versions and connections.
    pub fn converged(&self) -> bool {
        let views: BTreeSet<Vec<crate::PeerEntry>> = self
            .running()
            .map(|(_, r)| r.topology().entries().cloned().collect())
            .collect();
        views.len() == 1
    }

    pub fn established(&self, i: usize) -> Vec<PeerName> {
        let r = self.router(i);
        r.established(self.now)
    }

    /// Bytes node `i` sent in [from, to).
    pub fn bytes_sent(&self, i: usize, from: Time, to: Time) -> u64 {
        self.sent
            .iter()
            .filter(|(t, f, _, _)| *f == i && *t >= from && *t < to)
            .map(|(_, _, _, p)| p.len() as u64)
            .sum()
    }
}
