//! The discrete-event engine: every node's weft-core router driven through
//! its sans-IO API from one seeded event queue; virtual time jumps to the
//! next delivery, timer or scenario event.

use crate::checks::{self, CheckOutcome};
use crate::network::Network;
use crate::scenario::{Action, CheckAt, EventDef, IpamKind, Scenario};
use crate::trace::Trace;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use weft_core::ipam::{Allocation, IpamEvent, IpamInit, IpamMode};
use weft_core::random::Random;
use weft_core::{Config, Event, PersistedState, Router, Time, Transmit};
use weft_driver::SharedRouter;

pub const PORT: u16 = 6783;

/// One simulated node: the router while it runs, what it persisted.
pub struct SimNode {
    pub name: String,
    pub address: SocketAddr,
    /// The router while the node runs; shared with the driver loop in the
    /// turmoil engine.
    pub shared: Option<SharedRouter>,
    saved: Option<PersistedState>,
    /// The copy of `saved` the last `backup` event took.
    pub(crate) backup: Option<PersistedState>,
    boots: u64,
    pub removed: bool,
    /// The queue key of the node's pending timer.
    pub(crate) timer: Option<(Time, u64)>,
}

impl SimNode {
    /// The running node's router.
    pub fn router(&self) -> Option<MutexGuard<'_, Router>> {
        self.shared.as_ref().map(weft_driver::lock)
    }

    pub fn running(&self) -> bool {
        self.shared.is_some()
    }

    /// What the node persisted last.
    pub(crate) fn saved_mut(&mut self) -> &mut Option<PersistedState> {
        &mut self.saved
    }
}

/// The RNG seed of node `i`'s router in its `boots`-th start.
pub(crate) fn router_seed(scenario_seed: u64, i: usize, boots: u64) -> [u8; 32] {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&scenario_seed.to_le_bytes());
    seed[8..16].copy_from_slice(&(i as u64).to_le_bytes());
    seed[16..24].copy_from_slice(&boots.to_le_bytes());
    seed
}

/// The peers node `i` is configured with.
pub(crate) fn peer_addresses(scenario: &Scenario, i: usize) -> Vec<SocketAddr> {
    scenario.nodes[i]
        .peers
        .of(i, scenario.nodes.len())
        .map(|p| SocketAddr::from((scenario.nodes[p].address, PORT)))
        .collect()
}

/// A simulated pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub node: usize,
    pub address: Option<Ipv4Addr>,
    pub failed: Option<String>,
}

#[derive(Debug)]
pub(crate) enum Step {
    Deliver {
        from: usize,
        to: usize,
        bytes: Vec<u8>,
    },
    Timer(usize),
    Scenario(usize),
    Check(usize),
    Reclaim {
        removed: usize,
        name: weft_core::PeerName,
    },
    Sample,
}

/// The event queue: steps by due time, then by the order they were
/// scheduled in (`seq`, unique, so the order is total and runs are
/// deterministic).
#[derive(Debug, Default)]
pub(crate) struct Queue {
    /// Every step but node timers: a binary heap, as a 1,000-node run
    /// pushes and pops millions of datagrams.
    heap: std::collections::BinaryHeap<Queued>,
    /// Each running node's one pending timer, apart: every input re-arms
    /// the node's timer, and replacing the entry keeps this small where
    /// leaving superseded ones in the heap made it hold hundreds of
    /// thousands of dead entries.
    timers: BTreeMap<(Time, u64), usize>,
}

#[derive(Debug)]
struct Queued {
    at: Time,
    seq: u64,
    step: Step,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Queued {}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Queued {
    /// Reversed, so that the max-heap yields the earliest (time, seq) first;
    /// `seq` is unique, so the order is total and the run deterministic.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl Queue {
    fn push(&mut self, at: Time, seq: u64, step: Step) {
        self.heap.push(Queued { at, seq, step });
    }

    /// Arms `node`'s timer at `key`, replacing its pending one.
    fn arm(&mut self, node: usize, pending: Option<(Time, u64)>, key: (Time, u64)) {
        self.disarm(pending);
        self.timers.insert(key, node);
    }

    fn disarm(&mut self, pending: Option<(Time, u64)>) {
        if let Some(key) = pending {
            self.timers.remove(&key);
        }
    }

    /// Removes the first step if it is due by `until`: whichever of the
    /// first timer and the heap's first step comes first.
    pub(crate) fn pop_due(&mut self, until: Time) -> Option<(Time, Step)> {
        let timer = self.timers.first_key_value().map(|(k, _)| *k);
        let other = self.heap.peek().map(|q| (q.at, q.seq));
        match (timer, other) {
            (Some(t), o) if o.is_none_or(|o| t < o) => {
                if t.0 > until {
                    return None;
                }
                let (_, node) = self.timers.pop_first()?;
                Some((t.0, Step::Timer(node)))
            }
            (_, Some(o)) if o.0 <= until => self.heap.pop().map(|q| (q.at, q.step)),
            _ => None,
        }
    }
}

/// What a router asks of its surroundings after an input (the core's
/// calling rule: drain it all).
pub(crate) struct Outputs {
    pub transmits: Vec<Transmit>,
    pub events: Vec<Event>,
    pub timeout: Option<Time>,
}

impl Outputs {
    pub(crate) fn drain(router: &mut Router) -> Outputs {
        let mut transmits = Vec::new();
        while let Some(t) = router.poll_transmit() {
            transmits.push(t);
        }
        let mut events = Vec::new();
        while let Some(e) = router.poll_event() {
            events.push(e);
        }
        Outputs {
            transmits,
            events,
            timeout: router.poll_timeout(),
        }
    }
}

/// What the invariants watch of a node: its ring summary, its own blocks
/// and its gateway, read again when the summary or the gateway changed.
#[derive(Clone, Debug)]
pub(crate) struct Holding {
    pub summary: u64,
    pub blocks: Vec<ipnet::Ipv4Net>,
    pub gateway: Option<Ipv4Addr>,
}

/// The ring summary and gateway the simulator last read from a node.
pub(crate) type Known = (Option<u64>, Option<Ipv4Addr>);

/// The node's holding, if its ring summary or gateway is not `known`.
pub(crate) fn holding_change(known: Known, router: &Router) -> Option<Holding> {
    let (summary, gateway) = (router.ipam().ring_summary(), router.gateway());
    (known != (Some(summary), gateway)).then(|| Holding {
        summary,
        blocks: router.ipam().own_blocks(),
        gateway,
    })
}

impl Queue {
    /// Removes the first step if it is a node's (a delivery or a timer)
    /// due before `before` and by `until`, with its sequence number.
    pub(crate) fn pop_node_step(&mut self, before: Time, until: Time) -> Option<(Time, u64, Step)> {
        let timer = self.timers.first_key_value().map(|(k, _)| *k);
        let other = self.heap.peek().map(|q| (q.at, q.seq));
        let first = match (timer, other) {
            (Some(t), Some(o)) => t.min(o),
            (t, o) => t.or(o)?,
        };
        if first.0 >= before || first.0 > until {
            return None;
        }
        if timer == Some(first) {
            let (_, node) = self.timers.pop_first()?;
            return Some((first.0, first.1, Step::Timer(node)));
        }
        if !matches!(self.heap.peek()?.step, Step::Deliver { .. }) {
            return None;
        }
        self.heap.pop().map(|q| (q.at, q.seq, q.step))
    }

    /// When the first step is due.
    pub(crate) fn first_due(&self) -> Option<Time> {
        let timer = self.timers.first_key_value().map(|(k, _)| k.0);
        let other = self.heap.peek().map(|q| q.at);
        match (timer, other) {
            (Some(t), Some(o)) => Some(t.min(o)),
            (t, o) => t.or(o),
        }
    }
}

pub use crate::samples::TRAFFIC_WINDOW;
use crate::samples::{SAMPLE, Samples};

pub struct Sim<'a> {
    pub scenario: &'a Scenario,
    pub seed: u64,
    pub now: Time,
    pub nodes: Vec<SimNode>,
    pub pods: BTreeMap<String, Pod>,
    /// Deletions waiting for a node to come back (kubelet retries DEL).
    pub(crate) releases: BTreeMap<usize, BTreeSet<String>>,
    pub(crate) queue: Queue,
    seq: u64,
    rng: Random,
    pub network: Network,
    pub trace: Trace,
    /// Bytes each node sent, cumulative, sampled every `SAMPLE`.
    pub sent: Vec<u64>,
    /// Traffic and agreement over time, and the last disruption.
    pub samples: Samples,
    pub outcomes: Vec<CheckOutcome>,
    /// First violation of address uniqueness, if any.
    pub uniqueness_violation: Option<(Time, String)>,
    /// Each node's gateway as last read, kept while it is down.
    pub gateways: Vec<Option<Ipv4Addr>>,
    /// First gateway that moved while its node kept its space, if any.
    pub gateway_violation: Option<(Time, String)>,
    /// Each running node's own blocks, and the ring summary they were
    /// read at (re-read only when the ring changed).
    pub owned: Vec<(Option<u64>, Vec<ipnet::Ipv4Net>)>,
    /// Ownership or pod addresses changed since uniqueness was checked.
    pub(crate) unique_dirty: bool,
    /// Peer name -> node, for every name a node has had.
    names: BTreeMap<weft_core::PeerName, usize>,
    /// The event being told, reused (see `on_event`).
    describing: String,
    /// Underlay address -> node.
    by_address: BTreeMap<SocketAddr, usize>,
    /// Every datagram sent, when `--pcap` asks for it.
    pub capture: Option<crate::pcap::Capture>,
    /// The nodes' kernels, where the engine programs them (turmoil):
    /// probes then follow their routes, else the routers' `forward()`.
    pub kernels: Option<crate::kernel::Kernels>,
    /// Whether node steps may run in lookahead windows (see `window`):
    /// not when an `always` check other than `unique_ips` reads the
    /// routers after every step.
    pub(crate) windows: bool,
    /// Fewest steps in a window run on two threads, and how many were.
    pub(crate) parallel_from: usize,
    pub(crate) parallel_windows: u64,
    /// The thread that takes half of each big window (`None` inside: none
    /// could be started).
    pub(crate) helper: Option<Option<crate::window::Helper>>,
}

impl<'a> Sim<'a> {
    pub fn new(scenario: &'a Scenario, seed: u64) -> Sim<'a> {
        let nodes = scenario
            .nodes
            .iter()
            .map(|n| SimNode {
                name: n.name.clone(),
                address: SocketAddr::from((n.address, PORT)),
                shared: None,
                saved: None,
                backup: None,
                boots: 0,
                removed: false,
                timer: None,
            })
            .collect();
        let mut seed_bytes = [0u8; 32];
        seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
        seed_bytes[8..16].copy_from_slice(b"network!");
        let mut sim = Sim {
            scenario,
            seed,
            now: Time::ZERO,
            nodes,
            pods: BTreeMap::new(),
            releases: BTreeMap::new(),
            queue: Queue::default(),
            seq: 0,
            rng: Random::from_seed(seed_bytes),
            network: Network::new(scenario),
            trace: Trace::default(),
            sent: vec![0; scenario.nodes.len()],
            samples: Samples::default(),
            outcomes: Vec::new(),
            uniqueness_violation: None,
            gateways: vec![None; scenario.nodes.len()],
            gateway_violation: None,
            owned: vec![(None, Vec::new()); scenario.nodes.len()],
            unique_dirty: false,
            names: BTreeMap::new(),
            describing: String::new(),
            by_address: BTreeMap::new(),
            capture: None,
            kernels: None,
            windows: scenario
                .checks
                .iter()
                .all(|c| c.at != CheckAt::Always || c.expect == crate::scenario::Expect::UniqueIps),
            parallel_from: crate::window::PARALLEL_STEPS,
            parallel_windows: 0,
            helper: None,
        };
        sim.by_address = sim
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.address, i))
            .collect();
        for (i, e) in scenario.events.iter().enumerate() {
            sim.schedule(Time::from_duration(e.at), Step::Scenario(i));
        }
        for (i, c) in scenario.checks.iter().enumerate() {
            if let CheckAt::Time(t) = c.at {
                sim.schedule(Time::from_duration(t), Step::Check(i));
            }
        }
        sim.schedule(Time::ZERO, Step::Sample);
        sim
    }

    pub(crate) fn schedule(&mut self, at: Time, step: Step) {
        self.seq += 1;
        self.queue.push(at, self.seq, step);
    }

    /// Runs to the end of the scenario and evaluates the `end` checks.
    pub fn run(&mut self) {
        let initial: Vec<usize> = (0..self.scenario.nodes.len())
            .filter(|i| self.scenario.nodes[*i].start)
            .collect();
        for i in initial {
            self.start(i);
        }
        let end = Time::from_duration(self.scenario.duration);
        while self.next_step(end) {}
        self.finish();
    }

    /// Takes the next queued step due by `until`; false when there is none.
    pub(crate) fn next_step(&mut self, until: Time) -> bool {
        if self.run_window(until) {
            return true;
        }
        let Some((at, step)) = self.queue.pop_due(until) else {
            return false;
        };
        self.now = at;
        self.step(step);
        self.after_step();
        true
    }

    /// Evaluates the `end` and `always` checks at the scenario's end.
    pub(crate) fn finish(&mut self) {
        self.now = Time::from_duration(self.scenario.duration);
        for (i, c) in self.scenario.checks.iter().enumerate() {
            if matches!(c.at, CheckAt::End | CheckAt::Always) {
                let outcome = checks::evaluate(self, i);
                self.record(outcome);
            }
        }
    }

    pub(crate) fn step(&mut self, step: Step) {
        match step {
            Step::Deliver { from, to, bytes } => {
                let src = self.nodes[from].address;
                self.with(to, |r, now| r.handle_datagram(now, src, &bytes));
            }
            Step::Timer(node) => {
                // It fired: nothing is pending until `with` re-arms it.
                self.nodes[node].timer = None;
                self.with(node, |r, now| r.handle_timeout(now));
            }
            Step::Scenario(i) => {
                let event = self.scenario.events[i].clone();
                self.apply(&event);
            }
            Step::Check(i) => {
                let outcome = checks::evaluate(self, i);
                self.record(outcome);
            }
            Step::Reclaim { removed, name } => self.reclaim(removed, name),
            Step::Sample => {
                let agreeing = checks::agreement(self);
                self.samples.take(self.now, &self.sent, agreeing);
                self.schedule(self.now + SAMPLE, Step::Sample);
            }
        }
    }

    /// Invariants and `always` checks, after every step.
    pub(crate) fn after_step(&mut self) {
        if self.uniqueness_violation.is_none()
            && std::mem::take(&mut self.unique_dirty)
            && let Err(detail) = checks::unique_ips(self)
        {
            self.trace
                .line(self.now, "-", &format!("UNIQUE_IPS VIOLATED: {detail}"));
            self.uniqueness_violation = Some((self.now, detail));
        }
        for (i, c) in self.scenario.checks.iter().enumerate() {
            // unique_ips is enforced above after every step already.
            if c.at == CheckAt::Always && c.expect != crate::scenario::Expect::UniqueIps {
                let outcome = checks::evaluate(self, i);
                if !outcome.passed && !self.outcomes.iter().any(|o| o.index == i) {
                    self.record(outcome);
                }
            }
        }
    }

    fn record(&mut self, outcome: CheckOutcome) {
        let verdict = if outcome.passed { "pass" } else { "FAIL" };
        self.trace.line(
            self.now,
            "-",
            &format!(
                "check line {} {}: {verdict} {}",
                outcome.line, outcome.expect, outcome.detail
            ),
        );
        self.outcomes.push(outcome);
    }

    // ---- driving one router -------------------------------------------

    /// Runs `f` on a running node, then drains its outputs (the core's
    /// calling rule) and re-arms its timer.
    fn with<R>(&mut self, i: usize, f: impl FnOnce(&mut Router, Time) -> R) -> Option<R> {
        let now = self.now;
        let shared = self.nodes[i].shared.clone()?;
        let mut router = weft_driver::lock(&shared);
        let result = f(&mut router, now);
        let outputs = Outputs::drain(&mut router);
        let holding = holding_change(self.known(i), &router);
        drop(router);
        self.act_on(i, outputs.transmits, outputs.events, holding);
        self.arm_timer(i, outputs.timeout.map(|at| at.max(now)));
        Some(result)
    }

    /// The ring summary and gateway last read from node `i`.
    pub(crate) fn known(&self, i: usize) -> Known {
        (self.owned[i].0, self.gateways[i])
    }

    /// Sends what node `i` transmitted, acts on its events and notes its
    /// own blocks and gateway, at `self.now`.
    pub(crate) fn act_on(
        &mut self,
        i: usize,
        transmits: Vec<Transmit>,
        events: Vec<Event>,
        holding: Option<Holding>,
    ) {
        let now = self.now;
        if let Some(h) = holding {
            self.unique_dirty |= h.blocks != self.owned[i].1;
            self.note_gateway(i, h.gateway, &h.blocks);
            self.owned[i] = (Some(h.summary), h.blocks);
        }
        for t in transmits {
            self.sent[i] += t.payload.len() as u64;
            self.trace.datagram(&t.payload);
            if let Some(capture) = &mut self.capture {
                capture.datagram(now, self.nodes[i].address, t.destination, &t.payload);
            }
            let Some(to) = self.by_address.get(&t.destination).copied() else {
                continue;
            };
            if let Some(delay) = self.network.deliver(i, to, &mut self.rng) {
                self.schedule(
                    now + delay,
                    Step::Deliver {
                        from: i,
                        to,
                        bytes: t.payload,
                    },
                );
            }
        }
        for e in events {
            self.on_event(i, e);
        }
    }

    /// Arms node `i`'s timer at `at`, replacing its pending one.
    pub(crate) fn arm_timer(&mut self, i: usize, at: Option<Time>) {
        match at {
            Some(at) => {
                self.seq += 1;
                let key = (at, self.seq);
                self.queue.arm(i, self.nodes[i].timer.replace(key), key);
            }
            None => self.queue.disarm(self.nodes[i].timer.take()),
        }
    }

    /// Re-reads the node's own blocks when its ring or gateway changed.
    /// Uniqueness is re-checked only when the blocks did: most ring
    /// changes move other peers' blocks, and a check sorts every node's
    /// blocks.
    pub(crate) fn note_ownership(&mut self, i: usize, router: &Router) {
        if let Some(holding) = holding_change(self.known(i), router) {
            self.act_on(i, Vec::new(), Vec::new(), Some(holding));
        }
    }

    /// A node's gateway is the default route of every pod on it, so it
    /// never moves while the node keeps the space it is in (through
    /// restarts too: `gateways` outlives a crash).
    fn note_gateway(&mut self, i: usize, gateway: Option<Ipv4Addr>, blocks: &[ipnet::Ipv4Net]) {
        let old = std::mem::replace(&mut self.gateways[i], gateway);
        if old == gateway {
            return;
        }
        self.unique_dirty = true;
        if let Some(old) = old
            && self.gateway_violation.is_none()
            && blocks.iter().any(|b| b.contains(&old))
        {
            let to = gateway.map_or("none".to_string(), |g| g.to_string());
            let detail = format!(
                "{}'s gateway moved from {old} to {to} while it still owns {old}",
                self.nodes[i].name
            );
            self.trace.line(
                self.now,
                "-",
                &format!("STABLE_GATEWAYS VIOLATED: {detail}"),
            );
            self.gateway_violation = Some((self.now, detail));
        }
    }

    pub(crate) fn on_event(&mut self, i: usize, event: Event) {
        match &event {
            Event::Ipam(IpamEvent::Allocated { container, address }) => {
                if let Some(pod) = self.pods.get_mut(container)
                    && pod.node == i
                {
                    pod.address = Some(*address);
                    self.unique_dirty = true;
                }
            }
            Event::Ipam(IpamEvent::AllocationFailed { container, error }) => {
                if let Some(pod) = self.pods.get_mut(container)
                    && pod.node == i
                {
                    pod.failed = Some(error.to_string());
                }
            }
            _ => {}
        }
        // Millions of events at 1,000 nodes, told one after another on
        // the main thread: one buffer, no allocation each.
        let mut what = std::mem::take(&mut self.describing);
        what.clear();
        self.describe(&event, &mut what);
        self.trace.line(self.now, &self.nodes[i].name, &what);
        self.describing = what;
    }

    fn describe(&self, event: &Event, out: &mut String) {
        let nick = |p: &weft_core::PeerName| self.nick(*p);
        let _ = match event {
            Event::ConnectionUp { peer, .. } => write!(out, "connection up {}", nick(peer)),
            Event::ConnectionDown { peer } => write!(out, "connection down {}", nick(peer)),
            Event::PeerDiscovered { nickname, .. } => write!(out, "discovered {nickname}"),
            Event::PeerForgotten { peer } => write!(out, "forgot {peer}"),
            Event::Route {
                peer,
                next_hop: Some(h),
            } => write!(out, "route {} via {}", nick(peer), nick(h)),
            Event::Route {
                peer,
                next_hop: None,
            } => write!(out, "route {} unreachable", nick(peer)),
            Event::Prefix { prefix, forward } => {
                let _ = write!(out, "prefix {prefix} ");
                match forward {
                    None => write!(out, "withdrawn"),
                    Some(weft_core::forward::Forward::Local) => write!(out, "local"),
                    Some(weft_core::forward::Forward::Unreachable) => write!(out, "unreachable"),
                    Some(weft_core::forward::Forward::Peer {
                        owner, next_hop, ..
                    }) => write!(out, "owner {} via {}", nick(owner), nick(next_hop)),
                }
            }
            Event::Ipam(IpamEvent::Allocated { container, address }) => {
                write!(out, "allocated {address} to {container}")
            }
            Event::Ipam(IpamEvent::AllocationFailed { container, error }) => {
                write!(out, "allocation for {container} failed: {error}")
            }
            Event::Ipam(IpamEvent::RingSeeded { seed, first_owner }) => write!(
                out,
                "ring seeded {seed:016x} first owner {}",
                nick(first_owner)
            ),
            Event::Ipam(IpamEvent::Conflict {
                container, address, ..
            }) => write!(
                out,
                "CONFLICT {container} holds {address} outside own space"
            ),
        };
    }

    /// A peer's node name, as far as the simulation knows it.
    pub fn nickname(&self, peer: weft_core::PeerName) -> String {
        self.nick(peer).to_string()
    }

    /// The node's name for `peer`, or the peer name when no node has it.
    fn nick(&self, peer: weft_core::PeerName) -> Nick<'_> {
        Nick(
            self.names.get(&peer).map(|i| self.nodes[*i].name.as_str()),
            peer,
        )
    }

    /// Remembers which node a peer name belongs to (at every start).
    pub(crate) fn name_node(&mut self, i: usize, peer: weft_core::PeerName) {
        self.names.insert(peer, i);
    }

    // ---- scenario events ----------------------------------------------

    /// What every engine does first with a scenario event: trace it, note
    /// disruptions, update the network model and the pod list.
    pub(crate) fn announce(&mut self, event: &EventDef) {
        let what = event.action.describe(self.scenario);
        self.trace
            .line(self.now, "-", &format!("event line {}: {what}", event.line));
        if event.action.disrupts() {
            self.samples.disrupted(self.now);
        }
        match &event.action {
            Action::Partition(groups) => self.network.partition(groups),
            Action::Cut(a, b) => self.network.cut(*a, *b),
            Action::Heal => self.network.heal(),
            Action::Loss { rate, nodes } => self.network.set_loss(*rate, nodes.as_deref()),
            Action::Latency { value, nodes } => self.network.set_latency(*value, nodes.as_deref()),
            Action::AddPod { node, pods } => {
                for pod in pods {
                    let pod_state = Pod {
                        node: *node,
                        address: None,
                        failed: None,
                    };
                    self.pods.insert(pod.clone(), pod_state);
                }
            }
            // Applied to the nodes by the engine.
            Action::Start(_)
            | Action::Crash(_)
            | Action::Restart(_)
            | Action::Wipe(_)
            | Action::Backup(_)
            | Action::Restore(_)
            | Action::Remove(_)
            | Action::DelPod(_) => {}
        }
    }

    fn apply(&mut self, event: &EventDef) {
        self.announce(event);
        match &event.action {
            Action::Start(list) => list.iter().for_each(|i| self.start(*i)),
            Action::Crash(list) => list.iter().for_each(|i| self.crash(*i)),
            Action::Restart(list) => list.iter().for_each(|i| {
                self.crash(*i);
                self.start(*i);
            }),
            Action::Wipe(list) => list.iter().for_each(|i| {
                self.crash(*i);
                self.nodes[*i].saved = None;
                self.drop_pods_of(*i);
                self.start(*i);
            }),
            Action::Backup(list) => list.iter().for_each(|i| {
                let node = &self.nodes[*i];
                let state = node.router().map(|r| r.state()).or(node.saved.clone());
                self.nodes[*i].backup = state;
            }),
            Action::Restore(list) => list.iter().for_each(|i| {
                self.crash(*i);
                self.nodes[*i].saved = self.nodes[*i].backup.clone();
                self.start(*i);
            }),
            Action::Remove(list) => list.iter().for_each(|i| self.remove(*i)),
            Action::AddPod { pods, .. } => pods.iter().for_each(|pod| self.allocate(pod)),
            Action::DelPod(pod) => {
                if let Some(p) = self.pods.remove(pod)
                    && self.with(p.node, |r, now| r.release(now, pod)).is_none()
                {
                    self.releases.entry(p.node).or_default().insert(pod.clone());
                }
            }
            // The network model was updated by `announce`.
            Action::Partition(_)
            | Action::Cut(..)
            | Action::Heal
            | Action::Loss { .. }
            | Action::Latency { .. } => {}
        }
    }

    /// Asks the pod's node for an address, as the CNI ADD path does.
    fn allocate(&mut self, pod: &str) {
        let Some(node) = self.pods.get(pod).map(|p| p.node) else {
            return;
        };
        match self.with(node, |r, now| r.allocate(now, pod)) {
            Some(Ok(Allocation::Ready(address))) => {
                if let Some(p) = self.pods.get_mut(pod) {
                    p.address = Some(address);
                    self.unique_dirty = true;
                }
            }
            Some(Ok(Allocation::Pending(reason))) => self.trace.line(
                self.now,
                &self.nodes[node].name.clone(),
                &format!("pending {pod}: {reason}"),
            ),
            Some(Err(error)) => {
                if let Some(p) = self.pods.get_mut(pod) {
                    p.failed = Some(error.to_string());
                }
            }
            None => {} // node down: retried when it starts, like kubelet
        }
    }

    pub(crate) fn config(&self, i: usize) -> Config {
        let s = self.scenario;
        let mut config = Config::new(self.nodes[i].name.clone(), self.nodes[i].address);
        let secret = s.nodes[i].secret.as_ref().or(s.secret.as_ref());
        config.secret = secret.map(|x| x.as_bytes().to_vec());
        config.ipalloc_range = s.ipalloc_range;
        config.ipam = match s.ipam {
            IpamKind::Ring => {
                let initial = s.nodes.iter().filter(|n| n.start).count().max(1);
                IpamMode::Ring(IpamInit::Consensus(Some(initial)))
            }
            IpamKind::NodeCidr => IpamMode::NodeCidr(s.nodes[i].pod_cidr),
        };
        config
    }

    pub fn start(&mut self, i: usize) {
        if self.nodes[i].running() || self.nodes[i].removed {
            return;
        }
        let node = &mut self.nodes[i];
        node.boots += 1;
        let seed = router_seed(self.seed, i, node.boots);
        let mut config = self.config(i);
        // The node's wall clock is the simulated one.
        config.start_clock = self.now.since_epoch();
        let saved = self.nodes[i].saved.take();
        let router = match Router::new(config, saved, seed, self.now) {
            Ok(r) => r,
            Err(e) => {
                let name = self.nodes[i].name.clone();
                self.trace
                    .line(self.now, &name, &format!("refused to start: {e}"));
                return;
            }
        };
        self.nodes[i].saved = Some(router.state());
        self.name_node(i, router.name());
        self.nodes[i].shared = Some(Arc::new(Mutex::new(router)));
        let peers = peer_addresses(self.scenario, i);
        self.with(i, |r, now| {
            for p in peers {
                r.add_peer_address(now, p);
            }
            r.handle_timeout(now);
        });
        // What kubelet would retry against a node that was down.
        for pod in self.releases.remove(&i).unwrap_or_default() {
            self.with(i, |r, now| r.release(now, &pod));
        }
        let waiting: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, p)| p.node == i)
            .map(|(n, _)| n.clone())
            .collect();
        for pod in waiting {
            self.allocate(&pod);
        }
    }

    fn crash(&mut self, i: usize) {
        if let Some(shared) = self.nodes[i].shared.take() {
            // The agent persists every change before acknowledging it, so
            // the last state is what a crash leaves behind.
            self.nodes[i].saved = Some(weft_driver::lock(&shared).state());
            self.queue.disarm(self.nodes[i].timer.take());
            self.owned[i] = (None, Vec::new());
        }
    }

    pub(crate) fn drop_pods_of(&mut self, i: usize) {
        self.pods.retain(|_, p| p.node != i);
        self.releases.remove(&i);
    }

    /// The node is deleted for good; a live peer reclaims its space once
    /// it is unreachable (the Kubernetes controller's job for real).
    fn remove(&mut self, i: usize) {
        let name = self.nodes[i]
            .router()
            .map(|r| r.name())
            .or(self.nodes[i].saved.as_ref().map(|s| s.name));
        self.crash(i);
        self.nodes[i].removed = true;
        self.drop_pods_of(i);
        if let Some(name) = name {
            self.schedule(
                self.now + Duration::from_secs(1),
                Step::Reclaim { removed: i, name },
            );
        }
    }

    fn reclaim(&mut self, removed: usize, name: weft_core::PeerName) {
        let heir = (0..self.nodes.len()).find(|j| *j != removed && self.nodes[*j].running());
        let Some(heir) = heir else {
            self.schedule(
                self.now + Duration::from_secs(1),
                Step::Reclaim { removed, name },
            );
            return;
        };
        match self.with(heir, |r, now| r.remove_peer(now, name)) {
            Some(Ok(taken)) => {
                let (h, gone) = (
                    self.nodes[heir].name.clone(),
                    self.nodes[removed].name.clone(),
                );
                self.trace.line(
                    self.now,
                    &h,
                    &format!("reclaimed {taken} addresses of removed {gone}"),
                );
            }
            _ => self.schedule(
                self.now + Duration::from_secs(1),
                Step::Reclaim { removed, name },
            ),
        }
    }

    /// Per-node control traffic over the last `TRAFFIC_WINDOW`, averaged
    /// over running nodes, in bytes per second.
    pub fn gossip_bytes_per_node_per_s(&self) -> f64 {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].running())
            .collect();
        self.samples.bytes_per_node_per_s(&running)
    }

    /// Time from the last disruption until the cluster converged and
    /// stayed so, if it did.
    pub fn convergence_time(&self) -> Option<Duration> {
        self.samples.convergence_time()
    }
}

/// A peer as the trace names it: its node's name, or its peer name.
struct Nick<'s>(Option<&'s str>, weft_core::PeerName);

impl std::fmt::Display for Nick<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(name) => f.write_str(name),
            None => write!(f, "{}", self.1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Pod, Sim};
    use crate::{checks, scenario};
    use std::net::Ipv4Addr;
    use std::path::Path;

    fn three_nodes() -> scenario::Scenario {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/three-nodes.toml");
        scenario::load(&path).expect("the library scenario loads")
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn a_gateway_that_moves_while_its_node_keeps_the_space_is_a_violation() {
        let scenario = three_nodes();
        let mut sim = Sim::new(&scenario, 1);
        let space = ["10.32.0.0/24".parse().unwrap()];
        sim.note_gateway(0, Some(ip("10.32.0.1")), &space);
        sim.note_gateway(0, Some(ip("10.32.0.1")), &space);
        // A node that lost the old gateway's space (wiped, or its space
        // reclaimed) gets a new one.
        sim.note_gateway(1, Some(ip("10.32.1.1")), &[]);
        sim.note_gateway(1, Some(ip("10.32.2.1")), &[]);
        assert_eq!(sim.gateway_violation, None);
        sim.note_gateway(0, Some(ip("10.32.0.4")), &space);
        let (_, detail) = sim.gateway_violation.clone().expect("a violation");
        assert_eq!(
            detail,
            format!(
                "{}'s gateway moved from 10.32.0.1 to 10.32.0.4 while it still owns 10.32.0.1",
                scenario.nodes[0].name
            )
        );
    }

    #[test]
    fn a_pod_on_a_nodes_gateway_breaks_uniqueness() {
        let scenario = three_nodes();
        let mut sim = Sim::new(&scenario, 1);
        sim.gateways[2] = Some(ip("10.32.0.1"));
        let pod = |address| Pod {
            node: 0,
            address: Some(ip(address)),
            failed: None,
        };
        sim.pods.insert("a".into(), pod("10.32.0.2"));
        assert!(checks::unique_ips(&sim).is_ok());
        sim.pods.insert("b".into(), pod("10.32.0.1"));
        let node = &scenario.nodes[2].name;
        assert_eq!(
            checks::unique_ips(&sim),
            Err(format!("10.32.0.1 is held by both {node}'s gateway and b"))
        );
    }
}
