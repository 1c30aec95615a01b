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

pub mod health;
pub mod wire;

pub use health::{FastdpHealth, PROBE_INTERVAL, PeerDataplane, Target};
pub use wire::{Encapsulation, MAGIC, PROBE_LEN, Probe, ProbeKind, encapsulate, is_probe};

use std::collections::BTreeSet;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use weft_core::{PeerName, Time, View};

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
    use super::health::tests::{A, B, from, ms, target};
    use super::*;

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
}
