//! The sleeve: pod packets carried by the agent itself, in UDP to the next
//! hop's control port (6783), for nodes where kernel VXLAN cannot be used.
//! Routes send remote pod prefixes into the TUN device `weft-sleeve`; a
//! thread reads them, looks up `forward()` and sends each packet to its
//! next hop; received frames are written to the TUN device when the
//! destination is local, or relayed onwards.
//!
//! With a secret, every frame is sealed (XChaCha20-Poly1305, a key
//! derived apart from the control plane's) and replays are refused.
//!
//! Not yet: batching (GSO/GRO, vnet headers), so throughput is far below
//! the kernel's.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use weft_core::forward::Forward;
use weft_core::seal::{ReplayWindow, SealNonce, Sealer};
use weft_core::wire::{self, SleeveFrame};
use weft_driver::{SharedRouter, lock};

/// Its overhead (outer IPv4, UDP, frame header: 42 bytes) is below
/// VXLAN's 50, so the pod MTU fits both.
pub const DEVICE: &str = "weft-sleeve";

/// A TUN device, alive while this value is.
pub struct Tun {
    file: File,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

impl Tun {
    /// Creates (or attaches to) the TUN device `name`: IP packets, no
    /// packet-information prefix.
    pub fn create(name: &str) -> io::Result<Tun> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        let bytes = name.as_bytes();
        if bytes.len() >= libc::IFNAMSIZ {
            return Err(io::Error::other(format!("device name {name} is too long")));
        }
        req.name[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: TUNSETIFF reads and writes an `ifreq` we own, on an fd
        // we own; the struct has the kernel's layout (name, flags, padding).
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Tun { file })
    }
}

/// Counters of the sleeve, for status.
#[derive(Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub relayed: AtomicU64,
    pub dropped: AtomicU64,
}

/// Sealing of sleeve frames.
struct Crypto {
    sealer: Sealer,
    /// Random per start, so no nonce is ever reused across restarts.
    epoch: u64,
    counter: AtomicU64,
    replay: Mutex<BTreeMap<u64, ReplayWindow>>,
}

/// Both directions of the sleeve.
#[derive(Clone)]
pub struct Sleeve {
    tun: Arc<File>,
    socket: Arc<UdpSocket>,
    router: SharedRouter,
    crypto: Option<Arc<Crypto>>,
    pub counters: Arc<Counters>,
}

impl Sleeve {
    /// `secret`: seal every frame with a key derived from it; `epoch`: a
    /// random number new at every start.
    pub fn new(
        tun: Tun,
        socket: UdpSocket,
        router: SharedRouter,
        secret: Option<&[u8]>,
        epoch: u64,
    ) -> Sleeve {
        let crypto = secret.map(|secret| {
            // Apart from the control plane's key, so nonces never collide.
            let key = [secret, b"/weft-sleeve".as_slice()].concat();
            Arc::new(Crypto {
                sealer: Sealer::new(&key),
                epoch,
                counter: AtomicU64::new(0),
                replay: Mutex::default(),
            })
        });
        Sleeve {
            tun: Arc::new(tun.file),
            socket: Arc::new(socket),
            router,
            crypto,
            counters: Arc::default(),
        }
    }

    fn frame(&self, me: weft_core::PeerName, packet: &[u8]) -> Vec<u8> {
        match &self.crypto {
            None => wire::sleeve_frame(me, packet),
            Some(c) => {
                let nonce = SealNonce {
                    sender: me.0,
                    epoch: c.epoch,
                    counter: c.counter.fetch_add(1, Ordering::Relaxed),
                };
                wire::sealed_sleeve_frame(&c.sealer, nonce, packet)
            }
        }
    }

    /// The packet of a frame this node accepts: sealed with our secret and
    /// not a replay when we have one, plain when we have none.
    fn open(&self, frame: SleeveFrame) -> Option<Vec<u8>> {
        match (frame, &self.crypto) {
            (SleeveFrame::Plain { packet, .. }, None) => Some(packet.to_vec()),
            (
                SleeveFrame::Sealed {
                    nonce,
                    header,
                    sealed,
                },
                Some(c),
            ) => {
                let packet = c.sealer.open(header, nonce, sealed).ok()?;
                let mut replay = c.replay.lock().unwrap_or_else(|p| p.into_inner());
                replay
                    .entry(nonce.sender)
                    .or_default()
                    .check_and_update(nonce.epoch, nonce.counter)
                    .ok()?;
                Some(packet)
            }
            _ => None,
        }
    }

    /// Starts the thread that carries packets from the TUN device.
    pub fn start_outbound(&self) {
        let sleeve = self.clone();
        std::thread::Builder::new()
            .name("weft-sleeve".into())
            .spawn(move || sleeve.outbound())
            .expect("spawn the sleeve thread");
    }

    fn outbound(&self) {
        let mut buf = vec![0u8; 65_536];
        loop {
            let n = match (&*self.tun).read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("sleeve: reading {DEVICE} failed, stopping: {e}");
                    return;
                }
            };
            self.forward(&buf[..n], None);
        }
    }

    /// Sends `packet` towards its destination's next hop, or drops it.
    /// `from`: where a relayed packet came from (never sent back there).
    fn forward(&self, packet: &[u8], from: Option<SocketAddr>) -> Forwarded {
        let Some(dst) = destination(packet) else {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return Forwarded::Dropped;
        };
        let (me, decision) = {
            let router = lock(&self.router);
            (router.name(), router.forward(dst))
        };
        match decision {
            Forward::Local => Forwarded::Local,
            Forward::Peer { underlay, .. } if Some(underlay) != from => {
                let frame = self.frame(me, packet);
                match self.socket.send_to(&frame, underlay) {
                    Ok(_) => {
                        self.counters.sent.fetch_add(1, Ordering::Relaxed);
                        Forwarded::Sent
                    }
                    Err(_) => {
                        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                        Forwarded::Dropped
                    }
                }
            }
            _ => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                Forwarded::Dropped
            }
        }
    }

    /// A datagram from the control socket: `true` if it was a sleeve frame
    /// (delivered to a local pod, relayed, or dropped).
    pub fn inbound(&self, from: SocketAddr, bytes: &[u8]) -> bool {
        let Some(frame) = wire::parse_sleeve(bytes) else {
            return false;
        };
        let Some(packet) = self.open(frame) else {
            // Wrong or missing secret, forged, replayed.
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return true;
        };
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        match self.forward(&packet, Some(from)) {
            Forwarded::Local => {
                if (&*self.tun).write_all(&packet).is_err() {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            Forwarded::Sent => {
                self.counters.relayed.fetch_add(1, Ordering::Relaxed);
            }
            Forwarded::Dropped => {}
        }
        true
    }
}

enum Forwarded {
    Local,
    Sent,
    Dropped,
}

/// The destination of an IPv4 packet.
fn destination(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(
        packet[16], packet[17], packet[18], packet[19],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ipv4_packets_have_a_destination() {
        let mut p = [0u8; 20];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&[10, 32, 0, 5]);
        assert_eq!(destination(&p), Some(Ipv4Addr::new(10, 32, 0, 5)));
        p[0] = 0x60;
        assert_eq!(destination(&p), None);
        assert_eq!(destination(&[0x45, 0, 0]), None);
    }
}
