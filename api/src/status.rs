//! The status server's JSON pages (127.0.0.1:6784): `/status/peers`,
//! `/status/connections` and `/status/ipam`. The node's parts are the
//! core's status types; the connections page adds the data path's state,
//! whose type belongs to the data path (`D`, so this crate needs only the
//! core).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use weft_core::connections::LinkState;
pub use weft_core::status::{
    ConnectionStatus, DropReason, IpamPeerStatus, IpamStatus, PeerStatus, PendingStatus,
    TargetStatus,
};

/// `/status/connections`: this node's links, the addresses it is trying,
/// the datagrams it refused and how pod traffic is carried.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnectionsPage<D> {
    pub connections: Vec<ConnectionStatus>,
    /// Addresses being tried that no connection uses yet.
    pub targets: Vec<TargetStatus>,
    /// Datagrams refused since the agent started, by reason.
    pub dropped: BTreeMap<DropReason, u64>,
    pub dataplane: D,
}

/// A drop reason's name, as status and metrics show it (`no_secret`).
pub fn drop_reason_name(reason: DropReason) -> String {
    match serde_json::to_value(reason) {
        Ok(serde_json::Value::String(name)) => name,
        _ => format!("{reason:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reasons_are_named_as_in_status() {
        assert_eq!(drop_reason_name(DropReason::NoSecret), "no_secret");
        assert_eq!(
            drop_reason_name(DropReason::Authentication),
            "authentication"
        );
    }
}
