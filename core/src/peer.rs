//! Peer identity: who a node is, independent of where it is.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A peer's identity: 64 random bits chosen at first start and persisted by
/// the caller. Weave derived names from the machine-id, so cloned VMs shared
/// one name; a random name makes every install (and every wipe) a new peer.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerName(pub u64);

/// On the wire a name is 8 fixed bytes (random names gain nothing from
/// varints); in JSON and other human-readable output it is the display form.
impl Serialize for PeerName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            self.0.to_be_bytes().serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for PeerName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 8]>::deserialize(d).map(|b| PeerName(u64::from_be_bytes(b)))
        }
    }
}

impl fmt::Display for PeerName {
    /// Four groups of four hex digits, e.g. `3f2a:0c11:9b7e:44d0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        write!(
            f,
            "{:04x}:{:04x}:{:04x}:{:04x}",
            (v >> 48) & 0xffff,
            (v >> 32) & 0xffff,
            (v >> 16) & 0xffff,
            v & 0xffff
        )
    }
}

impl fmt::Debug for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A peer name that is not 16 hex digits (colons allowed anywhere).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid peer name {0:?}: expected 16 hex digits such as 3f2a:0c11:9b7e:44d0")]
pub struct ParsePeerNameError(pub String);

impl FromStr for PeerName {
    type Err = ParsePeerNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex: String = s.chars().filter(|c| *c != ':').collect();
        if hex.len() != 16 {
            return Err(ParsePeerNameError(s.to_string()));
        }
        u64::from_str_radix(&hex, 16)
            .map(PeerName)
            .map_err(|_| ParsePeerNameError(s.to_string()))
    }
}

/// Longest nickname accepted, in bytes (a Kubernetes node name is a DNS
/// label of at most 63 characters; longer names are truncated, not refused).
pub const MAX_NICKNAME: usize = 63;

/// Cut a nickname to `MAX_NICKNAME` bytes on a character boundary.
pub fn clamp_nickname(nickname: &str) -> String {
    let mut end = nickname.len().min(MAX_NICKNAME);
    while !nickname.is_char_boundary(end) {
        end -= 1;
    }
    nickname[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_displays_and_parses_back() {
        let name = PeerName(0x3f2a_0c11_9b7e_44d0);
        assert_eq!(name.to_string(), "3f2a:0c11:9b7e:44d0");
        assert_eq!("3f2a:0c11:9b7e:44d0".parse::<PeerName>(), Ok(name));
        assert_eq!("3f2a0c119b7e44d0".parse::<PeerName>(), Ok(name));
    }

    #[test]
    fn json_uses_the_display_form() {
        let name = PeerName(0x3f2a_0c11_9b7e_44d0);
        let json = serde_json::to_string(&name).unwrap();
        assert_eq!(json, "\"3f2a:0c11:9b7e:44d0\"");
        assert_eq!(serde_json::from_str::<PeerName>(&json).unwrap(), name);
    }

    #[test]
    fn bad_name_says_what_is_expected() {
        let err = "node1".parse::<PeerName>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid peer name \"node1\": expected 16 hex digits such as 3f2a:0c11:9b7e:44d0"
        );
    }

    #[test]
    fn nickname_is_clamped_on_a_char_boundary() {
        let long = "é".repeat(40); // 80 bytes
        let clamped = clamp_nickname(&long);
        assert!(clamped.len() <= MAX_NICKNAME);
        assert_eq!(clamped, "é".repeat(31));
    }
}
