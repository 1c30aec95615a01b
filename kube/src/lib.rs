//! weft-kube: the Kubernetes side of the weft agent.
//!
//! Everything the agent needs from the API server, and nothing it needs to
//! keep running: gossip and the dataplane never wait on this crate, and
//! losing the API server only delays peer updates and reclaims.
//!
//! # Wiring it into the agent (`weft router --kube`)
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use weft_kube::{NodeChange, ReclaimAction, ReclaimConfig, Reclaimer};
//!
//! struct RmPeer; // in weft: the same command as `weft rmpeer`
//! impl ReclaimAction for RmPeer {
//!     async fn reclaim(&self, peer: u64) -> Result<(), weft_kube::BoxError> {
//!         let _ = peer; // core.remove_peer(PeerName(peer)) ...
//!         Ok(())
//!     }
//! }
//!
//! # async fn agent(node_name: &str, my_peer: u64) -> weft_kube::Result<()> {
//! // 1. Client: in-cluster in a pod, else KUBECONFIG.
//! let client = weft_kube::connect().await?;
//!
//! // 2. Start-up: initial peers and the quorum size for consensus=N.
//! let nodes = weft_kube::list_nodes(&client).await?;
//! let consensus = nodes.node_names.len();
//! let initial_peers: Vec<_> = nodes.peers.iter().map(|p| p.addr).collect();
//!
//! // 3. Record our peer name; a different previous one means this node was
//! //    wiped, and the old identity's space is reclaimed like a removed node's.
//! let names = weft_kube::NameMap::new(client.clone());
//! let reclaimer = Reclaimer::new(client.clone(), RmPeer, ReclaimConfig::new(node_name, my_peer));
//! if let Some(old) = names.register(node_name, my_peer).await? {
//!     reclaimer.reclaim_peer(node_name, old).await?;
//! }
//! // Nodes deleted while nobody watched, or our own unfinished claim:
//! reclaimer.sweep(&nodes.node_names).await?;
//!
//! // 4. Once the agent is ready (bridge up, socket listening):
//! weft_kube::set_network_available(&client, node_name).await?;
//!
//! // 5. Follow the Node list forever (never ends, never errors).
//! let mut changes = Box::pin(weft_kube::node_changes(client.clone()));
//! while let Some(change) = changes.next().await {
//!     match change {
//!         NodeChange::Peers(peers) => { /* set the peer list to peers' addrs */ }
//!         NodeChange::Deleted(node) => {
//!             let r = reclaimer.clone();
//!             tokio::spawn(async move { r.node_deleted_until_settled(&node).await });
//!         }
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # NetworkPolicy inputs
//!
//! ```no_run
//! # async fn agent(client: weft_kube::Client) {
//! let (tx, mut rx) = tokio::sync::watch::channel(None);
//! tokio::spawn(weft_kube::publish_cluster(client, tx));
//! while rx.changed().await.is_ok() {
//!     let Some(cluster) = rx.borrow_and_update().clone() else { continue };
//!     // weft_policy::compile(&cluster, ...) and apply the rules.
//!     let _ = cluster;
//! }
//! # }
//! ```
//!
//! Peer names are plain `u64` here (weft-core's `PeerName(u64)`), so this
//! crate does not depend on the core.
//!
//! # API objects and RBAC (`deploy/weft.yaml` grants exactly these)
//!
//! | object | verbs | used by |
//! |---|---|---|
//! | nodes | get, list, watch | [`list_nodes`], [`node_changes`], [`set_network_available`] |
//! | nodes/status | patch | [`set_network_available`] |
//! | configmaps `weft/weft` (created by the manifest) | get, update | [`NameMap`] |
//! | leases.coordination.k8s.io in namespace `weft` | get, create, update | [`Reclaimer`] |
//! | pods | list, watch | [`publish_cluster`], [`cluster_health`] (`weft doctor --cluster`) |
//! | namespaces | list, watch | [`publish_cluster`] |
//! | networkpolicies.networking.k8s.io | list, watch | [`publish_cluster`] |
//!
//! Namespace `weft` holds only weft's objects: `create` cannot be limited
//! by name in RBAC, so it is limited by namespace instead.
//!
//! The reclaim protocol is described in [`reclaim`].

pub mod client;
pub mod cluster;
pub mod condition;
pub mod error;
pub mod names;
pub mod observed;
pub mod peers;
pub mod policy;
pub mod reclaim;

pub use client::{connect, connect_kubeconfig};
pub use cluster::{AgentPod, NodeHealth, cluster_health};
pub use condition::set_network_available;
pub use error::{BoxError, Error, Result};
/// The API client, for callers that do not depend on kube themselves.
pub use kube::Client;
pub use names::NameMap;
pub use peers::{
    NodeChange, NodeList, NodeTracker, Peer, list_nodes, node_changes, peer_of, peers_of,
};
pub use policy::watch::{COALESCE, Snapshot, publish_cluster};
pub use policy::{Converted, namespace_of, pod_of, policy_of};
pub use reclaim::{Claim, Decision, Outcome, ReclaimAction, ReclaimConfig, Reclaimer, decide};
