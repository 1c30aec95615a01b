//! The probe's wire format: a probe datagram, and the whole VXLAN packet
//! that carries it to the peer's kernel. Pure: bytes in, bytes out.

use std::net::SocketAddrV4;
use weft_core::PeerName;

/// Starts every probe datagram. Never the start of a weft datagram
/// (`WEFT`), so the two can never be mistaken for each other.
pub const MAGIC: &[u8; 8] = b"WFTPROBE";
/// Magic, kind, nonce, sender.
pub const PROBE_LEN: usize = 8 + 1 + 8 + 8;
const REQUEST: u8 = 1;
const REPLY: u8 = 2;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::health::tests::{A, B, from};
    use crate::probe::{Prober, Received};
    use std::net::Ipv4Addr;

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
}
