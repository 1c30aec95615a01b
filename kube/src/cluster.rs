//! Every node's health as the API server sees it, for `weft doctor
//! --cluster`: the weft pod on it and the Node's network condition.

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::ListParams;
use kube::{Api, Client};

use crate::condition::CONDITION_TYPE;
use crate::error::{Result, api};
use crate::peers::node_address;

/// The label the DaemonSet's pods carry (deploy/weft.yaml).
pub const POD_SELECTOR: &str = "app.kubernetes.io/name=weft";

/// One node, as the API server sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeHealth {
    pub name: String,
    pub address: Option<std::net::IpAddr>,
    /// `NetworkUnavailable`'s status and reason, if the condition is set.
    pub condition: Option<(String, String)>,
    /// The weft pod scheduled on it, if any.
    pub agent: Option<AgentPod>,
}

/// The weft pod on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentPod {
    pub name: String,
    pub phase: String,
    pub ready: bool,
    pub restarts: i32,
}

/// Every Node with its weft pod, sorted by node name.
pub async fn cluster_health(client: &Client, namespace: &str) -> Result<Vec<NodeHealth>> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api("list Nodes"))?;
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(POD_SELECTOR))
        .await
        .map_err(api(format!("list weft pods in {namespace}")))?;
    let mut out: Vec<NodeHealth> = nodes
        .items
        .iter()
        .map(|node| {
            let name = node.metadata.name.clone().unwrap_or_default();
            let agent = pods
                .items
                .iter()
                .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&name))
                .map(agent_pod);
            NodeHealth {
                address: node_address(node),
                condition: network_condition(node),
                agent,
                name,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn network_condition(node: &Node) -> Option<(String, String)> {
    let c = node
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == CONDITION_TYPE)?;
    Some((c.status.clone(), c.reason.clone().unwrap_or_default()))
}

fn agent_pod(pod: &Pod) -> AgentPod {
    let status = pod.status.as_ref();
    let containers = status
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default();
    AgentPod {
        name: pod.metadata.name.clone().unwrap_or_default(),
        phase: status
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Unknown".into()),
        ready: !containers.is_empty() && containers.iter().all(|c| c.ready),
        restarts: containers.iter().map(|c| c.restart_count).sum(),
    }
}
