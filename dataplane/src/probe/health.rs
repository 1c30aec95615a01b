//! The fastdp verdict per peer, from probe sends, replies and when the
//! control plane last heard from the peer. Pure: time is passed in.

use crate::Overlay;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::time::Duration;
use weft_core::{PeerName, Time};

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
    path: Overlay,
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerDataplane {
    pub peer: PeerName,
    pub nickname: String,
    pub underlay: IpAddr,
    /// "fastdp" or "sleeve".
    pub dataplane: String,
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
    pub(crate) sleeve: bool,
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
                path: Overlay::Fastdp,
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
    pub fn path(&self, peer: PeerName) -> Overlay {
        self.peers.get(&peer).map_or(Overlay::Fastdp, |h| h.path)
    }

    /// Peers whose VXLAN packets do not arrive.
    pub fn sleeved(&self) -> BTreeSet<PeerName> {
        self.peers
            .iter()
            .filter(|(_, h)| h.path == Overlay::Sleeve)
            .map(|(p, _)| *p)
            .collect()
    }

    pub fn view(&self, now: Time) -> Vec<PeerDataplane> {
        self.peers
            .iter()
            .map(|(&peer, h)| {
                let (dataplane, reason) = match (h.path, self.sleeve) {
                    (Overlay::Fastdp, _) => (Overlay::Fastdp.name(), None),
                    (Overlay::Sleeve, true) => (Overlay::Sleeve.name(), h.reason.clone()),
                    (Overlay::Sleeve, false) => (
                        Overlay::Fastdp.name(),
                        h.reason
                            .as_ref()
                            .map(|r| format!("{r}; there is no sleeve to fall back to")),
                    ),
                };
                PeerDataplane {
                    peer,
                    nickname: h.nickname.clone(),
                    underlay: IpAddr::V4(*h.control.ip()),
                    dataplane: dataplane.into(),
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
        Overlay::Fastdp if h.misses >= FALL_BACK_AFTER => {
            let silent = now.saturating_since(h.failing_since.unwrap_or(now));
            h.reason = Some(format!(
                "no reply over VXLAN (UDP 6784) for {} s while UDP 6783 works: a firewall between the nodes or on {} drops UDP 6784",
                silent.as_secs().max(1),
                h.nickname
            ));
            h.path = Overlay::Sleeve;
            h.switched = Some(now);
            h.replies = 0;
            tracing::warn!(peer = %h.nickname, "fastdp: {}; using the sleeve", h.reason.as_deref().unwrap_or_default());
        }
        Overlay::Sleeve if h.replies >= RECOVER_AFTER => {
            h.path = Overlay::Fastdp;
            h.switched = Some(now);
            h.reason = None;
            h.misses = 0;
            tracing::info!(peer = %h.nickname, "fastdp: VXLAN replies again, back to fastdp");
        }
        _ => {}
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    pub const A: PeerName = PeerName(0xaaaa);
    pub const B: PeerName = PeerName(0xbbbb);

    pub fn ms(ms: u64) -> Time {
        Time::from_millis(ms)
    }

    pub fn target(peer: PeerName, last: u8, heard: Option<u64>) -> Target {
        Target {
            peer,
            nickname: format!("node{last}"),
            control: SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, last), 6783),
            last_heard: heard.map(ms),
        }
    }

    pub fn from(last: u8) -> SocketAddr {
        SocketAddr::from(([192, 168, 1, last], 6783))
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
        assert_eq!(h.path(B), Overlay::Fastdp, "never probed");
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
        assert_eq!(h.path(B), Overlay::Sleeve);
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
        assert_eq!(h.path(B), Overlay::Fastdp);
        for t in (0..30_000).step_by(1000) {
            h.tick(ms(t), &[target(A, 13, None)]);
        }
        assert_eq!(h.path(A), Overlay::Fastdp);
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
        assert_eq!(h.path(B), Overlay::Sleeve);
        // No longer a direct neighbour: forgotten, and fastdp if it returns.
        let (_, changed) = h.tick(ms(11_000), &[]);
        assert!(changed);
        assert!(h.view(ms(11_000)).is_empty());
        assert_eq!(h.path(B), Overlay::Fastdp);
    }
}
