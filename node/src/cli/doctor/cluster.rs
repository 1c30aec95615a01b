//! `weft doctor --cluster`: one line per node from the API server (its
//! weft pod running and ready, the Node condition) and from this agent
//! (is that node's peer connected).

use super::checks::{Check, Level};
use super::facts::Facts;
use weft_kube::NodeHealth;

/// The namespace the DaemonSet runs in.
const NAMESPACE: &str = "kube-system";

pub fn checks(facts: &Facts) -> Vec<Check> {
    match fetch() {
        Ok(nodes) if nodes.is_empty() => {
            vec![Check::warn(
                "cluster",
                "the API server lists no Nodes",
                "check KUBECONFIG points at the right cluster",
            )]
        }
        Ok(nodes) => nodes.iter().map(|n| node_line(n, facts)).collect(),
        Err(e) => vec![Check::fail(
            "cluster",
            format!("cannot ask the API server: {e}"),
            "run where KUBECONFIG (or the pod's service account) can list Nodes and kube-system pods",
        )],
    }
}

fn fetch() -> Result<Vec<NodeHealth>, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let ask = async {
            let client = weft_kube::connect().await.map_err(|e| e.to_string())?;
            weft_kube::cluster_health(&client, NAMESPACE)
                .await
                .map_err(|e| e.to_string())
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), ask)
            .await
            .map_err(|_| "no answer within 10 s".to_string())?
    })
}

/// The node's three facts, and the worst of them.
fn node_line(node: &NodeHealth, facts: &Facts) -> Check {
    let (pod_level, pod) = match &node.agent {
        None => (Level::Fail, "no weft pod".to_string()),
        Some(p) if p.phase == "Running" && p.ready => (
            Level::Ok,
            format!("{} running, ready ({} restarts)", p.name, p.restarts),
        ),
        Some(p) => (
            Level::Fail,
            format!(
                "{} {}, not ready ({} restarts)",
                p.name, p.phase, p.restarts
            ),
        ),
    };
    let (peer_level, peer) = peer_state(node, facts);
    let (condition_level, condition) = match &node.condition {
        Some((status, reason)) if status == "False" => {
            (Level::Ok, format!("NetworkUnavailable=False ({reason})"))
        }
        Some((status, reason)) => (
            Level::Fail,
            format!("NetworkUnavailable={status} ({reason})"),
        ),
        None => (Level::Warn, "NetworkUnavailable not set".to_string()),
    };
    let level = pod_level.max(peer_level).max(condition_level);
    let check = format!("node {}", node.name);
    let evidence = format!("{pod}; {peer}; {condition}");
    match level {
        Level::Ok => Check::ok(&check, evidence),
        Level::Warn => Check::warn(
            &check,
            evidence,
            "the agent sets the condition once ready; see that node's `weft doctor`",
        ),
        Level::Fail => Check::fail(
            &check,
            evidence,
            "`kubectl -n kube-system describe pod` and `logs` for that node's weft pod, then `weft doctor` on it",
        ),
    }
}

/// Whether this agent is connected to the node's peer.
fn peer_state(node: &NodeHealth, facts: &Facts) -> (Level, String) {
    let (Ok(agent), Some(address)) = (&facts.agent, node.address) else {
        return (Level::Warn, "peer unknown".into());
    };
    if agent.me_address().map(|a| a.ip()) == Some(address) {
        return (Level::Ok, "this node".into());
    }
    match agent
        .expected()
        .into_iter()
        .find(|p| p.address.ip() == address)
    {
        Some(p) if p.connected => (Level::Ok, "peer connected".into()),
        Some(p) if p.reachable => (Level::Warn, "peer relayed, not connected".into()),
        Some(_) => (Level::Fail, "peer unreachable".into()),
        None => (
            Level::Fail,
            format!("{address} is not a peer of this agent"),
        ),
    }
}
