//! Pod egress masquerade: weft's one nftables table, `ip weft`, programmed
//! over nfnetlink with no `nft` program (the shipped image has none).
//!
//! The table is replaced in one batch (create, delete, create again, then
//! its chain and rule), which the kernel applies atomically: installing is
//! idempotent and nothing else in the ruleset is touched. The batch is
//! built by pure functions ([`masquerade_batch`], [`remove_batch`]) and
//! sent by [`install_masquerade`] / [`remove_masquerade`].
//!
//! The batch is byte for byte what `nft` 1.0.6 sends for
//!
//! ```text
//! table ip weft {
//!     chain postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         ip saddr RANGE ip daddr != RANGE masquerade
//!     }
//! }
//! ```
//!
//! apart from header flags (weft asks for an ACK of every message).

use std::collections::BTreeSet;
use std::io;
use std::os::fd::AsRawFd;

use ipnet::Ipv4Net;
use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};

use crate::DataplaneError;

/// weft's table (family `ip`) and its one chain.
pub const TABLE: &str = "weft";
pub const CHAIN: &str = "postrouting";

// include/uapi/linux/netlink.h
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
// include/uapi/linux/netfilter/nfnetlink.h
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_IPV4: u8 = 2;
// include/uapi/linux/netfilter/nf_tables.h
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFT_REG_1: u32 = 1;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
// The expressions' attributes all start SREG/DREG, ... at 1: named per use.
const NF_INET_POST_ROUTING: u32 = 4;
/// `priority srcnat`.
const NF_IP_PRI_NAT_SRC: i32 = 100;
const NF_ACCEPT: u32 = 1;
/// Offsets of the source and destination addresses in the IPv4 header.
const IPV4_SADDR: u32 = 12;
const IPV4_DADDR: u32 = 16;

/// An nfnetlink batch ready to send, and what each of its messages does
/// (by sequence number) so a refusal can be explained.
#[derive(Debug, Clone)]
pub struct Batch {
    pub bytes: Vec<u8>,
    steps: Vec<(u32, &'static str)>,
}

impl Batch {
    fn new() -> Batch {
        let mut b = Batch {
            bytes: Vec::new(),
            steps: Vec::new(),
        };
        b.control(NFNL_MSG_BATCH_BEGIN);
        b
    }

    fn seq(&self) -> u32 {
        // Each message takes the next number; the batch begin is 0.
        self.steps.len() as u32 + 1
    }

    fn control(&mut self, kind: u16) {
        let seq = if kind == NFNL_MSG_BATCH_BEGIN {
            0
        } else {
            self.seq()
        };
        let start = header(&mut self.bytes, kind, NLM_F_REQUEST, seq, NFPROTO_UNSPEC);
        // res_id: the subsystem the batch is for, big-endian.
        self.bytes[start + 18..start + 20].copy_from_slice(&NFNL_SUBSYS_NFTABLES.to_be_bytes());
        finish(&mut self.bytes, start);
    }

    /// One nf_tables message for family `ip`, acknowledged by the kernel.
    fn message(
        &mut self,
        kind: u16,
        flags: u16,
        step: &'static str,
        attrs: impl FnOnce(&mut Vec<u8>),
    ) {
        let seq = self.seq();
        let ty = (NFNL_SUBSYS_NFTABLES << 8) | kind;
        let start = header(
            &mut self.bytes,
            ty,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            seq,
            NFPROTO_IPV4,
        );
        attrs(&mut self.bytes);
        finish(&mut self.bytes, start);
        self.steps.push((seq, step));
    }

    fn end(mut self) -> Batch {
        self.control(NFNL_MSG_BATCH_END);
        self
    }

    /// Creating the table when absent, then deleting it, makes the delete
    /// succeed whether or not the table existed.
    fn drop_table(&mut self) {
        self.message(NFT_MSG_NEWTABLE, 0, "create table ip weft", table_attrs);
        self.message(NFT_MSG_DELTABLE, 0, "delete table ip weft", |b| {
            string(b, NFTA_TABLE_NAME, TABLE)
        });
    }
}

/// Replaces table `ip weft` with one masquerading `range`'s traffic to
/// addresses outside `range`.
pub fn masquerade_batch(range: Ipv4Net) -> Batch {
    let range = range.trunc();
    let mut b = Batch::new();
    b.drop_table();
    b.message(NFT_MSG_NEWTABLE, 0, "create table ip weft", table_attrs);
    b.message(
        NFT_MSG_NEWCHAIN,
        NLM_F_CREATE,
        "add chain postrouting (type nat hook postrouting)",
        chain_attrs,
    );
    b.message(
        NFT_MSG_NEWRULE,
        NLM_F_CREATE | NLM_F_APPEND,
        "add the masquerade rule",
        |buf| {
            string(buf, NFTA_RULE_TABLE, TABLE);
            string(buf, NFTA_RULE_CHAIN, CHAIN);
            nested(buf, NFTA_RULE_EXPRESSIONS, |buf| {
                match_prefix(buf, IPV4_SADDR, range, NFT_CMP_EQ);
                match_prefix(buf, IPV4_DADDR, range, NFT_CMP_NEQ);
                expr(buf, "masq", |_| {});
            });
        },
    );
    b.end()
}

/// Deletes table `ip weft` if it exists.
pub fn remove_batch() -> Batch {
    let mut b = Batch::new();
    b.drop_table();
    b.end()
}

fn table_attrs(buf: &mut Vec<u8>) {
    string(buf, NFTA_TABLE_NAME, TABLE);
    be32(buf, NFTA_TABLE_FLAGS, 0);
}

fn chain_attrs(buf: &mut Vec<u8>) {
    string(buf, NFTA_CHAIN_TABLE, TABLE);
    string(buf, NFTA_CHAIN_NAME, CHAIN);
    string(buf, NFTA_CHAIN_TYPE, "nat");
    be32(buf, NFTA_CHAIN_POLICY, NF_ACCEPT);
    nested(buf, NFTA_CHAIN_HOOK, |buf| {
        be32(buf, NFTA_HOOK_HOOKNUM, NF_INET_POST_ROUTING);
        be32(buf, NFTA_HOOK_PRIORITY, NF_IP_PRI_NAT_SRC as u32);
    });
}

/// `ip saddr|daddr (==|!=) net`: load the address, mask it, compare.
fn match_prefix(buf: &mut Vec<u8>, offset: u32, net: Ipv4Net, op: u32) {
    const DREG: u16 = 1;
    const BASE: u16 = 2;
    const OFFSET: u16 = 3;
    const LEN: u16 = 4;
    const MASK: u16 = 4;
    const XOR: u16 = 5;
    const CMP_OP: u16 = 2;
    const CMP_DATA: u16 = 3;
    expr(buf, "payload", |b| {
        be32(b, DREG, NFT_REG_1);
        be32(b, BASE, NFT_PAYLOAD_NETWORK_HEADER);
        be32(b, OFFSET, offset);
        be32(b, LEN, 4);
    });
    expr(buf, "bitwise", |b| {
        be32(b, 1, NFT_REG_1); // sreg
        be32(b, 2, NFT_REG_1); // dreg
        be32(b, 3, 4); // len
        value(b, MASK, &net.netmask().octets());
        value(b, XOR, &[0; 4]);
    });
    expr(buf, "cmp", |b| {
        be32(b, 1, NFT_REG_1); // sreg
        be32(b, CMP_OP, op);
        value(b, CMP_DATA, &net.network().octets());
    });
}

fn expr(buf: &mut Vec<u8>, name: &str, data: impl FnOnce(&mut Vec<u8>)) {
    nested(buf, NFTA_LIST_ELEM, |buf| {
        string(buf, NFTA_EXPR_NAME, name);
        nested(buf, NFTA_EXPR_DATA, data);
    });
}

fn value(buf: &mut Vec<u8>, ty: u16, bytes: &[u8]) {
    nested(buf, ty, |buf| attr(buf, NFTA_DATA_VALUE, bytes));
}

/// Appends a netlink header and nfgenmsg; returns where the message starts.
fn header(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    buf.extend_from_slice(&[family, 0, 0, 0]); // version 0, res_id 0
    start
}

fn finish(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

fn attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    buf.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    pad(buf);
}

fn nested(buf: &mut Vec<u8>, ty: u16, inner: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 2]);
    buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    inner(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

fn string(buf: &mut Vec<u8>, ty: u16, s: &str) {
    let mut data = s.as_bytes().to_vec();
    data.push(0);
    attr(buf, ty, &data);
}

fn be32(buf: &mut Vec<u8>, ty: u16, v: u32) {
    attr(buf, ty, &v.to_be_bytes());
}

fn pad(buf: &mut Vec<u8>) {
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// The kernel's answers in `buf`: (sequence number, errno) of each
/// NLMSG_ERROR message, errno 0 being an ACK. Stops at anything malformed.
fn answers(mut buf: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let word = |at: usize| u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap());
        let len = word(0) as usize;
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < 16 || len > buf.len() {
            break;
        }
        if ty == NLMSG_ERROR && len >= 20 {
            let code = i32::from_ne_bytes(buf[16..20].try_into().unwrap());
            out.push((word(8), code.saturating_neg()));
        }
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    out
}

/// Installs (or replaces) weft's masquerade table for `range` in the
/// calling thread's network namespace.
pub fn install_masquerade(range: Ipv4Net) -> Result<(), DataplaneError> {
    send(&masquerade_batch(range))
}

/// Deletes weft's masquerade table, if any, from the calling thread's
/// network namespace.
pub fn remove_masquerade() -> Result<(), DataplaneError> {
    send(&remove_batch())
}

/// Sends `batch` and waits for the kernel's answer to each message: the
/// kernel handles the batch within `send` and answers every message
/// flagged with NLM_F_ACK, whether it succeeded or not.
fn send(batch: &Batch) -> Result<(), DataplaneError> {
    let fail = |step: &'static str, e: io::Error| DataplaneError::Nftables {
        step,
        reason: explain(e),
    };
    let open = "open an nfnetlink socket";
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|e| fail(open, e))?;
    socket.bind_auto().map_err(|e| fail(open, e))?;
    set_timeout(&socket).map_err(|e| fail(open, e))?;
    socket
        .send(&batch.bytes, 0)
        .map_err(|e| fail("send the batch", e))?;
    let mut pending: BTreeSet<u32> = batch.steps.iter().map(|(seq, _)| *seq).collect();
    while !pending.is_empty() {
        let (buf, _) = socket
            .recv_from_full()
            .map_err(|e| fail("read the kernel's answer", e))?;
        for (seq, errno) in answers(&buf) {
            if errno != 0 {
                let step = batch.step(seq).unwrap_or("apply the batch");
                return Err(fail(step, io::Error::from_raw_os_error(errno)));
            }
            pending.remove(&seq);
        }
    }
    Ok(())
}

impl Batch {
    fn step(&self, seq: u32) -> Option<&'static str> {
        self.steps.iter().find(|(s, _)| *s == seq).map(|(_, w)| *w)
    }
}

/// A guard against a kernel that never answers (the answers are queued
/// before `send` returns, so this never delays a working one).
fn set_timeout(socket: &Socket) -> io::Result<()> {
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: a valid fd and a timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The OS error with what it most likely means here.
fn explain(e: io::Error) -> String {
    let hint = match e.raw_os_error() {
        Some(libc::EPERM) => "; programming nftables needs CAP_NET_ADMIN",
        Some(libc::ENOENT | libc::EOPNOTSUPP | libc::EPROTONOSUPPORT | libc::EAFNOSUPPORT) => {
            "; the kernel lacks nftables NAT (CONFIG_NF_TABLES, nft_chain_nat, nft_masq)"
        }
        Some(libc::EAGAIN) => "; the kernel did not answer within 5 s",
        _ => "",
    };
    format!("{e}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (type, flags, seq, body after the netlink header) of each message.
    fn messages(mut buf: &[u8]) -> Vec<(u16, u16, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !buf.is_empty() {
            let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
            assert!(
                len >= 20 && len.is_multiple_of(4) && len <= buf.len(),
                "bad length {len}"
            );
            out.push((
                u16::from_ne_bytes([buf[4], buf[5]]),
                u16::from_ne_bytes([buf[6], buf[7]]),
                u32::from_ne_bytes(buf[8..12].try_into().unwrap()),
                buf[16..len].to_vec(),
            ));
            buf = &buf[len..];
        }
        out
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn the_batch_is_what_nft_sends_for_the_same_table() {
        // Captured from nft 1.0.6 (see testdata/README).
        let nft = hex(include_str!("testdata/nft-masquerade-10.32.0.0-12.hex"));
        let ours = masquerade_batch("10.32.0.0/12".parse().unwrap()).bytes;
        let (nft, ours) = (messages(&nft), messages(&ours));
        assert_eq!(nft.len(), ours.len());
        for (n, o) in nft.iter().zip(&ours) {
            assert_eq!((n.0, &n.3), (o.0, &o.3), "message of type {:#x}", n.0);
            assert_eq!(n.2, o.2, "sequence numbers");
        }
    }

    #[test]
    fn every_change_is_acknowledged_and_the_batch_is_framed() {
        let b = masquerade_batch("10.32.0.0/12".parse().unwrap());
        let m = messages(&b.bytes);
        let types: Vec<u16> = m.iter().map(|m| m.0).collect();
        assert_eq!(types, [16, 0xa00, 0xa02, 0xa00, 0xa03, 0xa06, 17]);
        for (_, flags, seq, _) in &m[1..m.len() - 1] {
            assert_eq!(
                flags & (NLM_F_REQUEST | NLM_F_ACK),
                NLM_F_REQUEST | NLM_F_ACK
            );
            assert!(b.step(*seq).is_some());
        }
        assert_eq!(b.steps.len(), 5);
    }

    #[test]
    fn the_rule_masks_and_compares_the_range_network() {
        // A range given with host bits matches its network.
        let b = masquerade_batch("10.32.7.9/12".parse().unwrap());
        let rule = &messages(&b.bytes)[5].3;
        let find = |needle: &[u8]| rule.windows(needle.len()).filter(|w| *w == needle).count();
        // NFTA_DATA_VALUE attributes: the mask twice, the network twice.
        assert_eq!(find(&[8, 0, 1, 0, 0xff, 0xf0, 0, 0]), 2);
        assert_eq!(find(&[8, 0, 1, 0, 10, 32, 0, 0]), 2);
    }

    #[test]
    fn removal_creates_then_deletes_the_table_only() {
        let types: Vec<u16> = messages(&remove_batch().bytes)
            .iter()
            .map(|m| m.0)
            .collect();
        assert_eq!(types, [16, 0xa00, 0xa02, 17]);
    }

    #[test]
    fn answers_read_acks_and_errors_and_survive_garbage() {
        let mut buf = Vec::new();
        for (seq, code) in [(1u32, 0i32), (2, -2)] {
            buf.extend_from_slice(&36u32.to_ne_bytes());
            buf.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            buf.extend_from_slice(&[0; 2]);
            buf.extend_from_slice(&seq.to_ne_bytes());
            buf.extend_from_slice(&[0; 4]);
            buf.extend_from_slice(&code.to_ne_bytes());
            buf.extend_from_slice(&[0; 16]);
        }
        assert_eq!(answers(&buf), [(1, 0), (2, 2)]);
        assert_eq!(answers(&buf[..50]), [(1, 0)]);
        assert!(answers(&[0xff; 40]).is_empty());
        assert!(answers(&[0; 3]).is_empty());
    }
}
