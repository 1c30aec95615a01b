//! The turmoil engine: every node is a turmoil host running the agent's own
//! driver loop (weft-driver) over turmoil's simulated UDP sockets, with
//! turmoil's partitions, repairs, crashes and bounces. It proves the
//! runtime glue under faults, at small scale; the events engine is the one
//! for large clusters and seed sweeps.
//!
//! Scenario semantics (pods, checks, samples, the trace) are the events
//! engine's [`Sim`], used here as the world model; only how routers run and
//! datagrams travel differs. Two things turmoil does not model the way
//! SCENARIOS.md means them are done in the socket wrapper: per-datagram
//! loss (turmoil's `fail_rate` flaps whole links instead), and latency
//! ranges are approximated by turmoil's own distribution between min and
//! max.
//!
//! Each node's driver loop publishes its router's views, which the node's
//! kernel ([`Kernels`]) follows as the agent's kernel thread does; the
//! `reachable` and `unreachable` checks follow the routes it holds.

use crate::engine::{PORT, Sim, Step, peer_addresses, router_seed};
use crate::kernel::Kernels;
use crate::scenario::{Action, EventDef, Scenario};
use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use weft_core::ipam::IpamError;
use weft_core::random::Random;
use weft_core::{Event, PeerName, PersistedState, Router, Time, Transmit, View};
use weft_driver::{Command, Datagrams, Driver, Host, SharedRouter};

/// Turmoil's step: every host runs this much simulated time per step.
const TICK: Duration = Duration::from_millis(1);

/// What the hosts tell the engine between steps.
enum Note {
    Started(Started),
    Stopped(usize, String),
    Saved(usize, PersistedState),
    Event(usize, Event),
    Sent(usize, Transmit),
}

/// A node's driver loop is up.
struct Started {
    i: usize,
    router: SharedRouter,
    commands: mpsc::UnboundedSender<Command>,
    views: watch::Receiver<Arc<View>>,
}

type Notes = Rc<RefCell<Vec<Note>>>;

/// Per-datagram loss, shared by every host's socket.
struct Loss {
    rate: Vec<f64>,
    /// Node index by underlay address.
    index: std::collections::BTreeMap<SocketAddr, usize>,
    rng: Random,
}

type Answer<T> = oneshot::Receiver<Result<T, IpamError>>;

pub struct TurmoilSim<'a> {
    /// The world: pods, checks, samples, trace, network model.
    pub sim: Sim<'a>,
    net: turmoil::Sim<'static>,
    notes: Notes,
    loss: Rc<RefCell<Loss>>,
    /// What each node persisted: survives `crash`, not `wipe`.
    disks: Vec<Rc<RefCell<Option<PersistedState>>>>,
    commands: Vec<Option<mpsc::UnboundedSender<Command>>>,
    /// The views each node's driver loop publishes, for its kernel.
    views: Vec<Option<watch::Receiver<Arc<View>>>>,
    registered: Vec<bool>,
    allocations: Vec<(String, usize, Answer<Ipv4Addr>)>,
    reclaims: Vec<(usize, PeerName, Answer<u64>)>,
}

impl<'a> TurmoilSim<'a> {
    pub fn new(scenario: &'a Scenario, seed: u64) -> TurmoilSim<'a> {
        let n = scenario.nodes.len();
        let net = turmoil::Builder::new()
            .rng_seed(seed)
            .tick_duration(TICK)
            // The engine decides when the scenario ends.
            .simulation_duration(scenario.duration + Duration::from_secs(3600))
            .min_message_latency(scenario.latency.min)
            .max_message_latency(scenario.latency.max)
            .build();
        let mut loss_seed = [0u8; 32];
        loss_seed[..8].copy_from_slice(&seed.to_le_bytes());
        loss_seed[8..16].copy_from_slice(b"lossrate");
        let mut sim = Sim::new(scenario, seed);
        sim.kernels = Some(Kernels::new(n));
        TurmoilSim {
            sim,
            net,
            notes: Rc::default(),
            loss: Rc::new(RefCell::new(Loss {
                rate: vec![scenario.loss; n],
                index: (0..n)
                    .map(|i| (SocketAddr::from((scenario.nodes[i].address, PORT)), i))
                    .collect(),
                rng: Random::from_seed(loss_seed),
            })),
            disks: (0..n).map(|_| Rc::default()).collect(),
            commands: vec![None; n],
            views: vec![None; n],
            registered: vec![false; n],
            allocations: Vec::new(),
            reclaims: Vec::new(),
        }
    }

    /// Runs to the end of the scenario and evaluates the `end` checks.
    pub fn run(&mut self) {
        let scenario = self.sim.scenario;
        for i in (0..scenario.nodes.len()).filter(|i| scenario.nodes[*i].start) {
            self.start(i);
        }
        let end = Time::from_duration(scenario.duration);
        loop {
            let now = Time::from_duration(self.net.elapsed());
            while let Some(step) = self.due(now) {
                self.step(step);
                self.sim.after_step();
            }
            if now >= end {
                break;
            }
            if let Err(e) = self.net.step() {
                self.sim
                    .trace
                    .line(now, "-", &format!("turmoil stopped: {e}"));
                break;
            }
            self.sim.now = Time::from_duration(self.net.elapsed());
            self.collect();
            self.sim.after_step();
        }
        self.sim.finish();
    }

    fn due(&mut self, now: Time) -> Option<Step> {
        let (at, step) = self.sim.queue.pop_due(now)?;
        self.sim.now = at;
        Some(step)
    }

    fn step(&mut self, step: Step) {
        match step {
            Step::Scenario(i) => {
                let event = self.sim.scenario.events[i].clone();
                self.apply(&event);
            }
            Step::Reclaim { removed, name } => self.reclaim(removed, name),
            other => self.sim.step(other),
        }
    }

    // ---- scenario events ----------------------------------------------

    fn apply(&mut self, event: &EventDef) {
        self.sim.announce(event);
        match &event.action {
            Action::Start(list) => list.iter().for_each(|i| self.start(*i)),
            Action::Crash(list) => list.iter().for_each(|i| self.crash(*i)),
            Action::Restart(list) => list.iter().for_each(|i| {
                self.crash(*i);
                self.start(*i);
            }),
            Action::Wipe(list) => list.iter().for_each(|i| {
                self.crash(*i);
                // A reinstalled node: nothing on disk, nothing in the kernel.
                *self.disks[*i].borrow_mut() = None;
                self.kernels().reinstall(*i);
                self.sim.nodes[*i].saved_mut().take();
                self.sim.drop_pods_of(*i);
                self.start(*i);
            }),
            Action::Backup(list) => list.iter().for_each(|i| {
                self.sim.nodes[*i].backup = self.disks[*i].borrow().clone();
            }),
            Action::Restore(list) => list.iter().for_each(|i| {
                self.crash(*i);
                let backup = self.sim.nodes[*i].backup.clone();
                *self.disks[*i].borrow_mut() = backup.clone();
                *self.sim.nodes[*i].saved_mut() = backup;
                self.start(*i);
            }),
            Action::Remove(list) => list.iter().for_each(|i| self.remove(*i)),
            Action::Partition(_) | Action::Cut(..) | Action::Heal => self.sync_links(),
            Action::Latency { .. } => self.sync_links(),
            Action::Loss { .. } => {
                self.loss.borrow_mut().rate = self.sim.network.loss_rates().to_vec();
            }
            Action::AddPod { pods, .. } => pods.iter().for_each(|pod| self.allocate(pod)),
            Action::DelPod(pod) => {
                if let Some(p) = self.sim.pods.remove(pod) {
                    self.release(p.node, pod);
                }
            }
        }
    }

    fn start(&mut self, i: usize) {
        let node = &self.sim.nodes[i];
        if node.removed || self.commands[i].is_some() {
            return;
        }
        let ip = IpAddr::V4(self.sim.scenario.nodes[i].address);
        if self.registered[i] {
            self.net.bounce(ip);
        } else {
            self.registered[i] = true;
            let factory = self.host_factory(i);
            self.net.host(ip, factory);
            self.sync_links();
        }
        // Marks the node as starting, so a second start is a no-op; the
        // real sender arrives with `Note::Started`.
        self.commands[i] = Some(mpsc::unbounded_channel().0);
    }

    /// What runs on node `i`'s turmoil host, at every (re)start: a router
    /// from what the node persisted, and the agent's driver loop.
    fn host_factory(&self, i: usize) -> impl Fn() -> HostFuture + 'static {
        let config = self.sim.config(i);
        let peers = peer_addresses(self.sim.scenario, i);
        let seed = self.sim.seed;
        let disk = self.disks[i].clone();
        let notes = self.notes.clone();
        let loss = self.loss.clone();
        let boots = Rc::new(RefCell::new(0u64));
        move || {
            *boots.borrow_mut() += 1;
            let setup = NodeSetup {
                i,
                config: config.clone(),
                peers: peers.clone(),
                seed: router_seed(seed, i, *boots.borrow()),
                disk: disk.clone(),
                notes: notes.clone(),
                loss: loss.clone(),
            };
            Box::pin(setup.run())
        }
    }

    fn crash(&mut self, i: usize) {
        if !self.registered[i] || self.commands[i].is_none() {
            return;
        }
        self.net
            .crash(IpAddr::V4(self.sim.scenario.nodes[i].address));
        self.commands[i] = None;
        self.sim.nodes[i].shared = None;
        self.sim.owned[i] = (None, Vec::new());
    }

    fn remove(&mut self, i: usize) {
        let name = self.sim.nodes[i].router().map(|r| r.name()).or_else(|| {
            let disk = self.disks[i].borrow();
            disk.as_ref().map(|s| s.name)
        });
        self.crash(i);
        self.sim.nodes[i].removed = true;
        self.sim.drop_pods_of(i);
        if let Some(name) = name {
            let at = self.sim.now + Duration::from_secs(1);
            self.sim.schedule(at, Step::Reclaim { removed: i, name });
        }
    }

    fn reclaim(&mut self, removed: usize, name: PeerName) {
        let heir =
            (0..self.sim.nodes.len()).find(|j| *j != removed && self.sim.nodes[*j].running());
        let (reply, answer) = oneshot::channel();
        let sent = heir.is_some_and(|h| self.send(h, Command::RemovePeer { peer: name, reply }));
        if sent {
            self.reclaims.push((removed, name, answer));
        } else {
            let at = self.sim.now + Duration::from_secs(1);
            self.sim.schedule(at, Step::Reclaim { removed, name });
        }
    }

    /// Asks the pod's node for an address, as the CNI ADD path does.
    fn allocate(&mut self, pod: &str) {
        let Some(node) = self.sim.pods.get(pod).map(|p| p.node) else {
            return;
        };
        let (reply, answer) = oneshot::channel();
        let command = Command::Allocate {
            container: pod.to_string(),
            reply,
        };
        // A node that is down gets the request again when it starts.
        if self.send(node, command) {
            self.allocations.push((pod.to_string(), node, answer));
        }
    }

    fn release(&mut self, node: usize, pod: &str) {
        let (reply, _) = oneshot::channel();
        let command = Command::Release {
            container: pod.to_string(),
            reply,
        };
        if !self.send(node, command) {
            self.sim
                .releases
                .entry(node)
                .or_default()
                .insert(pod.to_string());
        }
    }

    fn send(&self, node: usize, command: Command) -> bool {
        self.sim.nodes[node].running()
            && self.commands[node]
                .as_ref()
                .is_some_and(|tx| tx.send(command).is_ok())
    }

    /// Makes turmoil's links match the network model.
    fn sync_links(&mut self) {
        let nodes = &self.sim.scenario.nodes;
        for a in (0..nodes.len()).filter(|a| self.registered[*a]) {
            for b in (a + 1..nodes.len()).filter(|b| self.registered[*b]) {
                let (ip_a, ip_b) = (nodes[a].address, nodes[b].address);
                if self.sim.network.link_up(a, b) {
                    self.net.repair(ip_a, ip_b);
                } else {
                    self.net.partition(ip_a, ip_b);
                }
                let latency = self.sim.network.latency(a);
                self.net.set_link_latency(ip_a, ip_b, latency.min);
                self.net
                    .set_link_max_message_latency(ip_a, ip_b, latency.max);
            }
        }
    }

    // ---- after every turmoil step -------------------------------------

    fn collect(&mut self) {
        let notes = std::mem::take(&mut *self.notes.borrow_mut());
        for note in notes {
            self.note(note);
        }
        self.follow_views();
        self.collect_allocations();
        self.collect_reclaims();
        for i in 0..self.sim.nodes.len() {
            if let Some(shared) = self.sim.nodes[i].shared.clone() {
                let router = weft_driver::lock(&shared);
                self.sim.note_ownership(i, &router);
            }
        }
    }

    fn note(&mut self, note: Note) {
        let now = self.sim.now;
        match note {
            Note::Started(Started {
                i,
                router,
                commands,
                views,
            }) => {
                let name = weft_driver::lock(&router).name();
                self.sim.name_node(i, name);
                self.sim.nodes[i].shared = Some(router);
                self.commands[i] = Some(commands);
                self.kernels().agent_starts(i);
                self.views[i] = Some(views);
                // What kubelet would retry against a node that was down.
                for pod in self.sim.releases.remove(&i).unwrap_or_default() {
                    self.release(i, &pod);
                }
                let waiting: Vec<String> = self
                    .sim
                    .pods
                    .iter()
                    .filter(|(_, p)| p.node == i && p.address.is_none())
                    .map(|(n, _)| n.clone())
                    .collect();
                waiting.iter().for_each(|pod| self.allocate(pod));
            }
            Note::Stopped(i, why) => {
                let name = self.sim.nodes[i].name.clone();
                self.sim.trace.line(now, &name, &why);
                self.sim.nodes[i].shared = None;
                self.commands[i] = None;
            }
            Note::Saved(i, state) => *self.sim.nodes[i].saved_mut() = Some(state),
            Note::Event(i, event) => self.sim.on_event(i, event),
            Note::Sent(i, transmit) => {
                let from = self.sim.nodes[i].address;
                self.sim.sent[i] += transmit.payload.len() as u64;
                self.sim.trace.datagram(&transmit.payload);
                if let Some(capture) = &mut self.sim.capture {
                    capture.datagram(now, from, transmit.destination, &transmit.payload);
                }
            }
        }
    }

    /// Each node's kernel takes the view its driver loop published last.
    fn follow_views(&mut self) {
        for i in 0..self.views.len() {
            let Some(views) = &mut self.views[i] else {
                continue;
            };
            // A closed channel may still hold a view not followed yet.
            let closed = match views.has_changed() {
                Ok(false) => continue,
                Ok(true) => false,
                Err(_) => true,
            };
            let view = views.borrow_and_update().clone();
            if closed {
                self.views[i] = None;
            }
            self.kernels().follow(i, &view);
        }
    }

    fn kernels(&mut self) -> &mut Kernels {
        self.sim
            .kernels
            .as_mut()
            .expect("the turmoil engine programs kernels")
    }

    fn collect_allocations(&mut self) {
        let mut still = Vec::new();
        for (pod, node, mut answer) in std::mem::take(&mut self.allocations) {
            let result = match answer.try_recv() {
                Ok(result) => result,
                Err(oneshot::error::TryRecvError::Empty) => {
                    still.push((pod, node, answer));
                    continue;
                }
                // The node went down: asked again when it starts.
                Err(oneshot::error::TryRecvError::Closed) => continue,
            };
            let Some(p) = self.sim.pods.get_mut(&pod).filter(|p| p.node == node) else {
                continue;
            };
            match result {
                Ok(address) => {
                    p.address = Some(address);
                    self.sim.unique_dirty = true;
                }
                Err(e) => p.failed = Some(e.to_string()),
            }
        }
        self.allocations = still;
    }

    fn collect_reclaims(&mut self) {
        let mut still = Vec::new();
        for (removed, name, mut answer) in std::mem::take(&mut self.reclaims) {
            match answer.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => still.push((removed, name, answer)),
                Ok(Ok(taken)) => {
                    let gone = self.sim.nodes[removed].name.clone();
                    self.sim.trace.line(
                        self.sim.now,
                        "-",
                        &format!("reclaimed {taken} addresses of removed {gone}"),
                    );
                }
                _ => {
                    let at = self.sim.now + Duration::from_secs(1);
                    self.sim.schedule(at, Step::Reclaim { removed, name });
                }
            }
        }
        self.reclaims = still;
    }
}

type HostFuture = std::pin::Pin<Box<dyn std::future::Future<Output = turmoil::Result>>>;

/// Everything one start of a node needs inside its host.
struct NodeSetup {
    i: usize,
    config: weft_core::Config,
    peers: Vec<SocketAddr>,
    seed: [u8; 32],
    disk: Rc<RefCell<Option<PersistedState>>>,
    notes: Notes,
    loss: Rc<RefCell<Loss>>,
}

impl NodeSetup {
    async fn run(self) -> turmoil::Result {
        let i = self.i;
        let saved = self.disk.borrow().clone();
        let mut config = self.config;
        // The node's wall clock is the simulated one.
        config.start_clock = turmoil::sim_elapsed().unwrap_or_default();
        let mut router = match Router::new(config, saved, self.seed, Time::ZERO) {
            Ok(r) => r,
            Err(e) => {
                let why = format!("refused to start: {e}");
                self.notes.borrow_mut().push(Note::Stopped(i, why));
                return Ok(());
            }
        };
        for peer in &self.peers {
            router.add_peer_address(Time::ZERO, *peer);
        }
        let socket = turmoil::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, PORT)).await?;
        let socket = SimSocket {
            i,
            socket,
            loss: self.loss,
        };
        let host = SimHost {
            i,
            disk: self.disk,
            notes: self.notes.clone(),
        };
        let (views_tx, views) = watch::channel(Arc::new(router.view()));
        let driver =
            Driver::new(router, socket, host, tokio::time::Instant::now()).publish_views(views_tx);
        let (tx, rx) = mpsc::unbounded_channel();
        self.notes.borrow_mut().push(Note::Started(Started {
            i,
            router: driver.router().clone(),
            commands: tx,
            views,
        }));
        if let Err(e) = driver.run(rx).await {
            self.notes
                .borrow_mut()
                .push(Note::Stopped(i, format!("stopped: {e}")));
        }
        Ok(())
    }
}

/// A turmoil UDP socket that also drops datagrams at the scenario's loss
/// rate.
struct SimSocket {
    i: usize,
    socket: turmoil::net::UdpSocket,
    loss: Rc<RefCell<Loss>>,
}

impl SimSocket {
    /// Whether the scenario's loss drops this datagram: the worse of the
    /// two ends' rates, as in the events engine.
    fn lost(&self, to: SocketAddr) -> bool {
        let mut loss = self.loss.borrow_mut();
        let to_rate = loss.index.get(&to).map_or(0.0, |j| loss.rate[*j]);
        let rate = loss.rate[self.i].max(to_rate);
        rate > 0.0 && (loss.rng.below(1_000_000) as f64) < rate * 1_000_000.0
    }
}

impl Datagrams for SimSocket {
    async fn send_to(&self, payload: &[u8], to: SocketAddr) -> io::Result<usize> {
        if self.lost(to) {
            return Ok(payload.len());
        }
        self.socket.send_to(payload, to).await
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.socket.recv_from(buf).await
    }
}

/// The node's surroundings: its disk and the engine's notes.
struct SimHost {
    i: usize,
    disk: Rc<RefCell<Option<PersistedState>>>,
    notes: Notes,
}

impl Host for SimHost {
    fn persist(&mut self, state: &PersistedState) -> io::Result<()> {
        *self.disk.borrow_mut() = Some(state.clone());
        self.notes
            .borrow_mut()
            .push(Note::Saved(self.i, state.clone()));
        Ok(())
    }

    fn event(&mut self, _now: Time, event: &Event) {
        self.notes
            .borrow_mut()
            .push(Note::Event(self.i, event.clone()));
    }

    fn sent(&mut self, _now: Time, transmit: &Transmit) {
        self.notes
            .borrow_mut()
            .push(Note::Sent(self.i, transmit.clone()));
    }
}
