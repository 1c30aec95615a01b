//! The local API on the agent's Unix socket (mode 0600), for the CNI
//! plugin: one JSON request per line, one JSON answer per line.
//!
//! ```text
//! {"op":"allocate","container_id":"abc","wait_ms":10000}
//! {"op":"release","container_id":"abc"}
//! {"op":"check","container_id":"abc"}
//! {"op":"list"}
//! {"op":"status"}
//! ```
//! Answers are `{"ok":true,...}` or `{"ok":false,"error":{"kind":..,"message":..}}`
//! where `kind` is `bad_request`, `pending` (try again later), `refused`
//! (the request cannot succeed as asked) or `unavailable` (the agent is
//! stopping). Requests for one container ID are idempotent.

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use weft_driver::{Command, SharedRouter, lock};

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;
/// How long an allocation waits for space unless the request says.
const DEFAULT_WAIT: Duration = Duration::from_secs(10);
const MAX_WAIT: Duration = Duration::from_secs(120);

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Allocate {
        container_id: String,
        #[serde(default)]
        wait_ms: Option<u64>,
    },
    Release {
        container_id: String,
    },
    Check {
        container_id: String,
    },
    List,
    Status,
    /// Reclaims the space of a peer removed for good (`weft rmpeer`):
    /// by peer name or nickname.
    RemovePeer {
        peer: String,
    },
    /// Deletes a pod's host-side veth (`vethwf…`) in the background, so
    /// CNI DEL need not wait for the kernel.
    DeleteVeth {
        interface: String,
    },
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    BadRequest,
    Pending,
    Refused,
    Unavailable,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Clone)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

/// An address and what a pod needs around it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Clone)]
pub struct Attachment {
    pub container_id: String,
    /// The pod address with the allocation range's prefix length.
    pub address: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Clone)]
pub struct NodeStatus {
    /// The agent can give addresses now.
    pub ready: bool,
    /// Why not, when not ready.
    pub reason: Option<String>,
    pub bridge: String,
    pub mtu: u32,
    pub range: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Clone)]
#[serde(untagged)]
pub enum Answer {
    Attachment(Attachment),
    Released { released: Option<Ipv4Addr> },
    List { allocations: Vec<Attachment> },
    Status(NodeStatus),
    Reclaimed { reclaimed: u64 },
    Accepted {},
}

/// What the API needs of the agent.
#[derive(Clone)]
pub struct Api {
    pub router: SharedRouter,
    pub commands: mpsc::UnboundedSender<Command>,
    pub bridge: String,
    pub mtu: u32,
    /// The router's time zero.
    pub epoch: tokio::time::Instant,
    /// The kernel thread, when this agent programs the kernel.
    pub kernel: Option<crate::kernel::KernelSync>,
    /// Which dataplane carries pods, and its problems.
    pub dataplane: std::sync::Arc<std::sync::Mutex<crate::agent::DataplaneState>>,
}

/// Binds the socket: replaces a stale socket file, mode 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("{} is served by a running agent", path.display()),
        ));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves connections until the task is dropped.
pub async fn serve(listener: UnixListener, api: Api) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::task::spawn_local(connection(stream, api.clone()));
            }
            Err(e) => {
                tracing::warn!("local API: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: UnixStream, api: Api) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(MAX_REQUEST as u64 + 1));
    let mut line = String::new();
    loop {
        line.clear();
        let answer = match lines.read_line(&mut line).await {
            Ok(0) => return,
            Ok(_) if !line.ends_with('\n') && line.len() > MAX_REQUEST => {
                Err(bad(format!("request longer than {MAX_REQUEST} bytes")))
            }
            Ok(_) => match serde_json::from_str::<Request>(line.trim()) {
                Ok(request) => api.handle(request).await,
                Err(e) => Err(bad(format!("not a valid request: {e}"))),
            },
            Err(e) => Err(bad(format!("unreadable request: {e}"))),
        };
        let text = match &answer {
            Ok(a) => {
                let mut v = serde_json::to_value(a).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("ok".into(), true.into());
                }
                v.to_string()
            }
            Err(e) => serde_json::json!({"ok": false, "error": e}).to_string(),
        };
        if write
            .write_all(format!("{text}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
        if matches!(&answer, Err(e) if e.kind == ErrorKind::BadRequest) {
            return;
        }
    }
}

use tokio::io::AsyncReadExt;

fn bad(message: String) -> ApiError {
    ApiError {
        kind: ErrorKind::BadRequest,
        message,
    }
}

fn pending(message: String) -> ApiError {
    ApiError {
        kind: ErrorKind::Pending,
        message,
    }
}

fn unavailable() -> ApiError {
    ApiError {
        kind: ErrorKind::Unavailable,
        message: "the weft agent is stopping".into(),
    }
}

impl Api {
    pub async fn handle(&self, request: Request) -> Result<Answer, ApiError> {
        match request {
            Request::Allocate {
                container_id,
                wait_ms,
            } => {
                let wait = wait_ms.map_or(DEFAULT_WAIT, Duration::from_millis);
                self.allocate(container_id, wait.min(MAX_WAIT)).await
            }
            Request::Release { container_id } => {
                let (reply, answer) = oneshot::channel();
                self.send(Command::Release {
                    container: container_id,
                    reply,
                })?;
                match answer.await.map_err(|_| unavailable())? {
                    Ok(released) => Ok(Answer::Released { released }),
                    Err(e) => Err(refused(e)),
                }
            }
            Request::Check { container_id } => {
                let router = lock(&self.router);
                let held = router.ipam().allocations().get(&container_id);
                match held {
                    Some(address) => Ok(Answer::Attachment(self.attachment(
                        &router,
                        container_id,
                        address,
                    ))),
                    None => Err(ApiError {
                        kind: ErrorKind::Refused,
                        message: format!("container {container_id} holds no address on this node"),
                    }),
                }
            }
            Request::List => {
                let router = lock(&self.router);
                let allocations = router
                    .ipam()
                    .allocations()
                    .iter()
                    .filter(|(id, _)| *id != weft_core::ipam::space::GATEWAY_ID)
                    .map(|(id, a)| self.attachment(&router, id.to_string(), a))
                    .collect();
                Ok(Answer::List { allocations })
            }
            Request::Status => Ok(Answer::Status(self.status())),
            Request::DeleteVeth { interface } => {
                let valid = interface.starts_with("vethwf")
                    && interface.len() <= 15
                    && interface.chars().all(|c| c.is_ascii_alphanumeric());
                let refused = |message: String| ApiError {
                    kind: ErrorKind::Refused,
                    message,
                };
                if !valid {
                    return Err(refused(format!("{interface:?} is not a weft pod veth")));
                }
                match &self.kernel {
                    Some(k) if k.delete_device(interface) => Ok(Answer::Accepted {}),
                    _ => Err(refused("this agent does not program the kernel".into())),
                }
            }
            Request::RemovePeer { peer } => {
                let name = self.peer_named(&peer)?;
                let (reply, answer) = oneshot::channel();
                self.send(Command::RemovePeer { peer: name, reply })?;
                match answer.await.map_err(|_| unavailable())? {
                    Ok(reclaimed) => Ok(Answer::Reclaimed { reclaimed }),
                    Err(e) => Err(refused(e)),
                }
            }
        }
    }

    fn now(&self) -> weft_core::Time {
        weft_core::Time::from_duration(self.epoch.elapsed())
    }

    /// A peer by its name, or by its nickname when that is unambiguous.
    fn peer_named(&self, peer: &str) -> Result<weft_core::PeerName, ApiError> {
        if let Ok(name) = peer.parse() {
            return Ok(name);
        }
        let router = lock(&self.router);
        let matches: Vec<weft_core::PeerName> = router
            .status(self.now())
            .peers
            .iter()
            .filter(|p| p.nickname == peer)
            .map(|p| p.name)
            .collect();
        match matches.as_slice() {
            [one] => Ok(*one),
            [] => Err(ApiError {
                kind: ErrorKind::Refused,
                message: format!("no known peer is named {peer}"),
            }),
            _ => Err(ApiError {
                kind: ErrorKind::Refused,
                message: format!("several peers are nicknamed {peer}; give the peer name"),
            }),
        }
    }

    fn send(&self, command: Command) -> Result<(), ApiError> {
        self.commands.send(command).map_err(|_| unavailable())
    }

    /// An address for `container`, answered once a pod can use it: when
    /// this agent programs the kernel, only after the bridge holds the
    /// gateway (space and bridge arrive together on a new node, and the
    /// plugin wires the pod to the bridge right away). Both waits share
    /// `wait`.
    async fn allocate(&self, container: String, wait: Duration) -> Result<Answer, ApiError> {
        let deadline = tokio::time::Instant::now() + wait;
        let (reply, answer) = oneshot::channel();
        self.send(Command::Allocate {
            container: container.clone(),
            reply,
        })?;
        let address = match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(Ok(address))) => address,
            Ok(Ok(Err(e))) => return Err(refused(e)),
            Ok(Err(_)) => return Err(unavailable()),
            Err(_) => {
                return Err(pending(format!(
                    "no address for {container} yet: {}",
                    self.pending_reason(&container)
                )));
            }
        };
        if let Some(kernel) = &self.kernel {
            let gateway = || lock(&self.router).gateway();
            if tokio::time::timeout_at(deadline, kernel.bridge_ready(gateway))
                .await
                .is_err()
            {
                let reason = self.status().reason;
                let reason = reason.unwrap_or_else(|| "it was just set up".into());
                return Err(pending(format!(
                    "{container} holds {address}, but the bridge {} is not ready for pods yet: {reason}",
                    self.bridge
                )));
            }
        }
        let router = lock(&self.router);
        Ok(Answer::Attachment(
            self.attachment(&router, container, address),
        ))
    }

    fn pending_reason(&self, container: &str) -> String {
        let router = lock(&self.router);
        let status = router.status(self.now());
        status
            .ipam
            .pending
            .iter()
            .find(|p| p.container == container)
            .map(|p| p.reason.clone())
            .unwrap_or_else(|| "the request is still being processed".into())
    }

    fn attachment(
        &self,
        router: &weft_core::Router,
        container_id: String,
        address: Ipv4Addr,
    ) -> Attachment {
        let prefix = router.ipam().range().prefix_len();
        Attachment {
            container_id,
            address: Ipv4Net::new(address, prefix).expect("prefix of a valid range"),
            gateway: router.gateway(),
        }
    }

    pub fn status(&self) -> NodeStatus {
        let router = lock(&self.router);
        let status = router.status(self.now());
        let problem = self
            .dataplane
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .kernel_error
            .clone();
        let reason = if let Some(p) = problem {
            Some(p)
        } else if !status.ipam.seeded && status.ipam.mode != "node-cidr" {
            Some(
                "the IPAM ring is not seeded yet: waiting for a quorum of peers (see `weft status ipam`)"
                    .into(),
            )
        } else if let Some(gateway) = router.gateway() {
            match &self.kernel {
                Some(kernel) if !kernel.bridge_holds(gateway) => Some(format!(
                    "the bridge {} does not hold the gateway {gateway} yet",
                    self.bridge
                )),
                _ => None,
            }
        } else {
            Some("this node has no address space yet".into())
        };
        NodeStatus {
            ready: reason.is_none(),
            reason,
            bridge: self.bridge.clone(),
            mtu: self.mtu,
            range: status.ipam.range,
            gateway: router.gateway(),
        }
    }
}

fn refused(e: weft_core::ipam::IpamError) -> ApiError {
    ApiError {
        kind: ErrorKind::Refused,
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::DataplaneState;
    use crate::kernel::{KernelSync, Overlay};
    use std::sync::{Arc, Mutex};

    /// An agent API over a node-cidr router that has its space, with a
    /// kernel thread over an in-memory dataplane that has applied nothing
    /// yet, and a stand-in driver that answers every allocation with .5.
    fn agent_with_space() -> Api {
        use weft_core::ipam::IpamMode;
        let mut config = weft_core::Config::new("node1", ([192, 168, 1, 11], 6783).into());
        config.ipam = IpamMode::NodeCidr(Some("10.32.1.0/24".parse().unwrap()));
        let mut router = weft_core::Router::new(config, None, [1; 32], weft_core::Time::ZERO)
            .expect("a valid configuration");
        router.handle_timeout(weft_core::Time::ZERO);
        assert!(router.gateway().is_some(), "the node has its space");
        let dataplane = Arc::new(Mutex::new(DataplaneState {
            requested: "sleeve",
            in_use: "none",
            fallback: None,
            kernel_error: None,
            egress_problem: None,
            peers: Vec::new(),
        }));
        let kernel = KernelSync::start(
            Box::new(weft_dataplane::MemoryDataplane::new()),
            dataplane.clone(),
        );
        let (commands, mut driver) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(command) = driver.recv().await {
                if let Command::Allocate { reply, .. } = command {
                    let _ = reply.send(Ok(Ipv4Addr::new(10, 32, 1, 5)));
                }
            }
        });
        Api {
            router: Arc::new(Mutex::new(router)),
            commands,
            bridge: "weft".into(),
            mtu: 1400,
            epoch: tokio::time::Instant::now(),
            kernel: Some(kernel),
            dataplane,
        }
    }

    fn allocate(container: &str, wait_ms: u64) -> Request {
        Request::Allocate {
            container_id: container.into(),
            wait_ms: Some(wait_ms),
        }
    }

    /// A new node gets its space before the kernel thread has made the
    /// bridge: neither readiness nor an address may be answered until the
    /// bridge holds the gateway, or the plugin finds no bridge to wire
    /// the pod to.
    #[test]
    fn addresses_and_readiness_wait_for_the_bridge() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let api = agent_with_space();
            let status = api.status();
            assert!(!status.ready, "{status:?}");
            assert!(status.reason.unwrap().contains("bridge weft"));
            let early = api.handle(allocate("c1", 50)).await.unwrap_err();
            assert_eq!(early.kind, ErrorKind::Pending, "{early:?}");
            assert!(early.message.contains("10.32.1.5"), "{early:?}");

            let kernel = api.kernel.clone().unwrap();
            let desired = {
                let router = lock(&api.router);
                crate::kernel::desired(&router, "weft", 1400, Overlay::Sleeve, &Default::default())
            };
            kernel.update(desired);
            let Ok(Answer::Attachment(a)) = api.handle(allocate("c1", 60_000)).await else {
                panic!("an address once the bridge is up");
            };
            assert_eq!(a.address.addr(), Ipv4Addr::new(10, 32, 1, 5));
            assert!(a.gateway.is_some_and(|g| kernel.bridge_holds(g)));
            assert!(api.status().ready);
        });
    }

    #[test]
    fn requests_parse_and_unknown_fields_are_refused() {
        let r: Request = serde_json::from_str(r#"{"op":"allocate","container_id":"c1"}"#).unwrap();
        assert_eq!(
            r,
            Request::Allocate {
                container_id: "c1".into(),
                wait_ms: None
            }
        );
        let r: Request = serde_json::from_str(r#"{"op":"list"}"#).unwrap();
        assert_eq!(r, Request::List);
        for bad in [
            r#"{"op":"allocate"}"#,
            r#"{"op":"format_disk"}"#,
            r#"{"op":"release","container_id":"c","extra":1}"#,
            "\u{0}\u{1}garbage",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }
}
