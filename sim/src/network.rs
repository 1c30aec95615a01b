//! The simulated underlay: latency, loss, partitions and cuts.

use crate::scenario::{Latency, Scenario};
use std::collections::BTreeSet;
use std::time::Duration;
use weft_core::random::Random;

pub struct Network {
    /// Partition group of each node; `None` everywhere when not partitioned.
    group: Option<Vec<Option<usize>>>,
    cuts: BTreeSet<(usize, usize)>,
    loss: Vec<f64>,
    latency: Vec<Latency>,
}

impl Network {
    pub fn new(scenario: &Scenario) -> Network {
        let n = scenario.nodes.len();
        Network {
            group: None,
            cuts: BTreeSet::new(),
            loss: vec![scenario.loss; n],
            latency: vec![scenario.latency; n],
        }
    }

    /// Whether `a` can reach `b` at all (partitions and cuts, not loss).
    pub fn link_up(&self, a: usize, b: usize) -> bool {
        if self.cuts.contains(&(a.min(b), a.max(b))) {
            return false;
        }
        match &self.group {
            None => true,
            Some(groups) => groups[a].is_some() && groups[a] == groups[b],
        }
    }

    /// The delay of a datagram from `from` to `to`, or `None` if it is lost.
    pub fn deliver(&self, from: usize, to: usize, rng: &mut Random) -> Option<Duration> {
        if !self.link_up(from, to) {
            return None;
        }
        let loss = self.loss[from].max(self.loss[to]);
        if loss > 0.0 && (rng.below(1_000_000) as f64) < loss * 1_000_000.0 {
            return None;
        }
        let l = self.latency[from];
        Some(rng.duration_between(l.min, l.max))
    }

    pub fn loss_rates(&self) -> &[f64] {
        &self.loss
    }

    /// The least time any datagram takes.
    pub fn least_latency(&self) -> Duration {
        self.latency.iter().map(|l| l.min).min().unwrap_or_default()
    }

    /// Latency of datagrams node `a` sends.
    pub fn latency(&self, a: usize) -> Latency {
        self.latency[a]
    }

    pub fn partition(&mut self, groups: &[Vec<usize>]) {
        let mut of = vec![None; self.loss.len()];
        for (g, members) in groups.iter().enumerate() {
            for m in members {
                of[*m] = Some(g);
            }
        }
        self.group = Some(of);
    }

    pub fn cut(&mut self, a: usize, b: usize) {
        self.cuts.insert((a.min(b), a.max(b)));
    }

    pub fn heal(&mut self) {
        self.group = None;
        self.cuts.clear();
    }

    pub fn set_loss(&mut self, rate: f64, nodes: Option<&[usize]>) {
        match nodes {
            None => self.loss.iter_mut().for_each(|l| *l = rate),
            Some(list) => list.iter().for_each(|i| self.loss[*i] = rate),
        }
    }

    pub fn set_latency(&mut self, value: Latency, nodes: Option<&[usize]>) {
        match nodes {
            None => self.latency.iter_mut().for_each(|l| *l = value),
            Some(list) => list.iter().for_each(|i| self.latency[*i] = value),
        }
    }
}
