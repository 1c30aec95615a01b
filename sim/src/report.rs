//! The outcome of one run: what was checked, how fast the cluster
//! converged, what gossip cost, and a hash of the whole trace.

use crate::checks::CheckOutcome;
use crate::engine::Sim;
use crate::scenario::Scenario;
use crate::trace::Trace;
use serde::Serialize;
use std::collections::BTreeSet;
use std::fmt::Write;
use weft_core::status::BytesByKind;
use weft_core::wire::MessageKind;

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub engine: &'static str,
    pub passed: bool,
    pub checks: Vec<CheckOutcome>,
    /// `unique_ips` is enforced after every step of every run.
    pub unique_ips_always: String,
    /// No node's gateway moves while it keeps the space it is in,
    /// enforced whenever a node's ring or gateway changes.
    pub stable_gateways_always: String,
    pub convergence_after_last_disruption_s: Option<f64>,
    pub gossip_bytes_per_node_per_s: u64,
    /// What each message kind cost, per running node per second of its
    /// router's life: for finding where gossip goes, not for snapshots
    /// (a restart resets a router's counters).
    #[serde(skip)]
    pub sent_by_kind: BytesByKind,
    /// The ring every running node holds, if they agree.
    pub ring_summary: Option<String>,
    pub nodes_running: usize,
    pub pods: PodCounts,
    pub trace_hash: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PodCounts {
    pub total: usize,
    pub allocated: usize,
    pub pending: usize,
    pub failed: usize,
}

/// How nodes run: `events` drives the routers from one event queue;
/// `turmoil` runs each node's driver loop as a turmoil host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    #[default]
    Events,
    Turmoil,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Events => "events",
            Engine::Turmoil => "turmoil",
        }
    }
}

/// Runs `scenario` with `seed` on `engine`.
pub fn run(scenario: &Scenario, seed: u64, engine: Engine, keep_trace: bool) -> (Report, Trace) {
    let (report, trace, _) = run_with(scenario, seed, engine, keep_trace, None);
    (report, trace)
}

/// Like [`run`], optionally capturing every datagram; also returns the
/// finished simulation for pictures of it.
pub fn run_with<'a>(
    scenario: &'a Scenario,
    seed: u64,
    engine: Engine,
    keep_trace: bool,
    capture: Option<crate::pcap::Capture>,
) -> (Report, Trace, Sim<'a>) {
    let mut sim = match engine {
        Engine::Events => {
            let mut sim = Sim::new(scenario, seed);
            sim.trace.keep = keep_trace;
            sim.capture = capture;
            sim.run();
            sim
        }
        Engine::Turmoil => {
            let mut run = crate::turmoil_engine::TurmoilSim::new(scenario, seed);
            run.sim.trace.keep = keep_trace;
            run.sim.capture = capture;
            run.run();
            run.sim
        }
    };
    let report = report(&sim, engine);
    let trace = std::mem::take(&mut sim.trace);
    (report, trace, sim)
}

fn report(sim: &Sim, engine: Engine) -> Report {
    let rings: BTreeSet<u64> = sim
        .nodes
        .iter()
        .filter_map(|n| n.router())
        .map(|r| r.ipam().ring_summary())
        .collect();
    let mut pods = PodCounts {
        total: sim.pods.len(),
        ..PodCounts::default()
    };
    for p in sim.pods.values() {
        match (p.address, &p.failed) {
            (Some(_), _) => pods.allocated += 1,
            (None, Some(_)) => pods.failed += 1,
            (None, None) => pods.pending += 1,
        }
    }
    let unique_ips_always = match &sim.uniqueness_violation {
        None => "held after every step".to_string(),
        Some((t, d)) => format!("VIOLATED at {t}: {d}"),
    };
    let stable_gateways_always = match &sim.gateway_violation {
        None => "held after every step".to_string(),
        Some((t, d)) => format!("VIOLATED at {t}: {d}"),
    };
    let mut checks = sim.outcomes.clone();
    checks.sort_by_key(|c| c.index);
    Report {
        scenario: sim.scenario.name.clone(),
        seed: sim.seed,
        engine: engine.name(),
        passed: sim.uniqueness_violation.is_none()
            && sim.gateway_violation.is_none()
            && checks.iter().all(|c| c.passed),
        checks,
        unique_ips_always,
        stable_gateways_always,
        convergence_after_last_disruption_s: sim.convergence_time().map(|d| d.as_secs_f64()),
        gossip_bytes_per_node_per_s: sim.gossip_bytes_per_node_per_s().round() as u64,
        sent_by_kind: sent_by_kind(sim),
        ring_summary: (rings.len() == 1)
            .then(|| format!("{:016x}", rings.first().copied().unwrap_or(0))),
        nodes_running: sim.nodes.iter().filter(|n| n.running()).count(),
        pods,
        trace_hash: format!("{:016x}", sim.trace.hash()),
    }
}

fn sent_by_kind(sim: &Sim) -> BytesByKind {
    let mut total = BytesByKind::default();
    let mut running = 0u64;
    for router in sim.nodes.iter().filter_map(|n| n.router()) {
        total += router.traffic().sent_bytes_by_kind;
        running += 1;
    }
    let seconds = sim.now.since_epoch().as_secs().max(1);
    for kind in MessageKind::ALL {
        total[kind] = total[kind] / running.max(1) / seconds;
    }
    total
}

impl Report {
    /// The human summary `weft-sim run` prints.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let verdict = if self.passed { "PASS" } else { "FAIL" };
        let _ = writeln!(
            s,
            "{} (seed {}, engine {}): {verdict}",
            self.scenario, self.seed, self.engine
        );
        for c in &self.checks {
            let mark = if c.passed { "ok  " } else { "FAIL" };
            let _ = writeln!(
                s,
                "  {mark} line {:>3}  {:<12} at {:<7} {}",
                c.line, c.expect, c.at, c.detail
            );
        }
        let _ = writeln!(s, "  unique_ips (always): {}", self.unique_ips_always);
        let _ = writeln!(
            s,
            "  stable_gateways (always): {}",
            self.stable_gateways_always
        );
        let convergence = self
            .convergence_after_last_disruption_s
            .map_or("not converged".to_string(), |t| format!("{t:.1}s"));
        let _ = writeln!(
            s,
            "  converged after last disruption: {convergence}; gossip {} B/s per node; {} nodes running; pods {} ({} allocated, {} pending, {} failed); trace {}",
            self.gossip_bytes_per_node_per_s,
            self.nodes_running,
            self.pods.total,
            self.pods.allocated,
            self.pods.pending,
            self.pods.failed,
            self.trace_hash
        );
        let kinds: Vec<String> = self
            .sent_by_kind
            .iter()
            .map(|(kind, b)| format!("{} {b}", kind.name()))
            .collect();
        let _ = writeln!(
            s,
            "  sent over the whole run, B/s per node: {}",
            kinds.join(", ")
        );
        s
    }
}
