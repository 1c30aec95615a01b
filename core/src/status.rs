//! A serializable view of one node for the agent's status API and the
//! simulator's reports.

use crate::connections::LinkState;
use crate::peer::PeerName;
use crate::wire::MessageKind;
use ipnet::Ipv4Net;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::{AddAssign, Index, IndexMut};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub name: PeerName,
    pub nickname: String,
    pub address: SocketAddr,
    pub version: u64,
    pub encrypted: bool,
    /// Every known peer, this node included.
    pub peers: Vec<PeerStatus>,
    pub connections: Vec<ConnectionStatus>,
    /// Addresses being tried that no connection uses yet.
    pub targets: Vec<TargetStatus>,
    pub traffic: Traffic,
    /// Datagrams refused, by reason.
    pub dropped: BTreeMap<DropReason, u64>,
    pub ipam: IpamStatus,
}

/// Address management as this node sees it (`weave status ipam`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IpamStatus {
    /// "ring", "observer" or "node-cidr".
    pub mode: String,
    pub range: Ipv4Net,
    /// Whether the ring exists (ring modes); its seed id.
    pub seeded: bool,
    pub seed: Option<String>,
    /// This node's bridge gateway address.
    pub gateway: Option<Ipv4Addr>,
    pub peers: Vec<IpamPeerStatus>,
    pub pending: Vec<PendingStatus>,
    /// Problems that need a person: rings that cannot merge, overlapping
    /// podCIDRs, allocations in space another peer owns.
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IpamPeerStatus {
    pub name: PeerName,
    pub nickname: String,
    pub reachable: bool,
    pub owned: u64,
    pub free: u64,
    pub used: u64,
    pub prefixes: Vec<Ipv4Net>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PendingStatus {
    pub container: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: PeerName,
    pub nickname: String,
    pub address: SocketAddr,
    pub version: u64,
    pub reachable: bool,
    /// The peer traffic to it goes through first (itself when direct).
    pub next_hop: Option<PeerName>,
    pub hops: Option<u32>,
    /// Peers it says it is connected to.
    pub connections: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnectionStatus {
    pub peer: PeerName,
    pub nickname: Option<String>,
    pub address: SocketAddr,
    pub state: LinkState,
    pub last_heard_ms_ago: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetStatus {
    pub address: SocketAddr,
    pub configured: bool,
    pub attempts: u32,
    pub next_try_in_ms: u64,
}

/// Control-plane traffic since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub sent_datagrams: u64,
    pub sent_bytes: u64,
    pub received_datagrams: u64,
    pub received_bytes: u64,
    /// Sent bytes by message kind: which part of the protocol costs what.
    pub sent_bytes_by_kind: BytesByKind,
}

/// Bytes per message kind, serialized as an object keyed by kind name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BytesByKind([u64; MessageKind::ALL.len()]);

impl BytesByKind {
    /// Every kind with its bytes, in `MessageKind::ALL`'s order.
    pub fn iter(&self) -> impl Iterator<Item = (MessageKind, u64)> + '_ {
        MessageKind::ALL.into_iter().map(|kind| (kind, self[kind]))
    }
}

impl Index<MessageKind> for BytesByKind {
    type Output = u64;
    fn index(&self, kind: MessageKind) -> &u64 {
        &self.0[kind.index()]
    }
}

impl IndexMut<MessageKind> for BytesByKind {
    fn index_mut(&mut self, kind: MessageKind) -> &mut u64 {
        &mut self.0[kind.index()]
    }
}

impl AddAssign for BytesByKind {
    fn add_assign(&mut self, other: BytesByKind) {
        for (kind, bytes) in other.iter() {
            self[kind] += bytes;
        }
    }
}

impl Serialize for BytesByKind {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter().map(|(kind, bytes)| (kind.name(), bytes)))
    }
}

impl<'de> Deserialize<'de> for BytesByKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let named = BTreeMap::<String, u64>::deserialize(d)?;
        let mut bytes = BytesByKind::default();
        for (name, n) in named {
            let kind = MessageKind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!("unknown message kind {name:?}"))
                })?;
            bytes[kind] = n;
        }
        Ok(bytes)
    }
}

/// Why an incoming datagram was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Not a weft datagram, or a corrupt one.
    Malformed,
    /// From a weft speaking another wire version.
    UnsupportedVersion,
    /// Plain datagram while this node requires encryption.
    Unencrypted,
    /// Encrypted datagram while this node has no secret.
    NoSecret,
    /// Failed authentication: wrong secret, forged or tampered.
    Authentication,
    /// Authentic but seen before (or from an older boot of the sender).
    Replayed,
    /// Gossip from a peer that has no connection with this node.
    NotConnected,
    /// A new peer's heartbeat while at the connection limit.
    ConnectionLimit,
    /// From a peer removed from the cluster.
    RemovedPeer,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_by_kind_serialize_as_an_object_keyed_by_name_in_kind_order() {
        let mut bytes = BytesByKind::default();
        bytes[MessageKind::Digest] = 7;
        bytes[MessageKind::Announcements] += 3;
        assert_eq!(
            serde_json::to_string(&bytes).unwrap(),
            r#"{"heartbeat":0,"gossip":0,"digest":7,"request":0,"news":0,"ring":0,"announcements":3}"#
        );
        let text = serde_json::to_string(&bytes).unwrap();
        assert_eq!(serde_json::from_str::<BytesByKind>(&text).unwrap(), bytes);
        assert!(serde_json::from_str::<BytesByKind>(r#"{"telepathy":1}"#).is_err());
    }
}
