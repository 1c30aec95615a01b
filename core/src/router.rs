//! One node's control plane: the state machine the agent and the simulator
//! drive. See the crate docs for the calling rule.

use crate::config::{Config, ConfigError};
use crate::connections::{Connections, Heard};
use crate::forward::{Forward, ForwardingTable};
use crate::ipam::{
    Allocation, Ipam, IpamError, IpamEvent, IpamMode, IpamState, PeerView, RingUpdate,
};
use crate::peer::{PeerName, clamp_nickname};
use crate::random::Random;
use crate::routes::Routes;
use crate::seal::{self, ReplayWindow, SealNonce, Sealer};
use crate::status::{
    ConnectionStatus, DropReason, IpamPeerStatus, IpamStatus, PeerStatus, PendingStatus, Status,
    TargetStatus, Traffic,
};
use crate::time::Time;
use crate::timer::{Timer, TimerTable};
use crate::topology::{Merge, PeerEntry, Topology};
use crate::unreachable::Unreachable;
use crate::wire::{self, Announcement, Digest, Frame, Heartbeat, Message, WireError};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// What a node must keep across restarts. Restoring it makes the node the
/// same peer; starting without it makes a new peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedState {
    pub name: PeerName,
    /// Starts counted so far: breaks a tie between two starts in the same
    /// millisecond. Seal epochs and entry versions follow the wall clock
    /// at start (see [`seal::boot_epoch`]), not this count, so a restored
    /// older file neither makes peers refuse this node as a replay nor
    /// ignore its entry as old news.
    pub restarts: u32,
    /// The ring, this node's allocations and its seeding promises.
    #[serde(default)]
    pub ipam: Option<IpamState>,
}

/// A datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub destination: SocketAddr,
    pub payload: Vec<u8>,
}

/// Something the node's surroundings may act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A connection is now confirmed both ways.
    ConnectionUp {
        peer: PeerName,
        address: SocketAddr,
    },
    /// A confirmed connection was lost.
    ConnectionDown {
        peer: PeerName,
    },
    PeerDiscovered {
        peer: PeerName,
        nickname: String,
    },
    PeerForgotten {
        peer: PeerName,
    },
    /// Traffic to `peer` now goes via `next_hop` (itself when direct), or
    /// nowhere: `None` means unreachable.
    Route {
        peer: PeerName,
        next_hop: Option<PeerName>,
    },
    /// Pod addresses in `prefix` are now forwarded so; `None`: withdrawn.
    Prefix {
        prefix: Ipv4Net,
        forward: Option<Forward>,
    },
    /// An IPAM change: allocations completing or failing, the ring seeded,
    /// conflicts.
    Ipam(IpamEvent),
}

/// The control plane of one node.
#[derive(Debug)]
pub struct Router {
    config: Config,
    me: PeerName,
    restarts: u32,
    /// Seal epoch of this start: see [`seal::boot_epoch`].
    epoch: u64,
    send_counter: u64,
    /// Version of our latest entry; starts at the boot epoch so that every
    /// start outbids the previous one's entries.
    own_version: u64,
    /// Our heartbeat tokens of the last dead interval, newest last; a peer
    /// confirms a connection by echoing one of them.
    tokens: VecDeque<(u64, Time)>,
    /// Topology or connections changed since routes were computed.
    routes_dirty: bool,
    /// The set of known peers changed since learnt addresses were synced.
    peers_dirty: bool,
    /// A peer's connections changed: which peers have free slots (see
    /// `note_open_peers`) may have, whether or not our routes did.
    open_dirty: bool,
    topology: Topology,
    routes: Routes,
    connections: Connections,
    /// Entries being pushed, with the rounds each has left.
    news: BTreeMap<PeerName, u8>,
    /// Forgotten peers and the version they had, so stale copies are not
    /// learnt again; kept until the time given.
    forgotten: BTreeMap<PeerName, (u64, Time)>,
    /// Entries asked for and not received yet: (version, asked at). News
    /// of one update reaches a node from several peers within a round
    /// trip; asking each of them would fetch the entry several times.
    requested: BTreeMap<PeerName, (u64, Time)>,
    unreachable: Unreachable,
    sealer: Option<Sealer>,
    replay: BTreeMap<PeerName, ReplayWindow>,
    ipam: Ipam,
    forwarding: ForwardingTable,
    /// Owned prefixes two peers announce at once (node-cidr mode).
    overlaps: Vec<(Ipv4Net, PeerName)>,
    /// IPAM may have work: announcements, routes or local requests changed.
    ipam_dirty: bool,
    /// Ring summary and routes the forwarding table was built from.
    forwarding_built_from: Option<(u64, u64)>,
    /// Bumped whenever routes change (cheaper to compare than the routes).
    routes_generation: u64,
    /// Confirmed connections as last reported in events; announced in our
    /// entry when `Timer::Announce` fires.
    connections_seen: Vec<PeerName>,
    /// A link may have become, or stopped being, established.
    links_changed: bool,
    /// Our ring summary and the tick that first saw it.
    ring_since: (u64, Time),

    rng: Random,
    timers: TimerTable,
    /// Where this tick's share of heartbeats starts among the links, when
    /// there are more links than heartbeats per interval.
    heartbeat_cursor: usize,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    traffic: Traffic,
    dropped: BTreeMap<DropReason, u64>,
    /// Links dropped to make room for a peer with none (see `make_room`).
    links_shed: u64,
}

/// What a heartbeat tells its receiver besides liveness (see [`Heartbeat`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flag {
    None,
    Probe,
    Refused,
    Alone,
}
/// Probes per heartbeat interval to a silent link.
const PROBES_PER_INTERVAL: u32 = 4;
/// Routes, learnt addresses and the IPAM step wait this long for more
/// changes before running (Weave debounced routes by 100 ms).
/// Links beyond the limit a node keeps for peers it cannot reach otherwise.
const LINK_RESERVE: usize = 1;
const HOUSEKEEPING_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(50);

impl Router {
    /// A node from its persisted state, or a brand-new peer when `state` is
    /// `None`. Persist [`Router::state`] before sending its first datagram.
    pub fn new(
        config: Config,
        state: Option<PersistedState>,
        seed: [u8; 32],
        now: Time,
    ) -> Result<Router, ConfigError> {
        config.validate()?;
        let mut config = config;
        config.nickname = clamp_nickname(&config.nickname);
        let mut rng = Random::from_seed(seed);
        let (me, restarts, ipam_state) = match state {
            Some(s) => (s.name, s.restarts.saturating_add(1), s.ipam),
            None => (PeerName(rng.next_u64()), 0, None),
        };
        if let Some(saved) = ipam_state.as_ref().map(|s| s.ring.universe())
            && saved != config.ipalloc_range.trunc()
        {
            return Err(ConfigError::RangeChanged {
                saved,
                configured: config.ipalloc_range,
            });
        }
        if let Some(saved) = &ipam_state {
            saved
                .check(&config.ipam)
                .map_err(ConfigError::InvalidState)?;
        }
        let ipam = Ipam::new(me, config.ipalloc_range, config.ipam.clone(), 1, ipam_state);
        let epoch = seal::boot_epoch(config.start_clock, restarts);
        // Entry versions start there too, so that, like the epoch, they
        // outbid every earlier start's (which made fewer than 2^20 updates
        // per millisecond) even when the state file was restored.
        let version = epoch;
        let own = PeerEntry {
            version,
            name: me,
            nickname: config.nickname.clone(),
            address: config.address,
            connections: Vec::new(),
            ipam: ipam.info(),
        };
        let sealer = config.secret.as_deref().map(Sealer::new);
        let mut router = Router {
            me,
            restarts,
            epoch,
            send_counter: 0,
            own_version: version,
            tokens: VecDeque::new(),
            routes_dirty: true,
            peers_dirty: true,
            open_dirty: false,
            topology: Topology::new(own),
            routes: Routes::compute(me, &BTreeMap::new()),
            connections: Connections::default(),
            news: BTreeMap::from([(me, config.rumor_rounds)]),
            forgotten: BTreeMap::new(),
            requested: BTreeMap::new(),
            unreachable: Unreachable::default(),
            sealer,
            replay: BTreeMap::new(),
            ipam,
            forwarding: ForwardingTable::default(),
            overlaps: Vec::new(),
            ipam_dirty: true,
            forwarding_built_from: None,
            routes_generation: 0,
            connections_seen: Vec::new(),
            links_changed: true,

            rng,
            timers: TimerTable::default(),
            heartbeat_cursor: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            ring_since: (0, now),
            traffic: Traffic::default(),
            dropped: BTreeMap::new(),
            links_shed: 0,
            config,
        };
        // A restored ring routes from the start: the kernel dataplane asks
        // for its first state before any timer ran, and must learn which
        // prefixes are still others' (unreachable until they reconnect)
        // rather than find none.
        router.update_forwarding();
        router.timers.set(Timer::Tick, now);
        Ok(router)
    }

    pub fn name(&self) -> PeerName {
        self.me
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// This start's seal epoch; the sleeve seals its frames under it too.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The value to persist (and to pass to [`Router::new`] on restart).
    pub fn state(&self) -> PersistedState {
        PersistedState {
            name: self.me,
            restarts: self.restarts,
            ipam: Some(self.ipam.state()),
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// When each peer with a link was last heard from.
    pub fn last_heard(&self) -> impl Iterator<Item = (PeerName, Time)> + '_ {
        self.connections
            .links()
            .map(|(peer, link)| (peer, link.last_heard))
    }

    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// Peers with a connection confirmed both ways.
    pub fn established(&self, now: Time) -> Vec<PeerName> {
        self.connections.established(now, self.dead_after())
    }

    /// Where `peer` sends from, if it has a direct connection it has
    /// confirmed (dead links are dropped at the next heartbeat tick): the
    /// only source a sleeve frame from `peer` is taken from.
    pub fn connected_address(&self, peer: PeerName) -> Option<SocketAddr> {
        let link = self.connections.link(peer)?;
        link.confirmed_at.map(|_| link.address)
    }

    // ---- inputs -------------------------------------------------------

    /// An operator-given peer address (`--peer`): kept and retried forever.
    pub fn add_peer_address(&mut self, now: Time, address: SocketAddr) {
        if address != self.config.address {
            self.connections.add_target(now, address, true);
        }
        // Tried at the next timeout, which is now: adding a thousand
        // addresses then costs one pass over them, not a thousand.
        self.refresh_attempt(self.reserve_open(now));
    }

    /// An address for `container` (a CNI container ID): the same one every
    /// time. `Pending` completes later with an [`Event::Ipam`].
    pub fn allocate(&mut self, now: Time, container: &str) -> Result<Allocation, IpamError> {
        let views = peer_views(&self.topology, &self.routes, self.me);
        let result = self.ipam.allocate(now, container, &views);
        self.ipam_dirty = true;
        self.settle(now);
        result
    }

    /// Frees `container`'s address; `Ok(None)` if it had none (idempotent).
    pub fn release(&mut self, now: Time, container: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        let result = self.ipam.release(container);
        self.ipam_dirty = true;
        self.settle(now);
        result
    }

    /// Re-registers `addr` for `container` after a restart.
    pub fn claim(
        &mut self,
        now: Time,
        container: &str,
        addr: Ipv4Addr,
    ) -> Result<Allocation, IpamError> {
        let views = peer_views(&self.topology, &self.routes, self.me);
        let result = self.ipam.claim(container, addr, &views);
        self.ipam_dirty = true;
        self.settle(now);
        result
    }

    /// `peer`'s node was deleted from the cluster: take over its address
    /// space (once; refused while it is reachable) and forget it for good.
    /// Returns the number of addresses taken over.
    pub fn remove_peer(&mut self, now: Time, peer: PeerName) -> Result<u64, IpamError> {
        let reachable = self.routes.is_reachable(peer) && peer != self.me;
        let taken = self.ipam.remove_peer(peer, reachable)?;
        self.forget_for_good(peer);
        self.ipam_dirty = true;
        self.settle(now);
        Ok(taken)
    }

    /// Drops a removed peer's entry; its identity is never learnt again.
    fn forget_for_good(&mut self, peer: PeerName) {
        if let Some(entry) = self.topology.remove(peer) {
            let never = Time::from_duration(std::time::Duration::MAX);
            self.forgotten.insert(peer, (u64::MAX, never));
            self.events
                .push_back(Event::PeerForgotten { peer: entry.name });
        }
        self.unreachable.clear(peer);
        self.news.remove(&peer);
        self.routes_dirty = true;
        self.peers_dirty = true;
    }

    /// This node's podCIDR, in node-cidr mode (from `node.spec.podCIDR`).
    pub fn set_pod_cidr(&mut self, now: Time, cidr: Ipv4Net) {
        self.ipam.set_pod_cidr(cidr);
        self.ipam_dirty = true;
        self.settle(now);
    }

    /// Where a packet for `dst` goes.
    pub fn forward(&self, dst: Ipv4Addr) -> Forward {
        self.forwarding.lookup(dst)
    }

    /// This node's bridge gateway address, once it has address space.
    /// Where every pod prefix goes: the kernel dataplane's route table.
    pub fn forwarding(&self) -> &ForwardingTable {
        &self.forwarding
    }

    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.ipam.gateway()
    }

    pub fn ipam(&self) -> &Ipam {
        &self.ipam
    }

    /// Stops trying an operator-given address (learnt ones stay).
    pub fn remove_peer_address(&mut self, address: SocketAddr) {
        self.connections.remove_target(address);
        // The reserve is looked at again on the next input, which has a time.
        self.refresh_attempt(false);
    }

    /// A datagram from the network: untrusted bytes.
    pub fn handle_datagram(&mut self, now: Time, from: SocketAddr, bytes: &[u8]) {
        self.traffic.received_datagrams += 1;
        self.traffic.received_bytes += bytes.len() as u64;
        match self.open(now, bytes) {
            Ok((sender, message)) => self.dispatch(now, from, sender, message),
            Err(reason) => *self.dropped.entry(reason).or_default() += 1,
        }
        self.settle(now);
    }

    /// Time has passed: run whatever is due.
    pub fn handle_timeout(&mut self, now: Time) {
        for timer in Timer::ALL {
            if timer == Timer::Attempt {
                // The timers before may have changed links, and whether a
                // reserve link is open changes with time alone.
                self.refresh_attempt(self.reserve_open(now));
            }
            if self.timers.is_expired(timer, now) {
                self.timers.stop(timer);
                self.on_timeout(timer, now);
            }
        }
        self.settle(now);
    }

    /// Runs an expired (and stopped) timer's work, which arms it again if
    /// there is more to do.
    fn on_timeout(&mut self, timer: Timer, now: Time) {
        match timer {
            Timer::Housekeeping => self.housekeeping(now),
            Timer::Announce => {
                if self.connections_seen != self.own_entry().connections {
                    self.announce_links();
                }
            }
            Timer::Tick => self.tick(now),
            Timer::Probe => self.probe_silent_links(now),
            Timer::Gossip => self.push_news(now),
            Timer::Attempt => self.attempt_due(now),
        }
    }

    // ---- outputs ------------------------------------------------------

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When to call [`Router::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Time> {
        // Settled after every input, so the attempt timer is current.
        self.timers.next_timeout()
    }

    // ---- receiving ----------------------------------------------------

    /// Authenticates and decodes a datagram, or says why it is dropped.
    fn open(&mut self, now: Time, bytes: &[u8]) -> Result<(PeerName, Message), DropReason> {
        let frame = Frame::parse(bytes).map_err(drop_reason)?;
        let message = match (&self.sealer, frame.nonce) {
            (Some(sealer), Some(nonce)) => {
                let message = frame.open_message(sealer).map_err(drop_reason)?;
                // Only authentic datagrams touch the replay state, so a
                // forger cannot advance a sender's window. A window quiet
                // for as long as a dead link lets a lower epoch in: the
                // sender restarted with a clock that went back.
                let stale_after = self.dead_after();
                self.replay
                    .entry(frame.sender)
                    .or_default()
                    .accept(now, stale_after, nonce.epoch, nonce.counter)
                    .map_err(|_| DropReason::Replayed)?;
                message
            }
            (Some(_), None) => return Err(DropReason::Unencrypted),
            (None, Some(_)) => return Err(DropReason::NoSecret),
            (None, None) => frame.plain_message().map_err(drop_reason)?,
        };
        Ok((frame.sender, message))
    }

    fn dispatch(&mut self, now: Time, from: SocketAddr, sender: PeerName, message: Message) {
        if sender == self.me {
            // We reached ourselves through a configured address.
            self.connections.is_own_address(from);
            return;
        }
        if self.ipam.ring().is_removed(sender) {
            // A removed peer's identity is gone for good; a reinstalled
            // node comes back under a new name.
            *self.dropped.entry(DropReason::RemovedPeer).or_default() += 1;
            return;
        }
        if let Message::Heartbeat(hb) = message {
            return self.on_heartbeat(now, from, sender, hb);
        }
        if self.connections.link(sender).is_none() {
            *self.dropped.entry(DropReason::NotConnected).or_default() += 1;
            return;
        }
        match message {
            Message::Heartbeat(_) => {}
            Message::Gossip(entries) => entries.into_iter().for_each(|e| self.learn(now, e)),
            Message::Digest(digest) => self.on_digest(now, sender, digest),
            Message::Ring(update) => {
                if self.ipam.merge_ring(now, sender, &update).is_ok() {
                    self.ipam_dirty = true;
                }
            }
            Message::News(versions) => self.request_newer(now, sender, &versions),
            Message::Request(wanted) => self.answer_request(sender, &wanted),
            Message::Announcements(list) => self.on_announcements(now, sender, list),
        }
    }

    fn on_heartbeat(&mut self, now: Time, from: SocketAddr, sender: PeerName, hb: Heartbeat) {
        let echoes_us = hb
            .echo
            .is_some_and(|echo| self.tokens.iter().any(|(t, _)| *t == echo));
        if hb.refused {
            // Only an answer to one of our heartbeats can end a link: a
            // forger without our token cannot cut us off.
            if echoes_us {
                let (base, max) = (self.config.retry_base, self.retry_cap());
                self.connections
                    .refused_by(now, sender, from, base, max, &mut self.rng);
                self.links_changed = true;
            }
            return;
        }
        let dead_after = self.dead_after();
        let established = |c: &Connections| {
            c.link(sender)
                .is_some_and(|l| l.is_established(now, dead_after))
        };
        let was = established(&self.connections);
        let limit = self.link_limit(now, sender);
        if hb.alone
            && self.connections.link(sender).is_none()
            && self.connections.link_count() >= limit
        {
            self.make_room(now);
        }
        let heard = self
            .connections
            .heard(now, sender, from, &hb, echoes_us, limit);
        // A new link may also have replaced an old one at that address.
        let is = established(&self.connections);
        self.links_changed |= heard == Heard::NewLink || was != is;
        // A link to a cut-off peer joins two parts of the cluster, a
        // partition healing: each side has news the other lacks, and
        // rumours, pushed to a few random links a round, would cross this
        // one only by chance (seconds at 1,000 nodes). Sync over it at once.
        if is && !was && self.is_cut_off(now, sender) {
            self.sync_with(now, sender);
        }
        match heard {
            Heard::Refused => {
                *self.dropped.entry(DropReason::ConnectionLimit).or_default() += 1;
                self.send(from, &self.heartbeat(Some(hb.token), Flag::Refused));
            }
            Heard::NewLink | Heard::Unconfirmed => {
                self.send_heartbeat(from, Some(hb.token), Flag::None)
            }
            Heard::Known if hb.probe => self.send_heartbeat(from, Some(hb.token), Flag::None),
            Heard::Known => {}
        }
    }

    /// Drops a redundant link, if we have one, so that a peer with no
    /// link at all can join through us at our limit. Refusing it instead
    /// left a node told one address of a full cluster alone for good. The
    /// dropped peer keeps a route through a common neighbour, frees a slot
    /// the newcomers fill, and is not alone, so it asks nobody to make
    /// room in turn: one join costs one dropped link, no chain of them.
    fn make_room(&mut self, now: Time) {
        let dead_after = self.dead_after();
        let topology = &self.topology;
        let links_of = |peer: PeerName| topology.get(peer).map(|e| e.connections.as_slice());
        let Some(peer) =
            self.connections
                .redundant_link(self.me, now, dead_after, links_of, &mut self.rng)
        else {
            return;
        };
        if let Some(link) = self.connections.drop_link(peer) {
            // A refusal ends the link at the other end too (it echoes the
            // peer's token, so it is believed).
            self.send(
                link.address,
                &self.heartbeat(Some(link.token), Flag::Refused),
            );
            self.links_changed = true;
            self.links_shed += 1;
        }
    }

    /// Merges one gossiped entry.
    fn learn(&mut self, now: Time, entry: PeerEntry) {
        if entry.name == self.me {
            // Someone holds an entry of ours at least as new as the one we
            // announce (we restarted without our state): outbid it.
            if entry.version >= self.own_version && entry != *self.own_entry() {
                self.own_version = entry.version;
                self.announce_self(self.own_entry().connections.clone());
            }
            return;
        }
        if !self.admits(entry.name, entry.version) {
            return;
        }
        let name = entry.name;
        let known = self.topology.get(name);
        // Most gossip repeats what we hold: skip the link analysis below
        // for an entry that the merge would leave unchanged anyway.
        if known.is_some_and(|old| entry <= *old) {
            return;
        }
        let nickname = if known.is_none() {
            entry.nickname.clone()
        } else {
            String::new()
        };
        let routes_matter = known.is_none_or(|old| {
            old.connections == entry.connections
                || self.links_matter(name, &old.connections, &entry.connections)
        });
        let merge = self.topology.merge(entry);
        self.took(now, name, merge, nickname, routes_matter);
    }

    /// Merges an announcement for a peer whose held connections it keeps
    /// (most updates only change the IPAM part): in place, without copying
    /// the list or hashing it again, millions of times while a big cluster
    /// starts.
    fn learn_announcement(&mut self, now: Time, announcement: Announcement) {
        let name = announcement.name;
        if !self.admits(name, announcement.version) {
            return;
        }
        let merge = self.topology.merge_keeping_links(announcement);
        self.took(now, name, merge, String::new(), false);
    }

    /// Whether an entry of `name` in `version` may be merged: not one of a
    /// forgotten peer's old versions, nor of a peer removed from the ring.
    fn admits(&mut self, name: PeerName, version: u64) -> bool {
        if let Some((forgotten, _)) = self.forgotten.get(&name) {
            if version <= *forgotten {
                return false;
            }
            self.forgotten.remove(&name);
        }
        !self.ipam.ring().is_removed(name)
    }

    /// Does what a merge of `name`'s entry calls for.
    fn took(
        &mut self,
        now: Time,
        name: PeerName,
        merge: Merge,
        nickname: String,
        routes_matter: bool,
    ) {
        match merge {
            Merge::New => {
                self.events.push_back(Event::PeerDiscovered {
                    peer: name,
                    nickname,
                });
                self.unreachable.mark(name, now);
                self.news.insert(name, self.config.rumor_rounds);
                self.routes_dirty = true;
                self.peers_dirty = true;
                self.ipam_dirty = true;
            }
            Merge::Updated {
                connections_changed,
                address_changed,
                ipam_changed,
            } => {
                self.news.insert(name, self.config.rumor_rounds);
                self.routes_dirty |= connections_changed && routes_matter;
                self.peers_dirty |= address_changed;
                self.open_dirty |= connections_changed;
                // Forwarding hands packets to next hops' addresses, and is
                // rebuilt in the IPAM step.
                self.ipam_dirty |= ipam_changed || address_changed;
                if address_changed {
                    self.forwarding_built_from = None;
                }
            }
            Merge::Unchanged => {}
        }
    }

    /// Whether `peer`'s connections going from `old` to `new` can change
    /// any of our routes. In a big cluster most link changes change none,
    /// and recomputing every route for each would dominate the cost.
    fn links_matter(&self, peer: PeerName, old: &[PeerName], new: &[PeerName]) -> bool {
        let lost = old.iter().filter(|p| new.binary_search(p).is_err());
        let gained = new.iter().filter(|p| old.binary_search(p).is_err());
        for (&other, is_new) in lost.map(|p| (p, false)).chain(gained.map(|p| (p, true))) {
            // Only mutual claims are links.
            let mutual = self
                .topology
                .get(other)
                .is_some_and(|e| e.connections.binary_search(&peer).is_ok());
            if mutual
                && (peer == self.me
                    || other == self.me
                    || self.routes.link_changes(peer, other, is_new))
            {
                return true;
            }
        }
        false
    }

    /// Sends the entries asked for: whole, or as announcements where the
    /// asker holds the same connection list.
    fn answer_request(&mut self, peer: PeerName, wanted: &[(PeerName, Option<u64>)]) {
        let mut whole = Vec::new();
        let mut announcements = Vec::new();
        for (name, held) in wanted {
            let (Some(entry), Some(links)) = (
                self.topology.get(*name),
                self.topology.links_fingerprint(*name),
            ) else {
                continue;
            };
            if *held == Some(links) {
                announcements.push(Announcement::of(entry, links));
            } else {
                whole.push(entry.clone());
            }
        }
        self.send_entries(peer, &whole);
        for message in wire::pack_announcements(announcements) {
            self.send_to_peer(peer, &message);
        }
    }

    /// Learns announced entries with the connection list we hold; asks
    /// again, for whole entries, where ours changed since we asked.
    fn on_announcements(&mut self, now: Time, sender: PeerName, list: Vec<Announcement>) {
        let mut refetch = Vec::new();
        for announcement in list {
            let held_links = self.topology.links_fingerprint(announcement.name);
            match self.topology.get(announcement.name) {
                Some(_)
                    if held_links == Some(announcement.links) && announcement.name != self.me =>
                {
                    self.learn_announcement(now, announcement);
                }
                Some(held) if held_links == Some(announcement.links) => {
                    let entry = announcement.with_connections(held.connections.clone());
                    self.learn(now, entry);
                }
                Some(held) if held.version >= announcement.version => {}
                _ => refetch.push((announcement.name, None)),
            }
        }
        for chunk in refetch.chunks(wire::MAX_NAMES) {
            self.send_to_peer(sender, &Message::Request(chunk.to_vec()));
        }
    }

    /// Anti-entropy, receiving side: give the peer what it lacks, ask for
    /// what we lack.
    ///
    /// Entries we are still spreading as news go as news, not whole: other
    /// neighbours are likely pushing the same news to the peer, and it
    /// pulls each entry once however many of them tell it. Pushing them
    /// whole made a starting 1,000-node cluster send every entry about
    /// twice as often as needed (most of its gossip bytes). Settled
    /// entries, which only a lost datagram can have kept from the peer,
    /// go whole: repair takes one trip, not three, on a lossy network.
    fn on_digest(&mut self, now: Time, sender: PeerName, digest: Digest) {
        let theirs: BTreeMap<PeerName, u64> = digest.versions.iter().copied().collect();
        let (mut spreading, mut settled) = (Vec::new(), Vec::new());
        for (name, version) in self.topology.versions_in(digest.first, digest.last) {
            if theirs.get(&name).is_some_and(|v| *v >= version) {
                continue;
            }
            if self.news.contains_key(&name) {
                spreading.push((name, version));
            } else if let Some(entry) = self.topology.get(name) {
                settled.push(entry.clone());
            }
        }
        for news in spreading.chunks(wire::MAX_NEWS) {
            self.send_to_peer(sender, &Message::News(news.to_vec()));
        }
        self.send_entries(sender, &settled);
        self.request_newer(now, sender, &digest.versions);
    }

    /// Asks `peer` for the entries it has in newer versions than ours.
    /// Entries already asked for (in that version or newer) are not asked
    /// for again until the request lapses.
    fn request_newer(&mut self, now: Time, peer: PeerName, versions: &[(PeerName, u64)]) {
        let lapse = self.config.gossip_interval * 2;
        let want: Vec<(PeerName, u64)> = versions
            .iter()
            .filter(|(name, version)| {
                *name != self.me
                    && self.topology.version(*name).is_none_or(|v| v < *version)
                    && self.forgotten.get(name).is_none_or(|(v, _)| v < version)
                    && self
                        .requested
                        .get(name)
                        .is_none_or(|(v, at)| v < version || now.saturating_since(*at) >= lapse)
            })
            .copied()
            .collect();
        for (name, version) in &want {
            self.requested.insert(*name, (*version, now));
        }
        let want: Vec<(PeerName, Option<u64>)> = want
            .into_iter()
            .map(|(name, _)| {
                let held = self.topology.links_fingerprint(name);
                (name, held)
            })
            .collect();
        for chunk in want.chunks(wire::MAX_NAMES) {
            self.send_to_peer(peer, &Message::Request(chunk.to_vec()));
        }
    }

    // ---- timers -------------------------------------------------------

    /// The heartbeat tick: liveness, heartbeats, forgetting, anti-entropy.
    fn tick(&mut self, now: Time) {
        let dead_after = self.dead_after();
        // Replay windows outlive the link: an old datagram replayed after a
        // link died must still be refused.
        self.connections.expire(now, dead_after);
        self.tokens
            .retain(|(_, t)| now.saturating_since(*t) <= dead_after);
        self.tokens.push_back((self.rng.next_u64(), now));
        self.send_heartbeats();
        if !self.timers.is_armed(Timer::Probe) && !self.silent_links(now).is_empty() {
            let at = now + self.config.heartbeat_interval / PROBES_PER_INTERVAL;
            self.timers.set(Timer::Probe, at);
        }
        self.forget_stale(now);
        let lapse = self.config.gossip_interval * 2;
        self.requested
            .retain(|_, (_, at)| now.saturating_since(*at) < lapse);
        self.start_anti_entropy(now);
        // Seeding rounds and donations move on timers too.
        self.ipam_dirty |= self.ipam.needs_timer();
        self.links_changed = true;
        // ±10% jitter keeps a cluster restarted at once from ticking in step.
        let interval = self.config.heartbeat_interval;
        let jittered = self
            .rng
            .duration_between(interval * 9 / 10, interval * 11 / 10);
        self.timers.set(Timer::Tick, now + jittered);
    }

    /// How far heartbeat intervals and dead times stretch: not at all up
    /// to `heartbeats_per_interval` connections, then in proportion. It
    /// follows the cluster size every node sees alike, not the node's own
    /// link count, so both ends of a link stretch the same.
    fn stretch(&self) -> f64 {
        let links = self
            .topology
            .len()
            .saturating_sub(1)
            .min(self.config.conn_limit);
        (links as f64 / self.config.heartbeats_per_interval.max(1) as f64).max(1.0)
    }

    /// How long a silent link lives.
    fn dead_after(&self) -> Duration {
        self.config.dead_after.mul_f64(self.stretch())
    }

    /// This tick's heartbeats: every link, or with more links than
    /// heartbeats per interval, the next share of them round-robin, so
    /// each link still hears from us once per stretched interval.
    fn send_heartbeats(&mut self) {
        let links: Vec<(SocketAddr, u64)> = self
            .connections
            .links()
            .map(|(_, l)| (l.address, l.token))
            .collect();
        let share = (links.len() as f64 / self.stretch()).ceil() as usize;
        for k in 0..share.min(links.len()) {
            let (address, token) = links[(self.heartbeat_cursor + k) % links.len()];
            self.send_heartbeat(address, Some(token), Flag::None);
        }
        self.heartbeat_cursor = (self.heartbeat_cursor + share) % links.len().max(1);
    }

    /// Links silent for two of their heartbeat intervals: the peer may be
    /// gone, or its heartbeats lost.
    fn silent_links(&self, now: Time) -> Vec<(SocketAddr, u64)> {
        let suspect_after = self.config.heartbeat_interval.mul_f64(2.0 * self.stretch());
        self.connections
            .links()
            .filter(|(_, l)| now.saturating_since(l.last_heard) > suspect_after)
            .map(|(_, l)| (l.address, l.token))
            .collect()
    }

    /// Asks silent links for a heartbeat at once, several times per
    /// interval until they answer or die: lost heartbeats alone then
    /// rarely end a link that still works (30% loss would otherwise drop
    /// some link every few seconds in a small cluster).
    fn probe_silent_links(&mut self, now: Time) {
        let silent = self.silent_links(now);
        for (address, token) in &silent {
            self.send_heartbeat(*address, Some(*token), Flag::Probe);
        }
        if !silent.is_empty() {
            let at = now + self.config.heartbeat_interval / PROBES_PER_INTERVAL;
            self.timers.set(Timer::Probe, at);
        }
    }

    /// The longest backoff between attempts at one address: `retry_max`
    /// from 100 addresses up, less below, so this node sends at most about
    /// three attempts a second in all. A small cluster that healed from a
    /// partition then reconnects within seconds, not at the end of a
    /// 30-second backoff; a big one does as soon as any of its many
    /// addresses is tried.
    fn retry_cap(&self) -> Duration {
        let targets = self.connections.target_count() as f64;
        let (base, max) = (self.config.retry_base, self.config.retry_max);
        max.mul_f64(targets / 100.0).clamp((base * 2).min(max), max)
    }

    /// Links allowed with `peer`: one more than the limit (within
    /// `MAX_CONN_LIMIT`) for a peer cut off from us. When a partition
    /// heals, both sides may be full of links among themselves; without a
    /// reserve no node would try or accept a link across, and the halves
    /// would stay apart for good.
    fn link_limit(&self, now: Time, peer: PeerName) -> usize {
        if self.is_cut_off(now, peer) {
            self.reserve_limit()
        } else {
            self.config.conn_limit
        }
    }

    fn reserve_limit(&self) -> usize {
        (self.config.conn_limit + LINK_RESERVE).min(crate::config::MAX_CONN_LIMIT)
    }

    /// No route to `peer` for longer than routes take to form when a
    /// cluster starts (a stretched heartbeat interval): cut off, not merely
    /// not reached yet (a starting cluster has many of those, and they must
    /// not take the reserve). A link to such a peer joins two parts of the
    /// cluster.
    fn is_cut_off(&self, now: Time, peer: PeerName) -> bool {
        self.unreachable.is_longer_than(peer, now, self.apart())
    }

    fn apart(&self) -> Duration {
        self.config.heartbeat_interval.mul_f64(self.stretch())
    }

    /// Whether a node at its limit may still try a cut-off peer (below
    /// the limit the question does not arise, and it is asked after every
    /// input).
    fn reserve_open(&self, now: Time) -> bool {
        let links = self.connections.link_count();
        links >= self.config.conn_limit
            && links < self.reserve_limit()
            && self.cut_off_peers(now).next().is_some()
    }

    /// Peers [`Router::is_cut_off`] holds cut off, oldest first.
    fn cut_off_peers(&self, now: Time) -> impl Iterator<Item = PeerName> + '_ {
        self.unreachable.longer_than(now, self.apart())
    }

    /// Arms the attempt timer for when the next attempt is due, if any.
    fn refresh_attempt(&mut self, reserve_open: bool) {
        let at = self
            .connections
            .next_attempt(self.config.conn_limit, reserve_open);
        self.timers.set_or_stop(Timer::Attempt, at);
    }

    /// Tries due addresses, within the connection limit (and the reserve,
    /// for peers we have no route to).
    fn attempt_due(&mut self, now: Time) {
        let reserve: BTreeSet<SocketAddr> =
            if self.connections.link_count() >= self.config.conn_limit {
                self.cut_off_peers(now)
                    .filter_map(|n| self.topology.get(n).map(|e| e.address))
                    .collect()
            } else {
                BTreeSet::new()
            };
        let due =
            self.connections
                .due_targets(now, self.config.conn_limit, &reserve, &mut self.rng);
        // A node without a single link asks one peer a round to make room
        // for it: only one, as each full peer that grants it drops a link.
        let mut alone = self.connections.link_count() == 0;
        for address in due {
            let flag = if std::mem::take(&mut alone) {
                Flag::Alone
            } else {
                Flag::None
            };
            self.send_heartbeat(address, None, flag);
            let (base, max) = (self.config.retry_base, self.retry_cap());
            self.connections
                .attempted(now, address, base, max, &mut self.rng);
        }
    }

    /// Starts one digest exchange per tick, with a random connected peer
    /// whose summary differs and that we have not synced with lately. In
    /// steady state summaries agree and nothing is sent: the cost does not
    /// grow with the cluster.
    fn start_anti_entropy(&mut self, now: Time) {
        let ring_summary = self.ipam.ring_summary();
        if self.ring_since.0 != ring_summary {
            self.ring_since = (ring_summary, now);
        }
        let summary = self.topology.summary();
        let interval = self.config.anti_entropy_interval;
        let candidates: Vec<PeerName> = self
            .connections
            .links()
            .filter(|(_, l)| {
                (l.summary != summary || self.ring_differs(l))
                    && l.last_anti_entropy
                        .is_none_or(|t| now.saturating_since(t) >= interval)
            })
            .map(|(p, _)| p)
            .collect();
        if let Some(peer) = self.rng.pick(&candidates, 1).pop() {
            self.sync_with(now, peer);
        }
    }

    /// Whether `link`'s peer holds another ring than ours, as far as its
    /// heartbeats tell.
    fn ring_differs(&self, link: &crate::connections::Link) -> bool {
        // A peer's ring summary comes with its heartbeats, seconds apart
        // in a big cluster: one heard before our ring last changed, or
        // before that change had time to spread by push, says nothing.
        // Sending whole rings on such stale differences cost a 300-node
        // cluster a ring a second per node after every donation.
        let settled =
            self.ring_since.1 + self.config.gossip_interval * u32::from(self.config.rumor_rounds);
        link.ring_summary != self.ipam.ring_summary() && link.last_heard >= settled
    }

    /// One anti-entropy exchange with `peer`: our ring if its differs, and
    /// the versions of our entries if its summary differs.
    fn sync_with(&mut self, now: Time, peer: PeerName) {
        let Some(link) = self.connections.link(peer) else {
            return;
        };
        let ring_differs = self.ring_differs(link);
        let entries_differ = link.summary != self.topology.summary();
        if let Some(link) = self.connections.link_mut(peer) {
            link.last_anti_entropy = Some(now);
        }
        if ring_differs && self.ipam.ring().is_seeded() {
            self.send_ring(peer, &self.ipam.full_ring());
        }
        if entries_differ {
            self.send_digest(peer);
        }
    }

    /// The versions of all our entries, to `peer`: it answers with what
    /// we lack and asks for what it lacks.
    fn send_digest(&mut self, peer: PeerName) {
        let versions: Vec<(PeerName, u64)> = self
            .topology
            .versions_in(PeerName(0), PeerName(u64::MAX))
            .collect();
        for digest in wire::pack_digests(&versions) {
            self.send_to_peer(peer, &digest);
        }
    }

    /// Pushes news to a few random connected peers.
    fn push_news(&mut self, now: Time) {
        let established = self.connections.established(now, self.dead_after());
        let fanout = self.config.gossip_fanout;
        let targets = self.rng.pick(&established, fanout);
        if targets.is_empty() {
            // Nobody to tell yet: keep the news for when someone connects.
            return;
        }
        // Push only (name, version) of the news; peers pull the entries
        // they lack. Most pushes reach peers that already heard, and then
        // cost 16 bytes an entry instead of the whole entry. All of it
        // goes each round, freshest first, a datagram per 64 names: a
        // healed partition brings half a cluster's entries at once, and a
        // datagram a round took seconds to get through them. A digest of
        // all our versions would do as well after a heal, but a starting
        // cluster overflows a datagram of news for seconds, and digests
        // of every entry to every target each round were most of its cost.
        let mut fresh: Vec<(u8, PeerName)> = self.news.iter().map(|(n, r)| (*r, *n)).collect();
        fresh.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let versions: Vec<(PeerName, u64)> = fresh
            .iter()
            .filter_map(|(_, n)| Some((*n, self.topology.version(*n)?)))
            .collect();
        let ring_news = self.ipam.take_ring_news(self.config.rumor_rounds);
        for peer in targets {
            // Ring first: a donor's entry saying "free: 0" should not
            // arrive before the donation it made.
            if let Some(update) = &ring_news {
                self.send_ring(peer, update);
            }
            for news in versions.chunks(wire::MAX_NEWS) {
                self.send_to_peer(peer, &Message::News(news.to_vec()));
            }
        }
        self.news.retain(|_, rounds| {
            *rounds = rounds.saturating_sub(1);
            *rounds > 0
        });
    }

    /// Forgets peers that have been unreachable, and listed by no reachable
    /// peer, for `forget_after`.
    fn forget_stale(&mut self, now: Time) {
        self.forgotten.retain(|_, (_, until)| *until > now);
        // Usually nobody has been unreachable for long (a starting cluster
        // has many peers not reachable yet, none for `forget_after`): skip
        // building the reference set, which costs every link of every peer.
        let due: Vec<PeerName> = self
            .unreachable
            .longer_than(now, self.config.forget_after)
            .collect();
        if due.is_empty() {
            return;
        }
        let referenced: BTreeSet<PeerName> = self
            .topology
            .entries()
            .filter(|e| self.routes.is_reachable(e.name))
            .flat_map(|e| e.connections.iter().copied())
            .collect();
        let stale: Vec<PeerName> = due
            .into_iter()
            .filter(|n| !referenced.contains(n))
            .collect();
        for name in stale {
            self.unreachable.clear(name);
            self.news.remove(&name);
            self.replay.remove(&name);
            self.routes_dirty = true;
            self.peers_dirty = true;
            if let Some(entry) = self.topology.remove(name) {
                let keep_until = now + self.config.forget_after * 2;
                self.forgotten.insert(name, (entry.version, keep_until));
                self.events.push_back(Event::PeerForgotten { peer: name });
            }
        }
    }

    // ---- after every input --------------------------------------------

    /// Brings derived state up to date: our own entry, routes, learnt
    /// addresses, the gossip timer.
    fn settle(&mut self, now: Time) {
        // Links change state only on heartbeats and ticks (expiry, aging);
        // between those there is nothing to recompute.
        if std::mem::take(&mut self.links_changed) {
            let mut established = self.connections.established(now, self.dead_after());
            established.truncate(crate::config::MAX_CONN_LIMIT);
            if established != self.connections_seen {
                self.note_connections(now, established);
            }
        }
        // Work that costs O(peers) or more (routes, learnt addresses, the
        // IPAM step) runs at most once per debounce interval, however many
        // entries change meanwhile: a starting 1,000-node cluster changes
        // thousands of entries a second. The interval grows with the
        // cluster, as each run costs more: 50 ms up to 100 peers, 500 ms
        // at 1,000.
        let dirty = self.routes_dirty || self.ipam_dirty || self.peers_dirty || self.open_dirty;
        if dirty && !self.timers.is_armed(Timer::Housekeeping) {
            let scale = self.stretch().max(self.topology.len() as f64 / 100.0);
            let at = now + HOUSEKEEPING_DEBOUNCE.mul_f64(scale);
            self.timers.set(Timer::Housekeeping, at);
        }
        self.refresh_attempt(self.reserve_open(now));
        let news = !self.news.is_empty() || self.ipam.has_ring_news();
        if news && !self.timers.is_armed(Timer::Gossip) {
            self.timers
                .set(Timer::Gossip, now + self.config.gossip_interval);
        }
    }

    /// Our established links changed to `established` (ascending): tell
    /// the dataplane, and announce them soon.
    fn note_connections(&mut self, now: Time, established: Vec<PeerName>) {
        let before: BTreeSet<PeerName> = self.connections_seen.iter().copied().collect();
        let after: BTreeSet<PeerName> = established.iter().copied().collect();
        for peer in after.difference(&before) {
            if let Some(link) = self.connections.link(*peer) {
                let address = link.address;
                self.events.push_back(Event::ConnectionUp {
                    peer: *peer,
                    address,
                });
            }
        }
        for peer in before.difference(&after) {
            self.events.push_back(Event::ConnectionDown { peer: *peer });
        }
        self.connections_seen = established;
        // Announce connection changes at most once per gossip interval,
        // stretched like heartbeats: a starting node gains its links
        // one by one, and each announcement is a version of an entry
        // of up to 100 names that every peer fetches.
        if !self.timers.is_armed(Timer::Announce) {
            let at = now + self.config.gossip_interval.mul_f64(self.stretch());
            self.timers.set(Timer::Announce, at);
        }
    }

    fn housekeeping(&mut self, now: Time) {
        if std::mem::take(&mut self.routes_dirty) {
            self.update_routes(now);
            self.ipam_dirty = true;
        }
        if std::mem::take(&mut self.peers_dirty) {
            let learnt: BTreeSet<SocketAddr> = self
                .topology
                .entries()
                .filter(|e| e.name != self.me)
                .map(|e| e.address)
                .collect();
            self.connections.sync_learnt_targets(now, &learnt);
        }
        if std::mem::take(&mut self.ipam_dirty) {
            self.step_ipam(now);
        }
        self.open_dirty = false;
        self.note_open_peers();
    }

    /// Which peers to try first for a free slot: those we have a route to
    /// (so they are up) that announce fewer links than the limit. After a
    /// partition each node has half its slots to refill; picking among
    /// all addresses, half of them behind the partition and most of the
    /// rest full, took over ten seconds and kept the cluster churning.
    fn note_open_peers(&mut self) {
        if self.connections.link_count() >= self.config.conn_limit {
            return;
        }
        let open: BTreeSet<SocketAddr> = self
            .topology
            .entries()
            .filter(|e| e.name != self.me && e.connections.len() < self.config.conn_limit)
            .filter(|e| self.routes.is_reachable(e.name))
            .map(|e| e.address)
            .collect();
        self.connections.set_open(open);
    }

    fn update_routes(&mut self, now: Time) {
        let claims: Vec<(PeerName, &[PeerName])> = self
            .topology
            .entries()
            .map(|e| (e.name, e.connections.as_slice()))
            .collect();
        let routes = Routes::compute_sorted(self.me, &claims);
        if routes == self.routes {
            return;
        }
        // Known peers and previously reachable ones, ascending: both lists
        // come sorted, so a stable sort just merges the two runs.
        let names: Vec<PeerName> = self.topology.names().filter(|n| *n != self.me).collect();
        let mut union: Vec<PeerName> = names.clone();
        union.extend(self.routes.iter().map(|(n, _)| n));
        union.sort();
        union.dedup();
        for name in &union {
            let (old, new) = (self.routes.next_hop(*name), routes.next_hop(*name));
            if old != new {
                self.events.push_back(Event::Route {
                    peer: *name,
                    next_hop: new,
                });
            }
        }
        for name in names {
            if routes.is_reachable(name) {
                // Reachable again through others (a partition healed): try
                // the direct link now rather than at the end of a backoff
                // that grew while it was cut off.
                if self.unreachable.clear(name)
                    && let Some(entry) = self.topology.get(name)
                {
                    self.connections
                        .retry_soon(now, entry.address, &mut self.rng);
                }
            } else {
                self.unreachable.mark(name, now);
            }
        }
        self.routes = routes;
        self.routes_generation += 1;
    }

    /// Lets IPAM act on the latest announcements, then republishes ours
    /// and the forwarding table if they changed.
    fn step_ipam(&mut self, now: Time) {
        let views = peer_views(&self.topology, &self.routes, self.me);
        let targets = self
            .connections
            .targets()
            .filter(|(_, t)| t.configured)
            .count();
        self.ipam.step(now, &views, targets, &mut self.rng);
        while let Some(e) = self.ipam.poll_event() {
            self.events.push_back(Event::Ipam(e));
        }
        let removed: Vec<PeerName> = self
            .ipam
            .ring()
            .tombstones()
            .map(|(peer, _)| peer)
            .filter(|peer| self.topology.get(*peer).is_some())
            .collect();
        for peer in removed {
            self.forget_for_good(peer);
        }
        let info = self.ipam.info();
        if info != self.own_entry().ipam && !self.ipam.announcement_waits() {
            let mut entry = self.own_entry().clone();
            entry.ipam = info;
            self.own_version += 1;
            entry.version = self.own_version;
            self.topology.merge(entry);
            self.news.insert(self.me, self.config.rumor_rounds);
        }
        self.update_forwarding();
    }

    /// Rebuilds the forwarding table from ownership and routes, and emits
    /// the prefix changes.
    fn update_forwarding(&mut self) {
        // Node-cidr announcements live in topology entries, so rebuild on
        // any IPAM step there; the ring has a summary to compare.
        let inputs = (self.ipam.ring_summary(), self.routes_generation);
        if matches!(self.ipam.mode(), IpamMode::Ring(_))
            && self.forwarding_built_from.as_ref() == Some(&inputs)
        {
            return;
        }
        self.forwarding_built_from = Some(inputs);
        let owned: Vec<(Ipv4Net, PeerName)> = match self.ipam.mode() {
            IpamMode::Ring(_) => {
                let ring = self.ipam.ring();
                ring.blocks()
                    .map(|b| (b.prefix, ring.resolve(b.label.owner)))
                    .collect()
            }
            IpamMode::NodeCidr(_) => self
                .topology
                .entries()
                .filter_map(|e| Some((e.ipam.pod_cidr?, e.name)))
                .collect(),
        };
        let (table, overlaps) = ForwardingTable::build(owned, |owner| self.decide(owner));
        for (prefix, forward) in self.forwarding.diff(&table) {
            self.events.push_back(Event::Prefix { prefix, forward });
        }
        self.forwarding = table;
        self.overlaps = overlaps;
    }

    fn decide(&self, owner: PeerName) -> Forward {
        if owner == self.me {
            return Forward::Local;
        }
        let Some(next_hop) = self.routes.next_hop(owner) else {
            return Forward::Unreachable;
        };
        match self.topology.get(next_hop) {
            Some(hop) => Forward::Peer {
                owner,
                next_hop,
                underlay: hop.address,
            },
            None => Forward::Unreachable,
        }
    }

    fn own_entry(&self) -> &PeerEntry {
        self.topology
            .get(self.me)
            .expect("the topology always holds our own entry")
    }

    /// Announces our links as they are now, and tells new neighbours of
    /// it directly: links across a healed partition are a few among
    /// thousands, and rumours pushed to random links crossed them only by
    /// chance (at 1,000 nodes one half went 3 s without the other's news).
    fn announce_links(&mut self) {
        let old = self.own_entry().connections.clone();
        self.announce_self(self.connections_seen.clone());
        let news = Message::News(vec![(self.me, self.own_entry().version)]);
        let new: Vec<PeerName> = self
            .connections_seen
            .iter()
            .filter(|p| old.binary_search(p).is_err())
            .copied()
            .collect();
        for peer in new {
            self.send_to_peer(peer, &news);
        }
    }

    fn announce_self(&mut self, connections: Vec<PeerName>) {
        self.own_version += 1;
        let mut entry = self.own_entry().clone();
        entry.version = self.own_version;
        entry.connections = connections;
        entry.connections.sort_unstable();
        self.topology.merge(entry);
        self.news.insert(self.me, self.config.rumor_rounds);
        self.routes_dirty = true;
    }

    // ---- sending ------------------------------------------------------

    /// A heartbeat to `to`, echoing `echo` (the token we last heard from
    /// it, or `None` when we have not heard from it).
    fn send_heartbeat(&mut self, to: SocketAddr, echo: Option<u64>, flag: Flag) {
        if self.tokens.is_empty() {
            // Before the first tick: the token counts from when it is due
            // (the tick timer is stopped only while the tick runs, and the
            // tick makes a token first).
            let from = self.timers.get(Timer::Tick).unwrap_or(Time::ZERO);
            self.tokens.push_back((self.rng.next_u64(), from));
        }
        let message = self.heartbeat(echo, flag);
        self.send(to, &message);
    }

    fn heartbeat(&self, echo: Option<u64>, flag: Flag) -> Message {
        Message::Heartbeat(Heartbeat {
            token: self.tokens.back().map_or(0, |(t, _)| *t),
            echo,
            topology_summary: self.topology.summary(),
            ring_summary: self.ipam.ring_summary(),
            probe: flag == Flag::Probe,
            refused: flag == Flag::Refused,
            alone: flag == Flag::Alone,
        })
    }

    fn send_entries(&mut self, peer: PeerName, entries: &[PeerEntry]) {
        for message in wire::pack_gossip(entries) {
            self.send_to_peer(peer, &message);
        }
    }

    fn send_ring(&mut self, peer: PeerName, update: &RingUpdate) {
        for message in wire::pack_ring(update) {
            self.send_to_peer(peer, &message);
        }
    }

    fn send_to_peer(&mut self, peer: PeerName, message: &Message) {
        if let Some(address) = self.connections.link(peer).map(|l| l.address) {
            self.send(address, message);
        }
    }

    fn send(&mut self, destination: SocketAddr, message: &Message) {
        let encoded = match &self.sealer {
            Some(sealer) => {
                self.send_counter += 1;
                let nonce = SealNonce {
                    sender: self.me.0,
                    epoch: self.epoch,
                    counter: self.send_counter,
                };
                message.encode_sealed(sealer, nonce)
            }
            None => message.encode_plain(self.me),
        };
        // Everything we build is packed to fit; an oversize message would be
        // a bug in packing, not something a peer can cause.
        let Ok(payload) = encoded else {
            debug_assert!(false, "unencodable message {message:?}");
            return;
        };
        self.traffic.sent_datagrams += 1;
        self.traffic.sent_bytes += payload.len() as u64;
        self.traffic.sent_bytes_by_kind[message.kind()] += payload.len() as u64;
        self.transmits.push_back(Transmit {
            destination,
            payload,
        });
    }

    // ---- status -------------------------------------------------------

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped.get(&reason).copied().unwrap_or(0)
    }

    /// Links this node dropped to let a peer with no link join.
    pub fn links_shed(&self) -> u64 {
        self.links_shed
    }

    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    pub fn status(&self, now: Time) -> Status {
        let dead_after = self.dead_after();
        let own = self.own_entry();
        let peers = self
            .topology
            .entries()
            .map(|e| PeerStatus {
                name: e.name,
                nickname: e.nickname.clone(),
                address: e.address,
                version: e.version,
                reachable: self.routes.is_reachable(e.name),
                next_hop: self.routes.next_hop(e.name),
                hops: self.routes.hops(e.name),
                connections: e.connections.len(),
            })
            .collect();
        let connections = self
            .connections
            .links()
            .filter_map(|(peer, link)| {
                Some(ConnectionStatus {
                    peer,
                    nickname: self.topology.get(peer).map(|e| e.nickname.clone()),
                    address: link.address,
                    state: self.connections.state_of(peer, now, dead_after)?,
                    last_heard_ms_ago: now.saturating_since(link.last_heard).as_millis() as u64,
                })
            })
            .collect();
        let linked: BTreeSet<SocketAddr> =
            self.connections.links().map(|(_, l)| l.address).collect();
        let targets = self
            .connections
            .targets()
            .filter(|(a, _)| !linked.contains(a))
            .map(|(address, t)| TargetStatus {
                address,
                configured: t.configured,
                attempts: t.attempts,
                next_try_in_ms: t.next_try.saturating_since(now).as_millis() as u64,
            })
            .collect();
        Status {
            name: self.me,
            nickname: own.nickname.clone(),
            address: own.address,
            version: own.version,
            encrypted: self.sealer.is_some(),
            peers,
            connections,
            targets,
            traffic: self.traffic,
            dropped: self.dropped.clone(),
            ipam: self.ipam_status(),
        }
    }

    fn ipam_status(&self) -> IpamStatus {
        let ipam = &self.ipam;
        let ring = ipam.ring();
        let views = peer_views(&self.topology, &self.routes, self.me);
        let mut owned: BTreeMap<PeerName, Vec<Ipv4Net>> = BTreeMap::new();
        for (prefix, forward) in self.forwarding.prefixes() {
            let owner = match forward {
                Forward::Local => self.me,
                Forward::Peer { owner, .. } => *owner,
                Forward::Unreachable => match ipam.mode() {
                    IpamMode::Ring(_) => ring.owner_of(prefix.network()).unwrap_or_default(),
                    IpamMode::NodeCidr(_) => self
                        .topology
                        .entries()
                        .find(|e| e.ipam.pod_cidr == Some(*prefix))
                        .map_or(PeerName::default(), |e| e.name),
                },
            };
            owned.entry(owner).or_default().push(*prefix);
        }
        let peers = owned
            .into_iter()
            .map(|(name, prefixes)| {
                let total: u64 = prefixes.iter().map(|p| 1u64 << (32 - p.prefix_len())).sum();
                let free = if name == self.me {
                    ipam.free()
                } else {
                    views.get(&name).map_or(0, |v| v.info.free)
                };
                IpamPeerStatus {
                    name,
                    nickname: self
                        .topology
                        .get(name)
                        .map_or_else(String::new, |e| e.nickname.clone()),
                    reachable: name == self.me || self.routes.is_reachable(name),
                    owned: total,
                    free,
                    used: total.saturating_sub(free),
                    prefixes,
                }
            })
            .collect();
        let reason = ipam.pending_reason(&views).to_string();
        let pending = ipam
            .pending()
            .map(|c| PendingStatus {
                container: c.to_string(),
                reason: reason.clone(),
            })
            .collect();
        let mut errors: Vec<String> = ipam
            .ring_errors()
            .map(|(peer, e)| format!("peer {peer}: {e}"))
            .collect();
        errors.extend(self.overlaps.iter().map(|(prefix, peer)| {
            format!("peer {peer} announces podCIDR {prefix}, which overlaps another peer's: give every node a distinct podCIDR")
        }));
        errors.extend(ipam.conflicts().map(|(c, a)| {
            format!(
                "container {c} holds {a}, which the ring now gives to {}: release and re-create it",
                ring.owner_of(a).map_or("nobody".into(), |o| o.to_string())
            )
        }));
        IpamStatus {
            mode: match ipam.mode() {
                IpamMode::Ring(crate::ipam::IpamInit::Observer) => "observer",
                IpamMode::Ring(_) => "ring",
                IpamMode::NodeCidr(_) => "node-cidr",
            }
            .into(),
            range: ipam.range(),
            seeded: ring.is_seeded(),
            seed: ring.seed().map(|s| format!("{:016x}", s.id)),
            gateway: ipam.gateway(),
            peers,
            pending,
            errors,
        }
    }
}

#[cfg(test)]
#[path = "router_tests.rs"]
mod tests;

/// How every other peer looks to IPAM. A free function over the fields it
/// reads, so IPAM can be borrowed mutably beside it.
fn peer_views<'a>(
    topology: &'a Topology,
    routes: &Routes,
    me: PeerName,
) -> BTreeMap<PeerName, PeerView<'a>> {
    topology
        .entries()
        .filter(|e| e.name != me)
        .map(|e| {
            let view = PeerView {
                info: &e.ipam,
                reachable: routes.is_reachable(e.name),
            };
            (e.name, view)
        })
        .collect()
}

fn drop_reason(e: WireError) -> DropReason {
    match e {
        WireError::UnsupportedVersion(_) => DropReason::UnsupportedVersion,
        WireError::Auth(_) => DropReason::Authentication,
        _ => DropReason::Malformed,
    }
}
