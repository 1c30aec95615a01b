//! weft's nftables tables, programmed over nfnetlink with no `nft`
//! program (the shipped image has none): the pod egress masquerade, `ip
//! weft`, here, and NetworkPolicy, `ip weft_policy`, in [`policy`]. The
//! bytes are built in `batch.rs`; this module sends them and reads the
//! answers.
//!
//! The masquerade table is replaced in one batch (create, delete, create
//! again, then its chain and rule), which the kernel applies atomically:
//! installing is idempotent and nothing else in the ruleset is touched.
//! The batch is built by pure functions ([`masquerade_batch`],
//! [`remove_batch`]) and sent by [`install_masquerade`] /
//! [`remove_masquerade`].
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

mod batch;
pub mod policy;

pub use batch::Batch;
use batch::{NFT_REG_1, answers, be32, expr, value};

/// weft's masquerade table (family `ip`) and its one chain.
pub const TABLE: &str = "weft";
pub const CHAIN: &str = "postrouting";

const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NF_INET_POST_ROUTING: u32 = 4;
/// `priority srcnat`.
const NF_IP_PRI_NAT_SRC: i32 = 100;
/// Offsets of the source and destination addresses in the IPv4 header.
const IPV4_SADDR: u32 = 12;
const IPV4_DADDR: u32 = 16;

/// Replaces table `ip weft` with one masquerading `range`'s traffic to
/// addresses outside `range`.
pub fn masquerade_batch(range: Ipv4Net) -> Batch {
    let range = range.trunc();
    let mut b = Batch::new(TABLE);
    b.drop_table();
    b.create_table();
    b.chain(
        CHAIN,
        Some(("nat", NF_INET_POST_ROUTING, NF_IP_PRI_NAT_SRC)),
        "add chain postrouting (type nat hook postrouting)",
    );
    b.rule(CHAIN, "add the masquerade rule", |buf| {
        match_prefix(buf, IPV4_SADDR, range, NFT_CMP_EQ);
        match_prefix(buf, IPV4_DADDR, range, NFT_CMP_NEQ);
        expr(buf, "masq", |_| {});
    });
    b.end()
}

/// Deletes table `ip weft` if it exists.
pub fn remove_batch() -> Batch {
    let mut b = Batch::new(TABLE);
    b.drop_table();
    b.end()
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

/// Installs (or replaces, in one transaction) weft's NetworkPolicy table
/// for `rules` in the calling thread's network namespace (see [`policy`]).
pub fn install_policy(rules: &weft_policy::RuleSet) -> Result<(), DataplaneError> {
    send(&policy::policy_batch(rules))
}

/// Deletes weft's NetworkPolicy table, if any, from the calling thread's
/// network namespace: every packet passes again.
pub fn remove_policy() -> Result<(), DataplaneError> {
    send(&policy::remove_batch())
}

/// Sends `batch` and waits for the kernel's answer to each message: the
/// kernel handles the batch within `send` and answers every message
/// flagged with NLM_F_ACK, whether it succeeded or not.
fn send(batch: &Batch) -> Result<(), DataplaneError> {
    let table = batch.table;
    let fail = |step: &'static str, e: io::Error| DataplaneError::Nftables {
        table,
        step,
        reason: explain(e),
    };
    let open = "open an nfnetlink socket";
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|e| fail(open, e))?;
    socket.bind_auto().map_err(|e| fail(open, e))?;
    set_timeout(&socket).map_err(|e| fail(open, e))?;
    fit_buffers(&socket, batch).map_err(|e| fail(open, e))?;
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

/// A guard against a kernel that never answers (the answers are queued
/// before `send` returns, so this never delays a working one).
fn set_timeout(socket: &Socket) -> io::Result<()> {
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    setsockopt(socket, libc::SO_RCVTIMEO, &timeout)
}

/// A batch is one datagram: the send buffer must hold it whole, and the
/// receive buffer every message's answer (as nft does, forced past the
/// system limits, which CAP_NET_ADMIN allows).
fn fit_buffers(socket: &Socket, batch: &Batch) -> io::Result<()> {
    const DEFAULT: usize = 208 * 1024;
    // An ACK costs the receiver a small skb each.
    let answers = batch.steps.len() * 1024;
    let send = batch.bytes.len() + 4096;
    if send > DEFAULT {
        setsockopt(socket, libc::SO_SNDBUFFORCE, &(send as libc::c_int))?;
    }
    if answers > DEFAULT {
        setsockopt(socket, libc::SO_RCVBUFFORCE, &(answers as libc::c_int))?;
    }
    Ok(())
}

fn setsockopt<T>(socket: &Socket, option: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: a valid fd and a value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
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
            "; the kernel lacks an nftables feature (CONFIG_NF_TABLES, nft_chain_nat, nft_masq, nft_ct, nft_set_pipapo)"
        }
        Some(libc::EAGAIN) => "; the kernel did not answer within 5 s",
        Some(libc::EEXIST) => "; set elements overlap (rules not shaped by weft_policy::compile)",
        _ => "",
    };
    format!("{e}{hint}")
}

#[cfg(test)]
mod tests {
    use super::batch::{NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, hex, messages};
    use super::*;

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
