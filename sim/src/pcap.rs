//! Writes every simulated datagram to a pcap file, wrapped in Ethernet,
//! IPv4 and UDP headers with the nodes' underlay addresses, so Wireshark
//! opens the run like a capture of real traffic.

use pcap_file::pcap::{PcapPacket, PcapWriter};
use std::fs::File;
use std::io::BufWriter;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use weft_core::Time;

pub struct Capture {
    writer: PcapWriter<BufWriter<File>>,
    /// The first write error, reported at the end instead of per packet.
    pub error: Option<String>,
}

impl Capture {
    pub fn create(path: &Path) -> Result<Capture, String> {
        let file =
            File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let writer = PcapWriter::new(BufWriter::new(file))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(Capture {
            writer,
            error: None,
        })
    }

    /// Flushes the file; says what went wrong if any write failed.
    pub fn finish(self) -> Result<(), String> {
        use std::io::Write;
        if let Some(e) = self.error {
            return Err(e);
        }
        self.writer.into_writer().flush().map_err(|e| e.to_string())
    }

    pub fn datagram(&mut self, at: Time, from: SocketAddr, to: SocketAddr, payload: &[u8]) {
        let frame = frame(from, to, payload);
        let packet = PcapPacket::new(at.since_epoch(), frame.len() as u32, &frame);
        if let Err(e) = self.writer.write_packet(&packet)
            && self.error.is_none()
        {
            self.error = Some(e.to_string());
        }
    }
}

/// Ethernet + IPv4 + UDP around `payload`.
pub fn frame(from: SocketAddr, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let (src, dst) = (v4(from), v4(to));
    let mut f = Vec::with_capacity(14 + 20 + 8 + payload.len());
    f.extend_from_slice(&mac(dst));
    f.extend_from_slice(&mac(src));
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45; // IPv4, 20-byte header
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let checksum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&from.port().to_be_bytes());
    f.extend_from_slice(&to.port().to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
    f.extend_from_slice(payload);
    f
}

fn v4(a: SocketAddr) -> Ipv4Addr {
    match a.ip() {
        IpAddr::V4(v) => v,
        IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    }
}

/// A locally administered MAC derived from the node's address.
fn mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x00, o[0], o[1], o[2], o[3]]
}

fn ipv4_checksum(header: &[u8; 20]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_valid_ipv4_and_udp_headers() {
        let from: SocketAddr = "192.168.1.11:6783".parse().unwrap();
        let to: SocketAddr = "192.168.1.12:6783".parse().unwrap();
        let f = frame(from, to, b"WEFT");
        assert_eq!(f.len(), 14 + 20 + 8 + 4);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        let ip: [u8; 20] = f[14..34].try_into().unwrap();
        assert_eq!(ipv4_checksum(&ip), 0, "a correct header sums to zero");
        assert_eq!(&ip[12..16], &[192, 168, 1, 11]);
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), 6783);
        assert_eq!(u16::from_be_bytes([f[38], f[39]]), 12);
        assert_eq!(&f[42..], b"WEFT");
    }
}
