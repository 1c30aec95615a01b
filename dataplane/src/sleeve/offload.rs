//! Batching for the sleeve, as pure packet logic (no system calls): the
//! TUN device's virtio-net header, TCP segmentation of the kernel's
//! super-packets, coalescing of received segments into super-packets, and
//! the Internet checksum.
//!
//! With offloads on, one read from the TUN device returns up to 64 KB of
//! one TCP flow, and one write hands the kernel as much; the sleeve pays
//! its system calls per super-packet instead of per 1.4 KB packet. Packets
//! from the TUN device and from the network are untrusted: every function
//! here checks lengths and returns an error instead of panicking.

/// Size of `struct virtio_net_hdr`, which leads every read and write on a
/// TUN device opened with `IFF_VNET_HDR`.
pub const VNET_HDR_LEN: usize = 10;
/// The checksum from `csum_start` on is yet to be computed.
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
/// Flag on the GSO type: the flow uses ECN (CWR on the first segment only).
pub const GSO_ECN: u8 = 0x80;
/// Largest IPv4 packet (the total length field is 16 bits).
pub const MAX_IP_PACKET: usize = 65_535;

const PROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;
/// Offset of the checksum in a TCP header.
const TCP_CSUM_OFFSET: usize = 16;

/// Why a packet cannot be segmented, completed or coalesced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("unsupported offload: {0}")]
    Unsupported(&'static str),
}

use OffloadError::{Malformed, Unsupported};

/// `struct virtio_net_hdr` (legacy layout, native byte order: what a TUN
/// device uses unless told otherwise with TUNSETVNETLE/BE).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(bytes: &[u8]) -> Result<VnetHdr, OffloadError> {
        let b = bytes
            .get(..VNET_HDR_LEN)
            .ok_or(Malformed("shorter than a vnet header"))?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Ok(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

/// One's-complement sum of `data` as big-endian 16-bit words, plus
/// `initial`, not yet folded. Summing 32-bit words gives the same folded
/// result (2^16 = 1 modulo 2^16 - 1) at half the additions; a trailing odd
/// byte counts as the high byte of a word.
pub fn sum(data: &[u8], initial: u64) -> u64 {
    let mut acc = initial;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let mut pairs = words.remainder().chunks_exact(2);
    for p in &mut pairs {
        acc += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [odd] = pairs.remainder() {
        acc += u64::from(*odd) << 8;
    }
    acc
}

/// Folds a sum into 16 bits (not complemented).
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The sum of the IPv4 pseudo-header of a TCP or UDP checksum.
pub fn pseudo_sum(src: &[u8; 4], dst: &[u8; 4], proto: u8, len: u16) -> u64 {
    sum(src, 0) + sum(dst, 0) + u64::from(proto) + u64::from(len)
}

/// The headers of a TCP/IPv4 packet: where they end, checked against the
/// buffer, so slicing with them cannot panic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tcp4 {
    /// IPv4 header length (the TCP header starts here).
    ip_len: usize,
    /// IPv4 plus TCP header length (the payload starts here).
    hdr_len: usize,
}

fn parse_tcp4(p: &[u8]) -> Result<Tcp4, OffloadError> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return Err(Malformed("not an IPv4 packet"));
    }
    let ip_len = usize::from(p[0] & 0x0f) * 4;
    if ip_len < 20 || p.len() < ip_len + 20 {
        return Err(Malformed("truncated IPv4 or TCP header"));
    }
    if p[9] != PROTO_TCP {
        return Err(Unsupported("not TCP"));
    }
    // More-fragments flag or a fragment offset: a fragment has no TCP
    // header of its own to rewrite.
    if u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0 {
        return Err(Unsupported("IPv4 fragment"));
    }
    let hdr_len = ip_len + usize::from(p[ip_len + 12] >> 4) * 4;
    if hdr_len < ip_len + 20 || hdr_len > p.len() {
        return Err(Malformed("bad TCP data offset"));
    }
    Ok(Tcp4 { ip_len, hdr_len })
}

fn addrs(p: &[u8]) -> ([u8; 4], [u8; 4]) {
    ([p[12], p[13], p[14], p[15]], [p[16], p[17], p[18], p[19]])
}

/// Rewrites the IPv4 header checksum of `p` (header length `ip_len`).
fn set_ip_checksum(p: &mut [u8], ip_len: usize) {
    p[10..12].fill(0);
    let c = !fold(sum(&p[..ip_len], 0));
    p[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Rewrites the full TCP checksum of `p`, headers `h`.
fn set_tcp_checksum(p: &mut [u8], h: Tcp4) {
    let at = h.ip_len + TCP_CSUM_OFFSET;
    p[at..at + 2].fill(0);
    let (src, dst) = addrs(p);
    let len = (p.len() - h.ip_len) as u16;
    let c = !fold(sum(&p[h.ip_len..], pseudo_sum(&src, &dst, PROTO_TCP, len)));
    p[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// Does `p` carry valid IPv4 header and TCP checksums?
fn tcp4_checksums_valid(p: &[u8], h: Tcp4) -> bool {
    let (src, dst) = addrs(p);
    let Ok(len) = u16::try_from(p.len() - h.ip_len) else {
        return false;
    };
    fold(sum(&p[..h.ip_len], 0)) == 0xffff
        && fold(sum(&p[h.ip_len..], pseudo_sum(&src, &dst, PROTO_TCP, len))) == 0xffff
}

/// Completes a checksum the kernel left to us (`F_NEEDS_CSUM` without
/// GSO): the field at `csum_start + csum_offset` holds the pseudo-header
/// sum, and the checksum covers everything from `csum_start`.
pub fn complete_checksum(p: &mut [u8], hdr: &VnetHdr) -> Result<(), OffloadError> {
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > p.len() {
        return Err(Malformed("checksum offset beyond the packet"));
    }
    let c = !fold(sum(&p[start..], 0));
    // As the kernel does: a computed 0 is sent as 0xffff (for UDP, 0
    // would mean "no checksum"; for TCP both are the same value).
    let c = if c == 0 { 0xffff } else { c };
    p[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Splits a TCP/IPv4 super-packet into segments of at most `mss` payload
/// bytes, each a complete packet with its own length, IP id, sequence
/// number and checksums; FIN and PSH stay on the last segment, CWR on
/// the first. `scratch` is reused to build each segment, which `emit`
/// receives in order. Returns the number of segments.
pub fn segment_tcp4(
    packet: &[u8],
    mss: usize,
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, OffloadError> {
    let h = parse_tcp4(packet)?;
    if mss == 0 {
        return Err(Malformed("zero segment size"));
    }
    // Each segment's length must fit the IPv4 total length field.
    let mss = mss.min(MAX_IP_PACKET - h.hdr_len);
    let (headers, payload) = packet.split_at(h.hdr_len);
    let id = u16::from_be_bytes([packet[4], packet[5]]);
    let t = h.ip_len;
    let seq = u32::from_be_bytes([packet[t + 4], packet[t + 5], packet[t + 6], packet[t + 7]]);
    // An empty payload is one segment: headers only.
    let count = payload.len().div_ceil(mss).max(1);
    for i in 0..count {
        let start = (i * mss).min(payload.len());
        let end = (start + mss).min(payload.len());
        scratch.clear();
        scratch.extend_from_slice(headers);
        scratch.extend_from_slice(&payload[start..end]);
        let total = scratch.len() as u16;
        scratch[2..4].copy_from_slice(&total.to_be_bytes());
        scratch[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
        set_ip_checksum(scratch, h.ip_len);
        scratch[t + 4..t + 8].copy_from_slice(&seq.wrapping_add(start as u32).to_be_bytes());
        if i + 1 < count {
            scratch[t + 13] &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            scratch[t + 13] &= !TCP_CWR;
        }
        set_tcp_checksum(scratch, h);
        emit(scratch);
    }
    Ok(count)
}

/// The IP packets of one read from a TUN device with a vnet header:
/// segments of a TCP super-packet, each at most `max_packet` bytes (so
/// its frame fits the underlay), or the one packet read, its checksum
/// completed when the kernel left that to us.
pub fn split_tun_read(
    read: &mut [u8],
    max_packet: usize,
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, OffloadError> {
    let hdr = VnetHdr::parse(read)?;
    let packet = &mut read[VNET_HDR_LEN..];
    match hdr.gso_type & !GSO_ECN {
        GSO_NONE => {
            if hdr.flags & F_NEEDS_CSUM != 0 {
                complete_checksum(packet, &hdr)?;
            }
            // A TCP packet too big for one datagram (the pod MTU leaves no
            // room for a sealed frame's overhead) is cut rather than left
            // to IP fragmentation of the underlay.
            match parse_tcp4(packet) {
                Ok(h) if packet.len() > max_packet && max_packet > h.hdr_len => {
                    segment_tcp4(packet, max_packet - h.hdr_len, scratch, emit)
                }
                _ => {
                    emit(packet);
                    Ok(1)
                }
            }
        }
        GSO_TCPV4 => {
            let h = parse_tcp4(packet)?;
            // The kernel's segment size, or less when a frame of that size
            // would not fit the underlay (TCP accepts smaller segments).
            let room = max_packet
                .checked_sub(h.hdr_len)
                .filter(|&r| r > 0)
                .ok_or(Malformed("headers leave no room for payload"))?;
            let mss = usize::from(hdr.gso_size).min(room);
            segment_tcp4(packet, mss, scratch, emit)
        }
        _ => Err(Unsupported("GSO type other than TCPv4")),
    }
}

/// The fields of a TCP/IPv4 header that may differ between segments of
/// one coalesced packet: IP total length, id and checksum; TCP sequence
/// number and checksum. PSH (byte 13 of TCP) is handled apart.
fn headers_match(a: &[u8], b: &[u8], h: Tcp4) -> bool {
    let t = h.ip_len;
    let same = |r: std::ops::Range<usize>| a[r.clone()] == b[r];
    a.len() >= h.hdr_len
        && b.len() >= h.hdr_len
        && same(0..2)
        && same(6..10)
        && same(12..t + 4)
        && same(t + 8..t + 13)
        && a[t + 13] & !TCP_PSH == b[t + 13] & !TCP_PSH
        && same(t + 14..t + 16)
        && same(t + 18..h.hdr_len)
}

/// A coalesced packet being built: segments of one flow, in order.
struct Group {
    /// The first segment's headers, then every segment's payload.
    packet: Vec<u8>,
    h: Tcp4,
    /// Payload size of the first segment; every later one but the last
    /// must have the same.
    gso_size: usize,
    next_seq: u32,
    segments: usize,
    /// Took a short or PSH segment: nothing may follow it.
    closed: bool,
}

impl Group {
    fn flow_matches(&self, p: &[u8]) -> bool {
        let t = self.h.ip_len;
        // Addresses and ports.
        p.len() >= t + 4 && self.packet[12..20] == p[12..20] && self.packet[t..t + 4] == p[t..t + 4]
    }

    fn try_append(&mut self, p: &[u8], h: Tcp4) -> bool {
        let payload = &p[h.hdr_len..];
        let t = h.ip_len;
        let seq = u32::from_be_bytes([p[t + 4], p[t + 5], p[t + 6], p[t + 7]]);
        if self.closed
            || h != self.h
            || seq != self.next_seq
            || payload.len() > self.gso_size
            || self.packet.len() + payload.len() > MAX_IP_PACKET
            || !headers_match(&self.packet, p, h)
        {
            return false;
        }
        self.packet.extend_from_slice(payload);
        self.next_seq = seq.wrapping_add(payload.len() as u32);
        self.segments += 1;
        if p[t + 13] & TCP_PSH != 0 {
            self.packet[t + 13] |= TCP_PSH;
            self.closed = true;
        }
        self.closed |= payload.len() < self.gso_size;
        true
    }

    /// The vnet header and packet to write: one segment as it came (its
    /// checksums were verified), several as a GSO packet whose TCP
    /// checksum the kernel completes from the pseudo-header sum.
    fn finish(&mut self) -> VnetHdr {
        if self.segments == 1 {
            return VnetHdr::default();
        }
        let h = self.h;
        let p = &mut self.packet;
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        set_ip_checksum(p, h.ip_len);
        let (src, dst) = addrs(p);
        let partial = fold(pseudo_sum(
            &src,
            &dst,
            PROTO_TCP,
            (p.len() - h.ip_len) as u16,
        ));
        let at = h.ip_len + TCP_CSUM_OFFSET;
        p[at..at + 2].copy_from_slice(&partial.to_be_bytes());
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: h.hdr_len as u16,
            gso_size: self.gso_size as u16,
            csum_start: h.ip_len as u16,
            csum_offset: TCP_CSUM_OFFSET as u16,
        }
    }
}

/// Most flows coalesced at once; beyond that the oldest is written out.
const MAX_GROUPS: usize = 8;

/// Coalesces received TCP segments into GSO super-packets for the TUN
/// device. Push packets in arrival order, then [`Coalescer::flush`] at the
/// end of each batch; `write` receives (vnet header, packet) pairs. Order
/// within a flow is kept; only data segments (ACK, maybe PSH) with valid
/// checksums, contiguous sequence numbers and identical headers join.
#[derive(Default)]
pub struct Coalescer {
    groups: Vec<Group>,
    /// Spare buffers, so a steady stream allocates nothing.
    spare: Vec<Vec<u8>>,
}

impl Coalescer {
    pub fn push(&mut self, p: &[u8], write: &mut impl FnMut(&VnetHdr, &[u8])) {
        let Some(h) = coalescible(p) else {
            // Not ours to merge: its own flow's earlier segments go first.
            if let Some(i) = self.groups.iter().position(|g| g.flow_matches(p)) {
                self.write_group(i, write);
            }
            write(&VnetHdr::default(), p);
            return;
        };
        if let Some(i) = self.groups.iter().position(|g| g.flow_matches(p)) {
            if self.groups[i].try_append(p, h) {
                return;
            }
            self.write_group(i, write);
        }
        if self.groups.len() == MAX_GROUPS {
            self.write_group(0, write);
        }
        let mut packet = self.spare.pop().unwrap_or_default();
        packet.clear();
        packet.extend_from_slice(p);
        let t = h.ip_len;
        let seq = u32::from_be_bytes([p[t + 4], p[t + 5], p[t + 6], p[t + 7]]);
        let gso_size = p.len() - h.hdr_len;
        self.groups.push(Group {
            packet,
            h,
            gso_size,
            next_seq: seq.wrapping_add(gso_size as u32),
            segments: 1,
            closed: p[t + 13] & TCP_PSH != 0,
        });
    }

    /// Writes every packet still held.
    pub fn flush(&mut self, write: &mut impl FnMut(&VnetHdr, &[u8])) {
        while !self.groups.is_empty() {
            self.write_group(0, write);
        }
    }

    fn write_group(&mut self, i: usize, write: &mut impl FnMut(&VnetHdr, &[u8])) {
        let mut g = self.groups.remove(i);
        let hdr = g.finish();
        write(&hdr, &g.packet);
        self.spare.push(g.packet);
    }
}

/// The headers of `p` if it may join a coalesced packet: TCP/IPv4 data
/// with ACK (and maybe PSH) only, and valid checksums (the kernel trusts
/// a GSO packet's payload, so a corrupt segment must not hide in one).
fn coalescible(p: &[u8]) -> Option<Tcp4> {
    let h = parse_tcp4(p).ok()?;
    let flags = p[h.ip_len + 13];
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    let ok = total == p.len()
        && p.len() > h.hdr_len
        && flags & !(TCP_ACK | TCP_PSH) == 0
        && flags & TCP_ACK != 0
        && tcp4_checksums_valid(p, h);
    ok.then_some(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook checksum, 16 bits at a time: independent of `sum`.
    fn reference_checksum(chunks: &[&[u8]]) -> u16 {
        let bytes: Vec<u8> = chunks.concat();
        let mut acc: u32 = 0;
        for pair in bytes.chunks(2) {
            let word = (u32::from(pair[0]) << 8) | u32::from(*pair.get(1).unwrap_or(&0));
            acc += word;
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    }

    /// Both checksums of a TCP/IPv4 packet verify (the reference way).
    fn assert_valid(p: &[u8]) {
        let ip_len = usize::from(p[0] & 0x0f) * 4;
        assert_eq!(reference_checksum(&[&p[..ip_len]]), 0, "IP checksum");
        let len = ((p.len() - ip_len) as u16).to_be_bytes();
        let pseudo = [&p[12..20], &[0, PROTO_TCP], &len[..]].concat();
        assert_eq!(
            reference_checksum(&[&pseudo, &p[ip_len..]]),
            0,
            "TCP checksum"
        );
        assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len());
    }

    /// A TCP/IPv4 packet with `payload`, 12 bytes of TCP options
    /// (timestamps), valid checksums.
    fn tcp_packet(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, PROTO_TCP, 0, 0, 10, 32, 0, 1, 10, 40, 0, 2,
        ];
        p.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51]); // ports 40000 -> 5201
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&7u32.to_be_bytes()); // ack
        p.extend_from_slice(&[0x80, flags, 0x01, 0xf5, 0, 0, 0, 0]);
        p.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        p.extend_from_slice(payload);
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        let h = parse_tcp4(&p).unwrap();
        set_ip_checksum(&mut p, h.ip_len);
        set_tcp_checksum(&mut p, h);
        p
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn segments(p: &[u8], mss: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        segment_tcp4(p, mss, &mut Vec::new(), |s| out.push(s.to_vec())).unwrap();
        out
    }

    fn coalesce(packets: &[Vec<u8>]) -> Vec<(VnetHdr, Vec<u8>)> {
        let mut c = Coalescer::default();
        let mut out = Vec::new();
        let mut write = |h: &VnetHdr, p: &[u8]| out.push((*h, p.to_vec()));
        for p in packets {
            c.push(p, &mut write);
        }
        c.flush(&mut write);
        out
    }

    /// What the kernel does with a written GSO packet: completes the
    /// partial checksum, which must then verify.
    fn complete(hdr: &VnetHdr, p: &[u8]) -> Vec<u8> {
        let mut p = p.to_vec();
        if hdr.flags & F_NEEDS_CSUM != 0 {
            complete_checksum(&mut p, hdr).unwrap();
        }
        p
    }

    #[test]
    fn sums_match_the_reference_for_every_length_and_offset() {
        let data = payload(300);
        for start in 0..4 {
            for end in start..data.len() {
                let d = &data[start..end];
                assert_eq!(!fold(sum(d, 0)), reference_checksum(&[d]), "{start}..{end}");
            }
        }
        assert_eq!(fold(0x1_fffe), 0xffff);
        assert_eq!(fold(0), 0);
    }

    #[test]
    fn vnet_headers_round_trip() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size: 1398,
            csum_start: 20,
            csum_offset: 16,
        };
        assert_eq!(VnetHdr::parse(&h.encode()), Ok(h));
        assert!(VnetHdr::parse(&[0; 9]).is_err());
    }

    #[test]
    fn segmentation_makes_valid_contiguous_segments() {
        let data = payload(10_000);
        let big = tcp_packet(1000, TCP_ACK | TCP_PSH | TCP_FIN, &data);
        let segs = segments(&big, 1400);
        assert_eq!(segs.len(), 8);
        let mut seq = 1000u32;
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert_valid(s);
            let h = parse_tcp4(s).unwrap();
            assert_eq!(u32::from_be_bytes(s[24..28].try_into().unwrap()), seq);
            assert_eq!(u16::from_be_bytes([s[4], s[5]]), 0x1234 + i as u16);
            let last = i == segs.len() - 1;
            assert_eq!(s[33] & (TCP_PSH | TCP_FIN) != 0, last);
            assert_eq!(
                s.len() - h.hdr_len,
                if last { 10_000 - 7 * 1400 } else { 1400 }
            );
            seq += (s.len() - h.hdr_len) as u32;
            joined.extend_from_slice(&s[h.hdr_len..]);
        }
        assert_eq!(joined, data);
    }

    #[test]
    fn cwr_stays_on_the_first_segment_and_an_empty_payload_is_one_segment() {
        let segs = segments(&tcp_packet(1, TCP_ACK | TCP_CWR, &payload(3000)), 1000);
        assert_eq!(segs.len(), 3);
        assert_eq!(segs[0][33] & TCP_CWR, TCP_CWR);
        assert!(segs[1..].iter().all(|s| s[33] & TCP_CWR == 0));
        let segs = segments(&tcp_packet(1, TCP_ACK, &[]), 1000);
        assert_eq!(segs.len(), 1);
        assert_valid(&segs[0]);
    }

    #[test]
    fn segment_then_coalesce_gives_back_the_packet() {
        for (len, mss) in [(10_000, 1400), (2800, 1400), (65_000, 1398), (1401, 1400)] {
            let data = payload(len);
            let big = tcp_packet(u32::MAX - 5000, TCP_ACK | TCP_PSH, &data);
            let out = coalesce(&segments(&big, mss));
            assert_eq!(out.len(), 1, "{len}/{mss}");
            let (hdr, p) = &out[0];
            assert_eq!(hdr.gso_type, GSO_TCPV4);
            assert_eq!(usize::from(hdr.gso_size), mss);
            assert_eq!(usize::from(hdr.hdr_len), 52);
            let p = complete(hdr, p);
            assert_valid(&p);
            // The first segment's IP id is the super-packet's.
            assert_eq!(p, big);
        }
    }

    #[test]
    fn coalesce_then_segment_gives_back_the_segments() {
        let big = tcp_packet(77, TCP_ACK, &payload(20_000));
        let segs = segments(&big, 1300);
        let (hdr, p) = coalesce(&segs).pop().unwrap();
        let mut read = hdr.encode().to_vec();
        read.extend_from_slice(&p);
        let mut again = Vec::new();
        split_tun_read(&mut read, 1500, &mut Vec::new(), |s| again.push(s.to_vec())).unwrap();
        assert_eq!(again.len(), segs.len());
        for (a, s) in again.iter().zip(&segs) {
            assert_valid(a);
            // The id restarts from the first segment's, as in `segs`.
            assert_eq!(a, s);
        }
    }

    #[test]
    fn a_smaller_underlay_budget_makes_smaller_segments() {
        let big = tcp_packet(0, TCP_ACK, &payload(4100));
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size: 1398,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut read = [&hdr.encode()[..], &big].concat();
        let mut sizes = Vec::new();
        split_tun_read(&mut read, 1052, &mut Vec::new(), |s| {
            assert_valid(s);
            sizes.push(s.len());
        })
        .unwrap();
        assert_eq!(sizes, [1052, 1052, 1052, 1052, 52 + 100]);
        assert_eq!(
            split_tun_read(&mut read, 52, &mut Vec::new(), |_| {}),
            Err(Malformed("headers leave no room for payload"))
        );
    }

    #[test]
    fn a_single_packet_too_big_for_a_frame_is_cut_if_tcp() {
        let p = tcp_packet(9, TCP_ACK | TCP_PSH, &payload(1398));
        let mut read = [&VnetHdr::default().encode()[..], &p].concat();
        let mut sizes = Vec::new();
        split_tun_read(&mut read, 1426, &mut Vec::new(), |s| {
            assert_valid(s);
            sizes.push(s.len());
        })
        .unwrap();
        assert_eq!(sizes, [1426, 52 + 24]);
        // Not TCP: left whole (nothing else can be cut without IP
        // fragmentation).
        let mut icmp = p.clone();
        icmp[9] = 1;
        let mut read = [&VnetHdr::default().encode()[..], &icmp].concat();
        let mut got = Vec::new();
        split_tun_read(&mut read, 1426, &mut Vec::new(), |s| got.push(s.to_vec())).unwrap();
        assert_eq!(got, [icmp]);
    }

    #[test]
    fn a_needed_checksum_is_completed() {
        let mut p = tcp_packet(5, TCP_ACK, &payload(99));
        let len = (p.len() - 20) as u16;
        let partial = fold(pseudo_sum(&[10, 32, 0, 1], &[10, 40, 0, 2], PROTO_TCP, len));
        p[36..38].copy_from_slice(&partial.to_be_bytes());
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 16,
            ..VnetHdr::default()
        };
        let mut read = [&hdr.encode()[..], &p].concat();
        let mut got = Vec::new();
        split_tun_read(&mut read, 1500, &mut Vec::new(), |s| got = s.to_vec()).unwrap();
        assert_valid(&got);
        assert_eq!(got, tcp_packet(5, TCP_ACK, &payload(99)));
    }

    #[test]
    fn only_contiguous_data_segments_of_one_flow_coalesce() {
        let segs = segments(&tcp_packet(100, TCP_ACK, &payload(5000)), 1000);
        // A gap: two packets.
        let gap = [segs[0].clone(), segs[2].clone()];
        assert_eq!(coalesce(&gap).len(), 2);
        // A SYN, a bad checksum, another flow: written singly, in order.
        let syn = tcp_packet(1, 0x02, &[]);
        let mut corrupt = segs[1].clone();
        corrupt[60] ^= 1;
        let mut other = segs[1].clone();
        other[21] ^= 1; // source port
        let h = parse_tcp4(&other).unwrap();
        set_tcp_checksum(&mut other, h);
        let out = coalesce(&[segs[0].clone(), corrupt.clone(), syn.clone(), other.clone()]);
        let packets: Vec<&Vec<u8>> = out.iter().map(|(_, p)| p).collect();
        assert_eq!(packets, [&segs[0], &corrupt, &syn, &other]);
        assert!(out.iter().all(|(h, _)| *h == VnetHdr::default()));
        // Interleaved flows each coalesce.
        let others = segments(&other, 1000);
        let mixed: Vec<Vec<u8>> = segs
            .iter()
            .zip(&others)
            .flat_map(|(a, b)| [a.clone(), b.clone()])
            .collect();
        assert_eq!(coalesce(&mixed).len(), 2);
    }

    #[test]
    fn nothing_follows_a_short_or_pushed_segment() {
        let a = tcp_packet(0, TCP_ACK, &payload(1000));
        let short = tcp_packet(1000, TCP_ACK, &payload(500));
        let after = tcp_packet(1500, TCP_ACK, &payload(1000));
        let out = coalesce(&[a.clone(), short, after.clone()]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].1, after);
        let pushed = tcp_packet(1000, TCP_ACK | TCP_PSH, &payload(1000));
        let after = tcp_packet(2000, TCP_ACK, &payload(1000));
        let out = coalesce(&[a, pushed, after]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].1[33] & TCP_PSH, TCP_PSH);
        assert_valid(&complete(&out[0].0, &out[0].1));
    }

    #[test]
    fn coalesced_packets_stay_within_64_kb() {
        let segs = segments(&tcp_packet(0, TCP_ACK, &payload(200_000 - 52)), 1448);
        let out = coalesce(&segs);
        assert!(out.len() >= 4);
        for (h, p) in &out {
            assert!(p.len() <= MAX_IP_PACKET);
            assert_valid(&complete(h, p));
        }
    }

    /// A small deterministic generator for the robustness test.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn malformed_input_is_an_error_never_a_panic() {
        let good = tcp_packet(0, TCP_ACK, &payload(3000));
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size: 1000,
            csum_start: 20,
            csum_offset: 16,
        };
        let read = [&hdr.encode()[..], &good].concat();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut c = Coalescer::default();
        let mut sink = |_: &VnetHdr, _: &[u8]| {};
        for round in 0..20_000 {
            let mut r = read.clone();
            let cut = (xorshift(&mut rng) as usize) % (r.len() + 1);
            r.truncate(if round % 2 == 0 { cut } else { r.len() });
            for _ in 0..(xorshift(&mut rng) % 4) {
                if !r.is_empty() {
                    let i = (xorshift(&mut rng) as usize) % r.len();
                    r[i] = xorshift(&mut rng) as u8;
                }
            }
            let mss = (xorshift(&mut rng) % 2000) as usize;
            let _ = split_tun_read(&mut r.clone(), mss, &mut Vec::new(), |_| {});
            if r.len() > VNET_HDR_LEN {
                let _ = segment_tcp4(&r[VNET_HDR_LEN..], mss, &mut Vec::new(), |_| {});
                c.push(&r[VNET_HDR_LEN..], &mut sink);
            }
        }
        c.flush(&mut sink);
        let short = VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 100,
            ..VnetHdr::default()
        };
        let mut r = [&short.encode()[..], &good[..30]].concat();
        assert!(split_tun_read(&mut r, 1500, &mut Vec::new(), |_| {}).is_err());
        let odd = VnetHdr {
            gso_type: 5,
            ..VnetHdr::default()
        };
        let mut r = [&odd.encode()[..], &good].concat();
        assert_eq!(
            split_tun_read(&mut r, 1500, &mut Vec::new(), |_| {}),
            Err(Unsupported("GSO type other than TCPv4"))
        );
        let far = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 60_000,
            csum_offset: 16,
            ..VnetHdr::default()
        };
        let mut r = [&far.encode()[..], &good].concat();
        assert!(split_tun_read(&mut r, 1500, &mut Vec::new(), |_| {}).is_err());
    }
}
