//! `weft router --kube`: peers from the API server's Node objects, this
//! node's peer name recorded in ConfigMap `weft/weft`, the space of
//! deleted Nodes reclaimed (exactly once, by a Lease), and the Node
//! condition `NetworkUnavailable=False` once the agent is ready.
//!
//! Nothing here is on the path of gossip or the dataplane: the agent starts
//! without the API server (with its saved state and `--peer` addresses),
//! and losing the API server later only delays peer updates and reclaims.

use ipnet::Ipv4Net;
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use weft_core::PeerName;
use weft_driver::Command;
use weft_kube::{Client, NodeChange, NodeList, ReclaimAction, ReclaimConfig, Reclaimer};

/// How long start-up waits for the first Node list.
const FIRST_LIST_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between retries of API calls that must eventually happen.
const RETRY: Duration = Duration::from_secs(5);

/// The API server as the agent starts: a client and, if the server
/// answered in time, the Nodes.
pub struct Start {
    pub client: Client,
    pub nodes: Option<NodeList>,
}

/// Connects (in-cluster in a pod, else KUBECONFIG) and lists the Nodes,
/// giving up on the list after a short while: a cluster whose API server
/// is down still gets its network back from saved state.
pub async fn connect() -> Result<Start, weft_kube::Error> {
    let client = weft_kube::connect().await?;
    let list = tokio::time::timeout(FIRST_LIST_TIMEOUT, async {
        loop {
            match weft_kube::list_nodes(&client).await {
                Ok(nodes) => return nodes,
                Err(e) => {
                    tracing::warn!("kube: cannot list Nodes yet: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    })
    .await;
    if list.is_err() {
        tracing::warn!(
            "kube: no Node list after {FIRST_LIST_TIMEOUT:?}; starting from saved state and --peer, Nodes follow when the API server answers"
        );
    }
    Ok(Start {
        client,
        nodes: list.ok(),
    })
}

/// Peer addresses of the Nodes other than this node, on the agents' port.
pub fn peer_addresses(nodes: &NodeList, own: IpAddr, port: u16) -> BTreeSet<SocketAddr> {
    nodes
        .peers
        .iter()
        .filter(|p| p.addr != own)
        .map(|p| SocketAddr::new(p.addr, port))
        .collect()
}

/// Reclaims through the driver loop, like `weft rmpeer`.
struct RemovePeer {
    commands: mpsc::UnboundedSender<Command>,
}

impl ReclaimAction for RemovePeer {
    async fn reclaim(&self, peer: u64) -> Result<(), weft_kube::BoxError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::RemovePeer {
            peer: PeerName(peer),
            reply,
        };
        if self.commands.send(command).is_err() {
            return Err("the agent is stopping".into());
        }
        let addresses = answer.await??;
        tracing::info!(peer = %PeerName(peer), addresses, "kube: reclaimed a removed Node's address space");
        Ok(())
    }
}

/// This node's podCIDR as its Node says, for `--ipam node-cidr`.
pub fn own_pod_cidr<'a>(
    nodes: impl IntoIterator<Item = &'a weft_kube::Peer>,
    node_name: &str,
) -> Option<Ipv4Net> {
    let text = nodes
        .into_iter()
        .find(|p| p.node_name == node_name)?
        .pod_cidr
        .as_deref()?;
    match text.parse::<Ipv4Net>() {
        Ok(cidr) => Some(cidr.trunc()),
        Err(_) => {
            tracing::warn!(
                node_name,
                "kube: Node's podCIDR {text:?} is not an IPv4 prefix"
            );
            None
        }
    }
}

/// Node-cidr mode's view of this node's podCIDR.
pub struct PodCidr {
    /// The podCIDR the router has, if any.
    pub current: Option<Ipv4Net>,
    /// --ipalloc-range, which a podCIDR must be inside.
    pub range: Ipv4Net,
}

/// What the Kubernetes tasks need from the agent.
pub struct Agent {
    pub node_name: String,
    /// `Some` in node-cidr mode.
    pub pod_cidr: Option<PodCidr>,
    pub me: PeerName,
    pub own_address: IpAddr,
    pub port: u16,
    pub commands: mpsc::UnboundedSender<Command>,
    /// Whether the agent is ready (what /readyz says).
    pub ready: Ready,
}

/// Starts the Kubernetes tasks on the current LocalSet.
pub fn spawn(start: Start, agent: Agent) {
    let Start { client, nodes } = start;
    let reclaimer = Reclaimer::new(
        client.clone(),
        RemovePeer {
            commands: agent.commands.clone(),
        },
        ReclaimConfig::new(agent.node_name.clone(), agent.me.0),
    );
    let known = nodes
        .as_ref()
        .map(|n| peer_addresses(n, agent.own_address, agent.port))
        .unwrap_or_default();
    tokio::task::spawn_local(register(
        client.clone(),
        reclaimer.clone(),
        agent.node_name.clone(),
        agent.me,
    ));
    tokio::task::spawn_local(follow_nodes(
        client.clone(),
        reclaimer,
        known,
        Own {
            node_name: agent.node_name.clone(),
            address: agent.own_address,
            port: agent.port,
            pod_cidr: agent.pod_cidr,
        },
        agent.commands,
    ));
    tokio::task::spawn_local(report_ready(client, agent.node_name, agent.ready));
}

/// Records our peer name; reclaims the previous one if this node was wiped,
/// and Nodes deleted while no agent watched. Retries until the API answers.
async fn register(client: Client, reclaimer: Reclaimer<RemovePeer>, node: String, me: PeerName) {
    let names = weft_kube::NameMap::new(client.clone());
    let previous = retry("record this node's peer name", || {
        names.register(&node, me.0)
    })
    .await;
    if let Some(old) = previous {
        tracing::info!(node, old = %PeerName(old), "kube: this node was wiped; reclaiming its old identity's space");
        retry("reclaim the wiped identity", || {
            reclaimer.reclaim_peer(&node, old)
        })
        .await;
    }
    let live = retry("list Nodes", || weft_kube::list_nodes(&client)).await;
    retry("reclaim deleted Nodes", || {
        reclaimer.sweep(&live.node_names)
    })
    .await;
}

/// This node, as `follow_nodes` needs it.
struct Own {
    node_name: String,
    address: IpAddr,
    port: u16,
    pod_cidr: Option<PodCidr>,
}

impl Own {
    /// A podCIDR the Node gained (Kubernetes assigns it after the Node
    /// registers), if the router should take it.
    fn new_pod_cidr(&mut self, peers: &BTreeSet<weft_kube::Peer>) -> Option<Ipv4Net> {
        let state = self.pod_cidr.as_mut()?;
        let cidr = own_pod_cidr(peers, &self.node_name)?;
        if state.current == Some(cidr) {
            return None;
        }
        if let Some(old) = state.current {
            // Kubernetes never changes a podCIDR; a recreated Node might.
            tracing::warn!(%old, new = %cidr, "kube: this Node's podCIDR changed; keeping the old one until the agent restarts");
            return None;
        }
        if !state.range.contains(&cidr) {
            let e = crate::agent::settings::SettingsError::PodCidrOutsideRange {
                pod_cidr: cidr,
                range: state.range,
            };
            tracing::error!("kube: not taking this Node's podCIDR: {e}");
            return None;
        }
        state.current = Some(cidr);
        Some(cidr)
    }
}

/// Keeps the peer list equal to the Nodes', and reclaims deleted ones.
async fn follow_nodes(
    client: Client,
    reclaimer: Reclaimer<RemovePeer>,
    mut known: BTreeSet<SocketAddr>,
    mut own: Own,
    commands: mpsc::UnboundedSender<Command>,
) {
    use futures_util::StreamExt;
    let mut changes = Box::pin(weft_kube::node_changes(client));
    while let Some(change) = changes.next().await {
        match change {
            NodeChange::Peers(peers) => {
                if let Some(cidr) = own.new_pod_cidr(&peers) {
                    tracing::info!(%cidr, "kube: this Node's podCIDR is assigned");
                    let _ = commands.send(Command::SetPodCidr(cidr));
                }
                let now: BTreeSet<SocketAddr> = peers
                    .iter()
                    .filter(|p| p.addr != own.address)
                    .map(|p| SocketAddr::new(p.addr, own.port))
                    .collect();
                for added in now.difference(&known) {
                    let _ = commands.send(Command::AddPeer(*added));
                }
                for gone in known.difference(&now) {
                    let _ = commands.send(Command::ForgetPeerAddress(*gone));
                }
                known = now;
            }
            NodeChange::Deleted(node) => {
                let reclaimer = reclaimer.clone();
                tokio::task::spawn_local(async move {
                    // Refused while the removed peer is still reachable:
                    // its agent may take a few seconds to go quiet.
                    let outcome = retry("reclaim a deleted Node", || {
                        reclaimer.node_deleted_until_settled(&node)
                    })
                    .await;
                    tracing::info!(node, "kube: deleted Node settled: {outcome:?}");
                });
            }
        }
    }
}

/// Asks whether the agent is ready (what /readyz says).
pub type Ready = Box<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = bool>>>>;

/// Sets `NetworkUnavailable=False` once the agent is ready.
async fn report_ready(client: Client, node: String, ready: Ready) {
    while !ready().await {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    retry("set the Node condition", || {
        weft_kube::set_network_available(&client, &node)
    })
    .await;
    tracing::info!(
        node,
        "kube: Node condition NetworkUnavailable=False (WeftIsUp)"
    );
}

/// Runs `call` until it succeeds, logging each failure.
async fn retry<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, weft_kube::Error>>,
{
    loop {
        match call().await {
            Ok(value) => return value,
            Err(e) => {
                tracing::warn!("kube: cannot {what} yet, retrying in {RETRY:?}: {e}");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}
