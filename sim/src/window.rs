//! Many nodes' steps at once. A datagram takes at least the network's
//! least latency to arrive, so nothing a node does within that long after
//! the earliest pending step can change what another node does in that
//! time: each node's steps in such a window run in their own order, two
//! threads taking the nodes one at a time, and what they sent and
//! reported is then acted on in one order (by time, then as queued), the
//! same whichever thread ran what, so a run stays deterministic. A
//! 1,000-node start is thousands of steps a millisecond; a quiet
//! cluster's windows hold a few and run on one thread.

use crate::engine::{Holding, Known, Outputs, Sim, Step, holding_change};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use weft_core::{Event, Time, Transmit};
use weft_driver::SharedRouter;

/// Fewest steps in a window worth sharing with the helper thread (a
/// hand-over to a thread looking for work costs a microsecond or two, a
/// step from one to thousands).
pub(crate) const PARALLEL_STEPS: usize = 8;

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
    /// The ring summary and gateway the simulator last read from it.
    known: Known,
}

/// What one step of one node produced.
struct Done {
    at: Time,
    order: Order,
    node: usize,
    transmits: Vec<Transmit>,
    events: Vec<Event>,
    holding: Option<Holding>,
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
        let helper = if steps >= self.parallel_from {
            self.parallel_windows += 1;
            self.helper.get_or_insert_with(Helper::start).as_mut()
        } else {
            None
        };
        let (mut done, timers) = run_shares(shares, window, helper);
        done.sort_by_key(|d| (d.at, d.order));
        for d in done {
            self.now = d.at;
            self.act_on(d.node, d.transmits, d.events, d.holding);
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
                known: self.known(node),
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

type Ran = (Vec<Done>, Vec<(usize, Option<Time>)>);

/// A window's shares, taken one node at a time by whichever thread is
/// free: a node's steps cost from a microsecond (a heartbeat) to
/// milliseconds (routes over 100,000 links), so halves split by step
/// count left one thread waiting on the other for a third of the run.
struct Pool {
    shares: Vec<Mutex<Option<NodeSteps>>>,
    next: AtomicUsize,
    window: Window,
}

impl Pool {
    /// Runs shares until none is left: what each step produced, and each
    /// node's timer after its last step.
    fn drain(&self) -> Ran {
        let mut done = Vec::new();
        let mut timers = Vec::new();
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(slot) = self.shares.get(i) else {
                return (done, timers);
            };
            let share = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(share) = share {
                let node = share.node;
                timers.push((node, run_node(share, self.window, &mut done)));
            }
        }
    }
}

/// Runs every node's steps, on the helper thread too if there is one:
/// what each step produced, and each node's timer after its last step,
/// by node (timers are armed in that order, the same whoever ran what).
fn run_shares(shares: Vec<NodeSteps>, window: Window, helper: Option<&mut Helper>) -> Ran {
    let pool = Arc::new(Pool {
        shares: shares.into_iter().map(|s| Mutex::new(Some(s))).collect(),
        next: AtomicUsize::new(0),
        window,
    });
    let (done, mut timers) = match helper {
        Some(helper) => {
            helper.send(Arc::clone(&pool));
            let (mut done, mut timers) = pool.drain();
            let (more, later) = helper.receive();
            done.extend(more);
            timers.extend(later);
            (done, timers)
        }
        None => pool.drain(),
    };
    timers.sort_unstable_by_key(|(node, _)| *node);
    (done, timers)
}

/// How long the helper keeps looking for the next window before it
/// sleeps. A starting 1,000-node cluster runs a window every few hundred
/// microseconds, and waking a sleeping thread takes about as long (more
/// on a busy VM): the helper then took little of each window's work.
/// It looks as `pause` waits (a short spin, then yields), so another
/// thread that has work gets the core.
const LOOK_FOR_WORK: std::time::Duration = std::time::Duration::from_micros(300);

/// A moment's wait in a loop begun at `since`: a spin at first (a
/// system call to yield costs microseconds on a VM), then a yield, so a
/// thread with work gets the core.
fn pause(since: std::time::Instant) {
    if since.elapsed() < std::time::Duration::from_micros(50) {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// What the main thread and the helper share: the window being run, and
/// what the helper ran of it.
#[derive(Default)]
struct Handoff {
    state: Mutex<Slot>,
    wake: Condvar,
    /// Set with a job put in `state`, so a looking helper sees it without
    /// the lock.
    posted: AtomicBool,
    /// Set with a result put in `state`.
    finished: AtomicBool,
}

#[derive(Default)]
struct Slot {
    job: Option<Arc<Pool>>,
    result: Option<Ran>,
    stop: bool,
}

/// A second thread for the whole run, sharing the work of each big window.
pub(crate) struct Helper {
    handoff: Arc<Handoff>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Helper {
    /// The helper, or none if no thread can be started (windows then run
    /// on one thread, with the same outcome).
    fn start() -> Option<Helper> {
        let handoff = Arc::new(Handoff::default());
        let theirs = Arc::clone(&handoff);
        let thread = std::thread::Builder::new()
            .name("weft-sim-helper".into())
            .spawn(move || theirs.serve())
            .ok()?;
        Some(Helper {
            handoff,
            thread: Some(thread),
        })
    }

    fn send(&mut self, pool: Arc<Pool>) {
        let mut slot = self.handoff.lock();
        slot.job = Some(pool);
        self.handoff.posted.store(true, Ordering::Release);
        self.handoff.wake.notify_one();
    }

    /// What the helper ran of the window, once the pool is drained.
    fn receive(&mut self) -> Ran {
        {
            let mut slot = self.handoff.lock();
            if slot.job.take().is_some() {
                // Not picked up: we ran it all.
                self.handoff.posted.store(false, Ordering::Relaxed);
                return (Vec::new(), Vec::new());
            }
        }
        // It is running its last node: wait for it without sleeping.
        let waiting = std::time::Instant::now();
        while !self.handoff.finished.swap(false, Ordering::Acquire) {
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                // It panicked (a bug in the core): fail as one thread would.
                match self.thread.take().map(|t| t.join()) {
                    Some(Err(panic)) => std::panic::resume_unwind(panic),
                    _ => panic!("the simulator's helper thread stopped"),
                }
            }
            pause(waiting);
        }
        self.handoff.lock().result.take().unwrap_or_default()
    }
}

impl Handoff {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The helper's loop: run what is posted until told to stop.
    fn serve(&self) {
        loop {
            let looking = std::time::Instant::now();
            while !self.posted.load(Ordering::Acquire) && looking.elapsed() < LOOK_FOR_WORK {
                pause(looking);
            }
            let pool = {
                let mut slot = self.lock();
                while slot.job.is_none() && !slot.stop {
                    slot = self.wake.wait(slot).unwrap_or_else(|e| e.into_inner());
                }
                self.posted.store(false, Ordering::Relaxed);
                match slot.job.take() {
                    Some(pool) => pool,
                    None => return,
                }
            };
            let ran = pool.drain();
            self.lock().result = Some(ran);
            self.finished.store(true, Ordering::Release);
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.handoff.lock().stop = true;
        self.handoff.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs one node's steps in order, timers it arms within the window
/// included; returns its timer after the last.
fn run_node(share: NodeSteps, window: Window, done: &mut Vec<Done>) -> Option<Time> {
    let node = share.node;
    let mut router = weft_driver::lock(&share.router);
    let mut timer = share.timer.map(|(at, seq)| (at, Order::Queued(seq)));
    let mut deliveries = share.deliveries.into_iter().peekable();
    let mut known = share.known;
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
        let holding = holding_change(known, &router);
        if let Some(h) = &holding {
            known = (Some(h.summary), h.gateway);
        }
        done.push(Done {
            at,
            order,
            node,
            transmits: out.transmits,
            events: out.events,
            holding,
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
