//! nfnetlink batches for nf_tables, as bytes: the framing, the attribute
//! encoding and the expressions weft's tables use. Pure: sending is
//! `super::send`'s.

// include/uapi/linux/netlink.h
pub(super) const NLMSG_ERROR: u16 = 2;
pub(super) const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_ACK: u16 = 0x4;
pub(super) const NLM_F_CREATE: u16 = 0x400;
pub(super) const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
// include/uapi/linux/netfilter/nfnetlink.h
pub(super) const NFNL_MSG_BATCH_BEGIN: u16 = 16;
pub(super) const NFNL_MSG_BATCH_END: u16 = 17;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_IPV4: u8 = 2;
// include/uapi/linux/netfilter/nf_tables.h
pub(super) const NFT_MSG_NEWTABLE: u16 = 0;
pub(super) const NFT_MSG_DELTABLE: u16 = 2;
pub(super) const NFT_MSG_NEWCHAIN: u16 = 3;
pub(super) const NFT_MSG_NEWRULE: u16 = 6;
pub(super) const NFT_MSG_NEWSET: u16 = 9;
pub(super) const NFT_MSG_NEWSETELEM: u16 = 12;
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
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
pub(super) const NFT_REG_VERDICT: u32 = 0;
pub(super) const NFT_REG_1: u32 = 1;
pub(super) const NF_ACCEPT: u32 = 1;
pub(super) const NF_DROP: u32 = 0;
/// NFT_JUMP, -3 as the kernel's u32.
pub(super) const NFT_JUMP: u32 = (-3i32) as u32;

/// An nfnetlink batch ready to send, and what each of its messages does
/// (by sequence number) so a refusal can be explained.
#[derive(Debug, Clone)]
pub struct Batch {
    pub bytes: Vec<u8>,
    /// The table every message is about (for errors).
    pub(super) table: &'static str,
    pub(super) steps: Vec<(u32, &'static str)>,
}

impl Batch {
    pub(super) fn new(table: &'static str) -> Batch {
        let mut b = Batch {
            bytes: Vec::new(),
            table,
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
    pub(super) fn message(
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

    pub(super) fn end(mut self) -> Batch {
        self.control(NFNL_MSG_BATCH_END);
        self
    }

    /// Creating the table when absent, then deleting it, makes the delete
    /// succeed whether or not the table existed.
    pub(super) fn drop_table(&mut self) {
        self.create_table();
        let table = self.table;
        self.message(NFT_MSG_DELTABLE, 0, "delete the table", |b| {
            string(b, NFTA_TABLE_NAME, table)
        });
    }

    pub(super) fn create_table(&mut self) {
        let table = self.table;
        self.message(NFT_MSG_NEWTABLE, 0, "create the table", |b| {
            string(b, NFTA_TABLE_NAME, table);
            be32(b, NFTA_TABLE_FLAGS, 0);
        });
    }

    /// A chain; `hook` (type, hook number, priority) makes it a base chain
    /// with policy accept.
    pub(super) fn chain(&mut self, name: &str, hook: Option<(&str, u32, i32)>, step: &'static str) {
        let table = self.table;
        self.message(NFT_MSG_NEWCHAIN, NLM_F_CREATE, step, |buf| {
            string(buf, NFTA_CHAIN_TABLE, table);
            string(buf, NFTA_CHAIN_NAME, name);
            if let Some((kind, hooknum, priority)) = hook {
                string(buf, NFTA_CHAIN_TYPE, kind);
                be32(buf, NFTA_CHAIN_POLICY, NF_ACCEPT);
                nested(buf, NFTA_CHAIN_HOOK, |buf| {
                    be32(buf, NFTA_HOOK_HOOKNUM, hooknum);
                    be32(buf, NFTA_HOOK_PRIORITY, priority as u32);
                });
            }
        });
    }

    /// A rule appended to `chain`, its expressions written by `exprs`.
    pub(super) fn rule(
        &mut self,
        chain: &str,
        step: &'static str,
        exprs: impl FnOnce(&mut Vec<u8>),
    ) {
        let table = self.table;
        self.message(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, step, |buf| {
            string(buf, NFTA_RULE_TABLE, table);
            string(buf, NFTA_RULE_CHAIN, chain);
            nested(buf, NFTA_RULE_EXPRESSIONS, exprs);
        });
    }

    pub(super) fn step(&self, seq: u32) -> Option<&'static str> {
        self.steps.iter().find(|(s, _)| *s == seq).map(|(_, w)| *w)
    }
}

pub(super) fn expr(buf: &mut Vec<u8>, name: &str, data: impl FnOnce(&mut Vec<u8>)) {
    nested(buf, NFTA_LIST_ELEM, |buf| {
        string(buf, NFTA_EXPR_NAME, name);
        nested(buf, NFTA_EXPR_DATA, data);
    });
}

/// An NFTA_DATA_VALUE nested in attribute `ty`.
pub(super) fn value(buf: &mut Vec<u8>, ty: u16, bytes: &[u8]) {
    nested(buf, ty, |buf| attr(buf, NFTA_DATA_VALUE, bytes));
}

/// `immediate reg 0 <verdict>`: accept, drop, or jump to `chain`.
pub(super) fn verdict(buf: &mut Vec<u8>, code: u32, chain: Option<&str>) {
    const DREG: u16 = 1;
    const DATA: u16 = 2;
    expr(buf, "immediate", |b| {
        be32(b, DREG, NFT_REG_VERDICT);
        nested(b, DATA, |b| {
            nested(b, NFTA_DATA_VERDICT, |b| {
                be32(b, NFTA_VERDICT_CODE, code);
                if let Some(chain) = chain {
                    string(b, NFTA_VERDICT_CHAIN, chain);
                }
            })
        });
    });
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

pub(super) fn attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    buf.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    pad(buf);
}

/// A nested attribute. Its length is 16 bits: callers keep what they nest
/// under 64 KiB (set elements are split over messages for that).
pub(super) fn nested(buf: &mut Vec<u8>, ty: u16, inner: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 2]);
    buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    inner(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

pub(super) fn string(buf: &mut Vec<u8>, ty: u16, s: &str) {
    let mut data = s.as_bytes().to_vec();
    data.push(0);
    attr(buf, ty, &data);
}

pub(super) fn be32(buf: &mut Vec<u8>, ty: u16, v: u32) {
    attr(buf, ty, &v.to_be_bytes());
}

fn pad(buf: &mut Vec<u8>) {
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// The kernel's answers in `buf`: (sequence number, errno) of each
/// NLMSG_ERROR message, errno 0 being an ACK. Stops at anything malformed.
pub(super) fn answers(mut buf: &[u8]) -> Vec<(u32, i32)> {
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

/// (type, flags, seq, body after the netlink header) of each message of a
/// batch; panics on a malformed one (tests only).
#[cfg(test)]
pub(super) fn messages(mut buf: &[u8]) -> Vec<(u16, u16, u32, Vec<u8>)> {
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

/// Bytes from hex digits, whitespace ignored (captured batches; tests only).
#[cfg(test)]
pub(super) fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
