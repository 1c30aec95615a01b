//! Per-peer fastdp health: does our VXLAN traffic reach each peer?
//!
//! A firewall that drops UDP 6784 on one node (or between two) breaks
//! kernel VXLAN towards that node while the control plane on UDP 6783
//! still works, and pods would silently stop reaching each other. So every
//! second the agent sends each direct VXLAN neighbour a *probe* that only
//! VXLAN can deliver: from the control socket to `peer:6784`, a datagram
//! whose payload is a whole VXLAN packet (VXLAN header, Ethernet to the
//! peer's VTEP MAC, IPv4 from our underlay address to the peer's, UDP from
//! our control port to the peer's) around a probe request. The peer's
//! kernel decapsulates it and delivers the inner datagram to the peer
//! agent's control socket as if it came from our control port; the agent
//! recognises the magic before the driver loop sees it and answers with a
//! plain datagram to our control port. A reply therefore proves that our
//! VXLAN packets reach the peer: the direction that decides our own routes.
//!
//! [`FastdpHealth`] turns sends, replies and time into a per-peer verdict
//! (no clock inside); [`Prober`] and [`run`] are the I/O around it. Peers
//! whose probes go unanswered while the control plane hears from them fall
//! back to the sleeve: `desired::desired` routes their prefixes into the
//! TUN device.

use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use weft_core::View;
use weft_core::{PeerName, Time};

/// Starts every probe datagram. Never the start of a weft datagram
/// (`WEFT`), so the two can never be mistaken for each other.
pub const MAGIC: &[u8; 8] = b"WFTPROBE";
/// Magic, kind, nonce, sender.
pub const PROBE_LEN: usize = 8 + 1 + 8 + 8;
const REQUEST: u8 = 1;
const REPLY: u8 = 2;

/// How often each peer is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Unanswered probes in a row that make a peer fall back to the sleeve.
const FALL_BACK_AFTER: u32 = 3;
/// Answered probes in a row that bring it back to fastdp.
const RECOVER_AFTER: u32 = 2;
/// Least time between two switches of one peer, so a lossy path does not
/// move its routes back and forth every second.
const MIN_DWELL: Duration = Duration::from_secs(5);
/// A probe is missed only if the control plane heard from the peer this
/// long after the probe went out (and no reply came): the underlay worked
/// then, so only VXLAN can have lost it.
const REPLY_WAIT: Duration = Duration::from_millis(500);
/// A probe neither answered nor missed by then (the control plane was
/// silent too) is forgotten: not a fastdp problem.
const FORGET_AFTER: Duration = Duration::from_secs(10);
/// Probes remembered per peer.
const MAX_OUTSTANDING: usize = 8;

// ---------------------------------------------------------------------------
// Wire

/// A probe datagram: the payload of the inner UDP datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub kind: ProbeKind,
    pub nonce: u64,
    pub sender: PeerName,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    Request,
    Reply,
}

impl Probe {
    pub fn encode(&self) -> [u8; PROBE_LEN] {
        let mut out = [0u8; PROBE_LEN];
        out[..8].copy_from_slice(MAGIC);
        out[8] = match self.kind {
            ProbeKind::Request => REQUEST,
            ProbeKind::Reply => REPLY,
        };
        out[9..17].copy_from_slice(&self.nonce.to_be_bytes());
        out[17..25].copy_from_slice(&self.sender.0.to_be_bytes());
        out
    }

    /// The probe in `datagram`, or `None` if it is not a well-formed one.
    /// Trailing bytes are ignored, so a later version may append fields.
    pub fn parse(datagram: &[u8]) -> Option<Probe> {
        let rest = datagram.strip_prefix(MAGIC)?;
        let (&kind, rest) = rest.split_first()?;
        let kind = match kind {
            REQUEST => ProbeKind::Request,
            REPLY => ProbeKind::Reply,
            _ => return None,
        };
        let nonce = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
        let sender = u64::from_be_bytes(rest.get(8..16)?.try_into().ok()?);
        Some(Probe {
            kind,
            nonce,
            sender: PeerName(sender),
        })
    }
}

/// Whether a datagram on the control port belongs to the prober (well
/// formed or not): such datagrams never go to the driver loop.
pub fn is_probe(datagram: &[u8]) -> bool {
    datagram.starts_with(MAGIC)
}

/// The addresses of one VXLAN-encapsulated probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encapsulation {
    pub vni: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

const VXLAN_HDR: usize = 8;
const ETH_HDR: usize = 14;
const IP_HDR: usize = 20;
const UDP_HDR: usize = 8;

/// The UDP payload to send to the peer's VXLAN port: VXLAN header,
/// Ethernet, IPv4 and UDP headers, then `payload`.
pub fn encapsulate(e: &Encapsulation, payload: &[u8]) -> Vec<u8> {
    let udp_len = UDP_HDR + payload.len();
    let ip_len = IP_HDR + udp_len;
    let mut out = Vec::with_capacity(VXLAN_HDR + ETH_HDR + ip_len);
    // VXLAN: flags (I: the VNI is valid), reserved, VNI, reserved.
    out.extend_from_slice(&[0x08, 0, 0, 0]);
    out.extend_from_slice(&(e.vni << 8).to_be_bytes());
    // Ethernet to the peer's VTEP MAC: the kernel passes only frames for
    // its own MAC up to IP.
    out.extend_from_slice(&e.dst_mac);
    out.extend_from_slice(&e.src_mac);
    out.extend_from_slice(&[0x08, 0x00]);
    let ip_start = out.len();
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&(ip_len as u16).to_be_bytes());
    // Identification 0, don't fragment, TTL 64, UDP, checksum below.
    out.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    out.extend_from_slice(&e.src.ip().octets());
    out.extend_from_slice(&e.dst.ip().octets());
    let csum = checksum(&[&out[ip_start..]]);
    out[ip_start + 10..ip_start + 12].copy_from_slice(&csum.to_be_bytes());
    let udp_start = out.len();
    out.extend_from_slice(&e.src.port().to_be_bytes());
    out.extend_from_slice(&e.dst.port().to_be_bytes());
    out.extend_from_slice(&(udp_len as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    // Optional over IPv4, but cheap, and it spares the peer a datagram a
    // strict middlebox might frown at.
    let pseudo = [
        &e.src.ip().octets()[..],
        &e.dst.ip().octets()[..],
        &[0, 17],
        &(udp_len as u16).to_be_bytes()[..],
    ]
    .concat();
    let csum = match checksum(&[&pseudo, &out[udp_start..]]) {
        // 0 means "no checksum"; its ones' complement twin says "zero".
        0 => 0xffff,
        c => c,
    };
    out[udp_start + 6..udp_start + 8].copy_from_slice(&csum.to_be_bytes());
    out
}

/// The Internet checksum of the concatenated parts (each of even length
/// but the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    use crate::sleeve::offload::{fold, sum};
    !fold(parts.iter().fold(0, |acc, part| sum(part, acc)))
}

// ---------------------------------------------------------------------------
// Health

/// Which path a peer's prefixes take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Fastdp,
    Sleeve,
}

/// A direct VXLAN neighbour to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub peer: PeerName,
    pub nickname: String,
    /// Its underlay IP and control port (where the inner datagram goes).
    pub control: SocketAddrV4,
    /// When the control plane last heard from it, if connected.
    pub last_heard: Option<Time>,
}

/// A probe request to send now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSend {
    pub peer: PeerName,
    pub control: SocketAddrV4,
    pub nonce: u64,
}

#[derive(Clone, Debug)]
struct PeerHealth {
    nickname: String,
    control: SocketAddrV4,
    path: Path,
    /// When `path` last changed.
    switched: Option<Time>,
    /// Probes sent and neither answered nor missed yet: (nonce, sent).
    outstanding: VecDeque<(u64, Time)>,
    misses: u32,
    replies: u32,
    /// When the first probe of the current run of misses went out.
    failing_since: Option<Time>,
    last_reply: Option<Time>,
    reason: Option<String>,
}

/// One peer's dataplane, for status (`/status/connections` under
/// `dataplane.peers`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerDataplane {
    pub peer: PeerName,
    pub nickname: String,
    pub underlay: IpAddr,
    /// "fastdp" or "sleeve".
    pub dataplane: &'static str,
    /// Why not fastdp (or, without a sleeve, why fastdp is failing).
    pub reason: Option<String>,
    pub last_reply_ms_ago: Option<u64>,
}

/// The fastdp verdict per peer, fed with probe sends, replies and time.
///
/// A peer is fastdp until [`FALL_BACK_AFTER`] probes in a row are missed,
/// a probe counting as missed only when the control plane heard from the
/// peer after it (so the underlay works and only VXLAN is blocked); then
/// it is sleeve until [`RECOVER_AFTER`] probes in a row are answered. No
/// peer switches twice within [`MIN_DWELL`]. Peers never probed are fastdp.
#[derive(Clone, Debug)]
pub struct FastdpHealth {
    peers: BTreeMap<PeerName, PeerHealth>,
    next_nonce: u64,
    /// Whether there is a sleeve to fall back to (only affects status).
    sleeve: bool,
}

impl FastdpHealth {
    /// `nonce_seed`: random, so replies to an earlier run's probes (or
    /// guessed ones) do not match.
    pub fn new(nonce_seed: u64, sleeve: bool) -> FastdpHealth {
        FastdpHealth {
            peers: BTreeMap::new(),
            next_nonce: nonce_seed,
            sleeve,
        }
    }

    /// One probing round: settles earlier probes, forgets peers that are no
    /// longer targets, and returns the probes to send now. The `bool` says
    /// whether any peer's path changed.
    pub fn tick(&mut self, now: Time, targets: &[Target]) -> (Vec<ProbeSend>, bool) {
        let wanted: BTreeSet<PeerName> = targets.iter().map(|t| t.peer).collect();
        let before = self.sleeved();
        self.peers.retain(|p, _| wanted.contains(p));
        let mut sends = Vec::with_capacity(targets.len());
        for t in targets {
            let h = self.peers.entry(t.peer).or_insert_with(|| PeerHealth {
                nickname: t.nickname.clone(),
                control: t.control,
                path: Path::Fastdp,
                switched: None,
                outstanding: VecDeque::new(),
                misses: 0,
                replies: 0,
                failing_since: None,
                last_reply: None,
                reason: None,
            });
            h.nickname.clone_from(&t.nickname);
            if h.control != t.control {
                // Probes to the old address say nothing about the new one.
                h.control = t.control;
                h.outstanding.clear();
            }
            while let Some(&(_, sent)) = h.outstanding.front() {
                let heard_after = t.last_heard.is_some_and(|heard| heard > sent + REPLY_WAIT);
                if heard_after {
                    h.outstanding.pop_front();
                    h.misses += 1;
                    h.replies = 0;
                    h.failing_since.get_or_insert(sent);
                } else if now.saturating_since(sent) > FORGET_AFTER {
                    h.outstanding.pop_front();
                } else {
                    break;
                }
            }
            settle(h, now);
            let nonce = self.next_nonce;
            self.next_nonce = self.next_nonce.wrapping_add(1);
            if h.outstanding.len() == MAX_OUTSTANDING {
                h.outstanding.pop_front();
            }
            h.outstanding.push_back((nonce, now));
            sends.push(ProbeSend {
                peer: t.peer,
                control: t.control,
                nonce,
            });
        }
        let changed = self.sleeved() != before;
        (sends, changed)
    }

    /// A reply from `from` to the probe `nonce`; `true` if a peer's path
    /// changed. Replies that match no outstanding probe of that peer at
    /// that address are ignored.
    pub fn reply(&mut self, now: Time, peer: PeerName, nonce: u64, from: SocketAddr) -> bool {
        let Some(h) = self.peers.get_mut(&peer) else {
            return false;
        };
        if from.ip() != IpAddr::V4(*h.control.ip()) {
            return false;
        }
        let Some(i) = h.outstanding.iter().position(|&(n, _)| n == nonce) else {
            return false;
        };
        // Older probes were lost, but this one shows the path works now.
        h.outstanding.drain(..=i);
        h.replies += 1;
        h.misses = 0;
        h.failing_since = None;
        h.last_reply = Some(now);
        let before = h.path;
        settle(h, now);
        h.path != before
    }

    #[cfg(test)]
    pub fn path(&self, peer: PeerName) -> Path {
        self.peers.get(&peer).map_or(Path::Fastdp, |h| h.path)
    }

    /// Peers whose VXLAN packets do not arrive.
    pub fn sleeved(&self) -> BTreeSet<PeerName> {
        self.peers
            .iter()
            .filter(|(_, h)| h.path == Path::Sleeve)
            .map(|(p, _)| *p)
            .collect()
    }

    pub fn view(&self, now: Time) -> Vec<PeerDataplane> {
        self.peers
            .iter()
            .map(|(&peer, h)| {
                let (dataplane, reason) = match (h.path, self.sleeve) {
                    (Path::Fastdp, _) => ("fastdp", None),
                    (Path::Sleeve, true) => ("sleeve", h.reason.clone()),
                    (Path::Sleeve, false) => (
                        "fastdp",
                        h.reason
                            .as_ref()
                            .map(|r| format!("{r}; there is no sleeve to fall back to")),
                    ),
                };
                PeerDataplane {
                    peer,
                    nickname: h.nickname.clone(),
                    underlay: IpAddr::V4(*h.control.ip()),
                    dataplane,
                    reason,
                    last_reply_ms_ago: h
                        .last_reply
                        .map(|t| now.saturating_since(t).as_millis() as u64),
                }
            })
            .collect()
    }
}

/// Switches a peer's path when its counters say so and it has kept the
/// current one long enough.
fn settle(h: &mut PeerHealth, now: Time) {
    let dwelt = h
        .switched
        .is_none_or(|t| now.saturating_since(t) >= MIN_DWELL);
    if !dwelt {
        return;
    }
    match h.path {
        Path::Fastdp if h.misses >= FALL_BACK_AFTER => {
            let silent = now.saturating_since(h.failing_since.unwrap_or(now));
            h.reason = Some(format!(
                "no reply over VXLAN (UDP 6784) for {} s while UDP 6783 works: a firewall between the nodes or on {} drops UDP 6784",
                silent.as_secs().max(1),
                h.nickname
            ));
            h.path = Path::Sleeve;
            h.switched = Some(now);
            h.replies = 0;
            tracing::warn!(peer = %h.nickname, "fastdp: {}; using the sleeve", h.reason.as_deref().unwrap_or_default());
        }
        Path::Sleeve if h.replies >= RECOVER_AFTER => {
            h.path = Path::Fastdp;
            h.switched = Some(now);
            h.reason = None;
            h.misses = 0;
            tracing::info!(peer = %h.nickname, "fastdp: VXLAN replies again, back to fastdp");
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// I/O

/// What the receiving side does with a datagram on the control port.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// Not the prober's: hand it to the driver loop.
    NotProbe,
    /// Taken (a reply recorded, or a malformed probe dropped).
    Taken,
    /// A request: send this reply to the datagram's sender.
    Answer([u8; PROBE_LEN]),
}

/// The prober's state, shared by the probing task, whoever reads the
/// control socket, and the status server.
pub struct Prober {
    me: PeerName,
    epoch: std::time::Instant,
    health: Mutex<FastdpHealth>,
    /// Wakes the route follower when a peer's path changes.
    pub changed: tokio::sync::Notify,
}

impl Prober {
    /// `epoch`: the agent's, so times match the router's.
    pub fn new(me: PeerName, epoch: std::time::Instant, nonce_seed: u64, sleeve: bool) -> Prober {
        Prober {
            me,
            epoch,
            health: Mutex::new(FastdpHealth::new(nonce_seed, sleeve)),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn now(&self) -> Time {
        Time::from_duration(self.epoch.elapsed())
    }

    fn health(&self) -> std::sync::MutexGuard<'_, FastdpHealth> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks at a datagram received on the control port, before the driver
    /// loop would. Never panics, whatever the bytes.
    pub fn receive(&self, datagram: &[u8], from: SocketAddr) -> Received {
        if !is_probe(datagram) {
            return Received::NotProbe;
        }
        match Probe::parse(datagram) {
            Some(Probe {
                kind: ProbeKind::Request,
                nonce,
                ..
            }) => Received::Answer(
                Probe {
                    kind: ProbeKind::Reply,
                    nonce,
                    sender: self.me,
                }
                .encode(),
            ),
            Some(Probe {
                kind: ProbeKind::Reply,
                nonce,
                sender,
            }) => {
                if self.health().reply(self.now(), sender, nonce, from) {
                    self.changed.notify_one();
                }
                Received::Taken
            }
            None => Received::Taken,
        }
    }

    /// Whether a sleeve exists to fall back to (known only once its TUN
    /// device could be created, after the prober is made).
    pub fn set_sleeve(&self, sleeve: bool) {
        self.health().sleeve = sleeve;
    }

    /// Peers whose prefixes go into the sleeve.
    pub fn sleeved(&self) -> BTreeSet<PeerName> {
        self.health().sleeved()
    }

    pub fn view(&self) -> Vec<PeerDataplane> {
        self.health().view(self.now())
    }
}

/// Probes every direct VXLAN neighbour each [`PROBE_INTERVAL`], for as long
/// as the agent runs. `socket`: a handle on the control socket, so the
/// inner datagram's source port is the one peers answer to. `active` says
/// whether fastdp is in use at all (not after a node-wide fallback).
pub async fn run(
    prober: Arc<Prober>,
    views: watch::Receiver<Arc<View>>,
    socket: UdpSocket,
    active: impl Fn() -> bool,
) {
    let mut interval = tokio::time::interval(PROBE_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let me = prober.me;
    let our_mac = crate::vtep_mac(me.0);
    loop {
        interval.tick().await;
        let now = prober.now();
        let (local, targets) = match active() {
            true => targets(&views.borrow()),
            false => (None, Vec::new()),
        };
        let (sends, changed) = prober.health().tick(now, &targets);
        if changed {
            prober.changed.notify_one();
        }
        let Some(local) = local else { continue };
        for send in sends {
            let frame = encapsulate(
                &Encapsulation {
                    vni: crate::DEFAULT_VNI,
                    src_mac: our_mac,
                    dst_mac: crate::vtep_mac(send.peer.0),
                    src: local,
                    dst: send.control,
                },
                &Probe {
                    kind: ProbeKind::Request,
                    nonce: send.nonce,
                    sender: me,
                }
                .encode(),
            );
            let vxlan = SocketAddrV4::new(*send.control.ip(), crate::VXLAN_PORT);
            if let Err(e) = socket.send_to(&frame, vxlan) {
                tracing::debug!("fastdp probe to {vxlan}: {e}");
            }
        }
    }
}

/// Our underlay control address, and the peers to probe: the direct
/// neighbours `desired::desired` gives FDB and neighbour entries, with
/// when the control plane last heard from each.
fn targets(view: &View) -> (Option<SocketAddrV4>, Vec<Target>) {
    let SocketAddr::V4(local) = view.address else {
        return (None, Vec::new());
    };
    let targets = view
        .neighbours
        .iter()
        .filter_map(|n| match n.control {
            SocketAddr::V4(control) => Some(Target {
                peer: n.peer,
                nickname: n.nickname.clone(),
                control,
                last_heard: view.heard.get(&n.peer).copied(),
            }),
            SocketAddr::V6(_) => None,
        })
        .collect();
    (Some(local), targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const A: PeerName = PeerName(0xaaaa);
    const B: PeerName = PeerName(0xbbbb);

    fn ms(ms: u64) -> Time {
        Time::from_millis(ms)
    }

    fn target(peer: PeerName, last: u8, heard: Option<u64>) -> Target {
        Target {
            peer,
            nickname: format!("node{last}"),
            control: SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, last), 6783),
            last_heard: heard.map(ms),
        }
    }

    fn from(last: u8) -> SocketAddr {
        SocketAddr::from(([192, 168, 1, last], 6783))
    }

    #[test]
    fn probes_round_trip_and_garbage_never_parses() {
        let p = Probe {
            kind: ProbeKind::Request,
            nonce: 0x0102_0304_0506_0708,
            sender: PeerName(u64::MAX),
        };
        let bytes = p.encode();
        assert_eq!(Probe::parse(&bytes), Some(p));
        assert!(is_probe(&bytes));
        let reply = Probe {
            kind: ProbeKind::Reply,
            ..p
        };
        assert_eq!(Probe::parse(&reply.encode()), Some(reply));
        // Trailing bytes are a later version's fields.
        assert_eq!(Probe::parse(&[&bytes[..], b"more"].concat()), Some(p));
        // Every truncation, a bad kind, and weft's own datagrams.
        for n in 0..PROBE_LEN {
            assert_eq!(Probe::parse(&bytes[..n]), None, "{n} bytes");
        }
        let mut bad = bytes;
        bad[8] = 3;
        assert_eq!(Probe::parse(&bad), None);
        let weft = weft_core::wire::sleeve_frame(PeerName(1), &[0x45; 30]);
        assert!(!is_probe(&weft) && Probe::parse(&weft).is_none());
        assert!(!is_probe(b"WEFT") && !MAGIC.starts_with(b"WEFT"));
    }

    #[test]
    fn random_bytes_never_panic() {
        let prober = Prober::new(A, std::time::Instant::now(), 0, true);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..200 {
            let mut buf: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = Probe::parse(&buf);
            let _ = prober.receive(&buf, from(12));
            if buf.len() >= 8 {
                buf[..8].copy_from_slice(MAGIC);
                let _ = Probe::parse(&buf);
                assert_ne!(prober.receive(&buf, from(12)), Received::NotProbe);
            }
        }
    }

    /// Reads back what [`encapsulate`] built, as the peer's kernel would.
    fn decapsulate(f: &[u8]) -> (u32, [u8; 6], [u8; 6], SocketAddrV4, SocketAddrV4, &[u8]) {
        assert_eq!(f[0], 0x08);
        let vni = u32::from_be_bytes(f[4..8].try_into().unwrap()) >> 8;
        let eth = &f[8..];
        let (dst_mac, src_mac) = (eth[..6].try_into().unwrap(), eth[6..12].try_into().unwrap());
        assert_eq!(&eth[12..14], &[0x08, 0x00]);
        let ip = &eth[14..];
        assert_eq!(ip[0], 0x45);
        assert_eq!(ip[9], 17);
        assert_eq!(checksum(&[&ip[..20]]), 0, "IPv4 header checksum");
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        assert_eq!(total, ip.len());
        let src_ip = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst_ip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let udp = &ip[20..];
        let pseudo = [&ip[12..20], &[0, 17], &(udp.len() as u16).to_be_bytes()[..]].concat();
        assert_eq!(checksum(&[&pseudo, udp]), 0, "UDP checksum");
        assert_eq!(usize::from(u16::from_be_bytes([udp[4], udp[5]])), udp.len());
        let src = SocketAddrV4::new(src_ip, u16::from_be_bytes([udp[0], udp[1]]));
        let dst = SocketAddrV4::new(dst_ip, u16::from_be_bytes([udp[2], udp[3]]));
        (vni, dst_mac, src_mac, src, dst, &udp[8..])
    }

    #[test]
    fn encapsulation_is_a_valid_vxlan_packet() {
        let e = Encapsulation {
            vni: crate::DEFAULT_VNI,
            src_mac: crate::vtep_mac(A.0),
            dst_mac: crate::vtep_mac(B.0),
            src: "192.168.1.11:6783".parse().unwrap(),
            dst: "192.168.1.12:6783".parse().unwrap(),
        };
        let probe = Probe {
            kind: ProbeKind::Request,
            nonce: 42,
            sender: A,
        };
        // Odd payload lengths exercise the checksum's padding.
        for payload in [&probe.encode()[..], &probe.encode()[..24], b""] {
            let f = encapsulate(&e, payload);
            let (vni, dst_mac, src_mac, src, dst, inner) = decapsulate(&f);
            assert_eq!((vni, dst_mac, src_mac), (e.vni, e.dst_mac, e.src_mac));
            assert_eq!((src, dst, inner), (e.src, e.dst, payload));
        }
    }

    #[test]
    fn a_request_is_answered_and_the_reply_recorded() {
        let a = Prober::new(A, std::time::Instant::now(), 7, true);
        let b = Prober::new(B, std::time::Instant::now(), 9, true);
        let (sends, _) = a.health().tick(ms(0), &[target(B, 12, Some(0))]);
        let request = Probe {
            kind: ProbeKind::Request,
            nonce: sends[0].nonce,
            sender: A,
        }
        .encode();
        let Received::Answer(reply) = b.receive(&request, from(11)) else {
            panic!("no answer");
        };
        assert_eq!(
            Probe::parse(&reply),
            Some(Probe {
                kind: ProbeKind::Reply,
                nonce: 7,
                sender: B
            })
        );
        // From another address, it is not the peer's.
        assert_eq!(a.receive(&reply, from(99)), Received::Taken);
        assert_eq!(a.view()[0].last_reply_ms_ago, None);
        assert_eq!(a.receive(&reply, from(12)), Received::Taken);
        assert!(a.view()[0].last_reply_ms_ago.is_some());
        assert_eq!(a.receive(b"WEFT\x01", from(12)), Received::NotProbe);
    }

    /// Runs ticks each second from `start` to `end` (ms), the peer heard on
    /// the control plane at every tick, answering when `answer` says so.
    fn run(h: &mut FastdpHealth, start: u64, end: u64, answer: impl Fn(u64) -> bool) -> Vec<u64> {
        let mut switches = Vec::new();
        for t in (start..end).step_by(1000) {
            let before = h.path(B);
            let (sends, _) = h.tick(ms(t), &[target(B, 12, Some(t))]);
            if answer(t) {
                h.reply(ms(t + 5), B, sends[0].nonce, from(12));
            }
            if h.path(B) != before {
                switches.push(t);
            }
        }
        switches
    }

    #[test]
    fn three_misses_fall_back_and_two_replies_recover() {
        let mut h = FastdpHealth::new(0, true);
        assert_eq!(h.path(B), Path::Fastdp, "never probed");
        // Healthy for 5 s, then VXLAN drops from t=5 s to t=20 s.
        let blocked = |t: u64| (5000..20_000).contains(&t);
        let switches = run(&mut h, 0, 30_000, |t| !blocked(t));
        // Probes at 5, 6, 7 are found missed at 6, 7, 8 (heard after each).
        assert_eq!(switches, vec![8000, 21_000]);
        let view = h.view(ms(30_000));
        assert_eq!(view[0].dataplane, "fastdp");
        assert_eq!(view[0].reason, None);
        assert_eq!(view[0].last_reply_ms_ago, Some(1000 - 5));
    }

    #[test]
    fn the_reason_names_the_peer_and_the_port() {
        let mut h = FastdpHealth::new(0, true);
        run(&mut h, 0, 10_000, |t| t < 1000);
        assert_eq!(h.path(B), Path::Sleeve);
        assert_eq!(h.sleeved(), BTreeSet::from([B]));
        let v = &h.view(ms(10_000))[0];
        assert_eq!(v.dataplane, "sleeve");
        let reason = v.reason.as_deref().unwrap();
        assert!(
            reason.contains("UDP 6784") && reason.contains("node12"),
            "{reason}"
        );
        // Without a sleeve the peer stays on fastdp, but status says why
        // it is failing.
        let mut h = FastdpHealth::new(0, false);
        run(&mut h, 0, 10_000, |_| false);
        let v = &h.view(ms(10_000))[0];
        assert_eq!(v.dataplane, "fastdp");
        assert!(v.reason.as_deref().unwrap().contains("no sleeve"));
    }

    #[test]
    fn a_silent_control_plane_is_not_a_fastdp_problem() {
        let mut h = FastdpHealth::new(0, true);
        for t in (0..30_000).step_by(1000) {
            // Last heard long ago: the underlay is down, not VXLAN.
            h.tick(ms(t), &[target(B, 12, Some(0))]);
        }
        assert_eq!(h.path(B), Path::Fastdp);
        for t in (0..30_000).step_by(1000) {
            h.tick(ms(t), &[target(A, 13, None)]);
        }
        assert_eq!(h.path(A), Path::Fastdp);
    }

    #[test]
    fn it_never_flaps_faster_than_the_dwell_time() {
        let mut h = FastdpHealth::new(0, true);
        // Alternating bursts: 3 lost, 2 answered, again and again.
        let switches = run(&mut h, 0, 60_000, |t| (t / 1000) % 5 >= 3);
        assert!(!switches.is_empty());
        for w in switches.windows(2) {
            assert!(w[1] - w[0] >= MIN_DWELL.as_millis() as u64, "{switches:?}");
        }
        // Single losses never switch.
        let mut h = FastdpHealth::new(0, true);
        assert!(run(&mut h, 0, 60_000, |t| (t / 1000) % 3 != 0).is_empty());
    }

    #[test]
    fn stale_and_foreign_replies_are_ignored_and_peers_forgotten() {
        let mut h = FastdpHealth::new(100, true);
        let (sends, _) = h.tick(ms(0), &[target(B, 12, Some(0))]);
        assert!(!h.reply(ms(1), B, sends[0].nonce + 50, from(12)));
        assert!(!h.reply(ms(1), A, sends[0].nonce, from(12)));
        assert_eq!(h.view(ms(1))[0].last_reply_ms_ago, None);
        run(&mut h, 1000, 10_000, |_| false);
        assert_eq!(h.path(B), Path::Sleeve);
        // No longer a direct neighbour: forgotten, and fastdp if it returns.
        let (_, changed) = h.tick(ms(11_000), &[]);
        assert!(changed);
        assert!(h.view(ms(11_000)).is_empty());
        assert_eq!(h.path(B), Path::Fastdp);
    }
}
