//! Many nodes' steps at once. A datagram takes at least the network's
//! least latency to arrive, so nothing a node does within that long after
//! the earliest pending step can change what another node does in that
//! time: each node's steps in such a window run in their own order, the
//! nodes split between two threads, and what they sent and reported is
//! then acted on in one order (by time, then as queued), the same
//! whichever thread ran what, so a run stays deterministic. A 1,000-node
//! start is thousands of steps a millisecond; a quiet cluster's windows
//! hold a few and run on one thread.

use crate::engine::{Outputs, RingChange, Sim, Step, ring_change};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use weft_core::{Event, Time, Transmit};
use weft_driver::SharedRouter;

/// Fewest steps in a window worth a second thread: starting one costs
/// tens of microseconds, a step a few.
pub(crate) const PARALLEL_STEPS: usize = 256;

/// Where a step falls among the steps due at the same time: queued steps
/// by their sequence number, then timers armed inside the window, by node
/// and in the order they were armed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Order {
    Queued(u64),
    Armed { node: usize, count: u64 },
}

/// One node's steps in a window.
struct NodeSteps {
    node: usize,
    router: SharedRouter,
    /// Datagrams to it, in queue order: due, sequence, sender, bytes.
    deliveries: Vec<(Time, u64, SocketAddr, Vec<u8>)>,
    /// Its timer, if due in the window: due, sequence.
    timer: Option<(Time, u64)>,
    /// The ring summary the simulator last read from it.
    known_ring: Option<u64>,
}

/// What one step of one node produced.
struct Done {
    at: Time,
    order: Order,
    node: usize,
    transmits: Vec<Transmit>,
    events: Vec<Event>,
    ring: Option<RingChange>,
}

/// The window: steps due before `before` and by `until`.
#[derive(Clone, Copy)]
struct Window {
    before: Time,
    until: Time,
}

impl Window {
    fn holds(&self, at: Time) -> bool {
        at < self.before && at <= self.until
    }
}

impl Sim<'_> {
    /// Runs every node step due within the network's least latency of the
    /// first pending step. False if there is none (the first step is not a
    /// node's, or nothing is due by `until`) or windows are off for this
    /// scenario: the caller then takes one step.
    pub(crate) fn run_window(&mut self, until: Time) -> bool {
        let lookahead = self.network.least_latency();
        let Some(first) = self.queue.first_due() else {
            return false;
        };
        if !self.windows || lookahead.is_zero() {
            return false;
        }
        let mut window = Window {
            before: first + lookahead,
            until,
        };
        let (shares, steps) = self.take_window(window);
        if steps == 0 {
            return false;
        }
        // A step not a node's (a scenario event, a check, a sample) ends
        // the window: timers armed in it run only before that step.
        if let Some(next) = self.queue.first_due() {
            window.before = window.before.min(next);
        }
        let parallel = steps >= self.parallel_from;
        self.parallel_windows += u64::from(parallel);
        let (mut done, timers) = run_shares(shares, window, parallel);
        done.sort_by_key(|d| (d.at, d.order));
        for d in done {
            self.now = d.at;
            self.act_on(d.node, d.transmits, d.events, d.ring);
            self.after_step();
        }
        for (node, at) in timers {
            self.arm_timer(node, at);
        }
        true
    }

    /// Takes the window's steps off the queue, by node (running nodes
    /// only: a step of a stopped node does nothing), and how many.
    fn take_window(&mut self, window: Window) -> (Vec<NodeSteps>, usize) {
        let mut shares: BTreeMap<usize, NodeSteps> = BTreeMap::new();
        let mut steps = 0;
        while let Some((at, seq, step)) = self.queue.pop_node_step(window.before, window.until) {
            let node = match step {
                Step::Deliver { to, .. } => to,
                Step::Timer(node) => {
                    self.nodes[node].timer = None;
                    node
                }
                _ => continue,
            };
            let Some(router) = self.nodes[node].shared.clone() else {
                continue;
            };
            let share = shares.entry(node).or_insert_with(|| NodeSteps {
                node,
                router,
                deliveries: Vec::new(),
                timer: None,
                known_ring: self.owned[node].0,
            });
            match step {
                Step::Deliver { from, bytes, .. } => {
                    share
                        .deliveries
                        .push((at, seq, self.nodes[from].address, bytes));
                }
                _ => share.timer = Some((at, seq)),
            }
            steps += 1;
        }
        (shares.into_values().collect(), steps)
    }
}

/// Runs every node's steps, on two threads if `parallel`: what each step
/// produced, and each node's timer after its last step.
fn run_shares(
    mut shares: Vec<NodeSteps>,
    window: Window,
    parallel: bool,
) -> (Vec<Done>, Vec<(usize, Option<Time>)>) {
    let run_all = |shares: Vec<NodeSteps>| {
        let mut done = Vec::new();
        let mut timers = Vec::new();
        for share in shares {
            let node = share.node;
            timers.push((node, run_node(share, window, &mut done)));
        }
        (done, timers)
    };
    if !parallel {
        return run_all(shares);
    }
    // Halves of about equal work.
    let total: usize = shares.iter().map(size).sum();
    let mut acc = 0;
    let mid = shares
        .iter()
        .position(|s| {
            acc += size(s);
            acc * 2 >= total
        })
        .map_or(shares.len(), |i| i + 1);
    let theirs = shares.split_off(mid);
    std::thread::scope(|scope| {
        let helper = scope.spawn(|| run_all(theirs));
        let (mut done, mut timers) = run_all(shares);
        let (more, later) = helper
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        done.extend(more);
        timers.extend(later);
        (done, timers)
    })
}

fn size(share: &NodeSteps) -> usize {
    share.deliveries.len() + usize::from(share.timer.is_some())
}

/// Runs one node's steps in order, timers it arms within the window
/// included; returns its timer after the last.
fn run_node(share: NodeSteps, window: Window, done: &mut Vec<Done>) -> Option<Time> {
    let node = share.node;
    let mut router = weft_driver::lock(&share.router);
    let mut timer = share.timer.map(|(at, seq)| (at, Order::Queued(seq)));
    let mut deliveries = share.deliveries.into_iter().peekable();
    let mut known_ring = share.known_ring;
    let mut armed = 0;
    loop {
        let delivery = deliveries
            .peek()
            .map(|(at, seq, _, _)| (*at, Order::Queued(*seq)));
        // A timer taken off the queue is due; one armed here, if in the
        // window.
        let due_timer =
            timer.filter(|(at, order)| matches!(order, Order::Queued(_)) || window.holds(*at));
        let (at, order) = match (delivery, due_timer) {
            (Some(d), Some(t)) if t < d => {
                router.handle_timeout(t.0);
                t
            }
            (Some(d), _) => {
                if let Some((_, _, from, bytes)) = deliveries.next() {
                    router.handle_datagram(d.0, from, &bytes);
                }
                d
            }
            (None, Some(t)) => {
                router.handle_timeout(t.0);
                t
            }
            (None, None) => break,
        };
        let out = Outputs::drain(&mut router);
        armed += 1;
        timer = out
            .timeout
            .map(|t| (t.max(at), Order::Armed { node, count: armed }));
        let ring = ring_change(known_ring, &router);
        if let Some((summary, _)) = &ring {
            known_ring = Some(*summary);
        }
        done.push(Done {
            at,
            order,
            node,
            transmits: out.transmits,
            events: out.events,
            ring,
        });
    }
    timer.map(|(at, _)| at)
}

#[cfg(test)]
mod tests {
    use crate::engine::Sim;
    use crate::scenario;
    use std::path::Path;

    fn hundred_nodes() -> scenario::Scenario {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/hundred-nodes.toml");
        scenario::load(&path).expect("the library scenario loads")
    }

    /// The trace and check outcomes of a run, with windows of at least
    /// `parallel_from` steps run on two threads.
    fn run(
        scenario: &scenario::Scenario,
        parallel_from: usize,
    ) -> (Vec<String>, u64, Vec<bool>, u64) {
        let mut sim = Sim::new(scenario, 7);
        sim.trace.keep = true;
        sim.parallel_from = parallel_from;
        sim.run();
        let passed = sim.outcomes.iter().map(|o| o.passed).collect();
        let lines = std::mem::take(&mut sim.trace.lines);
        (lines, sim.trace.hash(), passed, sim.parallel_windows)
    }

    #[test]
    fn a_run_is_the_same_whichever_thread_ran_which_node() {
        let scenario = hundred_nodes();
        let (one_thread, hash, outcomes, none) = run(&scenario, usize::MAX);
        let (two_threads, same_hash, same_outcomes, windows) = run(&scenario, 2);
        assert_eq!(none, 0);
        assert!(windows > 1_000, "two threads ran {windows} windows");
        assert!(one_thread == two_threads, "the traces differ");
        assert_eq!(hash, same_hash, "the datagrams differ");
        assert_eq!(outcomes, same_outcomes);
        assert!(outcomes.iter().all(|p| *p), "{outcomes:?}");
        // What the nodes did is told in time order, across nodes too.
        let times: Vec<f64> = two_threads
            .iter()
            .map(|l| {
                l.split_whitespace()
                    .next()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(f64::NAN)
            })
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "time went back");
    }

    #[test]
    fn windows_are_off_when_an_always_check_reads_the_routers() {
        let mut scenario = hundred_nodes();
        assert!(Sim::new(&scenario, 1).windows);
        let reachable = scenario::parse(
            "extra.toml",
            "name = \"x\"\nduration = \"1s\"\n[[nodes]]\nname = \"n\"\naddress = \"192.168.1.1\"\n[[checks]]\nat = \"always\"\nexpect = \"reachable\"\n",
        )
        .expect("a valid scenario");
        scenario.checks.extend(reachable.checks);
        assert!(!Sim::new(&scenario, 1).windows);
    }
}
