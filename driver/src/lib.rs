//! The driver loop: the runtime glue between weft-core's sans-IO [`Router`]
//! and a network. It turns received datagrams, timer expiries and local
//! commands into router calls, and the router's outputs into saved state,
//! sent datagrams, events and command replies.
//!
//! The weft agent runs it over tokio UDP sockets; weft-sim's turmoil engine
//! runs the very same loop over turmoil's simulated sockets. Only the
//! [`Datagrams`] trait differs between them; time is tokio's clock, which
//! turmoil simulates.
//!
//! Ordering rule: state is persisted (through [`Host::persist`]) after every
//! input that changed it and *before* any datagram is sent or any command
//! is answered, so an acknowledged allocation survives a `kill -9`. A
//! failed save holds them back, refuses requests until a retry succeeds
//! (see [`save`]), and stops the loop only when saves keep failing.

use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use weft_core::ipam::{Allocation, IpamError, IpamEvent};
use weft_core::{Event, PeerName, PersistedState, Router, Time, Transmit, View};

pub mod save;
pub use save::SaveTrouble;

/// Largest datagram the loop receives (a jumbo UDP payload).
const RECEIVE_BUFFER: usize = 65_536;
/// How stale a published view's `heard` times may grow: they move with
/// every heartbeat, and only fastdp's probe reads them, once a second.
const HEARD_REFRESH: Duration = Duration::from_millis(500);

/// A UDP-like socket: what the loop needs from the network.
pub trait Datagrams {
    fn send_to(&self, payload: &[u8], to: SocketAddr) -> impl Future<Output = io::Result<usize>>;
    fn recv_from(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<(usize, SocketAddr)>>;
}

impl Datagrams for tokio::net::UdpSocket {
    fn send_to(&self, payload: &[u8], to: SocketAddr) -> impl Future<Output = io::Result<usize>> {
        tokio::net::UdpSocket::send_to(self, payload, to)
    }
    fn recv_from(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<(usize, SocketAddr)>> {
        tokio::net::UdpSocket::recv_from(self, buf)
    }
}

/// What surrounds the loop: where state is saved, who hears about events.
pub trait Host {
    /// Saves the node's state durably. Nothing that depends on the state
    /// is acknowledged until this succeeds: a failure is retried (see
    /// [`save`]) and stops the loop only when it persists.
    fn persist(&mut self, state: &PersistedState) -> io::Result<()>;
    /// Saves are failing (`Some`), or work again (`None`).
    fn save_trouble(&mut self, _trouble: Option<&SaveTrouble>) {}
    /// An event of the router (routes, prefixes, IPAM), for the dataplane
    /// and logs.
    fn event(&mut self, _now: Time, _event: &Event) {}
    /// A datagram about to be sent (traffic accounting, captures).
    fn sent(&mut self, _now: Time, _transmit: &Transmit) {}
    /// A socket error; the loop carries on.
    fn socket_error(&mut self, _error: &io::Error) {}
}

/// The loop's router, as a simulator sees it between steps. Only the loop
/// mutates it: everyone else sends a [`Command`], so that outputs are
/// always drained and state always saved; the agent's readers get values
/// ([`read`], [`Driver::publish_views`]).
pub type SharedRouter = Arc<Mutex<Router>>;

/// Locks the shared router; a panic elsewhere does not make it unusable.
pub fn lock(router: &SharedRouter) -> MutexGuard<'_, Router> {
    router
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

type Reply<T> = oneshot::Sender<T>;

/// A local request to the node, answered once its effect is saved. While
/// saves fail, requests with a reply are dropped unanswered (the requester
/// sees its reply channel closed) and change nothing.
#[derive(Debug)]
pub enum Command {
    /// An address for a container; answered when it is allocated (perhaps
    /// after waiting for space) or refused. Idempotent per container.
    Allocate {
        container: String,
        reply: Reply<Result<Ipv4Addr, IpamError>>,
    },
    /// A specific address for a container (restoring a known attachment).
    Claim {
        container: String,
        address: Ipv4Addr,
        reply: Reply<Result<Ipv4Addr, IpamError>>,
    },
    /// Frees a container's address; `None` if it held none.
    Release {
        container: String,
        reply: Reply<Result<Option<Ipv4Addr>, IpamError>>,
    },
    /// Takes over the space of a peer that left the cluster for good.
    RemovePeer {
        peer: PeerName,
        reply: Reply<Result<u64, IpamError>>,
    },
    /// Another address to connect to.
    AddPeer(SocketAddr),
    /// An address not to try any more (a Node that left the cluster);
    /// addresses learnt from gossip stay.
    ForgetPeerAddress(SocketAddr),
    /// This node's podCIDR (node-cidr mode), once Kubernetes assigns it.
    SetPodCidr(Ipv4Net),
    /// A question about the router, answered on the loop at once (also
    /// while saves fail: it changes nothing). See [`read`].
    Read(Read),
}

/// A question about the router: runs on the loop, with the router and the
/// time, and sends its answer itself.
pub struct Read(Question);

type Question = Box<dyn FnOnce(&Router, Time) + Send>;

impl Read {
    /// Answers the question from `router` at `now` (what the loop does;
    /// also for stand-in loops in tests).
    pub fn answer(self, router: &Router, now: Time) {
        (self.0)(router, now)
    }
}

impl std::fmt::Debug for Read {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Read(..)")
    }
}

/// Asks the loop behind `commands` for a value computed from its router:
/// how readers get values instead of the router. `None` once the loop is
/// gone.
pub async fn read<T: Send + 'static>(
    commands: &mpsc::UnboundedSender<Command>,
    question: impl FnOnce(&Router, Time) -> T + Send + 'static,
) -> Option<T> {
    let (reply, answer) = oneshot::channel();
    let read = Read(Box::new(move |router, now| {
        let _ = reply.send(question(router, now));
    }));
    commands.send(Command::Read(read)).ok()?;
    answer.await.ok()
}

/// Why the loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("cannot save the node's state, failing for {} s: {error}", save::GIVE_UP_AFTER.as_secs())]
    Persist {
        #[source]
        error: io::Error,
    },
}

/// Saves failing: since when, how often, when to try next.
struct Failing {
    since: Instant,
    attempts: u32,
    next_try: Instant,
}

/// One node's loop. Build it with [`Driver::new`], then [`Driver::run`].
pub struct Driver<D, H> {
    router: SharedRouter,
    socket: D,
    host: H,
    /// Router time zero.
    epoch: Instant,
    saved: Option<PersistedState>,
    /// Allocations waiting for space, by container.
    waiting: BTreeMap<String, Vec<Reply<Result<Ipv4Addr, IpamError>>>>,
    /// Answers to send once the state they depend on is saved.
    answers: Vec<Box<dyn FnOnce() + Send>>,
    /// Outputs held back until the state they depend on is saved.
    unsent: Vec<Transmit>,
    unreported: Vec<Event>,
    /// Set while saves fail.
    failing: Option<Failing>,
    /// Where the router's view goes after every saved change, if anyone
    /// follows it; and when its `heard` times were last refreshed.
    views: Option<(watch::Sender<Arc<View>>, Instant)>,
}

impl<D: Datagrams, H: Host> Driver<D, H> {
    /// Takes `router` over: from now on only the loop changes it. `epoch`
    /// is the instant the router's time counts from (its `now` at
    /// creation).
    pub fn new(router: Router, socket: D, host: H, epoch: Instant) -> Driver<D, H> {
        Driver {
            router: Arc::new(Mutex::new(router)),
            socket,
            host,
            epoch,
            saved: None,
            waiting: BTreeMap::new(),
            answers: Vec::new(),
            unsent: Vec::new(),
            unreported: Vec::new(),
            failing: None,
            views: None,
        }
    }

    /// Publishes the router's view on `views` from now on: after every
    /// change, once it is saved, and before the answers that depend on it.
    /// Readers (the data path, status pages) take values from there and
    /// never hold the router.
    pub fn publish_views(mut self, views: watch::Sender<Arc<View>>) -> Driver<D, H> {
        views.send_replace(Arc::new(lock(&self.router).view()));
        self.views = Some((views, Instant::now()));
        self
    }

    /// The router, for a simulator that inspects it between steps; the
    /// agent reads through [`read`] and published views instead.
    pub fn router(&self) -> &SharedRouter {
        &self.router
    }

    fn now(&self) -> Time {
        Time::from_duration(self.epoch.elapsed())
    }

    /// Runs until every command sender is dropped (a clean stop), or state
    /// cannot be saved for [`save::GIVE_UP_AFTER`].
    pub async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) -> Result<(), DriverError> {
        let mut buf = vec![0u8; RECEIVE_BUFFER];
        self.flush().await?;
        loop {
            if let Some(next_try) = self.failing.as_ref().map(|f| f.next_try) {
                if !self.wait_to_retry(next_try, &mut commands).await {
                    return Ok(());
                }
                self.flush().await?;
                continue;
            }
            let deadline = lock(&self.router).poll_timeout();
            let timer = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(self.epoch + at.since_epoch()).await,
                    None => std::future::pending().await,
                }
            };
            // Biased: the same inputs are always taken in the same order,
            // which keeps simulated runs reproducible.
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    Some(command) => self.command(command),
                    None => return Ok(()),
                },
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((n, from)) => {
                        let now = self.now();
                        lock(&self.router).handle_datagram(now, from, &buf[..n]);
                    }
                    Err(e) => self.host.socket_error(&e),
                },
                () = timer => {
                    let now = self.now();
                    lock(&self.router).handle_timeout(now);
                }
            }
            self.flush().await?;
        }
    }

    /// While saves fail: takes only commands (refusing those that want an
    /// answer) until `next_try`. False once every sender is gone.
    async fn wait_to_retry(
        &mut self,
        next_try: Instant,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> bool {
        loop {
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    Some(command) => self.command_while_unsaved(command),
                    None => return false,
                },
                () = tokio::time::sleep_until(next_try) => return true,
            }
        }
    }

    /// Requests with a reply are dropped unanswered: their effect could
    /// not be saved. The rest (peer addresses, the podCIDR) are kept.
    fn command_while_unsaved(&mut self, command: Command) {
        match command {
            Command::Allocate { .. }
            | Command::Claim { .. }
            | Command::Release { .. }
            | Command::RemovePeer { .. } => {}
            other => self.command(other),
        }
    }

    fn command(&mut self, command: Command) {
        let now = self.now();
        let shared = self.router.clone();
        let mut router = lock(&shared);
        match command {
            Command::Allocate { container, reply } => {
                let result = router.allocate(now, &container);
                self.answer_allocation(container, result, reply);
            }
            Command::Claim {
                container,
                address,
                reply,
            } => {
                let result = router.claim(now, &container, address);
                self.answer_allocation(container, result, reply);
            }
            Command::Release { container, reply } => {
                let result = router.release(now, &container);
                self.answer(reply, result);
            }
            Command::RemovePeer { peer, reply } => {
                let result = router.remove_peer(now, peer);
                self.answer(reply, result);
            }
            Command::AddPeer(address) => router.add_peer_address(now, address),
            Command::ForgetPeerAddress(address) => router.remove_peer_address(address),
            Command::SetPodCidr(cidr) => router.set_pod_cidr(now, cidr),
            Command::Read(read) => read.answer(&router, now),
        }
    }

    fn answer_allocation(
        &mut self,
        container: String,
        result: Result<Allocation, IpamError>,
        reply: Reply<Result<Ipv4Addr, IpamError>>,
    ) {
        match result {
            Ok(Allocation::Ready(address)) => self.answer(reply, Ok(address)),
            Ok(Allocation::Pending(_)) => self.waiting.entry(container).or_default().push(reply),
            Err(e) => self.answer(reply, Err(e)),
        }
    }

    fn answer<T: Send + 'static>(&mut self, reply: Reply<T>, value: T) {
        // A requester that gave up is no error.
        self.answers.push(Box::new(move || {
            let _ = reply.send(value);
        }));
    }

    /// Drains the router: saves changed state, then sends, reports events
    /// and answers commands. When the save fails, all of that waits for a
    /// later one.
    async fn flush(&mut self) -> Result<(), DriverError> {
        let now = self.now();
        let state = {
            let mut router = lock(&self.router);
            self.unsent
                .extend(std::iter::from_fn(|| router.poll_transmit()));
            self.unreported
                .extend(std::iter::from_fn(|| router.poll_event()));
            router.state()
        };
        if self.saved.as_ref() != Some(&state) {
            if let Err(error) = self.host.persist(&state) {
                return self.save_failed(error);
            }
            self.saved = Some(state);
        }
        if self.failing.take().is_some() {
            self.host.save_trouble(None);
        }
        self.publish_view();
        for event in std::mem::take(&mut self.unreported) {
            self.settle_waiting(&event);
            self.host.event(now, &event);
        }
        for answer in self.answers.drain(..) {
            answer();
        }
        for transmit in std::mem::take(&mut self.unsent) {
            self.host.sent(now, &transmit);
            if let Err(e) = self
                .socket
                .send_to(&transmit.payload, transmit.destination)
                .await
            {
                self.host.socket_error(&e);
            }
        }
        Ok(())
    }

    /// Publishes a new view when the routing facts changed, or when only
    /// the `heard` times did and the last refresh is [`HEARD_REFRESH`] old.
    fn publish_view(&mut self) {
        let Some((views, refreshed)) = &mut self.views else {
            return;
        };
        let router = lock(&self.router);
        let current = views.borrow().clone();
        let now = Instant::now();
        let heard_due = now >= *refreshed + HEARD_REFRESH && !router.heard_is(&current);
        if heard_due || !router.routing_is(&current) {
            *refreshed = now;
            views.send_replace(Arc::new(router.view()));
        }
    }

    /// Schedules the next attempt, or gives up. Answers held for this
    /// save, and allocations waiting for space, are dropped: their
    /// requesters learn at once that nothing was acknowledged, and ask
    /// again (requests are idempotent).
    fn save_failed(&mut self, error: io::Error) -> Result<(), DriverError> {
        let now = Instant::now();
        let (since, attempts) = match &self.failing {
            Some(f) => (f.since, f.attempts + 1),
            None => (now, 1),
        };
        let failing_for = now - since;
        let Some(retry_in) = save::retry_after(attempts, failing_for) else {
            return Err(DriverError::Persist { error });
        };
        self.answers.clear();
        self.waiting.clear();
        self.host.save_trouble(Some(&SaveTrouble {
            error: error.to_string(),
            attempts,
            failing_for,
            retry_in,
        }));
        self.failing = Some(Failing {
            since,
            attempts,
            next_try: now + retry_in,
        });
        Ok(())
    }

    /// Answers allocations that waited for space.
    fn settle_waiting(&mut self, event: &Event) {
        let (container, result) = match event {
            Event::Ipam(IpamEvent::Allocated { container, address }) => (container, Ok(*address)),
            Event::Ipam(IpamEvent::AllocationFailed { container, error }) => {
                (container, Err(error.clone()))
            }
            _ => return,
        };
        for reply in self.waiting.remove(container).unwrap_or_default() {
            let _ = reply.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests;
