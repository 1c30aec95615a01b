//! The sleeve: pod packets carried by the agent itself, in UDP to the next
//! hop's control port (6783), for nodes where kernel VXLAN cannot be used.
//! Routes send remote pod prefixes into the TUN device `weft-sleeve`; a
//! thread reads them, looks up `forward()` and sends each packet to its
//! next hop; another thread reads the UDP socket: it writes received
//! frames to the TUN device when the destination is local, relays them
//! onwards, and hands every control datagram that reaches it over to the
//! driver loop (see [`crate::port`] for which ones do).
//!
//! Both directions batch, as the kernel's own tunnels do: the TUN device
//! carries a virtio-net header and TCP segmentation offload, so one read
//! returns up to 64 KB of a TCP flow, which is cut into segments that fit
//! the underlay and sent in one `sendmsg` (UDP GSO); received datagrams
//! arrive coalesced (UDP GRO) and consecutive TCP segments are written to
//! the TUN device as one GSO packet (see [`offload`]).
//!
//! With a secret, every frame is sealed (XChaCha20-Poly1305, a key
//! derived apart from the control plane's) and replays are refused.

pub mod gate;
pub mod offload;
pub mod udp;

use crate::port::{self, HandedOver, Sorted};
use crate::probe::Prober;
use gate::{Counters, FrameDrop, Gate};
use offload::{Coalescer, MAX_IP_PACKET, VNET_HDR_LEN, VnetHdr};
use std::borrow::Cow;
use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;
use tokio::sync::mpsc;
use tokio::sync::watch;
use weft_core::forward::Forward;
use weft_core::seal::{SealNonce, Sealer, TAG_LEN};
use weft_core::wire::{self, SleeveFrame};
use weft_core::{Config, PeerName, Time, View};

pub use crate::names::SLEEVE_DEVICE as DEVICE;

/// Control datagrams waiting for the driver loop; beyond that they are
/// dropped, as a full socket buffer would.
const CONTROL_QUEUE: usize = 1024;
/// Socket buffers: room for a few 64 KB bursts each way.
const SOCKET_BUFFER: libc::c_int = 4 << 20;

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

impl Tun {
    /// Creates (or attaches to) the TUN device `name`: IP packets, no
    /// packet-information prefix, each led by a virtio-net header. The
    /// kernel may leave checksums to us and hand over TCP/IPv4
    /// super-packets (segmentation offload); when it refuses that, packets
    /// come one by one and still work.
    pub fn create(name: &str) -> io::Result<Tun> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        let bytes = name.as_bytes();
        if bytes.len() >= libc::IFNAMSIZ {
            return Err(io::Error::other(format!("device name {name} is too long")));
        }
        req.name[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: TUNSETIFF reads and writes an `ifreq` we own, on an fd
        // we own; the struct has the kernel's layout (name, flags, padding).
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let offloads = libc::TUN_F_CSUM | libc::TUN_F_TSO4;
        // SAFETY: TUNSETOFFLOAD takes its flags by value; no memory is
        // passed.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(offloads),
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            tracing::warn!("sleeve: no TUN offloads, one packet per system call: {e}");
        }
        Ok(Tun { file })
    }
}

/// Sealing of sent sleeve frames.
struct Crypto {
    sealer: Sealer,
    /// The router's epoch of this start, so no nonce is reused across
    /// restarts and receivers refuse replays of older boots.
    epoch: u64,
    counter: AtomicU64,
}

/// Both directions of the sleeve.
#[derive(Clone)]
pub struct Sleeve {
    tun: Arc<File>,
    socket: Arc<UdpSocket>,
    /// The router's newest view: every forwarding decision reads it.
    views: watch::Receiver<Arc<View>>,
    crypto: Option<Arc<Crypto>>,
    /// Decides which received frames reach pods.
    gate: Arc<Gate>,
    /// Time zero of the gate's clock.
    started: Instant,
    me: PeerName,
    /// A plain frame's header: the frame is this, then the packet.
    plain_header: Arc<[u8]>,
    /// Largest IP packet whose frame fits one underlay datagram.
    max_packet: usize,
    /// Cleared for good when the kernel refuses UDP GSO sends.
    gso: Arc<AtomicBool>,
    /// Cleared for good when the kernel refuses GSO writes to the TUN.
    coalesce: Arc<AtomicBool>,
    /// Answers and records fastdp probes, which arrive on this socket.
    prober: Option<Arc<Prober>>,
    pub counters: Arc<Counters>,
}

impl Sleeve {
    /// The router's newest view (the published value's lock is held only
    /// to clone the handle).
    fn view(&self) -> Arc<View> {
        self.views.borrow().clone()
    }

    /// `views`: the router's, as published; `config`: the router's (its
    /// liveness times bound the replay window); `secret`: seal every
    /// frame with a key derived from it; `max_datagram`: the largest UDP
    /// payload the underlay carries unfragmented; `prober`: fastdp's, when
    /// fastdp runs.
    pub fn new(
        tun: Tun,
        socket: UdpSocket,
        views: watch::Receiver<Arc<View>>,
        config: &Config,
        secret: Option<&[u8]>,
        max_datagram: usize,
        prober: Option<Arc<Prober>>,
    ) -> Sleeve {
        let (me, epoch) = {
            let view = views.borrow();
            (view.me, view.epoch)
        };
        // Apart from the control plane's key, so nonces never collide.
        let sealer = secret.map(|secret| Sealer::new(&[secret, b"/weft-sleeve"].concat()));
        let crypto = sealer.clone().map(|sealer| {
            Arc::new(Crypto {
                sealer,
                epoch,
                counter: AtomicU64::new(0),
            })
        });
        let gate = Gate::new(sealer, config.dead_after, config.forget_after);
        let plain_header: Arc<[u8]> = wire::sleeve_frame(me, &[]).into();
        let overhead = plain_header.len() + if crypto.is_some() { 16 + TAG_LEN } else { 0 };
        Sleeve {
            tun: Arc::new(tun.file),
            socket: Arc::new(socket),
            views,
            crypto,
            gate: Arc::new(gate),
            started: Instant::now(),
            me,
            plain_header,
            max_packet: max_datagram.saturating_sub(overhead),
            gso: Arc::new(AtomicBool::new(true)),
            coalesce: Arc::new(AtomicBool::new(true)),
            prober,
            counters: Arc::default(),
        }
    }

    /// Appends the frame carrying `packet` to `out`.
    fn frame_into(&self, packet: &[u8], out: &mut Vec<u8>) {
        match &self.crypto {
            None => {
                out.extend_from_slice(&self.plain_header);
                out.extend_from_slice(packet);
            }
            Some(c) => {
                let nonce = SealNonce {
                    sender: self.me.0,
                    epoch: c.epoch,
                    counter: c.counter.fetch_add(1, Ordering::Relaxed),
                };
                out.extend_from_slice(&wire::sealed_sleeve_frame(&c.sealer, nonce, packet));
            }
        }
    }

    /// Starts both threads; returns the hand-over of the control
    /// datagrams the receive thread reads, for the driver loop.
    pub fn start(self) -> mpsc::Receiver<HandedOver> {
        udp::grow_buffers(&self.socket, SOCKET_BUFFER);
        if let Err(e) = udp::enable_gro(&self.socket) {
            tracing::warn!("sleeve: no UDP GRO, one datagram per system call: {e}");
        }
        let (control, rx) = mpsc::channel(CONTROL_QUEUE);
        let outbound = self.clone();
        std::thread::Builder::new()
            .name("weft-sleeve-out".into())
            .spawn(move || outbound.outbound())
            .expect("spawn the sleeve thread");
        std::thread::Builder::new()
            .name("weft-sleeve-in".into())
            .spawn(move || self.inbound(control))
            .expect("spawn the sleeve thread");
        rx
    }

    fn outbound(&self) {
        let mut read = vec![0u8; VNET_HDR_LEN + MAX_IP_PACKET];
        let mut batch = Batch::default();
        let mut scratch = Vec::new();
        loop {
            let n = match (&*self.tun).read(&mut read) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("sleeve: reading {DEVICE} failed, stopping: {e}");
                    return;
                }
            };
            self.send_read(&mut read[..n], &mut batch, &mut scratch);
        }
    }

    /// Sends what one TUN read holds (a packet, or a TCP super-packet cut
    /// into segments) to its next hop, in as few system calls as the
    /// kernel allows; one router lookup serves them all.
    fn send_read(&self, read: &mut [u8], batch: &mut Batch, scratch: &mut Vec<u8>) {
        let dst = read.get(VNET_HDR_LEN..).and_then(destination);
        let Some(Forward::Peer { underlay, .. }) = dst.map(|d| self.view().forward(d)) else {
            self.counters.count_drop(FrameDrop::NoRoute);
            return;
        };
        batch.clear();
        let split = offload::split_tun_read(read, self.max_packet, scratch, |packet| {
            let start = batch.bytes.len();
            self.frame_into(packet, &mut batch.bytes);
            batch.sizes.push(batch.bytes.len() - start);
        });
        if let Err(e) = split {
            tracing::debug!("sleeve: dropping a packet from {DEVICE}: {e}");
            self.counters.count_drop(FrameDrop::Malformed);
            return;
        }
        self.send_batch(batch, underlay);
    }

    /// Sends the frames of `batch` to `to`: runs of equal size (the last
    /// of a run may be shorter) in one GSO send each.
    fn send_batch(&self, batch: &Batch, to: SocketAddr) {
        let mut offset = 0;
        for run in batch.runs() {
            let bytes = &batch.bytes[offset..offset + run.bytes];
            offset += run.bytes;
            self.send_run(bytes, run, to);
        }
    }

    fn send_run(&self, bytes: &[u8], run: Run, to: SocketAddr) {
        let sent = if run.count > 1 && self.gso.load(Ordering::Relaxed) {
            match udp::send_segments(&self.socket, bytes, run.size as u16, to) {
                Ok(()) => Ok(()),
                Err(e) => self.gso_failed(bytes, run, to, e),
            }
        } else {
            bytes
                .chunks(run.size)
                .try_for_each(|frame| self.socket.send_to(frame, to).map(drop))
        };
        let frames = run.count as u64;
        match sent {
            Ok(()) => {
                self.counters.sent.fetch_add(frames, Ordering::Relaxed);
            }
            Err(_) => self.counters.count_drops(FrameDrop::SendFailed, frames),
        }
    }

    /// A GSO send failed: if a plain send of the same frames works, the
    /// kernel (or the device) does not do UDP GSO, so stop asking; if it
    /// fails too, the route is at fault (say, a blackhole) and GSO stays.
    fn gso_failed(&self, bytes: &[u8], run: Run, to: SocketAddr, e: io::Error) -> io::Result<()> {
        if e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOBUFS) {
            return Err(e);
        }
        let mut frames = bytes.chunks(run.size);
        let first = frames.next().unwrap_or_default();
        self.socket.send_to(first, to)?;
        tracing::warn!("sleeve: UDP GSO refused ({e}), sending one datagram per system call");
        self.gso.store(false, Ordering::Relaxed);
        frames.try_for_each(|frame| self.socket.send_to(frame, to).map(drop))
    }

    fn inbound(&self, control: mpsc::Sender<HandedOver>) {
        let mut buf = vec![0u8; 65_536];
        let mut coalescer = Coalescer::default();
        let mut relay = Vec::new();
        loop {
            let (n, from, size) = match udp::recv_coalesced(&self.socket, &mut buf) {
                Ok(received) => received,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Nothing the sleeve can repair; do not spin on it.
                    tracing::debug!("sleeve: UDP receive: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    continue;
                }
            };
            let datagrams = buf[..n].chunks(size.unwrap_or(n).max(1));
            let packets = self.take_frames(datagrams, from, &control);
            self.deliver(packets, from, &mut coalescer, &mut relay);
        }
    }

    /// The packets of the sleeve frames this node accepts among
    /// `datagrams`; every other datagram goes to the driver loop.
    fn take_frames<'a>(
        &self,
        datagrams: impl Iterator<Item = &'a [u8]>,
        from: SocketAddr,
        control: &mpsc::Sender<HandedOver>,
    ) -> Vec<Cow<'a, [u8]>> {
        let mut frames = Vec::new();
        for datagram in datagrams {
            match port::sort(datagram, from, self.prober.as_deref(), true) {
                Sorted::Frame(frame) => frames.push(frame),
                Sorted::Answer(reply) => {
                    let _ = self.socket.send_to(&reply, from);
                }
                Sorted::Taken => {}
                // A full queue drops, like a full socket buffer would.
                Sorted::Control => {
                    let _ = control.try_send((datagram.to_vec(), from));
                }
            }
        }
        if frames.is_empty() {
            return Vec::new();
        }
        // One view for the batch (GRO coalesces only datagrams of
        // one source, so this is mostly one sender).
        let connected: Vec<Option<SocketAddr>> = {
            let view = self.view();
            let senders = frames.iter().map(SleeveFrame::sender);
            senders.map(|s| view.connected_address(s)).collect()
        };
        let now = Time::from_duration(self.started.elapsed());
        let mut packets = Vec::new();
        for (frame, connected) in frames.into_iter().zip(connected) {
            match self.gate.admit(now, frame, from, connected) {
                Ok(packet) => packets.push(packet),
                Err(reason) => self.counters.count_drop(reason),
            }
        }
        self.counters
            .received
            .fetch_add(packets.len() as u64, Ordering::Relaxed);
        packets
    }

    /// Writes received packets to local pods (coalesced) or relays them;
    /// one view decides for the whole batch.
    fn deliver(
        &self,
        packets: Vec<Cow<'_, [u8]>>,
        from: SocketAddr,
        coalescer: &mut Coalescer,
        relay: &mut Vec<u8>,
    ) {
        let decisions: Vec<Action> = {
            let view = self.view();
            packets.iter().map(|p| decide(&view, p, from)).collect()
        };
        let mut write = |hdr: &VnetHdr, packet: &[u8]| self.write_tun(hdr, packet);
        for (packet, action) in packets.iter().zip(decisions) {
            match action {
                Action::Local => coalescer.push(packet, &mut write),
                Action::Relay(to) => {
                    relay.clear();
                    self.frame_into(packet, relay);
                    match self.socket.send_to(relay, to) {
                        Ok(_) => {
                            self.counters.relayed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => self.counters.count_drop(FrameDrop::SendFailed),
                    }
                }
                Action::Drop => self.counters.count_drop(FrameDrop::NoRoute),
            }
        }
        coalescer.flush(&mut write);
    }

    /// One write to the TUN device. Should the kernel refuse a coalesced
    /// packet, coalescing stops and this one goes out as its segments.
    fn write_tun(&self, hdr: &VnetHdr, packet: &[u8]) {
        if hdr.gso_type != offload::GSO_NONE && !self.coalesce.load(Ordering::Relaxed) {
            return self.write_segments(hdr, packet);
        }
        let encoded = hdr.encode();
        let parts = [IoSlice::new(&encoded), IoSlice::new(packet)];
        match (&*self.tun).write_vectored(&parts) {
            Ok(n) if n == encoded.len() + packet.len() => {}
            Ok(_) => self.counters.count_drop(FrameDrop::TunWriteFailed),
            Err(e) if hdr.gso_type != offload::GSO_NONE => {
                tracing::warn!(
                    "sleeve: {DEVICE} refused a coalesced packet ({e}), writing one packet per system call"
                );
                self.coalesce.store(false, Ordering::Relaxed);
                self.write_segments(hdr, packet);
            }
            Err(_) => self.counters.count_drop(FrameDrop::TunWriteFailed),
        }
    }

    fn write_segments(&self, hdr: &VnetHdr, packet: &[u8]) {
        let plain = VnetHdr::default().encode();
        let cut = offload::segment_tcp4(packet, usize::from(hdr.gso_size), &mut Vec::new(), |s| {
            let parts = [IoSlice::new(&plain), IoSlice::new(s)];
            if (&*self.tun).write_vectored(&parts).is_err() {
                self.counters.count_drop(FrameDrop::TunWriteFailed);
            }
        });
        if cut.is_err() {
            self.counters.count_drop(FrameDrop::Malformed);
        }
    }
}

/// Frames of one batch, back to back, and each one's size.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    sizes: Vec<usize>,
}

/// Frames sent in one GSO send: `count` of them, of `size` bytes each but
/// maybe the last, `bytes` in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    size: usize,
    count: usize,
    bytes: usize,
}

impl Batch {
    fn clear(&mut self) {
        self.bytes.clear();
        self.sizes.clear();
    }

    /// Splits the frames into runs the kernel takes in one GSO send: equal
    /// sizes but a shorter last one, at most 64 segments and 64 KB.
    fn runs(&self) -> Vec<Run> {
        let mut runs: Vec<Run> = Vec::new();
        let mut open = false;
        for &size in &self.sizes {
            match runs.last_mut() {
                Some(run)
                    if open
                        && size <= run.size
                        && run.count < udp::MAX_SEGMENTS
                        && run.bytes + size <= udp::MAX_GSO_BYTES =>
                {
                    run.count += 1;
                    run.bytes += size;
                    open = size == run.size;
                }
                _ => {
                    runs.push(Run {
                        size,
                        count: 1,
                        bytes: size,
                    });
                    open = true;
                }
            }
        }
        runs
    }
}

enum Action {
    Local,
    Relay(SocketAddr),
    Drop,
}

/// What to do with a received packet: deliver it here, relay it to its
/// next hop (never back where it came from), or drop it.
fn decide(view: &View, packet: &[u8], from: SocketAddr) -> Action {
    match destination(packet).map(|d| view.forward(d)) {
        Some(Forward::Local) => Action::Local,
        Some(Forward::Peer { underlay, .. }) if underlay != from => Action::Relay(underlay),
        _ => Action::Drop,
    }
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

    fn runs(sizes: &[usize]) -> Vec<(usize, usize)> {
        let batch = Batch {
            bytes: Vec::new(),
            sizes: sizes.to_vec(),
        };
        batch.runs().iter().map(|r| (r.size, r.count)).collect()
    }

    #[test]
    fn runs_are_equal_sizes_ending_with_at_most_one_shorter() {
        assert_eq!(runs(&[]), []);
        assert_eq!(runs(&[100, 100, 50]), [(100, 3)]);
        assert_eq!(runs(&[100, 50, 50]), [(100, 2), (50, 1)]);
        assert_eq!(runs(&[100, 200]), [(100, 1), (200, 1)]);
        assert_eq!(runs(&[1400; 70]), [(1400, 46), (1400, 24)]);
        assert_eq!(runs(&[100; 70]), [(100, 64), (100, 6)]);
    }

    #[test]
    fn the_frame_overhead_matches_the_wire_format() {
        let me = PeerName(7);
        let header = wire::sleeve_frame(me, &[]);
        let packet = [0x45u8; 100];
        assert_eq!(
            [&header[..], &packet].concat(),
            wire::sleeve_frame(me, &packet)
        );
        let sealer = Sealer::new(b"k");
        let nonce = SealNonce {
            sender: 7,
            epoch: 1,
            counter: 1,
        };
        let sealed = wire::sealed_sleeve_frame(&sealer, nonce, &packet);
        assert_eq!(sealed.len(), header.len() + 16 + TAG_LEN + packet.len());
    }
}
