//! The Node condition `NetworkUnavailable=False` that tells the scheduler
//! (and `kubectl describe node`) that pod networking is up on a node.

use k8s_openapi::api::core::v1::{Node, NodeCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::error::{Result, api};

pub const CONDITION_TYPE: &str = "NetworkUnavailable";
pub const REASON: &str = "WeftIsUp";
pub const MESSAGE: &str = "weft is running on this node";

/// The status patch. lastTransitionTime moves only when the status really
/// changes, so that an agent restart does not look like a network flap.
pub fn network_available_patch(existing: Option<&NodeCondition>, now: Timestamp) -> Value {
    let transition = existing
        .filter(|c| c.status == "False")
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    json!({
        "status": {
            "conditions": [{
                "type": CONDITION_TYPE,
                "status": "False",
                "reason": REASON,
                "message": MESSAGE,
                "lastTransitionTime": transition,
                "lastHeartbeatTime": Time(now),
            }]
        }
    })
}

/// The node's current NetworkUnavailable condition, if any.
pub fn network_condition(node: &Node) -> Option<&NodeCondition> {
    let conditions = node.status.as_ref()?.conditions.as_ref()?;
    conditions.iter().find(|c| c.type_ == CONDITION_TYPE)
}

/// Sets NetworkUnavailable=False on `node` (verbs: `get nodes`, `patch
/// nodes/status`). A strategic merge patch merges conditions by `type`, so
/// the kubelet's own conditions are left alone.
pub async fn set_network_available(client: &Client, node: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let current = nodes
        .get(node)
        .await
        .map_err(api(format!("get node {node}")))?;
    let patch = network_available_patch(network_condition(&current), crate::reclaim::now());
    nodes
        .patch_status(node, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .map_err(api(format!("patch node {node} status")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(status: &str, transition: i64) -> NodeCondition {
        NodeCondition {
            type_: CONDITION_TYPE.into(),
            status: status.into(),
            last_transition_time: Some(Time(Timestamp::from_second(transition).unwrap())),
            ..Default::default()
        }
    }

    fn transition_of(patch: &Value) -> &Value {
        &patch["status"]["conditions"][0]["lastTransitionTime"]
    }

    #[test]
    fn patch_sets_false_with_reason() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let p = network_available_patch(None, now);
        let c = &p["status"]["conditions"][0];
        assert_eq!(c["type"], "NetworkUnavailable");
        assert_eq!(c["status"], "False");
        assert_eq!(c["reason"], "WeftIsUp");
        assert_eq!(transition_of(&p), "2027-01-15T08:00:00Z");
    }

    #[test]
    fn transition_time_kept_when_already_false_and_moved_when_flipping() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let kept = network_available_patch(Some(&cond("False", 1_000)), now);
        assert_eq!(transition_of(&kept), "1970-01-01T00:16:40Z");
        let moved = network_available_patch(Some(&cond("True", 1_000)), now);
        assert_eq!(transition_of(&moved), "2027-01-15T08:00:00Z");
    }
}
