//! The wire format: every datagram weft sends between agents.
//!
//! ```text
//! plain:  "WEFT" | version u8 | kind 0 | sender u64 BE | body
//! sealed: "WEFT" | version u8 | kind 1 | sender u64 BE | epoch u64 BE | counter u64 BE | sealed body + tag
//! ```
//!
//! The body is one [`Message`] in postcard (serde) encoding. Decoding takes
//! untrusted bytes: it never panics, bounds every length and count, refuses
//! trailing bytes, and says what was wrong with a typed [`WireError`]. A
//! sealed datagram authenticates its header as associated data, so the
//! sender name and nonce cannot be altered either.

use crate::config::MAX_CONN_LIMIT;
use crate::ipam::{IpamInfo, RingUpdate};
use crate::peer::{MAX_NICKNAME, PeerName};
use crate::seal::{OpenError, SealNonce, Sealer, TAG_LEN};
use crate::topology::PeerEntry;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

pub const MAGIC: [u8; 4] = *b"WEFT";
/// Bumped on any incompatible change; peers of another version are refused.
pub const VERSION: u8 = 3;
/// Largest datagram weft sends or accepts: fits any underlay MTU of 1,500
/// with room for IP, UDP and overlay headers, so nothing is fragmented.
pub const MAX_DATAGRAM: usize = 1400;

const KIND_PLAIN: u8 = 0;
const KIND_SEALED: u8 = 1;
/// A pod packet carried by the sleeve (userspace) dataplane: the header,
/// then the IP packet (sealed: epoch, counter, then the sealed packet).
/// The agent takes these off the socket before the router sees them.
pub const KIND_SLEEVE: u8 = 2;
pub const KIND_SLEEVE_SEALED: u8 = 3;
const HEADER_LEN: usize = 4 + 2 + 8;

/// A sleeve frame, as received.
#[derive(Debug, PartialEq, Eq)]
pub enum SleeveFrame<'a> {
    Plain {
        sender: PeerName,
        packet: &'a [u8],
    },
    Sealed {
        nonce: SealNonce,
        /// What the seal authenticates besides the packet.
        header: &'a [u8],
        sealed: &'a [u8],
    },
}

impl SleeveFrame<'_> {
    /// The peer the frame names as its sender (authentic only once a
    /// sealed frame is opened).
    pub fn sender(&self) -> PeerName {
        match self {
            SleeveFrame::Plain { sender, .. } => *sender,
            SleeveFrame::Sealed { nonce, .. } => PeerName(nonce.sender),
        }
    }
}

/// A plain sleeve frame from `sender` carrying `packet`.
pub fn sleeve_frame(sender: PeerName, packet: &[u8]) -> Vec<u8> {
    let mut out = header(sender, KIND_SLEEVE, packet.len());
    out.extend_from_slice(packet);
    out
}

/// A sealed sleeve frame: only holders of the secret read or forge it.
pub fn sealed_sleeve_frame(sealer: &Sealer, nonce: SealNonce, packet: &[u8]) -> Vec<u8> {
    let mut out = header(
        PeerName(nonce.sender),
        KIND_SLEEVE_SEALED,
        16 + packet.len() + crate::seal::TAG_LEN,
    );
    out.extend_from_slice(&nonce.epoch.to_be_bytes());
    out.extend_from_slice(&nonce.counter.to_be_bytes());
    let sealed = sealer.seal(&out, nonce, packet);
    out.extend_from_slice(&sealed);
    out
}

/// A sleeve frame's parts; `None` for anything else.
pub fn parse_sleeve(bytes: &[u8]) -> Option<SleeveFrame<'_>> {
    if bytes.len() < HEADER_LEN || bytes[..4] != MAGIC || bytes[4] != VERSION {
        return None;
    }
    let sender = u64::from_be_bytes(bytes[6..14].try_into().ok()?);
    match bytes[5] {
        KIND_SLEEVE => Some(SleeveFrame::Plain {
            sender: PeerName(sender),
            packet: &bytes[HEADER_LEN..],
        }),
        KIND_SLEEVE_SEALED if bytes.len() >= HEADER_LEN + 16 => {
            let epoch = u64::from_be_bytes(bytes[14..22].try_into().ok()?);
            let counter = u64::from_be_bytes(bytes[22..30].try_into().ok()?);
            Some(SleeveFrame::Sealed {
                nonce: SealNonce {
                    sender,
                    epoch,
                    counter,
                },
                header: &bytes[..HEADER_LEN + 16],
                sealed: &bytes[HEADER_LEN + 16..],
            })
        }
        _ => None,
    }
}
const PLAIN_HEADER: usize = 4 + 1 + 1 + 8;
const SEALED_HEADER: usize = PLAIN_HEADER + 8 + 8;
/// Largest encoded body; the same whether or not the datagram is sealed, so
/// one packing decision holds for both.
pub const MAX_BODY: usize = MAX_DATAGRAM - SEALED_HEADER - TAG_LEN;

/// Most entries in one gossip datagram, and most names in a digest or
/// request (each is bounded by `MAX_BODY` in practice; these bound decoding).
pub const MAX_ENTRIES: usize = 64;
pub const MAX_NAMES: usize = 128;
/// Most (name, version) pairs in one news push (8 + up to 10 bytes each).
pub const MAX_NEWS: usize = 64;
/// Most ring blocks and most tombstones in one ring update.
pub const MAX_BLOCKS: usize = 48;
pub const MAX_TOMBSTONES: usize = 64;

/// One control message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Connection liveness and handshake; sent to every connected peer each
    /// heartbeat interval and to addresses being tried.
    Heartbeat(Heartbeat),
    /// Peer entries: news being pushed, or answers to a digest or request.
    Gossip(Vec<PeerEntry>),
    /// Anti-entropy: the versions the sender holds for names in a range.
    Digest(Digest),
    /// "Send me these entries", each with the fingerprint of the
    /// connection list the sender holds for it, if any: the receiver
    /// answers with `Gossip`, or with `Announcements` for entries whose
    /// list is the one the sender holds.
    Request(Vec<(PeerName, Option<u64>)>),
    /// News: the sender has these (name, version) entries, new to it (a
    /// push) or newer than the receiver's digest said (an answer to it);
    /// the receiver requests those it lacks.
    News(Vec<(PeerName, u64)>),
    /// Part of the IPAM ring: changed blocks being pushed, or the whole
    /// ring (in several datagrams) for a peer whose ring differs.
    Ring(RingUpdate),
    /// Entries without their connection lists, which the receiver holds
    /// already: a tenth of the bytes when only the IPAM part changed.
    Announcements(Vec<Announcement>),
}

impl Message {
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Heartbeat(_) => MessageKind::Heartbeat,
            Message::Gossip(_) => MessageKind::Gossip,
            Message::Digest(_) => MessageKind::Digest,
            Message::Request(_) => MessageKind::Request,
            Message::News(_) => MessageKind::News,
            Message::Ring(_) => MessageKind::Ring,
            Message::Announcements(_) => MessageKind::Announcements,
        }
    }
}

/// Which [`Message`] variant a message is: what traffic is counted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MessageKind {
    Heartbeat,
    Gossip,
    Digest,
    Request,
    News,
    Ring,
    Announcements,
}

impl MessageKind {
    /// Every kind, in declaration order: the order status and reports list
    /// them in. A new kind goes here too (the assertion below keeps the
    /// order, and a test that every example message's kind is listed).
    pub const ALL: [MessageKind; 7] = [
        MessageKind::Heartbeat,
        MessageKind::Gossip,
        MessageKind::Digest,
        MessageKind::Request,
        MessageKind::News,
        MessageKind::Ring,
        MessageKind::Announcements,
    ];

    /// Its name in status, metrics and reports.
    pub const fn name(self) -> &'static str {
        match self {
            MessageKind::Heartbeat => "heartbeat",
            MessageKind::Gossip => "gossip",
            MessageKind::Digest => "digest",
            MessageKind::Request => "request",
            MessageKind::News => "news",
            MessageKind::Ring => "ring",
            MessageKind::Announcements => "announcements",
        }
    }

    /// Its position in [`MessageKind::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

// Counters index arrays by `index()`: `ALL` must list kinds in order.
const _: () = {
    let mut i = 0;
    while i < MessageKind::ALL.len() {
        assert!(MessageKind::ALL[i].index() == i);
        i += 1;
    }
};

/// A peer entry without its connection list, and the fingerprint of that
/// list (see [`PeerEntry::links_fingerprint`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    pub version: u64,
    pub name: PeerName,
    pub nickname: String,
    pub address: SocketAddr,
    pub ipam: IpamInfo,
    pub links: u64,
}

impl Announcement {
    /// `entry` without its list, whose fingerprint is `links`.
    pub fn of(entry: &PeerEntry, links: u64) -> Announcement {
        Announcement {
            version: entry.version,
            name: entry.name,
            nickname: entry.nickname.clone(),
            address: entry.address,
            ipam: entry.ipam.clone(),
            links,
        }
    }

    /// The whole entry, given the connection list it was announced with.
    pub fn with_connections(self, connections: Vec<PeerName>) -> PeerEntry {
        PeerEntry {
            version: self.version,
            name: self.name,
            nickname: self.nickname,
            address: self.address,
            connections,
            ipam: self.ipam,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// A fresh random value; the receiver echoes it back.
    pub token: u64,
    /// The last token the sender received from the receiver, if it heard
    /// from it within the dead interval. A current echo proves our
    /// heartbeats arrive: the second half of the two-way confirmation, which
    /// a replayed or spoofed heartbeat cannot supply.
    pub echo: Option<u64>,
    /// The sender's topology summary; a difference starts anti-entropy.
    pub topology_summary: u64,
    /// The sender's IPAM ring summary; a difference sends the ring.
    pub ring_summary: u64,
    /// The sender has not heard from the receiver for a while and asks
    /// for a heartbeat at once, rather than at the receiver's next turn.
    pub probe: bool,
    /// The sender is at its connection limit and will not link with the
    /// receiver, which should drop its side and try later (as Weave closes
    /// the connection with "connection limit reached"). Without it, the
    /// receiver would hold a link that is never confirmed, and a slot with
    /// it, until the link dies of silence.
    pub refused: bool,
    /// The sender has no connection at all and asks to join through the
    /// receiver: one at its limit makes room by dropping a redundant link
    /// rather than refusing, or a node that knows only full peers would
    /// never join.
    pub alone: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// The name range this digest covers, inclusive: names in it that the
    /// digest does not list are ones the sender lacks.
    pub first: PeerName,
    pub last: PeerName,
    /// (name, version), ascending by name, all within `first..=last`.
    pub versions: Vec<(PeerName, u64)>,
}

/// Why a datagram was not accepted. Each is counted in status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("datagram of {0} bytes is shorter than a weft header")]
    TooShort(usize),
    #[error("datagram of {0} bytes exceeds the {MAX_DATAGRAM}-byte limit")]
    Oversized(usize),
    #[error("not a weft datagram (bad magic)")]
    BadMagic,
    #[error("wire version {0} is not supported (this node speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown datagram kind {0}")]
    UnknownKind(u8),
    #[error("malformed message body: {0}")]
    Malformed(postcard::Error),
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    #[error("too many {what}: {count} (at most {max})")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("invalid message: {0}")]
    Invalid(&'static str),
    #[error("message of {0} bytes does not fit one datagram")]
    BodyTooLarge(usize),
    #[error(transparent)]
    Auth(#[from] OpenError),
}

/// A datagram whose header has been parsed but whose body is still opaque.
#[derive(Debug)]
pub struct Frame<'a> {
    pub sender: PeerName,
    /// Present when the datagram is sealed.
    pub nonce: Option<SealNonce>,
    header: &'a [u8],
    body: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Parses the header of untrusted bytes.
    pub fn parse(bytes: &'a [u8]) -> Result<Frame<'a>, WireError> {
        if bytes.len() > MAX_DATAGRAM {
            return Err(WireError::Oversized(bytes.len()));
        }
        if bytes.len() < PLAIN_HEADER {
            return Err(WireError::TooShort(bytes.len()));
        }
        if bytes[..4] != MAGIC {
            return Err(WireError::BadMagic);
        }
        if bytes[4] != VERSION {
            return Err(WireError::UnsupportedVersion(bytes[4]));
        }
        let sender = PeerName(be_u64(&bytes[6..14]));
        match bytes[5] {
            KIND_PLAIN => Ok(Frame {
                sender,
                nonce: None,
                header: &bytes[..PLAIN_HEADER],
                body: &bytes[PLAIN_HEADER..],
            }),
            KIND_SEALED if bytes.len() < SEALED_HEADER + TAG_LEN => {
                Err(WireError::TooShort(bytes.len()))
            }
            KIND_SEALED => Ok(Frame {
                sender,
                nonce: Some(SealNonce {
                    sender: sender.0,
                    epoch: be_u64(&bytes[14..22]),
                    counter: be_u64(&bytes[22..30]),
                }),
                header: &bytes[..SEALED_HEADER],
                body: &bytes[SEALED_HEADER..],
            }),
            other => Err(WireError::UnknownKind(other)),
        }
    }

    /// Decodes the body of a plain frame.
    pub fn plain_message(&self) -> Result<Message, WireError> {
        Message::decode(self.body)
    }

    /// Opens and decodes the body of a sealed frame.
    pub fn open_message(&self, sealer: &Sealer) -> Result<Message, WireError> {
        let nonce = self
            .nonce
            .ok_or(WireError::Invalid("frame is not sealed"))?;
        let body = sealer.open(self.header, nonce, self.body)?;
        Message::decode(&body)
    }
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The header, in a buffer with room for `rest` more bytes: datagrams are
/// sized exactly, since many may wait in queues at once.
fn header(sender: PeerName, kind: u8, rest: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 2 + 8 + rest);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&sender.0.to_be_bytes());
    out
}

impl Message {
    /// Encodes the body, refusing one that would not fit a datagram.
    pub fn encode_body(&self) -> Result<Vec<u8>, WireError> {
        // One allocation of datagram size instead of repeated growth.
        let body = postcard::to_extend(self, Vec::with_capacity(MAX_DATAGRAM))
            .map_err(WireError::Malformed)?;
        if body.len() > MAX_BODY {
            return Err(WireError::BodyTooLarge(body.len()));
        }
        Ok(body)
    }

    /// A plain datagram from `sender`.
    pub fn encode_plain(&self, sender: PeerName) -> Result<Vec<u8>, WireError> {
        let body = self.encode_body()?;
        let mut out = header(sender, KIND_PLAIN, body.len());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// A sealed datagram from `nonce.sender`.
    pub fn encode_sealed(&self, sealer: &Sealer, nonce: SealNonce) -> Result<Vec<u8>, WireError> {
        let body = self.encode_body()?;
        let mut out = header(PeerName(nonce.sender), KIND_SEALED, 16 + body.len() + 16);
        out.extend_from_slice(&nonce.epoch.to_be_bytes());
        out.extend_from_slice(&nonce.counter.to_be_bytes());
        let sealed = sealer.seal(&out, nonce, &body);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Decodes and validates a body of untrusted bytes.
    pub fn decode(body: &[u8]) -> Result<Message, WireError> {
        if body.len() > MAX_BODY {
            return Err(WireError::BodyTooLarge(body.len()));
        }
        let (message, rest) =
            postcard::take_from_bytes::<Message>(body).map_err(WireError::Malformed)?;
        if !rest.is_empty() {
            return Err(WireError::TrailingBytes(rest.len()));
        }
        message.validate()?;
        Ok(message)
    }

    fn validate(&self) -> Result<(), WireError> {
        match self {
            Message::Heartbeat(_) => Ok(()),
            Message::Gossip(entries) => {
                at_most("entries", entries.len(), MAX_ENTRIES)?;
                entries.iter().try_for_each(validate_entry)
            }
            Message::Digest(d) => {
                at_most("digest names", d.versions.len(), MAX_NAMES)?;
                if d.first > d.last {
                    return Err(WireError::Invalid("digest range is empty"));
                }
                let names = d.versions.iter().map(|(n, _)| *n);
                if !strictly_ascending(names.clone())
                    || names.clone().any(|n| n < d.first || n > d.last)
                {
                    return Err(WireError::Invalid("digest names unordered or out of range"));
                }
                Ok(())
            }
            Message::Request(names) => at_most("requested names", names.len(), MAX_NAMES),
            Message::Announcements(list) => {
                at_most("announcements", list.len(), MAX_ENTRIES)?;
                if list.iter().any(|a| a.nickname.len() > MAX_NICKNAME) {
                    return Err(WireError::Invalid("nickname longer than 63 bytes"));
                }
                Ok(())
            }
            Message::News(versions) => at_most("news entries", versions.len(), MAX_NEWS),
            Message::Ring(update) => {
                at_most("ring blocks", update.blocks.len(), MAX_BLOCKS)?;
                at_most("tombstones", update.tombstones.len(), MAX_TOMBSTONES)
            }
        }
    }
}

fn validate_entry(e: &PeerEntry) -> Result<(), WireError> {
    if e.nickname.len() > MAX_NICKNAME {
        return Err(WireError::Invalid("nickname longer than 63 bytes"));
    }
    at_most(
        "connections in an entry",
        e.connections.len(),
        MAX_CONN_LIMIT,
    )?;
    if !strictly_ascending(e.connections.iter().copied()) {
        return Err(WireError::Invalid(
            "entry connections unordered or repeated",
        ));
    }
    if e.connections.contains(&e.name) {
        return Err(WireError::Invalid("entry lists a connection to itself"));
    }
    Ok(())
}

fn at_most(what: &'static str, count: usize, max: usize) -> Result<(), WireError> {
    if count > max {
        return Err(WireError::TooMany { what, count, max });
    }
    Ok(())
}

fn strictly_ascending(mut names: impl Iterator<Item = PeerName>) -> bool {
    let Some(mut prev) = names.next() else {
        return true;
    };
    names.all(|n| {
        let ok = n > prev;
        prev = n;
        ok
    })
}

/// Splits entries into as few `Gossip` messages as fit one datagram each.
pub fn pack_gossip<'a>(entries: impl IntoIterator<Item = &'a PeerEntry>) -> Vec<Message> {
    pack(entries.into_iter().cloned(), Message::Gossip)
}

/// Splits announcements into as few messages as fit one datagram each.
pub fn pack_announcements(list: Vec<Announcement>) -> Vec<Message> {
    pack(list, Message::Announcements)
}

fn pack<T: Serialize>(
    items: impl IntoIterator<Item = T>,
    wrap: fn(Vec<T>) -> Message,
) -> Vec<Message> {
    // Room for the enum tag and the vector's length prefix.
    const OVERHEAD: usize = 1 + 5;
    let mut messages = Vec::new();
    let mut batch: Vec<T> = Vec::new();
    let mut size = OVERHEAD;
    for item in items {
        // An item is bounded (nickname, connection count), so it always
        // fits a datagram on its own; the size is only an estimate if
        // encoding failed, which it cannot for these plain types.
        let item_size = postcard::experimental::serialized_size(&item).unwrap_or(MAX_BODY);
        if !batch.is_empty() && (size + item_size > MAX_BODY || batch.len() == MAX_ENTRIES) {
            messages.push(wrap(std::mem::take(&mut batch)));
            size = OVERHEAD;
        }
        size += item_size;
        batch.push(item);
    }
    if !batch.is_empty() {
        messages.push(wrap(batch));
    }
    messages
}

/// Splits a ring update into updates that fit one datagram each.
pub fn pack_ring(update: &RingUpdate) -> Vec<Message> {
    let part = |blocks: &[crate::ipam::ring::Block], tombstones: &[(PeerName, PeerName)]| {
        Message::Ring(RingUpdate {
            universe: update.universe,
            seed: update.seed,
            blocks: blocks.to_vec(),
            tombstones: tombstones.to_vec(),
        })
    };
    let mut out: Vec<Message> = update
        .blocks
        .chunks(MAX_BLOCKS)
        .map(|c| part(c, &[]))
        .collect();
    out.extend(
        update
            .tombstones
            .chunks(MAX_TOMBSTONES)
            .map(|c| part(&[], c)),
    );
    if out.is_empty() {
        out.push(part(&[], &[]));
    }
    out
}

/// Splits (name, version) pairs, ascending by name, into digests that
/// together cover the whole name space, each fitting one datagram.
pub fn pack_digests(versions: &[(PeerName, u64)]) -> Vec<Message> {
    // 64 pairs of 8 name bytes + at most 10 varint bytes stay under MAX_BODY.
    const PER_DIGEST: usize = 64;
    let chunks: Vec<&[(PeerName, u64)]> = if versions.is_empty() {
        vec![&[]]
    } else {
        versions.chunks(PER_DIGEST).collect()
    };
    let count = chunks.len();
    chunks
        .iter()
        .enumerate()
        .map(|(i, chunk)| {
            // Adjacent digests share no names and leave no gaps, so absence
            // from a digest reliably means "the sender lacks it".
            let first = if i == 0 { PeerName(0) } else { chunk[0].0 };
            let last = if i + 1 == count {
                PeerName(u64::MAX)
            } else {
                PeerName(chunks[i + 1][0].0.0 - 1)
            };
            Message::Digest(Digest {
                first,
                last,
                versions: chunk.to_vec(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::IpamInfo;
    use crate::ipam::ring::{Block, Label, Seed};
    use crate::ipam::seeding::{Ballot, Paxos, Proposal};
    use proptest::prelude::*;
    use std::net::SocketAddr;

    fn entry(name: u64, conns: &[u64]) -> PeerEntry {
        PeerEntry {
            version: 7,
            name: PeerName(name),
            nickname: "node1".into(),
            address: SocketAddr::from(([192, 168, 1, 11], 6783)),
            connections: conns.iter().map(|c| PeerName(*c)).collect(),
            ipam: IpamInfo {
                ring: Some(0x0102_0304_0506_0708),
                free: 1000,
                owned: 1024,
                wants_space: false,
                seeding: None,
                pod_cidr: Some("10.244.1.0/24".parse().unwrap()),
            },
        }
    }

    fn ring_update() -> RingUpdate {
        RingUpdate {
            universe: "10.32.0.0/12".parse().unwrap(),
            seed: Some(Seed {
                id: 7,
                first_owner: PeerName(1),
            }),
            blocks: vec![Block {
                prefix: "10.40.0.0/13".parse().unwrap(),
                label: Label {
                    version: 2,
                    owner: PeerName(2),
                },
            }],
            tombstones: vec![(PeerName(3), PeerName(1))],
        }
    }

    fn examples() -> Vec<(&'static str, Message)> {
        vec![
            (
                "heartbeat",
                Message::Heartbeat(Heartbeat {
                    token: 0x1111_2222_3333_4444,
                    echo: Some(0x5555_6666_7777_8888),
                    topology_summary: 0x0123_4567_89ab_cdef,
                    ring_summary: 0x0fed_cba9_8765_4321,
                    probe: false,
                    refused: false,
                    alone: true,
                }),
            ),
            ("gossip", Message::Gossip(vec![entry(1, &[2, 3])])),
            (
                "digest",
                Message::Digest(Digest {
                    first: PeerName(0),
                    last: PeerName(u64::MAX),
                    versions: vec![(PeerName(1), 7), (PeerName(2), 300)],
                }),
            ),
            (
                "request",
                Message::Request(vec![(PeerName(1), None), (PeerName(2), Some(7))]),
            ),
            (
                "announcements",
                Message::Announcements(vec![{
                    let e = entry(1, &[2, 3]);
                    Announcement::of(&e, e.links_fingerprint())
                }]),
            ),
            ("ring", Message::Ring(ring_update())),
            (
                "news",
                Message::News(vec![(PeerName(1), 7), (PeerName(u64::MAX), u64::MAX)]),
            ),
        ]
    }

    #[test]
    fn every_kind_is_listed_once_with_its_name() {
        let examples = examples();
        for (name, message) in &examples {
            assert_eq!(message.kind().name(), *name);
        }
        let mut kinds: Vec<MessageKind> = examples.iter().map(|(_, m)| m.kind()).collect();
        kinds.sort();
        assert_eq!(kinds, MessageKind::ALL, "one example of each listed kind");
    }

    fn hex(bytes: &[u8]) -> String {
        bytes
            .chunks(16)
            .map(|line| {
                line.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The encoding of every message, byte for byte: a wire change shows up
    /// in review as a snapshot diff.
    #[test]
    fn encodings_are_stable() {
        let mut settings = insta::Settings::clone_current();
        settings.set_snapshot_path("../../snapshots/wire");
        settings.set_prepend_module_to_snapshot(false);
        settings.bind(|| {
            for (name, message) in examples() {
                let plain = message
                    .encode_plain(PeerName(0xfeed_beef_0000_0001))
                    .unwrap();
                insta::assert_snapshot!(name, hex(&plain));
            }
            let sealer = Sealer::new(b"s3cret");
            let nonce = SealNonce {
                sender: 0xfeed_beef_0000_0001,
                epoch: 1 << 32,
                counter: 5,
            };
            let sealed = examples()[0].1.encode_sealed(&sealer, nonce).unwrap();
            insta::assert_snapshot!("heartbeat_sealed", hex(&sealed));
        });
    }

    #[test]
    fn every_example_round_trips_plain_and_sealed() {
        let sealer = Sealer::new(b"s3cret");
        for (_, message) in examples() {
            let bytes = message.encode_plain(PeerName(9)).unwrap();
            let frame = Frame::parse(&bytes).unwrap();
            assert_eq!(frame.sender, PeerName(9));
            assert_eq!(frame.plain_message().unwrap(), message);

            let nonce = SealNonce {
                sender: 9,
                epoch: 1,
                counter: 2,
            };
            let bytes = message.encode_sealed(&sealer, nonce).unwrap();
            let frame = Frame::parse(&bytes).unwrap();
            assert_eq!(frame.nonce, Some(nonce));
            assert_eq!(frame.open_message(&sealer).unwrap(), message);
            assert!(matches!(
                frame.open_message(&Sealer::new(b"other")),
                Err(WireError::Auth(_))
            ));
        }
    }

    #[test]
    fn a_full_ring_update_packs_into_datagrams() {
        let blocks: Vec<Block> = (0..200u32)
            .map(|i| Block {
                prefix: ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(0x0a20_0000 + i * 256), 24)
                    .unwrap(),
                label: Label {
                    version: u64::MAX,
                    owner: PeerName(u64::MAX - u64::from(i)),
                },
            })
            .collect();
        let tombstones = (0..100)
            .map(|i| (PeerName(i), PeerName(u64::MAX - i)))
            .collect();
        let update = RingUpdate {
            blocks: blocks.clone(),
            tombstones,
            ..ring_update()
        };
        let mut back = Vec::new();
        for m in pack_ring(&update) {
            let bytes = m.encode_plain(PeerName(1)).unwrap();
            assert!(bytes.len() <= MAX_DATAGRAM);
            let Message::Ring(u) = Frame::parse(&bytes).unwrap().plain_message().unwrap() else {
                panic!("not a ring update");
            };
            back.extend(u.blocks);
        }
        assert_eq!(back, blocks);
    }

    #[test]
    fn a_full_news_push_fits_one_sealed_datagram() {
        let news = Message::News(
            (0..MAX_NEWS as u64)
                .map(|i| (PeerName(u64::MAX - i), u64::MAX))
                .collect(),
        );
        let nonce = SealNonce {
            sender: 1,
            epoch: 1,
            counter: 1,
        };
        assert!(news.encode_sealed(&Sealer::new(b"k"), nonce).unwrap().len() <= MAX_DATAGRAM);
    }

    #[test]
    fn sleeve_frames_round_trip_and_nothing_else_parses_as_one() {
        let f = sleeve_frame(PeerName(9), b"\x45packet");
        assert_eq!(
            parse_sleeve(&f),
            Some(SleeveFrame::Plain {
                sender: PeerName(9),
                packet: &b"\x45packet"[..]
            })
        );
        let sealer = Sealer::new(b"secret");
        let nonce = SealNonce {
            sender: 9,
            epoch: 1,
            counter: 2,
        };
        let sealed = sealed_sleeve_frame(&sealer, nonce, b"\x45packet");
        let Some(SleeveFrame::Sealed {
            nonce: n,
            header,
            sealed: body,
        }) = parse_sleeve(&sealed)
        else {
            panic!("not a sealed sleeve frame");
        };
        assert_eq!(n, nonce);
        assert_eq!(sealer.open(header, n, body).unwrap(), b"\x45packet");
        assert!(Sealer::new(b"other").open(header, n, body).is_err());
        let control = examples()[0].1.encode_plain(PeerName(1)).unwrap();
        assert_eq!(parse_sleeve(&control), None);
        assert_eq!(parse_sleeve(&f[..10]), None);
        // The router refuses a sleeve frame as malformed, never panics.
        assert!(Frame::parse(&f).is_err());
    }

    #[test]
    fn header_errors_are_typed() {
        let good = examples()[0].1.encode_plain(PeerName(1)).unwrap();
        assert_eq!(
            Frame::parse(&good[..3]).unwrap_err(),
            WireError::TooShort(3)
        );
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(Frame::parse(&bad).unwrap_err(), WireError::BadMagic);
        let mut bad = good.clone();
        bad[4] = 9;
        assert_eq!(
            Frame::parse(&bad).unwrap_err().to_string(),
            "wire version 9 is not supported (this node speaks 3)"
        );
        let mut bad = good.clone();
        bad[5] = 7;
        assert_eq!(Frame::parse(&bad).unwrap_err(), WireError::UnknownKind(7));
        let big = vec![0u8; MAX_DATAGRAM + 1];
        assert_eq!(Frame::parse(&big).unwrap_err(), WireError::Oversized(1401));
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            Frame::parse(&trailing)
                .unwrap()
                .plain_message()
                .unwrap_err(),
            WireError::TrailingBytes(1)
        );
    }

    #[test]
    fn invalid_contents_are_refused() {
        let unordered = Message::Gossip(vec![entry(1, &[3, 2])]);
        let bytes = unordered.encode_plain(PeerName(1)).unwrap();
        assert_eq!(
            Frame::parse(&bytes).unwrap().plain_message().unwrap_err(),
            WireError::Invalid("entry connections unordered or repeated")
        );
        let self_loop = Message::Gossip(vec![entry(1, &[1])]);
        let bytes = self_loop.encode_plain(PeerName(1)).unwrap();
        assert!(Frame::parse(&bytes).unwrap().plain_message().is_err());
        let too_many = Message::Request((0..150).map(|n| (PeerName(n), None)).collect());
        let bytes = too_many.encode_plain(PeerName(1)).unwrap();
        assert_eq!(
            Frame::parse(&bytes)
                .unwrap()
                .plain_message()
                .unwrap_err()
                .to_string(),
            "too many requested names: 150 (at most 128)"
        );
    }

    #[test]
    fn a_heartbeat_flag_that_is_not_a_bool_is_refused() {
        let mut bytes = examples()[0].1.encode_plain(PeerName(1)).unwrap();
        // The last byte is the `alone` flag.
        *bytes.last_mut().unwrap() = 2;
        assert!(matches!(
            Frame::parse(&bytes).unwrap().plain_message(),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn a_full_entry_fits_one_datagram() {
        let conns: Vec<u64> = (0..MAX_CONN_LIMIT as u64)
            .map(|i| u64::MAX - i)
            .rev()
            .collect();
        let mut e = entry(1, &conns);
        e.nickname = "n".repeat(MAX_NICKNAME);
        e.version = u64::MAX;
        let ballot = Ballot {
            round: u64::MAX,
            proposer: PeerName(u64::MAX),
        };
        e.ipam = IpamInfo {
            ring: Some(u64::MAX),
            free: u64::MAX,
            owned: u64::MAX,
            wants_space: true,
            seeding: Some(Paxos {
                promised: ballot,
                accepted: Some((ballot, PeerName(u64::MAX))),
                proposal: Some(Proposal {
                    ballot,
                    value: Some(PeerName(u64::MAX)),
                }),
            }),
            pod_cidr: Some("255.255.255.0/24".parse().unwrap()),
        };
        e.address = "[ffff::ffff]:65535".parse().unwrap();
        let packed = pack_gossip([&e]);
        assert_eq!(packed.len(), 1);
        let sealed = packed[0]
            .encode_sealed(
                &Sealer::new(b"k"),
                SealNonce {
                    sender: u64::MAX,
                    epoch: u64::MAX,
                    counter: u64::MAX,
                },
            )
            .unwrap();
        assert!(sealed.len() <= MAX_DATAGRAM);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
            if let Ok(frame) = Frame::parse(&bytes) {
                let _ = frame.plain_message();
                let _ = frame.open_message(&Sealer::new(b"k"));
            }
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn valid_header_with_random_body_never_panics(body in proptest::collection::vec(any::<u8>(), 0..1386)) {
            let mut bytes = header(PeerName(1), KIND_PLAIN, 0);
            bytes.extend_from_slice(&body);
            let _ = Frame::parse(&bytes).and_then(|f| f.plain_message());
        }

        #[test]
        fn gossip_packs_into_datagrams_and_round_trips(
            conns in proptest::collection::vec(proptest::collection::btree_set(0u64..u64::MAX, 0..MAX_CONN_LIMIT), 1..40)
        ) {
            let entries: Vec<PeerEntry> = conns.iter().enumerate().map(|(i, c)| {
                let c: Vec<u64> = c.iter().copied().filter(|n| *n != i as u64).collect();
                entry(i as u64, &c)
            }).collect();
            let packed = pack_gossip(&entries);
            let mut back = Vec::new();
            for m in &packed {
                let bytes = m.encode_plain(PeerName(1)).unwrap();
                prop_assert!(bytes.len() <= MAX_DATAGRAM);
                match Frame::parse(&bytes).unwrap().plain_message().unwrap() {
                    Message::Gossip(es) => back.extend(es),
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            prop_assert_eq!(back, entries);
        }

        #[test]
        fn digests_cover_the_name_space_without_gaps(names in proptest::collection::btree_set(any::<u64>(), 0..500)) {
            let versions: Vec<(PeerName, u64)> = names.iter().map(|n| (PeerName(*n), u64::MAX)).collect();
            let digests = pack_digests(&versions);
            let mut expected_first = 0u64;
            let mut listed = Vec::new();
            for (i, m) in digests.iter().enumerate() {
                let bytes = m.encode_plain(PeerName(1)).unwrap();
                prop_assert!(bytes.len() <= MAX_DATAGRAM);
                let Message::Digest(d) = Frame::parse(&bytes).unwrap().plain_message().unwrap() else {
                    panic!("not a digest");
                };
                prop_assert_eq!(d.first.0, expected_first);
                if i + 1 == digests.len() { prop_assert_eq!(d.last.0, u64::MAX); }
                expected_first = d.last.0.wrapping_add(1);
                listed.extend(d.versions);
            }
            prop_assert_eq!(listed, versions);
        }
    }
}
