//! Node name -> weft peer name, kept in ConfigMap `weft/weft`.
//!
//! A node that is wiped and rejoins keeps its node name but gets a new peer
//! name; the map tells the agent which peer name the node had before, and
//! tells the reclaimer whose space a deleted Node held.
//!
//! Data keys are `peer.<node name>`, values the peer name as 16 lowercase
//! hex digits (the core's `3f2a:0c11:9b7e:44d0` form is accepted when read).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use kube::{Api, Client};

use crate::error::{Error, Result, api, is_conflict};

/// Namespace of every object this crate writes: weft's own (created by
/// deploy/weft.yaml), so the agent's create on Leases cannot touch other
/// components' objects (RBAC cannot limit `create` by name).
pub const NAMESPACE: &str = "weft";
/// Name of the ConfigMap holding the map. deploy/weft.yaml creates it
/// empty, so the agent needs only get and update on this one name.
pub const CONFIGMAP: &str = "weft";
const KEY_PREFIX: &str = "peer.";
/// Optimistic-concurrency retries before giving up. Every agent writes its
/// own key at start, so a whole cluster booting at once contends on this
/// one object: back off exponentially with jitter (up to ~1 s a try).
const MAX_TRIES: u32 = 20;

/// A peer name as stored: 16 lowercase hex digits.
pub fn format_peer_name(peer: u64) -> String {
    format!("{peer:016x}")
}

/// Parses a stored peer name (hex, colons allowed); `None` if malformed.
pub fn parse_peer_name(s: &str) -> Option<u64> {
    let hex: String = s.trim().chars().filter(|c| *c != ':').collect();
    // from_str_radix alone would also take a leading '+'.
    let digits_only = hex.chars().all(|c| c.is_ascii_hexdigit());
    if hex.is_empty() || hex.len() > 16 || !digits_only {
        return None;
    }
    u64::from_str_radix(&hex, 16).ok()
}

/// The data key for a node.
pub fn peer_key(node: &str) -> String {
    format!("{KEY_PREFIX}{node}")
}

/// The well-formed entries of a ConfigMap's data; others are skipped
/// (a hand-edited or foreign key must not break the agent).
pub fn entries_of(data: &BTreeMap<String, String>) -> BTreeMap<String, u64> {
    data.iter()
        .filter_map(|(k, v)| {
            let node = k.strip_prefix(KEY_PREFIX).filter(|n| !n.is_empty())?;
            Some((node.to_string(), parse_peer_name(v)?))
        })
        .collect()
}

/// Sets `node -> peer`; returns (data changed, the peer name it had).
pub fn set_entry(
    data: &mut BTreeMap<String, String>,
    node: &str,
    peer: u64,
) -> (bool, Option<u64>) {
    let value = format_peer_name(peer);
    let old = data.insert(peer_key(node), value.clone());
    let previous = old.as_deref().and_then(parse_peer_name);
    (old != Some(value), previous)
}

/// Removes `node`'s entry if it names `peer`; returns whether it did.
pub fn remove_entry(data: &mut BTreeMap<String, String>, node: &str, peer: u64) -> bool {
    let key = peer_key(node);
    let names_peer = data.get(&key).and_then(|v| parse_peer_name(v)) == Some(peer);
    if names_peer {
        data.remove(&key);
    }
    names_peer
}

/// Access to the map (verbs: `get`, `update` on ConfigMap `weft`).
#[derive(Clone)]
pub struct NameMap {
    api: Api<ConfigMap>,
}

impl NameMap {
    pub fn new(client: Client) -> Self {
        NameMap {
            api: Api::namespaced(client, NAMESPACE),
        }
    }

    /// All well-formed entries, node name -> peer name.
    pub async fn entries(&self) -> Result<BTreeMap<String, u64>> {
        let cm = self.get().await?;
        Ok(cm
            .and_then(|c| c.data)
            .map(|d| entries_of(&d))
            .unwrap_or_default())
    }

    /// The peer name recorded for `node`, if any.
    pub async fn lookup(&self, node: &str) -> Result<Option<u64>> {
        Ok(self.entries().await?.get(node).copied())
    }

    /// Records `node -> peer`. Returns the peer name the node had before if
    /// it differs: that peer is dead (the node was wiped) and its space can
    /// be reclaimed with [`crate::Reclaimer::reclaim_peer`].
    pub async fn register(&self, node: &str, peer: u64) -> Result<Option<u64>> {
        let mut previous = None;
        self.update(&format!("register {node} in ConfigMap"), |data| {
            let (changed, prev) = set_entry(data, node, peer);
            previous = prev;
            changed
        })
        .await?;
        Ok(previous.filter(|p| *p != peer))
    }

    /// Removes `node`'s entry if it still names `peer` (a rejoined node
    /// with a new peer name keeps its entry). Returns whether it did.
    pub async fn remove(&self, node: &str, peer: u64) -> Result<bool> {
        let mut removed = false;
        self.update(&format!("remove {node} from ConfigMap"), |data| {
            removed = remove_entry(data, node, peer);
            removed
        })
        .await?;
        Ok(removed)
    }

    async fn get(&self) -> Result<Option<ConfigMap>> {
        let what = format!("get ConfigMap {NAMESPACE}/{CONFIGMAP}");
        self.api.get_opt(CONFIGMAP).await.map_err(api(what))
    }

    /// Read-modify-write with the read's resourceVersion; on 409 (someone
    /// wrote in between) read again. `edit` returns false for "no change".
    async fn update(
        &self,
        what: &str,
        mut edit: impl FnMut(&mut BTreeMap<String, String>) -> bool,
    ) -> Result<()> {
        for attempt in 0..MAX_TRIES {
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt)).await;
            }
            let Some(mut cm) = self.get().await? else {
                return Err(Error::Missing {
                    what: format!("ConfigMap {NAMESPACE}/{CONFIGMAP}"),
                    hint: "deploy/weft.yaml creates it: kubectl apply -f deploy/weft.yaml".into(),
                });
            };
            if !edit(cm.data.get_or_insert_default()) {
                return Ok(());
            }
            let result = self
                .api
                .replace(CONFIGMAP, &PostParams::default(), &cm)
                .await;
            match result {
                Ok(_) => return Ok(()),
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(api(what)(e)),
            }
        }
        Err(Error::Conflict {
            what: what.to_string(),
            tries: MAX_TRIES,
        })
    }
}

/// 10 ms doubling per attempt, capped at 1 s, scaled by a random 50-100 %
/// so that agents that collided once do not collide again in lockstep.
fn backoff(attempt: u32) -> Duration {
    use std::hash::{BuildHasher, RandomState};
    let base = 10u64.saturating_mul(1 << attempt.min(7)).min(1000);
    let random = RandomState::new().hash_one(attempt) % 50;
    Duration::from_millis(base * (50 + random) / 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_names_round_trip_and_accept_core_display_form() {
        let p = 0x3f2a_0c11_9b7e_44d0;
        assert_eq!(format_peer_name(p), "3f2a0c119b7e44d0");
        assert_eq!(parse_peer_name(&format_peer_name(p)), Some(p));
        assert_eq!(parse_peer_name("3f2a:0c11:9b7e:44d0"), Some(p));
        assert_eq!(parse_peer_name("1"), Some(1));
    }

    #[test]
    fn malformed_peer_names_are_rejected() {
        for bad in ["", ":::", "xyz", "11112222333344445", "-1", "+1"] {
            assert_eq!(parse_peer_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn set_entry_reports_change_and_previous_peer() {
        let mut data = BTreeMap::new();
        assert_eq!(set_entry(&mut data, "n", 1), (true, None));
        assert_eq!(set_entry(&mut data, "n", 1), (false, Some(1)));
        assert_eq!(set_entry(&mut data, "n", 2), (true, Some(1)));
        assert_eq!(data["peer.n"], "0000000000000002");
    }

    #[test]
    fn remove_entry_only_removes_the_named_peer() {
        let mut data = BTreeMap::new();
        set_entry(&mut data, "n", 2);
        assert!(!remove_entry(&mut data, "n", 1));
        assert!(!remove_entry(&mut data, "other", 2));
        assert!(remove_entry(&mut data, "n", 2));
        assert!(data.is_empty());
    }

    #[test]
    fn backoff_grows_and_stays_bounded() {
        assert!(backoff(1) <= Duration::from_millis(20));
        assert!(backoff(1) >= Duration::from_millis(10));
        for attempt in 0..100 {
            assert!(backoff(attempt) <= Duration::from_secs(1));
        }
    }

    #[test]
    fn entries_skip_foreign_and_malformed_keys() {
        let data: BTreeMap<String, String> = [
            ("peer.node-1", "00000000000000ff"),
            ("peer.", "1"),
            ("peer.node-2", "garbage"),
            ("other", "2"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let e = entries_of(&data);
        assert_eq!(e.len(), 1);
        assert_eq!(e["node-1"], 0xff);
    }
}
