//! NetworkPolicy in the kernel: a compiled [`RuleSet`] rendered as weft's
//! second nftables table, `ip weft_policy`, replaced in one batch (create,
//! delete, create again, then sets, elements, chains and rules): the
//! kernel applies a batch as one transaction, so there is never a moment
//! without rules, a refused batch leaves the previous table in force, and
//! installing the same rules twice changes nothing. Pure: the batch is
//! built here and sent by `super::install_policy`. The sets are declared
//! byte for byte as nft 1.0.6 declares them (so `nft list` reads them
//! back); the rules are nft's too, without the no-op `byteorder` nft puts
//! after `meta l4proto`, and the elements come before the chains.
//!
//! ```text
//! table ip weft_policy {
//!     set ingress_isolated { type ipv4_addr }
//!     set ingress_ports { type ipv4_addr . ipv4_addr . inet_proto . inet_service; flags interval }
//!     set ingress_any { type ipv4_addr . ipv4_addr; flags interval }
//!     set egress_isolated, egress_ports, egress_any: the same
//!     chain ingress {
//!         ip daddr . ip saddr . meta l4proto . th dport @ingress_ports accept
//!         ip daddr . ip saddr @ingress_any accept
//!         counter drop
//!     }
//!     chain egress {
//!         ip saddr . ip daddr . meta l4proto . th dport @egress_ports return
//!         ip saddr . ip daddr @egress_any return
//!         counter drop
//!     }
//!     chain forward {
//!         type filter hook forward priority filter; policy accept;
//!         ct state established,related accept
//!         ip saddr @egress_isolated jump egress
//!         ip daddr @ingress_isolated jump ingress
//!     }
//!     chain input {
//!         type filter hook input priority filter; policy accept;
//!         ct state established,related accept
//!         ip saddr @egress_isolated jump egress
//!     }
//! }
//! ```
//!
//! - `*_isolated` hold the local pods isolated in that direction; `*_ports`
//!   one element per (pod, peer range, protocol, port range) of a grant
//!   with ports, `*_any` one per (pod, peer range) of a grant without. A
//!   packet costs at most six set lookups however many pods and policies
//!   made the sets (the sets are hash and pipapo lookups).
//! - `forward` sees pod-to-pod traffic on this node (bridged: weft turns
//!   on `net.bridge.bridge-nf-call-iptables`, so br_netfilter passes it)
//!   and routed traffic to and from other nodes; `input` sees a local
//!   pod's traffic to the node itself (its egress only: the node is no
//!   pod). Traffic the node itself sends to its pods (kubelet probes)
//!   passes `output`, which weft does not filter: the specification allows
//!   a pod's own node in.
//! - Replies and related packets (ICMP errors) of any tracked connection
//!   pass first, so a new table never cuts an established connection,
//!   including one the new rules would no longer open. Packets conntrack
//!   calls invalid are judged by the sets like new ones (weft does not
//!   drop them globally: the hooks see the node's other traffic too).
//! - An empty [`RuleSet`] gives the same table with empty sets: every
//!   packet passes. [`remove_batch`] deletes the table.
//! - Each direction's drop rule counts what it drops. The log line and the
//!   per-policy counters of issue 23 hang off these two rules (a verdict
//!   map from the pod to a per-policy-set chain that logs and counts).
//! - The rendering trusts `weft_policy::compile`'s shape (disjoint peer
//!   ranges, merged port ranges): overlapping elements of a hand-made rule
//!   set make the kernel refuse the whole batch, a typed error, the old
//!   table staying in force. Empty ranges (first after last) match nothing
//!   and are left out.

use std::net::Ipv4Addr;

use weft_policy::{AddrRange, Isolation, PortRange, Ports, RuleSet};

use super::batch::{
    Batch, NF_ACCEPT, NF_DROP, NFT_JUMP, NFT_MSG_NEWSET, NFT_MSG_NEWSETELEM, NFT_REG_1,
    NLM_F_CREATE, attr, be32, expr, nested, string, value, verdict,
};

/// weft's NetworkPolicy table (family `ip`).
pub const TABLE: &str = "weft_policy";

const NF_INET_LOCAL_IN: u32 = 1;
const NF_INET_FORWARD: u32 = 2;
/// `priority filter`.
const NF_IP_PRI_FILTER: i32 = 0;
/// NFT_RETURN, -5 as the kernel's u32.
const NFT_RETURN: u32 = (-5i32) as u32;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_META_L4PROTO: u32 = 16;
const NFT_CT_STATE: u32 = 0;
const NF_CT_STATE_ESTABLISHED_BIT: u32 = 1 << 1;
const NF_CT_STATE_RELATED_BIT: u32 = 1 << 2;
const NFT_CMP_NEQ: u32 = 1;
/// The 32-bit registers after NFT_REG_1 (which is NFT_REG32_00..03):
/// concatenated fields go to consecutive ones, 4-byte aligned.
const NFT_REG32_01: u32 = 9;
const NFT_REG32_02: u32 = 10;
const NFT_REG32_03: u32 = 11;
const IPV4_SADDR: u32 = 12;
const IPV4_DADDR: u32 = 16;
const TH_DPORT: u32 = 2;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_CONCAT: u32 = 0x80;
/// Elements per NEWSETELEM message: the list is one nested attribute of
/// at most 64 KiB, and a port element takes 56 bytes.
pub const ELEMENTS_PER_MESSAGE: usize = 1024;

/// One of the table's sets, as nft 1.0.6 declares it.
pub struct SetSpec {
    pub name: &'static str,
    /// NFTA_SET_ID: how rules and elements name it within the batch.
    id: u32,
    /// Each field's length in bytes; each takes a 4-byte aligned slot.
    pub fields: &'static [u32],
    /// nft's type id (concatenations: 6 bits per field's type).
    key_type: u32,
    /// nft's NFTA_SET_USERDATA (key byte order), so `nft list` reads it.
    userdata: &'static [u8],
    add_step: &'static str,
    fill_step: &'static str,
}

impl SetSpec {
    pub fn key_len(&self) -> u32 {
        self.fields.iter().map(|f| f.next_multiple_of(4)).sum()
    }

    fn concat(&self) -> bool {
        self.fields.len() > 1
    }
}

const ADDR: u32 = 7; // ipv4_addr
const PROTO: u32 = 12; // inet_proto
const SERVICE: u32 = 13; // inet_service
const PLAIN_USERDATA: &[u8] = &[0, 4, 2, 0, 0, 0];
const CONCAT_USERDATA: &[u8] = &[0, 4, 0, 0, 0, 0, 3, 8, 0, 4, 13, 0, 0, 0, 1, 0];

macro_rules! set_spec {
    ($name:literal, $id:expr, $fields:expr, $ty:expr, $ud:expr) => {
        SetSpec {
            name: $name,
            id: $id,
            fields: $fields,
            key_type: $ty,
            userdata: $ud,
            add_step: concat!("add set ", $name),
            fill_step: concat!("add the elements of set ", $name),
        }
    };
}

const PORTS_TYPE: u32 = (((ADDR << 6) | ADDR) << 6 | PROTO) << 6 | SERVICE;
const ANY_TYPE: u32 = (ADDR << 6) | ADDR;

/// The sets of one direction.
pub struct Direction {
    pub isolated: SetSpec,
    pub ports: SetSpec,
    pub any: SetSpec,
    /// The chain judging the isolated pods' packets.
    pub chain: &'static str,
    /// Verdict when a set allows the packet: ingress accepts, egress
    /// returns so the destination's ingress is judged next.
    allowed: u32,
    /// The pod's address offset in the IPv4 header, and its peer's.
    pod: u32,
    peer: u32,
}

pub const INGRESS: Direction = Direction {
    isolated: set_spec!("ingress_isolated", 1, &[4], ADDR, PLAIN_USERDATA),
    ports: set_spec!(
        "ingress_ports",
        2,
        &[4, 4, 1, 2],
        PORTS_TYPE,
        CONCAT_USERDATA
    ),
    any: set_spec!("ingress_any", 3, &[4, 4], ANY_TYPE, CONCAT_USERDATA),
    chain: "ingress",
    allowed: NF_ACCEPT,
    pod: IPV4_DADDR,
    peer: IPV4_SADDR,
};

pub const EGRESS: Direction = Direction {
    isolated: set_spec!("egress_isolated", 4, &[4], ADDR, PLAIN_USERDATA),
    ports: set_spec!(
        "egress_ports",
        5,
        &[4, 4, 1, 2],
        PORTS_TYPE,
        CONCAT_USERDATA
    ),
    any: set_spec!("egress_any", 6, &[4, 4], ANY_TYPE, CONCAT_USERDATA),
    chain: "egress",
    allowed: NFT_RETURN,
    pod: IPV4_SADDR,
    peer: IPV4_DADDR,
};

/// One set element: its key, and the end of its interval for interval
/// sets (NFTA_SET_ELEM_KEY_END).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    pub key: Vec<u8>,
    pub key_end: Option<Vec<u8>>,
}

/// The elements of one direction's three sets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Elements {
    pub isolated: Vec<Element>,
    pub ports: Vec<Element>,
    pub any: Vec<Element>,
}

/// What `rules` puts in each direction's sets: (ingress, egress).
pub fn elements(rules: &RuleSet) -> (Elements, Elements) {
    let mut ingress = Elements::default();
    let mut egress = Elements::default();
    for (&pod, pod_rules) in &rules.pods {
        if let Some(isolation) = &pod_rules.ingress {
            ingress.add(pod, isolation);
        }
        if let Some(isolation) = &pod_rules.egress {
            egress.add(pod, isolation);
        }
    }
    (ingress, egress)
}

impl Elements {
    fn add(&mut self, pod: Ipv4Addr, isolation: &Isolation) {
        self.isolated.push(Element {
            key: pod.octets().to_vec(),
            key_end: None,
        });
        for grant in &isolation.grants {
            let peers = grant.peers;
            if peers.first > peers.last {
                continue;
            }
            match &grant.ports {
                Ports::Any => self.any.push(any_element(pod, peers)),
                Ports::Only(ranges) => self.ports.extend(
                    ranges
                        .iter()
                        .filter(|r| r.first <= r.last)
                        .map(|r| port_element(pod, peers, r)),
                ),
            }
        }
    }
}

fn any_element(pod: Ipv4Addr, peers: AddrRange) -> Element {
    let key = |peer: Ipv4Addr| [pod.octets(), peer.octets()].concat();
    Element {
        key: key(peers.first),
        key_end: Some(key(peers.last)),
    }
}

/// pod . peer . protocol . port, each field in a 4-byte slot (zero padded
/// after the value, as the registers hold them).
fn port_element(pod: Ipv4Addr, peers: AddrRange, ports: &PortRange) -> Element {
    let key = |peer: Ipv4Addr, port: u16| {
        let [hi, lo] = port.to_be_bytes();
        let mut key = [pod.octets(), peer.octets()].concat();
        key.extend_from_slice(&[ports.protocol.number(), 0, 0, 0, hi, lo, 0, 0]);
        key
    };
    Element {
        key: key(peers.first, ports.first),
        key_end: Some(key(peers.last, ports.last)),
    }
}

/// Replaces table `ip weft_policy` with one enforcing `rules`.
pub fn policy_batch(rules: &RuleSet) -> Batch {
    let (ingress, egress) = elements(rules);
    let mut b = Batch::new(TABLE);
    b.drop_table();
    b.create_table();
    for (direction, elements) in [(&INGRESS, &ingress), (&EGRESS, &egress)] {
        for (set, elements) in [
            (&direction.isolated, &elements.isolated),
            (&direction.ports, &elements.ports),
            (&direction.any, &elements.any),
        ] {
            add_set(&mut b, set);
            fill_set(&mut b, set, elements);
        }
    }
    for direction in [&INGRESS, &EGRESS] {
        judge(&mut b, direction);
    }
    let forward = Some(("filter", NF_INET_FORWARD, NF_IP_PRI_FILTER));
    b.chain(
        "forward",
        forward,
        "add chain forward (type filter hook forward)",
    );
    hook_rules(&mut b, "forward", &[&EGRESS, &INGRESS]);
    let input = Some(("filter", NF_INET_LOCAL_IN, NF_IP_PRI_FILTER));
    b.chain("input", input, "add chain input (type filter hook input)");
    hook_rules(&mut b, "input", &[&EGRESS]);
    b.end()
}

/// Deletes table `ip weft_policy` if it exists.
pub fn remove_batch() -> Batch {
    let mut b = Batch::new(TABLE);
    b.drop_table();
    b.end()
}

fn add_set(b: &mut Batch, set: &SetSpec) {
    const TABLE_ATTR: u16 = 1;
    const NAME: u16 = 2;
    const FLAGS: u16 = 3;
    const KEY_TYPE: u16 = 4;
    const KEY_LEN: u16 = 5;
    const DESC: u16 = 9;
    const ID: u16 = 10;
    const USERDATA: u16 = 13;
    const DESC_CONCAT: u16 = 2;
    const LIST_ELEM: u16 = 1;
    const FIELD_LEN: u16 = 1;
    b.message(NFT_MSG_NEWSET, NLM_F_CREATE, set.add_step, |buf| {
        string(buf, TABLE_ATTR, TABLE);
        string(buf, NAME, set.name);
        let flags = if set.concat() {
            NFT_SET_INTERVAL | NFT_SET_CONCAT
        } else {
            0
        };
        be32(buf, FLAGS, flags);
        be32(buf, KEY_TYPE, set.key_type);
        be32(buf, KEY_LEN, set.key_len());
        be32(buf, ID, set.id);
        if set.concat() {
            nested(buf, DESC, |buf| {
                nested(buf, DESC_CONCAT, |buf| {
                    for &len in set.fields {
                        nested(buf, LIST_ELEM, |buf| be32(buf, FIELD_LEN, len));
                    }
                })
            });
        }
        attr(buf, USERDATA, set.userdata);
    });
}

/// The elements in messages of at most [`ELEMENTS_PER_MESSAGE`].
fn fill_set(b: &mut Batch, set: &SetSpec, elements: &[Element]) {
    const TABLE_ATTR: u16 = 1;
    const SET: u16 = 2;
    const ELEMENTS: u16 = 3;
    const SET_ID: u16 = 4;
    const LIST_ELEM: u16 = 1;
    const KEY: u16 = 1;
    const KEY_END: u16 = 10;
    for chunk in elements.chunks(ELEMENTS_PER_MESSAGE) {
        b.message(NFT_MSG_NEWSETELEM, NLM_F_CREATE, set.fill_step, |buf| {
            string(buf, TABLE_ATTR, TABLE);
            string(buf, SET, set.name);
            be32(buf, SET_ID, set.id);
            nested(buf, ELEMENTS, |buf| {
                for element in chunk {
                    nested(buf, LIST_ELEM, |buf| {
                        value(buf, KEY, &element.key);
                        if let Some(end) = &element.key_end {
                            value(buf, KEY_END, end);
                        }
                    });
                }
            });
        });
    }
}

/// The chain of a direction: allowed by either set, else counted and
/// dropped.
fn judge(b: &mut Batch, d: &Direction) {
    b.chain(d.chain, None, "add a policy chain");
    b.rule(d.chain, "add the rule allowing granted ports", |buf| {
        load_addr(buf, NFT_REG_1, d.pod);
        load_addr(buf, NFT_REG32_01, d.peer);
        meta(buf, NFT_REG32_02, NFT_META_L4PROTO);
        payload(buf, NFT_REG32_03, NFT_PAYLOAD_TRANSPORT_HEADER, TH_DPORT, 2);
        lookup(buf, &d.ports);
        verdict(buf, d.allowed, None);
    });
    b.rule(d.chain, "add the rule allowing granted peers", |buf| {
        load_addr(buf, NFT_REG_1, d.pod);
        load_addr(buf, NFT_REG32_01, d.peer);
        lookup(buf, &d.any);
        verdict(buf, d.allowed, None);
    });
    b.rule(d.chain, "add the counted drop", |buf| {
        expr(buf, "counter", |_| {});
        verdict(buf, NF_DROP, None);
    });
}

/// A base chain's rules: tracked connections pass, then each direction's
/// isolated pods go to their chain.
fn hook_rules(b: &mut Batch, chain: &str, directions: &[&Direction]) {
    b.rule(chain, "add the established/related rule", |buf| {
        ct_established_or_related(buf);
        verdict(buf, NF_ACCEPT, None);
    });
    for d in directions {
        b.rule(chain, "add the jump of isolated pods", |buf| {
            load_addr(buf, NFT_REG_1, d.pod);
            lookup(buf, &d.isolated);
            verdict(buf, NFT_JUMP, Some(d.chain));
        });
    }
}

fn load_addr(buf: &mut Vec<u8>, dreg: u32, offset: u32) {
    payload(buf, dreg, NFT_PAYLOAD_NETWORK_HEADER, offset, 4);
}

fn payload(buf: &mut Vec<u8>, dreg: u32, base: u32, offset: u32, len: u32) {
    expr(buf, "payload", |b| {
        be32(b, 1, dreg);
        be32(b, 2, base);
        be32(b, 3, offset);
        be32(b, 4, len);
    });
}

/// `meta KEY => reg`: l4proto is stored as one byte, the rest of the
/// register zeroed (nft adds a no-op byteorder here, left out).
fn meta(buf: &mut Vec<u8>, dreg: u32, key: u32) {
    expr(buf, "meta", |b| {
        be32(b, 2, key);
        be32(b, 1, dreg);
    });
}

fn lookup(buf: &mut Vec<u8>, set: &SetSpec) {
    expr(buf, "lookup", |b| {
        be32(b, 2, NFT_REG_1); // sreg
        string(b, 1, set.name);
        be32(b, 4, set.id);
    });
}

/// `ct state established,related`: the state bits are a host-order u32.
fn ct_established_or_related(buf: &mut Vec<u8>) {
    expr(buf, "ct", |b| {
        be32(b, 2, NFT_CT_STATE); // key
        be32(b, 1, NFT_REG_1); // dreg
    });
    expr(buf, "bitwise", |b| {
        be32(b, 1, NFT_REG_1); // sreg
        be32(b, 2, NFT_REG_1); // dreg
        be32(b, 3, 4); // len
        let mask = NF_CT_STATE_ESTABLISHED_BIT | NF_CT_STATE_RELATED_BIT;
        value(b, 4, &mask.to_ne_bytes());
        value(b, 5, &[0; 4]);
    });
    expr(buf, "cmp", |b| {
        be32(b, 1, NFT_REG_1); // sreg
        be32(b, 2, NFT_CMP_NEQ);
        value(b, 3, &[0; 4]);
    });
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use weft_policy::{Grant, Packet, PodRules, PolicyRef, Protocol};

    use super::super::batch::{NLM_F_ACK, NLM_F_REQUEST, hex, messages};
    use super::*;

    const NEWSET: u16 = 0xa00 | NFT_MSG_NEWSET;
    const NEWSETELEM: u16 = 0xa00 | NFT_MSG_NEWSETELEM;

    fn addr(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }

    fn isolation(grants: Vec<Grant>) -> Option<Isolation> {
        Some(Isolation {
            policies: vec![PolicyRef {
                namespace: "ns".into(),
                name: "p".into(),
            }],
            grants,
        })
    }

    fn pod(ingress: Option<Isolation>, egress: Option<Isolation>) -> PodRules {
        PodRules {
            namespace: "ns".into(),
            name: "pod".into(),
            ingress,
            egress,
        }
    }

    fn tcp(first: u16, last: u16) -> PortRange {
        PortRange {
            protocol: Protocol::Tcp,
            first,
            last,
        }
    }

    /// .1 takes TCP 80 and 8080-8090 from .0-.127 and anything from
    /// .200; .2 sends nothing anywhere.
    fn small() -> RuleSet {
        let mut rules = RuleSet::default();
        let grants = vec![
            Grant {
                peers: AddrRange {
                    first: addr(0),
                    last: addr(127),
                },
                ports: Ports::Only(vec![tcp(80, 80), tcp(8080, 8090)]),
            },
            Grant {
                peers: AddrRange {
                    first: addr(200),
                    last: addr(200),
                },
                ports: Ports::Any,
            },
        ];
        rules.pods.insert(addr(1), pod(isolation(grants), None));
        rules.pods.insert(addr(2), pod(None, isolation(vec![])));
        rules
    }

    /// (key, key end) of a set element as sent.
    type Sent = (Vec<u8>, Option<Vec<u8>>);

    /// The element lists of NEWSETELEM messages, by set name, read back
    /// from the bytes.
    fn sent_elements(batch: &Batch) -> BTreeMap<String, Vec<Sent>> {
        let mut out: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for (ty, _, _, body) in messages(&batch.bytes) {
            if ty != NEWSETELEM {
                continue;
            }
            let attrs = attributes(&body[4..]);
            let set = attrs.iter().find(|a| a.0 == 2).unwrap();
            let name = String::from_utf8(set.1[..set.1.len() - 1].to_vec()).unwrap();
            let list = attrs.iter().find(|a| a.0 == 3).unwrap();
            for (_, element) in attributes(&list.1) {
                let parts = attributes(&element);
                let data = |ty: u16| {
                    parts
                        .iter()
                        .find(|p| p.0 == ty)
                        .map(|p| attributes(&p.1)[0].1.clone())
                };
                out.entry(name.clone())
                    .or_default()
                    .push((data(1).unwrap(), data(10)));
            }
        }
        out
    }

    /// (type without flags, payload) of each attribute in `buf`.
    fn attributes(mut buf: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        while buf.len() >= 4 {
            let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
            let ty = u16::from_ne_bytes([buf[2], buf[3]]) & 0x7fff;
            assert!(len >= 4 && len <= buf.len(), "bad attribute length {len}");
            out.push((ty, buf[4..len].to_vec()));
            buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        }
        out
    }

    #[test]
    fn the_batch_declares_six_sets_and_fills_them_from_the_rules() {
        let b = policy_batch(&small());
        let m = messages(&b.bytes);
        assert_eq!(m.first().unwrap().0, 16);
        assert_eq!(m.last().unwrap().0, 17);
        for (_, flags, seq, _) in &m[1..m.len() - 1] {
            assert_eq!(
                flags & (NLM_F_REQUEST | NLM_F_ACK),
                NLM_F_REQUEST | NLM_F_ACK
            );
            assert!(b.step(*seq).is_some());
        }
        // Replace the table: create, delete, create.
        let types: Vec<u16> = m.iter().map(|m| m.0).collect();
        assert_eq!(types[1..4], [0xa00, 0xa02, 0xa00]);
        assert_eq!(types.iter().filter(|&&t| t == NEWSET).count(), 6);
        // 2 chains + 2 base chains; 3 + 3 + 3 + 2 rules.
        assert_eq!(types.iter().filter(|&&t| t == 0xa03).count(), 4);
        assert_eq!(types.iter().filter(|&&t| t == 0xa06).count(), 11);

        let sent = sent_elements(&b);
        let names: Vec<&str> = sent.keys().map(String::as_str).collect();
        // Empty sets get no element message.
        assert_eq!(
            names,
            [
                "egress_isolated",
                "ingress_any",
                "ingress_isolated",
                "ingress_ports"
            ]
        );
        assert_eq!(sent["ingress_isolated"], [(vec![10, 0, 0, 1], None)]);
        assert_eq!(sent["egress_isolated"], [(vec![10, 0, 0, 2], None)]);
        let port = |peer: u8, port: u16| {
            let [hi, lo] = port.to_be_bytes();
            vec![10, 0, 0, 1, 10, 0, 0, peer, 6, 0, 0, 0, hi, lo, 0, 0]
        };
        assert_eq!(
            sent["ingress_ports"],
            [
                (port(0, 80), Some(port(127, 80))),
                (port(0, 8080), Some(port(127, 8090)))
            ]
        );
        assert_eq!(
            sent["ingress_any"],
            [(
                vec![10, 0, 0, 1, 10, 0, 0, 200],
                Some(vec![10, 0, 0, 1, 10, 0, 0, 200])
            )]
        );
    }

    #[test]
    fn the_sets_are_declared_as_nft_declares_them() {
        // Captured from nft 1.0.6 (see testdata/README).
        let nft = hex(include_str!("testdata/nft-policy-sets.hex"));
        let sets = |bytes: &[u8]| -> Vec<Vec<u8>> {
            messages(bytes)
                .into_iter()
                .filter(|m| m.0 == NEWSET)
                .map(|m| m.3)
                .collect()
        };
        let ours = sets(&policy_batch(&RuleSet::default()).bytes);
        assert_eq!(ours.len(), 6);
        assert_eq!(ours, sets(&nft));
    }

    #[test]
    fn key_lengths_follow_the_fields_in_4_byte_slots() {
        for d in [&INGRESS, &EGRESS] {
            assert_eq!(d.isolated.key_len(), 4);
            assert_eq!(d.ports.key_len(), 16);
            assert_eq!(d.any.key_len(), 8);
        }
        let (ingress, _) = elements(&small());
        assert!(ingress.ports.iter().all(|e| e.key.len() == 16));
        assert!(ingress.any.iter().all(|e| e.key.len() == 8));
    }

    #[test]
    fn many_elements_are_split_over_messages() {
        let mut rules = RuleSet::default();
        let ports: Vec<PortRange> = (0..2500).map(|p| tcp(2 * p, 2 * p)).collect();
        let grant = Grant {
            peers: AddrRange {
                first: addr(0),
                last: addr(9),
            },
            ports: Ports::Only(ports),
        };
        rules
            .pods
            .insert(addr(1), pod(isolation(vec![grant]), None));
        let b = policy_batch(&rules);
        let sizes: Vec<usize> = messages(&b.bytes)
            .iter()
            .filter(|m| m.0 == NEWSETELEM)
            .map(|m| m.3.len())
            .collect();
        // One for the isolated pod, three for 2,500 port elements.
        assert_eq!(sizes.len(), 4);
        assert!(sizes.iter().all(|&s| s < 65_536), "{sizes:?}");
        assert_eq!(sent_elements(&b)["ingress_ports"].len(), 2500);
    }

    #[test]
    fn empty_ranges_are_left_out() {
        let mut rules = RuleSet::default();
        let grants = vec![
            Grant {
                peers: AddrRange {
                    first: addr(9),
                    last: addr(1),
                },
                ports: Ports::Any,
            },
            Grant {
                peers: AddrRange {
                    first: addr(10),
                    last: addr(10),
                },
                ports: Ports::Only(vec![tcp(90, 80)]),
            },
        ];
        rules.pods.insert(addr(1), pod(isolation(grants), None));
        let (ingress, _) = elements(&rules);
        assert_eq!(ingress.isolated.len(), 1);
        assert!(ingress.ports.is_empty() && ingress.any.is_empty());
    }

    /// Whether `elements` hold a key `key` falls in, field by field, as
    /// the kernel's interval lookup decides (bytes compared big-endian).
    fn lookup_hit(elements: &[Element], fields: &[u32], key: &[u8]) -> bool {
        elements.iter().any(|e| {
            let end = e.key_end.as_ref().unwrap_or(&e.key);
            let mut at = 0;
            fields.iter().all(|&len| {
                let slot = at..at + len as usize;
                at += len.next_multiple_of(4) as usize;
                e.key[slot.clone()] <= key[slot.clone()] && key[slot.clone()] <= end[slot]
            })
        })
    }

    /// The table's verdict on `p`, from the elements alone: the sets'
    /// lookups as the chains make them.
    fn table_allows(rules: &RuleSet, p: &Packet) -> bool {
        let (ingress, egress) = elements(rules);
        let side = |d: &Direction, e: &Elements, pod: Ipv4Addr, peer: Ipv4Addr| {
            if !lookup_hit(&e.isolated, d.isolated.fields, &pod.octets()) {
                return true;
            }
            let pair = [pod.octets(), peer.octets()].concat();
            let [hi, lo] = p.dst_port.to_be_bytes();
            let mut full = pair.clone();
            full.extend_from_slice(&[p.protocol, 0, 0, 0, hi, lo, 0, 0]);
            lookup_hit(&e.ports, d.ports.fields, &full) || lookup_hit(&e.any, d.any.fields, &pair)
        };
        side(&EGRESS, &egress, p.src, p.dst) && side(&INGRESS, &ingress, p.dst, p.src)
    }

    fn any_range() -> impl Strategy<Value = AddrRange> {
        (0u8..24, 0u8..24).prop_map(|(a, b)| AddrRange {
            first: addr(a),
            last: addr(b),
        })
    }

    fn any_ports() -> impl Strategy<Value = Ports> {
        let range = (0usize..3, 0u16..12, 0u16..12).prop_map(|(p, first, last)| PortRange {
            protocol: [Protocol::Tcp, Protocol::Udp, Protocol::Sctp][p],
            first,
            last,
        });
        prop_oneof![
            Just(Ports::Any),
            proptest::collection::vec(range, 0..4).prop_map(Ports::Only),
        ]
    }

    fn any_isolation() -> impl Strategy<Value = Option<Isolation>> {
        let grant = (any_range(), any_ports()).prop_map(|(peers, ports)| Grant { peers, ports });
        proptest::option::of(
            proptest::collection::vec(grant, 0..4).prop_map(|grants| isolation(grants).unwrap()),
        )
    }

    fn any_rules() -> impl Strategy<Value = RuleSet> {
        proptest::collection::btree_map(
            (0u8..16).prop_map(addr),
            (any_isolation(), any_isolation()).prop_map(|(i, e)| pod(i, e)),
            0..6,
        )
        .prop_map(|pods| RuleSet { pods })
    }

    /// What `compile` guarantees: ranges sorted, disjoint and not empty,
    /// port ranges merged, no grant without ports.
    fn compiled_shape(mut rules: RuleSet) -> RuleSet {
        for pod in rules.pods.values_mut() {
            for isolation in [&mut pod.ingress, &mut pod.egress].into_iter().flatten() {
                let mut grants: Vec<Grant> = Vec::new();
                let mut raw = std::mem::take(&mut isolation.grants);
                raw.retain(|g| g.peers.first <= g.peers.last);
                raw.sort_by_key(|g| g.peers);
                for mut g in raw {
                    if let Ports::Only(r) = &g.ports {
                        let valid = r.iter().filter(|r| r.first <= r.last).copied().collect();
                        g.ports = Ports::from_ranges(valid);
                    }
                    let clear = grants.last().is_none_or(|l| l.peers.last < g.peers.first);
                    if clear && !g.ports.is_empty() {
                        grants.push(g);
                    }
                }
                isolation.grants = grants;
            }
        }
        rules
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Any rule set renders, the same bytes every time, into messages
        /// that parse and keys of their set's length.
        #[test]
        fn rendering_never_panics_and_is_deterministic(rules in any_rules()) {
            let b = policy_batch(&rules);
            prop_assert_eq!(&b.bytes, &policy_batch(&rules).bytes);
            for (name, elements) in sent_elements(&b) {
                let len = if name.ends_with("ports") { 16 } else if name.ends_with("any") { 8 } else { 4 };
                for (key, end) in elements {
                    prop_assert_eq!(key.len(), len);
                    prop_assert_eq!(end.is_some(), len > 4);
                }
            }
        }

        /// The sets decide every packet as the compiled rules do.
        #[test]
        fn the_sets_decide_as_the_rule_set(
            rules in any_rules().prop_map(compiled_shape),
            packets in proptest::collection::vec(
                (0u8..24, 0u8..24, prop_oneof![Just(1u8), Just(6), Just(17), Just(132)], 0u16..12),
                1..24,
            ),
        ) {
            for (src, dst, protocol, dst_port) in packets {
                let p = Packet { src: addr(src), dst: addr(dst), protocol, dst_port, from_node: false };
                prop_assert_eq!(table_allows(&rules, &p), rules.allows(&p), "{:?}", p);
            }
        }
    }
}
